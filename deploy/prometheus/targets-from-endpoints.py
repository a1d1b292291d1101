#!/usr/bin/env python3
"""Turns `switchyard up`'s endpoints file into a Prometheus file_sd target file.

The endpoints file (switchyard up --endpoints-file F) lists every process:
  {"processes": [{"role": "expert", "experts": [0], "grpc": "127.0.0.1:41234",
                  "metrics": "127.0.0.1:41300", "pid": 123}, ...]}
The output is a file_sd JSON list with one target group per process that has a
metrics address, labelled role (gateway | expert) and experts (the expert
indices it serves, comma-separated; none for the gateway):
  [{"targets": ["127.0.0.1:41300"], "labels": {"role": "expert", "experts": "0"}}, ...]
The same labels as the Kubernetes PodMonitors (k8s/base/core/podmonitors.yaml) set.

usage: targets-from-endpoints.py ENDPOINTS.json [--out FILE] [--watch]
  --out FILE  where to write (default: stdout); written atomically, so
              Prometheus never reads half a file
  --watch     keep running: rewrite FILE whenever ENDPOINTS.json changes, and
              write an empty list when it disappears (switchyard up removes it
              on exit); needs --out
Uses only the Python standard library.
"""
import argparse
import json
import os
import sys
import tempfile
import time


def targets(endpoints):
    """The file_sd target groups for a parsed endpoints document."""
    if not isinstance(endpoints, dict) or not isinstance(endpoints.get("processes"), list):
        raise ValueError("not a switchyard endpoints file: no 'processes' list")
    groups = []
    for i, p in enumerate(endpoints["processes"]):
        if not isinstance(p, dict) or not isinstance(p.get("role"), str):
            raise ValueError("process %d has no role" % i)
        address = p.get("metrics")
        if not address:  # a process without a metrics endpoint
            continue
        if not isinstance(address, str) or ":" not in address:
            raise ValueError("process %d: metrics address %r is not HOST:PORT" % (i, address))
        labels = {"role": p["role"]}
        experts = p.get("experts") or []
        if not isinstance(experts, list) or not all(isinstance(e, int) for e in experts):
            raise ValueError("process %d: experts %r is not a list of indices" % (i, experts))
        if experts:
            labels["experts"] = ",".join(str(e) for e in sorted(experts))
        groups.append({"targets": [address], "labels": labels})
    groups.sort(key=lambda g: (g["labels"]["role"], g["labels"].get("experts", ""), g["targets"][0]))
    return groups


def render(groups):
    return json.dumps(groups, indent=2) + "\n"


def write_atomically(path, text):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".targets-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def convert(endpoints_path):
    with open(endpoints_path, encoding="utf-8") as f:
        doc = json.load(f)
    groups = targets(doc)
    skipped = len(doc["processes"]) - len(groups)
    if skipped:
        print("targets-from-endpoints: %d process(es) list no metrics address: not scraped" % skipped,
              file=sys.stderr)
    return render(groups)


def watch(endpoints_path, out_path, interval=1.0):
    last = "never"  # differs from every stamp, None (no file) included
    while True:
        try:
            stamp = os.stat(endpoints_path).st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp != last:
            try:
                text = convert(endpoints_path) if stamp is not None else render([])
            except (OSError, ValueError) as e:  # half-written or gone meanwhile: retry
                print("targets-from-endpoints: %s" % e, file=sys.stderr)
            else:
                write_atomically(out_path, text)
                last = stamp
                print("targets-from-endpoints: wrote %s" % out_path, file=sys.stderr)
        time.sleep(interval)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("endpoints", help="the endpoints file of `switchyard up --endpoints-file`")
    parser.add_argument("--out", help="file_sd JSON file to write (default: stdout)")
    parser.add_argument("--watch", action="store_true", help="rewrite --out whenever the endpoints file changes")
    args = parser.parse_args(argv)
    if args.watch:
        if not args.out:
            parser.error("--watch needs --out")
        try:
            watch(args.endpoints, args.out)
        except KeyboardInterrupt:
            return 0
    try:
        text = convert(args.endpoints)
    except (OSError, ValueError) as e:
        print("targets-from-endpoints: %s: %s" % (args.endpoints, e), file=sys.stderr)
        return 1
    if args.out:
        write_atomically(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
