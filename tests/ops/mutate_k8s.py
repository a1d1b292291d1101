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


def find(docs, kind, name=None):
    for d in docs:
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name):
            return d
    raise KeyError((kind, name))


def container(docs, name):
    return find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


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

    def probe_transport(docs):  # a gRPC probe of a TLS server, or the reverse
        c = container(docs, "switchyard-gateway")
        if "exec" in c["readinessProbe"]:
            c["readinessProbe"] = {"grpc": {"port": 50051}, "periodSeconds": 5}
        else:
            c["readinessProbe"] = {"exec": {"command": ["/usr/local/bin/switchyard", "health", "--server",
                                                        "127.0.0.1:50051"]}, "periodSeconds": 5}

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
        (probe_transport, "probe does not match the server's transport"),
    ]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        original = [d for d in yaml.safe_load_all(f) if d]
    os.makedirs(sys.argv[2], exist_ok=True)
    for i, (mutate, expect) in enumerate(mutations()):
        docs = copy.deepcopy(original)
        mutate(docs)
        base = os.path.join(sys.argv[2], "%02d-%s" % (i, mutate.__name__))
        with open(base + ".yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump_all(docs, f, sort_keys=False)
        with open(base + ".expect", "w", encoding="utf-8") as f:
            f.write(expect + "\n")


if __name__ == "__main__":
    main()
