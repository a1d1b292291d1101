#!/usr/bin/env python3
"""`switchyard bench --skew-experts` concentrates routing on the chosen
experts: against a real gateway (tiny-mixtral, in-process experts), the hot
expert's share of the tokens the router sent during the run, read by this
test from the gateway's own /metrics, is at least 2x the even share (1/8),
and above what a random-prompt run gives the same expert; two hot experts
together get at least 2x their even share; bench's own report agrees with
the scrape; --request-rate paces the run; bad flags exit 1 naming the flag.

usage: bench_skew_test.py BUILD_DIR SOURCE_DIR
"""
import json
import os
import re
import subprocess
import sys

from bench_testlib import check, finish, refused, scrape, start_gateway

build, source = sys.argv[1], sys.argv[2]
switchyard = os.path.join(build, "bin", "switchyard")
model = os.path.join(source, "tests", "data", "tiny-mixtral")


def routed(metrics):
    """expert -> tokens routed (all layers), from the gateway's /metrics."""
    text = scrape(metrics)
    out = {}
    for m in re.finditer(r'^switchyard_gateway_routed_tokens_total\{([^}]*)\} (\S+)$', text, re.M):
        expert = int(re.search(r'expert="(\d+)"', m.group(1)).group(1))
        out[expert] = out.get(expert, 0.0) + float(m.group(2))
    return out


def bench(metrics, *args):
    return subprocess.run([switchyard, "bench", "--server", server, "--metrics", metrics, "--json",
                           "--prompt-tokens", "24", "--output-tokens", "2", *args],
                          capture_output=True, text=True, timeout=120)


def bench_json(*args):
    """bench's JSON report, or None when it failed."""
    r = bench(metrics, *args)
    return json.loads(r.stdout) if r.returncode == 0 else None


gateway, server, metrics = start_gateway(build, model)
try:
    experts = 8

    # A random-prompt run first: the baseline share of expert 3.
    uniform = bench_json("--requests", "16", "--concurrency", "4")
    check("uniform run succeeds", uniform is not None and uniform["errors"] == 0, uniform)
    uniform_share = uniform["routed_tokens"]["share"]["3"]

    # Skewed on expert 3, with our own scrape around bench (probes + run).
    before = routed(metrics)
    r = bench(metrics, "--skew-experts", "3", "--requests", "16", "--concurrency", "4")
    after = routed(metrics)
    check("skewed run exits 0", r.returncode == 0, r.stderr)
    out = json.loads(r.stdout)
    run_tokens = {int(e): n for e, n in out["routed_tokens"]["tokens"].items()}
    total = sum(run_tokens.values())
    share3 = run_tokens[3] / total
    print("skewed run: expert 3 share %.3f (even 0.125, random prompts %.3f), pool %s" %
          (share3, uniform_share, [p["token"] for p in out["skew"]["pool"]]))
    check("hot expert gets >= 2x the even share", share3 >= 2.0 / experts, share3)
    check("hot expert gets more than with random prompts", share3 > uniform_share,
          (share3, uniform_share))
    check("hot expert is the most loaded", max(run_tokens, key=run_tokens.get) == 3, run_tokens)
    # The run's window is inside ours (probes + run): ours minus the run's
    # equals the probe traffic, which is 1 token x layers x top-2 per probe.
    ours = {e: after[e] - before.get(e, 0) for e in after}
    probe_routed = sum(ours.values()) - total
    check("probes route 64 tokens x 2 layers x top-2", probe_routed == 64 * 2 * 2, probe_routed)
    check("bench's share matches its token counts", abs(out["skew"]["run_share"] - share3) < 1e-9,
          out["skew"])
    check("x mean is share x experts", abs(out["skew"]["run_share_over_mean"] - 8 * share3) < 1e-9,
          out["skew"])
    check("pool is the hottest probed tokens",
          len(out["skew"]["pool"]) == 8 and out["skew"]["candidates"] == 64 and
          out["skew"]["pool_probe_share"] > 0.25, out["skew"])

    # Two hot experts share the skew.
    two = bench_json("--skew-experts", "1,5", "--requests", "8", "--concurrency", "4",
                          "--seed", "7")
    check("two hot experts run", two is not None, "")
    if two is not None:
        s = two["routed_tokens"]["share"]
        check("experts 1 and 5 together get >= 2x their even share", s["1"] + s["5"] >= 4.0 / 8, s)

    # --request-rate paces the run: 6 requests at 20/s take at least 0.25 s.
    paced = bench(metrics, "--requests", "6", "--concurrency", "6", "--request-rate", "20")
    wall = json.loads(paced.stdout)["wall_s"] if paced.returncode == 0 else 0
    check("request-rate paces the starts", wall >= 0.25, (paced.stderr, wall))

    # Bad input: exit 1 with a message naming the flag.
    refused(switchyard, server, ["--skew-experts", "3"], "--skew needs --metrics")
    refused(switchyard, server, ["--skew-experts", "3,x", "--metrics", metrics], "--skew-experts")
    refused(switchyard, server, ["--skew-experts", "9", "--metrics", metrics], "expert 9")
    refused(switchyard, server,
            ["--skew", "--skew-pool", "9", "--skew-candidates", "4", "--metrics", metrics],
            "--skew-pool")
    refused(switchyard, server, ["--request-rate", "-1"], "--request-rate")
finally:
    gateway.terminate()
    gateway.wait(timeout=30)

finish()
