#!/usr/bin/env python3
"""Tests of deploy/prometheus/targets-from-endpoints.py (run by check_prometheus.sh).

usage: test_targets_from_endpoints.py [SOURCE_DIR]
With promtool on PATH, also checks that Prometheus, given deploy/prometheus's
config, discovers the written targets with their role and experts labels.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

SRC = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(SRC, "deploy", "prometheus", "targets-from-endpoints.py")

spec = importlib.util.spec_from_file_location("targets_from_endpoints", SCRIPT)
tfe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tfe)

# What `switchyard up --endpoints-file` writes (cli/up_command.cc), with metrics addresses.
ENDPOINTS = {"processes": [
    {"role": "expert", "experts": [1], "grpc": "127.0.0.1:41235", "metrics": "127.0.0.1:41301", "pid": 124},
    {"role": "expert", "experts": [0], "grpc": "127.0.0.1:41234", "metrics": "127.0.0.1:41300", "pid": 123},
    {"role": "expert", "experts": [3, 2], "grpc": "127.0.0.1:41236", "metrics": "127.0.0.1:41302", "pid": 125},
    {"role": "gateway", "experts": [], "grpc": "0.0.0.0:50051", "metrics": "127.0.0.1:41310", "pid": 120},
]}


class Convert(unittest.TestCase):
    def test_targets_and_labels(self):
        self.assertEqual(tfe.targets(ENDPOINTS), [
            {"targets": ["127.0.0.1:41300"], "labels": {"role": "expert", "experts": "0"}},
            {"targets": ["127.0.0.1:41301"], "labels": {"role": "expert", "experts": "1"}},
            {"targets": ["127.0.0.1:41302"], "labels": {"role": "expert", "experts": "2,3"}},
            {"targets": ["127.0.0.1:41310"], "labels": {"role": "gateway"}},
        ])

    def test_processes_without_metrics_are_skipped(self):
        doc = {"processes": [dict(p, metrics=None) for p in ENDPOINTS["processes"]]}
        doc["processes"][0]["metrics"] = "127.0.0.1:41301"
        self.assertEqual(tfe.targets(doc), [{"targets": ["127.0.0.1:41301"], "labels": {"role": "expert", "experts": "1"}}])

    def test_bad_input(self):
        for doc in ({}, {"processes": {}}, {"processes": [{"experts": [0]}]},
                    {"processes": [{"role": "expert", "experts": ["x"], "metrics": "h:1"}]},
                    {"processes": [{"role": "expert", "experts": [0], "metrics": "no-port"}]}):
            with self.assertRaises(ValueError, msg=doc):
                tfe.targets(doc)

    def test_command_line(self):
        with tempfile.TemporaryDirectory() as d:
            endpoints, out = os.path.join(d, "endpoints.json"), os.path.join(d, "sd", "switchyard.json")
            with open(endpoints, "w") as f:
                json.dump(ENDPOINTS, f)
            r = subprocess.run([sys.executable, SCRIPT, endpoints, "--out", out], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(out) as f:
                self.assertEqual(json.load(f), tfe.targets(ENDPOINTS))
            self.assertEqual(os.listdir(os.path.dirname(out)), ["switchyard.json"])  # no temporary left
            r = subprocess.run([sys.executable, SCRIPT, endpoints], capture_output=True, text=True)
            self.assertEqual(json.loads(r.stdout), tfe.targets(ENDPOINTS))
            with open(endpoints, "w") as f:
                f.write("{not json")
            r = subprocess.run([sys.executable, SCRIPT, endpoints, "--out", out], capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)

    def test_watch(self):
        with tempfile.TemporaryDirectory() as d:
            endpoints, out = os.path.join(d, "endpoints.json"), os.path.join(d, "switchyard.json")
            proc = subprocess.Popen([sys.executable, SCRIPT, endpoints, "--out", out, "--watch"],
                                    stderr=subprocess.DEVNULL)
            try:
                def wait_for(expected):
                    deadline = time.time() + 20
                    while time.time() < deadline:
                        try:
                            with open(out) as f:
                                if json.load(f) == expected:
                                    return
                        except (OSError, ValueError):
                            pass
                        time.sleep(0.1)
                    self.fail("%s never became %s" % (out, expected))

                wait_for([])  # no cluster yet
                with open(endpoints + ".tmp", "w") as f:
                    json.dump(ENDPOINTS, f)
                os.replace(endpoints + ".tmp", endpoints)
                wait_for(tfe.targets(ENDPOINTS))
                os.remove(endpoints)  # the cluster stopped
                wait_for([])
            finally:
                proc.terminate()
                proc.wait(timeout=10)


@unittest.skipUnless(shutil.which("promtool"), "promtool not on PATH")
class Discovery(unittest.TestCase):
    def test_prometheus_discovers_the_targets(self):
        with tempfile.TemporaryDirectory() as d:
            for name in ("prometheus.yml", "rules.yml"):
                shutil.copy(os.path.join(SRC, "deploy", "prometheus", name), d)
            tfe.write_atomically(os.path.join(d, "targets", "switchyard.json"), tfe.render(tfe.targets(ENDPOINTS)))
            r = subprocess.run(["promtool", "check", "service-discovery", "--timeout=3s",
                                os.path.join(d, "prometheus.yml"), "switchyard"],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            found = {t["labels"]["instance"]: t["labels"] for t in json.loads(r.stdout)}
            self.assertEqual(set(found), {"127.0.0.1:41300", "127.0.0.1:41301", "127.0.0.1:41302", "127.0.0.1:41310"})
            self.assertEqual(found["127.0.0.1:41302"]["experts"], "2,3")
            self.assertEqual(found["127.0.0.1:41302"]["role"], "expert")
            self.assertEqual(found["127.0.0.1:41310"]["role"], "gateway")
            self.assertNotIn("experts", found["127.0.0.1:41310"])
            self.assertEqual({l["job"] for l in found.values()}, {"switchyard"})


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
