#!/usr/bin/env bash
# The split cluster over an emulated cross-host network (issue #10): each
# expert runs in its own network namespace (a "host" joined to the root
# namespace by a veth pair), the gateway in the root namespace reaches each
# one through a switchyard-delay-proxy that delays every byte by RTT/2 each
# way (this kernel has no `tc netem`), and `switchyard bench` measures the
# gateway at several stream counts. Each expert's frame socket (port 50062)
# gets a proxy of its own too, on the gRPC proxy's loopback address
# 127.0.0.(E+2), where the gateway looks for it. Rows:
#   direct     gateway -> expert namespaces, no proxy (the veth link alone)
#   proxy 0    through the proxies with no delay: the proxy's own cost
#   RTT R ms   through the proxies adding R ms per round trip
# each with micro-batch overlap off (--micro-batches 1) and on
# (--micro-batches $OVERLAP_MICRO_BATCHES, 2 by default: the gateway's own
# default, auto, would pick 1, since the proxies listen on 127.0.0.1) where
# switchyard-gateway has --micro-batches; without that flag
# only the gateway as it is runs, and the table says so.
#
# usage: scripts/bench-netem.sh [MODEL_DIR]
#   MODEL_DIR defaults to a `make-model --preset bench` checkpoint in $TMPDIR.
# environment (defaults in brackets):
#   RTTS_MS ["0.2 1"]        round trips to emulate, in ms
#   STREAMS ["1 8 16 32"]    bench --concurrency values
#   REQUESTS_PER_STREAM [2]  bench --requests = streams x this (at least 4)
#   PROMPT_TOKENS [16]  OUTPUT_TOKENS [16]
#   OVERLAP_MICRO_BATCHES [2]  micro-batches of the overlap-on gateway
#   REPEATS [1]              bench runs per row (alternating overlap off/on);
#                            the table shows their median
#   NO_DIRECT=1              leave out the direct and proxy-0 rows
#   EMULATED_COMPUTE_US=N    experts "on other hosts": switchyard-emulated-expert
#                            sleeps N us per call and returns zeros, using no
#                            CPU (tokens are meaningless; timing only)
#   BIN_DIR [build/bin]      absolute, or relative to the repository root
#   DEVICE=cuda              gateway and experts compute on GPU 0
# Needs root and `ip` (iproute2) for the namespaces; where they cannot be
# made it prints why and exits 77 (skipped). Namespaces, links and processes
# are removed on exit, whatever happened.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN_DIR:-build/bin}
. scripts/bench-lib.sh
rtts=${RTTS_MS:-0.2 1}
streams_list=${STREAMS:-1 8 16 32}
per_stream=${REQUESTS_PER_STREAM:-2}
prompt_tokens=${PROMPT_TOKENS:-16}
output_tokens=${OUTPUT_TOKENS:-16}
repeats=${REPEATS:-1}
overlap_micro_batches=${OVERLAP_MICRO_BATCHES:-2}

emulated_us=${EMULATED_COMPUTE_US:-}
expert_bin=switchyard-expert
[ -n "$emulated_us" ] && expert_bin=switchyard-emulated-expert
for b in switchyard switchyard-gateway "$expert_bin" switchyard-delay-proxy; do
  [ -x "$bin/$b" ] || { echo "bench-netem: $bin/$b is missing; build it first" >&2; exit 1; }
done

skip() { echo "bench-netem: skipped: $*"; exit 77; }
ip_cmd=$(command -v ip || true)
[ -n "$ip_cmd" ] || skip "no \`ip\` command (iproute2)"
[ "$(id -u)" = 0 ] || skip "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"

model=${1:-}
model=$(bench_model "$model")
experts=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["num_local_experts"])' \
  "$model/config.json")

out=$(mktemp -d)
tag="sybn$$"
namespaces=()
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for ns in "${namespaces[@]}"; do "$ip_cmd" netns del "$ns" 2>/dev/null || true; done
  rm -rf "$out"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Leftovers of a killed earlier run (their pid is gone).
