#!/usr/bin/env python3
"""Every binary and every `switchyard` subcommand answers --help and -h (exit
0, every flag with a description and a default), --version (exit 0, the
version) and an unknown flag (exit 2, one line naming it plus a usage hint),
and accepts every flag its help lists.

usage: cli_help_test.py BUILD_DIR SOURCE_DIR
"""
import os
import re
import subprocess
import sys

build, source = sys.argv[1], sys.argv[2]
bin_dir = os.path.join(build, "bin")
failures = []
passed = 0

# The version CMake's project() declares, read independently of the binaries.
cmake = open(os.path.join(source, "CMakeLists.txt")).read()
version = re.search(r"project\(\s*\w+\s+VERSION\s+([0-9.]+)", cmake).group(1)

# Flags each command has documented for users (README, issue #12): the help
# must list at least these.
SERVER_FORM = ["--server", "unix:/nonexistent/switchyard-help-test.sock", "--timeout-ms", "2000"]
COMMANDS = {
    ("switchyard", "generate"): ["model", "prompt", "max-new-tokens", "temperature", "top-p",
                                 "top-k", "min-p", "seed", "json", "server", "token-ids", "stop",
                                 "stream", "logprobs", "request-id", "tls-ca"],
    ("switchyard", "tokenize"): ["model", "text", "server", "add-special-tokens"],
    ("switchyard", "health"): ["server", "service", "timeout-ms", "tls-ca"],
    ("switchyard", "up"): ["model", "port", "endpoints-file", "experts-per-process", "bin-dir",
                           "expert-arg", "gateway-arg", "device", "precision", "micro-batches"],
    ("switchyard", "bench"): ["server", "concurrency", "requests", "prompt-tokens",
                              "output-tokens", "json"],
    ("switchyard", "chat-template"): ["model", "template", "messages", "add-generation-prompt"],
    ("switchyard", "make-model"): ["preset", "out", "layers", "seed", "dtype", "shard-size-mb"],
    ("switchyard-gateway", None): ["model", "listen", "experts", "kv-cache-tokens", "max-queue",
                                   "max-running", "wire-dtype", "micro-batches", "grace-ms",
                                   "metrics-listen",
                                   "device", "tls-cert", "auth-token-file", "expert-tls-ca"],
    ("switchyard-expert", None): ["model", "listen", "experts", "layers", "workers", "grace-ms",
                                  "metrics-listen", "device", "gpu", "max-forward-rows"],
}
# Built with the benchmarks (bench/): checked where it was built.
if os.path.exists(os.path.join(bin_dir, "switchyard-delay-proxy")):
    COMMANDS[("switchyard-delay-proxy", None)] = ["target", "listen", "delay-us",
                                                  "max-buffer-bytes"]

FLAG_LINE = re.compile(r"^  --([a-z0-9-]+)( VALUE)?(?:\s+(.*))?$")


def run(argv, timeout=60):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def check(name, condition, detail=""):
    global passed
    if condition:
        passed += 1
    else:
        failures.append(name)
        print(f"FAIL {name}: {detail}")


def parse_help(text):
    """{flag: (takes_value, description)} from a help text; a flag listed in
    several forms (generate, generate --server) keeps its first line."""
    flags = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = FLAG_LINE.match(line)
        if not m:
            continue
        desc = (m.group(3) or "").strip()
        if not desc and i + 1 < len(lines):  # a long name: description on the next line
            desc = lines[i + 1].strip()
        flags.setdefault(m.group(1), (m.group(2) is not None, desc))
    return flags


def probe_args(binary, sub, flag, takes_value):
    """Arguments that reach the command's own parser with `flag` set, and that
    fail fast afterwards (a missing model, an unreachable server)."""
    argv = [os.path.join(bin_dir, binary)] + ([sub] if sub else [])
    if binary == "switchyard-delay-proxy":
        # A --target that is no HOST:PORT: refused before it listens.
        return argv + ([] if flag == "target" else ["--target", "no-port"]) + [
            "--" + flag] + (["/nonexistent/x"] if takes_value else [])
    if sub in ("generate", "tokenize") and flag in ("server", "token-ids", "stop", "stream",
                                                    "logprobs", "request-id", "tls-ca",
                                                    "tls-cert", "tls-key", "auth-token-file",
                                                    "add-special-tokens", "timeout-ms"):
        argv += SERVER_FORM  # the remote form's flags
    elif flag != "model" and sub not in ("health", "bench", "chat-template", "make-model"):
        argv += ["--model", "/nonexistent/switchyard-help-test-model"]
    if flag in ("server", "timeout-ms") and sub in ("generate", "tokenize"):
        return argv  # already given by SERVER_FORM
    argv.append("--" + flag)
    if takes_value:
        argv.append("/nonexistent/x")
    return argv


for (binary, sub), documented in COMMANDS.items():
    name = binary + (" " + sub if sub else "")
    base = [os.path.join(bin_dir, binary)] + ([sub] if sub else [])
    helps = {}
    for h in ("--help", "-h"):
        r = run(base + [h])
        check(f"{name} {h} exits 0", r.returncode == 0, f"rc={r.returncode} {r.stderr}")
        helps[h] = r.stdout
    check(f"{name} --help and -h agree", helps["--help"] == helps["-h"])
    flags = parse_help(helps["--help"])
    check(f"{name} --help lists flags", len(flags) >= 3, helps["--help"])
    for flag in documented:
        check(f"{name} --help lists --{flag}", flag in flags, helps["--help"])
    for flag, (takes_value, desc) in flags.items():
        if flag in ("help", "version"):
            continue
        check(f"{name} --{flag} has a description", len(desc) > 10, desc)
        check(f"{name} --{flag} states its default", "(default: " in desc or "(required)" in desc,
              desc)
        r = run(probe_args(binary, sub, flag, takes_value))
        check(f"{name} accepts --{flag} its help lists",
              "unknown flag" not in r.stderr and r.returncode >= 0,
              f"rc={r.returncode} {r.stderr}")

    r = run(base + ["--version"])
    check(f"{name} --version exits 0", r.returncode == 0, r.stderr)
    check(f"{name} --version prints {version}", r.stdout.strip() == f"{binary} {version}"
          or r.stdout.strip() == f"{name} {version}", r.stdout)

    r = run(base + ["--no-such-flag"])
    check(f"{name} unknown flag exits 2", r.returncode == 2, f"rc={r.returncode} {r.stderr}")
    err = r.stderr.strip().splitlines()
    check(f"{name} unknown flag names it", bool(err) and "--no-such-flag" in err[0], r.stderr)
    check(f"{name} unknown flag hints at --help", f"see {name} --help" in r.stderr, r.stderr)
    check(f"{name} unknown flag error is short", len(err) <= 2, r.stderr)

# The top level: help lists every subcommand; --version; unknown commands.
sy = os.path.join(bin_dir, "switchyard")
for h in ("--help", "-h"):
    r = run([sy, h])
    check(f"switchyard {h} exits 0", r.returncode == 0, r.stderr)
    for (binary, sub) in COMMANDS:
        if sub:
            check(f"switchyard {h} lists {sub}", re.search(rf"^  {sub}\s+\S", r.stdout, re.M),
                  r.stdout)
r = run([sy, "--version"])
check("switchyard --version", r.returncode == 0 and r.stdout.strip() == f"switchyard {version}",
      r.stdout)
r = run([sy, "no-such-command"])
check("switchyard unknown command exits 2", r.returncode == 2 and "see switchyard --help"
      in r.stderr, r.stderr)

print(f"{passed} checks passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
