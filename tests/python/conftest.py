"""Fixtures: a pushbook-server on a free loopback port, and tokens for it."""
import os
import re
import signal
import subprocess
import tempfile

import pytest

SECRET = "pytest-secret"


def _server_binary():
    path = os.environ.get("PUSHBOOK_SERVER")
    if not path or not os.path.exists(path):
        pytest.fail("set PUSHBOOK_SERVER to the pushbook-server binary (ctest does)")
    return path


class Server:
    def __init__(self, *extra):
        # The default store (SQLite), in a directory of its own unless the test names a store.
        self.tmpdir = None
        store = []
        if "--store" not in extra:
            self.tmpdir = tempfile.TemporaryDirectory(prefix="pushbook-test-")
            store = ["--store", "sqlite:" + os.path.join(self.tmpdir.name, "pushbook.db")]
        self.proc = subprocess.Popen(
            [_server_binary(), "--port", "0", "--secret", SECRET, "--threads", "2",
             "--resource", "room-1:1", "--resource", "hall:1000", *store, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = []
        for line in self.proc.stdout:  # the server prints where it listens, then serves
            self.output.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
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
