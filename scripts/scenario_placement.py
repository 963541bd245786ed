#!/usr/bin/env python3
"""Scenario test: client placement (`kylin_balance clients`, the default) moves a whole busy
client off a hot node, once, and never a node-local session.

nginx with two workers in front of three Kylin stand-ins whose sessions live on the node that
created them (any other node answers 401); every query takes 150 ms. The script first finds
two client addresses (A and B) whose home is the same node H, then runs them as two BI
servers, six users each: log in, ten queries with the session, log in again. Checks:
  1. moved     - one of the two clients ends on another node than H, the other stays on H:
                 in the last two seconds every request of one of them reaches a node other
                 than H and every request of the other reaches H;
  2. once      - the moved client's logins change node once (no flapping back and forth);
  3. sessions  - no 401: node-local sessions stay where they were created, also while and
                 after their client moves;
  4. status    - the status page says what happened: balance "clients", one moved client,
                 requests counted as `moved` on the new node; `$kylin_route` says `moved`;
  5. light     - a light client at home H (one query at a time) is never moved;
and nothing alarming in the error log.

Usage: scenario_placement.py --nginx PATH --module PATH [--keep]
Prints one line per check and "scenario-placement: N passed, M failed"; exits 1 on failure.
"""
import asyncio
import json
import os
import re
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
events {{ worker_connections 1024; }}
http {{
    access_log off;
    kylin_upstream kylin_nodes {{
        zone kylin_nodes 64k;
        server 127.0.0.1:{n0};
        server 127.0.0.1:{n1};
        server 127.0.0.1:{n2};
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        add_header X-Kylin-Route $kylin_route always;
        location / {{ proxy_pass http://kylin_nodes; }}
        location = /status {{ kylin_status; }}
    }}
}}
"""

QUERY_S = 0.15


class Scenario:
    def __init__(self, nginx, module, keep):
        self.nginx, self.module, self.keep = nginx, module, keep
        self.results = []
        *nodes, self.port = free_ports(4)
        self.ports = nodes
        self.nodes = [StandIn(p, local_sessions_node("n%d" % i, QUERY_S, instant=("/probe",))) for i, p in enumerate(nodes)]

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s: %s (%s)" % ("ok" if ok else "FAILED", name, detail))

    async def get(self, path, addr, sid=None):
        headers = {"X-Real-IP": addr}
        if sid:
            headers["Cookie"] = "JSESSIONID=" + sid
        status, hdrs, body = await http(self.port, "GET", path, headers)
        cookie = next((re.search(r"JSESSIONID=([0-9A-F]+)", c).group(1) for c in hdrs.get("set-cookie", []) if "JSESSIONID=" in c), None)
        route = (hdrs.get("x-kylin-route") or [""])[0]
        return status, body.decode(), cookie, route

    async def homes(self, n):
        out = {}
        for i in range(n):
            addr = "10.50.%d.%d" % (i, i % 200 + 1)
            _, got, _, _ = await self.get("/probe", addr)
            out[addr] = got
        return out

    async def bi_server(self, addr, users, end, log):
        """`users` concurrent users: log in, ten queries with the session, again, until end."""
        async def user():
            while time.time() < end:
                status, got, sid, route = await self.get("/login", addr)
                log.append((time.time(), addr, "login", status, got, route))
                for _ in range(10):
                    if time.time() >= end:
                        return
                    status, got, _, route = await self.get("/q", addr, sid)
                    log.append((time.time(), addr, "query", status, got, route))
        await asyncio.gather(*(user() for _ in range(users)))

    async def light(self, addr, end, log):
        while time.time() < end:
            status, got, _, route = await self.get("/q", addr)
            log.append((time.time(), addr, "light", status, got, route))
            await asyncio.sleep(0.3)

    def run(self):
        conf = CONF.format(module=self.module, port=self.port, **{"n%d" % i: p for i, p in enumerate(self.ports)})
        prefix, master = start_nginx(self.nginx, conf, self.port, "kylin-scenario-placement-")
        try:
            homes = asyncio.run(self.homes(60))
            by_home = {}
            for addr, n in homes.items():
                by_home.setdefault(n, []).append(addr)
            home, addrs = max(by_home.items(), key=lambda kv: len(kv[1]))
            if len(addrs) < 3:
                self.check("setup: three client addresses share a home", False, "homes: %s" % {k: len(v) for k, v in by_home.items()})
                return
            a, b, lite = addrs[:3]
            log = []
            duration = 8.0

            async def load():
                end = time.time() + duration
                await asyncio.gather(self.bi_server(a, 6, end, log), self.bi_server(b, 6, end, log), self.light(lite, end, log))
                status, _, body = await http(self.port, "GET", "/status")
                return json.loads(body)

            t0 = time.time()
            doc = asyncio.run(load())
            late = t0 + duration - 2.0
            last = {c: {g for t, addr, _, _, g, _ in log if addr == c and t >= late} for c in (a, b)}
            moved = [c for c in (a, b) if last[c] and home not in last[c]]
            stayed = [c for c in (a, b) if last[c] == {home}]
            self.check("moved: one of two busy clients sharing a home moves off it, the other stays",
                       len(moved) == 1 and len(stayed) == 1,
                       "home %s; nodes in the last 2 s: %s" % (home, {c: sorted(v) for c, v in last.items()}))
            changes = {}
            for c in (a, b):
                nodes = [g for _, addr, kind, st, g, _ in log if addr == c and kind == "login" and st == 200]
                changes[c] = sum(1 for x, y in zip(nodes, nodes[1:]) if x != y)
            self.check("once: the moved client's logins change node once, the other's never",
                       sorted(changes.values()) == [0, 1], "node changes of their logins: %s" % changes)
            refused = [e for e in log if e[3] != 200]
            self.check("sessions: no 401 (node-local sessions never leave their node)", not refused and len(log) > 200,
                       "%d requests, %d refused: %s" % (len(log), len(refused), refused[:3]))
            up = doc["upstreams"]["kylin_nodes"]
            target = sorted(last[moved[0]])[0] if moved else None
            servers = {s["address"].rsplit(":", 1)[1]: s for s in up["servers"]}
            tsrv = servers.get(str(self.ports[int(target[1:])])) if target else None
            routes = {r for *_, r in log}
            self.check("status: balance clients, one client moved, its requests counted as moved where it went",
                       up["balance"] == "clients" and up["moved_clients"] == 1 and up["decisions"]["moved"] > 0
                       and tsrv is not None and tsrv["clients_moved_in"] == 1 and tsrv["moved"] > 0 and "moved" in routes,
                       "balance %s, moved_clients %s, decisions %s, target %s; routes seen %s"
                       % (up["balance"], up["moved_clients"], up["decisions"], tsrv and {k: tsrv[k] for k in ("moved", "clients_moved_in")}, sorted(routes)))
            lite_nodes = {g for _, addr, _, _, g, _ in log if addr == lite}
            self.check("light: a light client at the same home is never moved", lite_nodes == {home},
                       "its requests went to %s" % sorted(lite_nodes))
        finally:
            bad_lines = stop_nginx(prefix, master, self.keep)
        self.check("no alerts or crashes in the error log", not bad_lines, "%s" % bad_lines[:3])

    def cleanup(self):
        for n in self.nodes:
            n.shutdown()


if __name__ == "__main__":
    sys.exit(scenario_main("scenario-placement", Scenario))
