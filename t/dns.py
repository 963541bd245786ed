#!/usr/bin/env python3
"""A tiny DNS server for the tests (stdlib only), whose answers the test changes under traffic.

    dns.py --dns-port P --control-port C --name kylin.test --addrs 127.0.0.2,127.0.0.3

UDP on 127.0.0.1:P: an A query for NAME is answered with every address of the current set
(TTL 1), any other query type for NAME with no records, any other name with NXDOMAIN.

HTTP on 127.0.0.1:C (for the test, usually through an nginx location):
    GET /set?127.0.0.4,127.0.0.5   the next answers name these addresses; resets the count
    GET /queries?2                 waits (up to 30 s) until that many A queries for NAME were
                                   answered with the current set, then answers 200 (504 if not)
    GET /sleep?0.5                 answers after that many seconds
    GET /state                     the current set and the count, as text
The bodies are empty except for /state, so that SSI pages that include them stay readable.
"""
import argparse
import http.server
import socket
import struct
import threading
import time
import urllib.parse

lock = threading.Condition()
current = []
answered = 0


def parse_name(msg, off):
    labels = []
    while True:
        n = msg[off]
        off += 1
        if n == 0:
            return b".".join(labels).lower(), off
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(msg[off:off + n])
        off += n


def answer(msg, name):
    global answered
    (ident, flags, qd) = struct.unpack("!HHH", msg[:6])
    if qd != 1 or flags & 0x8000:
        return None
    qname, off = parse_name(msg, 12)
    qtype, qclass = struct.unpack("!HH", msg[off:off + 4])
    question = msg[12:off + 4]
    rd = flags & 0x0100
    records = b""
    count = 0
    if qname != name:
        rcode = 3  # NXDOMAIN
    else:
        rcode = 0
        if qtype == 1 and qclass == 1:
            with lock:
                addrs = list(current)
                answered += 1
                lock.notify_all()
            for a in addrs:
                records += struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(a)
                count += 1
    header = struct.pack("!HHHHHH", ident, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, count, 0, 0)
    return header + question + records


def serve_dns(s, name):
    while True:
        msg, peer = s.recvfrom(4096)
        try:
            reply = answer(msg, name)
        except (ValueError, IndexError, struct.error):
            reply = None
        if reply:
            s.sendto(reply, peer)


class Control(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global current, answered
        u = urllib.parse.urlsplit(self.path)
        arg = urllib.parse.unquote(u.query)
        status, body = 200, b""
        if u.path == "/set":
            addrs = [a for a in arg.split(",") if a]
            for a in addrs:
                socket.inet_aton(a)
            with lock:
                current = addrs
                answered = 0
        elif u.path == "/queries":
            want = int(arg or "1")
            with lock:
                if not lock.wait_for(lambda: answered >= want, timeout=30):
                    status = 504
        elif u.path == "/sleep":
            time.sleep(float(arg or "0"))
        elif u.path == "/state":
            with lock:
                body = ("%s %d\n" % (",".join(current), answered)).encode()
        else:
            status = 404
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    global current
    ap = argparse.ArgumentParser()
    ap.add_argument("--dns-port", type=int, required=True)
    ap.add_argument("--control-port", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--addrs", default="")
    a = ap.parse_args()
    current = [x for x in a.addrs.split(",") if x]
    # Both sockets are bound before anything is served: a port in use fails the start.
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", a.dns_port))
    http.server.ThreadingHTTPServer.daemon_threads = True
    control = http.server.ThreadingHTTPServer(("127.0.0.1", a.control_port), Control)
    threading.Thread(target=serve_dns, args=(udp, a.name.lower().encode()), daemon=True).start()
    control.serve_forever()


if __name__ == "__main__":
    main()
