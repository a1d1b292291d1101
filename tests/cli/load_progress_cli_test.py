#!/usr/bin/env python3
"""switchyard-expert and switchyard-gateway report loading progress on
stderr (bytes loaded / total and the rate), at least a final line, even
when the model loads at once (tiny-mixtral).

usage: load_progress_cli_test.py BUILD_DIR SOURCE_DIR
"""
import os
import re
import signal
import subprocess
import sys
import tempfile

build, source = sys.argv[1], sys.argv[2]
model = os.path.join(source, "tests", "data", "tiny-mixtral")
failures = []
FINAL = re.compile(r"loading weights\s+100% ([0-9.]+ (?:B|KiB|MiB|GiB)) / \1, "
                   r"[0-9.]+ (?:B|KiB|MiB|GiB)/s, [0-9.]+ s done$", re.M)


def check(name, condition, detail=""):
    print(("ok   " if condition else "FAIL ") + name + ("" if condition else f": {detail}"))
    if not condition:
        failures.append(name)


def start_and_stop(binary, *args):
    """Runs the server until it listens, stops it; returns its stderr."""
    with tempfile.TemporaryFile(mode="w+") as err:
        p = subprocess.Popen([os.path.join(build, "bin", binary), "--model", model,
                              "--listen", "127.0.0.1:0", *args],
                             stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            line = p.stdout.readline()  # "... listening on ..." once loaded
            check(f"{binary} starts", "listening on" in line, line)
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)
        err.seek(0)
        return err.read()


for binary, args in (("switchyard-expert", ["--experts", "0,1"]),
                     ("switchyard-gateway", ["--experts", "local"])):
    text = start_and_stop(binary, *args)
    m = FINAL.search(text)
    check(f"{binary} prints a final progress line with bytes and rate", m is not None, text)
    if m:
        check(f"{binary} loaded more than nothing", not m.group(1).startswith("0 B"), m.group(0))
    # stderr is a file here, not a terminal: whole lines, no redrawn bar.
    check(f"{binary} progress has no carriage returns", "\r" not in text, repr(text))

print(f"{len(failures)} failed")
sys.exit(1 if failures else 0)
