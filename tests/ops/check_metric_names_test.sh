#!/usr/bin/env bash
# Every metric name the operations files use (KEDA queries, prometheus-adapter
# rules, recording/alerting rules, Grafana dashboard) is documented in
# docs/metrics.md, with the labels it is queried by; then a self-test: copies
# of the tree with a wrong name or label must fail.
#
# usage: tests/ops/check_metric_names_test.sh [SOURCE_DIR] [METRICS_FILE...]
#   METRICS_FILE: /metrics output of running servers (gateway, expert) to
#   check the names against as well.
set -euo pipefail
src=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
shift || true
ops=$src/tests/ops
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
extra=()
for f in "$@"; do extra+=(--metrics "$f"); done
status=0
python3 "$ops/check_metric_names.py" --root "$src" --docs docs/metrics.md "${extra[@]}" || status=1

# Self-test: each mutation must make the check fail, naming the culprit.
mutate() {  # file sed-expression expected-message
  rm -rf "$work/tree"; mkdir -p "$work/tree"
  cp -r "$src/deploy" "$src/k8s" "$src/docs" "$work/tree/"
  sed -i "$2" "$work/tree/$1"
  cmp -s "$src/$1" "$work/tree/$1" && { echo "FAIL self-test: '$2' changed nothing in $1"; status=1; return; }
  if python3 "$ops/check_metric_names.py" --root "$work/tree" --docs docs/metrics.md >"$work/out" 2>&1; then
    echo "FAIL self-test: accepted $1 after '$2'"; status=1
  elif ! grep -qF -- "$3" "$work/out"; then
    cat "$work/out"; echo "FAIL self-test: no '$3' for $1 after '$2'"; status=1
  fi
}
mutate deploy/grafana/switchyard-dashboard.json 's/switchyard_gateway_waiting_requests/switchyard_gateway_queued_requests/' \
  "switchyard_gateway_queued_requests is not documented"
mutate deploy/grafana/switchyard-dashboard.json 's/outcome!=\\"ok\\"/status!=\\"ok\\"/' \
  "switchyard_gateway_requests_total has no label status"
mutate deploy/prometheus/rules.yml 's/sum by (namespace, expert) (rate(switchyard_expert_tokens_total/sum by (namespace, experts_typo) (rate(switchyard_expert_tokens_total/' \
  "groups by experts_typo"
mutate deploy/prometheus/rules.yml 's/record: switchyard:gateway_kv_cache_utilisation:ratio/record: switchyard:kv:ratio/' \
  "recording rule switchyard:gateway_kv_cache_utilisation:ratio is not defined"
mutate k8s/autoscaling/keda/scaledobjects.yaml '0,/switchyard_expert_tokens_total/s//switchyard_expert_token_total/' \
  "switchyard_expert_token_total is not documented"
mutate k8s/autoscaling/hpa/prometheus-adapter-config.yaml 's/as: "switchyard_expert_tokens_per_second"/as: "switchyard_expert_tps"/' \
  "scales on switchyard_expert_tokens_per_second, which no prometheus-adapter rule names"
mutate docs/metrics.md '/`switchyard_expert_busy_seconds_total`/d' \
  "switchyard_expert_busy_seconds_total is not documented"
[ $status -eq 0 ] && echo "ok   self-test: 7 broken copies rejected"
exit $status
