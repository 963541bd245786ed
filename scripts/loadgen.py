#!/usr/bin/env python3
"""Load generator for Kylin query nodes behind nginx, and the benchmark suite of scripts/bench.

Clients come from many addresses of 127.0.0.0/8, each in its own /24 (127.10.N.1): Linux
routes all of 127/8 to lo, so nginx sees distinct client addresses without realip. Two kinds:

  BI servers     a few addresses, each running many user sessions at once: log in, run a
                 few dozen queries from the server's small hot query set (plus some ad hoc
                 ones), log in again as a new session;
  light clients  many addresses, one user each, an occasional query from their own set.

Every user keeps its JSESSIONID cookie; a 401 means it had to log in again (counted, and it
logs in again). Per-node load comes from each node's /__stats (kylin_node.py), sampled.

  loadgen.py run --url http://127.0.0.1:8080 --node 127.0.0.1:7071 ... [--duration 20]
  loadgen.py suite --nginx NGINX --module MODULE [--quick] [--out bench]   (scripts/bench)

Only addresses in 127.0.0.0/8 are ever contacted; every loop ends with the run's duration.
"""
import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REQUEST_TIMEOUT = 15.0


def loopback(host):
    if not host.startswith("127."):
        raise SystemExit("refusing to contact %s: only 127.0.0.0/8 is allowed" % host)
    return host


# ---------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client bound to a chosen source address.

class Client:
    """keepalive=False: one connection per request (Connection: close)."""

    def __init__(self, host, port, src=None, keepalive=True):
        self.host, self.port, self.src = loopback(host), port, src
        self.keepalive = keepalive
        self.reader = self.writer = None

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
        self.reader = self.writer = None

    async def _connect(self):
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, local_addr=(self.src, 0) if self.src else None)

    async def request(self, method, path, headers=None, body=b"", timeout=REQUEST_TIMEOUT):
        return await asyncio.wait_for(self._request(method, path, headers or {}, body), timeout)

    async def _request(self, method, path, headers, body):
        for attempt in (0, 1):
            reused = self.writer is not None
            if not reused:
                await self._connect()
            head = "%s %s HTTP/1.1\r\nHost: kylin\r\nContent-Length: %d\r\n" % (method, path, len(body))
            head += "".join("%s: %s\r\n" % kv for kv in headers.items())
            head += ("" if self.keepalive else "Connection: close\r\n") + "\r\n"
            try:
                self.writer.write(head.encode() + body)
                await self.writer.drain()
                line = await self.reader.readuntil(b"\r\n")
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                self.close()
                if reused and attempt == 0:
                    continue  # a keep-alive connection the server had closed
                raise
            try:
                return await self._response(line)
            except BaseException:
                self.close()
                raise

    async def _response(self, line):
        status = int(line.split()[1])
        raw = await self.reader.readuntil(b"\r\n\r\n")
        headers = []
        for h in raw.decode("latin-1").split("\r\n"):
            if ":" in h:
                k, _, v = h.partition(":")
                headers.append((k.strip().lower(), v.strip()))
        hd = dict(headers)
        if "content-length" in hd:
            body = await self.reader.readexactly(int(hd["content-length"]))
        elif hd.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                body += await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            body = await self.reader.read()
            self.close()
        if hd.get("connection", "").lower() == "close" or not self.keepalive:
            self.close()
        return status, headers, body


async def get_json(host, port, path, timeout=2.0):
    c = Client(host, port)
    try:
        status, _, body = await c.request("GET", path, timeout=timeout)
        return json.loads(body) if status == 200 else None
    except Exception:
        return None
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# The workload.

class Workload:
    def __init__(self, quick=False):
        self.bi_servers = 3
        self.bi_sessions = 20          # concurrent user sessions per BI server
        self.bi_think = 0.08           # mean seconds between a session's queries
        self.bi_queries = (15, 40)     # queries per session before it logs in again
        self.bi_hot = 100              # hot query set per BI server
        self.bi_adhoc = 0.10           # share of ad hoc (never repeated) queries
        self.light = 60
        self.light_think = 1.5
        self.light_set = 10
        self.seed = 7

    def describe(self):
        return dict(self.__dict__)


class Recorder:
    def __init__(self, t0):
        self.t0 = t0
        self.queries = []   # (t, latency_s, status, node)
        self.logins = []    # (t, latency_s, status, node)
        self.errors = []    # (t, kind)
        self.placement = {}  # client address -> {node: responses}

    def note_node(self, addr, node):
        if node:
            d = self.placement.setdefault(addr, {})
            d[node] = d.get(node, 0) + 1


def node_of(body):
    i = body.find(b'"node": "')
    if i < 0:
        return None
    j = body.find(b'"', i + 9)
    return body[i + 9:j].decode()


def session_cookie(headers):
    for k, v in headers:
        if k == "set-cookie" and v.startswith("JSESSIONID="):
            val = v[len("JSESSIONID="):].split(";")[0]
            return val or None
    return None


