#!/usr/bin/env python3
"""Checks the monitoring files (monitoring/) against the module's real metrics.

  1. rules      - `promtool check rules` on the alerting rules and `promtool test rules` on
                  their unit tests (each alert fires on what should wake someone, not on its
                  near misses);
  2. model      - the Grafana dashboard model is what monitoring/make_grafana_dashboard.py
                  makes, and well formed: unique panel ids, a grid of 24 columns without
                  overlaps, every query on the dashboard's Prometheus data source, every
                  variable it uses defined;
  3. scrape     - nginx with the module (a bounded upstream with a backup, learned routes, a
                  session store whose Redis is down) serves known traffic; its Prometheus text
                  passes `promtool check metrics`;
  4. names      - every metric named by a dashboard query, a dashboard variable or an alert
                  rule is one that scrape exports;
  5. prometheus - a real Prometheus scrapes nginx as README's prometheus.yml does
                  (`params: format: [prometheus]`); every dashboard query evaluated there
                  (variables set to "All") is valid PromQL and returns data; the breaker-open
                  alert's expression finds the store whose Redis is down, and the alerts that
                  must stay silent here (no node over its bound, an upstream with live nodes,
                  a load zone with room) return nothing.

Usage: check_monitoring.py --nginx PATH --module PATH [--promtool PATH] [--prometheus PATH] [--keep]
Prints one line per check and "check-monitoring: N passed, M failed"; exits 1 on failure. About 20 s.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
MON = os.path.join(HERE, "..", "monitoring")
RULES = os.path.join(MON, "kylin-alerts.yml")
RULE_TESTS = os.path.join(MON, "kylin-alerts.test.yml")
DASHBOARD = os.path.join(MON, "grafana-kylin-dashboard.json")
sys.path.insert(0, HERE)
from scenario import StandIn, free_ports, start_nginx, stop_nginx, wait_port  # noqa: E402

CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log warn;
pid logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    kylin_upstream kylin_nodes {{
        zone kylin_nodes 64k;
        kylin_balance_factor 1.25;
        server 127.0.0.1:{n0};
        server 127.0.0.1:{n1};
        server 127.0.0.1:{dead} backup;
    }}
    kylin_upstream kylin_shared {{
        kylin_session_store redis://127.0.0.1:{dead} format=tomcat timeout=200ms fail_threshold=1;
        server 127.0.0.1:{n0};
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / {{ proxy_pass http://kylin_nodes; }}
        location /shared/ {{ proxy_pass http://kylin_shared/; }}
        location = /kylin-status {{ kylin_status; }}
    }}
}}
"""

PROMETHEUS_YML = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: kylin-nginx
    metrics_path: /kylin-status
    params:
      format: [prometheus]
    static_configs:
      - targets: ['127.0.0.1:{port}']
