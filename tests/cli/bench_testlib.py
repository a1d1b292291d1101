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
    until it reports SERVING (`switchyard health`; /metrics answers earlier,
    while the model loads) and /metrics answers. Returns (process, server,
    metrics); raises SystemExit, with the gateway's stderr, when it does not
    get there within 120 s."""
    server = "127.0.0.1:%d" % free_port()
    metrics = "127.0.0.1:%d" % free_port()
    gateway = subprocess.Popen([os.path.join(build, "bin", "switchyard-gateway"), "--model", model,
                                "--listen", server, "--experts", "local", "--metrics-listen",
                                metrics], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    switchyard = os.path.join(build, "bin", "switchyard")
    deadline = time.time() + 120
    while True:
        if gateway.poll() is not None:
            raise SystemExit("switchyard-gateway exited %d: %s" % (gateway.returncode,
                                                                   gateway.stderr.read()))
        if subprocess.run([switchyard, "health", "--server", server], capture_output=True,
                          timeout=60).returncode == 0:
            try:
                scrape(metrics)
                return gateway, server, metrics
            except OSError:
                pass
        if time.time() > deadline:
            gateway.kill()
            raise SystemExit("switchyard-gateway did not serve within 120 s: " +
                             gateway.communicate()[1])
        time.sleep(0.2)


def refused(switchyard, server, args, needle):
    """`switchyard bench --server SERVER ARGS` exits 1 with NEEDLE on stderr."""
    r = subprocess.run([switchyard, "bench", "--server", server, *args], capture_output=True,
                       text=True, timeout=60)
    check("refused: %s" % " ".join(args), r.returncode == 1 and needle in r.stderr,
          (r.returncode, r.stderr))
