#!/usr/bin/env bash
# A real Prometheus (Debian's) on loopback scrapes the local cluster
# (`switchyard up`, targets from its endpoints file); after some traffic, a
# PromQL query for the per-expert token rate returns one series per expert;
# every metric name that a scaling rule, adapter rule, recording rule or the
# dashboard uses exists in the real /metrics output of the running cluster;
# every dashboard query (namespace / instance = All) evaluates, and the
# layer x expert routing heatmap's shares sum to 1 in every layer.
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
# Rules are evaluated every second on their own clock, so the first
# evaluation that sees all 8 experts may come a little after the raw query.
rule=0
for _ in $(seq 1 30); do
  rule=$(count 'switchyard:expert_tokens:rate1m')
  [ "$rule" = 8 ] && break
  sleep 1
done
echo "recording rule switchyard:expert_tokens:rate1m -> $rule series"
if [ "$rule" = 8 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: recording rule"; fi

# The dashboard's queries against the live Prometheus, variables at "All".
if python3 - "$source/deploy/grafana/switchyard-dashboard.json" "http://127.0.0.1:$prom_port" <<'PY'
import json, re, sys, urllib.parse, urllib.request
dashboard, prom = sys.argv[1], sys.argv[2]

def query(expr):
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]["result"]

def fill(expr):
    expr = expr.replace("$__rate_interval", "30s").replace("$__interval", "30s")
    return re.sub(r"\$(namespace|instance)\b", ".*", expr)

d = json.load(open(dashboard))
panels = [p for top in d["panels"] for p in [top] + top.get("panels", [])]
bad = 0
for p in panels:
    for t in p.get("targets") or []:
        try:
            query(fill(t["expr"]))
        except Exception as e:  # a 400 from Prometheus: the query does not evaluate
            print("FAIL: panel %r %s: %s" % (p["title"], t["refId"], e)); bad += 1
heat = [p for p in panels if p["type"] == "heatmap" and "layer" in p["title"].lower()]
shares = query("sum by (layer) (%s)" % fill(heat[0]["targets"][0]["expr"])) if heat else []
off = [(s["metric"].get("layer"), float(s["value"][1])) for s in shares if abs(float(s["value"][1]) - 1) > 1e-6]
print("dashboard: %d queries evaluated; routing heatmap: %d layers, max |sum of shares - 1| = %g" % (
    sum(len(p.get("targets") or []) for p in panels), len(shares),
    max([abs(float(s["value"][1]) - 1) for s in shares] or [float("nan")])))
if not shares or off:
    print("FAIL: routing shares per layer should sum to 1: %s" % (off or "no series")); bad += 1
sys.exit(1 if bad else 0)
PY
then
  passed=$((passed + 1))
else
  failed=$((failed + 1)); echo "FAIL: dashboard queries against the live Prometheus"
fi

if python3 "$source/tests/ops/check_metric_names.py" --root "$source" --endpoints "$work/endpoints.json"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1)); echo "FAIL: a metric used by the operations files is missing from live /metrics"
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
