#!/usr/bin/env bash
# A real Prometheus (Debian's) on loopback scrapes the local cluster
# (`switchyard up`, targets from its endpoints file); after some traffic, a
# PromQL query for the per-expert token rate returns one series per expert;
# every metric name that a scaling rule, adapter rule, recording rule or the
# dashboard uses exists in the real /metrics output of the running cluster.
#
# usage: prometheus_scrape_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$(cd "$1" && pwd); source=$(cd "$2" && pwd)
bin=$build/bin
work=$(mktemp -d /tmp/switchyard-prom-test.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

port=$(free_port)
"$bin/switchyard" up --model "$source/tests/data/tiny-mixtral" --port "$port" --listen-host 127.0.0.1 \
  --endpoints-file "$work/endpoints.json" >"$work/up.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do [ -s "$work/endpoints.json" ] && break; sleep 0.1; done
[ -s "$work/endpoints.json" ] || { cat "$work/up.log"; echo "FAIL: cluster not ready"; exit 1; }

mkdir -p "$work/targets"
python3 "$source/deploy/prometheus/targets-from-endpoints.py" "$work/endpoints.json" \
  --out "$work/targets/switchyard.json"
cat >"$work/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $source/deploy/prometheus/rules.yml
scrape_configs:
  - job_name: switchyard
    file_sd_configs:
      - files: [$work/targets/switchyard.json]
        refresh_interval: 1s
YML
prom_port=$(free_port)
prometheus --config.file "$work/prometheus.yml" --storage.tsdb.path "$work/tsdb" \
  --web.listen-address "127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
pids+=($!)

count() {  # count QUERY: number of result series
  curl -sG "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]["result"]))' 2>/dev/null || echo 0
}
# Wait until Prometheus scrapes all 9 processes (8 experts + gateway).
for _ in $(seq 1 60); do [ "$(count 'up == 1')" = 9 ] && break; sleep 1; done
echo "Prometheus scrapes $(count 'up == 1') targets"

# Traffic while Prometheus scrapes, until the checks below are done.
(while true; do
  "$bin/switchyard" bench --server "127.0.0.1:$port" --concurrency 4 --requests 8 \
    --prompt-tokens 16 --output-tokens 16 --json >/dev/null 2>&1 || true
done) &
pids+=($!)

query='sum by (expert) (rate(switchyard_expert_tokens_total[30s]))'
series=0
for _ in $(seq 1 90); do
  series=$(curl -sG "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$query" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(len([s for s in r if float(s["value"][1]) > 0]))' 2>/dev/null || echo 0)
  [ "$series" = 8 ] && break
  sleep 1
done
echo "PromQL: $query -> $series series with a positive rate"
passed=0; failed=0
if [ "$series" = 8 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: expected 8 series"; tail -5 "$work/prometheus.log"; fi

# The recording rule the dashboard and autoscalers read is live too.
rule=$(curl -sG "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode 'query=switchyard:expert_tokens:rate1m' |
  python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]["result"]))' 2>/dev/null || echo 0)
echo "recording rule switchyard:expert_tokens:rate1m -> $rule series"
if [ "$rule" = 8 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: recording rule"; fi

if python3 "$source/tests/ops/check_metric_names.py" --root "$source" --endpoints "$work/endpoints.json"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1)); echo "FAIL: a metric used by the operations files is missing from live /metrics"
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
