#!/usr/bin/env python3
"""Writes broken variants of a rendered overlay, to prove validate.mjs catches them.

usage: mutate_k8s.py RENDERED.yaml OUT_DIR
Writes OUT_DIR/NN-name.yaml and OUT_DIR/NN-name.expect (a substring that
validate.mjs must print for that file). validate_k8s.sh runs the validator on
each and fails unless it rejects every one with the expected message.
Needs PyYAML (Debian: python3-yaml).
"""
import copy
import os
import sys

import yaml

# libyaml's C loader and dumper where PyYAML has them (Debian's does): the
# pure-Python ones take seconds per overlay.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def find(docs, kind, name=None):
    for d in docs:
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name):
            return d
    raise KeyError((kind, name))


def container(docs, name):
    return find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def autoscaler_kind(docs):
    return "ScaledObject" if any(d["kind"] == "ScaledObject" for d in docs) else "HorizontalPodAutoscaler"


def monitoring_mutations():
    """Broken PrometheusRule / dashboard ConfigMap (renders with components/monitoring)."""

    def first_alert(docs):
        return next(r for g in find(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"] if "alert" in r)

    def no_runbook_url(docs):
        first_alert(docs)["annotations"].pop("runbook_url")

    def runbook_section_missing(docs):
        first_alert(docs)["annotations"]["runbook_url"] = "docs/runbook.md#no-such-section"

    def rule_drift(docs):  # a PrometheusRule edited by hand instead of generated
        first_alert(docs)["for"] = "1h"

    def dashboard_label(docs):
        find(docs, "ConfigMap", "switchyard-dashboard")["metadata"]["labels"].pop("grafana_dashboard")

    return [
        (no_runbook_url, "has no runbook_url"),
        (runbook_section_missing, "docs/runbook.md has no section #no-such-section"),
        (rule_drift, "groups differ from deploy/prometheus/rules.yml"),
        (dashboard_label, "no ConfigMap with label grafana_dashboard carries"),
    ]


def common_mutations():
    """Gateway, PDB and KEDA rules that hold for every layout (first expert Deployment)."""

    def first_expert(docs):
        return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] != "switchyard-gateway")

    def one_gateway(docs):
        find(docs, "Deployment", "switchyard-gateway")["spec"]["replicas"] = 1

    def gateway_not_spread(docs):
        find(docs, "Deployment", "switchyard-gateway")["spec"]["template"]["spec"].pop("topologySpreadConstraints")

    def pdb_max_unavailable(docs):
        name = first_expert(docs)["metadata"]["name"]
        spec = find(docs, "PodDisruptionBudget", name)["spec"]
        spec.pop("minAvailable")
        spec["maxUnavailable"] = 1

    def pdb_zero(docs):
        find(docs, "PodDisruptionBudget", "switchyard-gateway")["spec"]["minAvailable"] = 0

    def gateway_pdb_blocks(docs):
        find(docs, "PodDisruptionBudget", "switchyard-gateway")["spec"]["minAvailable"] = 2

    out = [
        (gateway_pdb_blocks, "no drain could proceed"),
        (one_gateway, "gateway replicas 1, want >= 2"),
        (gateway_not_spread, "no topology spread or anti-affinity"),
        (pdb_max_unavailable, "uses maxUnavailable"),
        (pdb_zero, "minAvailable 0, want an integer >= 1"),
    ]

    def scaled(docs):
        return find(docs, "ScaledObject", first_expert(docs)["metadata"]["name"])

    def no_fallback(docs):
        scaled(docs)["spec"].pop("fallback")

    def query_any_namespace(docs):
        t = next(t for t in scaled(docs)["spec"]["triggers"] if t["name"] == "busy")
        t["metadata"]["query"] = t["metadata"]["query"].replace('namespace="switchyard",', "")

    def throughput_only(docs):
        so = scaled(docs)
        so["spec"]["triggers"] = [t for t in so["spec"]["triggers"] if t["name"] != "busy"]

    def value_metric(docs):
        scaled(docs)["spec"]["triggers"][0]["metricType"] = "Value"

    def no_busy_metric(docs):
        hpa = find(docs, "HorizontalPodAutoscaler", first_expert(docs)["metadata"]["name"])
        hpa["spec"]["metrics"] = [m for m in hpa["spec"]["metrics"]
                                  if m["pods"]["metric"]["name"] != "switchyard_expert_busy_ratio"]

    return out, [
        (no_fallback, "no fallback"),
        (query_any_namespace, 'has no namespace="switchyard" matcher'),
        (throughput_only, "no saturation trigger"),
        (value_metric, "metricType must be AverageValue"),
    ], [
        (no_busy_metric, "want a Pods metric switchyard_expert_busy_ratio"),
    ]


