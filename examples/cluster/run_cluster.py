#!/usr/bin/python3
"""A pushbook cluster on this machine: Redis, PostgreSQL, N pushbook-server nodes and nginx.

    /usr/bin/python3 examples/cluster/run_cluster.py [--nodes 3] [--port 8080] [-- SERVER ARGS...]

Everything listens on 127.0.0.1, on ports chosen at run time (nginx on --port, 0: any free one),
and lives in one temporary directory (data, logs, configuration), removed at the end. It waits
until every part is healthy, prints the URL and a token, and stops everything on Ctrl-C (SIGINT
or SIGTERM). Arguments after `--` go to every pushbook-server (resources, decision delay, ...).

The `Cluster` class is what the cluster test (tests/python/test_cluster.py), the demo's cluster
blocks (scripts/compare.py) and the bench test use: start(), node control (kill -9, SIGTERM,
restart), stop(). A cluster not stopped by its owner is stopped when the interpreter exits.
"""
import argparse
import atexit
import base64
import hashlib
import hmac
import json
import os
import pwd
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PG_BIN = "/usr/lib/postgresql/15/bin"


def free_port():
    """A free loopback port below the kernel's ephemeral range: no outgoing connection (a node's to
    PostgreSQL or Redis) can take it before its server binds it, nor while a killed node is
    restarted on it. Bound once to check it is free now (a server of another program may still
    take it: start() retries)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = max(1024, ephemeral_low - 12000), ephemeral_low - 1
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randint(low, high) if high > low else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


def find_server():
    """pushbook-server: $PUSHBOOK_SERVER, the build tree's, or the one on PATH."""
    for path in (os.environ.get("PUSHBOOK_SERVER"),
                 os.path.join(os.environ.get("PUSHBOOK_BUILD_DIR", os.path.join(ROOT, "build")),
                              "bin", "pushbook-server"),
                 shutil.which("pushbook-server")):
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError("no pushbook-server: build it (cmake --build build) or set PUSHBOOK_SERVER")


