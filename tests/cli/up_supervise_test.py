#!/usr/bin/env python3
"""`switchyard up` supervises: kill -9 of an expert, then of the gateway, is
logged with the signal, the child is restarted on the same address, `up` keeps
running, generation through the gateway works again with the same greedy
tokens, and the endpoints file lists every process with a live pid. Also:
everything listens on 127.0.0.1 by default and on --listen-host when given, and
a child that crash-loops past --max-restarts stops `up` with a non-zero exit.

usage: up_supervise_test.py BUILD_DIR SOURCE_DIR
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

build, source = sys.argv[1], sys.argv[2]
switchyard = os.path.join(build, "bin", "switchyard")
model = os.path.join(source, "tests", "data", "tiny-mixtral")
reference = json.load(open(os.path.join(model, "reference.json")))
prompt = reference["prompts"][0]
failures = []
passed = 0


def check(name, condition, detail=""):
    global passed
    if condition:
        passed += 1
        print(f"ok   {name}", flush=True)
    else:
        failures.append(name)
        print(f"FAIL {name}: {detail}", flush=True)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Up:
    """One `switchyard up` run, its combined output in a file."""

    def __init__(self, *extra):
        self.dir = tempfile.mkdtemp(prefix="up_supervise_")
        self.endpoints = os.path.join(self.dir, "endpoints.json")
        self.log_path = os.path.join(self.dir, "up.log")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [switchyard, "up", "--model", model, "--port", "0", "--endpoints-file", self.endpoints, *extra],
            stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not os.path.exists(self.endpoints):
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"switchyard up did not start:\n{self.log()}")
            time.sleep(0.2)

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def processes(self):
        with open(self.endpoints) as f:
            return json.load(f)["processes"]

    def gateway(self):
        return [p for p in self.processes() if p["role"] == "gateway"][0]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def generate(server):
    return subprocess.run([switchyard, "generate", "--server", server, "--prompt", prompt["text"],
                           "--max-new-tokens", "4", "--json"], capture_output=True, text=True, timeout=60)


def generate_until_ok(server, seconds=90):
    deadline = time.time() + seconds
    while True:
        r = generate(server)
        if r.returncode == 0 or time.time() > deadline:
            return r
        time.sleep(0.5)


def listening_sockets(pids):
    """(host hex, port) of every listening TCP socket that one of `pids` holds."""
    inodes = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    host, port = local.split(":")
                    found.append((host, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
ANY = {"00000000", "00000000000000000000000000000000"}

# --- Default run: loopback only, survives kill -9 of each role. ---
up = Up()
server = up.gateway()["grpc"]
check("gateway address on loopback", server.startswith("127.0.0.1:"), server)
before = generate(server)
check("generate before the kills", before.returncode == 0, before.stderr)
tokens = json.loads(before.stdout)["token_ids"] if before.returncode == 0 else None
check("greedy tokens match the reference", tokens == prompt["greedy_new_ids"][:4], tokens)

pids = [p["pid"] for p in up.processes()]
sockets = listening_sockets(pids)
check("every process listens (gRPC and metrics)", len(sockets) >= 2 * len(pids), sockets)
check("every listening socket is on 127.0.0.1", all(h in LOOPBACK for h, _ in sockets), sockets)


def environment(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(v.decode().split("=", 1) for v in f.read().split(b"\0") if b"=" in v)


# The processes share this host's cores: experts get their share as OpenMP threads, and
# every process's idle OpenMP threads spin only briefly (GOMP_SPINCOUNT=20000) before they
# sleep, unless the user chose a wait policy or spin count.
# With several expert processes the gateway's spin is shorter than the experts': it waits
# milliseconds for them.
user_chose = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
spins = {"gateway": os.environ.get("GOMP_SPINCOUNT") if user_chose else "1000",
         "expert": os.environ.get("GOMP_SPINCOUNT") if user_chose else "20000"}
with open("/proc/cpuinfo") as f:
    amd = "AuthenticAMD" in f.read()
# up's share of the cores per expert process (8 experts, one process each).
omp_threads = os.environ.get("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // 8)))
for p in up.processes():
    env = environment(p["pid"])
    name = "gateway" if p["role"] == "gateway" else f"expert {p['experts']}"
    spin = spins[p["role"]]
    check(f"{name}: GOMP_SPINCOUNT={spin}", env.get("GOMP_SPINCOUNT") == spin,
          env.get("GOMP_SPINCOUNT"))
    # On AMD CPUs glibc's vector memcpy instead of rep movsb, unless the user set GLIBC_TUNABLES.
    tunables = os.environ.get("GLIBC_TUNABLES",
                              "glibc.cpu.x86_rep_movsb_threshold=1073741824" if amd else None)
    check(f"{name}: GLIBC_TUNABLES={tunables}", env.get("GLIBC_TUNABLES") == tunables,
          env.get("GLIBC_TUNABLES"))
    if p["role"] != "gateway":
        check(f"{name}: OMP_NUM_THREADS={omp_threads}", env.get("OMP_NUM_THREADS") == omp_threads,
              env.get("OMP_NUM_THREADS"))
# With more expert processes than CPUs, up points to the faster one-process layout.
cpus = len(os.sched_getaffinity(0))
note = f"note: 8 expert processes share {cpus} CPUs; on one CPU host --experts-per-process 8"
check("the layout note appears exactly when experts outnumber CPUs", (note in up.log()) == (cpus < 8),
      up.log()[-2000:])

# (role, which process of that role, signal, how up describes the death); a
# SIGTERM'd expert stops cleanly (exit 0) but is still restarted.
for role, index, sig, death in (("expert", 0, signal.SIGKILL, "was killed by signal 9"),
                                ("gateway", 0, signal.SIGKILL, "was killed by signal 9"),
                                ("expert", 1, signal.SIGTERM, "exited with status 0")):
    role = f"{role} {index}" if role == "expert" else role
    kind = role.split()[0]
    old = [p for p in up.processes() if p["role"] == kind][index]
    addresses_before = {p["grpc"] for p in up.processes()}
    log_before = len(up.log())
    os.kill(old["pid"], sig)
    deadline = time.time() + 60
    new = old
    while time.time() < deadline:
        try:
            new = [p for p in up.processes() if p["grpc"] == old["grpc"]][0]
        except (FileNotFoundError, json.JSONDecodeError, IndexError):
            pass
        # up rewrites the endpoints file, then logs the restart.
        if new["pid"] != old["pid"] and f" restarted (pid {new['pid']})" in up.log()[log_before:]:
            break
        time.sleep(0.2)
    log = up.log()[log_before:]
    check(f"{role}: up still running after kill -9", up.proc.poll() is None, log[-2000:])
    check(f"{role}: the death is logged with its exit status",
          f"(pid {old['pid']}) {death}" in log, log[-2000:])
    check(f"{role}: the restart is logged", "restarting" in log and " restarted (pid " in log, log[-2000:])
    check(f"{role}: restarted with a new pid on the same address",
          new["pid"] != old["pid"] and new["grpc"] == old["grpc"] and new["metrics"] == old["metrics"],
          (old, new))
    after = generate_until_ok(server)
    check(f"{role}: generation works again", after.returncode == 0, after.stderr)
    if after.returncode == 0:
        got = json.loads(after.stdout)["token_ids"]
        check(f"{role}: same greedy tokens as before the kill", got == tokens, (got, tokens))
    processes = up.processes()
    check(f"{role}: endpoints list every process with a live pid",
          len(processes) == len(pids) and all(alive(p["pid"]) for p in processes), processes)
    check(f"{role}: endpoints keep every address", {p["grpc"] for p in processes} == addresses_before,
          processes)

all_pids = [p["pid"] for p in up.processes()]
code = up.stop()
check("SIGTERM stops up with exit 0", code == 0, up.log()[-2000:])
check("no child left after the stop", not any(alive(p) for p in all_pids), all_pids)
check("endpoints file removed at the stop", not os.path.exists(up.endpoints))

# --- --listen-host and the crash-loop limit, on the one-expert-process layout. ---
up = Up("--listen-host", "0.0.0.0", "--max-restarts", "1", "--experts-per-process", "8")
pids = [p["pid"] for p in up.processes()]
# With one expert process neither it nor the gateway spins: they hand each layer back and forth.
spin = os.environ.get("GOMP_SPINCOUNT") if user_chose else "0"
for p in up.processes():
    got = environment(p["pid"]).get("GOMP_SPINCOUNT")
    check(f"one expert process: the {p['role']}'s GOMP_SPINCOUNT={spin}", got == spin, got)
check("one expert process", len([p for p in up.processes() if p["role"] == "expert"]) == 1,
      up.processes())
sockets = listening_sockets(pids)
check("--listen-host 0.0.0.0 listens on every interface", sockets and all(h in ANY for h, _ in sockets),
      sockets)
victim = [p for p in up.processes() if p["role"] == "expert"][0]
os.kill(victim["pid"], signal.SIGKILL)
deadline = time.time() + 60
while time.time() < deadline and " restarted (pid " not in up.log():
    time.sleep(0.2)
again = [p for p in up.processes() if p["grpc"] == victim["grpc"]][0]
check("first crash restarted", again["pid"] != victim["pid"] and alive(again["pid"]), up.log()[-2000:])
os.kill(again["pid"], signal.SIGKILL)
try:
    code = up.proc.wait(timeout=60)
except subprocess.TimeoutExpired:
    code = None
log = up.log()
check("crash loop stops up with a non-zero exit", code not in (None, 0), (code, log[-2000:]))
check("crash loop is explained", "is crash-looping (1 restarts within 60 s" in log, log[-2000:])
left = [p for p in pids + [again["pid"]] if alive(p)]
check("crash loop leaves no child behind", not left, left)
check("crash loop removes the endpoints file", not os.path.exists(up.endpoints))
up.stop()

e = subprocess.run([switchyard, "up", "--model", model, "--port", "0", "--max-restarts", "-1"],
                   capture_output=True, text=True, timeout=60)
check("bad --max-restarts", e.returncode == 1 and "--max-restarts" in e.stderr, e.stderr)

print(f"{passed} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