for ns in $("$ip_cmd" netns list 2>/dev/null | awk '{print $1}' | grep '^sybn[0-9]*e[0-9]*$' || true); do
  owner=${ns#sybn}; owner=${owner%%e*}
  kill -0 "$owner" 2>/dev/null || "$ip_cmd" netns del "$ns" 2>/dev/null || true
done

# A free 10.212.X.0/24 for the /30 links (one per expert).
# (Outputs are read whole before grep: under pipefail, `cmd | grep -q` fails
# when grep's early exit leaves cmd writing into a closed pipe, SIGPIPE.)
octet=""
addresses=$("$ip_cmd" -4 addr show)
for x in $(seq 1 250); do
  grep -q "inet 10\.212\.$x\." <<<"$addresses" || { octet=$x; break; }
done
[ -n "$octet" ] || { echo "bench-netem: no free 10.212.X.0/24" >&2; exit 1; }
[ "$experts" -le 60 ] || { echo "bench-netem: at most 60 experts ($experts)" >&2; exit 1; }

"$ip_cmd" netns add "${tag}e0" 2>"$out/netns.err" || skip "\`ip netns add\` failed: $(cat "$out/netns.err")"
namespaces+=("${tag}e0")
expert_ips=()
for e in $(seq 0 $((experts - 1))); do
  ns="${tag}e$e"
  if [ "$e" -gt 0 ]; then "$ip_cmd" netns add "$ns"; namespaces+=("$ns"); fi
  root_ip="10.212.$octet.$((4 * e + 1))"
  ns_ip="10.212.$octet.$((4 * e + 2))"
  "$ip_cmd" link add "syr$$e$e" type veth peer name "syn$$e$e" netns "$ns" 2>"$out/veth.err" ||
    skip "cannot create a veth pair: $(cat "$out/veth.err")"
  "$ip_cmd" addr add "$root_ip/30" dev "syr$$e$e"
  "$ip_cmd" link set "syr$$e$e" up
  "$ip_cmd" -n "$ns" link set lo up
  "$ip_cmd" -n "$ns" addr add "$ns_ip/30" dev "syn$$e$e"
  "$ip_cmd" -n "$ns" link set "syn$$e$e" up
  expert_ips+=("$ns_ip")
done

# wait_line FILE PID: the address in FILE's "listening on ADDR" line, once there.
wait_line() {
  for _ in $(seq 1 2400); do
    local line
    line=$(grep -m1 'listening on ' "$1" 2>/dev/null || true)
    if [ -n "$line" ]; then
      line=${line#*listening on }
      echo "${line%% *}"
      return 0
    fi
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# One OpenMP thread per expert unless the caller chose, as `switchyard up`
# does; the gateway gets the caller's environment.
device_flags=()
[ -n "${DEVICE:-}" ] && device_flags+=(--device "$DEVICE")
expert_flags=()
if [ -n "$emulated_us" ]; then
  expert_flags+=(--compute-us "$emulated_us")
else
  expert_flags+=("${device_flags[@]}")
fi
for e in $(seq 0 $((experts - 1))); do
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$ip_cmd" netns exec "${tag}e$e" "$bin/$expert_bin" --model "$model" \
    --listen "${expert_ips[$e]}:50061" --frame-listen "${expert_ips[$e]}:50062" --experts "$e" \
    "${expert_flags[@]}" >"$out/expert$e.log" 2>&1 &
  pids+=($!)
done
for e in $(seq 0 $((experts - 1))); do
  wait_line "$out/expert$e.log" "${pids[$e]}" >/dev/null ||
    { cat "$out/expert$e.log" >&2; exit 1; }
done

# Micro-batch overlap: only where the gateway has the flag.
if grep -q -- '--micro-batches' <<<"$("$bin/switchyard-gateway" --help)"; then
  overlap_modes=(off on)
  overlap_note="overlap off: --micro-batches 1; on: --micro-batches $overlap_micro_batches"
else
  overlap_modes=(off)
  overlap_note="switchyard-gateway has no --micro-batches: only the gateway without overlap ran"
fi

# start_proxies DELAY_US: two proxies per expert, gRPC and frames, on the
# loopback address 127.0.0.(E+2) (the gateway dials a shard's frame port on
# the host of its gRPC target); sets `spec` to the gateway's --experts.
start_proxies() {
  spec=""
  proxy_pids=()
  for e in $(seq 0 $((experts - 1))); do
    local host=127.0.0.$((e + 2))
    "$bin/switchyard-delay-proxy" --listen "$host:0" --target "${expert_ips[$e]}:50061" \
      --delay-us "$1" >"$out/proxy$e.log" 2>&1 &
    local p=$!
    pids+=("$p")
    proxy_pids+=("$p")
    "$bin/switchyard-delay-proxy" --listen "$host:50062" --target "${expert_ips[$e]}:50062" \
      --delay-us "$1" >"$out/frame-proxy$e.log" 2>&1 &
    local fp=$!
    pids+=("$fp")
    proxy_pids+=("$fp")
    local address
    address=$(wait_line "$out/proxy$e.log" "$p") || { cat "$out/proxy$e.log" >&2; exit 1; }
    wait_line "$out/frame-proxy$e.log" "$fp" >/dev/null || { cat "$out/frame-proxy$e.log" >&2; exit 1; }
    spec+="${spec:+;}$e=$address"
  done
}
stop_proxies() {
  for p in "${proxy_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}

# run_network NAME RTT_MS: one gateway on `spec` per overlap mode, all up at
# once; at each stream count the modes' bench runs alternate, REPEATS times,
# so load drift on a shared machine hits both alike.
results="$out/results.jsonl"
run_network() {
  local ports=()
  local gateways=()
  for overlap in "${overlap_modes[@]}"; do
    local flags=()
    if [ "${#overlap_modes[@]}" -gt 1 ]; then
      if [ "$overlap" = off ]; then flags+=(--micro-batches 1); else flags+=(--micro-batches "$overlap_micro_batches"); fi
    fi
    local port
    port=$(free_port)
    "$bin/switchyard-gateway" --model "$model" --listen "127.0.0.1:$port" --experts "$spec" \
      "${device_flags[@]}" "${flags[@]}" >"$out/gateway-$overlap.log" 2>&1 &
    local gw=$!
    pids+=("$gw")
    gateways+=("$gw")
    ports+=("$port")
    wait_line "$out/gateway-$overlap.log" "$gw" >/dev/null ||
      { cat "$out/gateway-$overlap.log" >&2; exit 1; }
    # Connections to every expert up before measuring.
    "$bin/switchyard" bench --server "127.0.0.1:$port" --concurrency 1 --requests 1 \
      --prompt-tokens 4 --output-tokens 2 --json >/dev/null
  done
  for s in $streams_list; do
    local requests=$((s * per_stream))
    [ "$requests" -ge 4 ] || requests=4
    for repeat in $(seq 1 "$repeats"); do
      for i in "${!overlap_modes[@]}"; do
        "$bin/switchyard" bench --server "127.0.0.1:${ports[$i]}" --concurrency "$s" \
          --requests "$requests" --prompt-tokens "$prompt_tokens" \
          --output-tokens "$output_tokens" --json >"$out/bench.json"
        python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r.update(network=sys.argv[2], rtt=sys.argv[3], streams=int(sys.argv[4]), overlap=sys.argv[5]); print(json.dumps(r))' \
          "$out/bench.json" "$1" "$2" "$s" "${overlap_modes[$i]}" >>"$results"
        echo "bench-netem: $1 streams=$s overlap=${overlap_modes[$i]} run $repeat done" >&2
      done
    done
  done
  for gw in "${gateways[@]}"; do kill -TERM "$gw"; wait "$gw" || true; done
  # Frames, unless a gateway says it could not use an expert's frame socket.
  local unusable
  unusable=$(grep -h -m1 'frame socket unusable' "$out"/gateway-*.log || true)
  if [ -n "$unusable" ]; then
    echo "bench-netem: $1: some expert calls went on gRPC: $unusable" >&2
    transport="frames, but some calls on gRPC (see stderr)"
  fi
}
transport=frames

if [ -z "${NO_DIRECT:-}" ]; then
  spec=""
  for e in $(seq 0 $((experts - 1))); do spec+="${spec:+;}$e=${expert_ips[$e]}:50061"; done
  run_network "direct (veth, no proxy)" "-"
  start_proxies 0
  run_network "proxy, no delay" "0"
  stop_proxies
fi
for rtt in $rtts; do
  delay_us=$(python3 -c 'import sys; print(round(float(sys.argv[1]) * 1000 / 2))' "$rtt")
  start_proxies "$delay_us"
  run_network "proxy, RTT $rtt ms" "$rtt"
  stop_proxies
done

python3 - "$results" "$model" "$experts" "$overlap_note" "$prompt_tokens" "$output_tokens" \
  "$per_stream" "$repeats" "$emulated_us" "$transport" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
emulated = (f" (emulated: a {sys.argv[9]} us sleep per call, no compute)" if sys.argv[9] else "")
print(f"model {sys.argv[2]}: gateway + {sys.argv[3]} expert processes{emulated}, each in its own network "
      f"namespace; bench --prompt-tokens {sys.argv[5]} --output-tokens {sys.argv[6]} "
      f"--requests streams x {sys.argv[7]}; median of {sys.argv[8]} run(s) per row; {sys.argv[4]}; "
      f"expert transport: {sys.argv[10]}")
print("| network | RTT ms | streams | overlap | output tok/s | ITL p50 ms | errors | overlap / no overlap |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
rows = {}  # (network, streams, overlap) -> runs, in first-seen order
for r in runs:
    rows.setdefault((r["network"], r["streams"], r["overlap"]), []).append(r)
def tok_s(key):
    return statistics.median(r["output_tokens_per_s"] for r in rows[key])
errors = 0
for (network, streams, overlap) in sorted(rows, key=lambda k: (
        [r["network"] for r in runs].index(k[0]), k[1], k[2] != "off")):
    group = rows[(network, streams, overlap)]
    ratio = "-"
    base = (network, streams, "off")
    if overlap == "on" and base in rows and tok_s(base) > 0:
        ratio = f"{tok_s((network, streams, overlap)) / tok_s(base):.2f}"
    failed = sum(r["errors"] for r in group)
    errors += failed
    itl = statistics.median(r["itl_ms"]["p50"] for r in group)
    print(f"| {network} | {group[0]['rtt']} | {streams} | {overlap} "
          f"| {tok_s((network, streams, overlap)):.1f} | {itl:.1f} | {failed} | {ratio} |")
if errors:
    print(f"bench-netem: {errors} requests failed", file=sys.stderr)
    sys.exit(1)
PY
