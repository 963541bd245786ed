#!/usr/bin/env python3
"""Scenario test: draining a node at run time through `kylin_status write=on` (any nginx).

nginx with two workers in front of three Kylin stand-ins whose sessions live on the node that
created them (any other node answers 401). Twelve users log in; then one node is drained by a
POST to the status location. Checks:
  1. at once     - from the next request on, through either worker, logins and session-less
                   requests from forty client addresses never reach the drained node;
  2. sessions    - every user's queries, from any client address, still reach the node that
                   holds the session (no 401), the drained one included;
  3. status      - the status page shows the node draining, and the number of learned
                   sessions it still holds (the operator's signal that it may be stopped);
  4. reload      - after `nginx -s reload` the node is still draining and keeps its sessions;
  5. removal     - a reload that removes the node and one that adds it back clear the mark;
  6. undrain     - a drained node undrained takes new requests again;
and no alert or crash in the error log.

Usage: scenario_runtime_drain.py --nginx PATH --module PATH [--keep]
Prints one line per check and "scenario-runtime-drain: N passed, M failed"; exits 1 on failure.
"""
import http.client
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenario import free_ports, scenario_main, start_nginx, status_problems, stop_nginx  # noqa: E402
from scenario_health import Node, get  # noqa: E402

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
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / {{ proxy_pass http://kylin_nodes; }}
        location = /status {{ kylin_status write=on; allow 127.0.0.1; deny all; }}
    }}
}}
"""


def post(port, doc, method="POST"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, "/status", body=json.dumps(doc), headers={"Content-Type": "application/json", "Connection": "close"})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, json.loads(body)


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
        return CONF.format(module=self.module, port=self.port, servers=servers)

    def reload(self, prefix, master, nodes=(0, 1, 2)):
        with open(os.path.join(prefix, "nginx.conf"), "w") as f:
            f.write(("user root;\n" if os.geteuid() == 0 else "") + self.conf(nodes))
        os.kill(master, signal.SIGHUP)
        time.sleep(0.6)

    def server(self, i):
        _, body, _ = get(self.port, "/status", "127.0.0.1")
        doc = json.loads(body)
        addr = "127.0.0.1:%d" % self.ports[i]
        return next((s for s in doc["upstreams"]["kylin_nodes"]["servers"] if s["address"] == addr), None), doc

    def sessions_ok(self, users, tag):
        bad = []
        for u, (sid, node) in enumerate(users):
            for a in range(4):
                status, got, _ = get(self.port, "/q", "10.%d.%d.%d" % (tag, u, a + 1), sid)
                if status != 200 or got != node:
                    bad.append((node, got, status))
        return bad

    def new_traffic(self, tag):
        return [get(self.port, "/login" if a % 2 else "/q", "10.%d.%d.3" % (tag, a))[1] for a in range(40)]

    def run(self):
        prefix, master = start_nginx(self.nginx, self.conf(), self.port, "kylin-scenario-rdrain-")
        try:
            self.body(prefix, master)
        finally:
            bad = stop_nginx(prefix, master, self.keep)
            self.check("no alerts or crashes in the error log; graceful stop", not bad, "%s" % bad[:3])

    def body(self, prefix, master):
        users = []
        for i in range(12):
            status, node, sid = get(self.port, "/login", "10.7.%d.1" % i)
            users.append((sid, node))
        d = int(users[0][1][1:])
        held = sum(1 for _, n in users if n == "n%d" % d)
        status, doc = post(self.port, {"upstream": "kylin_nodes", "server": "127.0.0.1:%d" % self.ports[d], "drain": True})
        new = self.new_traffic(20)
        self.check("at once: after the POST no new request reaches the drained node, through either worker",
                   status == 200 and "n%d" % d not in new and len(set(new)) == 2, "POST %d %s; 40 new requests went to %s" % (status, doc, sorted(set(new))))
        bad = self.sessions_ok(users, 30)
        self.check("sessions: every session keeps its node, the drained one included (no 401)", not bad,
                   "%d users, %d on the drained node; misplaced or refused: %s" % (len(users), held, bad[:3]))
        s, doc = self.server(d)
        _, prom, _ = get(self.port, "/status?format=prometheus", "127.0.0.1")
        problems = status_problems(doc, prom)
        self.check("status: draining, with the sessions it still holds; the document validates",
                   s["state"] == "draining" and s["sessions"] == held and not problems, "state %s, sessions %s (expected %d), %s" % (s["state"], s["sessions"], held, problems[:2]))

        self.reload(prefix, master)
        s, _ = self.server(d)
        new = self.new_traffic(21)
        bad = self.sessions_ok(users, 31)
        self.check("reload: still draining, sessions kept, nothing new", s["state"] == "draining" and not bad and "n%d" % d not in new,
                   "state %s, %d misplaced sessions, new requests went to %s" % (s["state"], len(bad), sorted(set(new))))

        rest = tuple(i for i in range(3) if i != d)
        self.reload(prefix, master, rest)
        gone, _ = self.server(d)
        self.reload(prefix, master)
        s, _ = self.server(d)
        new = self.new_traffic(22)
        self.check("removal: a reload that removes the node and one that adds it back clear the mark",
                   gone is None and s is not None and s["state"] == "up" and "n%d" % d in new, "listed while removed: %s; state after re-adding %s; new requests went to %s"
                   % (gone is not None, s and s["state"], sorted(set(new))))

        o = rest[0]
        post(self.port, {"upstream": "kylin_nodes", "server": "127.0.0.1:%d" % self.ports[o], "drain": True}, "PATCH")
        drained = self.new_traffic(23)
        status, doc = post(self.port, {"upstream": "kylin_nodes", "server": "127.0.0.1:%d" % self.ports[o], "drain": False}, "PATCH")
        undrained = self.new_traffic(23)
        self.check("undrain: an undrained node takes new requests again", "n%d" % o not in drained and "n%d" % o in undrained and status == 200,
                   "while drained %s, after %s" % (sorted(set(drained)), sorted(set(undrained))))

    def cleanup(self):
        for n in self.nodes:
            n.shutdown()


if __name__ == "__main__":
    sys.exit(scenario_main("scenario-runtime-drain", Scenario))
