#!/usr/bin/env python3
"""`switchyard bench --shared-prefix-tokens` exercises the gateway's prefix
cache: against a real gateway (tiny-mixtral, in-process experts), request 0
(run alone first) reports no prefix hits and the later requests do, at least
one whole cached 16-token block each, read from the gateway's own /metrics
by bench and cross-checked by this test's own scrape; every prompt is the
prefix plus its own tokens; --max-new-tokens above --output-tokens cancels
each stream after --output-tokens tokens and still counts it as a success;
bad flags exit 1 naming the flag.

usage: bench_prefix_test.py BUILD_DIR SOURCE_DIR
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


def counter(metrics, name):
    text = scrape(metrics)
    return sum(float(v) for v in re.findall(r'^%s(?:\{[^}]*\})? (\S+)$' % name, text, re.M))


HITS = "switchyard_gateway_kv_cache_prefix_hit_tokens_total"
PROMPTS = "switchyard_gateway_prompt_tokens_total"

gateway, server, metrics = start_gateway(build, model)
try:

    hits_before, prompts_before = counter(metrics, HITS), counter(metrics, PROMPTS)
    r = subprocess.run([switchyard, "bench", "--server", server, "--metrics", metrics, "--json",
                        "--shared-prefix-tokens", "64", "--prompt-tokens", "8",
                        "--output-tokens", "2", "--requests", "6", "--concurrency", "3"],
                       capture_output=True, text=True, timeout=120)
    hits_after, prompts_after = counter(metrics, HITS), counter(metrics, PROMPTS)
    check("shared-prefix run exits 0", r.returncode == 0, r.stderr)
    out = json.loads(r.stdout) if r.returncode == 0 else {}
    shared = out.get("shared_prefix", {})
    hits = shared.get("prefix_hit_tokens", {})
    print("report:", json.dumps(shared))
    check("all 6 requests succeed", out.get("succeeded") == 6 and out.get("errors") == 0, out)
    check("prompts are prefix + own tokens (6 x 72)", prompts_after - prompts_before == 6 * 72,
          prompts_after - prompts_before)
    check("first request hits nothing", hits.get("first") == 0, hits)
    # 64 shared tokens = 4 whole 16-token blocks; the 5 later requests reuse
    # at least 4 blocks each (the last prompt token is always prefilled).
    check("later requests hit the prefix", hits.get("later", 0) >= 5 * 48, hits)
    check("later hits at most the shared tokens", hits.get("later", 1e9) <= 5 * 64, hits)
    check("bench's hits match the gateway's counter",
          hits.get("first", -1) + hits.get("later", -1) == hits_after - hits_before,
          (hits, hits_after - hits_before))
    check("TTFTs reported", shared.get("first_ttft_ms", 0) > 0 and
          shared.get("later_ttft_ms", {}).get("p50", 0) > 0, shared)
    check("peak running sequences sampled", 0 <= out.get("peak_running_sequences", -1) <= 3, out)

    # Declared max_new_tokens 40, cancelled after 3 tokens.
    r = subprocess.run([switchyard, "bench", "--server", server, "--json", "--prompt-tokens", "8",
                        "--output-tokens", "3", "--max-new-tokens", "40", "--requests", "4",
                        "--concurrency", "2"], capture_output=True, text=True, timeout=120)
    out = json.loads(r.stdout) if r.returncode == 0 else {}
    check("early-stop run exits 0", r.returncode == 0, r.stderr)
    check("early-stop requests count 3 tokens each",
          out.get("succeeded") == 4 and out.get("output_tokens") == 12 and
          out.get("short_requests") == 0 and out.get("max_new_tokens_declared") == 40, out)

    refused(switchyard, server, ["--shared-prefix-tokens", "-1"], "--shared-prefix-tokens")
    refused(switchyard, server, ["--output-tokens", "8", "--max-new-tokens", "4"],
            "--max-new-tokens")
    refused(switchyard, server, ["--shared-prefix-tokens", "100000000"], "--shared-prefix-tokens")
finally:
    gateway.terminate()
    gateway.wait(timeout=30)

finish()
