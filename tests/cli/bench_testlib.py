"""What the command-line tests share: pass/fail bookkeeping (check, finish;
cli_local_test uses these too) and, for the `switchyard bench` tests, a
gateway on tiny-mixtral with in-process experts and a /metrics port, a
scrape of that port, and the bad-flag check (exit 1, the flag named).

Import from a test in tests/cli/ (its folder is on sys.path when it runs).
"""
import os
import socket
import subprocess
import sys
import time
import urllib.request

failures = []
passed = 0


def check(name, condition, detail=""):
    global passed
    if condition:
        passed += 1
        print(f"ok   {name}")
    else:
        failures.append(name)
        print(f"FAIL {name}: {detail}")


def finish():
    """Prints the tally and exits 1 if any check failed."""
    print("%d passed, %d failed" % (passed, len(failures)))
    sys.exit(1 if failures else 0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(metrics):
    """The text of http://METRICS/metrics."""
    return urllib.request.urlopen("http://%s/metrics" % metrics, timeout=10).read().decode()


def start_gateway(build, model):
    """Starts switchyard-gateway (in-process experts, /metrics) and waits
    until its /metrics answers. Returns (process, server, metrics)."""
    server = "127.0.0.1:%d" % free_port()
    metrics = "127.0.0.1:%d" % free_port()
    gateway = subprocess.Popen([os.path.join(build, "bin", "switchyard-gateway"), "--model", model,
                                "--listen", server, "--experts", "local", "--metrics-listen",
                                metrics], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    for _ in range(300):
        try:
            scrape(metrics)
            break
        except OSError:
            time.sleep(0.1)
    return gateway, server, metrics


def refused(switchyard, server, args, needle):
    """`switchyard bench --server SERVER ARGS` exits 1 with NEEDLE on stderr."""
    r = subprocess.run([switchyard, "bench", "--server", server, *args], capture_output=True,
                       text=True, timeout=60)
    check("refused: %s" % " ".join(args), r.returncode == 1 and needle in r.stderr,
          (r.returncode, r.stderr))
