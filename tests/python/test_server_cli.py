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
    (["--secret", "s3cret"], "the secret must be at least 32 bytes, not 6"),
    (["--token-for", "alice", "--secret", "short"], "the secret must be at least 32 bytes, not 5"),
    (["--secret-file", "/nonexistent/secret"], "--secret-file: cannot read '/nonexistent/secret'"),
])
def test_bad_options_get_clear_errors(args, message):
    done = run_server(*args)
    assert done.returncode == 2
    assert message in done.stderr


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
                   "--keys", "--secret-file"):
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


def _jwks_file(path, *keys):
    """Writes a JWKS of HS256 keys: (kid, secret, signs) each."""
    def b64url(raw):
        return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()
    path.write_text(json.dumps({"keys": [
        {"kty": "oct", "kid": kid, "k": b64url(secret), **({} if signs else {"key_ops": ["verify"]})}
        for kid, secret, signs in keys]}))


def _kid_of(token):
    header = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]


@pytest.mark.parametrize("args, message", [
    (["--keys", "/nonexistent/keys.json"], "cannot read /nonexistent/keys.json"),
    (["--keys", "KEYS", "--secret", "s" * 32], "give --secret (or --secret-file) or --keys, not both"),
    (["--keys", "SHORT"], 'the HS256 key "short" has 8 bytes; at least 32 are needed'),
    (["--keys", "BROKEN"], 'key "x": no "k"'),
])
def test_bad_keys_files_get_clear_errors(tmp_path, args, message):
    _jwks_file(tmp_path / "keys.json", ("k1", "a" * 32, True))
    _jwks_file(tmp_path / "short.json", ("short", "8 bytes!", True))
    (tmp_path / "broken.json").write_text('{"keys":[{"kty":"oct","kid":"x"}]}')
    files = {"KEYS": "keys.json", "SHORT": "short.json", "BROKEN": "broken.json"}
    done = run_server(*[str(tmp_path / files[a]) if a in files else a for a in args])
    assert done.returncode == 2
    assert message in done.stderr


def test_keys_file_rotation_with_sighup(tmp_path):
    """--keys: the token's kid picks the key; SIGHUP reloads the file, a bad file keeps the keys
    in use; a token of a key removed from the file is refused from then on."""
    keys = tmp_path / "keys.json"
    old, new = ("k1", "the-first-secret-of-32-bytes-or-more"), ("k2", "the-second-secret-of-32-bytes-or-more")
    _jwks_file(keys, (*old, True))

    def token_for(user):
        done = run_server("--token-for", user, "--keys", str(keys))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    proc = subprocess.Popen([_server_binary(), "--port", "0", "--keys", str(keys), "--store", "memory:",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()

    def next_line_with(text):
        while True:
            line = lines.get(timeout=10)  # queue.Empty fails the test after 10 s
            if text in line:
                return line

    def whoami(token):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/whoami",
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", next_line_with("pushbook-server listening on")).group(1))
        first = token_for("alice")
        assert _kid_of(first) == "k1"
        assert whoami(first) == (200, {"user": "alice", "expires_at": whoami(first)[1]["expires_at"]})

        # 1. The new key signs, the old one still verifies.
        _jwks_file(keys, (*old, False), (*new, True))
        proc.send_signal(signal.SIGHUP)
        assert f"SIGHUP: 2 keys loaded from {keys}" in next_line_with("SIGHUP")
        second = token_for("bob")
        assert _kid_of(second) == "k2"
        assert whoami(first)[0] == 200 and whoami(second)[0] == 200

        # 2. A file that does not load changes nothing.
        keys.write_text('{"keys": [')
        proc.send_signal(signal.SIGHUP)
        assert "the keys in use stay" in next_line_with("SIGHUP")
        assert whoami(first)[0] == 200

        # 3. The old key goes: its tokens are refused, the new key's work.
        _jwks_file(keys, (*new, True))
        proc.send_signal(signal.SIGHUP)
        assert f"SIGHUP: 1 keys loaded from {keys}" in next_line_with("SIGHUP")
        assert whoami(first) == (401, {"error": {"code": "unauthorized", "message": 'unknown key id "k1"'}})
        assert whoami(second)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
