#!/usr/bin/env python3
"""Scenario test with a real Redis: several nginx instances, slow and restarted Redis.

Proves, with real sockets:
  1. instances  - two nginx instances in front of one cluster route a session to the same
                  node: a login through instance A, then queries through instance B from other
                  addresses, never get a 401 (routes are shared through Redis); the same
                  through an upstream with share_routes=off does get 401s (the control);
  2. slow       - a Redis that accepts but never answers delays only the request that asked
                  it, by at most its timeout: twenty other requests on the same (single)
                  worker all finish first;
  3. restart    - with Redis stopped every request is still served and the circuit breaker
                  opens; after Redis is started again (no nginx reload) lookups work again and
                  a shared session is recognised.

Usage: scenario_redis.py --nginx PATH --module PATH [--keep]
Prints one line per check and "scenario-redis: N passed, M failed"; exits 1 on any failure.
"""
import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenario import free_ports, http, quit_nginx, status_problems, wait_port  # noqa: E402

CONF = """
load_module {module};
worker_processes {workers};
error_log logs/error.log warn;
pid logs/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    kylin_upstream kc {{
        kylin_session_store redis://127.0.0.1:{redis} format=tomcat timeout=200ms fail_threshold=2 fail_backoff=1s;
        server 127.0.0.1:{n1};
        server 127.0.0.1:{n2};
        server 127.0.0.1:{n3};
    }}
    kylin_upstream kc_local {{
        kylin_session_store redis://127.0.0.1:{redis} format=tomcat timeout=200ms share_routes=off;
        server 127.0.0.1:{n1};
        server 127.0.0.1:{n2};
        server 127.0.0.1:{n3};
    }}
    kylin_upstream slow_store {{
        kylin_session_store redis://127.0.0.1:{hole} format=tomcat timeout=1s;
        server 127.0.0.1:{n1};
        server 127.0.0.1:{n2};
        server 127.0.0.1:{n3};
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location /kylin/ {{ proxy_pass http://kc; add_header X-Session-State $kylin_session_state; add_header X-Route $kylin_route; }}
        location /local/ {{ proxy_pass http://kc_local/kylin/; }}
        location /slow/ {{ proxy_pass http://slow_store/kylin/; add_header X-Session-State $kylin_session_state; }}
        location = /status {{ kylin_status; }}
    }}
}}
"""


class Nginx:
    def __init__(self, binary, module, port, workers, ports, keep):
        self.binary, self.port, self.keep = binary, port, keep
        self.prefix = tempfile.mkdtemp(prefix="kylin-scenario-redis-")
        os.makedirs(os.path.join(self.prefix, "logs"))
        os.makedirs(os.path.join(self.prefix, "conf"))
        conf = CONF.format(module=module, workers=workers, port=port, **ports)
        if os.geteuid() == 0:
            conf = "user root;\n" + conf
        with open(os.path.join(self.prefix, "conf", "nginx.conf"), "w") as f:
            f.write(conf)

    def start(self):
        subprocess.run([self.binary, "-p", self.prefix, "-c", "conf/nginx.conf"], check=True)
        if not wait_port(self.port):
            raise RuntimeError("nginx on %d did not start" % self.port)

    def stop(self):
        quit_nginx(self.prefix)

    def bad_log_lines(self):
        with open(os.path.join(self.prefix, "logs", "error.log"), errors="replace") as f:
            return [l.strip() for l in f if any(w in l for w in ("[alert]", "[crit]", "[emerg]", "exited on signal"))]

    def cleanup(self):
        if self.keep:
            print("kept", self.prefix)
        else:
            shutil.rmtree(self.prefix, ignore_errors=True)