def make_token(secret, user, ttl_s=3600):
    """An HS256 JWT for `user`, as `pushbook-server --token-for` makes it."""
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = b64(json.dumps({"sub": user, "exp": int(time.time()) + ttl_s}, separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


def http_get(url, timeout=2.0):
    """(status, body) of a GET; (0, reason) when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def wait_until(what, check, timeout):
    """Polls check() (every 50 ms) until it is true; raises after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def raise_fd_limit():
    """Children inherit it: 10,000 clients need more than the usual 1,024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Node:
    """One pushbook-server of the cluster, always on the same port (nginx's upstream lists it)."""

    def __init__(self, cluster, index):
        self.cluster = cluster
        self.index = index
        self.port = free_port()
        self.proc = None
        self.log_path = os.path.join(cluster.dir, f"node-{index}.log")
        self.starts = 0

    @property
    def name(self):
        return f"node-{self.index}"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def args(self):
        c = self.cluster
        return [c.server, "--port", str(self.port), "--bind", "127.0.0.1", "--node-id", str(self.index),
                "--store", c.store_url, "--bus", c.bus_url, "--threads", str(c.threads),
                "--store-lease-ms", str(c.lease_ms), *c.server_args]

    def start(self, wait=True):
        assert self.proc is None or self.proc.poll() is not None, "node is running"
        self.starts += 1
        log = open(self.log_path, "a")
        log.write(f"--- start {self.starts}: {' '.join(self.args())}\n")
        log.flush()
        env = dict(os.environ, PUSHBOOK_SECRET=self.cluster.secret)
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout=30):
        def healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_tail())
            status, body = http_get(self.url + "/healthz", 1.0)
            if status != 200:
                return False
            # This very node: not another server that happens to answer on its port.
            try:
                return json.loads(body).get("node") == self.name
            except ValueError:
                return False
        wait_until(f"{self.name} to be healthy", healthy, timeout)

    def kill(self):
        """kill -9: no drain, no hand-over; the others take its bookings over after the lease."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout=30):
        """SIGTERM: the node drains (healthz 503, bookings in flight decided), closes WebSockets
        with 1001, hands its claims over, exits. Returns its exit status."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"{self.name} did not stop within {timeout} s after SIGTERM")
        return self.proc.returncode if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


class Cluster:
    """Redis + PostgreSQL + `nodes` pushbook-server + nginx, all on loopback, in a temp dir."""

    def __init__(self, nodes=3, port=0, server_args=(), threads=1, lease_ms=10000, fast_unsafe=False,
                 secret=None, pg_settings=()):
        self.server = find_server()  # before anything is made that would need cleaning up
        self.dir = tempfile.mkdtemp(prefix="pushbook-cluster-")
        os.chmod(self.dir, 0o755)  # nginx's workers and PostgreSQL (another user) reach into it
        self.server_args = list(server_args)
        self.threads = threads
        self.lease_ms = lease_ms
        self.fast_unsafe = fast_unsafe  # PostgreSQL without fsync: tests only, never a deployment
        self.pg_settings = list(pg_settings)  # extra "name=value" for postgres -c
        self.secret = secret or base64.b64encode(os.urandom(32)).decode()
        self.port = port
        self.redis = self.postgres = self.nginx = None
        self.redis_port = self.pg_port = None
        self.nodes = [Node(self, i + 1) for i in range(nodes)]
        self._pg_user = None

    # --- the parts -----------------------------------------------------------------------------

    @property
    def url(self):
        """Where clients connect: nginx."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def store_url(self):
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/pushbook"

    @property
    def bus_url(self):
        return f"redis://127.0.0.1:{self.redis_port}"

    def start(self):
        raise_fd_limit()
        atexit.register(self.stop)  # an owner that raises or exits without stop() leaves nothing
        try:
            self._start_redis()
            self._start_postgres()
            # The first node creates the schema and the resources; the others find them.
            for node in self.nodes:
                node.start()
            self._start_nginx()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_redis(self):
        for _ in range(5):
            self.redis_port = free_port()
            self.redis = subprocess.Popen(
                ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"),
                 "--maxclients", "10000"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_until("redis-server", lambda: self.redis.poll() is not None or self._redis_ping(), 10)
            except RuntimeError:
                pass
            if self.redis.poll() is None and self._redis_ping():
                return
            self.redis.kill()
            self.redis.wait()
        raise RuntimeError("redis-server did not start; see " + os.path.join(self.dir, "redis.log"))

    def _redis_ping(self):
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _postgres_as(self):
        """PostgreSQL refuses to run as root: as root, initdb and postgres run as `postgres`."""
        if os.getuid() != 0:
            return {}
        pw = pwd.getpwnam("postgres")
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _start_postgres(self):
        data = os.path.join(self.dir, "pgdata")
        log = os.path.join(self.dir, "postgres.log")
        as_user = self._postgres_as()
        if as_user:
            os.mkdir(data, 0o700)
            os.chown(data, as_user["user"], as_user["group"])
        with open(os.path.join(self.dir, "initdb.log"), "w") as out:
            subprocess.run([f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                            "--locale=C", "--no-instructions"] + (["--no-sync"] if self.fast_unsafe else []),
                           stdout=out, stderr=subprocess.STDOUT, check=True, **as_user)
        settings = ["listen_addresses=127.0.0.1", "max_connections=200", "shared_buffers=128MB",
                    "unix_socket_directories="]  # TCP only: clients use 127.0.0.1
        if self.fast_unsafe:
            settings += ["fsync=off", "full_page_writes=off"]
        settings += self.pg_settings
        for _ in range(5):
            self.pg_port = free_port()
            args = [f"{PG_BIN}/postgres", "-D", data, "-p", str(self.pg_port)]
            for s in settings:
                args += ["-c", s]
            out = open(log, "a")
            self.postgres = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                             **as_user)
            out.close()
            ready = lambda: self.postgres.poll() is not None or subprocess.run(  # noqa: E731
                [f"{PG_BIN}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.pg_port)]).returncode == 0
            wait_until("PostgreSQL", ready, 30)
            if self.postgres.poll() is None:
                self.sql("CREATE DATABASE pushbook", database="postgres")
                return
        raise RuntimeError("PostgreSQL did not start; see " + log)

    def sql(self, statement, database="pushbook"):
        """Runs `statement` with psql; returns its rows (tab-separated columns), a list of str."""
        out = subprocess.run([f"{PG_BIN}/psql", "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                              "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", "-d", database,
                              "-c", statement], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"psql: {statement}: {out.stderr.strip()}")
        return [line for line in out.stdout.splitlines() if line]

    def nginx_conf(self):
        with open(os.path.join(HERE, "nginx.conf")) as f:
            conf = f.read()
        servers = "\n".join(f"        server 127.0.0.1:{n.port} max_fails=1 fail_timeout=2s;" for n in self.nodes)
        return (conf.replace("@DIR@", self.dir).replace("@SERVERS@", servers)
                .replace("@LISTEN@", f"127.0.0.1:{self.port}"))

    def _start_nginx(self):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        fixed = self.port != 0
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port()
            conf = os.path.join(self.dir, "nginx.conf")
            with open(conf, "w") as f:
                f.write(self.nginx_conf())
            out = open(os.path.join(self.dir, "nginx.log"), "a")
            self.nginx = subprocess.Popen([nginx, "-p", self.dir, "-c", conf, "-e", os.path.join(self.dir, "nginx-error.log"),
                                           "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
            out.close()
            try:
                wait_until("nginx", lambda: self.nginx.poll() is not None or http_get(self.url + "/healthz")[0] == 200,
                           10)
            except RuntimeError:
                pass
            if self.nginx.poll() is None and http_get(self.url + "/healthz")[0] == 200:
                return
            if self.nginx.poll() is None:
                self.nginx.kill()
            self.nginx.wait()
        raise RuntimeError("nginx did not start; see " + os.path.join(self.dir, "nginx-error.log"))

    # --- control -------------------------------------------------------------------------------

    def token(self, user, ttl_s=3600):
        return make_token(self.secret, user, ttl_s)

    def pids(self):
        """Every process of the cluster (nodes, nginx and its workers, Redis, PostgreSQL and its
        backends): for CPU accounting."""
        roots = [p.pid for p in [self.redis, self.postgres, self.nginx] if p and p.poll() is None]
        roots += [n.proc.pid for n in self.nodes if n.running()]
        children = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        out, todo = [], list(roots)
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def stop(self):
        """Stops everything (nodes first, with SIGTERM), removes the directory. Idempotent; each
        part is stopped even when stopping another failed or was interrupted."""
        if self.dir is None:
            return
        try:
            for node in self.nodes:
                try:
                    node.terminate(timeout=20)
                except RuntimeError:
                    pass
        finally:
            for proc, sig in ((self.nginx, signal.SIGQUIT), (self.postgres, signal.SIGINT),
                              (self.redis, signal.SIGTERM)):
                try:
                    if proc and proc.poll() is None:
                        proc.send_signal(sig)
                        try:
                            proc.wait(20)
                        except subprocess.TimeoutExpired:
                            os.killpg(proc.pid, signal.SIGKILL)
                            proc.wait()
                except BaseException:
                    if proc and proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                    raise
            if os.environ.get("PUSHBOOK_KEEP_CLUSTER_DIR"):
                print(f"cluster directory kept: {self.dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            atexit.unregister(self.stop)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="pushbook-server nodes (default 3)")
    parser.add_argument("--port", type=int, default=8080, help="nginx's port (default 8080; 0: any free one)")
    parser.add_argument("--threads", type=int, default=1, help="gateway threads per node (default 1)")
    parser.add_argument("server_args", nargs="*", help="after --: arguments for every pushbook-server")
    args = parser.parse_args()
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster(nodes=args.nodes, port=args.port, threads=args.threads, server_args=args.server_args)
    print(f"starting Redis, PostgreSQL, {args.nodes} pushbook-server nodes and nginx in {cluster.dir} ...",
          flush=True)
    try:
        cluster.start()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"run_cluster: {e}", file=sys.stderr)
        return 1
    try:
        print(f"Redis       {cluster.bus_url}")
        print(f"PostgreSQL  {cluster.store_url}")
        for n in cluster.nodes:
            print(f"{n.name}      {n.url}  (log: {n.log_path})")
        print(f"nginx       {cluster.url}  (configuration: {os.path.join(cluster.dir, 'nginx.conf')})")
        print()
        print(f"The cluster is up: {cluster.url}")
        print(f"  export TOKEN={cluster.token('alice')}")
        print(f"  curl -X POST {cluster.url}/v1/bookings -H \"Authorization: Bearer $TOKEN\" "
              f"-d '{{\"resource\":\"room-101\"}}'")
        print(f"  pushbook-bench --url {cluster.url} --secret '{cluster.secret}' --mode push --users 1000")
        print("Ctrl-C stops everything.", flush=True)
        while not stop.wait(1):
            for n in cluster.nodes:
                if n.proc is not None and not n.running():
                    print(f"{n.name} exited ({n.proc.returncode}); see {n.log_path}", file=sys.stderr)
                    n.proc = None
            if cluster.nginx.poll() is not None:
                print("nginx exited; stopping", file=sys.stderr)
                break
    finally:
        print("stopping ...", flush=True)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
