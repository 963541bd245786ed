#!/usr/bin/env python3
"""A stand-in for Apache Kylin query nodes, for the demo (standard library only).

Each node behaves like a Kylin node where it matters to a balancer:
  POST /kylin/api/user/authentication  creates a node-local session, sets JSESSIONID
  POST|GET /kylin/api/query             401 unless the session was created on this node
  anything else                         200 with the node's name
Every response is JSON and names the node, so you can see where nginx sent you.

    kylin_node.py --port 7071 --port 7072 --port 7073
"""
import argparse
import json
import secrets
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_SESSIONS = 10000


def make_handler(name, sessions, lock):
    class Node(BaseHTTPRequestHandler):
        server_version = "KylinNode/" + name
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep the demo's terminal quiet
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
            client = self.headers.get("X-Real-IP") or self.client_address[0]
            if self.path.startswith("/kylin/api/user/authentication") and self.command == "POST":
                sid = secrets.token_hex(16).upper()
                with lock:
                    if len(sessions) >= MAX_SESSIONS:
                        sessions.pop(next(iter(sessions)))
                    sessions[sid] = client
                return self.reply(200, {"node": name, "login": "ok"}, cookie=sid)
            if self.path.startswith("/kylin/api/query"):
                sid = self.session()
                with lock:
                    known = sid in sessions
                if not known:
                    return self.reply(401, {"node": name, "error": "unauthorized: log in first"})
                return self.reply(200, {"node": name, "results": [[1]], "session": "valid"})
            return self.reply(200, {"node": name, "path": self.path})

        do_GET = do_POST = do_PUT = do_DELETE = handle_any

    return Node


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    servers = []
    for i, port in enumerate(args.port, 1):
        srv = ThreadingHTTPServer((args.host, port), make_handler("node%d" % i, {}, threading.Lock()))
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
