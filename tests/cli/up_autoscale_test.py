#!/usr/bin/env python3
"""`switchyard up --autoscale` end to end, with real processes on tiny-mixtral:
skewed load on expert 3 (`switchyard bench --skew-experts 3`) gives expert 3 a
second replica, which joins the gateway's topology and serves calls; every
request succeeds, and greedy generations of prompts routed to expert 3,
sent while replicas come and go, have exactly the tokens of their solo run;
after the load stops, replicas return to the minimum (one per expert) after
the scale-down delay, the drained replica's process exits, and `up`'s own
/metrics and log show the decisions.

Bad autoscaling flags are refused with a message naming the flag.

The assertions are on outcomes (replica counts, calls served, tokens), each
awaited with a generous deadline, never on how fast something happened.
The timeline printed at the end is what README "Autoscaling hot experts"
quotes.

usage: up_autoscale_test.py BUILD_DIR SOURCE_DIR
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

from bench_testlib import check, finish, scrape

build, source = sys.argv[1], sys.argv[2]
switchyard = os.path.join(build, "bin", "switchyard")
model = os.path.join(source, "tests", "data", "tiny-mixtral")
HOT = 3
EXPERTS = 8
DELAY_S = 6

# Bad autoscaling flags: exit non-zero at once, naming the flag.
for args, named in [(["--min-replicas", "2"], "--min-replicas needs --autoscale"),
                    (["--autoscale", "--min-replicas", "3", "--max-replicas", "2"],
                     "--max-replicas (2) is below --min-replicas (3)"),
                    (["--autoscale", "--target-busy", "0"], "--target-busy"),
                    (["--autoscale", "--scale-down-delay-s", "-1"], "--scale-down-delay-s"),
                    (["--autoscale", "--autoscale-period-ms", "10"], "--autoscale-period-ms"),
                    (["--autoscale", "--experts-per-process", "2"], "--experts-per-process 1"),
                    (["--gpus", "0,1"], "--gpus needs --device cuda"),
                    (["--device", "cuda", "--gpus", "0,x"], "'x' is not a GPU index")]:
    r = subprocess.run([switchyard, "up", "--model", model, "--port", "0", *args],
                       capture_output=True, text=True, timeout=60)
    check("refused: %s" % " ".join(args), r.returncode != 0 and named in r.stderr,
          (r.returncode, r.stderr[-300:]))

folder = tempfile.mkdtemp(prefix="up_autoscale_")
endpoints = os.path.join(folder, "endpoints.json")
log_path = os.path.join(folder, "up.log")
log_file = open(log_path, "w")
# A low target: the tiny model's experts compute for microseconds, so under
# this load the hot expert is busy 0.5-1.5% of the time, its peers mostly
# below 0.4% (--target-busy is per worker: 0.002 x the experts' 2 workers is
# 0.004 busy seconds per second per replica) (a cold expert that crosses the target now and then may get a
# replica too; nothing here depends on it). A 2 s period smooths the ratio.
up = subprocess.Popen([switchyard, "up", "--model", model, "--port", "0", "--endpoints-file",
                       endpoints, "--autoscale", "--min-replicas", "1", "--max-replicas", "2",
                       "--target-busy", "0.002", "--autoscale-period-ms", "2000",
                       "--scale-down-delay-s", str(DELAY_S), "--metrics-port", "0"],
                      stdout=log_file, stderr=subprocess.STDOUT)
t0 = time.time()


def log():
    with open(log_path) as f:
        return f.read()


def doc():
    with open(endpoints) as f:
        return json.load(f)


def gauge(text, name, expert):
    m = re.search(r'^%s\{expert="%d"\} (\S+)$' % (name, expert), text, re.M)
    return float(m.group(1)) if m else None


def stop_up():
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
    try:
        return up.wait(timeout=60)
    except subprocess.TimeoutExpired:
        up.kill()
        return up.wait()


deadline = time.time() + 120
while not os.path.exists(endpoints):
    if up.poll() is not None or time.time() > deadline:
        print(log())
        stop_up()
        raise SystemExit("switchyard up --autoscale did not start")
    time.sleep(0.2)

try:
    d = doc()
    gateway = [p for p in d["processes"] if p["role"] == "gateway"][0]
    server, gateway_metrics, up_metrics = gateway["grpc"], gateway["metrics"], d["up"]["metrics"]
    said = "target busy 0.004 per replica (0.002 of each of 2 workers)"
    deadline = time.time() + 10
    while said not in log() and time.time() < deadline:
        time.sleep(0.1)
    check("--target-busy is per worker: 0.002 x 2 workers per replica", said in log(), log()[-1500:])
    check("one replica per expert in the topology at start",
          all(len(d["experts"][str(e)]) == 1 for e in range(EXPERTS)), d["experts"])
    text = scrape(up_metrics)
    check("up exports desired and current replicas per expert",
          gauge(text, "switchyard_autoscaler_desired_replicas", HOT) == 1 and
          gauge(text, "switchyard_autoscaler_current_replicas", HOT) == 1, text[:2000])

    timeline = []  # (seconds since up started, replicas of expert 3 in the gateway)

    def sample():
        try:
            n = gauge(scrape(gateway_metrics), "switchyard_gateway_expert_replicas", HOT)
        except OSError:
            n = None
        if n is not None and (not timeline or timeline[-1][1] != n):
            timeline.append((round(time.time() - t0, 1), int(n)))
        return n

    sampler_stop = threading.Event()

    def sampler():
        while not sampler_stop.is_set():
            sample()
            time.sleep(0.25)

    sampler_thread = threading.Thread(target=sampler)
    def bench(requests):
        r = subprocess.run([switchyard, "bench", "--server", server, "--metrics", gateway_metrics,
                            "--json", "--skew-experts", str(HOT), "--requests", str(requests),
                            "--concurrency", "32", "--prompt-tokens", "24", "--output-tokens",
                            "16"], capture_output=True, text=True, timeout=300)
        return json.loads(r.stdout) if r.returncode == 0 else {"errors": -1, "stderr": r.stderr}

    # Prompts made of the tokens the router sends most to expert 3 (bench's
    # probe), and their solo greedy tokens before any load.
    sampler_thread.start()
    probe = bench(8)
    check("probe run succeeds", probe.get("errors") == 0, probe)
    pool = [p["token"] for p in probe["skew"]["pool"]]
    prompts = [",".join(str(t) for t in [1] + (pool * 4)[i:i + 12]) for i in range(3)]

    def generate(ids):
        r = subprocess.run([switchyard, "generate", "--server", server, "--token-ids", ids,
                            "--max-new-tokens", "8", "--temperature", "0", "--json"],
                           capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout)["token_ids"] if r.returncode == 0 else r.stderr

    solo = [generate(p) for p in prompts]
    check("solo runs succeed", all(isinstance(s, list) and len(s) == 8 for s in solo), solo)

    # While the load runs: the hot prompts again and again, compared with solo.
    checked, mismatches, stop_checker = [0], [], threading.Event()

    def checker():
        while not stop_checker.is_set():
            for p, want in zip(prompts, solo):
                got = generate(p)
                checked[0] += 1
                if got != want:
                    mismatches.append((p, got, want))

    checker_thread = threading.Thread(target=checker)
    checker_thread.start()

    # Skewed load in rounds until expert 3's second replica is in the gateway
    # and has served calls (at most 120 s of rounds: on a busy machine the
    # ratio runs lower and may take a few rounds to cross), then one more.
    runs, new_replica, served = [], None, 0.0
    load_deadline = time.time() + 120
    extra_rounds = 1
    while time.time() < load_deadline:
        runs.append(bench(100))
        replicas = [p for p in doc()["processes"] if p["role"] == "expert" and p["experts"] == [HOT]]
        joined = [p for p in replicas if p.get("state") == "serving" and p["replica"] >= EXPERTS]
        if joined:
            new_replica = joined[0]
            try:
                text = scrape(new_replica["metrics"])
                served = sum(float(v) for v in re.findall(
                    r'^switchyard_expert_calls_total\{[^}]*\} (\S+)$', text, re.M))
            except OSError:
                pass
        if new_replica and served > 0:
            if extra_rounds == 0:
                break
            extra_rounds -= 1
    load_end = time.time() - t0
    stop_checker.set()
    checker_thread.join()
    check("the hot expert got a second replica that joined the topology", new_replica is not None,
          doc()["processes"])
    check("the second replica served calls", served > 0, served)
    check("the gateway routed expert 3 to two replicas", any(n == 2 for _, n in timeline),
          timeline)
    check("every bench request succeeded", all(r.get("errors") == 0 for r in runs),
          [r for r in runs if r.get("errors") != 0][:2])
    check("hot prompts kept their solo tokens while replicas changed",
          not mismatches and checked[0] > 0, (checked[0], mismatches[:3]))
    text = log()
    check("the scale-up decision is logged",
          # (a recommendation above --max-replicas is logged as capped there)
          re.search(r"autoscaler: expert 3 busy \S+ current 1 desired 2: "
                    r"(scale up|capped at max replicas|scale-up limited by the rate policies)", text),
          "")

    # Idle: back to one replica per expert after the delay.
    deadline = time.time() + DELAY_S + 60
    while time.time() < deadline:
        d = doc()
        experts_procs = [p for p in d["processes"] if p["role"] == "expert"]
        if all(len(d["experts"][str(e)]) == 1 for e in range(EXPERTS)) and \
                len(experts_procs) == EXPERTS:
            break
        time.sleep(0.5)
    sampler_stop.set()
    sampler_thread.join()
    sample()
    d = doc()
    check("replicas return to the minimum after the load",
          all(len(d["experts"][str(e)]) == 1 for e in range(EXPERTS)), d["experts"])
    check("only the first replicas remain as processes",
          sorted(p["replica"] for p in d["processes"] if p["role"] == "expert") ==
          list(range(EXPERTS)), d["processes"])
    if new_replica:
        pid = new_replica["pid"]
        gone = not os.path.exists("/proc/%d" % pid)
        if not gone:
            with open("/proc/%d/stat" % pid) as f:
                gone = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        check("the drained replica's process exited", gone, pid)
    text = scrape(up_metrics)
    check("up's metrics show one replica of expert 3 again",
          gauge(text, "switchyard_autoscaler_current_replicas", HOT) == 1 and
          gauge(text, "switchyard_autoscaler_desired_replicas", HOT) == 1,
          [l for l in text.splitlines() if "expert=\"3\"" in l])
    check("up counted the scale events of expert 3",
          re.search(r'^switchyard_autoscaler_scale_events_total\{direction="up",expert="3"\} [1-9]',
                    text, re.M) and
          re.search(r'^switchyard_autoscaler_scale_events_total\{direction="down",expert="3"\} [1-9]',
                    text, re.M), "")
    text = log()
    check("the drain is logged", re.search(r"expert 3 replica \d+ drained after", text), "")
    check("the gateway applied the removal",
          # (one reload may apply several experts' changes: "expert 0: -A; expert 3: -B")
          re.search(r"expert topology from .* applied: (.*; )?expert 3: -", text), "")
    # The timeline (for the README).
    joined_at = re.search(r"expert 3 replica \d+ \(pid \d+\) healthy at \S+ after (\S+) s", text)
    print("load rounds: %d (100 requests each, concurrency 32), ended at %.1f s; %d hot-prompt "
          "generations compared" % (len(runs), load_end, checked[0]))
    print("expert 3 replicas in the gateway over time (s since up started, replicas): %s" %
          timeline)
    if joined_at:
        print("the new replica was healthy %s s after it was started" % joined_at.group(1))
finally:
    code = stop_up()
check("up exits 0 on SIGTERM", code == 0, code)
check("up removed the endpoints file", not os.path.exists(endpoints), endpoints)
import bench_testlib  # noqa: E402 (its tally, for the log on failure)
if bench_testlib.failures:
    print(log()[-6000:])
finish()