def packed_mutations():
    """Several experts per pod: every expert served once and mapped to its pod."""

    def gateway_to_wrong_pod(docs):
        c = container(docs, "switchyard-gateway")
        c["args"] = [a.replace("3=dns:///switchyard-expert-2-3.", "3=dns:///switchyard-expert-4-5.") for a in c["args"]]

    def expert_served_twice(docs):
        d = find(docs, "Deployment", "switchyard-expert-2-3")
        d["metadata"]["name"] = "switchyard-expert-2-1"
        d["spec"]["template"]["metadata"]["labels"]["switchyard/expert"] = "2-1"
        c = d["spec"]["template"]["spec"]["containers"][0]
        c["args"] = ["--experts=2,1" if a == "--experts=2,3" else a for a in c["args"]]

    def gateway_maps_twice(docs):
        c = container(docs, "switchyard-gateway")
        c["args"] = [a + ";0=dns:///switchyard-expert-0-1.switchyard.svc.cluster.local:50061"
                     if a.startswith("--experts=") else a for a in c["args"]]

    def three_per_pod(docs):
        c = container(docs, "switchyard-expert-0-1")
        c["args"] = ["--experts=0,1,2" if a == "--experts=0,1" else a for a in c["args"]]

    return [
        (gateway_to_wrong_pod, "gateway --experts maps expert 3 to dns:///switchyard-expert-4-5"),
        (expert_served_twice, "expert 1 is served by 2 Deployments"),
        (gateway_maps_twice, "gateway --experts maps expert 0 twice"),
        (three_per_pod, "serves 3 experts, want at most 2 per pod"),
    ]


