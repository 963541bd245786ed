#!/usr/bin/env python3
"""Load generator for Kylin query nodes behind nginx, and the benchmark suite of scripts/bench.

Clients come from addresses of 127.0.0.0/8, each in its own /24: Linux routes all of 127/8 to
lo, so nginx sees distinct client addresses without realip. Two kinds:

  BI servers     a few addresses, each running several user sessions at once: log in, run a
                 few dozen queries from the server's small hot query set (plus some ad hoc
                 ones), log in again as a new session;
  light clients  more addresses, one user each, an occasional query from their own set.

The workload is issue #13's, as examples/factor_sim.rs `cluster --think 5 --adhoc 0.03`
simulates it (3 BI servers x 6 sessions, think 5 ms, 3% ad hoc, 15-40 queries per session;
9 light clients). A *layout* is the set of client addresses, drawn from a seeded generator
exactly as the simulator's `Layout::random(N)` draws layout N (127.x.y.z, one per /24), so
layout N here and in bench/placement.md place the clients on the same addresses.

Every user keeps its JSESSIONID cookie; a 401 means it had to log in again (counted, and it
logs in again). Per-node load comes from each node's /__stats (kylin_node.py), sampled.

  loadgen.py run --url http://127.0.0.1:8080 --node 127.0.0.1:7071 ... [--duration 20] [--layout N]
  loadgen.py suite --nginx NGINX --module MODULE [--quick] [--layouts N] [--seed S]
                   [--kylin-variant NAME=DIRECTIVES]... [--only GLOB,...] [--out bench]   (scripts/bench)

Only addresses in 127.0.0.0/8 are ever contacted; every loop ends with the run's duration.
"""
import argparse
import asyncio
import datetime
import fnmatch
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
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
    """Issue #13's load: the heavy setting of examples/factor_sim.rs (`--think 5 --adhoc 0.03`)."""

    def __init__(self):
        self.bi_servers = 3
        self.bi_sessions = 6           # concurrent user sessions per BI server
        self.bi_think = 0.005          # mean seconds between a session's queries (exponential, capped at 10x)
        self.bi_queries = (15, 40)     # queries per session before it logs in again
        self.bi_hot = 100              # hot query set per BI server
        self.bi_adhoc = 0.03           # share of ad hoc (never repeated) queries
        self.light = 9
        self.light_think = 1.5
        self.light_set = 10
        self.seed = 7                  # the users' random streams
        self.addresses = None          # (BI addresses, light addresses); None: 127.10.N.1

    def describe(self):
        d = dict(self.__dict__)
        d.pop("addresses")
        return d


M64 = (1 << 64) - 1


class XorShift:
    """examples/factor_sim.rs's XorShift, bit for bit."""

    def __init__(self, seed):
        self.state = ((seed * 0x9E3779B97F4A7C15) & M64) | 1

    def next(self):
        x = self.state
        x ^= (x << 13) & M64
        x ^= x >> 7
        x ^= (x << 17) & M64
        self.state = x
        return x


def layout_addresses(number, clients):
    """Layout `number`: `clients` addresses 127.x.y.z, each in its own /24, as the simulator's
    `Layout::random(number, clients)` (examples/sim/cluster.rs) draws them; BI servers first."""
    r = XorShift(((number * 7919) & M64) ^ 0x1A2B3C4D)
    seen, out = set(), []
    while len(out) < clients:
        x = r.next()
        a = (127, x & 0xFF, (x >> 8) & 0xFF, 1 + ((x >> 16) % 254))
        if (a[1], a[2]) not in seen:
            seen.add((a[1], a[2]))
            out.append("%d.%d.%d.%d" % a)
    return out


def set_layout(w, number):
    addrs = layout_addresses(number, w.bi_servers + w.light)
    w.addresses = (addrs[:w.bi_servers], addrs[w.bi_servers:])


class Recorder:
    def __init__(self, t0):
        self.t0 = t0
        self.queries = []   # (t, latency_s, status, node)
        self.logins = []    # (t, latency_s, status, node)
        self.errors = []    # (t, kind)
        self.placement = {}  # client address -> {node: responses}
        self.placement_s = {}  # (client address, node) -> {second: responses}

    def note_node(self, addr, node):
        if node:
            d = self.placement.setdefault(addr, {})
            d[node] = d.get(node, 0) + 1
            s = int(time.monotonic() - self.t0)
            d = self.placement_s.setdefault((addr, node), {})
            d[s] = d.get(s, 0) + 1


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
    """BI servers and light clients: a layout's, or each in its own /24 of 127.10.0.0/16."""
    if w.addresses:
        return w.addresses
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


def placement_per_second(rec, w, secs):
    """Each BI server's responses per node and second: {address: {node: [count per second]}}."""
    bi, _ = client_addresses(w)
    out = {}
    for (addr, node), d in sorted(rec.placement_s.items()):
        if addr in bi:
            out.setdefault(addr, {})[node] = [d.get(s, 0) for s in range(secs)]
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark suite: processes, configurations, faults, charts, results.md.

# nginx 1.31's sticky learn on Kylin's session cookie: the server that answered the login (the
# response that set JSESSIONID) gets every later request carrying that cookie.
STICKY_LEARN = ("sticky learn create=$upstream_cookie_jsessionid lookup=$cookie_jsessionid "
                "zone=sticky_sessions:1m;")

