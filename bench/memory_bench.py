"""What one user can make pushbook-server keep in memory (hardening finding 2).

    /usr/bin/python3 bench/memory_bench.py [--server build/bin/pushbook-server] [--bookings 3000]

Starts pushbook-server with a MemoryStore and a resource of one unit, books it once, then sends
--bookings more bookings that are all rejected (sold out), each with the largest metadata allowed
(4 KiB as JSON), over one keep-alive connection, and reports the server's resident memory
(VmRSS) growth per rejected booking. Run 1 lifts the per-user rate limit (--user-rate-limit 0)
to measure memory; run 2 keeps the default (20/s, burst 100) and sends the same requests as fast
as it can, to show how many one user gets through in that time.
"""
import argparse
import http.client
import json
import re
import subprocess
import time

SECRET = "memory-bench-secret-of-at-least-32-bytes"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1))


def start(server, *extra):
    proc = subprocess.Popen([server, "--port", "0", "--secret", SECRET, "--store", "memory:", "--threads", "1",
                             "--resource", "tiny:1", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        m = re.search(r"listening on https?://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    raise RuntimeError("pushbook-server did not start")


def token(server, user):
    return subprocess.check_output([server, "--token-for", user, "--secret", SECRET], text=True).strip()


def book(conn, tok, metadata):
    conn.request("POST", "/v1/bookings", body=json.dumps({"resource": "tiny", "metadata": metadata}),
                 headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
    answer = conn.getresponse()
    answer.read()
    return answer.status


def run(server, n, *extra):
    proc, port = start(server, *extra)
    try:
        tok = token(server, "mallory")
        conn = http.client.HTTPConnection("127.0.0.1", port)
        metadata = {"note": "x" * (4096 - 11)}  # {"note":"..."}: exactly 4096 bytes as JSON
        assert book(conn, tok, metadata) == 202  # takes the only unit
        time.sleep(0.5)  # let the first booking be decided before the baseline
        before = rss_kib(proc.pid)
        statuses = {}
        t0 = time.perf_counter()
        for _ in range(n):
            s = book(conn, tok, metadata)
            statuses[s] = statuses.get(s, 0) + 1
        elapsed = time.perf_counter() - t0
        time.sleep(0.5)  # decisions of the last ones
        after = rss_kib(proc.pid)
        too_big = book(conn, tok, {"note": "x" * 5000})
        return before, after, statuses, elapsed, too_big
    finally:
        proc.terminate()
        proc.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="build/bin/pushbook-server")
    parser.add_argument("--bookings", type=int, default=3000)
    args = parser.parse_args()
    before, after, statuses, elapsed, too_big = run(args.server, args.bookings, "--user-rate-limit", "0",
                                                    "--max-in-flight-per-user", "0")
    print(f"no rate limit: {args.bookings} rejected bookings with 4 KiB metadata in {elapsed:.2f} s, "
          f"answers {statuses}: RSS {before} -> {after} KiB, "
          f"{(after - before) / args.bookings:.1f} KiB per booking; 5 KB metadata: HTTP {too_big}")
    before, after, statuses, elapsed, _ = run(args.server, args.bookings)
    print(f"default limits: {args.bookings} requests in {elapsed:.2f} s, answers {statuses}: "
          f"RSS {before} -> {after} KiB")


if __name__ == "__main__":
    main()