async def user(rec, host, port, addr, queries, think, per_session, end, rnd, keepalive=True):
    """One user: logs in, queries, logs in again after per_session queries or a 401."""
    c = Client(host, port, addr, keepalive)
    cookie, left = None, 0
    try:
        while time.monotonic() < end:
            if cookie is None:
                t = time.monotonic()
                try:
                    st, hdrs, body = await c.request("POST", "/kylin/api/user/authentication",
                                                     body=b'{"username":"ADMIN"}')
                except Exception as e:
                    c.close()
                    rec.errors.append((t - rec.t0, "login:" + type(e).__name__))
                    await asyncio.sleep(0.2)
                    continue
                rec.logins.append((t - rec.t0, time.monotonic() - t, st, node_of(body)))
                cookie = session_cookie(hdrs) if st == 200 else None
                if cookie is None:
                    rec.errors.append((t - rec.t0, "login:%d" % st))
                    await asyncio.sleep(0.2)
                    continue
                left = rnd.randint(*per_session) if per_session else 1 << 30
            q = queries(rnd)
            t = time.monotonic()
            try:
                st, _, body = await c.request("POST", "/kylin/api/query?q=" + q,
                                              {"Cookie": "JSESSIONID=" + cookie},
                                              body=('{"sql":"%s"}' % q).encode())
            except Exception as e:
                c.close()
                rec.queries.append((t - rec.t0, time.monotonic() - t, 0, None))
                rec.errors.append((t - rec.t0, "query:" + type(e).__name__))
                await asyncio.sleep(0.2)
                continue
            node = node_of(body)
            rec.queries.append((t - rec.t0, time.monotonic() - t, st, node))
            rec.note_node(addr, node)
            if st == 401:
                cookie = None       # the user has to log in again
                continue
            if st >= 500:
                rec.errors.append((t - rec.t0, "query:%d" % st))
            left -= 1
            if left <= 0:
                cookie = None       # the session ends; the next user of this BI server logs in
            await asyncio.sleep(max(0.0, min(rnd.expovariate(1.0 / think), think * 10,
                                             end - time.monotonic())))
    finally:
        c.close()


async def sampler(nodes, rec, end, status_port=None, interval=0.25):
    """Samples every node's /__stats (and the kylin status page) until end."""
    samples, status = [], []
    next_status = 0.0
    while time.monotonic() < end:
        t = time.monotonic()
        docs = await asyncio.gather(*(get_json(h, p, "/__stats", 1.0) for h, p in nodes))
        samples.append((t - rec.t0, docs))
        if status_port and t >= next_status:
            doc = await get_json("127.0.0.1", status_port, "/kylin-status", 1.0)
            status.append((t - rec.t0, slim_status(doc)))
            next_status = t + 1.0
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - t)))
    return samples, status


def slim_status(doc):
    if not doc or not doc.get("upstreams"):
        return None
    up = next(iter(doc["upstreams"].values()))
    store = up.get("session_store") or {}
    return {"decisions": up.get("decisions"), "in_flight": up.get("in_flight"),
            "breaker": store.get("breaker") or store.get("circuit_breaker"),
            "store": {k: v for k, v in store.items() if isinstance(v, (int, float, str))},
            "servers": [{k: s.get(k) for k in ("server", "state", "in_flight", "requests", "spilled_out", "failures")}
                        for s in up.get("servers", [])]}


def client_addresses(w):
    """BI servers and light clients, each in its own /24 of 127.10.0.0/16."""
    bi = ["127.10.%d.1" % (1 + i) for i in range(w.bi_servers)]
    light = ["127.10.%d.1" % (101 + i) for i in range(w.light)]
    return bi, light


async def run_load(w, host, port, nodes, duration, status_port=None, events=(), keepalive=True):
    """Runs the workload for `duration` seconds; `events` are (t, coroutine function) faults."""
    t0 = time.monotonic()
    end = t0 + duration
    rec = Recorder(t0)
    master = random.Random(w.seed)
    bi, light = client_addresses(w)
    tasks = []
    for b, addr in enumerate(bi):
        hot = ["bi%d-q%d" % (b, i) for i in range(w.bi_hot)]
        counter = [0]

        def pick(rnd, hot=hot, b=b, counter=counter):
            if rnd.random() < w.bi_adhoc:
                counter[0] += 1
                return "bi%d-adhoc%d-%d" % (b, counter[0], rnd.randrange(1 << 30))
            return hot[min(int(rnd.paretovariate(1.2)) - 1, len(hot) - 1)] if rnd.random() < 0.5 \
                else rnd.choice(hot)
        for s in range(w.bi_sessions):
            rnd = random.Random(master.random())
            tasks.append(user(rec, host, port, addr, pick, w.bi_think, w.bi_queries, end, rnd, keepalive))
    for n, addr in enumerate(light):
        own = ["c%d-q%d" % (n, i) for i in range(w.light_set)]
        rnd = random.Random(master.random())
        tasks.append(user(rec, host, port, addr, lambda r, own=own: r.choice(own),
                          w.light_think, None, end, rnd, keepalive))
    # Start the users spread over the first 0.5 s, not all in the same millisecond.
    async def later(delay, coro):
        await asyncio.sleep(delay)
        await coro
    jobs = [asyncio.ensure_future(later(master.random() * 0.5, t)) for t in tasks]

    async def fault(at, fn):
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        if time.monotonic() < end:
            await fn()
    faults = [asyncio.ensure_future(fault(at, fn)) for at, fn in events]
    samp = asyncio.ensure_future(sampler(nodes, rec, end, status_port))
    done, pending = await asyncio.wait(jobs, timeout=duration + REQUEST_TIMEOUT + 2)
    for j in pending:
        j.cancel()
    for j in done:
        if j.exception() is not None:
            rec.errors.append((duration, "task:" + repr(j.exception())))
    await asyncio.gather(*faults, return_exceptions=True)
    samples, status = await samp
    return rec, samples, status


