#!/usr/bin/env bash
# Derives the Kubernetes manifests' tokens/s threshold (KEDA trigger
# `tokens`, HPA metric switchyard_expert_tokens_per_second) from measured
# capacity on the device it runs on: the token rate at which one expert
# replica reaches the busy threshold.
#
# It starts `switchyard up` (one replica per expert; UP_FLAGS are added, e.g.
# "--device cuda" on a GPU node, "--experts-per-process 2" for gpu-packed),
# sends skewed load to expert HOT (`switchyard bench --skew-experts HOT`),
# and reads that expert process's own counters before and after the run:
#   tokens per busy second = d switchyard_expert_tokens_total /
#                            d switchyard_expert_busy_seconds_total
#   threshold              = BUSY_THRESHOLD x tokens per busy second
# BUSY_THRESHOLD (default 1.4) is the manifests' busy trigger: the busy
# ratio 0.7 of each of the expert's 2 --workers threads (k8s/generate-experts.py).
# The tokens per busy second is what the device sets; the load only has to
# keep the expert busy enough for the ratio to settle (the script prints the
# busy ratio it reached: well under 0.1 means the gateway, not the expert,
# was the bottleneck, and the ratio is noisier but still per busy second).
#
# usage: [HOT=3] [UP_FLAGS="--device cuda"] [BUSY_THRESHOLD=1.4]
#        scripts/measure-expert-capacity.sh [MODEL_DIR] [bench flags...]
#   MODEL_DIR defaults to a `make-model --preset bench` checkpoint in $TMPDIR;
#   on a GPU node, the served checkpoint. bench flags default to
#   --concurrency 16 --requests 64 --prompt-tokens 96 --output-tokens 2.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_setup "$@"
[ ${#bench_flags[@]} -gt 0 ] ||
  bench_flags=(--concurrency 16 --requests 64 --prompt-tokens 96 --output-tokens 2)
hot=${HOT:-3}
busy_threshold=${BUSY_THRESHOLD:-1.4}
read -r -a up_flags <<<"${UP_FLAGS:-}"
out=$(mktemp -d -t measure-expert-capacity.XXXXXX)

port=$(free_port)
bench_up "$port" "$out/endpoints.json" "$out/up.log" "${up_flags[@]}"
# The gateway's metrics address and the metrics address of HOT's process.
read -r gateway_metrics expert_metrics < <(python3 - "$out/endpoints.json" "$hot" <<'PY'
import json, sys
procs = json.load(open(sys.argv[1]))["processes"]
gateway = [p["metrics"] for p in procs if p["role"] == "gateway"][0]
expert = [p["metrics"] for p in procs if p["role"] == "expert" and int(sys.argv[2]) in p["experts"]]
print(gateway, expert[0])
PY
)
curl -sf "http://$expert_metrics/metrics" >"$out/before.txt"
start=$(date +%s.%N)
"$bin/switchyard" bench --server "127.0.0.1:$port" --metrics "$gateway_metrics" \
  --skew-experts "$hot" "${bench_flags[@]}" --json >"$out/bench.json"
end=$(date +%s.%N)
curl -sf "http://$expert_metrics/metrics" >"$out/after.txt"
python3 - "$out" "$hot" "$busy_threshold" "$start" "$end" <<'PY'
import json, os, re, sys
out, hot, busy_threshold = sys.argv[1], sys.argv[2], float(sys.argv[3])
seconds = float(sys.argv[5]) - float(sys.argv[4])
def total(name, f):
    text = open(os.path.join(out, f)).read()
    return sum(float(v) for v in re.findall(r"^%s(?:\{[^}]*\})? (\S+)$" % name, text, re.M))
tokens = total("switchyard_expert_tokens_total", "after.txt") - total(
    "switchyard_expert_tokens_total", "before.txt")
busy = total("switchyard_expert_busy_seconds_total", "after.txt") - total(
    "switchyard_expert_busy_seconds_total", "before.txt")
bench = json.load(open(os.path.join(out, "bench.json")))
if bench["errors"] or tokens <= 0 or busy <= 0:
    sys.exit("measure-expert-capacity: no usable run (errors %d, tokens %.0f, busy %.3f s)" %
             (bench["errors"], tokens, busy))
per_busy = tokens / busy
print("expert %s's process: %.0f tokens in %.1f s (%.1f tokens/s), busy %.3f s/s; "
      "routed share %.3f; %d failed requests" % (hot, tokens, seconds, tokens / seconds,
                                                busy / seconds, bench["skew"]["run_share"],
                                                bench["errors"]))
print("tokens per busy second: %.0f" % per_busy)
print("tokens threshold (busy threshold %.2f x tokens per busy second): %.0f" %
      (busy_threshold, busy_threshold * per_busy))
PY
