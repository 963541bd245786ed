#!/usr/bin/env python3
"""Stand-ins for Apache Kylin query nodes, for the demo and the scenario tests (stdlib only).

Each node behaves like a Kylin node where it matters to a balancer:
  POST /kylin/api/user/authentication  creates a node-local session and sets JSESSIONID
  /kylin/api/query                      401 unless the session was created on this node;
                                        otherwise answers after --delay seconds (or ?sleep=S)
  GET /__stats, /__reset                this node's counters as JSON / reset them (for tests)
  anything else                         200 with the node's name
Every response is JSON and names the node, so you can see where nginx sent you.

    kylin_node.py --port 7071 --port 7072 --port 7073 [--delay 0.05]

Options for benchmarks (scripts/bench); their defaults keep the behaviour above:
  --slots K          each node runs at most K queries (and other slow requests) at once and
                     queues the rest, so overload shows as latency (0: unlimited)
  --cache            each node keeps its own result cache (an LRU of --cache-size entries, 0:
                     unbounded): a query, named by its `q` parameter or else its body, takes
                     --hit-ms on a node that answered it before and --miss-ms otherwise
                     (?sleep= still wins)
  --redis-port P     sessions are also shared through Redis on 127.0.0.1:P, the way
                     tomcat-redis-session-manager keeps them: login does SET <id> EX
                     --session-ttl; a query is accepted when its session is local or its key
                     exists in Redis (a Redis error counts in redis_errors and the session
                     is unknown: 401)
  --name NAME        the nodes' names, in --port order (default node1, node2, ...)
  --tcp-nodelay      TCP_NODELAY on accepted connections (no 40 ms delayed-ACK stalls)
  --background N     N threads per node run queries back to back inside the node's slots
                     (--background-ms each, default --miss-ms), load that does not pass
                     through nginx (another nginx, a user who calls a node directly);
                     GET /__background?threads=N changes one node's at run time
                     (&ms=M their query time; &metrics=off: its metrics page answers like any other path,
                     without the metrics; &metrics=on serves them again)
GET /kylin/api/prometheus answers like Kylin 5's actuator (Prometheus text format):
spark_tasks{state="pending"} (queries queued for a slot), spark_tasks{state="running"} (queries
running) and spark_tasks_utilization (running / --slots; without --slots, running / 1), among
a few JVM-like lines; it takes no slot and is not counted in requests.
/__stats also reports running/queued queries (and the queue's peak), cache hits and misses,
Redis lookups and errors, and the CPU seconds the node's process has used (cpu_s).
"""
import argparse
import json
import secrets
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_SESSIONS = 100000
MAX_SLEEP = 30.0


class Store:
    """Sessions shared through Redis (tomcat-redis-session-manager: key = session id).

    Uses redis-py when it is installed, else a minimal RESP client over a socket (stdlib)."""

    def __init__(self, port, ttl):
        self.port, self.ttl = port, ttl
        self.local = threading.local()
        try:
            import redis  # noqa: F401
            self.pool = redis.ConnectionPool(host="127.0.0.1", port=port, socket_timeout=0.5,
                                             socket_connect_timeout=0.2, max_connections=256)
            self.redis = redis
        except ImportError:
            self.redis = None

    def _resp(self, *args):
        import socket
        sock = getattr(self.local, "sock", None)
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            self.local.sock, self.local.buf = sock, b""
        try:
            out = b"*%d\r\n" % len(args)
            for a in args:
                a = a if isinstance(a, bytes) else str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(a), a)
            sock.sendall(out)
            while b"\r\n" not in self.local.buf:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                self.local.buf += chunk
            line, _, self.local.buf = self.local.buf.partition(b"\r\n")
            if line[:1] == b"-":
                raise ConnectionError(line.decode(errors="replace"))
            return line
        except Exception:
            self.local.sock = None
            sock.close()
            raise

    def put(self, sid, node):
        if self.redis:
            self.redis.Redis(connection_pool=self.pool).set(sid, node, ex=self.ttl)
        else:
            self._resp("SET", sid, node, "EX", self.ttl)

    def exists(self, sid):
        if self.redis:
            return bool(self.redis.Redis(connection_pool=self.pool).exists(sid))
        return self._resp("EXISTS", sid) == b":1"