# ---------------------------------------------------------------------------------------------
# Numbers.

def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(round(p * (len(sorted_vals) - 1))))]


def counter_delta(samples, i, key, t_from, t_to):
    """Increase of a node counter between two times, across node restarts (counter resets)."""
    total, prev = 0, None
    for t, docs in samples:
        if t < t_from or t > t_to:
            continue
        d = docs[i]
        if d is None:
            continue
        v = d.get(key, 0)
        if prev is not None:
            total += v - prev if v >= prev else v
        prev = v
    return total


def node_names(samples, n):
    names = ["node%d" % (i + 1) for i in range(n)]
    for _, docs in samples:
        for i, d in enumerate(docs):
            if d:
                names[i] = d["node"]
    return names


def summarize(rec, samples, duration, warmup, nodes):
    n = len(nodes)
    q = [x for x in rec.queries if x[0] >= warmup]
    ok = sorted(x[1] for x in q if x[2] == 200)
    span = duration - warmup
    names = node_names(samples, n)
    in_flight = [[d["in_flight"] if d else 0 for d in docs] for t, docs in samples if t >= warmup]
    avg = [sum(s[i] for s in in_flight) / max(1, len(in_flight)) for i in range(n)]
    reqs = [counter_delta(samples, i, "requests", warmup, duration + 99) for i in range(n)]
    hits = sum(counter_delta(samples, i, "cache_hits", warmup, duration + 99) for i in range(n))
    misses = sum(counter_delta(samples, i, "cache_misses", warmup, duration + 99) for i in range(n))
    mean_avg, mean_req = sum(avg) / n, sum(reqs) / n
    peaks = [max([d["queue_peak"] for _, docs in samples for d in [docs[i]] if d] or [0]) for i in range(n)]
    return {
        "queries_ok": len(ok),
        "throughput_qps": round(len(ok) / span, 1),
        "p50_ms": round(pct(ok, 0.50) * 1000, 1),
        "p90_ms": round(pct(ok, 0.90) * 1000, 1),
        "p99_ms": round(pct(ok, 0.99) * 1000, 1),
        "max_ms": round((ok[-1] if ok else float("nan")) * 1000, 1),
        "unauthorized_401": sum(1 for x in q if x[2] == 401),
        "errors": sum(1 for x in q if x[2] == 0 or x[2] >= 500)
        + sum(1 for e in rec.errors if e[0] >= warmup and e[1].startswith("login:")),
        "logins": sum(1 for x in rec.logins if x[0] >= warmup),
        "cache_hit_ratio": round(hits / (hits + misses), 3) if hits + misses else None,
        "busiest_over_mean_in_flight": round(max(avg) / mean_avg, 2) if mean_avg else None,
        "busiest_over_mean_requests": round(max(reqs) / mean_req, 2) if mean_req else None,
        "per_node": {names[i]: {"mean_in_flight": round(avg[i], 2), "requests": reqs[i],
                                "queue_peak": peaks[i]} for i in range(n)},
    }


def per_second(rec, samples, duration, nodes):
    """Per-second series: ok queries, 401s, errors, p99, and per-node requests and in-flight."""
    secs = int(math.ceil(duration))
    out = {"t": list(range(secs)), "ok": [0] * secs, "unauthorized": [0] * secs,
           "errors": [0] * secs, "p99_ms": [None] * secs}
    lat = [[] for _ in range(secs)]
    for t, l, st, _ in rec.queries:
        s = min(secs - 1, int(t))
        if st == 200:
            out["ok"][s] += 1
            lat[s].append(l)
        elif st == 401:
            out["unauthorized"][s] += 1
        else:
            out["errors"][s] += 1
    for s in range(secs):
        if lat[s]:
            out["p99_ms"][s] = round(pct(sorted(lat[s]), 0.99) * 1000, 1)
    names = node_names(samples, len(nodes))
    out["node_in_flight"] = {}
    out["node_requests"] = {}
    for i, name in enumerate(names):
        inf, rq = [], []
        for s in range(secs):
            vals = [d[i]["in_flight"] for t, d in samples if s <= t < s + 1 and d[i]]
            inf.append(round(sum(vals) / len(vals), 2) if vals else None)
            rq.append(counter_delta(samples, i, "requests", s, s + 1.0))
        out["node_in_flight"][name] = inf
        out["node_requests"][name] = rq
    return out


