#!/usr/bin/env python3
"""`switchyard chat-template` run as a user would: every reference rendering
and refusal in tests/data/chat-templates/references.json through the command
(--template FILE, with and without --json), a model folder whose
tokenizer_config.json carries the template (named-list form, token objects),
and the error paths.

usage: chat_template_cli_test.py BUILD_DIR SOURCE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

build, source = sys.argv[1], sys.argv[2]
switchyard = os.path.join(build, "bin", "switchyard")
templates = os.path.join(source, "tests", "data", "chat-templates")
refs = json.load(open(os.path.join(templates, "references.json")))
failures = []
passed = 0


def run(*args):
    return subprocess.run([switchyard, "chat-template", *args], capture_output=True, text=True,
                          timeout=60)


def check(name, condition, detail=""):
    global passed
    if condition:
        passed += 1
    else:
        failures.append(name)
        print(f"FAIL {name}: {detail}")


with tempfile.TemporaryDirectory() as tmp:
    # A model folder: the template in tokenizer_config.json (named-list form)
    # and the special tokens as objects, as some hubs write them.
    model = os.path.join(tmp, "model")
    os.mkdir(model)
    config = {
        "bos_token": {"content": refs["bos_token"], "lstrip": False},
        "eos_token": refs["eos_token"],
        "chat_template": [
            {"name": "tool_use", "template": "{{ raise_exception('wrong template') }}"},
            {"name": "default",
             "template": open(os.path.join(templates, "mixtral-instruct-v0.1.jinja")).read()},
        ],
    }
    json.dump(config, open(os.path.join(model, "tokenizer_config.json"), "w"))

    for i, ref in enumerate(refs["references"]):
        name = f"{ref['template']} conversation {ref['conversation']} agp={ref['add_generation_prompt']}"
        messages = os.path.join(tmp, f"m{i}.json")
        json.dump(refs["conversations"][ref["conversation"]], open(messages, "w"), ensure_ascii=False)
        # Tokens come from the model folder; the template from the file.
        args = ["--model", model, "--template", os.path.join(templates, ref["template"] + ".jinja"),
                "--messages", messages]
        if ref["add_generation_prompt"]:
            args.append("--add-generation-prompt")
        r = run(*args, "--json")
        if "text" in ref:
            check(name + " exits 0", r.returncode == 0, r.stderr)
            check(name + " --json text", r.returncode == 0 and json.loads(r.stdout) == {"text": ref["text"]},
                  (r.stdout, ref["text"]))
            plain = run(*args)
            check(name + " plain text", plain.stdout == ref["text"] + "\n", (plain.stdout, ref["text"]))
        else:
            check(name + " refuses", r.returncode != 0 and r.stdout == "", (r.returncode, r.stdout))
            check(name + " says the template's message",
                  r.stderr == f"switchyard chat-template: {ref['error']}\n", r.stderr)

    # The model's own template (the "default" entry of the named list).
    messages = os.path.join(tmp, "chat.json")
    json.dump({"messages": [{"role": "user", "content": "Hello!"}]}, open(messages, "w"))
    r = run("--model", model, "--messages", messages, "--json")
    check("model template", r.returncode == 0 and json.loads(r.stdout)["text"] == "<s>[INST] Hello! [/INST]",
          (r.stdout, r.stderr))

    # Errors: clear message, non-zero exit.
    tiny = os.path.join(source, "tests", "data", "tiny-mixtral")
    r = run("--model", tiny, "--messages", messages)
    check("model without chat_template", r.returncode == 1 and "has no chat_template" in r.stderr, r.stderr)
    r = run("--messages", messages)
    check("neither --model nor --template", r.returncode == 1 and "--template" in r.stderr, r.stderr)
    r = run("--model", model)
    check("no --messages", r.returncode == 1 and "--messages" in r.stderr, r.stderr)
    bad = os.path.join(tmp, "bad.json")
    open(bad, "w").write("[{\"content\": \"no role\"}]")
    r = run("--model", model, "--messages", bad)
    check("message without role", r.returncode == 1 and "role" in r.stderr, r.stderr)
    broken = os.path.join(tmp, "broken.jinja")
    open(broken, "w").write("{% for m in messages %}")
    r = run("--template", broken, "--messages", messages)
    check("template syntax error", r.returncode == 1 and "broken.jinja" in r.stderr and "endfor" in r.stderr,
          r.stderr)

print(f"{passed} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