class Cache:
    """One node's query-result cache: an LRU of query names (size 0: unbounded)."""

    def __init__(self, size):
        self.size = size
        self.entries = OrderedDict()

    def lookup_and_fill(self, key):
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        self.entries[key] = True
        if self.size and len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return False


class FairSlots:
    """K slots handed out first come, first served, as a query queue does (a semaphore lets a
    thread that just released one take it again ahead of those waiting, which starves them
    behind a loop such as the background load)."""

    def __init__(self, k):
        self.free, self.lock, self.waiters = k, threading.Lock(), deque()

    def acquire(self, blocking=True, timeout=None):
        with self.lock:
            if self.free > 0 and not self.waiters:
                self.free -= 1
                return True
            if not blocking:
                return False
            ev = threading.Event()
            self.waiters.append(ev)
        if ev.wait(timeout):
            return True
        with self.lock:
            if ev.is_set():  # handed a slot just as the wait ended
                return True
            self.waiters.remove(ev)
            return False

    def release(self):
        with self.lock:
            if self.waiters:
                self.waiters.popleft().set()  # the slot passes to the first in the queue
            else:
                self.free += 1


class Node:
    """One node's state: its sessions and counters."""

    def __init__(self, name, delay, slots=0, cache=None, hit=0.005, miss=0.06, store=None):
        self.name = name
        self.delay = delay
        self.lock = threading.Lock()
        self.sessions = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.unauthorized = 0
        # Benchmark extensions (all off by default).
        self.slots = FairSlots(slots) if slots > 0 else None
        self.cache, self.hit, self.miss, self.store = cache, hit, miss, store
        self.running = self.queued = self.queue_peak = 0
        self.queries = self.cache_hits = self.cache_misses = 0
        self.logins = self.redis_lookups = self.redis_errors = self.shared_accepted = 0
        self.started = time.time()
        self.nodelay = False
        self.slot_count = slots
        # Load from outside nginx: threads running queries back to back.
        self.background = 0
        self.background_ms = miss * 1000.0
        self.background_queries = 0
        self.metrics_requests = 0
        self.metrics_on = True

    def set_background(self, threads):
        """Runs `threads` background query loops (more start, extra ones stop)."""
        with self.lock:
            old, self.background = self.background, max(0, min(int(threads), 256))
            start = range(old, self.background)
        for k in start:
            threading.Thread(target=self._background_loop, args=(k,), daemon=True).start()

    def _background_loop(self, k):
        while True:
            with self.lock:
                if k >= self.background:
                    return
            self.work(self.background_ms / 1000.0)
            with self.lock:
                self.background_queries += 1

    def prometheus(self):
        """The node's metrics, as Kylin 5's /kylin/api/prometheus names them."""
        with self.lock:
            running, queued = self.running, self.queued
            self.metrics_requests += 1
        util = running / float(self.slot_count if self.slot_count > 0 else 1)
        return (
            "# HELP jvm_threads_live_threads The current number of live threads\n"
            "# TYPE jvm_threads_live_threads gauge\n"
            "jvm_threads_live_threads %d\n"
            "# HELP spark_tasks Spark tasks\n"
            "# TYPE spark_tasks gauge\n"
            "spark_tasks{state=\"pending\",} %.1f\n"
            "spark_tasks{state=\"running\",} %.1f\n"
            "# HELP spark_tasks_utilization Running tasks / cores\n"
            "# TYPE spark_tasks_utilization gauge\n"
            "spark_tasks_utilization %.4f\n"
            "kylin_sparder_up 1.0\n"
            "jvm_memory_used_bytes{area=\"heap\",id=\"G1 Eden Space\",} 1.2E8\n"
            % (threading.active_count(), queued, running, util)
        ).encode()

    def work(self, seconds):
        """Sleeps `seconds` inside one of the node's slots (queueing for one when all are busy)."""
        if self.slots is None:
            time.sleep(seconds)
            return
        acquired = self.slots.acquire(blocking=False)
        if not acquired:  # all slots busy: wait in the queue
            with self.lock:
                self.queued += 1
                self.queue_peak = max(self.queue_peak, self.queued)
            acquired = self.slots.acquire(timeout=MAX_SLEEP * 4)
            with self.lock:
                self.queued -= 1
        with self.lock:
            self.running += 1
        try:
            time.sleep(seconds)
        finally:
            with self.lock:
                self.running -= 1
            if acquired:
                self.slots.release()

    def enter(self):
        with self.lock:
            self.in_flight += 1
            self.requests += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self):
        with self.lock:
            self.in_flight -= 1

    def stats(self):
        with self.lock:
            return {
                "node": self.name,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "requests": self.requests,
                "unauthorized": self.unauthorized,
                "sessions": len(self.sessions),
                "running": self.running,
                "queued": self.queued,
                "queue_peak": self.queue_peak,
                "queries": self.queries,
                "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses,
                "logins": self.logins,
                "redis_lookups": self.redis_lookups,
                "redis_errors": self.redis_errors,
                "shared_accepted": self.shared_accepted,
                "background": self.background,
                "background_queries": self.background_queries,
                "metrics_requests": self.metrics_requests,
                "uptime": round(time.time() - self.started, 3),
                "cpu_s": round(time.process_time(), 3),
            }


