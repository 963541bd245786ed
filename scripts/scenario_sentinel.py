#!/usr/bin/env python3
"""Scenario test: a session store behind Redis Sentinel, through a failover.

Real redis-server processes: a master, its replica and a Sentinel watching them. nginx's
store names only the Sentinel (`sentinel=kylinmaster`). Checks:
  1. before   - a login's learned route is written to the master the Sentinel names, and a
                shared session is recognised;
  2. failover - `SENTINEL FAILOVER` promotes the replica; the next logins' routes are written
                to the new master (the module asks the Sentinel again when its connection to
                the old master is killed or refused), shared sessions are still recognised,
                and no client request fails.

Usage: scenario_sentinel.py --nginx PATH --module PATH [--keep]
Prints one line per check and "scenario-sentinel: N passed, M failed"; exits 1 on failure.
"""
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenario import StandIn, free_ports, http, scenario_main, start_nginx, stop_nginx, wait_port  # noqa: E402

SHARED = "5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01"

CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    kylin_upstream kylin_nodes {{
        kylin_session_store redis://127.0.0.1:{sentinel} sentinel=kylinmaster timeout=500ms fail_threshold=5 fail_backoff=1s;
        server 127.0.0.1:{node};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://kylin_nodes; add_header X-Session-State $kylin_session_state; }}
        location = /status {{ kylin_status; }}
    }}
}}
"""


def node_answer(path, headers):
    """A query node: /login?id=X sets the session cookie X."""
    cookie = [("Set-Cookie", "JSESSIONID=%s; Path=/" % path.split("=", 1)[1])] if path.startswith("/login?id=") else []
    return 200, cookie, b"node\n"


def cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10).stdout.strip()


class Scenario:
    def __init__(self, nginx, module, keep):
        self.nginx, self.module, self.keep = nginx, module, keep
        self.results = []
        self.master, self.replica, self.sentinel, self.node_port, self.port = free_ports(5)
        self.dir = tempfile.mkdtemp(prefix="kylin-sentinel-")
        self.procs = []
        for port, extra in ((self.master, []), (self.replica, ["--replicaof", "127.0.0.1", str(self.master)])):
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.dir, *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if not wait_port(port):
                raise RuntimeError("redis-server on %d did not start" % port)
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write("port %d\nbind 127.0.0.1\ndir %s\nsentinel monitor kylinmaster 127.0.0.1 %d 1\n"
                    "sentinel down-after-milliseconds kylinmaster 1000\nsentinel failover-timeout kylinmaster 3000\n"
                    % (self.sentinel, self.dir, self.master))
        self.procs.append(subprocess.Popen(["redis-server", conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if not wait_port(self.sentinel):
            raise RuntimeError("redis-sentinel did not start")
        cli(self.master, "SET", SHARED, "tomcat-session")
        self.node = StandIn(self.node_port, node_answer)

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s: %s (%s)" % ("ok" if ok else "FAILED", name, detail))

    def master_port(self):
        out = cli(self.sentinel, "SENTINEL", "get-master-addr-by-name", "kylinmaster").split()
        return int(out[1]) if len(out) == 2 else None

    def routes(self, port):
        return len([k for k in cli(port, "--scan", "--pattern", "kylin:route:*").split() if k])

    async def logins(self, first, n):
        """n logins with fresh sessions, then a request of the shared session; (statuses, state)."""
        statuses = []
        for i in range(first, first + n):
            status, _, _ = await http(self.port, "GET", "/login?id=L0G1N%027d" % i)
            statuses.append(status)
            await asyncio.sleep(0.05)
        status, hdrs, _ = await http(self.port, "GET", "/q", {"Cookie": "JSESSIONID=" + SHARED})
        statuses.append(status)
        return statuses, hdrs.get("x-session-state", [""])[0]

    def run(self):
        # The replica must be known to the Sentinel before it can be promoted.
        for _ in range(200):
            if "num-slaves" in cli(self.sentinel, "SENTINEL", "master", "kylinmaster") and cli(self.sentinel, "SENTINEL", "replicas", "kylinmaster"):
                break
            time.sleep(0.1)
        prefix, pid = start_nginx(self.nginx, CONF.format(module=self.module, sentinel=self.sentinel, node=self.node_port, port=self.port),
                                  self.port, "kylin-scenario-sentinel-")
        try:
            statuses, state = asyncio.run(self.logins(0, 3))
            time.sleep(0.3)
            before = self.routes(self.master)
            self.check("before: routes go to the master the Sentinel names, a shared session is recognised",
                       before == 3 and state == "shared" and set(statuses) == {200},
                       "%d routes on the master, session state %r, statuses %s" % (before, state, sorted(set(statuses))))
            cli(self.sentinel, "SENTINEL", "FAILOVER", "kylinmaster")
            for _ in range(150):
                if self.master_port() == self.replica:
                    break
                time.sleep(0.1)
            promoted = self.master_port() == self.replica
            # The old master now replicates from the new one: count keys written after this.
            had = self.routes(self.replica)
            statuses, _ = asyncio.run(self.logins(100, 10))
            time.sleep(0.3)
            after = self.routes(self.replica) - had
            state = asyncio.run(http(self.port, "GET", "/q2", {"Cookie": "JSESSIONID=" + SHARED}))[1].get("x-session-state", [""])[0]
            self.check("failover: routes go to the promoted master, sessions are recognised, no request fails",
                       promoted and after >= 8 and state == "shared" and set(statuses) == {200},
                       "replica promoted: %s, %d of 10 new routes on it, session state %r, statuses %s"
                       % (promoted, after, state, sorted(set(statuses))))
        finally:
            bad = stop_nginx(prefix, pid, self.keep)
        self.check("no alerts or crashes in the error log", not bad, "%s" % bad[:3])

    def cleanup(self):
        self.node.shutdown()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(scenario_main("scenario-sentinel", Scenario))
