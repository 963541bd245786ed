#!/usr/bin/env python3
"""Scenario test: real concurrency against nginx + the module + slow Kylin stand-ins.

Proves, with real sockets and two nginx workers:
  1. bound      - a flood of cookie-less requests from one BI server's address never puts more
                  than ceil(c * C / n) requests on any node (C = the flood's concurrency), while
                  the same flood through a pure-sticky upstream (factor off) puts all of it on one
                  node (the control shows the measurement can fail);
  2. sessions   - sessions created by logins follow their node from any address, even while
                  that node is over its bound: no 401 from a node that never saw the session;
  3. faults     - client aborts, upstream timeouts and retries past a dead server;
  4. reload     - `nginx -s reload` twice while traffic flows loses no request;
  5. counters   - afterwards every in-flight counter in kylin_status is back to zero.

Usage: scenario.py --nginx PATH --module PATH [--keep]
Prints one line per check and "scenario: N passed, M failed"; exits 1 on any failure.
Everything listens on 127.0.0.1; the run is bounded (about 30 s).
"""
import argparse
import asyncio
import http.server as httpserver
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = os.path.join(HERE, "..", "schema", "kylin_status.schema.json")


def status_problems(doc, prom_text):
    """Schema errors of a real status document, and malformed Prometheus lines."""
    import jsonschema
    with open(SCHEMA) as f:
        schema = json.load(f)
    problems = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
    import re
    sample = re.compile(r'^[a-z_]+(\{[a-z_]+="(?:[^"\\]|\\.)*"(?:,[a-z_]+="(?:[^"\\]|\\.)*")*\})? -?[0-9.e+-]+$')
    for line in prom_text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        if not sample.match(line):
            problems.append("bad Prometheus line: " + line)
    return problems
FACTOR = 1.25
NODE_DELAY = 0.2
FLOOD = 36


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class StandIn(httpserver.ThreadingHTTPServer):
    """A small HTTP node for the scenario scripts, serving on 127.0.0.1:port from a thread:
    `answer(path, headers)` returns (status, [(header, value)], body bytes). Counts the
    connections and the requests that reach it."""

    daemon_threads = True

    def __init__(self, port, answer):
        self.connections = self.requests = 0
        node = self

        class Handler(httpserver.BaseHTTPRequestHandler):
            def do_GET(self):
                node.requests += 1
                status, headers, body = answer(self.path, self.headers)
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

    def verify_request(self, request, client_address):
        self.connections += 1
        return True


_SESSION_IDS = itertools.count(1)
_SESSION_IDS_LOCK = threading.Lock()


def local_sessions_node(name, delay=0.0, instant=()):
    """The answer function of a query node whose sessions live on it alone (for StandIn):
    /login creates one (Set-Cookie JSESSIONID, ids unique across nodes); a request with a
    session of another node gets 401; every answer's body is the node's name. Requests take
    `delay` seconds, except paths starting with one of `instant`."""
    sessions = set()

    def answer(path, headers):
        if not any(path.startswith(p) for p in instant):
            time.sleep(delay)
        m = re.search(r"JSESSIONID=([0-9A-F]+)", headers.get("Cookie", ""))
        if path.startswith("/login"):
            with _SESSION_IDS_LOCK:
                sid = "%032X" % next(_SESSION_IDS)
            sessions.add(sid)
            return 200, [("Set-Cookie", "JSESSIONID=%s; Path=/" % sid)], name.encode()
        return (200 if not m or m.group(1) in sessions else 401), [], name.encode()

    return answer


