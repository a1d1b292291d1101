# Shared by the scripts/bench-*.sh benchmarks: source it from the repository
# root with `bin` set to the binaries' folder.

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
