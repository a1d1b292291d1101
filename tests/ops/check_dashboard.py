#!/usr/bin/env python3
"""Structural checks of the Grafana dashboards in deploy/grafana/ (run by check_prometheus.sh).

usage: check_dashboard.py [SOURCE_DIR]
Every dashboard: valid JSON with title, uid and schemaVersion; a datasource
template variable of type prometheus, and every panel and query using it
(no hard-wired datasource uid, so it imports into any Grafana); unique panel
ids; panels inside the 24-column grid and not overlapping; every query panel
has a title and at least one non-empty expr with a unique refId; query
template variables `namespace` and `instance` (multi-value, All = ".*", so
series without a namespace, as on the local cluster, still match), and every
metric selector of every query filtered by both. The Switchyard dashboard
also has the panels the operations issue asks for, among them the layer x
expert routing heatmap on switchyard_gateway_routed_tokens_total.
(The queries themselves: check_metric_names.py and promtool.)

--self-test: broken copies of each dashboard (a query without the namespace
matcher, no instance variable, no routing heatmap) must be rejected.
"""
import copy
import glob
import json
import os
import re
import sys

ARGS = [a for a in sys.argv[1:] if a != "--self-test"]
SELF_TEST = "--self-test" in sys.argv[1:]
SRC = os.path.abspath(ARGS[0] if ARGS else os.path.join(os.path.dirname(__file__), "..", ".."))
WANT = {  # panel type + words its title must contain -> the switchyard dashboard needs one
    ("heatmap", "per expert"),
    ("timeseries", "tokens/s"),
    ("timeseries", "time to first token"),
    ("timeseries", "inter-token latency"),
    ("timeseries", "failed requests"),
    ("timeseries", "expert call errors"),
    ("timeseries", "kv cache"),
    ("timeseries", "running and waiting"),
    ("heatmap", "layer \u00d7 expert"),
}
# Matchers every metric selector of every query must carry.
FILTER_VARIABLES = ("namespace", "instance")
SELECTOR = re.compile(r"\b(switchyard_[A-Za-z0-9_]+|up)\b\s*(\{([^}]*)\})?")
ROUTED = "switchyard_gateway_routed_tokens_total"


def panels_of(dashboard):
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])


def unfiltered(expr):
    """Selectors of expr that lack a NAME=~"$NAME" matcher for a filter variable."""
    out = []
    for m in SELECTOR.finditer(expr):
        inner = m.group(3) or ""
        for v in FILTER_VARIABLES:
            if not re.search(r'(^|[\s,])%s\s*=~\s*"\$(%s|\{%s\})"' % (v, v, v), inner):
                out.append("%s has no %s=~\"$%s\"" % (m.group(0), v, v))
    return out


def check(path):
    with open(path, encoding="utf-8") as f:
        return check_dashboard(json.load(f), os.path.basename(path))


def check_dashboard(d, basename):
    problems = []
    for field in ("title", "uid", "schemaVersion", "panels", "templating"):
        if field not in d:
            problems.append("no %s" % field)
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no datasource template variable of type prometheus")
    for name in FILTER_VARIABLES:
        v = variables.get(name)
        if not v or v.get("type") != "query":
            problems.append("no query template variable %s" % name)
            continue
        if not (v.get("includeAll") and v.get("allValue") == ".*" and v.get("multi")):
            problems.append("variable %s: want multi-value with All = \".*\"" % name)
        if (v.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append("variable %s: datasource is not ${datasource}" % name)
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
            expr = t.get("expr") or ""
            if not SELECTOR.search(expr):
                problems.append("%s: query %s selects no metric" % (where, t.get("refId")))
            for u in unfiltered(expr):
                problems.append("%s: query %s: %s" % (where, t.get("refId"), u))
    if basename == "switchyard-dashboard.json":
        have = [(p.get("type"), p.get("title", "").lower()) for p in panels_of(d)]
        for kind, words in sorted(WANT):
            if not any(k == kind and words in title for k, title in have):
                problems.append("no %s panel about %s" % (kind, words))
        heatmaps = [p for p in panels_of(d) if p.get("type") == "heatmap" and "layer \u00d7 expert" in p.get("title", "").lower()]
        for p in heatmaps:
            exprs = " ".join(t.get("expr") or "" for t in p.get("targets") or [])
            if ROUTED not in exprs or not re.search(r"by\s*\(\s*layer\s*,\s*expert\s*\)", exprs):
                problems.append('panel "%s": want sum by (layer, expert) of %s' % (p.get("title"), ROUTED))
    return problems


def self_test(path):
    """Broken copies of a dashboard that check_dashboard must reject: [(name, problems)]."""
    with open(path, encoding="utf-8") as f:
        original = json.load(f)
    basename = os.path.basename(path)
    results = []

    def first_target(d):
        return next(t for p in panels_of(d) for t in p.get("targets") or [])

    def drop_namespace(d):
        t = first_target(d)
        t["expr"] = t["expr"].replace('namespace=~"$namespace", ', "")

    def drop_instance_variable(d):
        d["templating"]["list"] = [v for v in d["templating"]["list"] if v.get("name") != "instance"]

    def no_all(d):
        next(v for v in d["templating"]["list"] if v.get("name") == "namespace")["allValue"] = None

    mutations = [(drop_namespace, "has no namespace=~"), (drop_instance_variable, "no query template variable instance"),
                 (no_all, "variable namespace: want multi-value")]
    if basename == "switchyard-dashboard.json":
        def no_heatmap(d):
            for p in panels_of(d):
                if p.get("type") == "heatmap" and "layer" in p.get("title", "").lower():
                    p["type"] = "timeseries"

        def heatmap_by_expert_only(d):
            for p in panels_of(d):
                if p.get("type") == "heatmap" and "layer" in p.get("title", "").lower():
                    for t in p["targets"]:
                        t["expr"] = t["expr"].replace("by (layer, expert)", "by (expert)")

        mutations += [(no_heatmap, "no heatmap panel about layer"), (heatmap_by_expert_only, "want sum by (layer, expert)")]
    for mutate, expect in mutations:
        d = copy.deepcopy(original)
        mutate(d)
        problems = check_dashboard(d, basename)
        results.append((mutate.__name__, expect, problems))
    return results


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
    if SELF_TEST:
        for path in files:
            for name, expect, problems in self_test(path):
                if not any(expect in p for p in problems):
                    print("FAIL self-test %s: %s not rejected with '%s' (%s)" % (
                        os.path.relpath(path, SRC), name, expect, problems))
                    failed += 1
                else:
                    print("ok   self-test %s: %s rejected" % (os.path.relpath(path, SRC), name))
    print("%d passed, %d failed" % (len(files) - failed if files else 0, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
