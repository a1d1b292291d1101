#!/bin/bash
# End-to-end test of `switchyard up` and the public API from a second language:
# starts the tiny fixture model as separate expert and gateway processes with
# `switchyard up`, runs python_client_test.py (stubs generated from the .proto
# files only) and smoke-tests the C++ clients (`generate --server`, `bench`)
# against it, then stops `up` with SIGTERM and checks it exits 0, removes its
# endpoints file, and leaves no child process behind.
#
# usage: run_python_client_test.sh BUILD_DIR SOURCE_DIR
set -u

BUILD_DIR=$(cd "${1:?usage: $0 BUILD_DIR SOURCE_DIR}" && pwd)
SOURCE_DIR=$(cd "${2:?usage: $0 BUILD_DIR SOURCE_DIR}" && pwd)
SWITCHYARD="$BUILD_DIR/bin/switchyard"
MODEL="$SOURCE_DIR/tests/data/tiny-mixtral"

fail() {
  echo "run_python_client_test: FAIL: $*" >&2
  exit 1
}

# A Python with grpcio (pyenv shims may shadow Debian's python3-grpcio).
PYTHON=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c "import grpc" 2>/dev/null; then
    PYTHON=$(command -v "$candidate")
    break
  fi
done
[ -n "$PYTHON" ] || fail "no python3 with grpcio (apt-get install python3-grpcio)"
for bin in switchyard switchyard-expert switchyard-gateway; do
  [ -x "$BUILD_DIR/bin/$bin" ] || fail "missing $BUILD_DIR/bin/$bin"
done

WORK=$(mktemp -d)
ENDPOINTS="$WORK/endpoints.json"
LOG="$WORK/up.log"
UP_PID=""
cleanup() {
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    kill -TERM "$UP_PID" 2>/dev/null
    wait "$UP_PID" 2>/dev/null
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "run_python_client_test: switchyard up on port $PORT"
env -u OMP_NUM_THREADS "$SWITCHYARD" up --model "$MODEL" --port "$PORT" --listen-host 127.0.0.1 \
  --endpoints-file "$ENDPOINTS" --experts-per-process 2 >"$LOG" 2>&1 &
UP_PID=$!

for _ in $(seq 1 600); do
  grep -q "^switchyard up: ready on $PORT " "$LOG" && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$LOG" >&2; fail "switchyard up exited before ready"; }
  sleep 0.2
done
grep -q "^switchyard up: ready on $PORT " "$LOG" || { cat "$LOG" >&2; fail "not ready in 120 s"; }
[ -f "$ENDPOINTS" ] || fail "no endpoints file $ENDPOINTS"

CHILD_PIDS=$("$PYTHON" - "$ENDPOINTS" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
procs = doc["processes"]
roles = [p["role"] for p in procs]
assert roles.count("gateway") == 1 and roles[-1] == "gateway", roles
experts = sorted(e for p in procs if p["role"] == "expert" for e in p["experts"])
assert experts == list(range(8)), experts
for p in procs:
    assert set(p) == {"role", "experts", "grpc", "metrics", "pid"}, p
    assert isinstance(p["pid"], int) and p["pid"] > 0, p
print(" ".join(str(p["pid"]) for p in procs))
EOF
) || fail "bad endpoints file: $(cat "$ENDPOINTS")"
echo "run_python_client_test: child pids $CHILD_PIDS"

# Expert processes share the host's cores: `up` starts them with
# OMP_NUM_THREADS=1 (this script leaves the variable unset); the gateway
# keeps the caller's environment.
"$PYTHON" - "$ENDPOINTS" <<'EOF2' || fail "expert processes do not run with OMP_NUM_THREADS=1"
import json, sys
for p in json.load(open(sys.argv[1]))["processes"]:
    env = open(f"/proc/{p['pid']}/environ", "rb").read().split(b"\0")
    omp = [e for e in env if e.startswith(b"OMP_NUM_THREADS=")]
    want = [b"OMP_NUM_THREADS=1"] if p["role"] == "expert" else []
    assert omp == want, (p["role"], p["pid"], omp)
EOF2

GATEWAY="127.0.0.1:$PORT"
status=0
SWITCHYARD_GATEWAY="$GATEWAY" "$PYTHON" "$SOURCE_DIR/tests/clients/python_client_test.py" \
  --protos "$SOURCE_DIR/protos" || status=1

# The C++ clients against the same deployment.
if [ $status -eq 0 ]; then
  out=$("$SWITCHYARD" generate --server "$GATEWAY" --prompt "Hello" --max-new-tokens 4 \
    --ignore-eos --stop "@@never@@" --stop "##never##" --json) || { echo "$out" >&2; status=1; }
  echo "generate --server: $out"
  echo "$out" | "$PYTHON" -c '
import json, sys
o = json.load(sys.stdin)
assert len(o["token_ids"]) == 4 and o["finish_reason"] == "length", o
assert o["usage"] == {"prompt_tokens": len(o["prompt_token_ids"]), "completion_tokens": 4}, o
' || { echo "unexpected generate --json output" >&2; status=1; }
  err=$("$SWITCHYARD" generate --server "$GATEWAY" --prompt "Hello" --temperature -1 2>&1 >/dev/null)
  rc=$?
  echo "generate --temperature -1: rc=$rc $err"
  [ $rc -eq 1 ] && [[ "$err" == "switchyard generate: INVALID_ARGUMENT: "* ]] || status=1
  out=$("$SWITCHYARD" bench --server "$GATEWAY" --requests 4 --concurrency 2 --prompt-tokens 8 \
    --output-tokens 4 --json) || { echo "$out" >&2; status=1; }
  echo "bench: $out"
  echo "$out" | "$PYTHON" -c '
import json, sys
o = json.load(sys.stdin)
assert o["errors"] == 0 and o["succeeded"] == 4 and o["output_tokens"] == 16, o
' || { echo "unexpected bench output" >&2; status=1; }
fi

kill -TERM "$UP_PID"
wait "$UP_PID"
up_rc=$?
UP_PID=""
if [ $up_rc -ne 0 ]; then
  cat "$LOG" >&2
  fail "switchyard up exited with $up_rc after SIGTERM"
fi
[ -e "$ENDPOINTS" ] && fail "endpoints file not removed"
for pid in $CHILD_PIDS; do
  kill -0 "$pid" 2>/dev/null && fail "child pid $pid still running after up exited"
done
if [ $status -ne 0 ]; then
  cat "$LOG" >&2
  fail "client checks failed"
fi
echo "run_python_client_test: PASS (up exited 0, endpoints file removed, children gone)"
