#!/usr/bin/env bash
# Checks deploy/prometheus and deploy/grafana with Prometheus' own tools.
#
# usage: tests/ops/check_prometheus.sh [SOURCE_DIR]
#
#   promtool check config deploy/prometheus/prometheus.yml   (and its rule file)
#   promtool check rules  deploy/prometheus/rules.yml
#   promtool test rules   tests/ops/prometheus_rules_test.yml (recording rules'
#                         values and alerts on synthetic series)
#   every PromQL expression of the dashboard, KEDA queries and
#   prometheus-adapter rules parses (promtool check rules on a file
#   check_metric_names.py --promql-out writes)
#   deploy/prometheus/targets-from-endpoints.py: unit tests, and Prometheus
#   discovers what it writes (promtool check service-discovery)
#   deploy/grafana dashboards: structure (check_dashboard.py)
#
# Needs promtool (Debian: prometheus), python3 with PyYAML.
set -euo pipefail
src=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
ops=$src/tests/ops
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
command -v promtool >/dev/null 2>&1 || { echo "FAIL: promtool not found (Debian package: prometheus; scripts/install-deps.sh installs it)"; exit 1; }
passed=0
failed=0
step() {  # name command...
  local name=$1; shift
  if "$@" >"$work/out" 2>&1; then
    passed=$((passed + 1)); echo "ok   $name"
  else
    failed=$((failed + 1)); echo "FAIL $name:"; sed 's/^/    /' "$work/out"
  fi
}
echo "promtool: $(promtool --version 2>&1 | head -1)"
step "promtool check config deploy/prometheus/prometheus.yml" promtool check config "$src/deploy/prometheus/prometheus.yml"
step "promtool check rules deploy/prometheus/rules.yml" promtool check rules "$src/deploy/prometheus/rules.yml"
step "promtool test rules tests/ops/prometheus_rules_test.yml" promtool test rules "$ops/prometheus_rules_test.yml"
step "PromQL of dashboards, KEDA and prometheus-adapter rules parses" \
  bash -c 'python3 "$1/check_metric_names.py" --root "$2" --promql-out "$3/promql.yml" >/dev/null &&
           promtool check rules "$3/promql.yml"' _ "$ops" "$src" "$work"
step "targets-from-endpoints.py tests" python3 "$ops/test_targets_from_endpoints.py" "$src"
step "Grafana dashboards (and their self-test)" python3 "$ops/check_dashboard.py" "$src" --self-test
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