def mutations():
    def typo_field(docs):  # validate() accepts unknown fields; the .d.ts check must not
        c = container(docs, "switchyard-expert-1")
        c["readinesProbe"] = c.pop("readinessProbe")

    def wrong_type(docs):
        container(docs, "switchyard-gateway")["ports"][0]["containerPort"] = "50051"

    def unknown_nested_field(docs):
        find(docs, "ScaledObject" if any(d["kind"] == "ScaledObject" for d in docs)
             else "HorizontalPodAutoscaler", "switchyard-expert-2")["spec"]["scaleTargetRef"]["nam"] = "x"

    def unknown_kind(docs):
        docs.append({"apiVersion": "example.com/v1", "kind": "Widget",
                     "metadata": {"name": "w", "namespace": "switchyard"}})

    def no_headless_service(docs):
        find(docs, "Service", "switchyard-expert-3")["spec"].pop("clusterIP")

    def missing_pdb(docs):
        docs.remove(find(docs, "PodDisruptionBudget", "switchyard-expert-4"))

    def no_probe(docs):
        container(docs, "switchyard-expert-5").pop("livenessProbe")

    def writable_root(docs):
        container(docs, "switchyard-expert-6")["securityContext"]["readOnlyRootFilesystem"] = False

    def gateway_spec(docs):
        c = container(docs, "switchyard-gateway")
        c["args"] = [a.replace("switchyard-expert-5.", "switchyard-expert-6.") for a in c["args"]]

    def open_expert_port(docs):
        find(docs, "NetworkPolicy", "switchyard-expert")["spec"]["ingress"][0]["from"] = [
            {"namespaceSelector": {}}]

    def two_autoscalers(docs):
        kind = "ScaledObject" if any(d["kind"] == "ScaledObject" for d in docs) else "HorizontalPodAutoscaler"
        extra = copy.deepcopy(find(docs, kind, "switchyard-expert-0"))
        extra["metadata"]["name"] = "switchyard-expert-0-extra"
        docs.append(extra)

    def expert_index(docs):
        c = container(docs, "switchyard-expert-7")
        c["args"] = ["--experts=6" if a == "--experts=7" else a for a in c["args"]]

    def wrong_device(docs):  # a GPU pod on the CPU, or a CPU pod asking for CUDA
        c = container(docs, "switchyard-expert-2")
        if "--device=cuda" in c["args"]:
            c["args"] = [a for a in c["args"] if a != "--device=cuda"]
        else:
            c["args"] = c["args"] + ["--device=cuda"]

    def frames_blocked(docs):  # a frame port the policy keeps closed
        rule = find(docs, "NetworkPolicy", "switchyard-expert")["spec"]["ingress"][0]
        rule["ports"] = [p for p in rule["ports"] if p["port"] != 50062]

    def probe_transport(docs):  # a gRPC probe of a TLS server, or the reverse
        c = container(docs, "switchyard-gateway")
        if "exec" in c["readinessProbe"]:
            c["readinessProbe"] = {"grpc": {"port": 50051}, "periodSeconds": 5}
        else:
            c["readinessProbe"] = {"exec": {"command": ["/usr/local/bin/switchyard", "health", "--server",
                                                        "127.0.0.1:50051"]}, "periodSeconds": 5}

    def no_omp_threads(docs):
        c = container(docs, "switchyard-expert-3")
        c["env"] = [e for e in c["env"] if e["name"] != "OMP_NUM_THREADS"]

    def omp_threads_of_limit(docs):  # a limit the pod may not have, in millicores
        c = container(docs, "switchyard-gateway")
        for e in c["env"]:
            if e["name"] == "OMP_NUM_THREADS":
                e["valueFrom"]["resourceFieldRef"]["resource"] = "limits.cpu"

    return [
        (typo_field, "unknown field spec.template.spec.containers[0].readinesProbe"),
        (wrong_type, "containerPort must be integer"),
        (unknown_nested_field, "unknown field spec.scaleTargetRef.nam"),
        (unknown_kind, "no model for example.com/v1 Widget"),
        (no_headless_service, "0 headless Services select its pods"),
        (missing_pdb, "0 PodDisruptionBudgets select its pods"),
        (no_probe, "no livenessProbe"),
        (writable_root, "readOnlyRootFilesystem is not true"),
        (gateway_spec, "gateway --experts maps expert 5"),
        (open_expert_port, "lets more than gateway pods reach"),
        (two_autoscalers, "2 autoscalers"),
        (expert_index, "label switchyard/expert 7 != --experts 6"),
        (wrong_device, "--device does not match the GPU request"),
        (frames_blocked, "50062"),
        (probe_transport, "probe does not match the server's transport"),
        (no_omp_threads, "no OMP_NUM_THREADS"),
        (omp_threads_of_limit, "OMP_NUM_THREADS is not this container's requests.cpu"),
    ]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        original = [d for d in yaml.load_all(f, Loader=LOADER) if d]
    os.makedirs(sys.argv[2], exist_ok=True)
    packed = any(d["kind"] == "Deployment" and d["metadata"]["name"] == "switchyard-expert-0-1" for d in original)
    common, keda, hpa = common_mutations()
    chosen = packed_mutations() if packed else mutations()
    chosen += common + (keda if autoscaler_kind(original) == "ScaledObject" else hpa)
    if any(d["kind"] == "PrometheusRule" for d in original):
        chosen += monitoring_mutations()
    for i, (mutate, expect) in enumerate(chosen):
        docs = copy.deepcopy(original)
        mutate(docs)
        base = os.path.join(sys.argv[2], "%02d-%s" % (i, mutate.__name__))
        with open(base + ".yaml", "w", encoding="utf-8") as f:
            yaml.dump_all(docs, f, Dumper=DUMPER, sort_keys=False)
        with open(base + ".expect", "w", encoding="utf-8") as f:
            f.write(expect + "\n")


if __name__ == "__main__":
    main()