def latency_quantiles(rec, warmup):
    ok = sorted(x[1] for x in rec.queries if x[0] >= warmup and x[2] == 200)
    qs = [i / 200 for i in range(201)]
    return {"q": qs, "ms": [round(pct(ok, p) * 1000, 2) for p in qs]}


def placement(rec, w):
    bi, _ = client_addresses(w)
    out = {}
    for addr in bi:
        d = rec.placement.get(addr, {})
        total = sum(d.values()) or 1
        out[addr] = {k: round(v / total, 2) for k, v in sorted(d.items())}
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark suite: processes, configurations, faults, charts, results.md.

BALANCERS = [
    ("kylin", "kylin (factor 1.25)"),
    ("ip_hash", "ip_hash"),
    ("hash", "hash $remote_addr consistent"),
    ("round_robin", "round robin"),
    ("least_conn", "least_conn"),
]

NGINX_CONF = """load_module {module};
worker_processes 2;
error_log logs/error.log warn;
pid logs/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {upstream}
    server {{
        listen 127.0.0.1:{port};
        location /kylin/ {{
            proxy_pass http://nodes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 30s;
        }}
        location = /kylin-status {{ kylin_status; }}
    }}
}}
"""


def upstream_block(balancer, node_ports, store_port):
    servers = "".join("        server 127.0.0.1:%d max_fails=1 fail_timeout=3s;\n" % p for p in node_ports)
    if balancer == "kylin":
        store = ("        kylin_session_store redis://127.0.0.1:%d format=tomcat;\n" % store_port
                 if store_port else "")
        return ("kylin_upstream nodes {\n        zone nodes 256k;\n" + store + servers
                + "        keepalive 64;\n    }")
    method = {"ip_hash": "ip_hash;", "hash": "hash $remote_addr consistent;",
              "round_robin": "", "least_conn": "least_conn;"}[balancer]
    return ("upstream nodes {\n        %s\n        zone nodes 256k;\n" % method + servers
            + "        keepalive 64;\n    }")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class Procs:
    """Every process the suite starts; all of them are stopped on exit, error or signal."""

    def __init__(self):
        self.procs = {}

    def start(self, name, args, port=None, **kw):
        self.stop(name)
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL),
                             stdin=subprocess.DEVNULL, **kw)
        self.procs[name] = p
        if port and not wait_port(port):
            raise RuntimeError("%s did not start listening on %d" % (name, port))
        return p

    def stop(self, name, sig=signal.SIGTERM):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(sig)
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def kill(self, name):
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(5)

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


class DelayProxy:
    """A TCP proxy in front of Redis; while `delay` > 0 each reply chunk waits that long."""

    def __init__(self, target_port):
        self.target, self.delay, self.server, self.port = target_port, 0.0, None, None
        self.writers = set()

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, cr, cw):
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            cw.close()
            return
        self.writers |= {cw, uw}

        async def pipe(r, w, delayed):
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    if delayed and self.delay:
                        await asyncio.sleep(self.delay)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    w.close()
                except Exception:
                    pass
        await asyncio.gather(pipe(cr, uw, False), pipe(ur, cw, True))
        self.writers -= {cw, uw}

    async def close(self):
        if self.server:
            self.server.close()
        for w in list(self.writers):
            w.close()
        await asyncio.sleep(0.2)


