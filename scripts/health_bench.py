"""A small cluster for scripts/bench-slow-start and scripts/bench-rolling-drain (stdlib only).

Uses only loadgen.py's load primitives (Workload, run_load, summarize, per_second, Procs), which
the benchmark suite itself is built on, and starts its own processes: Redis, four Kylin
stand-ins (scripts/kylin_node.py: 4 query slots, a 256-entry result cache, 5 ms per hit, 60 ms
per miss) and nginx with the kylin upstream the caller gives. Everything listens on loopback;
every process is stopped by `close()`.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadgen  # noqa: E402

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
            proxy_read_timeout 10s;
        }}
        location = /kylin-status {{ kylin_status write=on; }}
    }}
}}
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def workload():
    """The benchmark's workload, whichever loadgen.py version is beside this file."""
    try:
        return loadgen.Workload()
    except TypeError:
        return loadgen.Workload(False)


class Cluster:
    def __init__(self, nginx, module):
        self.nginx, self.module = nginx, module
        self.procs = loadgen.Procs()
        self.tmp = tempfile.mkdtemp(prefix="kylin-health-bench-")
        self.node_ports = [free_port() for _ in range(4)]
        self.redis_port = free_port()
        self.port = free_port()
        rdir = os.path.join(self.tmp, "redis")
        os.makedirs(rdir)
        self.procs.start("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", rdir], port=self.redis_port)

    def flush(self):
        subprocess.run(["redis-cli", "-p", str(self.redis_port), "FLUSHALL"], capture_output=True, timeout=10)

    def start_node(self, i, shared):
        args = [sys.executable, os.path.join(HERE, "kylin_node.py"), "--port", str(self.node_ports[i]),
                "--name", "node%d" % (i + 1), "--slots", "4", "--cache", "--cache-size", "256",
                "--hit-ms", "5", "--miss-ms", "60", "--tcp-nodelay"]
        if shared:
            args += ["--redis-port", str(self.redis_port)]
        self.procs.start("node%d" % i, args, port=self.node_ports[i])

    def kill_node(self, i):
        self.procs.kill("node%d" % i)

    def start_nginx(self, upstream):
        prefix = os.path.join(self.tmp, "nginx")
        shutil.rmtree(prefix, ignore_errors=True)
        os.makedirs(os.path.join(prefix, "logs"))
        os.makedirs(os.path.join(prefix, "conf"))
        conf = NGINX_CONF.format(module=self.module, port=self.port, upstream=upstream)
        if os.geteuid() == 0:
            conf = "user root;\n" + conf
        with open(os.path.join(prefix, "conf", "nginx.conf"), "w") as f:
            f.write(conf)
        self.procs.start("nginx", [self.nginx, "-p", prefix, "-c", "conf/nginx.conf", "-g", "daemon off;"], port=self.port)

    def stop_run(self):
        self.procs.stop("nginx", signal.SIGQUIT)
        for i in range(4):
            self.procs.stop("node%d" % i)

    def nodes(self):
        return [("127.0.0.1", p) for p in self.node_ports]

    def servers(self, store):
        """The upstream's server lines (and the session store line with `store`)."""
        lines = "".join("        server 127.0.0.1:%d max_fails=1 fail_timeout=3s;\n" % p for p in self.node_ports)
        if store:
            lines = "        kylin_session_store redis://127.0.0.1:%d format=tomcat;\n" % self.redis_port + lines
        return lines

    async def run(self, duration, events):
        return await loadgen.run_load(workload(), "127.0.0.1", self.port, self.nodes(), duration, self.port, events, True)

    def close(self):
        self.procs.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)
