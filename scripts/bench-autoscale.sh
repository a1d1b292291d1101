#!/usr/bin/env bash
# Does a second replica cut the hot expert's queue time? `switchyard up
# --autoscale` run twice per round, alternately, on the same skewed load:
# `--max-replicas 1` (the autoscaler wants more but may not start it) and
# `--max-replicas 2` (it starts the hot expert's second replica). Every
# expert runs `--expert-workers 1` with OMP_NUM_THREADS=1 (up's default), so
# one replica computes on one core: under skew the hot expert's single
# replica is one saturated core, and the second replica adds a core.
# `--micro-batches 2` makes the gateway send a layer's calls to the hot
# expert as two concurrent calls (auto picks 1 on one host), so they queue
# behind one another on one worker, and a second replica can take one.
#
# Per variant: start up; warm up with skewed bench runs until WARMUP_S
# passed and the gateway routes the hot expert to every replica the variant
# allows, plus one more run (the new replica serves); then the measured run
# (same seed, so the same prompts in every variant). The hot expert's p99
# queue time is bench's: the gateway's
# switchyard_gateway_expert_queue_seconds{expert=HOT} histogram, bucket
# deltas over the measured run only, interpolated in the buckets (factors of
# 2 apart). Prints per run: hot expert queue p50/p99, compute p50, output
# tokens/s, failed requests, the hot expert's routed share, and the replica
# timeline (autoscaler busy ratio / desired / current, replicas in the
# gateway); and the ratio of the p99 means.
#
# A variant that never reaches its replica count within REACH_S is flagged
# and no ratio is printed (exit 1): e.g. when the hot expert's busy ratio
# stays below TARGET_BUSY, so the autoscaler never starts the replica.
#
# usage: [ROUNDS=2] [HOT=3] [REQUESTS=64] [WARMUP_S=20] [REACH_S=120]
#        [MICRO_BATCHES=2] [TARGET_BUSY=0.7] [PERIOD_MS=2000]
#        scripts/bench-autoscale.sh [MODEL_DIR] [bench flags...]
#   MODEL_DIR defaults to a `make-model --preset bench` checkpoint in $TMPDIR
#   (an expert's prefill call computes for tens of milliseconds on one core;
#   tiny-mixtral's for microseconds, too little to queue). bench flags
#   default to prefill-heavy requests (--concurrency 8 --prompt-tokens 128
#   --output-tokens 2: prefill rows are expert compute, decode steps are
#   mostly the gateway's attention and LM head) from the 2 of 128 probed
#   tokens routed most to HOT (--skew-candidates 128 --skew-pool 2: on the
#   bench model's random router about 0.25 of the routed tokens, against
#   0.21 with bench's default pool of 8). Warm-up runs send REQUESTS/2.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_setup "$@"
[ ${#bench_flags[@]} -gt 0 ] || bench_flags=(--concurrency 8 --prompt-tokens 128 --output-tokens 2
  --skew-candidates 128 --skew-pool 2)
rounds=${ROUNDS:-2}
hot=${HOT:-3}
requests=${REQUESTS:-64}
warmup_s=${WARMUP_S:-20}
reach_s=${REACH_S:-120}
micro_batches=${MICRO_BATCHES:-2}
target=${TARGET_BUSY:-0.7}
period_ms=${PERIOD_MS:-2000}
out=$(mktemp -d -t bench-autoscale.XXXXXX)
echo "bench-autoscale: results in $out" >&2

# The sampler: every 0.5 s, up's autoscaler gauges for the hot expert and
# the gateway's replica count of every expert; one line per change in the
# counts, and every 10 s (t, hot busy, hot desired, hot current, replicas of
# expert 0..N-1 in the gateway).
cat >"$out/sampler.py" <<'PY'
import re, sys, time, urllib.request
up_metrics, gateway_metrics, hot, path = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
t0, last, last_t = time.time(), None, 0.0
def gauges(text, name):
    return {int(e): float(v) for e, v in
            re.findall(r'^%s\{expert="(\d+)"\} (\S+)$' % name, text, re.M)}
def scrape(addr):
    return urllib.request.urlopen("http://%s/metrics" % addr, timeout=5).read().decode()
with open(path, "w") as f:
    while True:
        try:
            up, gw = scrape(up_metrics), scrape(gateway_metrics)
            busy = gauges(up, "switchyard_autoscaler_busy_ratio").get(int(hot), -1)
            desired = gauges(up, "switchyard_autoscaler_desired_replicas").get(int(hot), -1)
            current = gauges(up, "switchyard_autoscaler_current_replicas").get(int(hot), -1)
            replicas = gauges(gw, "switchyard_gateway_expert_replicas")
            row = (int(desired), int(current), tuple(int(replicas[e]) for e in sorted(replicas)))
            if row != last or time.time() - last_t >= 10:
                f.write("%6.1f  busy %.3f  desired %d  current %d  gateway %s\n" % (
                    time.time() - t0, busy, row[0], row[1], " ".join(map(str, row[2]))))
                f.flush()
                last, last_t = row, time.time()
        except OSError:
            pass
        time.sleep(0.5)
PY

# gateway_replicas ADDR: the gateway's replica count for the hot expert.
gateway_replicas() {
  curl -s "http://$1/metrics" |
    sed -n "s/^switchyard_gateway_expert_replicas{expert=\"$hot\"} \([0-9]*\).*/\1/p"
}

# run_variant MAX TAG: one up, warm-up, measured run; $out/TAG.{json,timeline,up.log}.
run_variant() {
  local max=$1 tag=$2 port endpoints up_pid sampler_pid server metrics up_metrics start
  port=$(free_port)
  endpoints="$out/$tag.endpoints.json"
  bench_up "$port" "$endpoints" "$out/$tag.up.log" \
    --expert-workers 1 --micro-batches "$micro_batches" --autoscale --max-replicas "$max" \
    --target-busy "$target" --autoscale-period-ms "$period_ms" --scale-down-delay-s 3600 \
    --metrics-port 0
  read -r metrics up_metrics < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print([p["metrics"] for p in d["processes"] if p["role"] == "gateway"][0], d["up"]["metrics"])
' "$endpoints")
  server=127.0.0.1:$port
  python3 "$out/sampler.py" "$up_metrics" "$metrics" "$hot" "$out/$tag.timeline" &
  sampler_pid=$!
  pids+=("$sampler_pid")
  local bench=("$bin/switchyard" bench --server "$server" --metrics "$metrics" --json
               --skew-experts "$hot" "${bench_flags[@]}")
  start=$(date +%s)
  local warm=0 reached=0
  while :; do
    "${bench[@]}" --requests $((requests / 2)) --seed $((100 + warm)) >"$out/$tag.warmup$warm.json"
    warm=$((warm + 1))
    if [ "$reached" = 1 ]; then break; fi
    if [ $(($(date +%s) - start)) -ge "$warmup_s" ] && [ "$(gateway_replicas "$metrics")" = "$max" ]
    then
      reached=1
    fi
    if [ $(($(date +%s) - start)) -ge "$reach_s" ]; then
      echo "bench-autoscale: $tag: the hot expert did not reach $max replicas in $reach_s s" >&2
      echo "not reached" >"$out/$tag.unreached"
      break
    fi
  done
  echo "$(($(date +%s) - start)) s warm-up ($warm runs)" >"$out/$tag.warmup"
  "${bench[@]}" --requests "$requests" --seed 1 >"$out/$tag.json"
  kill -TERM "$sampler_pid" "$up_pid"
  wait "$sampler_pid" "$up_pid" || true
}

for r in $(seq 1 "$rounds"); do
  for max in 1 2; do
    run_variant "$max" "r$r-max$max"
  done
done

python3 - "$out" "$hot" "$rounds" <<'PY'
import json, os, sys
out, hot, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("hot expert %s; per run: queue p50/p99 and compute p50 of its calls in the measured run (us),"
      " total (prompt + output) tokens/s, failed requests, its share of routed tokens" % hot)
p99 = {1: [], 2: []}
for r in range(1, rounds + 1):
    for m in (1, 2):
        tag = "r%d-max%d" % (r, m)
        j = json.load(open(os.path.join(out, tag + ".json")))
        h = j["expert_hops"][hot]
        p99[m].append(h["queue_us"]["p99"])
        print("%-9s calls %6.0f  queue p50 %8.1f p99 %8.1f  compute p50 %8.1f  %7.1f tok/s  "
              "failed %d  share %.3f  (%s)" % (
                  tag, h["calls"], h["queue_us"]["p50"], h["queue_us"]["p99"],
                  h["compute_us"]["p50"], j["total_tokens_per_s"], j["errors"],
                  j["skew"]["run_share"], open(os.path.join(out, tag + ".warmup")).read().strip()))
        if os.path.exists(os.path.join(out, tag + ".unreached")):
            print("  NOTE: the hot expert never had %d replicas in the gateway" % m)
        print("  replicas (s since the gateway was ready; hot expert's autoscaler busy ratio,"
              " desired, current; replicas of experts 0.. in the gateway):")
        for line in open(os.path.join(out, tag + ".timeline")):
            print("   ", line.strip())
mean = {m: sum(v) / len(v) for m, v in p99.items()}
if any(f.endswith(".unreached") for f in os.listdir(out)):
    print("a variant never reached its replica count (see NOTE): no ratio")
    sys.exit(1)
print("hot expert queue p99, mean of %d runs: 1 replica %.1f us, 2 replicas %.1f us: %.2fx lower"
      % (rounds, mean[1], mean[2], mean[1] / mean[2] if mean[2] > 0 else float("inf")))
PY