class Suite:
    def __init__(self, args):
        self.args = args
        self.procs = Procs()
        self.tmp = tempfile.mkdtemp(prefix="kylin-bench-")
        self.out = os.path.join(args.out, "results")
        os.makedirs(self.out, exist_ok=True)
        self.node_ports = [free_port() for _ in range(4)]
        self.redis_port = free_port()
        self.nginx_port = free_port()
        self.quick = args.quick
        self.duration = 10.0 if self.quick else 30.0
        self.warmup = 2.0 if self.quick else 5.0
        self.workload = Workload(self.quick)
        self.results = []

    # processes -----------------------------------------------------------------------------
    def start_redis(self):
        rdir = os.path.join(self.tmp, "redis")
        os.makedirs(rdir, exist_ok=True)
        self.procs.start("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", rdir,
                                   "--dbfilename", "dump.rdb", "--protected-mode", "yes"],
                         port=self.redis_port)

    def redis_cmd(self, *cmd):
        return subprocess.run(["redis-cli", "-p", str(self.redis_port)] + list(cmd),
                              capture_output=True, text=True, timeout=10).stdout.strip()

    def node_args(self, i, shared):
        a = [sys.executable, os.path.join(HERE, "kylin_node.py"), "--port", str(self.node_ports[i]),
             "--name", "node%d" % (i + 1), "--slots", "4", "--cache", "--cache-size", "256",
             "--hit-ms", "5", "--miss-ms", "60", "--tcp-nodelay"]
        if shared:
            a += ["--redis-port", str(self.redis_port)]
        return a

    def start_node(self, i, shared):
        self.procs.start("node%d" % i, self.node_args(i, shared), port=self.node_ports[i])

    def start_nginx(self, balancer, shared):
        prefix = os.path.join(self.tmp, "nginx")
        shutil.rmtree(prefix, ignore_errors=True)
        os.makedirs(os.path.join(prefix, "logs"))
        os.makedirs(os.path.join(prefix, "conf"))
        conf = NGINX_CONF.format(module=self.args.module, port=self.nginx_port,
                                 upstream=upstream_block(balancer, self.node_ports,
                                                         self.proxy.port if shared else None))
        with open(os.path.join(prefix, "conf", "nginx.conf"), "w") as f:
            f.write(conf)
        self.last_conf = conf
        self.procs.start("nginx", [self.args.nginx, "-p", prefix, "-c", "conf/nginx.conf",
                                   "-g", "daemon off;"], port=self.nginx_port)

    # one run -------------------------------------------------------------------------------
    async def one(self, balancer, shared, fault=None):
        mode = "shared" if shared else "local"
        name = "%s-%s%s" % (balancer, mode, "-" + fault if fault else "")
        self.redis_cmd("FLUSHALL")
        self.proxy.delay = 0.0
        for i in range(4):
            self.start_node(i, shared)
        self.start_nginx(balancer, shared)
        dur = self.duration + (4.0 if self.quick and fault else 0.0)
        f_at, f_end = (dur * 0.35, dur * 0.35 + (4.0 if self.quick else 6.0)) if fault else (None, None)
        events = []
        loop = asyncio.get_running_loop()
        if fault == "node-kill":
            victim = 1  # node2
            async def kill():
                self.procs.kill("node%d" % victim)
            async def restart():
                await loop.run_in_executor(None, self.start_node, victim, shared)
            events = [(f_at, kill), (f_end, restart)]
        elif fault == "redis-stop":
            async def stop():
                await loop.run_in_executor(None, self.redis_cmd, "SHUTDOWN", "SAVE")
                self.procs.procs.pop("redis", None)
            async def start():
                await loop.run_in_executor(None, self.start_redis)
            events = [(f_at, stop), (f_end, start)]
        elif fault == "redis-slow":
            async def slow():
                self.proxy.delay = 0.3
            async def fast():
                self.proxy.delay = 0.0
            events = [(f_at, slow), (f_end, fast)]
        print("  %-34s" % name, end="", flush=True)
        t = time.monotonic()
        nodes = [("127.0.0.1", p) for p in self.node_ports]
        keepalive = not self.args.close_connections
        rec, samples, status = await run_load(self.workload, "127.0.0.1", self.nginx_port, nodes, dur,
                                              self.nginx_port if balancer == "kylin" else None, events,
                                              keepalive)
        final = await get_json("127.0.0.1", self.nginx_port, "/kylin-status", 2.0)
        self.procs.stop("nginx", signal.SIGQUIT)
        for i in range(4):
            self.procs.stop("node%d" % i)
        if fault == "redis-stop" and "redis" not in self.procs.procs:
            self.start_redis()
        summ = summarize(rec, samples, dur, self.warmup, nodes)
        series = per_second(rec, samples, dur, nodes)
        res = {"name": name, "balancer": balancer, "sessions": mode, "fault": fault,
               "client_keepalive": keepalive,
               "duration_s": dur, "warmup_s": self.warmup, "summary": summ,
               "bi_server_placement": placement(rec, self.workload),
               "latency_quantiles": latency_quantiles(rec, self.warmup),
               "per_second": series, "kylin_status_final": slim_status(final),
               "kylin_status_series": status, "errors_sample": rec.errors[:20],
               "nginx_conf_upstream": upstream_block(balancer, self.node_ports,
                                                     self.proxy.port if shared else None)}
        if fault:
            res["fault_window_s"] = [round(f_at, 1), round(f_end, 1)]
            res["fault_summary"] = fault_summary(rec, series, f_at, f_end, dur, fault)
        with open(os.path.join(self.out, name + ".json"), "w") as f:
            json.dump(res, f, indent=1)
        self.results.append(res)
        s = summ
        print("%6.1f q/s  p50 %6.1f  p99 %7.1f ms  busiest/mean %4.2f  hit %.2f  401 %4d  err %3d  (%.0fs)"
              % (s["throughput_qps"], s["p50_ms"], s["p99_ms"], s["busiest_over_mean_in_flight"] or 0,
                 s["cache_hit_ratio"] or 0, s["unauthorized_401"], s["errors"], time.monotonic() - t),
              flush=True)
        return res

    async def main(self):
        started = time.monotonic()
        self.start_redis()
        self.proxy = DelayProxy(self.redis_port)
        await self.proxy.start()
        print("cluster: 4 nodes (4 slots, result cache 256, hit 5 ms, miss 60 ms), redis :%d, nginx :%d"
              % (self.redis_port, self.nginx_port), flush=True)
        plan = [(b, s, None) for s in (False, True) for b, _ in BALANCERS]
        if self.quick:
            plan += [("kylin", False, "node-kill"), ("ip_hash", False, "node-kill")]
        else:
            plan += [(b, False, "node-kill") for b, _ in BALANCERS]
            plan += [(b, True, f) for f in ("redis-stop", "redis-slow") for b in ("kylin", "ip_hash", "round_robin")]
        if self.args.only:
            only = self.args.only.split(",")
            plan = [p for p in plan if "%s-%s%s" % (p[0], "shared" if p[1] else "local",
                                                     "-" + p[2] if p[2] else "") in only]
        for b, s, f in plan:
            await self.one(b, s, f)
        await self.proxy.close()
        self.elapsed = time.monotonic() - started
        charts(self.results, self.out)
        write_markdown(self, os.path.join(self.args.out, "results.md"))
        print("wrote %s/*.json, *.png and %s/results.md in %.0f s"
              % (self.out, self.args.out, self.elapsed))