"""

# Alerts whose expressions must find nothing on this scrape, and the one that must fire.
SILENT = ["KylinNodeOverBound", "KylinNodeHot", "KylinNoLiveServers", "KylinSessionRoutesEvicting", "KylinLoadZoneFull", "KylinStatusDown"]
FIRING = {"KylinSessionStoreBreakerOpen": {"upstream": "kylin_shared", "state": "open"}}

NAME = re.compile(r"\bkylin_[a-z_]+\b")


def node(name):
    def answer(path, headers):
        if path.startswith("/login"):
            return 200, [("Set-Cookie", "JSESSIONID=%s0000000000000000000000000001; Path=/" % name.upper())], name.encode()
        return 200, [], name.encode()
    return answer


def get(port, path, addr="127.0.0.1", sid=None, timeout=10):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path))
    req.add_header("X-Real-IP", addr)
    if sid:
        req.add_header("Cookie", "JSESSIONID=" + sid)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def queries(model):
    """(where, expr) of every query of the dashboard and its variables."""
    out = []
    for p in model.get("panels", []):
        for t in p.get("targets", []):
            out.append(("panel %r %s" % (p.get("title"), t.get("refId")), t.get("expr", "")))
    for v in model.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            out.append(("variable %s" % v["name"], q.get("query") if isinstance(q, dict) else q))
    return out


def alert_exprs():
    """{alert: expr} of the rules file (its layout: `- alert:` then `expr:`, one line or a block)."""
    with open(RULES) as f:
        text = f.read()
    alerts = {}
    for m in re.finditer(r"- alert: (\w+)\n\s+expr: (\|\n(?:\s{10,}.*\n)+|.*\n)", text):
        expr = m.group(2)
        if expr.startswith("|"):
            expr = " ".join(l.strip() for l in expr.splitlines()[1:])
        alerts[m.group(1)] = expr.strip()
    if len(alerts) != text.count("- alert:"):
        raise RuntimeError("could not read every alert of %s" % RULES)
    return alerts


def model_problems(model):
    bad = []
    ids = [p.get("id") for p in model.get("panels", [])]
    if len(ids) != len(set(ids)) or None in ids:
        bad.append("panel ids not unique: %s" % ids)
    cells = {}
    for p in model.get("panels", []):
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
            bad.append("panel %r: bad gridPos %s" % (p.get("title"), g))
            continue
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    bad.append("panels %r and %r overlap" % (cells[(x, y)], p.get("title")))
                    break
                cells[(x, y)] = p.get("title")
            else:
                continue
            break
        if p.get("type") != "row":
            if not p.get("targets"):
                bad.append("panel %r has no query" % p.get("title"))
            for t in p.get("targets", []) + [p]:
                if (t.get("datasource") or {}).get("uid") != "${datasource}":
                    bad.append("panel %r: not on the dashboard's data source" % p.get("title"))
    names = {v["name"] for v in model.get("templating", {}).get("list", [])}
    if "datasource" not in names:
        bad.append("no datasource variable")
    for where, expr in queries(model):
        for var in re.findall(r"\$\{?(\w+)", expr):
            if not var.startswith("__") and var not in names:
                bad.append("%s uses undefined variable $%s" % (where, var))
    if not model.get("uid") or not model.get("title"):
        bad.append("no uid or title")
    return bad


def prom_query(port, expr):
    url = "http://127.0.0.1:%d/api/v1/query?%s" % (port, urllib.parse.urlencode({"query": expr}))
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def concrete(expr):
    """A dashboard query as Grafana sends it with every variable at "All"."""
    return expr.replace("$__rate_interval", "10s").replace("$instance", ".*").replace("$upstream", ".*")


class Check:
    def __init__(self, args):
        self.args = args
        self.results = []

    def check(self, name, ok, detail):
        self.results.append(bool(ok))
        print("%s: %s (%s)" % ("ok" if ok else "FAILED", name, detail))

    def run(self):
        a = self.args
        r = subprocess.run([a.promtool, "check", "rules", RULES], capture_output=True, text=True)
        self.check("rules", r.returncode == 0, (r.stdout + r.stderr).strip().replace("\n", " "))
        r = subprocess.run([a.promtool, "test", "rules", os.path.basename(RULE_TESTS)], capture_output=True, text=True, cwd=MON)
        self.check("rule tests", r.returncode == 0, (r.stdout + r.stderr).strip().replace("\n", " ")[-2000:])

        with open(DASHBOARD) as f:
            model = json.load(f)
        r = subprocess.run([sys.executable, os.path.join(MON, "make_grafana_dashboard.py"), "--check"], capture_output=True, text=True)
        self.check("model generated", r.returncode == 0, (r.stdout + r.stderr).strip() or "the committed model is what make_grafana_dashboard.py makes")
        bad = model_problems(model)
        self.check("model", not bad, "; ".join(bad) or "%d panels, %d queries" % (len(model["panels"]), len(queries(model))))

        *nodes, dead, port = free_ports(4)
        standins = [StandIn(p, node("n%d" % i)) for i, p in enumerate(nodes)]
        conf = CONF.format(module=a.module, port=port, dead=dead, n0=nodes[0], n1=nodes[1])
        prefix, master = start_nginx(a.nginx, conf, port, "kylin-monitoring-")
        prom = None
        tmp = tempfile.mkdtemp(prefix="kylin-prometheus-")
        try:
            # Known traffic: logins (learned routes), session-less requests, one request through
            # the store whose Redis is down (its breaker opens).
            for i in range(4):
                get(port, "/login", "10.1.%d.1" % i)
            for i in range(40):
                get(port, "/q", "10.2.%d.%d" % (i, i + 1))
            try:
                get(port, "/shared/q", "10.3.0.1", "5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01")
            except OSError:
                pass
            text = get(port, "/kylin-status?format=prometheus")
            exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
            with open(os.path.join(tmp, "scrape.txt"), "w") as f:
                f.write(text)
            r = subprocess.run([a.promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            self.check("scrape", r.returncode == 0 and len(exported) > 20,
                       "%d metric names exported; promtool check metrics: %s" % (len(exported), (r.stdout + r.stderr).strip() or "no problem"))

            alerts = alert_exprs()
            named = {}
            for where, expr in queries(model):
                for n in NAME.findall(expr):
                    named.setdefault(n, where)
            for alert, expr in alerts.items():
                for n in NAME.findall(expr):
                    named.setdefault(n, alert)
            missing = sorted("%s (%s)" % (n, w) for n, w in named.items() if n not in exported)
            unused = sorted(exported - set(named))
            self.check("names", not missing and named,
                       ("not exported: " + ", ".join(missing)) if missing else
                       "%d names used, all exported; exported but on no panel or rule: %s" % (len(named), ", ".join(unused) or "none"))

            # A real Prometheus scraping nginx as README says.
            (pport,) = free_ports(1)
            with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
                f.write(PROMETHEUS_YML.format(port=port))
            log = open(os.path.join(tmp, "prometheus.log"), "w")
            prom = subprocess.Popen([a.prometheus, "--config.file=" + os.path.join(tmp, "prometheus.yml"),
                                     "--storage.tsdb.path=" + os.path.join(tmp, "data"),
                                     "--web.listen-address=127.0.0.1:%d" % pport],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if not wait_port(pport, 30):
                raise RuntimeError("Prometheus did not start: see %s" % log.name)
            # Traffic while it scrapes, so that rates have something to measure.
            deadline = time.time() + 30
            samples = 0
            i = 0
            while time.time() < deadline:
                get(port, "/q", "10.4.%d.1" % (i % 200))
                i += 1
                if i % 10 == 0:
                    res = prom_query(pport, 'count_over_time(up{job="kylin-nginx"}[1m])').get("data", {}).get("result", [])
                    samples = int(float(res[0]["value"][1])) if res else 0
                    if samples >= 8:
                        break
                time.sleep(0.05)
            up = prom_query(pport, 'up{job="kylin-nginx"}').get("data", {}).get("result", [])
            self.check("prometheus scrape", samples >= 8 and up and up[0]["value"][1] == "1",
                       "%d scrapes of /kylin-status?format=prometheus, up = %s" % (samples, up and up[0]["value"][1]))
            bad, empty = [], []
            for where, expr in queries(model):
                if where.startswith("variable"):
                    m = re.match(r"label_values\((.*), *(\w+)\)$", expr)
                    if not m:
                        bad.append("%s: %s" % (where, expr))
                        continue
                    expr = m.group(1)
                res = prom_query(pport, concrete(expr))
                if res.get("status") != "success":
                    bad.append("%s: %s" % (where, res.get("error")))
                elif not res["data"]["result"]:
                    empty.append(where)
            self.check("dashboard queries", not bad and not empty,
                       "; ".join(bad + ["no data: " + w for w in empty]) or "%d queries valid, each with data" % len(queries(model)))

            wrong = []
            for name in SILENT:
                res = prom_query(pport, alerts.get(name, "vector(1)"))
                if res.get("status") != "success" or res["data"]["result"]:
                    wrong.append("%s: %s" % (name, res.get("error") or res["data"]["result"]))
            for name, labels in FIRING.items():
                res = prom_query(pport, alerts.get(name, "vector(0) == 1"))
                got = [r["metric"] for r in res.get("data", {}).get("result", [])]
                if not any(all(g.get(k) == v for k, v in labels.items()) for g in got):
                    wrong.append("%s found %s, wanted %s" % (name, got, labels))
            self.check("alerts on the scrape", not wrong and set(alerts) == set(SILENT) | set(FIRING),
                       "; ".join(wrong) or "%s silent, %s firing, as they should (every rule is one or the other)" % (", ".join(SILENT), ", ".join(FIRING)))
        finally:
            if prom:
                try:
                    os.killpg(prom.pid, 15)
                    prom.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    os.killpg(prom.pid, 9)
            for s in standins:
                s.shutdown()
            bad = stop_nginx(prefix, master, a.keep)
            self.check("error log", not bad, "; ".join(bad) or "nothing alarming")
            if a.keep:
                print("kept", tmp)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--promtool", default=shutil.which("promtool") or "/usr/bin/promtool")
    ap.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    c = Check(args)
    try:
        c.run()
    except Exception as e:
        c.check("monitoring", False, "aborted: %r" % (e,))
    passed = sum(c.results)
    failed = len(c.results) - passed
    print("check-monitoring: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
