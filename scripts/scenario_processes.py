#!/usr/bin/env python3
"""Scenario test: the module's work across nginx's processes, with a real Redis.

Part 1: a request that waits for Redis while nginx terminates it.

A request whose session is being looked up in Redis is suspended (blocked) until the answer
arrives or the store's timeout passes. If nginx terminates the request meanwhile (here:
`nginx -s quit` with `worker_shutdown_timeout`, which closes every connection left), the
module must finalize it when it resumes, as nginx's own thread-task handlers do, and not run
the request's phases again: that would proxy a request whose connection is already closed.

A real redis-server is held silent with `CLIENT PAUSE`, so the lookup is under way when the
worker shuts down. Checks, each on a fresh nginx:
  1. control     - without a shutdown the request waits for Redis, then reaches the node;
  2. answer      - terminated while waiting; Redis answers later: the node never sees it;
  3. timer       - terminated while waiting; the store's timeout fires first: the same;
and in every case the worker exits soon after and the error log has no alert or crash.

Part 2: background work runs in one process. With two workers and two upstreams sharing one
store, Redis sees one health check every 3 seconds (counted with INFO commandstats), made
with GET (and SET) only, never INFO.

Usage: scenario_processes.py --nginx PATH --module PATH [--keep]
Prints one line per check and "scenario-processes: N passed, M failed"; exits 1 on failure.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenario import StandIn, alive, free_ports, scenario_main, start_nginx, stop_nginx, wait_port  # noqa: E402

SESSION = "5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01"

PROBER_CONF = """
load_module {module};
worker_processes 2;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    kylin_session_store redis://127.0.0.1:{redis} timeout=500ms;
    kylin_upstream a {{ server 127.0.0.1:{node}; }}
    kylin_upstream b {{ server 127.0.0.1:{node}; }}
    server {{
        listen 127.0.0.1:{port};
        location /a {{ proxy_pass http://a; }}
        location /b {{ proxy_pass http://b; }}
    }}
}}
"""

CONF = """
load_module {module};
worker_processes 1;
worker_shutdown_timeout 300ms;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    kylin_upstream kylin_nodes {{
        kylin_session_store redis://127.0.0.1:{redis} format=tomcat timeout={timeout} share_routes=on;
        server 127.0.0.1:{node};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://kylin_nodes; }}
    }}
}}
"""


def node_answer(path, headers):
    """The query node: every request succeeds."""
    return 200, [], b"node\n"


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10).stdout


def request(port, result):
    """One request with the session cookie; stores (status or None, seconds) in result."""
    start = time.time()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(("GET /q HTTP/1.1\r\nHost: kylin\r\nConnection: close\r\nCookie: JSESSIONID=%s\r\n\r\n" % SESSION).encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        line = data.split(b"\r\n", 1)[0].split()
        result["status"] = int(line[1]) if len(line) > 1 else None
    except OSError:
        result["status"] = None
    result["seconds"] = time.time() - start


class Scenario:
    def __init__(self, nginx, module, keep):
        self.nginx, self.module, self.keep = nginx, module, keep
        self.results = []
        self.redis_port, self.node_port, self.port = free_ports(3)
        self.redis_dir = tempfile.mkdtemp(prefix="kylin-redis-")
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.redis_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.redis_port):
            raise RuntimeError("redis-server did not start")
        redis_cli(self.redis_port, "SET", SESSION, "tomcat-session")
        self.node = StandIn(self.node_port, node_answer)

    def check(self, name, ok, detail):
        self.results.append(ok)
        print("%s: %s (%s)" % ("ok" if ok else "FAILED", name, detail))

    def start_nginx(self, template, **kw):
        """Starts nginx with a configuration template; returns (prefix, master pid)."""
        conf = template.format(module=self.module, redis=self.redis_port, node=self.node_port, port=self.port, **kw)
        return start_nginx(self.nginx, conf, self.port, "kylin-scenario-processes-")

    def stop_nginx(self, prefix, master):
        return stop_nginx(prefix, master, self.keep)

    def probers(self):
        """Health-check calls Redis sees from two workers and two upstreams in 3.6 s."""
        redis_cli(self.redis_port, "CONFIG", "RESETSTAT")
        prefix, master = self.start_nginx(PROBER_CONF)
        time.sleep(3.6)
        stats = redis_cli(self.redis_port, "INFO", "commandstats")
        bad = self.stop_nginx(prefix, master)
        calls = {}
        for line in stats.splitlines():
            if line.startswith("cmdstat_"):
                name, _, rest = line.partition(":")
                calls[name[len("cmdstat_"):]] = int(rest.split(",")[0].split("=")[1])
        gets = calls.get("get", 0)
        self.check("one prober: two workers and two upstreams sharing a store make one health check each 3 s, without INFO",
                   1 <= gets <= 2 and calls.get("info", 0) == 0 and not bad,
                   "Redis saw %s, bad log lines %s" % (calls, bad[:2]))

    def run_case(self, name, timeout, pause_ms, quit_after):
        """One nginx: pause Redis, send the request, optionally quit nginx after quit_after s."""
        prefix, master = self.start_nginx(CONF, timeout=timeout)
        time.sleep(0.5)  # the worker's first health check is done before Redis pauses
        self.node.requests = self.node.connections = 0
        redis_cli(self.redis_port, "CLIENT", "PAUSE", str(pause_ms), "ALL")
        result = {}
        t = threading.Thread(target=request, args=(self.port, result))
        t.start()
        exited_in = None
        if quit_after is not None:
            time.sleep(quit_after)
            quit_at = time.time()
            os.kill(master, signal.SIGQUIT)
            for _ in range(200):
                if not alive(master):
                    exited_in = time.time() - quit_at
                    break
                time.sleep(0.05)
        t.join(15)
        redis_cli(self.redis_port, "CLIENT", "UNPAUSE")
        bad = self.stop_nginx(prefix, master)
        return result, (self.node.requests, self.node.connections), exited_in, bad

    def run(self):
        r, (seen, conns), _, bad = self.run_case("control", "3s", 700, None)
        self.check("control: a request waiting for Redis reaches the node once Redis answers",
                   r.get("status") == 200 and seen == 1 and conns == 1 and r.get("seconds", 0) >= 0.5 and not bad,
                   "status %s after %.2f s, node saw %d connections, %d requests, bad log lines %s"
                   % (r.get("status"), r.get("seconds", -1), conns, seen, bad[:2]))
        for name, timeout, pause, what in (("answer", "3s", 1500, "Redis answers later"), ("timer", "1s", 4000, "the store's timeout fires first")):
            r, (seen, conns), exited, bad = self.run_case(name, timeout, pause, 0.3)
            self.check("%s: terminated while waiting, %s: no connection to the node, the worker exits" % (name, what),
                       conns == 0 and seen == 0 and r.get("status") != 200 and exited is not None and exited < 3 and not bad,
                       "status %s, node saw %d connections, %d requests, nginx exited %s s after quit, bad log lines %s"
                       % (r.get("status"), conns, seen, exited and round(exited, 2), bad[:2]))
        self.probers()

    def cleanup(self):
        self.node.shutdown()
        self.redis.terminate()
        self.redis.wait(10)
        shutil.rmtree(self.redis_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(scenario_main("scenario-processes", Scenario))