def fault_summary(rec, series, f_at, f_end, dur, fault):
    inside = [x for x in rec.queries if f_at <= x[0] < f_end + 1.0]
    ok = sorted(x[1] for x in inside if x[2] == 200)
    after = [x for x in rec.queries if f_end + 1.0 <= x[0]]
    out = {"errors_during": sum(1 for x in inside if x[2] == 0 or x[2] >= 500),
           "unauthorized_during": sum(1 for x in inside if x[2] == 401),
           "errors_after": sum(1 for x in after if x[2] == 0 or x[2] >= 500),
           "unauthorized_after": sum(1 for x in after if x[2] == 401),
           "p99_during_ms": round(pct(ok, 0.99) * 1000, 1),
           "recovery_s": None}
    names = list(series["node_requests"])
    req = series["node_requests"]
    secs = len(series["t"])

    def share(node, s):
        tot = sum(req[n][s] for n in names)
        return req[node][s] / tot if tot else 0.0
    if fault == "node-kill":
        victim = "node2"
        pre = [share(victim, s) for s in range(2, int(f_at))]
        base = sum(pre) / len(pre) if pre else 0.25
        out["victim_share_before"] = round(base, 3)
        for s in range(int(math.ceil(f_end)), secs):
            if share(victim, s) >= 0.5 * base:
                out["recovery_s"] = s + 1 - round(f_end, 1)
                break
    else:
        def ratio(s):
            v = [series["node_in_flight"][n][s] or 0 for n in names]
            m = sum(v) / len(v)
            return max(v) / m if m else 1.0
        pre = sorted(ratio(s) for s in range(2, int(f_at)))
        base = pre[len(pre) // 2] if pre else 1.0
        out["busiest_over_mean_before"] = round(base, 2)
        for s in range(int(math.ceil(f_end)), secs):
            if ratio(s) <= max(1.3, base * 1.2):
                out["recovery_s"] = s + 1 - round(f_end, 1)
                break
    if out["recovery_s"] is not None:
        out["recovery_s"] = round(max(0.0, out["recovery_s"]), 1)
    return out


# ---------------------------------------------------------------------------------------------
# Charts.

def charts(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    label = dict(BALANCERS)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for mode in ("local", "shared"):
        runs = [r for r in results if r["sessions"] == mode and not r["fault"]]
        if not runs:
            continue
        fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.1 * len(runs) + 0.6), sharex=True, sharey=True,
                                 squeeze=False)
        axes = axes[:, 0]
        for ax, r in zip(axes, runs):
            ser = r["per_second"]
            for k, (node, vals) in enumerate(sorted(ser["node_in_flight"].items())):
                ax.plot([t + 0.5 for t in ser["t"]], [v if v is not None else float("nan") for v in vals],
                        color=colors[k % 4], label=node, lw=1.6)
            s = r["summary"]
            ax.set_title("%s: busiest/mean %.2f, p99 %.0f ms, cache hits %.0f%%, 401s %d"
                         % (label[r["balancer"]], s["busiest_over_mean_in_flight"] or 0, s["p99_ms"],
                            100 * (s["cache_hit_ratio"] or 0), s["unauthorized_401"]), fontsize=9, loc="left")
            ax.axvspan(0, r["warmup_s"], color="0.92")
            ax.set_ylabel("in flight\n(run + queue)", fontsize=8)
            ax.grid(alpha=0.3)
        axes[0].legend(ncol=4, fontsize=8, loc="upper right")
        axes[-1].set_xlabel("seconds (grey: warm-up, not counted)")
        fig.suptitle("Per-node load over time, %s sessions (4 query slots per node)" % (
            "node-local" if mode == "local" else "Redis-shared"), fontsize=11)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "load-%s.png" % mode), dpi=90)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, mode in zip(axes, ("local", "shared")):
        for r in [r for r in results if r["sessions"] == mode and not r["fault"]]:
            lq = r["latency_quantiles"]
            ax.plot(lq["ms"], [100 * q for q in lq["q"]], label=label[r["balancer"]], lw=1.8)
        ax.set_xscale("log")
        ax.set_xlabel("query latency, ms (log)")
        ax.set_title("%s sessions" % ("node-local" if mode == "local" else "Redis-shared"), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.axhline(99, color="0.5", lw=0.8, ls="--")
    axes[0].set_ylabel("% of queries at or below")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
            break
    fig.suptitle("Query latency distribution (CDF; dashed: p99)", fontsize=11)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency.png"), dpi=90)
    plt.close(fig)

    for fault in sorted({r["fault"] for r in results if r["fault"]}):
        runs = [r for r in results if r["fault"] == fault]
        fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.3 * len(runs) + 0.6), sharex=True, squeeze=False)
        axes = axes[:, 0]
        for ax, r in zip(axes, runs):
            ser = r["per_second"]
            for k, (node, vals) in enumerate(sorted(ser["node_requests"].items())):
                ax.plot([t + 0.5 for t in ser["t"]], vals, color=colors[k % 4], label=node, lw=1.5)
            bad = [a + b for a, b in zip(ser["unauthorized"], ser["errors"])]
            ax.bar([t + 0.5 for t in ser["t"]], bad, color="k", alpha=0.35, width=0.8, label="401 + errors")
            a, b = r["fault_window_s"]
            ax.axvspan(a, b, color="#ffdddd")
            fs = r["fault_summary"]
            ax.set_title("%s (%s sessions): errors %d, 401s %d during; 401s %d after; recovery %s"
                         % (label[r["balancer"]], r["sessions"], fs["errors_during"], fs["unauthorized_during"],
                            fs["unauthorized_after"],
                            "%.0f s" % fs["recovery_s"] if fs["recovery_s"] is not None else "not within the run"),
                         fontsize=9, loc="left")
            ax.set_ylabel("requests/s", fontsize=8)
            ax.grid(alpha=0.3)
        axes[0].legend(ncol=5, fontsize=8, loc="upper right")
        axes[-1].set_xlabel("seconds (red: fault)")
        fig.suptitle("Fault: %s; per-node requests per second" % fault, fontsize=11)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "fault-%s.png" % fault), dpi=90)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# results.md

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"