def scenario_main(label, make, skip=None):
    """The command line of a scenario script: --nginx, --module, --keep. `make(nginx, module,
    keep)` returns an object with run(), cleanup() and a list of booleans `results`; `skip(nginx)`
    returns a reason to skip, or None. Prints "LABEL: N passed, M failed"; returns the exit code."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    reason = skip(a.nginx) if skip else None
    if reason:
        print("%s: skipped: %s" % (label, reason))
        return 0
    s = make(os.path.abspath(a.nginx), os.path.abspath(a.module), a.keep)
    try:
        s.run()
    except Exception as e:  # a failed check, not a traceback
        s.results.append(False)
        print("FAILED: scenario ran to the end (aborted: %r)" % (e,))
    finally:
        s.cleanup()
    passed = sum(s.results)
    failed = len(s.results) - passed
    print("%s: %d passed, %d failed" % (label, passed, failed))
    return 1 if failed else 0


def alive(pid):
    """Whether pid runs (a daemonized nginx's exited master may stay a zombie for a while)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_nginx(binary, conf, port, prefix_name="kylin-scenario-"):
    """Starts a daemonized nginx with configuration text `conf` listening on `port`;
    returns (prefix, master pid)."""
    prefix = tempfile.mkdtemp(prefix=prefix_name)
    os.makedirs(os.path.join(prefix, "logs"))
    if os.geteuid() == 0:
        conf = "user root;\n" + conf
    with open(os.path.join(prefix, "nginx.conf"), "w") as f:
        f.write(conf)
    subprocess.run([binary, "-p", prefix, "-c", "nginx.conf"], check=True)
    if not wait_port(port):
        raise RuntimeError("nginx did not start")
    pidfile = os.path.join(prefix, "logs", "nginx.pid")
    for _ in range(100):  # nginx listens before it writes its pid file
        if os.path.exists(pidfile) and os.path.getsize(pidfile) > 0:
            break
        time.sleep(0.05)
    with open(pidfile) as f:
        return prefix, int(f.read().strip())


def stop_nginx(prefix, master, keep=False):
    """Stops nginx gracefully (if it still runs); returns its error log's alarming lines."""
    try:
        os.kill(master, signal.SIGQUIT)
    except OSError:
        pass
    for _ in range(200):
        if not alive(master):
            break
        time.sleep(0.05)
    with open(os.path.join(prefix, "logs", "error.log"), errors="replace") as f:
        bad = [l.strip() for l in f if any(w in l for w in ("[alert]", "[crit]", "[emerg]", "exited on signal"))]
    if keep:
        print("kept", prefix)
    else:
        shutil.rmtree(prefix, ignore_errors=True)
    return bad


def quit_nginx(prefix):
    """Stops the nginx whose pid file is prefix/logs/nginx.pid: QUIT, then KILL after 5 s."""
    try:
        with open(os.path.join(prefix, "logs", "nginx.pid")) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGQUIT)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def drive(name, test):
    """Runs a test object: start(), the coroutine run(), then stop() whatever happened (an
    exception is a failed check). Prints the summary; returns the exit status."""
    try:
        test.start()
        asyncio.run(test.run())
    except Exception as e:  # report, then clean up
        test.check(name, False, "aborted: %r" % (e,))
    finally:
        test.stop()
    passed = sum(test.results)
    failed = len(test.results) - passed
    print("%s: %d passed, %d failed" % (name, passed, failed))
    return 1 if failed else 0


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log warn;
pid logs/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    kylin_upstream kylin_nodes {{
        zone kylin_nodes 128k;
        kylin_balance_factor {factor};
        server 127.0.0.1:{n1};
        server 127.0.0.1:{n2};
        server 127.0.0.1:{n3};
        keepalive 16;
    }}
    kylin_upstream sticky_only {{
        zone sticky_only 128k;
        kylin_balance_factor off;
        server 127.0.0.1:{n1};
        server 127.0.0.1:{n2};
        server 127.0.0.1:{n3};
    }}
    kylin_upstream with_dead {{
        zone with_dead 128k;
        server 127.0.0.1:{dead} max_fails=0;
        server 127.0.0.1:{n1};
        server 127.0.0.1:{n2};
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        proxy_read_timeout 1s;
        location /kylin/ {{ proxy_pass http://kylin_nodes; proxy_http_version 1.1; proxy_set_header Connection ""; }}
        location /off/ {{ proxy_pass http://sticky_only/kylin/; }}
        location /dead/ {{ proxy_pass http://with_dead/kylin/; }}
        location = /status {{ kylin_status; }}
    }}
}}
"""


async def http(port, method, path, headers=None, timeout=10.0, abort_after=None):
    """One HTTP/1.1 request on its own connection: (status, headers dict, body bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: kylin", "Connection: close", "Content-Length: 0"]
        lines += ["%s: %s" % kv for kv in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        if abort_after is not None:
            await asyncio.sleep(abort_after)
            return None, {}, b""
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    hl = head.decode("latin-1").split("\r\n")
    status = int(hl[0].split()[1]) if hl and len(hl[0].split()) > 1 else 0
    hdrs = {}
    for line in hl[1:]:
        k, _, v = line.partition(":")
        hdrs.setdefault(k.strip().lower(), []).append(v.strip())
    return status, hdrs, body


class Scenario:
    def __init__(self, nginx, module, keep):
        self.nginx, self.module, self.keep = nginx, module, keep
        self.results = []
        self.prefix = tempfile.mkdtemp(prefix="kylin-scenario-")
        self.n = free_ports(5)
        self.node_ports, self.dead, self.port = self.n[:3], self.n[3], self.n[4]
        self.procs = []

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s %s: %s" % ("ok  " if ok else "FAIL", name, detail), flush=True)

    def start(self):
        os.makedirs(os.path.join(self.prefix, "logs"))
        os.makedirs(os.path.join(self.prefix, "conf"))
        conf = CONF.format(module=self.module, factor=FACTOR, port=self.port, dead=self.dead,
                           n1=self.node_ports[0], n2=self.node_ports[1], n3=self.node_ports[2])
        if os.geteuid() == 0:
            conf = "user root;\n" + conf
        with open(os.path.join(self.prefix, "conf", "nginx.conf"), "w") as f:
            f.write(conf)
        args = [sys.executable, os.path.join(HERE, "kylin_node.py"), "--delay", str(NODE_DELAY)]
        for p in self.node_ports:
            args += ["--port", str(p)]
        self.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        for p in self.node_ports:
            if not wait_port(p):
                raise RuntimeError("kylin node on %d did not start" % p)
        subprocess.run([self.nginx, "-p", self.prefix, "-c", "conf/nginx.conf"], check=True)
        if not wait_port(self.port):
            raise RuntimeError("nginx did not start")

    def stop(self):
        quit_nginx(self.prefix)
        for p in self.procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if not self.keep:
            shutil.rmtree(self.prefix, ignore_errors=True)
        else:
            print("kept", self.prefix)

    async def node_stats(self, reset=False):
        out = []
        for p in self.node_ports:
            _, _, body = await http(p, "GET", "/__reset" if reset else "/__stats")
            out.append(json.loads(body))
        return out

    async def status(self):
        _, _, body = await http(self.port, "GET", "/status")
        return json.loads(body)

    async def flood(self, prefix, addr, seconds, concurrency=FLOOD):
        """`concurrency` workers, each sending cookie-less slow requests back to back."""
        end = time.time() + seconds
        codes = {}

        async def worker():
            while time.time() < end:
                st, _, _ = await http(self.port, "GET", prefix + "api/cube/list", {"X-Real-IP": addr})
                codes[st] = codes.get(st, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return codes

    async def bound(self):
        limit = math.ceil(FACTOR * FLOOD / 3)
        await self.node_stats(reset=True)
        codes = await self.flood("/kylin/", "10.1.1.1", 3.0)
        s = await self.node_stats()
        peaks = [x["max_in_flight"] for x in s]
        busy = sum(1 for x in s if x["requests"] > 0)
        # A node counts a request until its handler returns, after the response is written;
        # nginx counts it until the response is read. So a node may see the next request
        # arrive before the previous one left its count: one more than the bound, at most.
        self.check("bound", max(peaks) <= limit + 1 and busy == 3 and set(codes) == {200},
                   "flood of %d from one address, per-node peak %s <= %d (the bound, plus the node's own "
                   "count lagging by one), codes %s" % (FLOOD, peaks, limit + 1, codes))
        await self.node_stats(reset=True)
        codes = await self.flood("/off/", "10.1.1.1", 1.5)
        s = await self.node_stats()
        peaks = [x["max_in_flight"] for x in s]
        self.check("bound control", max(peaks) > limit,
                   "same flood with kylin_balance_factor off: per-node peak %s (one node takes it all)" % peaks)

    async def sessions(self):
        users = 20
        cookies = []
        for u in range(users):
            st, h, _ = await http(self.port, "POST", "/kylin/api/user/authentication", {"X-Real-IP": "10.2.%d.1" % u})
            cookie = next((c.split(";")[0] for c in h.get("set-cookie", []) if c.startswith("JSESSIONID=")), None)
            cookies.append(cookie)
        await self.node_stats(reset=True)
        codes = {}

        async def user(cookie):
            for _ in range(8):
                addr = "10.3.%d.%d" % (random.randrange(256), random.randrange(1, 255))
                st, _, _ = await http(self.port, "POST", "/kylin/api/query", {"X-Real-IP": addr, "Cookie": cookie})
                codes[st] = codes.get(st, 0) + 1

        flood = asyncio.ensure_future(self.flood("/kylin/", "10.1.1.1", 2.5))
        await asyncio.gather(*(user(c) for c in cookies if c))
        await flood
        s = await self.node_stats()
        unauthorized = sum(x["unauthorized"] for x in s)
        doc = await self.status()
        learned = doc["upstreams"]["kylin_nodes"]["decisions"]["learned"]
        self.check("sessions", all(cookies) and codes == {200: users * 8} and unauthorized == 0 and learned >= users * 8,
                   "%d users x 8 queries from random addresses during a flood: codes %s, 401s at nodes %d, learned decisions %d"
                   % (users, codes, unauthorized, learned))

    async def faults(self):
        tasks = []
        for i in range(20):  # client aborts mid-request
            tasks.append(http(self.port, "GET", "/kylin/api/cube/x", {"X-Real-IP": "10.4.0.%d" % i}, abort_after=0.05))
        cookie_st, h, _ = await http(self.port, "POST", "/kylin/api/user/authentication", {"X-Real-IP": "10.4.1.1"})
        cookie = h.get("set-cookie", ["x"])[0].split(";")[0]
        for i in range(10):  # upstream timeouts (node sleeps 3 s, proxy_read_timeout 1 s)
            tasks.append(http(self.port, "POST", "/kylin/api/query?sleep=3", {"X-Real-IP": "10.4.1.1", "Cookie": cookie}))
        for i in range(30):  # retries past a dead server
            tasks.append(http(self.port, "GET", "/dead/x", {"X-Real-IP": "10.5.%d.1" % i}))
        res = await asyncio.gather(*tasks, return_exceptions=True)
        timeouts = sum(1 for r in res[20:30] if not isinstance(r, Exception) and r[0] == 504)
        retried = sum(1 for r in res[30:] if not isinstance(r, Exception) and r[0] == 200)
        self.check("faults", timeouts == 10 and retried == 30,
                   "20 client aborts, %d/10 upstream timeouts answered 504, %d/30 requests retried past a dead server" % (timeouts, retried))

    async def reload(self):
        pidfile = os.path.join(self.prefix, "logs", "nginx.pid")
        with open(pidfile) as f:
            pid = int(f.read().strip())

        conf_path = os.path.join(self.prefix, "conf", "nginx.conf")
        n3 = "server 127.0.0.1:%d;" % self.node_ports[2]
        before = sum(x["requests"] for x in (await self.status())["upstreams"]["kylin_nodes"]["servers"])

        async def reloader():
            await asyncio.sleep(0.7)
            os.kill(pid, signal.SIGHUP)  # same configuration
            await asyncio.sleep(0.7)
            with open(conf_path) as f:
                conf = f.read()
            with open(conf_path, "w") as f:  # new weight for node 3 in kylin_nodes
                f.write(conf.replace(n3, n3[:-1] + " weight=2;", 1))
            os.kill(pid, signal.SIGHUP)

        codes, _ = await asyncio.gather(self.flood("/kylin/", "10.6.6.6", 2.5, concurrency=12), reloader())
        await asyncio.sleep(0.5)
        doc = await self.status()
        weights = [x["weight"] for x in doc["upstreams"]["kylin_nodes"]["servers"]]
        after = sum(x["requests"] for x in doc["upstreams"]["kylin_nodes"]["servers"])
        self.check("reload", set(codes) == {200} and weights == [1, 1, 2] and after >= before + sum(codes.values()),
                   "two reloads (the second changing a weight) during a flood: codes %s, weights now %s, "
                   "requests counted %d before and %d after (counters survive reloads)" % (codes, weights, before, after))

    async def counters(self):
        deadline = time.time() + 10
        while True:
            doc = await self.status()
            flights = {name: [u["in_flight"]] + [s["in_flight"] for s in u["servers"]] for name, u in doc["upstreams"].items()}
            if all(v == 0 for f in flights.values() for v in f) or time.time() > deadline:
                break
            await asyncio.sleep(0.2)
        self.check("counters", all(v == 0 for f in flights.values() for v in f),
                   "in flight after the run (upstream total, then per server): %s" % flights)
        _, _, prom = await http(self.port, "GET", "/status?format=prometheus")
        problems = status_problems(doc, prom.decode())
        self.check("status schema", not problems,
                   "the status page validates against schema/kylin_status.schema.json and its Prometheus text parses"
                   if not problems else "; ".join(problems[:3]))
        with open(os.path.join(self.prefix, "logs", "error.log"), errors="replace") as f:
            bad = [l.strip() for l in f if "[alert]" in l or "[crit]" in l or "[emerg]" in l or "exited on signal" in l]
        self.check("error log", not bad, "no alert, crit, emerg or crashed worker" if not bad else "; ".join(bad[:3]))

    async def run(self):
        await self.bound()
        await self.sessions()
        await self.faults()
        await self.reload()
        await asyncio.sleep(3.5)  # the timed-out requests' node threads finish; old workers exit
        await self.counters()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--keep", action="store_true", help="keep the nginx prefix for inspection")
    args = ap.parse_args()
    random.seed(7)
    return drive("scenario", Scenario(os.path.abspath(args.nginx), os.path.abspath(args.module), args.keep))


if __name__ == "__main__":
    sys.exit(main())
