"""pushbook-server's command line: clear errors for bad options, --token-for, --demo (the page,
the browser client and demo tokens), and --keys with its reload on SIGHUP."""
import base64
import json
import os
import queue
import re
import signal
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from conftest import Server, _server_binary


def run_server(*args):
    env = dict(os.environ)
    env.pop("PUSHBOOK_SECRET", None)
    return subprocess.run([_server_binary(), *args], capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.parametrize("args, message", [
    (["--decision-delay-ms", "99999999"], "--decision-delay-ms is at most 3600000"),
    (["--decision-jitter-ms", "-1"], "--decision-jitter-ms needs a non-negative number"),
    (["--resource", "room"], "--resource needs ID:CAPACITY"),
    (["--demo", "--demo-token-ttl-s", "0"], "--demo-token-ttl-s must be positive"),
    (["--demo", "--token-for", "bob"], "--token-for needs --secret or PUSHBOOK_SECRET"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
    (["--store", "redis://127.0.0.1"], "unknown store 'redis://127.0.0.1': use memory: or sqlite:PATH"),
    (["--store", "sqlite:x.db?sync=sometimes"], "unknown sqlite option 'sync=sometimes'"),
    (["--recovery", "maybe"], "--recovery is requeue or reject, not 'maybe'"),
    (["--decide-on-caller", "yes"], "--decide-on-caller is on or off, not 'yes'"),
    (["--bus", "tcp://127.0.0.1:6379"], "--bus is local or a Redis address (redis://HOST:PORT[/DB], unix:/PATH), not 'tcp://127.0.0.1:6379'"),
    (["--secret", "s3cret"], "the secret must be at least 32 bytes, not 6"),
    (["--token-for", "alice", "--secret", "short"], "the secret must be at least 32 bytes, not 5"),
    (["--secret-file", "/nonexistent/secret"], "--secret-file: cannot read '/nonexistent/secret'"),
    (["--slow-consumer", "sometimes"], "--slow-consumer is disconnect or drop, not 'sometimes'"),
    (["--max-connections", "0"], "--max-connections must be at least 1"),
    (["--idle-timeout-s", "0"], "--idle-timeout-s must be from 1 to 86400, not 0"),
    (["--max-hold-s", "-5"], "--max-hold-s needs a non-negative number, not '-5'"),
    (["--user-rate-limit", "many"], "--user-rate-limit needs a number of requests per second (0: none), not 'many'"),
    (["--user-rate-limit", "-1"], "--user-rate-limit needs a number of requests per second (0: none), not '-1'"),
    (["--node-id", "two"], "--node-id needs a non-negative number, not 'two'"),
    (["--node-id", "4294967296"], "--node-id is from 0 to 4294967295, not 4294967296"),
    (["--store-lease-ms", "50"], "--store-lease-ms is from 100 to 3600000, not 50"),
    (["--store-lease-ms", "2000", "--store", "memory:"],
     "--store-lease-ms is for a postgresql:// store (--store), not 'memory:'"),
    (["--tls-cert", "c.pem"], "--tls-cert needs --tls-key"),
    (["--tls-only"], "--tls-key, --tls-only and --tls-client-ca need --tls-cert"),
])
def test_bad_options_get_clear_errors(args, message):
    done = run_server(*args)
    assert done.returncode == 2
    assert message in done.stderr


def test_node_id_names_the_node_in_every_answer_and_in_healthz():
    server = Server("--node-id", "7", "--store", "memory:")
    try:
        assert any("node-7" in line for line in server.output)  # on the "listening" line
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
            assert r.headers["Pushbook-Node"] == "node-7"
            assert json.loads(r.read()) == {"status": "ok", "store": "up", "bus": "up", "node": "node-7"}
    finally:
        server.stop()


def test_a_port_in_use_stops_the_start_with_a_clear_error_not_an_abort():
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = run_server("--port", str(taken.getsockname()[1]), "--secret", "s" * 32, "--store", "memory:")
    assert done.returncode == 1, done.stderr  # not -6 (SIGABRT)
    assert "cannot listen on 127.0.0.1:" in done.stderr and "terminate" not in done.stderr


def test_token_for_prints_a_jwt():
    done = run_server("--token-for", "alice", "--secret", "s" * 32)
    assert done.returncode == 0
    assert len(done.stdout.strip().split(".")) == 3


def test_demo_serves_the_page_the_client_and_tokens():
    server = Server("--demo")
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(base + "/") as page:
            assert page.headers["Content-Type"].startswith("text/html")
            assert b"pushbook" in page.read()
        with urllib.request.urlopen(base + "/pushbook.js") as js:
            assert "javascript" in js.headers["Content-Type"]
            assert b"export class PushbookClient" in js.read()
        request = urllib.request.Request(base + "/v1/demo/token", method="POST")
        with urllib.request.urlopen(request) as answer:
            token = json.load(answer)
        assert token["user"].startswith("demo-") and token["token"].count(".") == 2
    finally:
        server.stop()


def test_a_store_that_cannot_be_opened_stops_the_start_with_its_reason(tmp_path):
    foreign = tmp_path / "notes.txt"
    foreign.write_text("these are my notes, not a database\n" * 100)
    done = run_server("--port", "0", "--store", f"sqlite:{foreign}")
    assert done.returncode == 1
    assert f"--store sqlite:{foreign}:" in done.stderr
    assert "not a database" in done.stderr
    assert foreign.read_text().startswith("these are my notes")  # untouched


def test_the_store_is_printed_at_start_and_bookings_survive_a_restart(tmp_path):
    import urllib.request
    store = f"sqlite:{tmp_path / 'bookings.db'}"
    first = Server("--store", store)
    try:
        assert any(f"store {store}" in line for line in first.output)
        token = first.token("alice")
        request = urllib.request.Request(
            f"http://127.0.0.1:{first.port}/v1/bookings", method="POST",
            data=json.dumps({"resource": "hall"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k-1"})
        with urllib.request.urlopen(request) as answer:
            booking_id = json.load(answer)["booking_id"]
    finally:
        first.stop()
    second = Server("--store", store)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{second.port}/v1/bookings/{booking_id}",
            headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request) as answer:
            assert json.load(answer)["status"] == "confirmed"
        retry = urllib.request.Request(
            f"http://127.0.0.1:{second.port}/v1/bookings", method="POST",
            data=json.dumps({"resource": "hall"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k-1"})
        with urllib.request.urlopen(retry) as answer:
            assert json.load(answer)["booking_id"] == booking_id
    finally:
        second.stop()


def test_help_describes_every_option_with_its_default():
    done = run_server("--help")
    assert done.returncode == 0
    for option in ("--port", "--bind", "--threads", "--workers", "--store", "--recovery", "--resource",
                   "--decision-delay-ms", "--decision-jitter-ms", "--secret", "--dev-insecure",
                   "--allow-origin", "--static-dir", "--demo", "--demo-token-ttl-s", "--token-for", "--ttl-s",
                   "--access-log", "--max-connections", "--user-rate-limit", "--user-rate-burst", "--rate-limit",
                   "--rate-burst", "--max-message-bytes", "--max-body-bytes", "--max-subscriptions",
                   "--max-queued-bytes", "--slow-consumer", "--handshake-timeout-ms", "--idle-timeout-s",
                   "--max-long-poll-s", "--shutdown-timeout-s", "--max-queue", "--max-hold-s",
                   "--max-metadata-bytes", "--max-in-flight-per-user", "--max-held-units-per-user",
                   "--keys", "--secret-file", "--bus", "--node-id", "--store-lease-ms", "--decide-on-caller"):
        assert f"\n  {option} " in done.stdout, f"{option} is not described"
    assert "default sqlite:pushbook.db" in done.stdout and "Example:" in done.stdout
    short = run_server("--frobnicate")
    assert "run 'pushbook-server --help' for every option" in short.stderr


def test_secret_file_and_environment_keep_the_secret_off_the_command_line(tmp_path):
    secret = "a-secret-from-a-file-of-32-bytes-or-more"
    path = tmp_path / "secret"
    path.write_text(secret + "\n")
    from_file = run_server("--token-for", "alice", "--secret-file", str(path))
    assert from_file.returncode == 0
    env = dict(os.environ, PUSHBOOK_SECRET=secret)
    from_env = subprocess.run([_server_binary(), "--token-for", "alice"], capture_output=True, text=True,
                              timeout=30, env=env)
    assert from_env.returncode == 0
    # The same key signed both: the signatures of the same claims may differ only by exp.
    assert from_file.stdout.split(".")[0] == from_env.stdout.split(".")[0]
    server = Server("--secret-file", str(path))
    try:
        import urllib.request
        token = from_file.stdout.strip()
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/whoami",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request) as answer:
            assert json.load(answer)["user"] == "alice"
    finally:
        server.stop()


def post_booking(port, token, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/bookings", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, json.load(answer), dict(answer.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e), dict(e.headers)


def test_limits_are_set_from_the_command_line():
    # One request per 10 s after a burst of 5: the five requests below are the burst.
    server = Server("--store", "memory:", "--user-rate-limit", "0.1", "--user-rate-burst", "5",
                    "--max-metadata-bytes", "32", "--max-hold-s", "60", "--max-held-units-per-user", "2")
    try:
        token = server.token("alice")
        status, body, _ = post_booking(server.port, token, {"resource": "hall", "metadata": {"note": "x" * 40}})
        assert status == 400 and "at most 32 are allowed" in body["error"]["message"]
        status, body, _ = post_booking(server.port, token, {"resource": "hall", "hold_ms": 61000})
        assert status == 400 and "60000 ms" in body["error"]["message"]
        status, body, _ = post_booking(server.port, token, {"resource": "hall", "quantity": 3, "hold_ms": 1000})
        assert status == 400 and "can never be granted" in body["error"]["message"]
        status, body, _ = post_booking(server.port, token, {"resource": "hall", "quantity": 2, "hold_ms": 30000})
        assert status == 202
        status, body, headers = post_booking(server.port, token, {"resource": "hall", "hold_ms": 30000})
        assert status == 429 and body["error"]["code"] == "quota_exceeded"
        assert headers["Retry-After"] == "1"
        status, body, headers = post_booking(server.port, token, {"resource": "hall"})
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert 1 <= int(headers["Retry-After"]) <= 10
    finally:
        server.stop()


def test_access_log_lines_go_to_stderr_without_tokens():
    server = Server("--store", "memory:", "--access-log")
    try:
        token = server.token("alice")
        status, _, _ = post_booking(server.port, token, {"resource": "hall"})
        assert status == 202
    finally:
        server.stop()
    rest = server.proc.stdout.read()
    lines = [line for line in rest.splitlines() if " access http " in line]
    assert len(lines) == 1, rest
    assert "user=alice" in lines[0] and "route=/v1/bookings status=202" in lines[0]
    assert token not in rest


def test_at_the_file_descriptor_limit_the_operator_is_told_once_per_period_not_per_failure():
    import queue
    import resource
    import socket
    import threading
    import time

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    server = Server("--store", "memory:", preexec_fn=low_fd_limit)
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in server.proc.stdout], daemon=True)
    reader.start()
    clients = []
    seen = []
    try:
        # More connections than the server has descriptors for: it accepts until EMFILE, then backs
        # off (100 ms at a time) while the rest wait in the listen backlog.
        for _ in range(90):
            clients.append(socket.create_connection(("127.0.0.1", server.port)))
        deadline = time.monotonic() + 10
        while not any("accept failed" in line for line in seen):
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        # The backoff retries (and fails) every 100 ms while the descriptors stay taken: let it
        # fail several times within one logging period (10 s).
        time.sleep(1)
        for c in clients:
            c.close()
        clients = []
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        count = int(next(line.split()[1] for line in metrics.splitlines()
                         if line.startswith("pushbook_accept_failures_total ")))
        assert count >= 3
        assert "pushbook_fd_limit 64\n" in metrics
    finally:
        for c in clients:
            c.close()
        server.stop()
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get())
    warnings = [line for line in seen if "accept failed" in line]
    again = [line for line in seen if "accepting connections again" in line]
    # A line when the failures start, one when accepting works again: not one per failure...
    assert 1 <= len(warnings) <= 2 and len(warnings) < count, "".join(seen)
    assert "accept failed (1 failure(s) since the last report)" in warnings[0]
    assert "file limit 64" in warnings[0] and "ulimit -n" in warnings[0]
    assert 1 <= len(again) <= 2, "".join(seen)
    # ...and yet every failure is counted in a line.
    reported = sum(int(re.search(r"\((\d+) failure\(s\) since", w).group(1)) for w in warnings)
    reported += sum(int(re.search(r"\((\d+) more failed accept", a).group(1)) for a in again)
    assert reported == count, "".join(seen)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bus_redis_carries_the_events_through_redis(tmp_path):
    """--bus redis://...: a booking's events are numbered and published in Redis (a redis-server of
    the test's own), where every server on it sees them."""
    import socket
    import time
    port = _free_port()
    redis = subprocess.Popen(["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def redis_command(*args):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(("*%d\r\n" % len(args) + "".join("$%d\r\n%s\r\n" % (len(a), a) for a in args)).encode())
            return c.recv(65536).decode()

    deadline = time.monotonic() + 10
    while True:  # until it answers PING, with a deadline
        try:
            if redis_command("PING").startswith("+PONG"):
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.01)
    server = Server("--bus", f"redis://127.0.0.1:{port}")
    try:
        token = server.token("alice")
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/v1/bookings", method="POST",
            data=json.dumps({"resource": "hall"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k-1"})
        with urllib.request.urlopen(request) as answer:
            booking_id = json.load(answer)["booking_id"]
        key = "pushbook:{booking/%s}:seq" % booking_id
        deadline = time.monotonic() + 10
        while redis_command("GET", key).startswith("$-1"):  # nil until the first event (processing)
            assert time.monotonic() < deadline, "no event of the booking reached Redis"
            time.sleep(0.01)
        assert int(redis_command("GET", key).split("\r\n")[1]) >= 1
        # /metrics shows the bus: a RedisBus, connected (both connections: the subscriber's may
        # come up just after the command connection), that published the booking's events.
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as answer:
                metrics = answer.read().decode()
            if "pushbook_bus_connected 1\n" in metrics or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert 'pushbook_bus_info{kind="redis"} 1\n' in metrics
        assert "pushbook_bus_connected 1\n" in metrics
        assert "pushbook_bus_reconnects_total 0\n" in metrics
        published = int(next(line.split()[1] for line in metrics.splitlines()
                             if line.startswith("pushbook_bus_published_total ")))
        assert published >= 1
    finally:
        server.stop()
        redis.terminate()
        redis.wait(10)


def test_tls_https_and_wss_then_sighup_reloads_the_certificate(test_certs, tmp_path):
    import shutil
    import ssl
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(test_certs.file("server.pem"), cert)
    shutil.copy(test_certs.file("server.key"), key)
    server = Server("--store", "memory:", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert any("https://" in line and "plain HTTP too" in line for line in server.output)
        context = test_certs.client_context()
        with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/healthz", context=context,
                                    timeout=5) as r:
            assert json.loads(r.read())["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
            assert r.status == 200  # the same port serves plain HTTP without --tls-only
        assert test_certs.peer_common_name(server.port) == "localhost"
        shutil.copy(test_certs.file("server2.pem"), cert)
        shutil.copy(test_certs.file("server2.key"), key)
        server.proc.send_signal(signal.SIGHUP)
        lines = [server.proc.stdout.readline() for _ in range(2)]  # the gateway's log line, then ours
        assert any("TLS certificate and key reloaded" in line for line in lines), lines
        assert test_certs.peer_common_name(server.port) == "localhost (renewed)"
    finally:
        assert server.stop() == 0


def test_a_key_that_does_not_match_the_certificate_stops_the_start(test_certs):
    done = run_server("--port", "0", "--secret", "x" * 32, "--store", "memory:",
                      "--tls-cert", test_certs.file("server.pem"), "--tls-key", test_certs.file("other.key"))
    assert done.returncode == 1
    assert "does not match the certificate" in done.stderr
