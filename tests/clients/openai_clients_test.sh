#!/bin/bash
# The gateway's OpenAI-compatible HTTP API from real clients, against
# `switchyard up --http-port` on the tiny model (with Mixtral-Instruct's chat
# template and bearer-token auth):
#   curl: SSE framing of /v1/completions and /v1/chat/completions streams
#     ("data: JSON" events, each ended by a blank line, then "data: [DONE]"),
#     their text equal to the gRPC path's greedy text, errors as JSON objects;
#   sdk: the official OpenAI Node SDK (npm `openai`, pinned in
#     tests/clients/openai_sdk/package-lock.json; `npm ci` on first run)
#     runs openai_sdk/sdk_test.mjs: models, completions and chat, unary and
#     streaming, equal to the gRPC path's text, and the SDK's error types.
# The gRPC reference comes from the switchyard CLI (generate --server; a
# conversation is rendered with `chat-template` and sent as token ids).
#
# usage: openai_clients_test.sh curl|sdk BUILD_DIR SOURCE_DIR
set -u

MODE=${1:?usage: $0 curl|sdk BUILD_DIR SOURCE_DIR}
BUILD_DIR=$(cd "${2:?usage: $0 curl|sdk BUILD_DIR SOURCE_DIR}" && pwd)
SOURCE_DIR=$(cd "${3:?usage: $0 curl|sdk BUILD_DIR SOURCE_DIR}" && pwd)
SWITCHYARD="$BUILD_DIR/bin/switchyard"
MODEL="$SOURCE_DIR/tests/data/tiny-mixtral"
TEMPLATE="$SOURCE_DIR/tests/data/chat-templates/mixtral-instruct-v0.1.jinja"
SDK_DIR="$SOURCE_DIR/tests/clients/openai_sdk"

fail() {
  echo "openai_clients_test ($MODE): FAIL: $*" >&2
  exit 1
}
for bin in switchyard switchyard-expert switchyard-gateway; do
  [ -x "$BUILD_DIR/bin/$bin" ] || fail "missing $BUILD_DIR/bin/$bin"
done
command -v curl >/dev/null || fail "no curl (scripts/install-deps.sh installs it)"

WORK=$(mktemp -d)
UP_PID=""
cleanup() {
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    kill -TERM "$UP_PID" 2>/dev/null
    wait "$UP_PID" 2>/dev/null
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$MODE" = sdk ]; then
  command -v node >/dev/null && command -v npm >/dev/null || fail "no node/npm (install-deps.sh)"
  # The pinned SDK; npm needs the registry only when the lock file changed.
  if ! cmp -s "$SDK_DIR/package-lock.json" "$SDK_DIR/node_modules/.switchyard-lock" 2>/dev/null; then
    npm ci --prefix "$SDK_DIR" --no-audit --no-fund --loglevel=error >"$WORK/npm.log" 2>&1 ||
      { cat "$WORK/npm.log"; fail "npm ci --prefix tests/clients/openai_sdk"; }
    cp "$SDK_DIR/package-lock.json" "$SDK_DIR/node_modules/.switchyard-lock"
  fi
fi

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PORT=$(free_port)
HTTP_PORT=$(free_port)
TOKEN=openai-test-token
echo "$TOKEN" >"$WORK/tokens"
LOG="$WORK/up.log"
env -u OMP_NUM_THREADS "$SWITCHYARD" up --model "$MODEL" --port "$PORT" --http-port "$HTTP_PORT" \
  --experts-per-process 8 --gateway-arg="--chat-template=$TEMPLATE" \
  --gateway-arg="--auth-token-file=$WORK/tokens" >"$LOG" 2>&1 &
UP_PID=$!
for _ in $(seq 1 600); do
  grep -q "^switchyard up: ready on $PORT " "$LOG" && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$LOG" >&2; fail "switchyard up exited before ready"; }
  sleep 0.2
done
grep -q "^switchyard up: ready on $PORT " "$LOG" || { cat "$LOG" >&2; fail "not ready in 120 s"; }
grep -q "http=127.0.0.1:$HTTP_PORT" "$LOG" || { cat "$LOG" >&2; fail "gateway not on --http-port"; }
BASE="http://127.0.0.1:$HTTP_PORT/v1"

# The gRPC path's greedy text of a prompt and of a conversation.
PROMPT="The quick brown fox"
MAX_TOKENS=12
grpc() { "$SWITCHYARD" generate --server "127.0.0.1:$PORT" --auth-token-file "$WORK/tokens" \
  --max-new-tokens "$MAX_TOKENS" --stream=false --json "$@"; }
grpc --prompt "$PROMPT" >"$WORK/grpc_completion.json" || fail "gRPC generate"
cat >"$WORK/messages.json" <<'EOF'
[{"role": "user", "content": "What is the capital of France?"},
 {"role": "assistant", "content": "Paris."},
 {"role": "user", "content": "And of Italy?"}]
EOF
"$SWITCHYARD" chat-template --model "$MODEL" --template "$TEMPLATE" --messages "$WORK/messages.json" \
  --json >"$WORK/rendered.json" || fail "chat-template"
RENDERED=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["text"], end="")' \
  "$WORK/rendered.json")
