#!/usr/bin/env python3
"""Scenario test: active health checks (`kylin_health_check`) against Kylin stand-ins.

nginx with two workers in front of three stand-ins that serve /kylin/api/health like a
Kylin 5 node (200 {"status":"UP"}, 503 {"status":"DOWN"}, an answer that never comes, a
connection closed without an answer) and keep their sessions to themselves (any other node
answers a session it did not create with 401). Checks:
  1. spread     - with every node UP, requests from forty client addresses reach all three;
  2. down       - a node whose health turns DOWN stops getting new requests within
                  (fails + 1) x interval (+ slack for these busy cores), with every worker;
  3. sessions   - meanwhile the requests of a session that lives there go to another node
                  (a node-local session is lost, as when a node dies), and return to their
                  node once it is UP again for `passes` checks;
  4. hang, close - a node that never answers its check, or closes the connection, turns
                  unhealthy with reason "timeout" / "closed";
  5. one prober - the probes reach each node at one per interval (one process probes, not one
                  per worker), on kept-alive connections (a handful per node in the run);
  6. reload     - `nginx -s reload` keeps every node's state and counts (an unhealthy node
                  takes nothing right after it); a reload that removes a node and one that
                  adds it back start it afresh;
  7. status     - the document validates against schema/kylin_status.schema.json and shows
                  health state, consecutive failures and the last failure's reason;
  8. no leaks   - at the end nginx holds at most one connection per node (the probes'), and
                  stops gracefully; no alert or crash in the error log.

Usage: scenario_health.py --nginx PATH --module PATH [--keep]
Prints one line per check and "scenario-health: N passed, M failed"; exits 1 on failure.
"""
import http.client
import http.server as httpserver
import itertools
import json
import os
import re
import signal
import socket
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenario import free_ports, scenario_main, start_nginx, status_problems, stop_nginx  # noqa: E402

INTERVAL = 0.2
TIMEOUT = 0.3
FAILS = 2
PASSES = 2

CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    kylin_upstream kylin_nodes {{
        zone kylin_nodes 64k;
{servers}
        kylin_health_check interval={interval}ms timeout={timeout}ms fails={fails} passes={passes} 'body="status":"UP"';
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        proxy_read_timeout 2s;
        location / {{ proxy_pass http://kylin_nodes; }}
        location = /status {{ kylin_status; }}
    }}
}}
"""

IDS = itertools.count(1)


class Node(httpserver.ThreadingHTTPServer):
    """A Kylin stand-in: HTTP/1.1 with keep-alive; `health` is UP, DOWN, hang or close;
    `queries` "500" fails every query."""

    daemon_threads = True

    def __init__(self, port, name):
        self.name, self.health = name, "UP"
        # "500": queries are answered with HTTP 500 (a node that fails requests, not probes).
        self.queries = "ok"
        self.sessions = set()
        self.probes = 0
        self.probe_conns = set()
        # Connections on which probes came that are still open (nginx 1.31+ also keeps the
        # proxied requests' connections alive: those are not counted).
        self.open_probe_conns = set()
        self.lock = threading.Lock()
        node = self

        class Handler(httpserver.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # Headers and body go out in two writes: without this, Nagle and delayed
                # ACKs stall each answer on a kept-alive connection by 40 ms.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def finish(self):
                with node.lock:
                    node.open_probe_conns.discard(id(self))
                super().finish()

            def do_GET(self):
                if self.path == "/kylin/api/health":
                    with node.lock:
                        node.probes += 1
                        node.probe_conns.add(id(self.connection))
                        node.open_probe_conns.add(id(self))
                    mode = node.health
                    if mode == "hang":
                        time.sleep(TIMEOUT * 4)
                        self.close_connection = True
                        return
                    if mode == "close":
                        self.close_connection = True
                        return
                    up = mode == "UP"
                    return self.reply(200 if up else 503, json.dumps({"status": "UP" if up else "DOWN", "components": {"metaStore": {"status": "UP"}}}, separators=(",", ":")).encode())
                if node.queries == "500":
                    return self.reply(500, node.name.encode())
                m = re.search(r"JSESSIONID=([0-9A-F]+)", self.headers.get("Cookie", ""))
                if self.path.startswith("/login"):
                    sid = "%032X" % next(IDS)
                    node.sessions.add(sid)
                    return self.reply(200, node.name.encode(), [("Set-Cookie", "JSESSIONID=%s; Path=/" % sid)])
                return self.reply(200 if not m or m.group(1) in node.sessions else 401, node.name.encode())

            def reply(self, status, body, headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def get(port, path, addr, sid=None):
    """One request on its own connection: (status, body, session cookie set)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"X-Real-IP": addr, "Connection": "close"}
    if sid:
        headers["Cookie"] = "JSESSIONID=" + sid
    c.request("GET", path, headers=headers)
    r = c.getresponse()
    body = r.read().decode()
    cookie = r.getheader("Set-Cookie")
    c.close()
    m = re.search(r"JSESSIONID=([0-9A-F]+)", cookie or "")
    return r.status, body, m.group(1) if m else None


