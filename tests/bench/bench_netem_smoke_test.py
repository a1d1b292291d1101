#!/usr/bin/env python3
"""scripts/bench-netem.sh at its smallest size on tiny-mixtral: one emulated
round trip (1 ms), one stream. It completes, prints the table with the
direct, proxy-without-delay and 1 ms rows, no request failed, and the 1 ms
row's ITL p50 is at least layers x 1 ms (each decode step crosses the proxy
once per layer: a lower bound, so the delay is really in the path), and every
expert call went on the experts' frame sockets (through their own proxies). Then once
more with EMULATED_COMPUTE_US (switchyard-emulated-expert in place of the
experts, sleeping 2 ms per call): the table says so, no request failed, and
the ITL p50 is at least layers x 2 ms (the sleep is in the path). Skips
(exit 77) where the script cannot make network namespaces.

usage: bench_netem_smoke_test.py BUILD_DIR SOURCE_DIR
"""
import json
import os
import subprocess
import sys

build, source = sys.argv[1], sys.argv[2]
model = os.path.join(source, "tests/data/tiny-mixtral")
layers = json.load(open(os.path.join(model, "config.json")))["num_hidden_layers"]


def bench_namespaces():
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [l.split()[0] for l in listing.splitlines() if l.startswith("sybn")]


before = set(bench_namespaces()) if os.geteuid() == 0 else set()
env = dict(os.environ, BIN_DIR=os.path.join(build, "bin"), RTTS_MS="1", STREAMS="1",
           REQUESTS_PER_STREAM="2", PROMPT_TOKENS="8", OUTPUT_TOKENS="8")
run = subprocess.run(["bash", os.path.join(source, "scripts/bench-netem.sh"), model],
                     capture_output=True, text=True, env=env, timeout=240)
print(run.stdout)
print(run.stderr, file=sys.stderr)
if run.returncode == 77:
    print("SKIPPED: bench-netem.sh could not make network namespaces here")
    sys.exit(77)
failures = []
if run.returncode != 0:
    failures.append(f"bench-netem.sh exited {run.returncode}")
header = ("| network | RTT ms | streams | overlap | output tok/s | ITL p50 ms | errors "
          "| overlap / no overlap |")
if header not in run.stdout:
    failures.append("no table header")
# Every expert call went on the frame sockets, through their own proxies.
if "expert transport: frames\n" not in run.stdout:
    failures.append("expert calls did not all go on frames (see 'frame socket unusable' above)")


def table_rows(stdout):
    """The table's rows as cells, keyed by (network, overlap)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] not in ("network", "---"):
            rows[(cells[0], cells[3])] = cells
    return rows


rows = table_rows(run.stdout)
for name in ("direct (veth, no proxy)", "proxy, no delay", "proxy, RTT 1 ms"):
    row = rows.get((name, "off"))
    if row is None:
        failures.append(f"no row '{name}' with overlap off")
        continue
    if row[2] != "1":
        failures.append(f"{name}: streams {row[2]}, expected 1")
    if not float(row[4]) > 0:
        failures.append(f"{name}: output tok/s {row[4]}")
    if row[6] != "0":
        failures.append(f"{name}: {row[6]} errors")
# Overlap rows appear exactly when the gateway has --micro-batches.
gateway_help = subprocess.run([os.path.join(build, "bin/switchyard-gateway"), "--help"],
                              capture_output=True, text=True).stdout
has_overlap = "--micro-batches" in gateway_help
for name in ("direct (veth, no proxy)", "proxy, no delay", "proxy, RTT 1 ms"):
    if ((name, "on") in rows) != has_overlap:
        failures.append(f"{name}: overlap-on row {'missing' if has_overlap else 'unexpected'}")
    if has_overlap and (name, "on") in rows and rows[(name, "on")][7] == "-":
        failures.append(f"{name}: no overlap / no overlap ratio")
slow = rows.get(("proxy, RTT 1 ms", "off"))
if slow is not None:
    itl = float(slow[5])
    print(f"ITL p50 at 1 ms RTT: {itl} ms; lower bound {layers} layers x 1 ms")
    if itl < layers * 1.0:
        failures.append(f"ITL p50 {itl} ms at 1 ms RTT is under {layers} layers x 1 ms: "
                        "the delay is not in the path")
# Experts emulated by a 2 ms sleep per call (no compute): the sleep is in every layer.
env.update(EMULATED_COMPUTE_US="2000", RTTS_MS="0.2", NO_DIRECT="1")
emulated = subprocess.run(["bash", os.path.join(source, "scripts/bench-netem.sh"), model],
                          capture_output=True, text=True, env=env, timeout=240)
print(emulated.stdout)
print(emulated.stderr, file=sys.stderr)
if emulated.returncode != 0:
    failures.append(f"bench-netem.sh with EMULATED_COMPUTE_US exited {emulated.returncode}")
if "(emulated: a 2000 us sleep per call, no compute)" not in emulated.stdout:
    failures.append("the emulated run's table does not say that the experts are emulated")
if "expert transport: frames\n" not in emulated.stdout:
    failures.append("emulated run: expert calls did not all go on frames")
emulated_row = table_rows(emulated.stdout).get(("proxy, RTT 0.2 ms", "off"))
if emulated_row is None:
    failures.append("emulated run: no 'proxy, RTT 0.2 ms' row with overlap off")
else:
    itl = float(emulated_row[5])
    print(f"emulated experts: ITL p50 {itl} ms; lower bound {layers} layers x 2 ms")
    if emulated_row[6] != "0":
        failures.append(f"emulated run: {emulated_row[6]} errors")
    if itl < layers * 2.0:
        failures.append(f"emulated run: ITL p50 {itl} ms is under {layers} layers x 2 ms: "
                        "the experts' sleep is not in the path")
# Nothing left behind: the script removes its namespaces.
left = set(bench_namespaces()) - before
if left:
    failures.append(f"namespaces left behind: {sorted(left)}")
if failures:
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print("PASSED")
