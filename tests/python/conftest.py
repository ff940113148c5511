"""Fixtures: a pushbook-server on a free loopback port, and tokens for it."""
import os
import re
import signal
import subprocess
import sys
import tempfile

import pytest

SECRET = "pytest-secret-at-least-32-bytes-long"


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("PUSHBOOK_BUILD_DIR", os.path.join(ROOT, "build"))

# Run by hand (`/usr/bin/python3 -m pytest tests/python/test_module.py`), the tests find the
# module and the binaries in build/ (or PUSHBOOK_BUILD_DIR); ctest names them explicitly.
if os.path.isdir(os.path.join(BUILD, "python", "pushbook")) and "pushbook" not in sys.modules:
    sys.path.insert(0, os.path.join(BUILD, "python"))


def built_binary(env, name):
    """The binary named by the environment variable `env`, else BUILD/bin/`name`."""
    path = os.environ.get(env) or os.path.join(BUILD, "bin", name)
    if not os.path.exists(path):
        pytest.fail(f"no {name} at {path}: build it (cmake --build build --target {name}) or set {env}")
    return path


def _server_binary():
    return built_binary("PUSHBOOK_SERVER", "pushbook-server")


class Server:
    kind = "gateway"

    def __init__(self, *extra, preexec_fn=None):
        # The default store (SQLite), in a directory of its own unless the test names a store.
        self.tmpdir = None
        store = []
        if "--store" not in extra:
            self.tmpdir = tempfile.TemporaryDirectory(prefix="pushbook-test-")
            store = ["--store", "sqlite:" + os.path.join(self.tmpdir.name, "pushbook.db")]
        self.proc = subprocess.Popen(
            [_server_binary(), "--port", "0", "--secret", SECRET, "--threads", "2",
             "--resource", "room-1:1", "--resource", "hall:1000", *store, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn)
        self.output = []
        for line in self.proc.stdout:  # the server prints where it listens, then serves
            self.output.append(line)
            m = re.search(r"listening on https?://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        else:
            raise RuntimeError("pushbook-server did not start: " + "".join(self.output))
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    def token(self, user):
        return subprocess.check_output(
            [_server_binary(), "--token-for", user, "--secret", SECRET], text=True).strip()

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
            self.tmpdir = None
        return self.proc.returncode


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


class PythonHost(Server):
    """A Python web app serving the protocol through pushbook's adapter (tests/python/protocol_host.py):
    the same interface as Server (url, token(), stop(), proc)."""

    def __init__(self, kind):  # noqa: the base's __init__ starts pushbook-server: not called
        self.tmpdir = None
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "python", "protocol_host.py"), "--kind", kind,
             "--secret", SECRET, "--resource", "room-1:1", "--resource", "hall:1000"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
        self.output = []
        for line in self.proc.stdout:
            self.output.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        else:
            raise RuntimeError(f"the {kind} host did not start: " + "".join(self.output))
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"


@pytest.fixture(params=["gateway", "aiohttp", "asgi"])
def protocol_server(request):
    """One protocol suite, several servers: the Beast gateway (pushbook-server) and the Python
    web-app hosts (pushbook.aiohttp; pushbook.asgi on FastAPI under uvicorn)."""
    if request.param != "gateway":
        pytest.importorskip("pushbook", reason="the Python module is not built (PUSHBOOK_BUILD_PYTHON=OFF)")
    s = Server() if request.param == "gateway" else PythonHost(request.param)
    yield s
    s.stop()


class Certs:
    """A test CA and certificates made by scripts/make-test-certs.sh (no key is committed)."""

    def __init__(self, directory):
        self.dir = str(directory)
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "make-test-certs.sh"), self.dir], check=True)

    def file(self, name):
        return os.path.join(self.dir, name)

    def client_context(self):
        """An ssl context that trusts the test CA."""
        import ssl
        return ssl.create_default_context(cafile=self.file("ca.pem"))

    def peer_common_name(self, port):
        """The CN of the certificate a TLS server on 127.0.0.1:port presents."""
        import socket
        import ssl
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with self.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                subject = dict(x[0] for x in tls.getpeercert()["subject"])
                return subject["commonName"]


@pytest.fixture(scope="session")
def test_certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("certs"))