class Scenario:
    def __init__(self, nginx, module, keep):
        self.nginx, self.module, self.keep = nginx, module, keep
        self.results = []
        *ports, self.port = free_ports(4)
        self.ports = ports
        self.nodes = [Node(p, "n%d" % i) for i, p in enumerate(ports)]

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s: %s (%s)" % ("ok" if ok else "FAILED", name, detail))
        sys.stdout.flush()

    def conf(self, nodes=(0, 1, 2)):
        servers = "\n".join("        server 127.0.0.1:%d;" % self.ports[i] for i in nodes)
        return CONF.format(module=self.module, port=self.port, servers=servers, interval=int(INTERVAL * 1000),
                           timeout=int(TIMEOUT * 1000), fails=FAILS, passes=PASSES)

    def reload(self, prefix, master, nodes=(0, 1, 2)):
        with open(os.path.join(prefix, "nginx.conf"), "w") as f:
            f.write(("user root;\n" if os.geteuid() == 0 else "") + self.conf(nodes))
        os.kill(master, signal.SIGHUP)
        # The new workers run once the old ones exit (they have nothing in flight).
        time.sleep(0.5)

    def status(self):
        _, body, _ = get(self.port, "/status", "127.0.0.1")
        return json.loads(body)

    def health(self, i):
        addr = "127.0.0.1:%d" % self.ports[i]
        for s in self.status()["upstreams"]["kylin_nodes"]["servers"]:
            if s["address"] == addr:
                return s
        return None

    def spread(self, n=40, tag=0):
        """Where session-less requests from n client addresses go."""
        return [get(self.port, "/q", "10.%d.%d.7" % (tag, a))[1] for a in range(n)]

    def until(self, cond, limit):
        """Polls cond() until true or `limit` seconds: the time it took, or None."""
        start = time.time()
        while time.time() - start < limit:
            if cond():
                return time.time() - start
            time.sleep(0.02)
        return None

    def run(self):
        prefix, master = start_nginx(self.nginx, self.conf(), self.port, "kylin-scenario-health-")
        try:
            self.body(prefix, master)
        finally:
            bad = stop_nginx(prefix, master, self.keep)
            self.check("no alerts or crashes in the error log; graceful stop", not bad, "%s" % bad[:3])

    def body(self, prefix, master):
        n0, n1, n2 = self.nodes
        time.sleep(INTERVAL * 3)
        got = self.spread()
        self.check("spread: with every node UP, forty client addresses reach all three", set(got) == {"n0", "n1", "n2"},
                   "went to %s" % sorted(set(got)))

        # A session that lives on n0.
        sid = None
        for a in range(200):
            status, node, cookie = get(self.port, "/login", "10.50.%d.1" % a)
            if node == "n0":
                sid = cookie
                break
        probes_at, t_probes = n0.probes, time.time()

        # 2. n0 turns DOWN: measure when the last new request reached it.
        n0.health = "DOWN"
        t0 = time.time()
        last_n0 = 0.0
        deadline = t0 + (FAILS + 1) * INTERVAL * 4
        session_nodes = []
        while time.time() < deadline:
            for a in range(10):
                if get(self.port, "/q", "10.60.%d.%d" % (a, int((time.time() - t0) * 10) % 250))[1] == "n0":
                    last_n0 = time.time() - t0
            session_nodes.append(get(self.port, "/q", "10.70.0.1", sid)[:2])
        bound = (FAILS + 1) * INTERVAL + 0.3
        self.check("down: a node whose health turns DOWN gets no new request within (fails + 1) x interval",
                   last_n0 < bound, "last request to n0 %.2f s after it turned DOWN (bound %.2f s, fails=%d interval=%.1fs)" % (last_n0, bound, FAILS, INTERVAL))
        s = self.health(0)
        h = s["health"] if s else {}
        self.check("down: the status page shows it unhealthy, with its failures and reason",
                   s and s["state"] == "unhealthy" and h.get("state") == "unhealthy" and h.get("consecutive_failures", 0) >= FAILS
                   and h.get("last_failure_reason") == "status 503",
                   "state %s, health %s" % (s and s["state"], {k: h.get(k) for k in ("state", "consecutive_failures", "last_failure_reason")}))
        late = [x for x in session_nodes[len(session_nodes) // 2:]]
        self.check("sessions: requests of a session living on the unhealthy node go to another node (node-local: 401)",
                   sid is not None and late and all(node != "n0" and status == 401 for status, node in late),
                   "%d of the last %d went to n0; statuses %s" % (sum(1 for _, n in late if n == "n0"), len(late), sorted({st for st, _ in late})))

        # n0 comes back: the session returns to it after `passes` checks.
        n0.health = "UP"
        back = self.until(lambda: get(self.port, "/q", "10.70.0.1", sid)[:2] == (200, "n0"), 5)
        self.check("sessions: back on their node once it is UP again", back is not None and back < (PASSES + 1) * INTERVAL + 0.5,
                   "after %s s (passes=%d)" % (back and round(back, 2), PASSES))
        elapsed = time.time() - t_probes
        rate = (n0.probes - probes_at) / elapsed
        self.check("one prober: probes reach a node once per interval, whatever the number of workers",
                   0.6 / INTERVAL <= rate <= 1.3 / INTERVAL, "%.1f probes/s with interval %.1fs and 2 workers" % (rate, INTERVAL))

        # 4. hang, close.
        n1.health = "hang"
        t = self.until(lambda: (self.health(1) or {}).get("state") == "unhealthy", 5)
        h = (self.health(1) or {}).get("health") or {}
        self.check("hang: a node that never answers its check turns unhealthy, reason timeout",
                   t is not None and h.get("last_failure_reason") == "timeout", "after %s s, reason %s" % (t and round(t, 2), h.get("last_failure_reason")))
        n2.health = "close"
        t = self.until(lambda: (self.health(2) or {}).get("state") == "unhealthy", 5)
        h = (self.health(2) or {}).get("health") or {}
        self.check("close: a node that closes the connection unanswered turns unhealthy, reason closed",
                   t is not None and h.get("last_failure_reason") == "closed", "after %s s, reason %s" % (t and round(t, 2), h.get("last_failure_reason")))
        got = self.spread(tag=1)
        self.check("only the healthy node takes requests", set(got) == {"n0"}, "went to %s" % sorted(set(got)))
        n2.health = "UP"
        self.until(lambda: (self.health(2) or {}).get("state") == "up", 5)
        # n0 stayed up for a while: its probes came on a handful of connections.
        self.check("keep-alive: the probes of a node reuse their connection", len(n0.probe_conns) <= 4,
                   "%d probes to n0 on %d connections" % (n0.probes, len(n0.probe_conns)))

        # 6. reload with the same servers, n1 still hanging (unhealthy).
        before = self.health(1)["health"]["checks"]
        self.reload(prefix, master)
        after_reload = [get(self.port, "/q", "10.80.%d.1" % a)[1] for a in range(20)]
        s1 = self.health(1)
        self.check("reload: an unhealthy node stays unhealthy, its counts go on",
                   s1["state"] == "unhealthy" and s1["health"]["checks"] >= before and "n1" not in after_reload,
                   "state %s, checks %d -> %d, right after the reload requests went to %s" % (s1["state"], before, s1["health"]["checks"], sorted(set(after_reload))))
        # A reload that removes n1, then one that adds it back: it starts afresh.
        self.reload(prefix, master, (0, 2))
        gone = self.health(1)
        n1.health = "UP"
        self.reload(prefix, master)
        s1 = self.health(1)
        self.check("reload: a node removed and added again starts afresh",
                   gone is None and s1 is not None and s1["health"]["checks"] < before,
                   "listed while removed: %s; checks before %d, after re-adding %s" % (gone is not None, before, s1 and s1["health"]["checks"]))
        t = self.until(lambda: set(self.spread(20, tag=2)) == {"n0", "n1", "n2"}, 5)
        self.check("all nodes back: requests spread over all three again", t is not None, "after %s s" % (t and round(t, 2)))

        # 7. status.
        doc = self.status()
        _, prom, _ = get(self.port, "/status?format=prometheus", "127.0.0.1")
        problems = status_problems(doc, prom)
        self.check("status: the document validates, the Prometheus text is well formed and has the health metrics",
                   not problems and "kylin_server_health{" in prom and "kylin_server_health_checks_total{" in prom, "%s" % problems[:3])

        # 8. connections held open by the probes: at most one per node.
        time.sleep(INTERVAL * 2)
        held = [len(n.open_probe_conns) for n in self.nodes]
        self.check("no leaks: the probes hold at most one connection per node", all(v <= 1 for v in held),
                   "open probe connections per node: %s" % held)

    def cleanup(self):
        for n in self.nodes:
            n.shutdown()


if __name__ == "__main__":
    sys.exit(scenario_main("scenario-health", Scenario))
