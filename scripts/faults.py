#!/usr/bin/env python3
"""Faults under load: nginx (2 workers) + the module + 3 Kylin stand-ins + a real Redis, with a
bounded load running throughout while, in turn:

  1. a node is killed (SIGKILL) and restarted;
  2. Redis is stopped and restarted;
  3. Redis is slowed (DEBUG SLEEP longer than the store's timeout);
  4. nginx is reloaded twenty times (SIGHUP every 0.4 s);
  5. nginx's binary is upgraded in place (USR2, WINCH and QUIT to the old master).

Reports, per phase: requests sent, client-visible errors by kind, and checks that only the
errors nginx's own semantics allow occur: a POST in flight on the killed node (nginx does not
retry non-idempotent requests) may fail with 502, and a node-local session created on the
killed node is lost (401) once it fails over; nothing else fails, no worker crashes, every
in-flight counter returns to zero, and shared memory (route and cache entries) stays bounded.

Usage: faults.py --nginx PATH --module PATH [--json FILE]
Prints one line per check and "faults: N passed, M failed"; exits 1 on any failure.
"""
import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenario import free_ports, http, wait_port  # noqa: E402

CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log notice;
pid logs/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    log_format k '$msec $http_x_real_ip $request_uri $status $upstream_addr $kylin_route $kylin_session_state $cookie_JSESSIONID $pid';
    access_log logs/access.log k;
    kylin_upstream kc {{
        zone kc 128k;
        kylin_session_store redis://127.0.0.1:{redis} format=tomcat timeout=200ms fail_threshold=3 fail_backoff=1s;
        server 127.0.0.1:{n1} max_fails=1 fail_timeout=2s;
        server 127.0.0.1:{n2} max_fails=1 fail_timeout=2s;
        server 127.0.0.1:{n3} max_fails=1 fail_timeout=2s;
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location /kylin/ {{
            proxy_pass http://kc;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout;
        }}
        location = /status {{ kylin_status; }}
    }}
}}
"""

PHASES = ["kill node", "stop Redis", "slow Redis", "20 reloads", "binary upgrade"]


class Faults:
    def __init__(self, nginx, module):
        self.nginx, self.module = nginx, module
        p = free_ports(5)
        self.nodes, self.redis_port, self.port = p[:3], p[3], p[4]
        self.prefix = tempfile.mkdtemp(prefix="kylin-faults-")
        self.redis_dir = tempfile.mkdtemp(prefix="kylin-faults-redis-")
        self.node_procs = {}
        self.redis = None
        self.results = []
        self.phase = "warm-up"
        self.stats = {}  # phase -> {"sent": n, "errors": {kind: n}}
        self.stop = False
        self.logins = 0

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s %s: %s" % ("ok  " if ok else "FAIL", name, detail), flush=True)

    def start_node(self, i):
        self.node_procs[i] = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "kylin_node.py"), "--port", str(self.nodes[i]), "--delay", "0.02"],
            stdout=subprocess.DEVNULL)
        if not wait_port(self.nodes[i]):
            raise RuntimeError("node %d did not start" % i)

    def start_redis(self):
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.redis_dir], stdout=subprocess.DEVNULL)
        if not wait_port(self.redis_port):
            raise RuntimeError("redis-server did not start")

    def stop_redis(self):
        if self.redis:
            self.redis.terminate()
            self.redis.wait(5)
            self.redis = None

    def master_pid(self, name="nginx.pid"):
        with open(os.path.join(self.prefix, "logs", name)) as f:
            return int(f.read().strip())

    def start(self):
        os.makedirs(os.path.join(self.prefix, "logs"))
        os.makedirs(os.path.join(self.prefix, "conf"))
        conf = CONF.format(module=self.module, port=self.port, redis=self.redis_port,
                           n1=self.nodes[0], n2=self.nodes[1], n3=self.nodes[2])
        if os.geteuid() == 0:
            conf = "user root;\n" + conf
        with open(os.path.join(self.prefix, "conf", "nginx.conf"), "w") as f:
            f.write(conf)
        self.start_redis()
        for i in range(3):
            self.start_node(i)
        # An absolute path: the binary upgrade re-executes argv[0].
        subprocess.run([self.nginx, "-p", self.prefix, "-c", "conf/nginx.conf"], check=True)
        if not wait_port(self.port):
            raise RuntimeError("nginx did not start")

    def cleanup(self):
        for name in ("nginx.pid", "nginx.pid.oldbin"):
            try:
                os.kill(self.master_pid(name), signal.SIGQUIT)
            except (OSError, ValueError):
                pass
        time.sleep(1)
        for name in ("nginx.pid", "nginx.pid.oldbin"):
            try:
                os.kill(self.master_pid(name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for p in self.node_procs.values():
            p.kill()
            p.wait(5)
        self.stop_redis()
        if os.environ.get("KYLIN_FAULTS_KEEP"):
            print("kept", self.prefix)
        else:
            shutil.rmtree(self.prefix, ignore_errors=True)
        shutil.rmtree(self.redis_dir, ignore_errors=True)

    def record(self, kind):
        s = self.stats.setdefault(self.phase, {"sent": 0, "errors": {}})
        s["sent"] += 1
        if kind:
            s["errors"][kind] = s["errors"].get(kind, 0) + 1

    async def user(self, uid):
        addr = "10.20.%d.%d" % (uid // 200, uid % 200 + 1)
        cookie = None
        born = None
        while not self.stop:
            try:
                if cookie is None:
                    st, h, _ = await http(self.port, "POST", "/kylin/api/user/authentication", {"X-Real-IP": addr}, timeout=5)
                    cookie = next((c.split(";")[0] for c in h.get("set-cookie", []) if c.startswith("JSESSIONID=")), None)
                    born = self.phase
                    self.logins += 1
                    self.record(None if st == 200 else "login %d" % st)
                else:
                    st, _, _ = await http(self.port, "POST", "/kylin/api/query", {"X-Real-IP": addr, "Cookie": cookie}, timeout=5)
                    if st == 401:
                        self.record("401 session lost" + (" (created during the upgrade)" if born == "binary upgrade" else ""))
                        cookie = None
                    else:
                        self.record(None if st == 200 else "query %d" % st)
            except (OSError, asyncio.TimeoutError, IndexError) as e:
                self.record("connection: %s" % type(e).__name__)
            await asyncio.sleep(random.uniform(0.01, 0.05))

    async def browser(self, i):
        addr = "10.30.0.%d" % (i % 250 + 1)
        while not self.stop:
            try:
                st, _, _ = await http(self.port, "GET", "/kylin/api/cube/list", {"X-Real-IP": addr}, timeout=5)
                self.record(None if st == 200 else "get %d" % st)
            except (OSError, asyncio.TimeoutError, IndexError) as e:
                self.record("connection: %s" % type(e).__name__)
            await asyncio.sleep(random.uniform(0.005, 0.02))

    async def status(self):
        _, _, body = await http(self.port, "GET", "/status", timeout=5)
        return json.loads(body)

    async def faults(self):
        loop = asyncio.get_running_loop()
        await asyncio.sleep(1.5)
        before = await self.status()

        self.phase = "kill node"
        victim = 1
        self.node_procs[victim].kill()
        await asyncio.sleep(2.0)
        await loop.run_in_executor(None, self.start_node, victim)
        await asyncio.sleep(2.5)  # fail_timeout passes; the node takes traffic again

        self.phase = "stop Redis"
        self.stop_redis()
        await asyncio.sleep(2.0)
        await loop.run_in_executor(None, self.start_redis)
        await asyncio.sleep(1.5)

        self.phase = "slow Redis"
        slow = subprocess.Popen(["redis-cli", "-p", str(self.redis_port), "DEBUG", "SLEEP", "1.5"], stdout=subprocess.DEVNULL)
        await asyncio.sleep(2.0)
        slow.wait(5)

        self.phase = "20 reloads"
        pid = self.master_pid()
        for _ in range(20):
            os.kill(pid, signal.SIGHUP)
            await asyncio.sleep(0.4)
        await asyncio.sleep(1.0)

        self.phase = "binary upgrade"
        old = self.master_pid()
        os.kill(old, signal.SIGUSR2)
        for _ in range(100):
            if os.path.exists(os.path.join(self.prefix, "logs", "nginx.pid.oldbin")):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        os.kill(old, signal.SIGWINCH)
        await asyncio.sleep(0.5)
        os.kill(old, signal.SIGQUIT)
        await asyncio.sleep(1.5)
        self.upgraded = self.master_pid() != old and not os.path.exists(os.path.join(self.prefix, "logs", "nginx.pid.oldbin"))

        self.phase = "after"
        await asyncio.sleep(1.0)
        self.stop = True
        return before

    async def run(self):
        clients = [asyncio.ensure_future(self.user(u)) for u in range(16)]
        clients += [asyncio.ensure_future(self.browser(b)) for b in range(8)]
        before = await self.faults()
        await asyncio.gather(*clients)
        await asyncio.sleep(0.5)
        after = await self.status()

        print("%-16s %8s  %s" % ("phase", "requests", "client-visible errors"))
        for ph in ["warm-up"] + PHASES + ["after"]:
            s = self.stats.get(ph, {"sent": 0, "errors": {}})
            print("%-16s %8d  %s" % (ph, s["sent"], s["errors"] or "none"))

        # Killing a node: POSTs in flight on it fail (nginx does not retry non-idempotent
        # requests) and its node-local sessions are lost. Binary upgrade: the new workers start
        # with empty shared memory and recover routes from Redis, except for sessions created
        # while both generations of workers serve, whose route write may not have landed yet.
        allowed = {
            "kill node": {"query 502", "401 session lost", "login 502", "get 502"},
            "binary upgrade": {"401 session lost (created during the upgrade)"},
        }
        for ph in ["warm-up"] + PHASES + ["after"]:
            s = self.stats.get(ph, {"sent": 0, "errors": {}})
            bad = {k: v for k, v in s["errors"].items() if k not in allowed.get(ph, set())}
            limit_502 = 16 + 8  # at most the requests in flight when the node died
            extra = ""
            if ph == "kill node":
                n502 = sum(v for k, v in s["errors"].items() if k.endswith("502"))
                bad.update({"more 502s than requests in flight": n502} if n502 > limit_502 else {})
                extra = " (allowed: 502 for requests in flight on the killed node, 401 for its node-local sessions)"
            self.check("phase %s" % ph, s["sent"] > 0 and not bad,
                       "%d requests, unexpected errors: %s%s" % (s["sent"], bad or "none", extra))
        self.check("binary upgrade", self.upgraded, "the new master took over and the old one exited")

        with open(os.path.join(self.prefix, "logs", "error.log"), errors="replace") as f:
            log = f.read()
        crashes = log.count("exited on signal")
        self.check("crashes", crashes == 0, "%d worker crashes in the error log" % crashes)
        flights = [after["upstreams"]["kc"]["in_flight"]] + [x["in_flight"] for x in after["upstreams"]["kc"]["servers"]]
        self.check("counters", all(f == 0 for f in flights), "in flight afterwards: %s" % flights)

        def shm(doc):
            u = doc["upstreams"]["kc"]
            return {"routes": u["session_routes"]["entries"], "routes capacity": u["session_routes"]["capacity"],
                    "cache": u["session_store"]["cache"]["entries"], "cache capacity": u["session_store"]["cache"]["capacity"]}

        b, a = shm(before), shm(after)
        # Every route and cached answer belongs to a session some user logged in to: the tables
        # hold at most one entry per login, whatever the faults did.
        self.check("shared memory", a["routes"] <= min(self.logins, a["routes capacity"]) and a["cache"] <= self.logins,
                   "%d logins; before %s, after %s" % (self.logins, b, a))
        self.summary = {"phases": self.stats, "shm_before": b, "shm_after": a, "crashes": crashes, "in_flight_after": flights}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    random.seed(3)
    f = Faults(os.path.abspath(args.nginx), os.path.abspath(args.module))
    try:
        f.start()
        asyncio.run(f.run())
        if args.json and hasattr(f, "summary"):
            with open(args.json, "w") as out:
                json.dump(f.summary, out, indent=2)
    except Exception as e:
        f.check("faults", False, "aborted: %r" % (e,))
    finally:
        f.cleanup()
    passed = sum(f.results)
    print("faults: %d passed, %d failed" % (passed, len(f.results) - passed))
    return 1 if len(f.results) > passed else 0


if __name__ == "__main__":
    sys.exit(main())
