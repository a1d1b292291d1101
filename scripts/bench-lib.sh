# Shared by the scripts/bench-*.sh benchmarks and measure-expert-capacity.sh:
# source it from the repository root (after `set -euo pipefail`), then either
# call bench_setup, which sets `bin`, or set `bin` to the binaries' folder.

# bench_setup [MODEL_DIR] [BENCH_FLAGS...]: the start shared by the scripts
# whose arguments are `[MODEL_DIR] [bench flags...]`. Sets bin=build/bin,
# model (bench_model MODEL_DIR), bench_flags (the rest; empty when none are
# given, for the caller to fill with its defaults) and pids=(): processes
# the caller starts and adds there get SIGTERM on exit (bench_cleanup).
bench_setup() {
  bin=build/bin
  model=$(bench_model "${1:-}")
  shift || true
  bench_flags=("$@")
  pids=()
  trap bench_cleanup EXIT
}

# bench_cleanup: the EXIT trap of bench_setup: SIGTERM to each of pids, then
# waits for every child.
bench_cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait || true
}

# bench_up PORT ENDPOINTS LOG [UP_FLAGS...]: starts `switchyard up --model
# $model --port PORT --endpoints-file ENDPOINTS UP_FLAGS...` with its output
# in LOG, adds it to pids and sets up_pid; returns once the gateway answers
# and ENDPOINTS is written (or 10 s more passed); if up exits first, prints
# LOG and exits 1.
bench_up() {
  local port=$1 endpoints=$2 log=$3
  shift 3
  "$bin/switchyard" up --model "$model" --port "$port" --endpoints-file "$endpoints" "$@" \
    >"$log" 2>&1 &
  up_pid=$!
  pids+=("$up_pid")
  wait_ready "$port" "$up_pid" || { cat "$log"; exit 1; }
  for _ in $(seq 1 100); do [ -s "$endpoints" ] && break; sleep 0.1; done
}

# bench_model [MODEL_DIR]: prints MODEL_DIR, or (when empty) a `make-model
# --preset bench` checkpoint in $TMPDIR, made on first use; either way with
# the Mistral tokenizer files in place.
bench_model() {
  local model=${1:-}
  if [ -z "$model" ]; then
    model=${TMPDIR:-/tmp}/switchyard-bench-model
    [ -f "$model/config.json" ] || "$bin/switchyard" make-model --preset bench --out "$model" \
      --seed 1 --tokenizer-dir tests/data/mistral-tokenizer >/dev/null
  fi
  [ -f "$model/tokenizer.json" ] || cp tests/data/mistral-tokenizer/tokenizer*.json "$model/"
  echo "$model"
}

# free_port: a TCP port on 127.0.0.1 that was free a moment ago.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_ready PORT PID: until the gateway on PORT answers (0), or PID exits or
# 5 minutes pass (1).
wait_ready() {
  for _ in $(seq 1 1200); do
    "$bin/switchyard" tokenize --server "127.0.0.1:$1" --text x >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.25
  done
  return 1
}