class Scenario:
    def __init__(self, nginx, module, keep):
        self.results = []
        p = free_ports(7)
        self.nodes, self.redis_port, self.hole_port, pa, pb = p[:3], p[3], p[4], p[5], p[6]
        self.redis_dir = tempfile.mkdtemp(prefix="kylin-redis-")
        self.redis = None
        self.procs = []
        ports = {"redis": self.redis_port, "hole": self.hole_port, "n1": self.nodes[0], "n2": self.nodes[1], "n3": self.nodes[2]}
        self.a = Nginx(nginx, module, pa, 2, ports, keep)
        self.b = Nginx(nginx, module, pb, 1, ports, keep)
        self.hole = None

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s %s: %s" % ("ok  " if ok else "FAIL", name, detail), flush=True)

    def start_redis(self):
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.redis_dir], stdout=subprocess.DEVNULL)
        if not wait_port(self.redis_port):
            raise RuntimeError("redis-server did not start")

    def stop_redis(self):
        if self.redis:
            self.redis.terminate()
            self.redis.wait(5)
            self.redis = None

    def redis_cmd(self, *args):
        subprocess.run(["redis-cli", "-p", str(self.redis_port)] + list(args), check=True, stdout=subprocess.DEVNULL)

    def start(self):
        self.start_redis()
        # A "Redis" that accepts connections (the kernel completes them) and never answers.
        self.hole = socket.socket()
        self.hole.bind(("127.0.0.1", self.hole_port))
        self.hole.listen(64)
        args = [sys.executable, os.path.join(HERE, "kylin_node.py")]
        for p in self.nodes:
            args += ["--port", str(p)]
        self.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        for p in self.nodes:
            if not wait_port(p):
                raise RuntimeError("kylin node on %d did not start" % p)
        self.a.start()
        self.b.start()

    def stop(self):
        self.a.stop()
        self.b.stop()
        for p in self.procs:
            p.terminate()
            p.wait(5)
        self.stop_redis()
        if self.hole:
            self.hole.close()
        shutil.rmtree(self.redis_dir, ignore_errors=True)

    async def login(self, port, addr, prefix="/kylin/"):
        st, h, _ = await http(port, "POST", prefix + "api/user/authentication", {"X-Real-IP": addr})
        return next((c.split(";")[0] for c in h.get("set-cookie", []) if c.startswith("JSESSIONID=")), None)

    async def instances(self):
        cookies = [await self.login(self.a.port, "10.9.0.%d" % i) for i in range(1, 21)]
        await asyncio.sleep(0.5)  # the route writes to Redis are asynchronous

        async def queries(prefix, cookie):
            codes = []
            for _ in range(5):
                addr = "10.10.%d.%d" % (random.randrange(256), random.randrange(1, 255))
                st, _, _ = await http(self.b.port, "POST", prefix + "api/query", {"X-Real-IP": addr, "Cookie": cookie})
                codes.append(st)
            return codes

        res = await asyncio.gather(*(queries("/kylin/", c) for c in cookies if c))
        codes = [c for r in res for c in r]
        self.check("instances", all(cookies) and codes.count(200) == len(codes) == 100,
                   "20 logins through instance A, 100 queries through instance B from other addresses: %d x 200, %d x 401"
                   % (codes.count(200), codes.count(401)))
        local = [await self.login(self.a.port, "10.11.0.%d" % i, "/local/") for i in range(1, 21)]
        res = await asyncio.gather(*(queries("/local/", c) for c in local if c))
        codes = [c for r in res for c in r]
        self.check("instances control", codes.count(401) > 0,
                   "the same through share_routes=off: %d x 200, %d x 401 (instance B does not know the routes)"
                   % (codes.count(200), codes.count(401)))

    async def slow(self):
        session = "5105E55105E55105E55105E55105E501"

        async def session_request():
            t0 = time.monotonic()
            st, h, _ = await http(self.b.port, "POST", "/slow/api/x", {"X-Real-IP": "10.12.0.1", "Cookie": "JSESSIONID=" + session})
            return st, h.get("x-session-state", [""])[0], t0, time.monotonic()

        async def plain(i):
            st, _, _ = await http(self.b.port, "GET", "/kylin/api/projects", {"X-Real-IP": "10.13.0.%d" % i})
            return st, time.monotonic()

        task = asyncio.ensure_future(session_request())
        await asyncio.sleep(0.05)  # the session request is waiting for the silent Redis now
        plains = await asyncio.gather(*(plain(i) for i in range(1, 21)))
        st, state, t0, t1 = await task
        all_first = all(end < t1 for _, end in plains)
        self.check("slow", st == 200 and state == "unknown" and all(s == 200 for s, _ in plains) and all_first and 0.8 <= t1 - t0 < 3.0,
                   "a lookup against a silent Redis (timeout 1s) waited %.2f s and answered %d (session %s); "
                   "20 other requests on the same worker: %s, all finished first: %s"
                   % (t1 - t0, st, state, sorted({s for s, _ in plains}), all_first))

    async def restart(self):
        self.stop_redis()
        codes, states = [], []
        for i in range(6):
            sid = "DEAD%028X" % i
            st, h, _ = await http(self.a.port, "POST", "/kylin/api/x", {"X-Real-IP": "10.14.0.1", "Cookie": "JSESSIONID=" + sid})
            codes.append(st)
            states.append(h.get("x-session-state", [""])[0])
        doc = json.loads((await http(self.a.port, "GET", "/status"))[2])
        breaker_down = doc["upstreams"]["kc"]["session_store"]["breaker"]
        self.start_redis()
        shared = "5A4ED5A4ED5A4ED5A4ED5A4ED5A4ED01"
        self.redis_cmd("SET", shared, "tomcat-session")
        await asyncio.sleep(1.5)  # fail_backoff=1s: then one probe, which succeeds
        state = ""
        for _ in range(20):
            st, h, _ = await http(self.a.port, "POST", "/kylin/api/x", {"X-Real-IP": "10.14.0.2", "Cookie": "JSESSIONID=" + shared})
            state = h.get("x-session-state", [""])[0]
            if state == "shared":
                break
            await asyncio.sleep(0.3)
        doc = json.loads((await http(self.a.port, "GET", "/status"))[2])
        breaker_up = doc["upstreams"]["kc"]["session_store"]["breaker"]
        prom = (await http(self.a.port, "GET", "/status?format=prometheus"))[2].decode()
        problems = status_problems(doc, prom)
        self.check("status schema", not problems and "kylin_session_store_lookups_total" in prom,
                   "the status page with session stores validates against the schema; Prometheus text parses"
                   if not problems else "; ".join(problems[:3]))
        self.check("restart", set(codes) == {200} and breaker_down == "open" and state == "shared" and breaker_up == "closed",
                   "Redis stopped: codes %s, states %s, breaker %s; Redis started again without a reload: "
                   "shared session recognised (%s), breaker %s" % (sorted(set(codes)), sorted(set(states)), breaker_down, state, breaker_up))

    async def run(self):
        await self.instances()
        await self.slow()
        await self.restart()
        bad = self.a.bad_log_lines() + self.b.bad_log_lines()
        self.check("error log", not bad, "no alert, crit, emerg or crashed worker" if not bad else "; ".join(bad[:3]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    random.seed(11)
    sc = Scenario(os.path.abspath(args.nginx), os.path.abspath(args.module), args.keep)
    try:
        sc.start()
        asyncio.run(sc.run())
    except Exception as e:
        sc.check("scenario-redis", False, "aborted: %r" % (e,))
    finally:
        sc.stop()
        sc.a.cleanup()
        sc.b.cleanup()
    passed = sum(sc.results)
    failed = len(sc.results) - passed
    print("scenario-redis: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
