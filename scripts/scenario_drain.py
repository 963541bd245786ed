#!/usr/bin/env python3
"""Scenario test: draining a node with `server ... drain` and `nginx -s reload` (nginx 1.29.6+).

nginx with two workers in front of three Kylin stand-ins whose sessions live on the node that
created them (any other node answers 401). Six users log in; then nginx is reloaded with the
node holding the first user's session marked `drain`. Checks:
  1. sessions  - every logged-in user's queries, from any client address, still reach the node
                 holding the session: the drained node keeps its sessions (no 401);
  2. new       - logins and session-less requests from forty client addresses never reach
                 the drained node;
  3. status    - the status page shows the node as draining;
and nothing alarming in the error log. Skipped (with a message) before nginx 1.29.6.

Usage: scenario_drain.py --nginx PATH --module PATH [--keep]
Prints one line per check and "scenario-drain: N passed, M failed"; exits 1 on failure.
"""
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenario import StandIn, free_ports, http, local_sessions_node, scenario_main, start_nginx, stop_nginx  # noqa: E402

CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    kylin_upstream kylin_nodes {{
        zone kylin_nodes 64k;
        server 127.0.0.1:{n0}{d0};
        server 127.0.0.1:{n1}{d1};
        server 127.0.0.1:{n2}{d2};
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / {{ proxy_pass http://kylin_nodes; }}
        location = /status {{ kylin_status; }}
    }}
}}
"""

def nginx_version(binary):
    out = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


class Scenario:
    def __init__(self, nginx, module, keep):
        self.nginx, self.module, self.keep = nginx, module, keep
        self.results = []
        *nodes, self.port = free_ports(4)
        self.ports = nodes
        self.nodes = [StandIn(p, local_sessions_node("n%d" % i)) for i, p in enumerate(nodes)]

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s: %s (%s)" % ("ok" if ok else "FAILED", name, detail))

    def conf(self, drained=None):
        marks = {"d%d" % i: (" drain" if i == drained else "") for i in range(3)}
        return CONF.format(module=self.module, port=self.port, **{"n%d" % i: p for i, p in enumerate(self.ports)}, **marks)

    async def get(self, path, addr, sid=None):
        headers = {"X-Real-IP": addr}
        if sid:
            headers["Cookie"] = "JSESSIONID=" + sid
        status, hdrs, body = await http(self.port, "GET", path, headers)
        cookie = next((re.search(r"JSESSIONID=([0-9A-F]+)", c).group(1) for c in hdrs.get("set-cookie", []) if "JSESSIONID=" in c), None)
        return status, body.decode(), cookie

    def run(self):
        prefix, master = start_nginx(self.nginx, self.conf(), self.port, "kylin-scenario-drain-")
        try:
            users = []
            for i in range(6):
                status, node, sid = asyncio.run(self.get("/login", "10.7.%d.1" % i))
                users.append((sid, node))
            drained = int(users[0][1][1:])
            with open(os.path.join(prefix, "nginx.conf"), "w") as f:
                f.write(("user root;\n" if os.geteuid() == 0 else "") + self.conf(drained))
            os.kill(master, signal.SIGHUP)
            time.sleep(1.5)  # the new workers run, the old ones have finished

            async def traffic():
                bad = []
                for sid, node in users:
                    for a in range(8):
                        status, got, _ = await self.get("/q", "10.9.%d.%d" % (a, a + 1), sid)
                        if status != 200 or got != node:
                            bad.append((sid[-4:], node, got, status))
                new = []
                for a in range(40):
                    status, got, _ = await self.get("/login" if a % 2 else "/q", "10.20.%d.3" % a)
                    new.append(got)
                status, _, body = await http(self.port, "GET", "/status")
                return bad, new, json.loads(body)

            bad, new, doc = asyncio.run(traffic())
            self.check("sessions: every session keeps its node, the drained one included (no 401)", not bad and users[0][1] == "n%d" % drained,
                       "%d users (the drained node held %d of them), %d misplaced or refused: %s"
                       % (len(users), sum(1 for _, n in users if n == "n%d" % drained), len(bad), bad[:3]))
            self.check("new: logins and session-less requests never reach the drained node",
                       "n%d" % drained not in new and len(set(new)) == 2,
                       "40 requests went to %s" % sorted(set(new)))
            states = [s["state"] for s in doc["upstreams"]["kylin_nodes"]["servers"]]
            self.check("status: the drained node shows as draining", states[drained] == "draining" and states.count("up") == 2,
                       "states %s" % states)
        finally:
            bad_lines = stop_nginx(prefix, master, self.keep)
        self.check("no alerts or crashes in the error log", not bad_lines, "%s" % bad_lines[:3])

    def cleanup(self):
        for n in self.nodes:
            n.shutdown()


def too_old(binary):
    if nginx_version(binary) < (1, 29, 6):
        return "%s has no `drain` (nginx 1.29.6+)" % binary
    return None


if __name__ == "__main__":
    sys.exit(scenario_main("scenario-drain", Scenario, skip=too_old))
