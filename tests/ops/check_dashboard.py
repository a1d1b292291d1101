#!/usr/bin/env python3
"""Structural checks of the Grafana dashboards in deploy/grafana/ (run by check_prometheus.sh).

usage: check_dashboard.py [SOURCE_DIR]
Every dashboard: valid JSON with title, uid and schemaVersion; a datasource
template variable of type prometheus, and every panel and query using it
(no hard-wired datasource uid, so it imports into any Grafana); unique panel
ids; panels inside the 24-column grid and not overlapping; every query panel
has a title and at least one non-empty expr with a unique refId. The
Switchyard dashboard also has the panels the operations issue asks for.
(The queries themselves: check_metric_names.py and promtool.)
"""
import glob
import json
import os
import sys

SRC = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", ".."))
WANT = {  # panel type + words its title must contain -> the switchyard dashboard needs one
    ("heatmap", "per expert"),
    ("timeseries", "tokens/s"),
    ("timeseries", "time to first token"),
    ("timeseries", "inter-token latency"),
    ("timeseries", "failed requests"),
    ("timeseries", "expert call errors"),
    ("timeseries", "kv cache"),
    ("timeseries", "running and waiting"),
}


def panels_of(dashboard):
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])


def check(path):
    problems = []
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    for field in ("title", "uid", "schemaVersion", "panels", "templating"):
        if field not in d:
            problems.append("no %s" % field)
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no datasource template variable of type prometheus")
    ids, cells = set(), {}
    for p in panels_of(d):
        where = 'panel %s "%s"' % (p.get("id"), p.get("title"))
        if p.get("id") in ids:
            problems.append("%s: duplicate id" % where)
        ids.add(p.get("id"))
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] < 0 or g["w"] < 1 or g["x"] + g["w"] > 24:
            problems.append("%s: gridPos %s is outside the 24-column grid" % (where, g))
        else:
            for y in range(g["y"], g["y"] + g["h"]):
                for x in range(g["x"], g["x"] + g["w"]):
                    if (x, y) in cells:
                        problems.append("%s overlaps %s" % (where, cells[(x, y)]))
                        break
                    cells[(x, y)] = where
                else:
                    continue
                break
        if p.get("type") == "row":
            continue
        if not p.get("title"):
            problems.append("%s: no title" % where)
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append("%s: datasource is not ${datasource}" % where)
        targets = p.get("targets") or []
        if not targets:
            problems.append("%s: no queries" % where)
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs):
            problems.append("%s: duplicate refIds %s" % (where, refs))
        for t in targets:
            if not (t.get("expr") or "").strip():
                problems.append("%s: query %s has no expr" % (where, t.get("refId")))
            if (t.get("datasource") or {}).get("uid", "${datasource}") != "${datasource}":
                problems.append("%s: query %s has its own datasource" % (where, t.get("refId")))
    if os.path.basename(path) == "switchyard-dashboard.json":
        have = [(p.get("type"), p.get("title", "").lower()) for p in panels_of(d)]
        for kind, words in sorted(WANT):
            if not any(k == kind and words in title for k, title in have):
                problems.append("no %s panel about %s" % (kind, words))
    return problems


def main():
    files = sorted(glob.glob(os.path.join(SRC, "deploy", "grafana", "*.json")))
    failed = 0
    for path in files:
        problems = check(path)
        for p in problems:
            print("FAIL %s: %s" % (os.path.relpath(path, SRC), p))
        if problems:
            failed += 1
        else:
            print("ok   %s" % os.path.relpath(path, SRC))
    if not files:
        print("FAIL: no dashboards in deploy/grafana")
        failed = 1
    print("%d passed, %d failed" % (len(files) - failed if files else 0, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