IDS=$("$SWITCHYARD" tokenize --server "127.0.0.1:$PORT" --auth-token-file "$WORK/tokens" \
  --text "$RENDERED" --add-special-tokens=false | tr -d '[] ') || fail "tokenize"
grpc --token-ids "$IDS" >"$WORK/grpc_chat.json" || fail "gRPC generate (conversation)"
python3 - "$WORK" "$PROMPT" "$MAX_TOKENS" <<'EOF' || fail "expected.json"
import json, sys
work, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
json.dump({"model": "tiny-mixtral", "prompt": prompt, "max_tokens": max_tokens,
           "completion": json.load(open(f"{work}/grpc_completion.json"))["text"],
           "messages": json.load(open(f"{work}/messages.json")),
           "chat": json.load(open(f"{work}/grpc_chat.json"))["text"]},
          open(f"{work}/expected.json", "w"))
EOF

if [ "$MODE" = sdk ]; then
  node "$SDK_DIR/sdk_test.mjs" "$BASE" "$TOKEN" "$WORK/expected.json" || fail "sdk_test.mjs"
  echo "openai_clients_test (sdk): PASS"
  exit 0
fi

# curl: streamed completions and chat, byte-level SSE framing.
stream() {  # path body -> writes $WORK/sse.headers and $WORK/sse.body
  curl -sS -N -D "$WORK/sse.headers" -o "$WORK/sse.body" -H "Authorization: Bearer $TOKEN" \
    -H "Content-Type: application/json" -d "$2" "$BASE/$1" || fail "curl $1"
}
check_sse() {  # kind expected-text-file
  python3 - "$WORK" "$1" "$2" <<'EOF'
import json, sys
work, kind, expected_file = sys.argv[1:4]
headers = open(f"{work}/sse.headers").read().lower()
assert headers.startswith("http/1.1 200"), headers
assert "content-type: text/event-stream" in headers, headers
body = open(f"{work}/sse.body", encoding="utf-8").read()
assert body.endswith("data: [DONE]\n\n"), repr(body[-200:])
events = body.split("\n\n")
assert events[-1] == "", repr(body[-50:])
events = events[:-1]
for e in events:  # one "data: " line per event, nothing else
    assert e.startswith("data: ") and "\n" not in e, repr(e)
datas = [json.loads(e[6:]) for e in events[:-1]]
text = ""
for d in datas:
    for c in d["choices"]:
        text += c["text"] if kind == "completion" else c["delta"].get("content", "")
expected = json.load(open(expected_file))["text"]
assert text == expected, (text, expected)
assert [d["choices"][0]["finish_reason"] for d in datas[:-1]] == [None] * (len(datas) - 1)
assert datas[-1]["choices"][0]["finish_reason"] in ("stop", "length"), datas[-1]
print(f"ok: {kind} stream, {len(events)} events, text equals gRPC's")
EOF
}
stream completions "{\"model\":\"tiny-mixtral\",\"prompt\":\"$PROMPT\",\"max_tokens\":$MAX_TOKENS,\"temperature\":0,\"stream\":true}"
check_sse completion "$WORK/grpc_completion.json" || fail "completions stream"
MESSAGES=$(tr -d '\n' <"$WORK/messages.json")
stream chat/completions "{\"model\":\"tiny-mixtral\",\"messages\":$MESSAGES,\"max_tokens\":$MAX_TOKENS,\"temperature\":0,\"stream\":true}"
check_sse chat "$WORK/grpc_chat.json" || fail "chat stream"

# Errors: JSON error objects with the HTTP status.
expect_error() {  # status param curl-args...
  local status=$1 param=$2
  shift 2
  code=$(curl -sS -o "$WORK/err.json" -w '%{http_code}' "$@") || fail "curl $*"
  [ "$code" = "$status" ] || fail "expected HTTP $status, got $code: $(cat "$WORK/err.json")"
  python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["error"]; p=sys.argv[2]
assert set(e) == {"message","type","param","code"}, e
assert e["param"] == (None if p == "-" else p), e' "$WORK/err.json" "$param" ||
    fail "error body: $(cat "$WORK/err.json")"
  echo "ok: HTTP $status $(cat "$WORK/err.json")"
}
expect_error 401 - "$BASE/models"
expect_error 401 - -H "Authorization: Bearer wrong" "$BASE/models"
expect_error 400 temperature -H "Authorization: Bearer $TOKEN" \
  -d '{"model":"tiny-mixtral","prompt":"x","temperature":-1,"stream":true}' "$BASE/completions"
expect_error 404 model -H "Authorization: Bearer $TOKEN" \
  -d '{"model":"nope","messages":[{"role":"user","content":"x"}]}' "$BASE/chat/completions"
echo "openai_clients_test (curl): PASS"
