#!/usr/bin/env python3
"""Checks that every metric the operations files use exists.

Collects the PromQL of
  - KEDA ScaledObjects (prometheus triggers' query) in k8s/,
  - prometheus-adapter rules (seriesQuery, metricsQuery) in ConfigMaps in k8s/,
  - recording and alerting rules (expr) in deploy/prometheus/rules.yml,
  - the Grafana dashboards (every target's expr) in deploy/grafana/*.json,
parses it loosely (identifiers starting with switchyard_ are metric names,
switchyard:... are recording rules; string literals are skipped), and checks:
  - with --docs FILE (docs/metrics.md): every metric name is in its tables
    (histograms with their _bucket/_sum/_count series), every label in a
    selector's matchers is one the table lists for that metric or a target
    label (job, instance, role, experts, namespace, pod, ...), and every
    label in by (...) / without (...) belongs to a metric of that expression;
  - with --metrics FILE (repeatable; Prometheus text format, e.g. `curl
    http://HOST:PORT/metrics` of a gateway and of an expert): every metric
    name appears in at least one of the files (a sample or a # TYPE line);
  - with --endpoints FILE (`switchyard up --endpoints-file FILE` of a running
    local cluster): the same, on GET /metrics of every process it lists;
  - always: every recording rule used is defined in rules.yml, and every
    custom metric an HPA scales on is one prometheus-adapter's rules name.
With --promql-out FILE it also writes every expression, with Grafana and
prometheus-adapter template variables filled in, as a Prometheus rules file,
so that `promtool check rules FILE` parses them all (check_prometheus.sh).

usage: check_metric_names.py [--root DIR] [--docs docs/metrics.md] [--metrics FILE ...]
                             [--endpoints FILE] [--promql-out FILE] [--list]
Prints one line per problem and a "N passed, M failed" summary; exit 1 on any problem.
Needs PyYAML (Debian: python3-yaml).
"""
import argparse
import glob
import json
import os
import re
import sys
import tempfile
import urllib.request

import yaml