# (name, label, directives in the upstream block) of every stock anchor.
ANCHORS = [
    ("ip_hash", "ip_hash", "ip_hash;"),
    ("hash", "hash consistent", "hash $remote_addr consistent;"),
    ("round_robin", "round robin", ""),
    ("least_conn", "least_conn", "least_conn;"),
    ("least_conn_sticky", "least_conn + sticky learn", "least_conn;\n        " + STICKY_LEARN),
    ("hash_sticky", "hash consistent + sticky learn",
     "hash $remote_addr consistent;\n        " + STICKY_LEARN),
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


class Balancer:
    """A stock anchor, or kylin with extra directives in its block (a variant)."""

    def __init__(self, name, label, directives, kylin):
        self.name, self.label, self.directives, self.kylin = name, label, directives, kylin

    def block(self, node_ports, store_port):
        servers = "".join("        server 127.0.0.1:%d max_fails=1 fail_timeout=3s;\n" % p for p in node_ports)
        if self.kylin:
            store = ("        kylin_session_store redis://127.0.0.1:%d format=tomcat;\n" % store_port
                     if store_port else "")
            extra = "        %s\n" % self.directives if self.directives else ""
            return ("kylin_upstream nodes {\n        zone nodes 256k;\n" + store + servers + extra
                    + "        keepalive 64;\n    }")
        method = "        %s\n" % self.directives if self.directives else ""
        return "upstream nodes {\n" + method + "        zone nodes 256k;\n" + servers + "        keepalive 64;\n    }"


def balancers(variants):
    """kylin (defaults), then each --kylin-variant NAME=DIRECTIVES, then the stock anchors."""
    out = [Balancer("kylin", "kylin", "", True)]
    for v in variants:
        name, sep, directives = v.partition("=")
        name = name.strip()
        if not sep or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise SystemExit("--kylin-variant wants NAME=DIRECTIVES (NAME of letters, digits, - _ .): %r" % v)
        if name in [b.name for b in out] + [a[0] for a in ANCHORS]:
            raise SystemExit("--kylin-variant %s: that name is taken" % name)
        out.append(Balancer(name, name, directives.strip(), True))
    return out + [Balancer(n, l, d, False) for n, l, d in ANCHORS]


def upstream_block(balancer, node_ports, store_port):
    """The upstream block of a balancer name (kylin or a stock anchor), as the scenarios use it."""
    for b in balancers([]):
        if b.name == balancer:
            return b.block(node_ports, store_port)
    raise KeyError(balancer)


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

    def stop_many(self, names, sig=signal.SIGTERM):
        """Signals all of them first, then waits: one wait instead of one per process."""
        procs = [(n, self.procs.pop(n, None)) for n in names]
        for _, p in procs:
            if p is not None and p.poll() is None:
                p.send_signal(sig)
        for _, p in procs:
            if p is None:
                continue
            try:
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


def proc_stat(pid):
    """(ppid, CPU seconds used: user + system) of a process, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def children_cpu(pid):
    """CPU seconds used by the children of `pid` (nginx's workers)."""
    total = 0.0
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st and st[0] == pid:
                total += st[1]
    return total


def machine_cpu():
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def node_ports_for_bench():
    """127.0.0.1:7071..7074, the simulator's server addresses (so `hash consistent` and kylin's
    ring place a layout's clients as in bench/placement.md), when all four are free."""
    fixed = [7071, 7072, 7073, 7074]
    for p in fixed:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the nodes bind: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            return [free_port() for _ in range(4)]
        finally:
            s.close()
    return fixed


SESSIONS = ("local", "shared")
CACHES = ("bounded", "unbounded")
CACHE_SIZE = {"bounded": 256, "unbounded": 0}
GOAL_QPS, GOAL_P99 = 0.98, 1.05


class Suite:
    def __init__(self, args):
        self.args = args
        self.procs = Procs()
        self.tmp = tempfile.mkdtemp(prefix="kylin-bench-")
        self.out = os.path.join(args.out, "results")
        os.makedirs(self.out, exist_ok=True)
        self.node_ports = node_ports_for_bench()
        self.redis_port = free_port()
        self.nginx_port = free_port()
        self.quick = args.quick
        n = args.layouts or (2 if self.quick else 8)
        self.layouts = list(range(args.seed, args.seed + n))
        self.caches = ("bounded",) if self.quick else CACHES
        self.duration = args.duration or (7.0 if self.quick else 9.0)
        self.warmup = args.warmup if args.warmup is not None else 2.0
        if self.warmup >= self.duration:
            raise SystemExit("--warmup must be shorter than --duration")
        self.repeat = args.repeat
        if self.repeat < 1:
            raise SystemExit("--repeat must be at least 1")
        self.fault_duration = 14.0 if self.quick else 20.0
        self.fault_window = 4.0 if self.quick else 6.0
        self.balancers = balancers(args.kylin_variant)
        self.by_name = {b.name: b for b in self.balancers}
        self.kylins = [b.name for b in self.balancers if b.kylin]
        self.anchors = [b.name for b in self.balancers if not b.kylin]
        self.workload = Workload()
        self.cache_size = 256
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
             "--name", "node%d" % (i + 1), "--slots", "4", "--cache", "--cache-size", str(self.cache_size),
             "--hit-ms", "5", "--miss-ms", "60", "--tcp-nodelay"]
        if shared:
            a += ["--redis-port", str(self.redis_port)]
        return a

    def start_node(self, i, shared):
        self.procs.start("node%d" % i, self.node_args(i, shared), port=self.node_ports[i])

    def start_nodes(self, shared):
        for i in range(4):  # all four start at once; then wait for each
            self.procs.start("node%d" % i, self.node_args(i, shared))
        for i in range(4):
            if not wait_port(self.node_ports[i]):
                raise RuntimeError("node%d did not start listening on %d" % (i + 1, self.node_ports[i]))

    def write_conf(self, bal, shared, via_proxy=False):
        """nginx.conf for one run, checked with `nginx -t`; returns (prefix, upstream block).
        via_proxy: kylin reaches Redis through the delaying proxy (the redis-slow fault);
        otherwise directly, as the nodes do."""
        prefix = os.path.join(self.tmp, "nginx")
        shutil.rmtree(prefix, ignore_errors=True)
        os.makedirs(os.path.join(prefix, "logs"))
        os.makedirs(os.path.join(prefix, "conf"))
        block = bal.block(self.node_ports, (self.proxy.port if via_proxy else self.redis_port) if shared else None)
        conf = NGINX_CONF.format(module=self.args.module, port=self.nginx_port, upstream=block)
        with open(os.path.join(prefix, "conf", "nginx.conf"), "w") as f:
            f.write(conf)
        test = subprocess.run([self.args.nginx, "-p", prefix, "-c", "conf/nginx.conf", "-t", "-q"],
                              capture_output=True, text=True)
        if test.returncode != 0:
            raise SystemExit("nginx -t failed for %s:\n%s\n%s" % (bal.name, test.stderr.strip(), block))
        return prefix, block

    def start_nginx(self, bal, shared, via_proxy=False):
        prefix, block = self.write_conf(bal, shared, via_proxy)
        self.procs.start("nginx", [self.args.nginx, "-p", prefix, "-c", "conf/nginx.conf",
                                   "-g", "daemon off;"], port=self.nginx_port)
        return block

    # the plan ------------------------------------------------------------------------------
    @staticmethod
    def run_name(layout, cache, mode, bal, fault, rep=0):
        if fault:
            return "fault-%s-%s" % (fault, bal)
        return "L%d-%s-%s-%s%s" % (layout, mode, cache, bal, "-r%d" % (rep + 1) if rep else "")

    def plan(self):
        plan = []
        for layout in self.layouts:
            for ci, cache in enumerate(self.caches):
                for si, mode in enumerate(SESSIONS):
                    # Every balancer of a cell runs back to back, in an order shuffled per cell
                    # (seeded), so that a slow spell of the shared machine hits no balancer
                    # systematically.
                    # With --repeat N, N rounds of the cell follow one another, each in its own
                    # order (the first as without --repeat).
                    for r in range(self.repeat):
                        order = [b.name for b in self.balancers]
                        random.Random(layout * 100 + ci * 10 + si + 1000 * r).shuffle(order)
                        plan += [(layout, cache, mode, b, None, r) for b in order]
        first = self.layouts[0]
        if not self.args.no_faults:
            if self.quick:
                plan += [(first, "bounded", "local", b, "node-kill", 0) for b in ("kylin", "ip_hash")]
            else:
                plan += [(first, "bounded", "local", b, "node-kill", 0) for b in self.kylins + self.anchors]
                redis = self.kylins + ["ip_hash", "round_robin", "least_conn_sticky"]
                plan += [(first, "bounded", "shared", b, f, 0) for f in ("redis-stop", "redis-slow") for b in redis]
        if self.args.only:
            globs = [g.strip() for g in self.args.only.split(",") if g.strip()]
            plan = [p for p in plan if any(fnmatch.fnmatchcase(self.run_name(*p), g) for g in globs)]
        return plan

    # one run -------------------------------------------------------------------------------
    async def one(self, layout, cache, mode, bname, fault=None, rep=0):
        bal = self.by_name[bname]
        shared = mode == "shared"
        name = self.run_name(layout, cache, mode, bname, fault, rep)
        set_layout(self.workload, layout)
        self.workload.seed = layout  # the same users (random streams) for every balancer of a layout
        self.cache_size = CACHE_SIZE[cache]
        self.redis_cmd("FLUSHALL")
        self.proxy.delay = 0.0
        t_start = time.monotonic()
        self.start_nodes(shared)
        block = self.start_nginx(bal, shared, via_proxy=fault == "redis-slow")
        t_start = time.monotonic() - t_start
        dur = self.fault_duration if fault else self.duration
        f_at, f_end = (round(dur * 0.35, 1), round(dur * 0.35 + self.fault_window, 1)) if fault else (None, None)
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
        t = time.monotonic()
        nodes = [("127.0.0.1", p) for p in self.node_ports]
        keepalive = not self.args.close_connections
        m0, c0 = machine_cpu(), os.times()
        redis_p = self.procs.procs.get("redis")
        r0 = proc_stat(redis_p.pid) if redis_p else None
        rec, samples, status = await run_load(self.workload, "127.0.0.1", self.nginx_port, nodes, dur,
                                              self.nginx_port if bal.kylin else None, events, keepalive)
        m1, c1 = machine_cpu(), os.times()
        redis_p2 = self.procs.procs.get("redis")
        r1 = proc_stat(redis_p2.pid) if redis_p2 else None
        nginx_cpu = children_cpu(self.procs.procs["nginx"].pid)
        final = await get_json("127.0.0.1", self.nginx_port, "/kylin-status", 2.0) if bal.kylin else None
        t_stop = time.monotonic()
        self.procs.stop("nginx", signal.SIGQUIT)
        self.procs.stop_many(["node%d" % i for i in range(4)])
        t_stop = time.monotonic() - t_stop
        if fault == "redis-stop" and "redis" not in self.procs.procs:
            self.start_redis()
        summ = summarize(rec, samples, dur, self.warmup, nodes)
        series = per_second(rec, samples, dur, nodes)
        span = dur - self.warmup
        node_cpu = [counter_delta(samples, i, "cpu_s", self.warmup, dur + 99) / span for i in range(4)]
        ncpu = os.cpu_count() or 1
        cpu = {"loadgen": round((c1.user - c0.user + c1.system - c0.system) / dur, 3),
               "nodes": round(sum(node_cpu), 3), "node_max": round(max(node_cpu), 3),
               "nginx_workers": round(nginx_cpu / dur, 3),
               "redis": round((r1[1] - r0[1]) / dur, 3) if r0 and r1 and redis_p is redis_p2 else None,
               "machine_busy": round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 3),
               "cores": ncpu}
        # Cores' worth of CPU used by others (other users of the machine): all busy time minus ours.
        ours = cpu["loadgen"] + sum(node_cpu) * span / dur + cpu["nginx_workers"] + (cpu["redis"] or 0)
        cpu["others"] = round(max(0.0, cpu["machine_busy"] * ncpu - ours), 3)
        res = {"name": name, "balancer": bname, "label": bal.label, "kylin": bal.kylin,
               "directives": bal.directives, "layout": layout, "cache": cache, "cache_size": self.cache_size,
               "sessions": mode, "fault": fault, "repeat": rep + 1, "client_keepalive": keepalive,
               "addresses": {"bi": self.workload.addresses[0], "light": self.workload.addresses[1]},
               "duration_s": dur, "warmup_s": self.warmup, "summary": summ, "cpu": cpu,
               "bi_server_placement": placement(rec, self.workload),
               "bi_server_placement_per_second": placement_per_second(rec, self.workload, int(dur + 0.999)),
               "latency_quantiles": latency_quantiles(rec, self.warmup),
               "per_second": series, "kylin_status_final": slim_status(final),
               "kylin_status_series": status, "errors_sample": rec.errors[:20],
               "nginx_conf_upstream": block,
               "overhead_s": {"start": round(t_start, 2), "stop": round(t_stop, 2)}}
        if fault:
            res["fault_window_s"] = [f_at, f_end]
            res["fault_summary"] = fault_summary(rec, series, f_at, f_end, dur, fault)
        with open(os.path.join(self.out, name + ".json"), "w") as f:
            json.dump(res, f, indent=1)
        self.results.append(res)
        s = summ
        print("%7.1f q/s  p50 %5.1f  p99 %6.1f ms  hit %.2f  401 %5d  err %3d  cpu: lg %.2f nodes %.2f nginx %.2f others %.2f  (%.1fs: start %.1f stop %.1f)"
              % (s["throughput_qps"], s["p50_ms"], s["p99_ms"], s["cache_hit_ratio"] or 0,
                 s["unauthorized_401"], s["errors"], cpu["loadgen"], cpu["nodes"], cpu["nginx_workers"],
                 cpu["others"], time.monotonic() - t, t_start, t_stop), flush=True)
        return res

    def print_layout_row(self, layout):
        cells = [c for c in analyse(self.results, self.kylins, self.anchors) if c["layout"] == layout]
        if not cells:
            return
        for k in self.kylins:
            parts = []
            for c in cells:
                kv = c["kylin"].get(k)
                if kv:
                    parts.append("%s/%s %.2fx q/s %.2fx p99 (best %s)" % (
                        c["sessions"], c["cache"], kv["qps_ratio"], kv["p99_ratio"], c["best"]))
            if parts:
                print("layout %d, %s / best stock: %s" % (layout, k, "; ".join(parts)), flush=True)

    def load_results(self):
        """--report-only: the runs of the last suite, from bench/results/*.json."""
        with open(os.path.join(self.out, "summary.json")) as f:
            meta = json.load(f)
        self.quick, self.layouts = meta["quick"], meta["layouts"]
        self.duration, self.warmup, self.node_ports = meta["duration_s"], meta["warmup_s"], meta["node_ports"]
        self.elapsed = meta["elapsed_s"]
        self.run_info = meta.get("run_info") or run_info()
        self.rewritten = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.balancers = [Balancer(b["name"], b["label"], b["directives"], b["kylin"]) for b in meta["balancers"]]
        self.by_name = {b.name: b for b in self.balancers}
        self.kylins = [b.name for b in self.balancers if b.kylin]
        self.anchors = [b.name for b in self.balancers if not b.kylin]
        self.caches = tuple(c for c in CACHES if any(x["cache"] == c for x in meta["cells"])) or self.caches
        self.fault_duration = meta.get("fault_duration_s", self.fault_duration)
        self.repeat = meta.get("repeat", 1)
        self.fault_window = meta.get("fault_window_s", self.fault_window)
        self.args.only = meta.get("only")
        order = {}
        for f in sorted(os.listdir(self.out)):
            if f.endswith(".json") and f != "summary.json":
                with open(os.path.join(self.out, f)) as fh:
                    r = json.load(fh)
                order[r["name"]] = r
        seq = meta.get("order") or sorted(order)
        self.results = [order[n] for n in seq if n in order]

    def finish(self):
        self.cells = analyse(self.results, self.kylins, self.anchors)
        self.summary = summarize_cells(self.cells, self.kylins)
        for k, s in self.summary.items():
            print("summary %s / best stock over %d cells: q/s worst %.3f geomean %.3f; p99 worst %.3f geomean %.3f; "
                  "goal met in %d; 401s %d" % (k, s["cells"], s["qps_worst"], s["qps_geomean"], s["p99_worst"],
                                             s["p99_geomean"], s["cells_meeting_goal"], s["unauthorized_401"]))
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump({"cells": self.cells, "summary": self.summary, "elapsed_s": round(self.elapsed),
                       "quick": self.quick, "layouts": self.layouts, "duration_s": self.duration,
                       "warmup_s": self.warmup, "node_ports": self.node_ports,
                       "fault_duration_s": self.fault_duration, "fault_window_s": self.fault_window,
                       "repeat": self.repeat,
                       "only": self.args.only, "order": [r["name"] for r in self.results],
                       "run_info": self.run_info,
                       "balancers": [{"name": b.name, "label": b.label, "kylin": b.kylin,
                                      "directives": b.directives} for b in self.balancers]}, f, indent=1)
        charts(self)
        write_markdown(self, os.path.join(self.args.out, "results.md"))
        print("wrote %s/*.json, *.png and %s/results.md (runs: %.0f s)"
              % (self.out, self.args.out, self.elapsed))

    async def main(self):
        if self.args.report_only:
            self.load_results()
            self.finish()
            return
        self.run_info = run_info()
        started = time.monotonic()
        plan = self.plan()
        if not plan:
            raise SystemExit("nothing to run (--only matched no run)")
        if not self.args.only:  # a whole run replaces every earlier result
            for f in os.listdir(self.out):
                if f.endswith(".json") or f.endswith(".png"):
                    os.remove(os.path.join(self.out, f))
        self.start_redis()
        self.proxy = DelayProxy(self.redis_port)
        await self.proxy.start()
        for name in sorted({p[3] for p in plan}):  # every configuration passes `nginx -t` before any run
            for shared in sorted({p[2] == "shared" for p in plan if p[3] == name}):
                self.write_conf(self.by_name[name], shared)
        print("cluster: 4 nodes on ports %s (4 slots, result cache 256 or unbounded, hit 5 ms, miss 60 ms), "
              "redis :%d, nginx :%d; %d runs (%d layouts from %d x %s caches x local/shared sessions x %d balancers%s)"
              % (",".join(map(str, self.node_ports)), self.redis_port, self.nginx_port, len(plan),
                 len(self.layouts), self.layouts[0], "/".join(self.caches), len(self.balancers),
                 "" if self.args.no_faults else ", plus faults"), flush=True)
        for n, (layout, cache, mode, b, fault, rep) in enumerate(plan):
            elapsed = time.monotonic() - started
            eta = elapsed / n * (len(plan) - n) if n else 0
            print("[%3d/%d %4.0fs, ~%3.0fs left] %-38s" % (n + 1, len(plan), elapsed, eta,
                                                          self.run_name(layout, cache, mode, b, fault, rep)),
                  end="", flush=True)
            await self.one(layout, cache, mode, b, fault, rep)
            nxt = plan[n + 1] if n + 1 < len(plan) else None
            if not fault and (nxt is None or nxt[0] != layout or nxt[4]):
                self.print_layout_row(layout)
        await self.proxy.close()
        self.elapsed = time.monotonic() - started
        self.finish()


