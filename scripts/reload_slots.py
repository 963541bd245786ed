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

Usage: reload_slots.py --nginx PATH --module PATH [--reloads N] [--keep]
Prints one line per check and "reload_slots: N passed, M failed"; exits 1 on any failure.
Listens on free ports of 127.0.0.1 and 127.0.R.1 (one per reload); about 20 s.
"""
import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenario import drive, free_ports, http, quit_nginx, status_problems, wait_port  # noqa: E402

FILLERS = 1500
REQUESTS = 5

CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log notice;
pid logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    kylin_upstream kc {{
        server {live};
{fillers}
    }}
    server {{
        listen {live};
        location / {{ return 200 "live\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://kc; }}
        location = /status {{ kylin_status; }}
    }}
}}
"""


class Test:
    def __init__(self, nginx, module, reloads, keep):
        self.nginx, self.module, self.reloads, self.keep = nginx, module, reloads, keep
        self.results = []
        self.prefix = tempfile.mkdtemp(prefix="kylin-reload-slots-")
        self.port, self.live_port = free_ports(2)

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s %s: %s" % ("ok  " if ok else "FAIL", name, detail), flush=True)

    def live(self, r):
        return "127.0.%d.1:%d" % (r, self.live_port)

    def write_conf(self, r):
        # Every server's address is new in every configuration.
        fillers = "\n".join("        server 127.%d.%d.%d:9 down;" % (100 + r % 100, i // 250, i % 250 + 1) for i in range(FILLERS))
        conf = CONF.format(module=self.module, live=self.live(r), fillers=fillers, port=self.port)
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
        if not self.keep:
            shutil.rmtree(self.prefix, ignore_errors=True)
        else:
            print("kept", self.prefix)

    async def status(self):
        _, _, body = await http(self.port, "GET", "/status", timeout=5)
        return json.loads(body)

    async def serving(self, r):
        """The status document once the workers of configuration `r` answer."""
        end = time.time() + 15
        while time.time() < end:
            try:
                doc = await self.status()
                if any(s["address"] == self.live(r) for s in doc["upstreams"]["kc"]["servers"]):
                    return doc
            except (OSError, ValueError, KeyError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("configuration %d not serving after 15 s" % r)

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
        # The current and the previous configuration (1,501 servers and the upstream each).
        limit = 2 * (FILLERS + 2)
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
        with open(os.path.join(self.prefix, "logs", "error.log")) as f:
            log = f.read()
        errors = [l for l in log.splitlines() if any(x in l for x in ("[error]", "[crit]", "[alert]", "[emerg]"))]
        self.check("error log", not errors, "no error, crit, alert or emerg" if not errors else "; ".join(errors[:2]))


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