def write_markdown(suite, path):
    label = dict(BALANCERS)
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    lines = [
        "# Benchmarks: kylin vs stock nginx balancers on a simulated Kylin cluster",
        "",
        "Written by `scripts/bench%s` on %s, %.0f s wall time." % (
            " --quick" if suite.quick else "", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            suite.elapsed),
        "",
        "Reproduce: `scripts/bench%s` (from a clean clone; it installs what it needs)." % (
            " --quick" if suite.quick else ""),
        "",
        "Machine: %s cores (%s), %s, kernel %s; %s; Python %s." % (
            sh("nproc"), cpu or "?", "memory " + sh("free -h | awk '/^Mem:/{print $2}'") + " (`free -h`)",
            platform.release(), sh("%s -v 2>&1" % suite.args.nginx), platform.python_version()),
        "",
        "```",
        sh("free -h"),
        "```",
        "",
        "## Setup",
        "",
        "- One nginx binary (the vendored 1.28 build, 2 workers, the module loaded in every run), "
        "`keepalive 64`, `max_fails=1 fail_timeout=3s` on every server; only the balancing "
        "method changes.",
        "- 4 simulated Kylin nodes (`scripts/kylin_node.py --slots 4 --cache --cache-size 256 "
        "--hit-ms 5 --miss-ms 60`): each runs 4 queries at once and queues the rest; a query is "
        "fast (5 ms) only on a node that answered it recently (per-node LRU of 256 results), "
        "60 ms otherwise. Node-local sessions: a query with a session another node created gets "
        "401. Redis-shared sessions (`--redis-port`): login does `SET <id> EX`; a node accepts a "
        "session that is local or whose key exists in Redis.",
        "- Load (`scripts/loadgen.py`), every client from its own /24 of 127.10.0.0/16: "
        "%(bi_servers)d BI servers each running %(bi_sessions)d user sessions at once (mean think "
        "time %(bi_think)s s, %(bi_queries)s queries per session then a new login, a hot set of "
        "%(bi_hot)d queries per BI server, %(adhoc)d%% ad hoc queries) and %(light)d light clients "
        "(one user each, a query every %(light_think)s s on average from its own %(light_set)d). "
        "A 401 counts and the user logs in again." % dict(suite.workload.describe(),
                                                          adhoc=int(100 * suite.workload.bi_adhoc)),
        "- %.0f s per run, the first %.0f s (warm-up) not counted; nodes restarted (cold caches, "
        "no sessions) and Redis flushed before every run. Kylin in the shared case: "
        "`kylin_session_store redis://... format=tomcat` (default timeout 100ms)." % (
            suite.duration, suite.warmup),
        "- Busiest/mean: the busiest node's time-averaged in-flight requests (running + queued, "
        "sampled every 0.25 s from each node) over the mean of the 4 nodes; 1.00 is perfect. "
        "Cache hits: share of queries answered from the node's result cache. Errors: 5xx and "
        "failed connections seen by clients.",
    ]
    if any(not r["client_keepalive"] for r in suite.results):
        lines.append(
            "- Every run opened one client connection per request (`Connection: close`): "
            "`--close-connections` was given.")
    lines.append("")
    for mode, title in (("local", "Node-local sessions (Kylin 4 / Tomcat default)"),
                        ("shared", "Redis-shared sessions (tomcat-redis-session-manager)")):
        runs = [r for r in suite.results if r["sessions"] == mode and not r["fault"]]
        if not runs:
            continue
        lines += ["## " + title, "",
                  "| balancer | queries/s | p50 ms | p99 ms | busiest/mean in-flight | busiest/mean requests "
                  "| cache hits | 401s | logins | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            s = r["summary"]
            lines.append("| %s | %.1f | %.1f | %.1f | %.2f | %.2f | %.0f%% | %d | %d | %d |" % (
                label[r["balancer"]], s["throughput_qps"], s["p50_ms"], s["p99_ms"],
                s["busiest_over_mean_in_flight"] or 0, s["busiest_over_mean_requests"] or 0,
                100 * (s["cache_hit_ratio"] or 0), s["unauthorized_401"], s["logins"], s["errors"]))
        lines.append("")
        lines.append("Where each BI server's queries went (share per node):")
        lines.append("")
        for r in runs:
            pl = "; ".join("BI %s: %s" % (a, " ".join("%s %.0f%%" % (n, 100 * v) for n, v in d.items()))
                           for a, d in r["bi_server_placement"].items())
            lines.append("- %s: %s" % (label[r["balancer"]], pl))
        lines += ["", "![per-node load](results/load-%s.png)" % mode, ""]
    lines += ["![latency](results/latency.png)", ""]
    faults = [r for r in suite.results if r["fault"]]
    if faults:
        lines += ["## Faults", "",
                  "node-kill: node2 is killed (SIGKILL) and restarted after the window, losing its "
                  "node-local sessions and cache. redis-stop: `SHUTDOWN SAVE`, started again after "
                  "the window (sessions kept in its dump). redis-slow: nginx reaches Redis through "
                  "a proxy that delays every reply by 300 ms during the window (the nodes reach Redis "
                  "directly). Recovery: seconds after the window until node2 is back to half its "
                  "earlier share of requests (node-kill) or the busiest/mean in-flight ratio is back "
                  "near its earlier level (Redis faults).",
                  "",
                  "| fault | balancer | sessions | window s | errors during | 401s during | 401s after "
                  "| p99 during ms | recovery s |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in faults:
            f = r["fault_summary"]
            lines.append("| %s | %s | %s | %s-%s | %d | %d | %d | %.0f | %s |" % (
                r["fault"], label[r["balancer"]], r["sessions"], r["fault_window_s"][0], r["fault_window_s"][1],
                f["errors_during"], f["unauthorized_during"], f["unauthorized_after"], f["p99_during_ms"],
                "%.0f" % f["recovery_s"] if f["recovery_s"] is not None else "-"))
        lines.append("")
        for fault in sorted({r["fault"] for r in faults}):
            lines += ["![%s](results/fault-%s.png)" % (fault, fault), ""]
    lines += ["Raw numbers: one JSON file per run in `bench/results/` (summary, per-second series "
              "per node, latency quantiles, the kylin status page over time, the upstream block used).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Command line.

def report(rec, samples, duration, warmup, nodes, w):
    s = summarize(rec, samples, duration, warmup, nodes)
    print(json.dumps({"summary": s, "bi_server_placement": placement(rec, w)}, indent=1))
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the workload against one nginx")
    r.add_argument("--url", default="http://127.0.0.1:8080")
    r.add_argument("--node", action="append", default=[], help="host:port of a node (for /__stats)")
    r.add_argument("--duration", type=float, default=20.0)
    r.add_argument("--warmup", type=float, default=2.0)
    r.add_argument("--bi-servers", type=int, default=3)
    r.add_argument("--bi-sessions", type=int, default=20)
    r.add_argument("--light", type=int, default=60)
    r.add_argument("--json", help="write the summary here")
    s = sub.add_parser("suite", help="the whole benchmark (scripts/bench)")
    s.add_argument("--nginx", required=True)
    s.add_argument("--module", required=True)
    s.add_argument("--quick", action="store_true")
    s.add_argument("--out", default=os.path.join(ROOT, "bench"))
    s.add_argument("--close-connections", action="store_true",
                   help="one client connection per request in every run (default: keep-alive)")
    s.add_argument("--only", help="comma-separated run names (e.g. kylin-shared,ip_hash-local-node-kill)")
    args = ap.parse_args()

    if args.cmd == "run":
        hp = args.url.split("//", 1)[-1].rstrip("/")
        host, _, port = hp.partition(":")
        nodes = [(loopback(h), int(p)) for h, _, p in (n.partition(":") for n in args.node)]
        w = Workload()
        w.bi_servers, w.bi_sessions, w.light = args.bi_servers, args.bi_sessions, args.light
        duration = min(args.duration, 3600.0)
        rec, samples, _ = asyncio.run(run_load(w, loopback(host), int(port or 80), nodes, duration))
        summ = report(rec, samples, duration, args.warmup, nodes, w)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summ, f, indent=1)
        return 0

    suite = Suite(args)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt("signal %d" % signum)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        asyncio.run(suite.main())
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        suite.procs.stop_all()
        shutil.rmtree(suite.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