def run_info():
    """When the suite ran and which module it measured (the last commit of the module's sources)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": sh("git -C %s rev-parse --short HEAD" % ROOT),
            "module_commit": sh("git -C %s log -1 --format=%%h -- src Cargo.toml Cargo.lock build.rs" % ROOT),
            "module_dirty": bool(sh("git -C %s status --porcelain -- src Cargo.toml Cargo.lock build.rs" % ROOT))}


MEDIAN_FIELDS = ("throughput_qps", "p50_ms", "p99_ms", "cache_hit_ratio", "busiest_over_mean_in_flight")
SUM_FIELDS = ("unauthorized_401", "errors")


def merge_repeats(runs):
    """One balancer's runs of a cell (`--repeat`) as one: the median of each rate and latency,
    the sum of the 401s and errors (one 401 in any run misses the goal), and the runs' queries/s
    in `qps_runs`. A single run stands as it is.

    >>> run = lambda q, p99, u=0: {"summary": {"throughput_qps": q, "p50_ms": 5.0, "p99_ms": p99,
    ...     "cache_hit_ratio": 0.9, "busiest_over_mean_in_flight": 1.2, "unauthorized_401": u, "errors": 0}}
    >>> m = merge_repeats([run(100, 60), run(90, 70, 1), run(120, 65)])["summary"]
    >>> m["throughput_qps"], m["p99_ms"], m["unauthorized_401"], m["qps_runs"]
    (100, 65, 1, [100, 90, 120])
    >>> merge_repeats([run(100, 60)])["summary"]["throughput_qps"]
    100
    """
    if len(runs) == 1:
        return runs[0]
    summ = {}
    for k in MEDIAN_FIELDS:
        vals = [r["summary"][k] for r in runs if r["summary"].get(k) is not None]
        summ[k] = statistics.median(vals) if vals else None
    for k in SUM_FIELDS:
        summ[k] = sum(r["summary"][k] for r in runs)
    summ["qps_runs"] = [r["summary"]["throughput_qps"] for r in runs]
    return {"summary": summ}


def analyse(results, kylins, anchors):
    """One entry per cell (layout x sessions x cache): the best anchor by queries/s, and each
    kylin variant's ratios to it. With `--repeat`, each balancer counts with the median of its
    runs (`merge_repeats`).

    >>> def run(b, q, u=0):
    ...     return {"fault": None, "layout": 1, "sessions": "local", "cache": "bounded", "balancer": b,
    ...             "summary": {"throughput_qps": q, "p50_ms": 5.0, "p99_ms": 60.0, "cache_hit_ratio": 0.9,
    ...                         "busiest_over_mean_in_flight": 1.2, "unauthorized_401": u, "errors": 0}}
    >>> runs = [run("kylin", 98), run("ip_hash", 100), run("kylin", 99), run("ip_hash", 130),
    ...         run("kylin", 150), run("ip_hash", 101)]
    >>> k = analyse(runs, ["kylin"], ["ip_hash"])[0]["kylin"]["kylin"]
    >>> k["qps_ratio"], k["goal"]
    (0.98, True)
    >>> k = analyse(runs + [run("kylin", 99, u=1)], ["kylin"], ["ip_hash"])[0]["kylin"]["kylin"]
    >>> k["qps_ratio"], k["unauthorized_401"], k["goal"]
    (0.98, 1, False)
    """
    by = {}
    for r in results:
        if not r["fault"]:
            by.setdefault((r["layout"], r["sessions"], r["cache"]), {}).setdefault(r["balancer"], []).append(r)
    cells = []
    for key in sorted(by, key=lambda k: (k[0], CACHES.index(k[2]), SESSIONS.index(k[1]))):
        runs = {n: merge_repeats(rs) for n, rs in by[key].items()}
        stock = [(n, runs[n]["summary"]) for n in anchors if n in runs]
        if not stock:
            continue
        best_name, best = max(stock, key=lambda x: x[1]["throughput_qps"])
        cell = {"layout": key[0], "sessions": key[1], "cache": key[2], "best": best_name,
                "best_qps": best["throughput_qps"], "best_p99_ms": best["p99_ms"],
                "runs": {n: {k: r["summary"][k] for k in MEDIAN_FIELDS + SUM_FIELDS + ("qps_runs",) if k in r["summary"]}
                         for n, r in runs.items()},
                "kylin": {}}
        for k in kylins:
            if k not in runs:
                continue
            s = runs[k]["summary"]
            qr = s["throughput_qps"] / best["throughput_qps"] if best["throughput_qps"] else float("nan")
            pr = s["p99_ms"] / best["p99_ms"] if best["p99_ms"] else float("nan")
            cell["kylin"][k] = {"qps": s["throughput_qps"], "p99_ms": s["p99_ms"], "qps_runs": s.get("qps_runs"),
                                "qps_ratio": round(qr, 3), "p99_ratio": round(pr, 3),
                                "cache_hit_ratio": s["cache_hit_ratio"], "unauthorized_401": s["unauthorized_401"],
                                "errors": s["errors"],
                                "goal": bool(qr >= GOAL_QPS and pr <= GOAL_P99 and s["unauthorized_401"] == 0)}
        cells.append(cell)
    return cells


def geomean(vals):
    vals = [v for v in vals if v == v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def summarize_cells(cells, kylins):
    out = {}
    for k in kylins:
        rows = [c["kylin"][k] for c in cells if k in c["kylin"]]
        if not rows:
            continue
        out[k] = {"cells": len(rows),
                  "qps_worst": min(r["qps_ratio"] for r in rows),
                  "qps_geomean": round(geomean([r["qps_ratio"] for r in rows]), 3),
                  "p99_worst": max(r["p99_ratio"] for r in rows),
                  "p99_geomean": round(geomean([r["p99_ratio"] for r in rows]), 3),
                  "cells_meeting_goal": sum(r["goal"] for r in rows),
                  "unauthorized_401": sum(r["unauthorized_401"] for r in rows),
                  "errors": sum(r["errors"] for r in rows)}
    return out


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

def cell_label(c):
    return "L%d %s %s" % (c["layout"], "loc" if c["sessions"] == "local" else "shr",
                          "bnd" if c["cache"] == "bounded" else "unb")


def charts(suite):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out, results, cells = suite.out, suite.results, suite.cells
    label = {b.name: b.label for b in suite.balancers}
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf"]
    if cells:
        xs = list(range(len(cells)))
        width = max(8.0, 0.38 * len(cells) + 2.5)

        def layout_bands(ax):
            for i, c in enumerate(cells):
                if c["layout"] % 2 == 0:
                    ax.axvspan(i - 0.5, i + 0.5, color="0.94", lw=0)

        # 1. kylin / best anchor per cell.
        fig, axes = plt.subplots(2, 1, figsize=(width, 6.4), sharex=True)
        for ax, key, goal, title in ((axes[0], "qps_ratio", GOAL_QPS, "queries/s: kylin / best stock (higher is better)"),
                                     (axes[1], "p99_ratio", GOAL_P99, "p99 latency: kylin / best stock (lower is better)")):
            layout_bands(ax)
            ax.axhline(1.0, color="0.55", lw=0.8)
            ax.axhline(goal, color="#d62728", lw=1.0, ls="--", label="goal %.2f" % goal)
            for j, k in enumerate(suite.kylins):
                pts = [(i + (j - (len(suite.kylins) - 1) / 2) * 0.15, c["kylin"][k][key])
                       for i, c in enumerate(cells) if k in c["kylin"]]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=6, color=colors[j % len(colors)], label=k)
            ax.set_title(title, fontsize=10, loc="left")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=8, loc="best")
        axes[1].set_xticks(xs)
        axes[1].set_xticklabels([cell_label(c) for c in cells], rotation=90, fontsize=8)
        axes[1].set_xlim(-0.6, len(cells) - 0.4)
        fig.suptitle("Kylin vs the best stock balancer of each cell (layout x sessions x cache)\n"
                     "loc = node-local, shr = Redis-shared sessions; bnd = LRU 256, unb = unbounded cache",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "ratios.png"), dpi=90)
        plt.close(fig)

        # 2. Every balancer's queries/s per cell.
        fig, ax = plt.subplots(figsize=(width, 4.8))
        layout_bands(ax)
        markers = "os^vD<>pXh"
        for j, b in enumerate(suite.balancers):
            pts = [(i, c["runs"][b.name]["throughput_qps"]) for i, c in enumerate(cells) if b.name in c["runs"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], markers[j % len(markers)],
                    ms=8 if b.kylin else 5, color="k" if b.name == "kylin" else colors[j % len(colors)],
                    mfc="none" if not b.kylin else None, label=label[b.name])
        ax.set_xticks(xs)
        ax.set_xticklabels([cell_label(c) for c in cells], rotation=90, fontsize=8)
        ax.set_xlim(-0.6, len(cells) - 0.4)
        ax.set_ylabel("queries/s (200s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, ncol=4, loc="lower left")
        ax.set_title("Queries/s of every balancer per cell (filled: kylin)", fontsize=10, loc="left")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "qps.png"), dpi=90)
        plt.close(fig)

    # 3. Latency CDFs of the first layout, bounded cache.
    ran = sorted({r["layout"] for r in results if not r["fault"]})
    first = [r for r in results if not r["fault"] and ran and r["layout"] == ran[0] and r["cache"] == "bounded"]
    if first:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
        for ax, mode in zip(axes, SESSIONS):
            for j, b in enumerate(suite.balancers):
                for r in first:
                    if r["sessions"] == mode and r["balancer"] == b.name:
                        lq = r["latency_quantiles"]
                        ax.plot(lq["ms"], [100 * q for q in lq["q"]], label=label[b.name], lw=2.2 if b.kylin else 1.3,
                                color="k" if b.name == "kylin" else colors[j % len(colors)])
            ax.set_xscale("log")
            ax.set_xlabel("query latency, ms (log)")
            ax.set_title("%s sessions" % ("node-local" if mode == "local" else "Redis-shared"), fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.axhline(99, color="0.5", lw=0.8, ls="--")
        axes[0].set_ylabel("% of queries at or below")
        axes[0].legend(fontsize=8, loc="lower right")
        fig.suptitle("Query latency distribution, layout %d, bounded cache (CDF; dashed: p99)" % ran[0],
                     fontsize=11)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "latency.png"), dpi=90)
        plt.close(fig)

    # 4. Fault runs: per-node requests per second.
    for fault in sorted({r["fault"] for r in results if r["fault"]}):
        runs = [r for r in results if r["fault"] == fault]
        fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.1 * len(runs) + 0.8), sharex=True, squeeze=False)
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
                         % (r["label"], r["sessions"], fs["errors_during"], fs["unauthorized_during"],
                            fs["unauthorized_after"],
                            "%.0f s" % fs["recovery_s"] if fs["recovery_s"] is not None else "not within the run"),
                         fontsize=9, loc="left")
            ax.set_ylabel("requests/s", fontsize=8)
            ax.grid(alpha=0.3)
        axes[0].legend(ncol=5, fontsize=8, loc="upper right")
        axes[-1].set_xlabel("seconds (red: fault)")
        fig.suptitle("Fault: %s, layout %d, bounded cache; per-node requests per second" % (fault, runs[0]["layout"]),
                     fontsize=11)
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


def fmt_ratio(v, goal_ok):
    return ("**%.3f**" % v) if not goal_ok else "%.3f" % v


def write_markdown(suite, path):
    label = {b.name: b.label for b in suite.balancers}
    w = suite.workload
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    info = suite.run_info
    n_runs = len(suite.results)
    cmd = "scripts/bench" + (" --quick" if suite.quick else "") + "".join(
        " --kylin-variant '%s=%s'" % (b.name, b.directives) for b in suite.balancers if b.kylin and b.name != "kylin")
    if suite.args.only:
        cmd += " --only '%s'" % suite.args.only
    lines = [
        "# Benchmark: kylin vs stock nginx balancers on a simulated Kylin cluster (issue #13)",
        "",
        "Written by `%s` on %s: %d runs, %.0f s wall time (%.1f min)%s." % (
            cmd, info["date"], n_runs, suite.elapsed, suite.elapsed / 60,
            "; report rewritten from its JSON by `--report-only` on %s" % suite.rewritten
            if getattr(suite, "rewritten", None) else ""),
        "",
        "Module: as of commit %s (the last change to `src/`, `Cargo.*`, `build.rs`%s; checkout at %s), built "
        "against %s. Machine: %s cores (%s), memory %s, kernel %s; Python %s. The machine is shared with other "
        "jobs: see the CPU check below." % (
            info["module_commit"] or "?", ", plus uncommitted changes" if info["module_dirty"] else "",
            info["commit"] or "?",
            sh("%s -v 2>&1" % suite.args.nginx).replace("nginx version: ", ""), sh("nproc"), cpu or "?",
            sh("free -h | awk '/^Mem:/{print $2}'"), platform.release(), platform.python_version()),
        "",
    ]
    if suite.quick:
        lines += ["**This is a `--quick` run**: %d layouts, the bounded cache only, %.0f s runs, one fault "
                  "(node-kill, kylin and `ip_hash`). It omits the unbounded cache, the other layouts and the "
                  "other fault runs of the full run; its numbers are a smoke test, not the benchmark." % (
                      len(suite.layouts), suite.duration), ""]
    lines += [
        "## Setup",
        "",
        "- One nginx binary for every run (%s, built by `scripts/bench` from `../shared/nginx`, 2 workers, the "
        "module loaded in every run), `zone`, `keepalive 64`, `max_fails=1 fail_timeout=3s` on every server; only "
        "the balancing directives change. Kylin: `kylin_upstream nodes { ... }` with the module's defaults, plus "
        "`kylin_session_store redis://... format=tomcat` in the Redis-shared cells%s." % (
            sh("%s -v 2>&1" % suite.args.nginx).replace("nginx version: ", ""),
            "".join("; variant `%s`: `%s` in the block" % (b.name, b.directives)
                    for b in suite.balancers if b.kylin and b.name != "kylin")),
        "- Stock anchors (directives in the `upstream` block): %s." % (
            "; ".join("%s: %s" % (l, "`%s`" % d.replace("\n        ", " ") if d else "none")
                      for n, l, d in ANCHORS)),
        "- 4 simulated Kylin nodes on 127.0.0.1:%s (`scripts/kylin_node.py --slots 4 --cache --cache-size 256|0 "
        "--hit-ms 5 --miss-ms 60`, one process each): each runs 4 queries at once and queues the rest; a query is "
        "fast (5 ms) only on a node that answered it before (per-node result cache: an LRU of 256 entries, or "
        "unbounded), 60 ms otherwise. Node-local sessions: a query with a session another node created gets 401. "
        "Redis-shared sessions: login does `SET <id> EX`; a node accepts a session that is local or whose key is "
        "in Redis." % ",".join(map(str, suite.node_ports)),
        "- Load (`scripts/loadgen.py`), issue #13's setting as `examples/factor_sim.rs cluster --think 5 "
        "--adhoc 0.03` simulates it: %(bi_servers)d BI servers x %(bi_sessions)d concurrent user sessions (think "
        "time exponential, mean %(think)g ms, capped at 10x; %(q0)d-%(q1)d queries per session, then a new login; a "
        "hot set of %(bi_hot)d queries per BI server, %(adhoc)g%% ad hoc), and %(light)d light clients (one user "
        "each, a query every %(light_think)g s on average from its own %(light_set)d). A 401 counts and the user "
        "logs in again." % dict(w.describe(), think=w.bi_think * 1000, q0=w.bi_queries[0], q1=w.bi_queries[1],
                                adhoc=100 * w.bi_adhoc),
        "- Layouts: layout N gives every client its own address 127.x.y.z (one per /24), drawn by the "
        "simulator's seeded `Layout::random(N)` (the same addresses as layout N of `bench/placement.md`; BI "
        "servers first). `ip_hash` hashes only the first three octets, `hash consistent` the whole address, kylin "
        "its own ring: each layout places the BI servers differently. Layouts run: %s." % (
            ", ".join(map(str, sorted({r["layout"] for r in suite.results})))),
        "- Cells: layout x sessions (node-local, Redis-shared) x cache (%s). Every balancer of a cell runs back to "
        "back, in a seeded shuffled order; %.0f s per run, the first %.0f s (warm-up) not counted; nodes restarted "
        "(cold caches, no sessions) and Redis flushed before every run; the same user streams (seed) for every "
        "balancer of a layout." % (", ".join(suite.caches), suite.duration, suite.warmup),
        "- Best stock = the anchor with the most queries/s (200 answers) in the cell; its p99 is the p99 "
        "reference. Goal (issue #13): kylin >= %.2fx its queries/s, p99 <= %.2fx, zero 401, in every cell. "
        % (GOAL_QPS, GOAL_P99)
        + ("One run per balancer and cell: the best of six noisy anchors is biased upwards, so ratios a few percent "
           "under 1 are within the noise of this machine." if suite.repeat == 1 else
           "%d runs per balancer and cell (`--repeat`: the cell's rounds one after another, each in its own "
           "shuffled order); a balancer's queries/s and p99 are the medians of its runs, its 401s and errors "
           "their sums." % suite.repeat),
    ]
    if any(not r["client_keepalive"] for r in suite.results):
        lines.append("- Every run opened one client connection per request (`--close-connections`).")
    lines.append("")

    if suite.summary:
        lines += ["## Summary: kylin / best stock balancer of each cell", "",
                  "| kylin | cells | worst q/s ratio | geomean q/s ratio | worst p99 ratio | geomean p99 ratio "
                  "| cells meeting the goal | 401s | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, s in suite.summary.items():
            lines.append("| %s | %d | %.3f | %.3f | %.3f | %.3f | %d of %d | %d | %d |" % (
                k + (" (defaults)" if k == "kylin" else ""), s["cells"], s["qps_worst"], s["qps_geomean"],
                s["p99_worst"], s["p99_geomean"], s["cells_meeting_goal"], s["cells"], s["unauthorized_401"],
                s["errors"]))
        best_count = {}
        for c in suite.cells:
            best_count[c["best"]] = best_count.get(c["best"], 0) + 1
        lines += ["", "Best stock balancer: " + ", ".join("%s in %d cells" % (label[n], v) for n, v in
                                                          sorted(best_count.items(), key=lambda x: -x[1])) + ".", ""]
        pairs = [(c["runs"]["hash_sticky"], c["runs"]["hash"]) for c in suite.cells
                 if "hash" in c["runs"] and "hash_sticky" in c["runs"] and c["runs"]["hash"]["throughput_qps"]
                 and c["runs"]["hash"]["p99_ms"]]
        if pairs:
            q = sorted(a["throughput_qps"] / b["throughput_qps"] for a, b in pairs)
            p99 = sorted(a["p99_ms"] / b["p99_ms"] for a, b in pairs)
            lines += ["Noise: without failures, `hash consistent` with and without `sticky learn` place every "
                      "request alike, so their ratio shows the run-to-run spread on this machine. Over %d cells: "
                      "queries/s %.3f to %.3f (median %.3f, mean absolute difference %.1f%%), p99 %.3f to %.3f. "
                      "The best of six anchors is biased upwards by that spread." % (
                          len(q), q[0], q[-1], q[len(q) // 2], 100 * sum(abs(x - 1) for x in q) / len(q),
                          p99[0], p99[-1]), ""]
        lines += ["![kylin / best stock per cell](results/ratios.png)", "",
                  "![queries/s per cell](results/qps.png)", ""]

        # One row per layout.
        keys = [(m, c) for c in suite.caches for m in SESSIONS]
        lines += ["## Per layout: kylin's q/s ratio (best stock balancer)", "",
                  "| layout | BI servers | kylin | " + " | ".join("%s, %s cache" % (m, c) for m, c in keys) + " |",
                  "|---|---|---|" + "---|" * len(keys)]
        for layout in suite.layouts:
            lc = {(c["sessions"], c["cache"]): c for c in suite.cells if c["layout"] == layout}
            if not lc:
                continue
            bi = next((r["addresses"]["bi"] for r in suite.results if r["layout"] == layout), [])
            for k in suite.kylins:
                vals = []
                for key in keys:
                    c = lc.get(key)
                    kv = c["kylin"].get(k) if c else None
                    vals.append("%s (%s)" % (fmt_ratio(kv["qps_ratio"], kv["goal"]), label[c["best"]]) if kv else "-")
                lines.append("| %d | %s | %s | %s |" % (layout, " ".join(bi), k, " | ".join(vals)))
        lines += ["", "Bold: the cell misses the goal (q/s, p99 or 401s).", ""]

        lines += ["## Per cell", "",
                  "| layout | sessions | cache | best stock | its q/s | its p99 ms | kylin | q/s | q/s ratio | p99 ms "
                  "| p99 ratio | cache hits | 401s | goal |",
                  "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for c in suite.cells:
            for k in suite.kylins:
                kv = c["kylin"].get(k)
                if not kv:
                    continue
                lines.append("| %d | %s | %s | %s | %.0f | %.1f | %s | %.0f | %.3f | %.1f | %.3f | %.0f%% | %d | %s |" % (
                    c["layout"], c["sessions"], c["cache"], label[c["best"]], c["best_qps"], c["best_p99_ms"], k,
                    kv["qps"], kv["qps_ratio"], kv["p99_ms"], kv["p99_ratio"], 100 * (kv["cache_hit_ratio"] or 0),
                    kv["unauthorized_401"], "yes" if kv["goal"] else "**no**"))
        lines.append("")
        names = [b.name for b in suite.balancers]
        lines += ["## Every balancer per cell: queries/s, p99 ms, 401s", "",
                  "| layout | sessions | cache | " + " | ".join(label[n] for n in names) + " |",
                  "|---|---|---|" + "---:|" * len(names)]
        for c in suite.cells:
            vals = []
            for n in names:
                r = c["runs"].get(n)
                vals.append("%.0f / %.0f%s" % (r["throughput_qps"], r["p99_ms"],
                                                " / %d" % r["unauthorized_401"] if r["unauthorized_401"] else "")
                            if r else "-")
            lines.append("| %d | %s | %s | %s |" % (c["layout"], c["sessions"], c["cache"], " | ".join(vals)))
        lines += ["", "![latency](results/latency.png)", ""]

    runs = suite.results
    if runs:
        def stat(key):
            v = [r["cpu"][key] for r in runs if r["cpu"].get(key) is not None]
            return (sum(v) / len(v), max(v)) if v else (float("nan"), float("nan"))
        lines += ["## CPU check", "",
                  "The nodes are sleep-driven: the numbers measure balancing only while no process saturates a "
                  "core. Per run, CPU used as a share of one core (mean over runs / the highest run):", "",
                  "| process | mean | max |", "|---|---:|---:|"]
        for key, what in (("loadgen", "load generator (one asyncio process)"),
                          ("node_max", "busiest node process (measured window)"),
                          ("nodes", "all 4 node processes"), ("nginx_workers", "nginx, both workers"),
                          ("redis", "redis-server"),
                          ("others", "everything else on the machine (other jobs; cores' worth)")):
            m, x = stat(key)
            lines.append("| %s | %.2f | %.2f |" % (what, m, x))
        mb = stat("machine_busy")
        lines += ["", "Whole machine busy (all %d cores): mean %.0f%%, highest run %.0f%%." % (
            runs[0]["cpu"]["cores"], 100 * mb[0], 100 * mb[1]), ""]

    faults = [r for r in suite.results if r["fault"]]
    if faults:
        lines += ["## Faults (layout %d, bounded cache)" % faults[0]["layout"], "",
                  "node-kill: node2 is killed (SIGKILL) and restarted after the window, losing its node-local "
                  "sessions and cache. redis-stop: `SHUTDOWN SAVE`, started again after the window (sessions kept "
                  "in its dump). redis-slow: nginx reaches Redis through a proxy that delays every reply by 300 ms "
                  "during the window (the nodes reach Redis directly). %.0f s runs, window of %.0f s. Recovery: "
                  "seconds after the window until node2 is back to half its earlier share of requests (node-kill) "
                  "or the busiest/mean in-flight ratio is back near its earlier level (Redis faults)." % (
                      suite.fault_duration, suite.fault_window),
                  "",
                  "| fault | balancer | sessions | window s | queries/s | errors during | 401s during | 401s after "
                  "| p99 during ms | recovery s |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in faults:
            f = r["fault_summary"]
            lines.append("| %s | %s | %s | %s-%s | %.0f | %d | %d | %d | %.0f | %s |" % (
                r["fault"], r["label"], r["sessions"], r["fault_window_s"][0], r["fault_window_s"][1],
                r["summary"]["throughput_qps"], f["errors_during"], f["unauthorized_during"], f["unauthorized_after"],
                f["p99_during_ms"], "%.0f" % f["recovery_s"] if f["recovery_s"] is not None else "-"))
        lines.append("")
        for fault in sorted({r["fault"] for r in faults}):
            lines += ["![%s](results/fault-%s.png)" % (fault, fault), ""]
    lines += ["Raw numbers: `bench/results/summary.json` (cells and summary) and one JSON file per run in "
              "`bench/results/` (summary, CPU, per-second series per node, latency quantiles, the kylin status "
              "page over time, the upstream block used).", ""]
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
    r.add_argument("--bi-sessions", type=int, default=6)
    r.add_argument("--light", type=int, default=9)
    r.add_argument("--think", type=float, default=5.0, help="BI sessions' mean think time, ms")
    r.add_argument("--adhoc", type=float, default=0.03, help="share of ad hoc BI queries")
    r.add_argument("--layout", type=int, help="client addresses of layout N (default: 127.10.N.1)")
    r.add_argument("--json", help="write the summary here")
    s = sub.add_parser("suite", help="the whole benchmark (scripts/bench)")
    s.add_argument("--nginx", required=True)
    s.add_argument("--module", required=True)
    s.add_argument("--quick", action="store_true",
                   help="2 layouts, bounded cache only, 7 s runs, one fault (node-kill: kylin, ip_hash)")
    s.add_argument("--layouts", type=int, help="number of address layouts (default 8; --quick: 2)")
    s.add_argument("--seed", type=int, default=1, help="first layout number (layouts S..S+N-1; default 1)")
    s.add_argument("--kylin-variant", action="append", default=[], metavar="NAME=DIRECTIVES",
                   help="an extra kylin row with these directives in its block (repeatable), "
                        "e.g. 'kylin-requests=kylin_balance requests;'")
    s.add_argument("--duration", type=float, help="seconds per cell run (default 9; --quick: 7)")
    s.add_argument("--warmup", type=float, help="seconds not counted at the start of a run (default 2)")
    s.add_argument("--no-faults", action="store_true", help="skip the fault runs")
    s.add_argument("--repeat", type=int, default=1,
                   help="rounds per cell (default 1): each balancer counts with the median of its runs")
    s.add_argument("--report-only", action="store_true",
                   help="run nothing: rewrite results.md and the charts from OUT/results/*.json")
    s.add_argument("--out", default=os.path.join(ROOT, "bench"))
    s.add_argument("--close-connections", action="store_true",
                   help="one client connection per request in every run (default: keep-alive)")
    s.add_argument("--only", help="comma-separated run names or globs (e.g. 'L1-local-bounded-*,fault-node-kill-kylin')")
    args = ap.parse_args()

    if args.cmd == "run":
        hp = args.url.split("//", 1)[-1].rstrip("/")
        host, _, port = hp.partition(":")
        nodes = [(loopback(h), int(p)) for h, _, p in (n.partition(":") for n in args.node)]
        w = Workload()
        w.bi_servers, w.bi_sessions, w.light = args.bi_servers, args.bi_sessions, args.light
        w.bi_think, w.bi_adhoc = args.think / 1000.0, args.adhoc
        if args.layout is not None:
            set_layout(w, args.layout)
        duration = min(args.duration, 3600.0)
        rec, samples, _ = asyncio.run(run_load(w, loopback(host), int(port or 80), nodes, duration))
        summ = report(rec, samples, duration, args.warmup, nodes, w)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summ, f, indent=1)
        return 0

    if args.layouts is not None and not 1 <= args.layouts <= 64:
        raise SystemExit("--layouts must be between 1 and 64")
    if args.seed < 0:
        raise SystemExit("--seed must be >= 0")
    args.nginx, args.module = os.path.abspath(args.nginx), os.path.abspath(args.module)
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
