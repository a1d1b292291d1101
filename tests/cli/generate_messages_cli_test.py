#!/usr/bin/env python3
"""`switchyard generate --messages`, run as a user would: a chat prompt sent
over gRPC to a real gateway (rendered there with its --chat-template) gives
the same greedy output as the rendered text (rendered by `switchyard
chat-template`) sent as --prompt (less the template's BOS, which the text path
adds itself) and as --token-ids; unary, streamed and in process (--model with
--chat-template). Bad JSON and misused flags fail with a clear error.

usage: generate_messages_cli_test.py BUILD_DIR SOURCE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

build, source = sys.argv[1], sys.argv[2]
bin_dir = os.path.join(build, "bin")
switchyard = os.path.join(bin_dir, "switchyard")
model = os.path.join(source, "tests", "data", "tiny-mixtral")
template = os.path.join(source, "tests", "data", "chat-templates", "mixtral-instruct-v0.1.jinja")
failures, passed = [], 0


def check(name, ok, detail=""):
    global passed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failures.append(name)
        print(f"FAIL {name}: {detail}")


def run(*args):
    return subprocess.run([switchyard, *args], capture_output=True, text=True, timeout=120)


def as_json(r):
    try:
        return json.loads(r.stdout)
    except ValueError:
        return None


conversation = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
tmp = tempfile.mkdtemp(prefix="switchyard-generate-messages-")
messages_file = os.path.join(tmp, "chat.json")
with open(messages_file, "w") as f:
    json.dump({"messages": conversation}, f)

# The text the gateway's template makes of the conversation.
r = run("chat-template", "--model", model, "--template", template, "--messages", messages_file,
        "--add-generation-prompt", "--json")
check("chat-template renders", r.returncode == 0, r.stderr)
rendered = json.loads(r.stdout)["text"]

gateway = subprocess.Popen(
    [os.path.join(bin_dir, "switchyard-gateway"), "--model", model, "--listen", "127.0.0.1:0",
     "--experts", "local", "--chat-template", template],
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
try:
    line = gateway.stdout.readline()
    address = line.split("listening on ")[1].split()[0]
    gen = ["generate", "--server", address, "--max-new-tokens", "12", "--ignore-eos"]

    # The rendered text starts with the template's BOS, so it is tokenized
    # without adding another, as the gateway tokenizes a messages prompt.
    r = run("tokenize", "--server", address, "--text", rendered, "--add-special-tokens=false")
    check("tokenize the rendered text", r.returncode == 0, r.stderr)
    rendered_ids = json.loads(r.stdout)
    # The text path adds BOS itself (add_bos_token), so the rendered text is
    # sent as --prompt without the BOS the template wrote; sent whole it gets
    # a second BOS, which the messages path does not add.
    check("the template writes BOS first", rendered.startswith("<s>"), rendered)
    text_ref = as_json(run(*gen, "--prompt", rendered[len("<s>"):], "--json"))
    doubled = as_json(run(*gen, "--prompt", rendered, "--json"))
    check("--prompt of the whole rendered text has two BOS",
          doubled is not None and doubled["prompt_token_ids"] == [1] + rendered_ids, doubled)
    ids_ref = as_json(run(*gen, "--token-ids", ",".join(map(str, rendered_ids)), "--json"))
    check("reference generations", text_ref is not None and ids_ref is not None)

    for name, flag in [("inline JSON", json.dumps(conversation)), ("@FILE", "@" + messages_file)]:
        r = run(*gen, "--messages", flag, "--json")
        out = as_json(r)
        check(f"--messages {name} exits 0", r.returncode == 0 and out is not None, r.stderr)
        if out is None:
            continue
        check(f"--messages {name}: prompt ids are the rendered text's",
              out["prompt_token_ids"] == rendered_ids, (out["prompt_token_ids"], rendered_ids))
        check(f"--messages {name}: greedy output equals --token-ids of the rendered text",
              (out["token_ids"], out["text"]) == (ids_ref["token_ids"], ids_ref["text"]),
              (out, ids_ref))
        check(f"--messages {name}: 12 tokens", len(out["token_ids"]) == 12, out)
        check(f"--messages {name}: greedy output equals --prompt of the rendered text",
              (out["prompt_token_ids"], out["token_ids"], out["text"])
              == (text_ref["prompt_token_ids"], text_ref["token_ids"], text_ref["text"]),
              (out, text_ref))

    # Streamed (the default without --json): the same text; streamed --json
    # reports the prompt ids the gateway rendered.
    r = run(*gen, "--messages", "@" + messages_file)
    check("streamed --messages text", r.returncode == 0 and r.stdout == ids_ref["text"] + "\n",
          (r.stdout, ids_ref["text"], r.stderr))
    out = as_json(run(*gen, "--messages", "@" + messages_file, "--json", "--stream"))
    check("streamed --json --messages", out is not None and out["prompt_token_ids"] == rendered_ids
          and out["text"] == ids_ref["text"], out)

    # The template's own refusal comes back from the gateway.
    r = run(*gen, "--messages", json.dumps([{"role": "user", "content": "a"},
                                            {"role": "user", "content": "b"}]))
    check("template refusal", r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr
          and "Conversation roles must alternate" in r.stderr, r.stderr)

    # Bad JSON and bad shapes: exit 1, one line naming what is wrong, nothing sent.
    bad = [
        ('[{"role": "user", "content": "hi"}', ["not valid JSON", "line 1, column"]),
        ('{"role": "user", "content": "hi"}', ['"messages" array']),
        ('"hello"', ["expected a JSON array", "got a string"]),
        ("[]", ["no messages"]),
        ('[{"role": "user"}]', ['messages[0] has no "content"']),
        ('[{"role": "user", "content": "a"}, 7]', ["messages[1] is a number"]),
        ('[{"role": "user", "content": ["a"]}]', ["messages[0].content must be a string, got an array"]),
        ('[{"role": null, "content": "a"}]', ["messages[0].role must be a string, got null"]),
        ('[{"role": "user", "content": "a", "name": "x"}]', ["messages[0].name is not supported"]),
        ("@" + os.path.join(tmp, "missing.json"), ["--messages @", "missing.json", "cannot read"]),
    ]
    for value, needles in bad:
        r = run(*gen, "--messages", value)
        check(f"bad --messages {value[:40]}", r.returncode == 1 and r.stdout == ""
              and r.stderr.count("\n") == 1
              and (r.stderr.startswith("switchyard generate: INVALID_ARGUMENT: --messages")
                   or r.stderr.startswith("switchyard generate: NOT_FOUND: --messages @")),
              (r.returncode, r.stderr))
        check(f"bad --messages {value[:40]} says why", all(n in r.stderr for n in needles), r.stderr)
    bad_file = os.path.join(tmp, "bad.json")
    with open(bad_file, "w") as f:
        f.write('[{"role": "user", "content": "hi"},\n {"role": "assistant" "content": "x"}]')
    r = run(*gen, "--messages", "@" + bad_file)
    check("bad JSON in @FILE names the file and line", r.returncode == 1 and bad_file in r.stderr
          and "line 2" in r.stderr, r.stderr)

    # Flag misuse: exit 2 with the usage hint.
    for args in (["--messages", "[]", "--prompt", "x"], ["--messages", "[]", "--token-ids", "1"],
                 [], ["--messages", "@" + messages_file, "--chat-template", template]):
        r = run(*gen, *args)
        check(f"misuse {args}", r.returncode == 2 and "see switchyard generate --help" in r.stderr,
              (r.returncode, r.stderr))
finally:
    gateway.terminate()
    gateway.wait(timeout=30)

# A gateway without a chat template (tiny-mixtral has none) refuses chat.
plain = subprocess.Popen(
    [os.path.join(bin_dir, "switchyard-gateway"), "--model", model, "--listen", "127.0.0.1:0",
     "--experts", "local"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
try:
    address = plain.stdout.readline().split("listening on ")[1].split()[0]
    r = run("generate", "--server", address, "--messages", "@" + messages_file)
    check("gateway without a template", r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr
          and "--chat-template FILE" in r.stderr, r.stderr)
finally:
    plain.terminate()
    plain.wait(timeout=30)

# In process: --model with --chat-template renders the same way.
local = ["generate", "--model", model, "--max-new-tokens", "12", "--ignore-eos", "--json"]
r = run(*local, "--messages", "@" + messages_file, "--chat-template", template)
out = as_json(r)
check("local --messages", r.returncode == 0 and out is not None, r.stderr)
if out is not None and ids_ref is not None:
    check("local --messages equals the gateway's",
          (out["prompt_token_ids"], out["token_ids"], out["text"])
          == (rendered_ids, ids_ref["token_ids"], ids_ref["text"]), (out, ids_ref))
r = run(*local, "--messages", "@" + messages_file)
check("local model without a chat template", r.returncode == 1 and "has no chat_template" in r.stderr
      and "give --chat-template FILE" in r.stderr, r.stderr)
r = run(*local, "--messages", "[{]")
check("local bad JSON", r.returncode == 1 and "not valid JSON" in r.stderr, r.stderr)
r = run(*local, "--prompt", "x", "--chat-template", template)
check("local --chat-template without --messages", r.returncode == 2
      and "see switchyard generate --help" in r.stderr, r.stderr)
r = run(*local, "--prompt", "x", "--messages", "@" + messages_file)
check("local --prompt and --messages", r.returncode == 2, r.stderr)

print(f"{passed} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