# Labels that scraping adds (Prometheus, file_sd targets of
# targets-from-endpoints.py, Prometheus Operator PodMonitors).
TARGET_LABELS = {"job", "instance", "role", "experts", "namespace", "pod", "container",
                 "endpoint", "service", "cluster"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


class Use:
    """One PromQL expression and where it came from."""

    def __init__(self, where, expr):
        self.where = where
        self.expr = expr


# ---------------------------------------------------------------------------
# Collecting PromQL.

def fill_templates(expr):
    """Grafana and prometheus-adapter template variables -> plain PromQL."""
    # Grafana's label_values(SELECTOR, LABEL) variable queries: the selector.
    m = re.match(r"^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", expr, re.S)
    if m:
        expr = m.group(1)
    expr = re.sub(r"\$__(rate_)?interval|\$__range|\$\{__(rate_)?interval\}", "5m", expr)
    expr = expr.replace("<<.Series>>", "switchyard_adapter_series")
    expr = expr.replace("<<.LabelMatchers>>", 'namespace="switchyard",pod="p"')
    expr = expr.replace("<<.GroupBy>>", "pod")
    return expr


def k8s_uses(root):
    uses, adapter_names, hpa_metrics = [], set(), []
    files = sorted(glob.glob(os.path.join(root, "k8s", "**", "*.yaml"), recursive=True))
    for path in files:
        rel = os.path.relpath(path, root)
        with open(path, encoding="utf-8") as f:
            docs = list(yaml.safe_load_all(f))
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
            if kind == "ScaledObject":
                for i, t in enumerate((doc.get("spec") or {}).get("triggers") or []):
                    if t.get("type") == "prometheus":
                        uses.append(Use("%s: ScaledObject/%s trigger %d query" % (rel, name, i),
                                        t["metadata"]["query"]))
            elif kind == "ConfigMap":
                for key, text in ((doc.get("data") or {}).items()):
                    config = yaml.safe_load(text) if isinstance(text, str) and "rules" in text else None
                    if not isinstance(config, dict):
                        continue
                    for section in ("rules", "externalRules"):
                        for i, rule in enumerate(config.get(section) or []):
                            where = "%s: ConfigMap/%s %s %s[%d]" % (rel, name, key, section, i)
                            for field in ("seriesQuery", "metricsQuery"):
                                if field in rule:
                                    uses.append(Use("%s.%s" % (where, field), rule[field]))
                            as_name = ((rule.get("name") or {}).get("as"))
                            if as_name:
                                adapter_names.add(as_name)
            elif kind == "HorizontalPodAutoscaler":
                for m in (doc.get("spec") or {}).get("metrics") or []:
                    source = m.get(m.get("type", "").lower() if m.get("type") != "ContainerResource"
                                   else "containerResource") or {}
                    metric = (source.get("metric") or {}).get("name")
                    if m.get("type") in ("Pods", "External", "Object") and metric:
                        hpa_metrics.append(("%s: HorizontalPodAutoscaler/%s" % (rel, name), metric))
    return uses, adapter_names, hpa_metrics


def rules_uses(root):
    uses, records = [], set()
    for path in sorted(glob.glob(os.path.join(root, "deploy", "prometheus", "*.y*ml"))):
        rel = os.path.relpath(path, root)
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        if not isinstance(doc, dict) or "groups" not in doc:
            continue  # prometheus.yml and friends
        for group in doc["groups"]:
            for rule in group.get("rules") or []:
                label = rule.get("record") or rule.get("alert")
                uses.append(Use("%s: %s" % (rel, label), str(rule["expr"])))
                if rule.get("record"):
                    records.add(rule["record"])
    return uses, records


def dashboard_uses(root):
    uses = []
    for path in sorted(glob.glob(os.path.join(root, "deploy", "grafana", "*.json"))):
        rel = os.path.relpath(path, root)
        with open(path, encoding="utf-8") as f:
            dashboard = json.load(f)

        def walk(panels):
            for p in panels or []:
                for t in p.get("targets") or []:
                    if t.get("expr"):
                        uses.append(Use('%s: panel "%s" %s' % (rel, p.get("title"), t.get("refId")), t["expr"]))
                walk(p.get("panels"))

        walk(dashboard.get("panels"))
        for v in (dashboard.get("templating") or {}).get("list") or []:
            if v.get("type") == "query":
                q = v.get("query")
                q = q.get("query") if isinstance(q, dict) else q
                if q:
                    uses.append(Use("%s: variable %s" % (rel, v.get("name")), q))
    return uses


# ---------------------------------------------------------------------------
# Loose PromQL parsing.

def strip_strings(expr):
    return STRING.sub('""', expr)


def names_in(expr):
    """(metric names, recording rule names) used in an expression."""
    metrics, records = set(), set()
    code = strip_strings(expr)
    for m in IDENT.finditer(code):
        word = m.group(0)
        if m.start() > 0 and code[m.start() - 1] == "$":
            continue  # a Grafana variable
        if word.startswith("switchyard:"):
            records.add(word)
        elif word.startswith("switchyard_") and word != "switchyard_adapter_series":
            metrics.add(word)
    return metrics, records


def selectors_in(expr):
    """[(metric name, [label names in its matchers])] for name{...} selectors."""
    out = []
    for m in re.finditer(r"(switchyard_[A-Za-z0-9_]*)\s*\{([^}]*)\}", expr):
        labels = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", strip_strings(m.group(2)))
        out.append((m.group(1), labels))
    return out


def grouping_labels_in(expr):
    labels = []
    for m in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", strip_strings(expr)):
        labels += [l.strip() for l in m.group(1).split(",") if l.strip()]
    return labels


# ---------------------------------------------------------------------------
# The references.

def parse_docs(path):
    """{metric name: (type, set of labels)} from docs/metrics.md's tables."""
    documented = {}
    row = re.compile(r"^\|\s*`(switchyard_[A-Za-z0-9_]+)`\s*\|\s*([a-z]+)\s*\|([^|]*)\|")
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = row.match(line.strip())
            if not m:
                continue
            cell = re.sub(r"\([^)]*\)", "", m.group(3))  # drop the value lists
            labels = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cell))
            name, kind = m.group(1), m.group(2)
            if name in documented:
                labels |= documented[name][1]
            documented[name] = (kind, labels)
    return documented


def expand_series(documented):
    """Series name -> (metric name, labels), histograms with their suffixes."""
    series = {}
    for name, (kind, labels) in documented.items():
        series[name] = (name, labels)
        if kind == "histogram":
            series[name + "_bucket"] = (name, labels | {"le"})
            series[name + "_sum"] = (name, labels)
            series[name + "_count"] = (name, labels)
    return series


def parse_exposition(path):
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("# TYPE ") or line.startswith("# HELP "):
                parts = line.split()
                if len(parts) >= 3:
                    names.add(parts[2])
            elif line and not line.startswith("#"):
                m = IDENT.match(line)
                if m:
                    names.add(m.group(0))
    return names


def present_in_exposition(name, names):
    if name in names:
        return True
    for suffix in HISTOGRAM_SUFFIXES:  # name_bucket used, family listed by its # TYPE name
        if name.endswith(suffix) and name[: -len(suffix)] in names:
            return True
    return False


