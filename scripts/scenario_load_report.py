#!/usr/bin/env python3
"""Scenario test: load that the nodes report (`kylin_load_report`), against Kylin stand-ins.

nginx with two workers in front of three stand-ins (scripts/kylin_node.py: 2 query slots
each, a queue, and /kylin/api/prometheus with spark_tasks{state="pending"} = queries waiting
for a slot). One node, H, is saturated by queries that do not pass through this nginx (the
stand-in's background load, as another nginx or a direct user would bring). Three upstreams
over the same nodes: `reported` (kylin_load_report, default busy= pending > 0), `missing`
(kylin_load_report on a page without the metric) and `plain` (no report). Checks:
  1. fresh      - before the outside load every report is fresh and calm, and used;
  2. saturated  - the status page shows H saturated within a few intervals of the load;
  3. moves      - a busy client (one request in flight all the time) whose home is H moves
                  off it through `reported`, although this nginx alone never makes H hot;
                  the status page counts it in moved_clients;
  4. no report  - the same kind of client stays on H through `missing` and `plain` (a
                  missing report, or none, changes nothing);
  5. stale      - once H's metrics page stops reporting, after `stale` its report is stale
                  and not used, and a new busy client whose home is H stays there;
  6. reload     - `nginx -s reload` keeps every server's report and counts, and the new
                  workers' prober goes on fetching;
  7. status     - the document validates against schema/kylin_status.schema.json and the
                  Prometheus text is well formed, with the load-report metrics;
  8. no alerts or crashes in the error log; graceful stop.

Usage: scenario_load_report.py --nginx PATH --module PATH [--keep]
Prints one line per check and "scenario-load-report: N passed, M failed"; exits 1 on failure.
"""
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenario import free_ports, scenario_main, start_nginx, status_problems, stop_nginx, wait_port  # noqa: E402

INTERVAL_MS = 200
STALE_MS = 1000
DELAY = 0.1

CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    kylin_upstream reported {{
        zone reported 64k;
        kylin_hash $http_x_client;
{servers}
        kylin_load_report interval={interval}ms timeout=500ms stale={stale}ms;
    }}
    kylin_upstream missing {{
        zone missing 64k;
        kylin_hash $http_x_client;
{servers}
        kylin_load_report uri=/kylin/api/none interval={interval}ms timeout=500ms stale={stale}ms;
    }}
    kylin_upstream plain {{
        zone plain 64k;
        kylin_hash $http_x_client;
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_read_timeout 10s;
        location /reported/ {{ proxy_pass http://reported/; }}
        location /missing/ {{ proxy_pass http://missing/; }}
        location /plain/ {{ proxy_pass http://plain/; }}
        location = /status {{ kylin_status; }}
    }}
}}
"""


def get(port, path, client=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    c.request("GET", path, headers={"X-Client": client} if client else {})
    r = c.getresponse()
    body = r.read().decode()
    c.close()
    return r.status, body


def node_of(body):
    try:
        return json.loads(body).get("node")
    except ValueError:
        return None


class Scenario:
    def __init__(self, nginx, module, keep):
        self.nginx, self.module, self.keep = nginx, module, keep
        self.results = []
        *self.ports, self.port = free_ports(4)
        self.names = ["node1", "node2", "node3"]
        args = [sys.executable, os.path.join(HERE, "kylin_node.py"), "--slots", "2", "--delay", str(DELAY),
                "--background-ms", "300"]
        for p in self.ports:
            args += ["--port", str(p)]
        self.nodes = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        for p in self.ports:
            wait_port(p)

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s: %s (%s)" % ("ok" if ok else "FAILED", name, detail))
        sys.stdout.flush()

    def conf(self):
        servers = "\n".join("        server 127.0.0.1:%d;" % p for p in self.ports)
        return CONF.format(module=self.module, port=self.port, servers=servers, interval=INTERVAL_MS, stale=STALE_MS)

    def status(self):
        return json.loads(get(self.port, "/status")[1])

    def report(self, upstream, node):
        addr = "127.0.0.1:%d" % self.ports[self.names.index(node)]
        for s in self.status()["upstreams"][upstream]["servers"]:
            if s["address"] == addr:
                return s["load_report"]
        return None

    def background(self, node, **q):
        port = self.ports[self.names.index(node)]
        get(port, "/__background?" + "&".join("%s=%s" % kv for kv in q.items()))

    def until(self, cond, limit):
        start = time.time()
        while time.time() - start < limit:
            if cond():
                return time.time() - start
            time.sleep(0.05)
        return None

    def busy_client(self, prefix, client, seconds, out):
        """One request in flight all the time for `seconds`: (time, node) of each answer."""
        end = time.time() + seconds
        while time.time() < end:
            status, body = get(self.port, prefix + "slow", client)
            out.append((time.time(), node_of(body) if status == 200 else "status %d" % status))

    def run(self):
        prefix, master = start_nginx(self.nginx, self.conf(), self.port, "kylin-scenario-load-report-")
        try:
            self.body(prefix, master)
        finally:
            bad = stop_nginx(prefix, master, self.keep)
            self.check("no alerts or crashes in the error log; graceful stop", not bad, "%s" % bad[:3])

    def body(self, prefix, master):
        time.sleep(INTERVAL_MS / 1000.0 * 3)
        # Clients by home node (plain never moves anyone).
        homes = {}
        for k in range(300):
            c = "c%d" % k
            homes.setdefault(node_of(get(self.port, "/plain/", c)[1]), []).append(c)
        h = max((n for n in self.names if n in homes), key=lambda n: len(homes[n]))
        c_move, c_missing, c_plain, c_stale = homes[h][:4]

        # 1. Every report fresh and calm.
        reps = [self.report("reported", n) for n in self.names]
        self.check("fresh: before any outside load every node's report is fresh, calm and used",
                   all(r and r["state"] == "fresh" and r["used"] for r in reps), "%s" % [(r or {}).get("state") for r in reps])
        miss = self.report("missing", h)
        self.check("fresh: a page without the metric is a missing report, not used",
                   miss and miss["state"] == "missing" and not miss["used"] and miss["last_failure_reason"] == "no metric",
                   "%s" % ({k: miss.get(k) for k in ("state", "used", "last_failure_reason")} if miss else None))

        # 2. Saturate H from outside this nginx: 3 background query loops for its 2 slots.
        self.background(h, threads=3)
        took = self.until(lambda: (self.report("reported", h) or {}).get("state") == "saturated", 3.0)
        r = self.report("reported", h) or {}
        self.check("saturated: the status page shows %s saturated by load that bypasses nginx" % h, took is not None,
                   "after %s s; pending = %s" % (None if took is None else round(took, 2), [c.get("value") for c in r.get("conditions", [])]))

        # 3 and 4. Three busy clients whose home is H, through each upstream, at once.
        runs = {"reported": [], "missing": [], "plain": []}
        threads = [threading.Thread(target=self.busy_client, args=("/%s/" % u, c, 6.0, runs[u]))
                   for u, c in (("reported", c_move), ("missing", c_missing), ("plain", c_plain))]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        moved = runs["reported"]
        first_off = next((t - t0 for t, n in moved if n != h), None)
        tail = [n for t, n in moved if t - t0 > 4.0]
        self.check("moves: the busy client whose home %s reports saturation moves off it, and stays off" % h,
                   first_off is not None and tail and all(n != h for n in tail),
                   "first answer off %s after %s s; last 2 s: %s" % (h, None if first_off is None else round(first_off, 2), sorted(set(tail))))
        up = self.status()["upstreams"]["reported"]
        self.check("moves: the status page counts the moved client", (up.get("moved_clients") or 0) >= 1,
                   "moved_clients %s" % up.get("moved_clients"))
        for u in ("missing", "plain"):
            where = sorted(set(n for _, n in runs[u]))
            self.check("no report: through %s the same kind of client stays on %s" % (u, h), where == [h],
                       "%d answers from %s" % (len(runs[u]), where))

        # 5. H stops reporting: stale after STALE_MS, and a new busy client stays home.
        self.background(h, threads=3, metrics="off")
        took = self.until(lambda: (self.report("reported", h) or {}).get("state") == "stale", 3.0)
        r = self.report("reported", h) or {}
        self.check("stale: once %s stops reporting its report turns stale and is not used" % h,
                   took is not None and not r.get("used"), "after %s s; age %s s, last failure %s" % (
                       None if took is None else round(took, 2), r.get("age"), r.get("last_failure_reason")))
        out = []
        self.busy_client("/reported/", c_stale, 4.0, out)
        where = sorted(set(n for _, n in out))
        self.check("stale: a new busy client whose home is %s stays there (its load is real, but unreported)" % h,
                   where == [h], "%d answers from %s" % (len(out), where))

        # 6. A reload keeps every report (the slots are kept by name), and the prober goes on.
        before = {n: (self.report("reported", n) or {}).get("fetches", 0) for n in self.names}
        with open(os.path.join(prefix, "nginx.conf"), "w") as f:
            f.write(("user root;\n" if os.geteuid() == 0 else "") + self.conf())
        os.kill(master, signal.SIGHUP)
        time.sleep(1.0)
        after = {n: (self.report("reported", n) or {}).get("fetches", 0) for n in self.names}
        r = self.report("reported", h) or {}
        self.check("reload: every report is kept and fetched on (counts go on, %s still stale)" % h,
                   all(after[n] > before[n] > 0 for n in self.names) and r.get("state") == "stale",
                   "fetches before %s, after %s; %s %s" % (before, after, h, r.get("state")))

        # 7. Status document and Prometheus text.
        doc = self.status()
        prom = get(self.port, "/status?format=prometheus")[1]
        problems = status_problems(doc, prom)
        self.check("status: the document validates, the Prometheus text is well formed and has the report metrics",
                   not problems and "kylin_server_load_report{" in prom and "kylin_server_load_report_value{" in prom,
                   "%s" % problems[:3])
        self.background(h, threads=0, metrics="on")

    def cleanup(self):
        self.nodes.terminate()
        try:
            self.nodes.wait(5)
        except subprocess.TimeoutExpired:
            self.nodes.kill()


if __name__ == "__main__":
    sys.exit(scenario_main("scenario-load-report", Scenario))
