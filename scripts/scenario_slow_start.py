#!/usr/bin/env python3
"""Scenario test: `kylin_slow_start` after a node comes back (healthy again, or undrained).

nginx with two workers and two upstreams over the same three Kylin stand-ins, both with
`kylin_health_check` (interval 100 ms): `ramp` has `kylin_slow_start 3s`, `plain` has none.
Node n0 turns DOWN, then UP again. Every 0.25 s, 90 session-less clients (one request each,
from their own addresses) ask each upstream. Checks:
  1. control    - through `plain`, n0 takes its whole share of the clients as soon as it is
                  healthy again;
  2. ramp       - through `ramp`, n0's share grows from about 0 to its whole share over 3 s,
                  never shrinking, and only clients whose home n0 is go there;
  3. sessions   - a session that lives on n0 goes back to it at once, not held back by the ramp;
  4. status     - the status page shows the share (`slow_start`) while n0 ramps, null after;
  5. undrain    - a node undrained through `kylin_status write=on` ramps up the same way;
  6. max_fails  - without health checks, a node back from nginx's own failed state
                  (`max_fails`, once `fail_timeout` is over and a try succeeds) ramps up too;
  7. reload     - a node that `nginx -s reload` adds ramps up too (nodes already there do not);
and no alert or crash in the error log. Prints the shares it measured.

Usage: scenario_slow_start.py --nginx PATH --module PATH [--keep]
"""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenario import free_ports, scenario_main, start_nginx, status_problems, stop_nginx  # noqa: E402
from scenario_health import Node, get  # noqa: E402
from scenario_runtime_drain import post  # noqa: E402

SLOW = 3.0
CLIENTS = 90

CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    kylin_upstream ramp {{
        zone ramp 64k;
{servers}
        kylin_health_check interval=100ms timeout=300ms 'body="status":"UP"';
        kylin_slow_start {slow}ms;
    }}
    kylin_upstream plain {{
        zone plain 64k;
{servers}
        kylin_health_check interval=100ms timeout=300ms 'body="status":"UP"';
    }}
    kylin_upstream fails {{
        zone fails 64k;
{fservers}
        kylin_slow_start {slow}ms;
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location /ramp/ {{ proxy_pass http://ramp/; }}
        location /plain/ {{ proxy_pass http://plain/; }}
        location /fails/ {{ proxy_pass http://fails/; proxy_next_upstream error timeout http_500; }}
        location = /status {{ kylin_status write=on; }}
    }}
}}
"""


class Scenario:
    def __init__(self, nginx, module, keep):
        self.nginx, self.module, self.keep = nginx, module, keep
        self.results = []
        *ports, self.port = free_ports(5)
        self.ports = ports
        self.nodes = [Node(p, "n%d" % i) for i, p in enumerate(ports)]

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s: %s (%s)" % ("ok" if ok else "FAILED", name, detail))
        sys.stdout.flush()

    def conf(self, n=3):
        servers = "\n".join("        server 127.0.0.1:%d;" % p for p in self.ports[:n])
        fservers = "\n".join("        server 127.0.0.1:%d max_fails=1 fail_timeout=1s;" % p for p in self.ports[:n])
        return CONF.format(module=self.module, port=self.port, servers=servers, fservers=fservers, slow=int(SLOW * 1000))

    def clients(self, up, node):
        """The clients (indices) of upstream `up` that land on `node` now."""
        return {a for a in range(CLIENTS) if get(self.port, "/%s/q" % up, "10.%d.%d.9" % (a // 200, a % 200))[1] == node}

    def server(self, up, i):
        _, body, _ = get(self.port, "/status", "127.0.0.1")
        doc = json.loads(body)
        addr = "127.0.0.1:%d" % self.ports[i]
        return next(s for s in doc["upstreams"][up]["servers"] if s["address"] == addr), doc

    def until(self, cond, limit):
        start = time.time()
        while time.time() - start < limit:
            if cond():
                return True
            time.sleep(0.02)
        return False

    def run(self):
        prefix, master = start_nginx(self.nginx, self.conf(), self.port, "kylin-scenario-slow-")
        self.prefix, self.master = prefix, master
        try:
            self.body()
        finally:
            bad = stop_nginx(prefix, master, self.keep)
            self.check("no alerts or crashes in the error log; graceful stop", not bad, "%s" % bad[:3])

    def ramp_run(self, back, node, home):
        """Samples n's share through both upstreams for SLOW + 0.5 s after `back()`."""
        back()
        t0 = time.time()
        samples = []
        # Each sample is timed by its start (a loaded machine makes a sample slow: the late
        # samples then still start after the ramp); the last one starts after SLOW + 0.2 s.
        while True:
            t = time.time() - t0
            samples.append((t, self.clients("ramp", node), self.clients("plain", node)))
            if len(samples) == 1:
                s, _ = self.server("ramp", int(node[1:]))
                self.ratio_seen = s["slow_start"]
            if t > SLOW + 0.2:
                break
            time.sleep(0.15)
        return samples

    def body(self):
        n0 = self.nodes[0]
        time.sleep(0.5)
        home = self.clients("ramp", "n0")
        home_plain = self.clients("plain", "n0")
        # A session that lives on n0 (through `ramp`).
        sid = None
        for a in range(300):
            status, node, cookie = get(self.port, "/ramp/login", "10.99.%d.1" % a)
            if node == "n0":
                sid = cookie
                break
        n0.health = "DOWN"
        self.until(lambda: self.server("ramp", 0)[0]["state"] == "unhealthy" and self.server("plain", 0)[0]["state"] == "unhealthy", 5)
        gone = self.clients("ramp", "n0")

        def back():
            n0.health = "UP"
            self.until(lambda: self.server("plain", 0)[0]["state"] == "up", 5)

        self.ratio_seen = None
        samples = self.ramp_run(back, "n0", home)
        # The session, right after n0 is back (the ramp has barely begun).
        _, body, _ = get(self.port, "/ramp/q", "10.98.0.1", sid)
        shares = ["%.1fs %d/%d" % (t, len(r), len(home)) for t, r, _ in samples]
        print("n0's clients through `ramp` after it came back:", ", ".join(shares))
        print("... through `plain`:", ", ".join("%.1fs %d/%d" % (t, len(p), len(home_plain)) for t, _, p in samples))

        first = [p for t, _, p in samples if t < 1.0]
        self.check("control: without slow start n0 takes its whole share at once",
                   not gone and first and all(p == home_plain for p in first), "%d of %d clients back in every sample of the first second" % (min(len(p) for p in first), len(home_plain)))
        counts = [len(r) for _, r, _ in samples]
        early = [len(r) for t, r, _ in samples if t < 0.75]
        late = [r for t, r, _ in samples if t > SLOW + 0.1]
        self.check("ramp: with kylin_slow_start 3s n0's share grows from about 0 to all, never shrinking, only its own clients",
                   home and early and max(early) <= 0.35 * len(home) and late and all(r == home for r in late)
                   and all(b >= a for a, b in zip(counts, counts[1:])) and all(r <= home for _, r, _ in samples),
                   "counts %s of %d" % (counts, len(home)))
        self.check("sessions: a session living on n0 goes back at once, not held back by the ramp", sid and body == "n0", "went to %s" % body)
        s, doc = self.server("ramp", 0)
        _, prom, _ = get(self.port, "/status?format=prometheus", "127.0.0.1")
        problems = status_problems(doc, prom)
        self.check("status: slow_start shows the share while ramping, null after; the document validates",
                   isinstance(self.ratio_seen, float) and 0 < self.ratio_seen < 0.5 and s["slow_start"] is None and not problems,
                   "during %s, after %s, %s" % (self.ratio_seen, s["slow_start"], problems[:2]))

        # Undrain ramps too.
        home1 = self.clients("ramp", "n1")
        addr = "127.0.0.1:%d" % self.ports[1]
        post(self.port, {"upstream": "ramp", "server": addr, "drain": True})
        drained = self.clients("ramp", "n1")
        samples = self.ramp_run(lambda: post(self.port, {"upstream": "ramp", "server": addr, "drain": False}), "n1", home1)
        counts = [len(r) for _, r, _ in samples]
        print("n1's clients through `ramp` after it was undrained:", ", ".join("%.1fs %d/%d" % (t, len(r), len(home1)) for t, r, _ in samples))
        early = [len(r) for t, r, _ in samples if t < 0.75]
        self.check("undrain: an undrained node ramps up the same way", not drained and early and max(early) <= 0.35 * len(home1)
                   and samples[-1][1] == home1, "counts %s of %d" % (counts, len(home1)))
        self.max_fails_back()
        self.reload_adds()

    def max_fails_back(self):
        """Without health checks: n2 fails its queries (HTTP 500, `max_fails=1`), nginx holds it
        failed for `fail_timeout`; once that is over, the first try that succeeds brings it
        back, and its ramp begins.

        nginx keeps a peer's failure times in whole seconds (`ngx_time()`): with
        `fail_timeout=1s` the first trial comes 1 to 2 s after the failure. So the ramp is
        timed from the first sample in which n2 has clients again (its start), and the
        samples run until n2 has all its clients or SLOW + 3 s have passed."""
        n2 = self.nodes[2]
        home = self.clients("fails", "n2")
        n2.queries = "500"
        self.clients("fails", "n2")
        gone = self.clients("fails", "n2")
        n2.queries = "ok"
        time.sleep(1.0)
        t0 = time.time()
        samples = []
        while True:
            t = time.time() - t0
            r = self.clients("fails", "n2")
            samples.append((t, r))
            if r == home or t > SLOW + 3.0:
                break
            time.sleep(0.15)
        counts = [len(r) for _, r in samples]
        print("n2's clients through `fails` after max_fails let it go:", ", ".join("%.1fs %d/%d" % (t, len(r), len(home)) for t, r in samples))
        # The ramp's start: the first sample with a client back (-1: none came back).
        i = next((j for j, c in enumerate(counts) if c), -1)
        start = samples[i][0]
        early = [c for (t, _), c in zip(samples, counts) if i >= 0 and start <= t < start + 0.75]
        took = samples[-1][0] - start
        # The first client back may be the trial itself, which the ramp's first moments need
        # not admit again: the share never shrinks from the sample after it on.
        after = counts[i + 1:] if i >= 0 else []
        self.check("max_fails: a node back from nginx's failed state ramps up the same way",
                   i >= 0 and home and not gone and max(early) <= 0.35 * len(home) and samples[-1][1] == home
                   and took >= 0.5 * SLOW and all(b >= a for a, b in zip(after, after[1:])),
                   "held failed: %d clients; counts %s of %d; ramp from %.1f s, whole after %.1f s"
                   % (len(gone), counts, len(home), start, took))

    def reload_adds(self):
        import signal
        before = self.clients("ramp", "n1")

        ramping = []

        def ramp_states():
            up = json.loads(get(self.port, "/status", "127.0.0.1")[1])["upstreams"]["ramp"]
            return {s["address"]: s["slow_start"] for s in up["servers"]}

        def reload():
            with open(os.path.join(self.prefix, "nginx.conf"), "w") as f:
                f.write(("user root;\n" if os.geteuid() == 0 else "") + self.conf(4))
            os.kill(self.master, signal.SIGHUP)
            self.until(lambda: len(ramp_states()) == 4, 5)
            # The servers ramping just after the reload: n3 alone (nodes already there do not).
            ramping.extend(a for a, v in ramp_states().items() if v is not None)

        samples = self.ramp_run(reload, "n3", None)
        counts = [len(r) for _, r, _ in samples]
        plain = [len(p) for _, _, p in samples]
        print("n3's clients through `ramp` after a reload added it:", ", ".join("%.1fs %d" % (t, len(r)) for t, r, _ in samples), "(through `plain`: %s)" % plain)
        # Once no server ramps (on a loaded machine the ramp's last keys may come in after the
        # last sample), n1 has no client it did not have before.
        settled = self.until(lambda: all(v is None for v in ramp_states().values()), 3)
        after = self.clients("ramp", "n1")
        n3 = "127.0.0.1:%d" % self.ports[3]
        self.check("reload: a node a reload adds ramps up; the others keep their clients (those n3 takes aside)",
                   counts and counts[0] <= 0.35 * max(plain) and counts[-1] == plain[-1] > 0 and after <= before
                   and ramping == [n3] and settled,
                   "counts %s, without slow start %s; ramping after the reload: %s (n3 is %s); ramps over: %s; "
                   "on n1 %d clients before, %d after, new there: %s"
                   % (counts, plain, ramping, n3, settled, len(before), len(after), sorted(after - before)[:10]))

    def cleanup(self):
        for n in self.nodes:
            n.shutdown()


if __name__ == "__main__":
    sys.exit(scenario_main("scenario-slow-start", Scenario))
