#!/usr/bin/env python3
"""Reload test: the shared load counters keep working however many reloads change the servers.

The module keeps one slot of shared counters per (upstream, server address) in its
`kylin_load` zone, which survives reloads. This test reloads nginx (two workers) many times
with a configuration whose server addresses all change every time: one upstream of
1,500 `down` servers plus one live server, all at new addresses. Each configuration alone
needs an eighth of the zone; together they need several zones' worth, so slots of servers
no longer configured must be reclaimed. After each reload it sends requests to the live
server and checks, on the status page, that:
  1. counted  - the live server (configured by this reload) has a slot and counts every
                request it got (a full zone would leave it at 0: the bound silently off);
  2. zone     - `load_zone` reports the table: slots in use stay within what the current and
                the previous configuration need, no claim failed;
and at the end that the document matches the schema, the Prometheus text has the zone
metrics, and the error log has no error (in particular no "is full").

Then a full zone, which only `resolve` can cause (the zone has room for four times the
configured servers): a DNS stand-in answers for `kylin.test` with 3,900 new addresses each
time nginx asks, so the resolved servers soon outnumber the slots. It checks that:
  3. full     - the error log says the zone is full, `load_zone.claims_failed` counts it and
                the servers without a slot are marked (`load_slot` false, Prometheus
                `kylin_server_load_slot` 0): never silent zeros;
  4. recovery - with the DNS answers steady, the second reload after reclaims the slots of
                the addresses gone, and every server has a slot again.

Usage: reload_slots.py --nginx PATH --module PATH [--reloads N] [--keep]
Prints one line per check and "reload_slots: N passed, M failed"; exits 1 on any failure.
Listens on free ports of 127.0.0.1 and 127.0.R.1 (one per reload); about 30 s.
"""
import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenario import drive, free_ports, http, quit_nginx, status_problems, wait_port  # noqa: E402

FILLERS = 1500
REQUESTS = 5
# Addresses per DNS answer: 16 bytes each, within nginx's 64 KB TCP answer buffer.
RESOLVED = 3900

CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log notice;
pid logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    kylin_upstream kc {{
{upstream}
    }}
    server {{
        listen {live};
        location / {{ return 200 "live\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://kc; proxy_next_upstream_tries 1; proxy_connect_timeout 1s; }}
        location = /status {{ kylin_status; }}
    }}
}}
"""


class Dns:
    """A DNS stand-in on 127.0.0.1 (UDP and TCP): every A query for any name gets RESOLVED
    addresses, new ones each time while `rotating` (over UDP only a truncated answer, so
    nginx asks again over TCP, as it does for large answers)."""

    def __init__(self, port):
        self.port, self.rotating, self.round = port, True, 0
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", port))
        self.tcp = socket.socket()
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", port))
        self.tcp.listen(16)
        for target in (self.serve_udp, self.serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def answer(self, query, truncate):
        end = 12
        while query[end]:
            end += query[end] + 1
        question = query[12:end + 5]
        qtype = struct.unpack("!H", query[end + 1:end + 3])[0]
        addrs = []
        if qtype == 1 and not truncate:
            if self.rotating:
                self.round += 1
            r = self.round
            addrs = [bytes([127, 20 + r % 200, i // 250, i % 250 + 1]) for i in range(RESOLVED)]
        flags = 0x8180 | (0x0200 if truncate and qtype == 1 else 0)
        head = query[:2] + struct.pack("!HHHHH", flags, 1, len(addrs), 0, 0)
        # Each answer: a pointer to the question's name, A, IN, TTL 1 s, 4 bytes of address.
        return head + question + b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 1, 4) + a for a in addrs)

    def serve_udp(self):
        while True:
            try:
                q, peer = self.udp.recvfrom(512)
                self.udp.sendto(self.answer(q, truncate=True), peer)
            except (OSError, IndexError, struct.error):
                if self.udp.fileno() < 0:
                    return

    def serve_tcp(self):
        while True:
            try:
                c, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self.serve_conn, args=(c,), daemon=True).start()

    def serve_conn(self, c):
        with c:
            try:
                while True:
                    n = c.recv(2)
                    if len(n) < 2:
                        return
                    want, q = struct.unpack("!H", n)[0], b""
                    while len(q) < want:
                        chunk = c.recv(want - len(q))
                        if not chunk:
                            return
                        q += chunk
                    a = self.answer(q, truncate=False)
                    c.sendall(struct.pack("!H", len(a)) + a)
            except (OSError, IndexError, struct.error):
                return

    def close(self):
        self.udp.close()
        self.tcp.close()


class Test:
    def __init__(self, nginx, module, reloads, keep):
        self.nginx, self.module, self.reloads, self.keep = nginx, module, reloads, keep
        self.results = []
        self.prefix = tempfile.mkdtemp(prefix="kylin-reload-slots-")
        self.port, self.live_port, self.dns_port = free_ports(3)
        self.dns = None

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s %s: %s" % ("ok  " if ok else "FAIL", name, detail), flush=True)

    def live(self, r):
        return "127.0.%d.1:%d" % (r, self.live_port)

    def write_conf(self, r, upstream=None):
        if upstream is None:
            # Every server's address is new in every configuration.
            upstream = "\n".join(["        server %s;" % self.live(r)] + [
                "        server 127.%d.%d.%d:9 down;" % (100 + r % 100, i // 250, i % 250 + 1) for i in range(FILLERS)])
        conf = CONF.format(module=self.module, live=self.live(r), upstream=upstream, port=self.port)
        if os.geteuid() == 0:
            conf = "user root;\n" + conf
        with open(os.path.join(self.prefix, "conf", "nginx.conf"), "w") as f:
            f.write(conf)

    def master(self):
        with open(os.path.join(self.prefix, "logs", "nginx.pid")) as f:
            return int(f.read().strip())

    def start(self):
        os.makedirs(os.path.join(self.prefix, "logs"))
        os.makedirs(os.path.join(self.prefix, "conf"))
        self.write_conf(1)
        subprocess.run([self.nginx, "-p", self.prefix, "-c", "conf/nginx.conf"], check=True)
        if not wait_port(self.port):
            raise RuntimeError("nginx did not start")

    def stop(self):
        quit_nginx(self.prefix)
        if self.dns:
            self.dns.close()
        if not self.keep:
            shutil.rmtree(self.prefix, ignore_errors=True)
        else:
            print("kept", self.prefix)

    async def status(self):
        _, _, body = await http(self.port, "GET", "/status", timeout=5)
        return json.loads(body)

    def workers(self):
        """The master's children (its workers: this configuration has no cache processes)."""
        master, n = self.master(), 0
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open("/proc/%s/stat" % pid) as f:
                        # The field after the command name (in parentheses) is the state, then ppid.
                        n += int(f.read().rsplit(")", 1)[1].split()[1]) == master
                except (OSError, IndexError, ValueError):
                    pass
        return n

    async def serving(self, r):
        """The status document once the workers of configuration `r` answer and the previous
        configuration's workers have exited (until they take the shutdown signal they still
        accept connections, and answer with their own configuration: on a busy machine, for a
        while)."""
        end = time.time() + 15
        while time.time() < end:
            try:
                doc = await self.status()
                if any(s["address"] == self.live(r) for s in doc["upstreams"]["kc"]["servers"]) and self.workers() == 2:
                    return doc
            except (OSError, ValueError, KeyError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("configuration %d not serving after 15 s (workers: %d)" % (r, self.workers()))

    async def one(self, r):
        await self.serving(r)
        for _ in range(REQUESTS):
            st, _, body = await http(self.port, "GET", "/q")
            if st != 200 or body != b"live\n":
                return "request answered %s %r" % (st, body[:40])
        doc = await self.status()
        srv = [s for s in doc["upstreams"]["kc"]["servers"] if s["address"] == self.live(r)]
        counted = "" if srv and srv[0]["requests"] == REQUESTS else "live server %s counted %s of %d requests" % (
            self.live(r), srv[0]["requests"] if srv else None, REQUESTS)
        z = doc.get("load_zone")
        # The current and the previous configuration: 1,501 servers with two slots each (load
        # counters, and health and drain state) and the upstream's total.
        limit = 2 * (2 * (FILLERS + 1) + 1)
        if not srv or srv[0].get("load_slot") is not True:
            zone = "live server %s: load_slot %s" % (self.live(r), srv[0].get("load_slot") if srv else None)
        elif not z:
            zone = "no load_zone in the status document"
        elif z["claims_failed"] != 0 or z["slots_used"] > limit or z["slots_used"] > z["capacity"]:
            zone = "load_zone %s (slots_used must stay <= %d)" % (json.dumps(z, sort_keys=True), limit)
        else:
            zone = ""
        return counted, zone

    async def run(self):
        bad = {"counted": [], "zone": []}
        for r in range(1, self.reloads + 1):
            if r > 1:
                self.write_conf(r)
                os.kill(self.master(), signal.SIGHUP)
            for name, problem in zip(("counted", "zone"), await self.one(r)):
                if problem:
                    bad[name].append("reload %d: %s" % (r, problem))
        doc = await self.status()
        zone = doc.get("load_zone")
        self.check("counted", not bad["counted"],
                   "after each of %d reloads (%d new servers each), the new live server counted all %d requests"
                   % (self.reloads, FILLERS + 1, REQUESTS)
                   if not bad["counted"] else "%d reloads failed, first %s" % (len(bad["counted"]), bad["counted"][0]))
        ok = not bad["zone"] and bool(zone) and zone["reclaimed"] > 0
        self.check("zone", ok, "load_zone after the last reload: %s" % json.dumps(zone, sort_keys=True)
                   if ok else "%d reloads failed, first %s" % (len(bad["zone"]), (bad["zone"] or ["reclaimed nothing"])[0]))
        _, _, prom = await http(self.port, "GET", "/status?format=prometheus")
        prom = prom.decode()
        problems = status_problems(doc, prom)
        for metric in ("kylin_load_zone_slots_used{", "kylin_load_zone_claims_failed_total{", "kylin_load_zone_reclaimed_total{"):
            if metric not in prom:
                problems.append("no %s} in the Prometheus text" % metric)
        live = 'kylin_server_load_slot{upstream="kc",server="%s"} 1' % self.live(self.reloads)
        if live not in prom:
            problems.append("no %r in the Prometheus text" % live)
        self.check("status schema", not problems, "the document validates and the Prometheus text has the zone metrics"
                   if not problems else "; ".join(problems[:3]))
        errors = self.log_lines("[error]", "[crit]", "[alert]", "[emerg]")
        self.check("error log", not errors, "no error, crit, alert or emerg" if not errors else "; ".join(errors[:2]))
        v = subprocess.run([self.nginx, "-v"], capture_output=True, text=True).stderr.strip().rsplit("/", 1)[-1]
        if tuple(int(x) for x in v.split(".")[:3]) >= (1, 27, 3):
            await self.full(self.reloads + 1)
        else:
            print("skip full, recovery: nginx %s has no `resolve` in upstreams (1.27.3+)" % v, flush=True)
        bad = self.log_lines("[crit]", "[alert]", "[emerg]", "exited on signal")
        self.check("crashes", not bad, "no crit, alert, emerg or crashed worker" if not bad else "; ".join(bad[:2]))

    def log_lines(self, *kinds):
        with open(os.path.join(self.prefix, "logs", "error.log"), errors="replace") as f:
            return [l.strip() for l in f if any(k in l for k in kinds)]

    async def reload_to(self, generation):
        """Reloads nginx (same configuration file) and waits for the new workers."""
        os.kill(self.master(), signal.SIGHUP)
        end = time.time() + 15
        while time.time() < end:
            try:
                if (await self.status())["load_zone"]["generation"] >= generation:
                    return
            except (OSError, ValueError, KeyError, TypeError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("generation %d not serving after 15 s" % generation)

    async def until(self, done, seconds):
        """Sends requests (the workers rebuild their tables, and claim slots, as the servers
        change) until done(status document) holds; returns the last document."""
        end = time.time() + seconds
        while True:
            for _ in range(4):
                await http(self.port, "GET", "/q", timeout=5)
            doc = await self.status()
            if done(doc) or time.time() > end:
                return doc
            await asyncio.sleep(0.3)

    async def full(self, r):
        self.dns = Dns(self.dns_port)
        self.write_conf(r, "\n".join([
            "        zone kc 32m;",
            "        resolver 127.0.0.1:%d valid=1s ipv6=off;" % self.dns_port,
            "        server %s;" % self.live(r),
            "        server kylin.test:9 resolve;"]))
        os.kill(self.master(), signal.SIGHUP)
        await self.serving(r)

        def unslotted(doc):
            return [s["address"] for s in doc["upstreams"]["kc"]["servers"] if not s["load_slot"]]

        full_line = 'zone "kylin_load" is full'
        doc = await self.until(lambda d: d["load_zone"]["claims_failed"] > 0 and unslotted(d)
                               and self.log_lines(full_line), 30)
        z = doc["load_zone"]
        _, _, prom = await http(self.port, "GET", "/status?format=prometheus")
        marked = [l for l in prom.decode().splitlines() if l.startswith("kylin_server_load_slot{") and l.endswith(" 0")]
        logged = self.log_lines(full_line)
        ok = z["claims_failed"] > 0 and bool(unslotted(doc)) and bool(logged) and len(marked) == len(unslotted(doc))
        self.check("full", ok, "after %d DNS answers of %d new addresses: %d servers without a slot (load_slot false, %d "
                   "Prometheus lines at 0), load_zone %s, logged: %s" % (
                       self.dns.round, RESOLVED, len(unslotted(doc)), len(marked), json.dumps(z, sort_keys=True),
                       logged[0].split("kylin: ", 1)[-1][:140] + "..." if logged else None))

        # Steady answers: the addresses of earlier answers are gone. The first reload keeps
        # their slots (the running configuration used them), the second one reclaims them.
        self.dns.rotating = False
        await asyncio.sleep(2.5)  # the last answer nginx asked for under rotation is replaced
        generation = z["generation"]
        for _ in range(2):
            generation += 1
            await self.reload_to(generation)
            doc = await self.until(lambda d: not unslotted(d), 5)
        z = doc["load_zone"]
        servers = len(doc["upstreams"]["kc"]["servers"])
        self.check("recovery", not unslotted(doc) and servers > RESOLVED and z["slots_used"] < z["capacity"],
                   "two reloads after the DNS answers settled, all %d servers have a slot; load_zone %s"
                   % (servers, json.dumps(z, sort_keys=True)) if not unslotted(doc) else
                   "%d of %d servers still without a slot; load_zone %s" % (len(unslotted(doc)), servers, json.dumps(z, sort_keys=True)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--reloads", type=int, default=24)
    ap.add_argument("--keep", action="store_true", help="keep the nginx prefix for inspection")
    args = ap.parse_args()
    return drive("reload_slots", Test(os.path.abspath(args.nginx), os.path.abspath(args.module), args.reloads, args.keep))


if __name__ == "__main__":
    sys.exit(main())