# ---------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
                        help="the repository (default: this checkout)")
    parser.add_argument("--docs", help="docs/metrics.md (relative to --root) to check names and labels against")
    parser.add_argument("--metrics", action="append", default=[],
                        help="a /metrics text file to check names against (repeatable: gateway, expert)")
    parser.add_argument("--endpoints", help="a running local cluster's endpoints file: scrape every process")
    parser.add_argument("--promql-out", help="write every expression as a rules file for `promtool check rules`")
    parser.add_argument("--list", action="store_true", help="print every expression and the names it uses")
    args = parser.parse_args()
    root = os.path.abspath(args.root)

    k8s, adapter_names, hpa_metrics = k8s_uses(root)
    rules, records = rules_uses(root)
    uses = k8s + rules + dashboard_uses(root)
    problems, checks = [], 0

    def check(ok, message):
        nonlocal checks
        checks += 1
        if not ok:
            problems.append(message)

    kinds = {"ScaledObject": 0, "ConfigMap": 0, "rules.yml": 0, "grafana": 0}
    for u in uses:
        for k in kinds:
            if k in u.where:
                kinds[k] += 1
    for k, n in kinds.items():
        check(n > 0, "found no PromQL in any %s: is the search broken?" % k)

    docs = args.docs
    if docs and not os.path.isabs(docs):  # relative to --root
        docs = os.path.join(root, docs)
    documented = parse_docs(docs) if docs else None
    if documented is not None:
        check(len(documented) > 0, "%s: no metric tables found" % args.docs)
    series = expand_series(documented) if documented else {}
    metrics_files = list(args.metrics)
    if args.endpoints:
        with open(args.endpoints, encoding="utf-8") as f:
            processes = json.load(f)["processes"]
        scraped = tempfile.mkdtemp(prefix="switchyard-metrics-")
        for i, p in enumerate(processes):
            if not p.get("metrics"):
                check(False, "%s: process %d (%s) lists no metrics address" % (args.endpoints, i, p.get("role")))
                continue
            path = os.path.join(scraped, "%d-%s.txt" % (i, p.get("role")))
            with urllib.request.urlopen("http://%s/metrics" % p["metrics"], timeout=10) as r, open(path, "wb") as out:
                out.write(r.read())
            metrics_files.append(path)
    exposed = [(path, parse_exposition(path)) for path in metrics_files]
    for path, names in exposed:
        check(any(n.startswith("switchyard_") for n in names), "%s: no switchyard_ metrics in it" % path)

    used_metrics = set()
    for u in uses:
        expr = fill_templates(u.expr)
        metrics, used_records = names_in(expr)
        used_metrics |= metrics
        if args.list:
            print("%s\n    %s\n    metrics: %s records: %s" % (u.where, u.expr.strip(), sorted(metrics), sorted(used_records)))
        for r in sorted(used_records):
            check(r in records, "%s: recording rule %s is not defined in deploy/prometheus/rules.yml" % (u.where, r))
        for name in sorted(metrics):
            if documented is not None:
                check(name in series, "%s: %s is not documented in %s" % (u.where, name, args.docs))
            if exposed:
                check(any(present_in_exposition(name, names) for _, names in exposed),
                      "%s: %s is in none of %s" % (u.where, name, ", ".join(p for p, _ in exposed)))
        if documented is not None:
            expression_labels = set(TARGET_LABELS)
            for name, labels in selectors_in(expr):
                if name not in series:
                    continue
                allowed = series[name][1] | TARGET_LABELS
                for label in labels:
                    check(label in allowed, "%s: %s has no label %s (docs: %s)" % (
                        u.where, name, label, ", ".join(sorted(series[name][1])) or "none"))
            for name in metrics:
                if name in series:
                    expression_labels |= series[name][1]
            for label in grouping_labels_in(expr):
                check(label in expression_labels, "%s: groups by %s, which none of its metrics has" % (u.where, label))

    for where, metric in hpa_metrics:
        check(metric in adapter_names, "%s: scales on %s, which no prometheus-adapter rule names (%s)" % (
            where, metric, ", ".join(sorted(adapter_names)) or "none"))

    if args.promql_out:
        rules_doc = {"groups": [{"name": "switchyard-ops-promql-syntax", "rules": [
            {"record": "switchyard_ops:check_%d" % i, "expr": fill_templates(u.expr)} for i, u in enumerate(uses)]}]}
        with open(args.promql_out, "w", encoding="utf-8") as f:
            f.write("# " + "\n# ".join("check_%d: %s" % (i, u.where) for i, u in enumerate(uses)) + "\n")
            yaml.safe_dump(rules_doc, f, sort_keys=False, width=1000)

    for p in problems:
        print("FAIL: %s" % p)
    print("check_metric_names: %d expressions, %d metric names (%s); %d recording rules defined" % (
        len(uses), len(used_metrics), ", ".join(sorted(used_metrics)), len(records)))
    against = (["docs " + args.docs] if args.docs else []) + ["metrics " + p for p, _ in exposed]
    print("checked against: %s" % (", ".join(against) or "rules.yml and prometheus-adapter rules only"))
    print("%d passed, %d failed" % (checks - len(problems), len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
