#!/usr/bin/env python3
"""Browser test of the kylin_status dashboard: headless Chromium against a real nginx.

nginx with the module in front of three stand-in nodes gets known traffic: logins (learned
sessions), session-less requests from many client addresses, three slow requests of one
session held in flight (so their node is over its bound), and one request through an upstream
whose session store is down (so its circuit breaker opens). Chromium opens the status location
as a browser does (its own Accept header chooses the page), and while background traffic runs
the test checks the rendered DOM against the JSON document read at the same moment:
  1. page      - served as HTML to the browser's Accept, every upstream and node shown;
  2. numbers   - per node: state, weight, in flight, bound, requests in all equal the JSON's;
  3. over      - the node holding the slow requests is shown over its bound (and only it);
  4. rates     - requests/s derived from counter deltas is above zero while traffic flows;
  5. chart     - the charts (pixels read back from the canvases): the upstream's and those of
                 the nodes that got requests while the page was open show a requests/s fill
                 and a rate above zero; the idle ones (the node over its bound, the backup)
                 neither;
  6. store     - the breaker shows open, in the breaker colour;
  7. grown     - a JSON document with fields this page does not know (a new decision kind, a
                 new per-server count, a new state, new sections) and without optional ones
                 (no session store, no load zone, no bound) still renders, showing the new ones;
and no JavaScript exception, console error or refused resource (the page's Content-Security-
Policy refuses anything not from its own origin) anywhere in the run. Saves a screenshot.

Usage: dashboard_browser.py --nginx PATH --module PATH [--screenshot FILE] [--chromium PATH] [--keep]
Prints one line per check and "dashboard-browser: N passed, M failed"; exits 1 on failure.
About 30 s. Needs Chromium (Debian's `chromium`) and websocket-client (`python3-websocket`).
"""
import argparse
import base64
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenario import StandIn, free_ports, start_nginx, stop_nginx, wait_port  # noqa: E402

import websocket  # noqa: E402  (websocket-client)

CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log warn;
pid logs/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    kylin_upstream kylin_nodes {{
        zone kylin_nodes 64k;
        kylin_balance_factor 1.25;
        server 127.0.0.1:{n0};
        server 127.0.0.1:{n1};
        server 127.0.0.1:{n2};
        server 127.0.0.1:{dead} backup;
    }}
    kylin_upstream kylin_shared {{
        kylin_session_store redis://127.0.0.1:{dead} format=tomcat timeout=200ms fail_threshold=1;
        server 127.0.0.1:{n0};
        server 127.0.0.1:{n1};
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        proxy_read_timeout 60s;
        location / {{ proxy_pass http://kylin_nodes; }}
        location /shared/ {{ proxy_pass http://kylin_shared/; }}
        location = /kylin-status {{ kylin_status; }}
    }}
}}
"""

SLOW = 3          # requests held in flight on one node
POLL = 1          # the page's refresh, seconds
OBSERVE = 14      # seconds of background traffic seen by the page


def node(name, release):
    """A node: /login sets a session cookie; /slow waits until released; else answers."""
    ids = iter(range(1, 1 << 30))

    def answer(path, headers):
        if path.startswith("/login"):
            return 200, [("Set-Cookie", "JSESSIONID=%s%030X; Path=/" % (name.upper(), next(ids)))], name.encode()
        if path.startswith("/slow"):
            release.wait(60)
        return 200, [], name.encode()

    return answer


def get(port, path, addr, sid=None, accept=None, timeout=60):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path))
    req.add_header("X-Real-IP", addr)
    if sid:
        req.add_header("Cookie", "JSESSIONID=" + sid)
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.headers, r.read()


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
             "--window-size=1360,900"]

    def __init__(self, binary):
        self.profile = tempfile.mkdtemp(prefix="kylin-chromium-")
        (port,) = free_ports(1)
        self.log = open(os.path.join(self.profile, "chromium.log"), "w")
        self.proc = subprocess.Popen([binary] + self.FLAGS + ["--user-data-dir=" + self.profile,
                                      "--remote-debugging-port=%d" % port, "about:blank"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        url = None
        end = time.time() + 30
        while time.time() < end and url is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=2) as r:
                    url = next((t["webSocketDebuggerUrl"] for t in json.load(r)
                                if t.get("type") == "page" and t.get("url") == "about:blank"), None)
            except OSError:
                pass
            if url is None:
                time.sleep(0.2)
        if url is None:
            raise RuntimeError("Chromium did not start (see %s)" % self.log.name)
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.ids = iter(range(1, 1 << 30))
        self.replies = {}       # answers to calls, by id, read while waiting for another
        self.problems = []      # JavaScript exceptions, console errors, refused resources
        self.on_event = None

    def _handle(self, msg):
        m, p = msg.get("method"), msg.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.problems.append("exception: %s %s" % (d.get("text"), (d.get("exception") or {}).get("description", "")))
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            self.problems.append("console.%s: %s" % (p["type"], " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
            e = p["entry"]
            self.problems.append("log %s (%s): %s %s" % (e.get("level"), e.get("source"), e.get("text"), e.get("url", "")))
        if self.on_event:
            self.on_event(m, p)

    def pump(self, seconds):
        """Handles events for `seconds`."""
        end = time.time() + seconds
        while True:
            left = end - time.time()
            if left <= 0:
                return
            self.ws.settimeout(min(left, 0.5))
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if "method" in msg:
                self._handle(msg)

    def call(self, method, **params):
        i = next(self.ids)
        self.ws.settimeout(30)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while i not in self.replies:
            msg = json.loads(self.ws.recv())
            if "id" in msg:
                self.replies[msg["id"]] = msg
            elif "method" in msg:
                self._handle(msg)
        msg = self.replies.pop(i)
        if "error" in msg:
            raise RuntimeError("%s: %s" % (method, msg["error"]))
        return msg.get("result", {})

    def js(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError("evaluating %r: %s" % (expression[:60], r["exceptionDetails"]))
        return r["result"].get("value")

    def wait_for(self, expression, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if self.js(expression):
                return True
            self.pump(0.2)
        return False

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass
        try:
            os.killpg(self.proc.pid, 15)
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


# What the page shows of every server row (read from the DOM).
ROWS_JS = r"""
Array.from(document.querySelectorAll('section.upstream')).map(function (sec) {
  return { upstream: sec.getAttribute('data-upstream'),
    decisions: Array.from(sec.querySelectorAll('[data-field^="decision-"]')).map(function (d) { return d.getAttribute('data-field').slice(9); }),
    rps: (sec.querySelector('.figures [data-field="rps"] .v') || {}).textContent,
    breaker: (function (b) { return b ? { text: b.querySelector('.v').textContent, cls: b.className, colour: getComputedStyle(b.querySelector('.v')).color } : null; })(sec.querySelector('[data-field="breaker"]')),
    chart: (function (c) { return c ? inked(c) : -1; })(sec.querySelector('canvas[data-chart="upstream"]')),
    other: (sec.querySelector('[data-part="other"]') || {}).textContent || null,
    rows: Array.from(sec.querySelectorAll('tr[data-server]')).map(function (tr) {
      function f(n) { var e = tr.querySelector('[data-field="' + n + '"]'); return e ? (e.firstChild ? e.firstChild.textContent : '') : null; }
      return { server: tr.getAttribute('data-server'), over: tr.classList.contains('over'),
        colour: getComputedStyle(tr.querySelector('[data-field="in_flight"]')).color,
        state: f('state'), weight: f('weight'), in_flight: f('in_flight'), bound: f('bound'), requests: f('requests'),
        rps: f('rps'), other: f('other'), chart: inked(tr.querySelector('canvas')) };
    }) };
})
"""
INKED_JS = r"""
// Pixels of the requests-per-second fill (rgb 53, 98, 143 at any opacity) in a canvas.
window.inked = function (c) {
  var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, n = 0;
  for (var i = 0; i < d.length; i += 4)
    if (d[i + 3] > 0 && Math.abs(d[i] - 53) <= 4 && Math.abs(d[i + 1] - 98) <= 4 && Math.abs(d[i + 2] - 143) <= 4) n++;
  return n;
};
"""


class Test:
    def __init__(self, args):
        self.args = args
        self.results = []
        self.release = threading.Event()
        *ports, self.dead, self.port = free_ports(5)
        self.node_ports = ports
        self.nodes = [StandIn(p, node("n%d" % i, self.release)) for i, p in enumerate(ports)]
        self.sent = 0
        self.lock = threading.Lock()

    def check(self, name, ok, detail):
        self.results.append(bool(ok))
        print("%s: %s (%s)" % ("ok" if ok else "FAILED", name, detail))

    def status(self):
        return json.loads(get(self.port, "/kylin-status?format=json", "127.0.0.1")[2])

    def request(self, path, addr, sid=None):
        with self.lock:
            self.sent += 1
        get(self.port, path, addr, sid)

    def background(self, stop):
        """Session-less requests from many addresses, about 20 a second."""
        rnd = random.Random(17)
        while not stop.is_set():
            try:
                self.request("/q", "10.%d.%d.%d" % (rnd.randrange(1, 250), rnd.randrange(250), rnd.randrange(1, 250)))
            except OSError:
                pass
            stop.wait(0.05)

    def run(self):
        conf = CONF.format(module=self.args.module, port=self.port, dead=self.dead,
                           **{"n%d" % i: p for i, p in enumerate(self.node_ports)})
        prefix, master = start_nginx(self.args.nginx, conf, self.port, "kylin-dashboard-")
        browser = None
        held = []
        stop = threading.Event()
        bg = threading.Thread(target=self.background, args=(stop,), daemon=True)
        try:
            # Known traffic: six logins, a query of each session from another address, thirty
            # session-less requests.
            sids = []
            for i in range(6):
                _, hdrs, _ = get(self.port, "/login", "10.1.%d.1" % i)
                sids.append(hdrs["Set-Cookie"].split(";")[0].split("=", 1)[1])
                self.sent += 1
            for i, sid in enumerate(sids):
                self.request("/q", "10.2.%d.1" % i, sid)
            for i in range(30):
                self.request("/q", "10.3.%d.%d" % (i, i + 1))
            # Three slow requests of one session in flight, all on its node.
            for _ in range(SLOW):
                t = threading.Thread(target=lambda: self.request("/slow", "10.4.0.1", sids[0]), daemon=True)
                t.start()
                held.append(t)
            # A session the store cannot be asked about: the breaker opens.
            try:
                get(self.port, "/shared/q", "10.5.0.1", "5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01")
            except OSError:
                pass
            deadline = time.time() + 10
            while time.time() < deadline and self.status()["upstreams"]["kylin_nodes"]["in_flight"] < SLOW:
                time.sleep(0.1)

            self.before = self.status()    # the counters when the page opens
            browser = Browser(self.args.chromium)
            browser.call("Runtime.enable")
            browser.call("Log.enable")
            browser.call("Page.enable")
            browser.call("Emulation.setDeviceMetricsOverride", width=1360, height=900, deviceScaleFactor=1, mobile=False)
            url = "http://127.0.0.1:%d/kylin-status?refresh=%d" % (self.port, POLL)
            nav = browser.call("Page.navigate", url=url)
            self.check("navigate", "errorText" not in nav, nav.get("errorText", url))
            browser.wait_for("document.readyState === 'complete'", 10)
            browser.js(INKED_JS)
            kind = browser.js("document.contentType")
            self.check("page", kind == "text/html" and browser.js("document.title") == "Kylin upstreams",
                       "served as %s to Chromium's own Accept header" % kind)

            bg.start()
            browser.pump(OBSERVE)
            stop.set()
            bg.join()
            self.check_numbers(browser)
            if self.args.screenshot:
                self.screenshot(browser, self.args.screenshot)
            self.check_grown(browser)
            browser.pump(0.5)
            errors = browser.js("window.kylinDashboard.errors")
            seen = {}
            for p in browser.problems:
                seen[p] = seen.get(p, 0) + 1
            self.check("no errors", not browser.problems and errors == 0,
                       "; ".join("%s (%d times)" % (p, n) if n > 1 else p for p, n in seen.items()) or "no exception, console error, refused resource or failed poll (%d)" % errors)
        finally:
            stop.set()
            self.release.set()
            for t in held:
                t.join(10)
            if browser:
                browser.close()
            bad = stop_nginx(prefix, master, self.args.keep)
            self.check("error log", not bad, "; ".join(bad) or "nothing alarming")

    def check_numbers(self, browser):
        # The DOM and the JSON of the same moment: read the JSON, then let the page poll it.
        polls = browser.js("window.kylinDashboard.polls")
        doc = self.status()
        browser.wait_for("window.kylinDashboard.polls >= %d" % (polls + 2), 10)
        view = {s["upstream"]: s for s in browser.js(ROWS_JS)}
        self.check("upstreams", set(view) == set(doc["upstreams"]), "shown: %s" % sorted(view))
        u, page = doc["upstreams"]["kylin_nodes"], view.get("kylin_nodes", {"rows": []})
        rows = {r["server"]: r for r in page["rows"]}
        self.check("every node", set(rows) == {s["address"] for s in u["servers"]}, "%d rows" % len(rows))
        wrong, over, charts, idle = [], [], [], 0
        for s in u["servers"]:
            r = rows.get(s["address"])
            if r is None:
                continue
            want = {"state": s["state"], "weight": str(s["weight"]), "in_flight": str(s["in_flight"]),
                    "requests": "%d in all" % s["requests"]}
            got = {k: r[k] for k in want}
            if got != want:
                wrong.append("%s: %s, JSON %s" % (s["address"], got, want))
            if r["over"]:
                over.append((s["address"], r["in_flight"], r["bound"], r["colour"]))
            # Requests since the page opened draw the fill of the node's chart and a rate;
            # none, neither.
            then = next((x["requests"] for x in self.before["upstreams"]["kylin_nodes"]["servers"] if x["address"] == s["address"]), None)
            moved = then is not None and s["requests"] > then
            if moved != (r["chart"] > 0) or moved != (r["rps"] not in ("0", "–")):
                charts.append("%s: %d requests while open, chart fill %d px, %s/s" % (s["address"], s["requests"] - (then or 0), r["chart"], r["rps"]))
            else:
                idle += not moved
        total = sum(s["requests"] for s in u["servers"])
        self.check("numbers", not wrong and total == self.sent,
                   "; ".join(wrong) or "state, weight, in flight and requests of every node as in the JSON; %d requests in all, %d sent" % (total, self.sent))
        held = [s for s in u["servers"] if s["in_flight"] == SLOW]
        self.check("over", len(over) == 1 and held and over[0][0] == held[0]["address"] and over[0][3] == "rgb(198, 40, 40)",
                   "shown over its bound: %s" % over)
        rps = page.get("rps")
        self.check("rates", rps not in (None, "–", "0") and float(rps.rstrip("k")) > 0, "requests/s shown: %s" % rps)
        self.check("chart", not charts and page.get("chart", 0) > 0 and idle >= 2,
                   "; ".join(charts) or "rates and chart fills where requests came, none on the %d idle nodes (fill px: upstream %s, nodes %s)"
                   % (idle, page.get("chart"), [r["chart"] for r in page["rows"]]))
        b = view.get("kylin_shared", {}).get("breaker")
        self.check("store", b is not None and b["text"] == "breaker open" and b["colour"] == "rgb(198, 40, 40)",
                   "session store shown: %s" % b)

    def screenshot(self, browser, path):
        height = browser.js("document.documentElement.scrollHeight")
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": 1360, "height": height, "scale": 1})
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print("screenshot: %s (%d bytes)" % (path, os.path.getsize(path)))

    def check_grown(self, browser):
        """The page against a document with new fields and without optional ones."""
        doc = self.status()
        u = doc["upstreams"]["kylin_nodes"]
        u["decisions"]["placed"] = 5
        u["placement"] = {"moved_clients": 3}
        u["bound_per_weight"] = None
        u["balance_factor"] = None
        for i, s in enumerate(u["servers"]):
            s["moved_clients"] = 7 + i
        u["servers"][1]["state"] = "unhealthy"
        u["servers"].append({"address": "10.9.9.9:7070"})    # a server with hardly any field
        doc["upstreams"]["kylin_shared"].pop("session_store", None)
        doc["upstreams"]["kylin_shared"]["servers"] = None
        doc["load_zone"] = None
        doc["placement_zone"] = {"entries": 1}
        body = base64.b64encode(json.dumps(doc).encode()).decode()

        def fulfil(method, params):
            if method == "Fetch.requestPaused":
                browser.call("Fetch.fulfillRequest", requestId=params["requestId"], responseCode=200,
                             responseHeaders=[{"name": "Content-Type", "value": "application/json"}], body=body)

        browser.on_event = fulfil
        browser.call("Fetch.enable", patterns=[{"urlPattern": "*format=json*"}])
        polls = browser.js("window.kylinDashboard.polls")
        browser.pump(0.1)
        ok = browser.wait_for("window.kylinDashboard.polls >= %d" % (polls + 3), 15)
        view = {s["upstream"]: s for s in browser.js(ROWS_JS)}
        browser.call("Fetch.disable")
        browser.on_event = None
        page = view.get("kylin_nodes", {"rows": [], "decisions": []})
        rows = {r["server"]: r for r in page["rows"]}
        states = [r["state"] for r in page["rows"]]
        others = [r["other"] for r in page["rows"]]
        shown = (ok and "placed" in page["decisions"] and "unhealthy" in states and "10.9.9.9:7070" in rows
                 and all(o and "moved_clients: " in o for o in others[:-1]) and "placement" in (page.get("other") or "")
                 and "kylin_shared" in view and view["kylin_shared"]["breaker"] is None
                 and browser.js("!document.querySelector('[data-part=\"load_zone\"]') && !!document.querySelector('[data-part=\"other\"]')")
                 and browser.js("window.kylinDashboard.errors") == 0)
        self.check("grown", shown, "decisions %s, states %s, other %s" % (page["decisions"], states, others))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--screenshot", default=os.path.join(HERE, "..", "target", "dashboard.png"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    test = Test(args)
    try:
        test.run()
    except Exception as e:
        test.check("dashboard", False, "aborted: %r" % (e,))
    passed = sum(test.results)
    failed = len(test.results) - passed
    print("dashboard-browser: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
