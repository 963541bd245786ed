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
"""
import argparse
import json
import secrets
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_SESSIONS = 100000
MAX_SLEEP = 30.0


class Node:
    """One node's state: its sessions and counters."""

    def __init__(self, name, delay):
        self.name = name
        self.delay = delay
        self.lock = threading.Lock()
        self.sessions = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.unauthorized = 0

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
            }


def make_handler(node):
    class Handler(BaseHTTPRequestHandler):
        server_version = "KylinNode/" + node.name
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep terminals quiet
            pass

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
            if length:
                self.rfile.read(min(length, 1 << 20))
            url = urlsplit(self.path)
            if url.path == "/__stats":
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
                return self.reply(200, {"node": node.name, "login": "ok"}, cookie=sid)
            if url.path.startswith("/kylin/api/query"):
                sid = self.session()
                with node.lock:
                    known = sid in node.sessions
                    if not known:
                        node.unauthorized += 1
                if not known:
                    return self.reply(401, {"node": node.name, "error": "unauthorized: log in first"})
                delay = node.delay
                sleep = parse_qs(url.query).get("sleep")
                if sleep:
                    try:
                        delay = min(max(float(sleep[0]), 0.0), MAX_SLEEP)
                    except ValueError:
                        pass
                time.sleep(delay)
                return self.reply(200, {"node": node.name, "results": [[1]], "session": "valid"})
            if url.path.startswith("/kylin/api/cube") or url.path.startswith("/slow"):
                # Session-less work (e.g. a BI tool's metadata polling): slow, movable.
                time.sleep(node.delay)
            return self.reply(200, {"node": node.name, "path": url.path})

        do_GET = do_POST = do_PUT = do_DELETE = handle_any

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds per query")
    args = ap.parse_args()
    ThreadingHTTPServer.request_queue_size = 256
    servers = []
    for i, port in enumerate(args.port, 1):
        srv = ThreadingHTTPServer((args.host, port), make_handler(Node("node%d" % i, args.delay)))
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
