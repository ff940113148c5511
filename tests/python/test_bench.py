"""The load generator (pushbook-bench) and the demo driver (scripts/compare.py), end to end at a
small scale: every mode decides every booking, the JSON has the documented keys, bad options get
clear errors, and the comparison writes its table and picture."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import SECRET, Server, built_binary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench_binary():
    return built_binary("PUSHBOOK_BENCH", "pushbook-bench")


def bench(*args, check=True):
    done = subprocess.run([_bench_binary(), "--no-progress", *args], capture_output=True, text=True,
                          timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"pushbook-bench {args} exited {done.returncode}: {done.stderr}{done.stdout}")
    return done


SUMMARY_KEYS = {"mean", "p50", "p90", "p99", "max"}


def check_result(r, mode, bookings):
    assert r["mode"] == mode
    assert r["bookings"] == bookings
    assert r["errors"] == 0 and r["timeouts"] == 0, r["first_error"]
    assert set(r["latency_ms"]) >= SUMMARY_KEYS and set(r["ack_latency_ms"]) >= SUMMARY_KEYS
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] * 1.04  # buckets are within 3.2%
    assert r["ack_latency_ms"]["mean"] <= lat["mean"]
    assert r["requests_per_booking"] > 0 and r["bytes_per_booking"] > 0
    assert r["server_cpu_s_per_booking"] is not None and r["server_cpu_s_per_booking"] >= 0
    qs = [q for q, _ in r["latency_cdf_ms"]]
    assert qs == sorted(qs) and qs[0] == 0 and qs[-1] == 1


@pytest.mark.parametrize("mode", ["poll", "longpoll", "sse", "push"])
def test_every_mode_decides_every_booking(mode):
    # The bench starts its own server here (with a decision delay, as the demo does).
    r = json.loads(bench("--mode", mode, "--users", "8", "--bookings-per-user", "3", "--interval-ms", "100",
                         "--decision-delay-ms", "20", "--ramp-ms", "50", "--json").stdout)
    check_result(r, mode, 24)
    assert r["confirmed"] == 24
    # Every mode learns of the decision after the business step.
    assert r["latency_ms"]["p50"] >= 19
    if mode == "poll":
        # The first poll comes one interval after the ACK, so polling can never beat it.
        assert r["latency_ms"]["p50"] >= 99
        assert r["requests_per_booking"] >= 2
    if mode == "push":
        assert r["ws_messages_per_booking"] >= 1
        assert r["requests_per_booking"] == pytest.approx(1 / 3)  # one WebSocket upgrade per user


def test_new_connection_per_request_and_rejections_when_capacity_runs_out():
    r = json.loads(bench("--mode", "poll", "--connection", "close", "--users", "5", "--bookings-per-user", "2",
                         "--interval-ms", "50", "--capacity", "4", "--ramp-ms", "20", "--json").stdout)
    assert r["connection"] == "close"
    assert r["bookings"] == 10 and r["confirmed"] == 4 and r["rejected"] == 6
    assert r["errors"] == 0


def test_arrival_rate_model_against_a_running_server():
    server = Server()
    try:
        r = json.loads(bench("--url", f"http://127.0.0.1:{server.port}", "--secret", SECRET, "--resource", "hall",
                             "--mode", "push", "--users", "10", "--rate", "200", "--duration", "0.5",
                             "--ramp-ms", "100", "--json").stdout)
    finally:
        server.stop()
    check_result(r, "push", 100)
    assert r["model"] == "arrival-rate"
    assert r["server_cpu_s_ramp"] is not None  # the server was found through /proc by its port


@pytest.mark.parametrize("mode, connection", [("push", "keep-alive"), ("poll", "close"), ("sse", "keep-alive")])
def test_over_tls_every_mode_decides_and_a_new_connection_is_a_new_handshake(test_certs, mode, connection):
    # The bench starts a TLS-only server (--tls-cert/--tls-key) and trusts the test CA.
    r = json.loads(bench("--mode", mode, "--connection", connection, "--users", "4", "--bookings-per-user", "2",
                         "--interval-ms", "50", "--ramp-ms", "20", "--store", "memory:",
                         "--tls-cert", test_certs.file("server.pem"), "--tls-key", test_certs.file("server.key"),
                         "--ca", test_certs.file("ca.pem"), "--json").stdout)
    check_result(r, mode, 8)
    assert r["tls"] is True
    server = Server("--store", "memory:", "--tls-cert", test_certs.file("server.pem"),
                    "--tls-key", test_certs.file("server.key"), "--tls-only")
    try:
        # Against a running server: https:// in --url; an untrusted certificate is an error
        # the run reports (nothing decided), --insecure accepts it.
        url = f"https://127.0.0.1:{server.port}"
        common = ("--secret", SECRET, "--resource", "hall", "--mode", mode, "--users", "2",
                  "--bookings-per-user", "1", "--json")
        refused = bench("--url", url, *common, check=False)
        assert refused.returncode == 1
        assert "certificate verify failed" in json.loads(refused.stdout)["first_error"]
        check_result(json.loads(bench("--url", url, "--insecure", *common).stdout), mode, 2)
    finally:
        server.stop()


def test_wrong_secret_is_reported_not_hidden():
    server = Server()
    try:
        done = bench("--url", f"http://127.0.0.1:{server.port}", "--secret", "not-the-secret", "--resource",
                     "hall", "--mode", "poll", "--users", "2", "--bookings-per-user", "1", "--json", check=False)
    finally:
        server.stop()
    assert done.returncode == 1  # nothing decided
    r = json.loads(done.stdout)
    assert r["errors"] == 2 and r["bookings"] == 0
    assert "HTTP 401" in r["first_error"]


@pytest.mark.parametrize("args, message", [
    (["--mode", "carrier-pigeon"], "--mode is poll, longpoll, sse or push"),
    (["--users", "0"], "--users needs a number >= 1"),
    (["--users", "1e12"], "--users is at most 1000000000"),
    (["--connection", "maybe"], "--connection is keep-alive or close"),
    (["--url", "http://127.0.0.1:1"], "--url needs --secret"),
    (["--url", "ftp://x", "--secret", "s"], "--url must look like http://HOST:PORT or https://HOST:PORT"),
    (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
    (["--frobnicate"], "unknown option"),
])
def test_bad_options_get_clear_errors(args, message):
    env = dict(os.environ)
    env.pop("PUSHBOOK_SECRET", None)
    done = subprocess.run([_bench_binary(), *args], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode in (1, 2)
    assert message in done.stderr


def test_compare_writes_table_and_picture(tmp_path):
    build = os.path.dirname(os.path.dirname(_bench_binary()))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compare.py"), "--build", build, "--out",
                           str(tmp_path), "--quick", "--only", "1k"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    out = done.stdout
    for mode in ("poll", "longpoll", "sse", "push"):
        assert f"\n  {mode} " in out
    assert "avg vs poll" in out and "CPU/booking" in out
    svg = tmp_path / "latency-cdf.svg"
    root = ET.parse(svg).getroot()  # well-formed SVG
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 4
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["mode"] for r in results[0]["results"]] == ["poll", "longpoll", "sse", "push"]
    assert all(r["errors"] == 0 and r["timeouts"] == 0 for r in results[0]["results"])


def test_bench_through_a_cluster():
    """pushbook-bench against the cluster (examples/cluster) through nginx, as against one server,
    with the CPU of every process of the cluster (--server-pid with several roots)."""
    sys.path.insert(0, os.path.join(ROOT, "examples", "cluster"))
    from run_cluster import Cluster
    with Cluster(nodes=3, server_args=["--resource", "bench:1000000", "--workers", "1"], fast_unsafe=True) as c:
        pids = ",".join(str(p) for p in c.pids())
        for mode in ("push", "poll", "sse"):
            r = json.loads(bench("--url", c.url, "--secret", c.secret, "--server-pid", pids, "--mode", mode,
                                 "--users", "60", "--bookings-per-user", "3", "--ramp-ms", "200", "--json").stdout)
            check_result(r, mode, 180)
            assert r["server_cpu_s_per_booking"] > 0
    # A bad process list is a usage error.
    done = bench("--server-pid", "12,x", check=False)
    assert done.returncode == 2 and "--server-pid needs process ids" in done.stderr
