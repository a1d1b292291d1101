#!/usr/bin/env python3
"""The switchyard command line, run as a user would: generate, tokenize and
make-model against the tiny-mixtral fixture, and their error paths.

usage: cli_local_test.py BUILD_DIR SOURCE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

from bench_testlib import check, finish

build, source = sys.argv[1], sys.argv[2]
switchyard = os.path.join(build, "bin", "switchyard")
model = os.path.join(source, "tests", "data", "tiny-mixtral")
reference = json.load(open(os.path.join(model, "reference.json")))


def run(*args):
    return subprocess.run([switchyard, *args], capture_output=True, text=True, timeout=300)


# generate --json reproduces the Hugging Face greedy continuation.
for p in reference["prompts"][:2]:
    r = run("generate", "--model", model, "--prompt", p["text"], "--max-new-tokens", "12", "--json")
    check("generate exits 0", r.returncode == 0, r.stderr)
    out = json.loads(r.stdout)
    check("generate prompt_token_ids", out["prompt_token_ids"] == p["input_ids"], out)
    check("generate token_ids", out["token_ids"] == p["greedy_new_ids"][:12], out)
    check("generate finish_reason", out["finish_reason"] == "length", out)
    check("generate keys", set(out) == {"prompt_token_ids", "token_ids", "text", "finish_reason"}, out)

# Plain generate streams the same text.
p = reference["prompts"][0]
plain = run("generate", "--model", model, "--prompt", p["text"], "--max-new-tokens", "12")
js = json.loads(run("generate", "--model", model, "--prompt", p["text"], "--max-new-tokens", "12", "--json").stdout)
check("plain text equals json text", plain.stdout == js["text"] + "\n", (plain.stdout, js["text"]))

# Seeded sampling repeats; another seed differs.
args = ["generate", "--model", model, "--prompt", "Hello", "--max-new-tokens", "16", "--temperature", "1.0",
        "--top-p", "0.9", "--top-k", "50", "--json"]
a = json.loads(run(*args, "--seed", "5").stdout)
b = json.loads(run(*args, "--seed", "5").stdout)
c = json.loads(run(*args, "--seed", "6").stdout)
check("same seed same tokens", a["token_ids"] == b["token_ids"], (a, b))
check("other seed other tokens", a["token_ids"] != c["token_ids"], (a, c))

# tokenize prints the ids with BOS.
t = run("tokenize", "--model", model, "--text", "Hello world!")
check("tokenize", t.returncode == 0 and json.loads(t.stdout) == [1, 22557, 1526, 28808], t.stdout + t.stderr)

# Errors: clear message, non-zero exit, no crash.
e = run("generate", "--model", "/nonexistent", "--prompt", "x")
check("missing model dir", e.returncode == 1 and "/nonexistent" in e.stderr, e.stderr)
e = run("generate", "--model", model, "--prompt", "x", "--temperature", "-1")
check("bad temperature", e.returncode == 1 and "temperature" in e.stderr, e.stderr)
e = run("generate", "--model", model, "--prompt", "x", "--bogus", "1")
check("unknown flag", e.returncode == 2 and "unknown flag --bogus" in e.stderr and "see switchyard generate --help" in e.stderr, e.stderr)
e = run("make-model", "--preset", "huge", "--out", tempfile.mkdtemp())
check("bad preset", e.returncode == 1 and "huge" in e.stderr and "tiny" in e.stderr, e.stderr)

# up --device: checked before anything starts; on a machine without a GPU,
# --device cuda stops every process and says why (the children's CUDA error).
e = run("up", "--model", model, "--port", "0", "--device", "tpu")
check("up bad device", e.returncode == 1 and "--device tpu: expected cpu or cuda" in e.stderr, e.stderr)
if not os.path.exists("/dev/nvidia0"):
    e = run("up", "--model", model, "--port", "0", "--device", "cuda")
    check("up --device cuda without a GPU fails clearly",
          e.returncode == 1 and "cuda" in e.stderr.lower() and "stopping everything" in e.stderr, e.stderr)

# make-model writes a loadable sharded checkpoint.
with tempfile.TemporaryDirectory() as out:
    m = run("make-model", "--preset", "tiny", "--out", out, "--shard-size-mb", "1",
            "--tokenizer-dir", os.path.join(source, "tests", "data", "mistral-tokenizer"))
    check("make-model exits 0", m.returncode == 0, m.stderr)
    check("make-model sharded", os.path.exists(os.path.join(out, "model.safetensors.index.json")), os.listdir(out))
    g = run("generate", "--model", out, "--prompt", "Hi", "--max-new-tokens", "4", "--json")
    check("generate on made model", g.returncode == 0 and len(json.loads(g.stdout)["token_ids"]) == 4, g.stderr)

finish()