def make_handler(node):
    class Handler(BaseHTTPRequestHandler):
        server_version = "KylinNode/" + node.name
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep terminals quiet
            pass

        def setup(self):
            super().setup()
            if node.nodelay:  # headers and body go out in two writes: no Nagle wait between
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def session(self):
            for part in self.headers.get("Cookie", "").split(";"):
                k, _, v = part.strip().partition("=")
                if k == "JSESSIONID":
                    return v
            return None

        def reply(self, status, body, cookie=None):
            data = (json.dumps(body) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if cookie:
                self.send_header("Set-Cookie", "JSESSIONID=%s; Path=/kylin; HttpOnly" % cookie)
            self.end_headers()
            self.wfile.write(data)

        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.body = b""
            if length:
                self.body = self.rfile.read(min(length, 1 << 20))
            url = urlsplit(self.path)
            if url.path == "/__stats":
                return self.reply(200, node.stats())
            if url.path == "/kylin/api/prometheus" and node.metrics_on:
                data = node.prometheus()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None
            if url.path == "/__background":
                q = parse_qs(url.query)
                try:
                    node.set_background(int((q.get("threads") or ["0"])[0]))
                    if q.get("metrics"):
                        node.metrics_on = q["metrics"][0] != "off"
                    if q.get("ms"):
                        node.background_ms = min(max(float(q["ms"][0]), 1.0), MAX_SLEEP * 1000)
                except ValueError:
                    return self.reply(400, {"error": "threads=N [ms=M]"})
                return self.reply(200, node.stats())
            if url.path == "/__reset":
                with node.lock:
                    node.max_in_flight = node.in_flight
                    node.requests = node.unauthorized = 0
                return self.reply(200, node.stats())
            node.enter()
            try:
                return self.route(url)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client (nginx) gave up on this request
            finally:
                node.leave()

        def route(self, url):
            client = self.headers.get("X-Real-IP") or self.client_address[0]
            if url.path.startswith("/kylin/api/user/authentication") and self.command == "POST":
                sid = secrets.token_hex(16).upper()
                with node.lock:
                    if len(node.sessions) >= MAX_SESSIONS:
                        node.sessions.pop(next(iter(node.sessions)))
                    node.sessions[sid] = client
                    node.logins += 1
                if node.store is not None:
                    try:
                        node.store.put(sid, node.name)
                    except Exception:
                        with node.lock:
                            node.redis_errors += 1
                return self.reply(200, {"node": node.name, "login": "ok"}, cookie=sid)
            if url.path.startswith("/kylin/api/query"):
                sid = self.session()
                with node.lock:
                    known = sid in node.sessions
                    if not known and node.store is None:
                        node.unauthorized += 1
                if not known and node.store is not None and sid:
                    try:
                        known = node.store.exists(sid)
                        with node.lock:
                            node.redis_lookups += 1
                            node.shared_accepted += known
                    except Exception:
                        with node.lock:
                            node.redis_errors += 1
                    if not known:
                        with node.lock:
                            node.unauthorized += 1
                elif not known and node.store is not None:
                    with node.lock:
                        node.unauthorized += 1
                if not known:
                    return self.reply(401, {"node": node.name, "error": "unauthorized: log in first"})
                delay = node.delay
                query = parse_qs(url.query)
                body = {"node": node.name, "results": [[1]], "session": "valid"}
                if node.cache is not None:
                    key = (query.get("q") or [self.body.decode("utf-8", "replace")])[0]
                    with node.lock:
                        hit = node.cache.lookup_and_fill(key)
                        node.queries += 1
                        if hit:
                            node.cache_hits += 1
                        else:
                            node.cache_misses += 1
                    delay = node.hit if hit else node.miss
                    body["cache"] = "hit" if hit else "miss"
                sleep = query.get("sleep")
                if sleep:
                    try:
                        delay = min(max(float(sleep[0]), 0.0), MAX_SLEEP)
                    except ValueError:
                        pass
                node.work(delay)
                return self.reply(200, body)
            if url.path.startswith("/kylin/api/cube") or url.path.startswith("/slow"):
                # Session-less work (e.g. a BI tool's metadata polling): slow, movable.
                node.work(node.delay)
            return self.reply(200, {"node": node.name, "path": url.path})

        do_GET = do_POST = do_PUT = do_DELETE = handle_any

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds per query")
    ap.add_argument("--name", action="append", default=[], help="node names, in --port order")
    ap.add_argument("--slots", type=int, default=0, help="queries run at once per node (0: no limit)")
    ap.add_argument("--cache", action="store_true", help="per-node query-result cache")
    ap.add_argument("--cache-size", type=int, default=1000, help="entries per node cache (0: unbounded)")
    ap.add_argument("--hit-ms", type=float, default=5.0, help="query time on a cache hit")
    ap.add_argument("--miss-ms", type=float, default=60.0, help="query time on a cache miss")
    ap.add_argument("--redis-port", type=int, default=0, help="share sessions through Redis")
    ap.add_argument("--session-ttl", type=int, default=1800, help="seconds, for Redis sessions")
    ap.add_argument("--tcp-nodelay", action="store_true",
                    help="disable Nagle on accepted connections (no 40 ms delayed-ACK stalls)")
    ap.add_argument("--background", type=int, default=0,
                    help="background query threads per node (load that bypasses nginx)")
    ap.add_argument("--background-ms", type=float, default=0.0,
                    help="each background query's time (default --miss-ms)")
    args = ap.parse_args()
    ThreadingHTTPServer.request_queue_size = 256
    store = Store(args.redis_port, args.session_ttl) if args.redis_port else None
    servers = []
    for i, port in enumerate(args.port, 1):
        name = args.name[i - 1] if i <= len(args.name) else "node%d" % i
        node = Node(name, args.delay, slots=args.slots,
                    cache=Cache(args.cache_size) if args.cache else None,
                    hit=args.hit_ms / 1000.0, miss=args.miss_ms / 1000.0, store=store)
        node.nodelay = args.tcp_nodelay
        if args.background_ms > 0:
            node.background_ms = args.background_ms
        node.set_background(args.background)
        srv = ThreadingHTTPServer((args.host, port), make_handler(node))
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("kylin nodes on %s" % ", ".join("%s:%d" % (args.host, p) for p in args.port), flush=True)
    stop.wait()
    for srv in servers:
        srv.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
