#!/usr/bin/python3
"""What TLS costs the gateway, measured on this machine (docs/benchmarks.md, "TLS").

    /usr/bin/python3 bench/tls_bench.py [--server build/bin/pushbook-server] [--idle 10000]
                                        [--connections 3000] [--runs 3] [--json]

For each key type (ECDSA P-256, RSA 2048; certificates made by scripts/make-test-certs.sh):
  * handshakes: --connections clients each open a connection, send GET /healthz, read the answer
    and close: over TLS (a full handshake each: the client keeps no session) and over plain TCP.
    Reported per second of the server's CPU (from /proc/PID/stat): what one core of the gateway
    sustains, whatever the client's own cost on the same machine.
  * memory: --idle WebSockets opened and left idle (each subscribed to nothing), over TLS (wss)
    and plain (ws) to the same server (a port that serves both): the server's RSS growth per
    connection.
The server runs with one gateway thread and an in-memory store. Medians of --runs runs. Standard
library only (asyncio, ssl).
"""
import argparse
import asyncio
import json
import os
import re
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "tls-bench-secret-of-at-least-32-bytes"
VERSIONS = set()  # the TLS versions and ciphers negotiated (reported)


def cpu_seconds(pid):
    """The process's CPU time, in nanoseconds' resolution: the sum over its threads of
    /proc/PID/task/TID/schedstat (the clock-tick counts of /proc/PID/stat are too coarse for
    the few tenths of a second a plain run takes). The server's threads live as long as it."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that just ended
    return total / 1e9


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


class Server:
    def __init__(self, binary, certs):
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--secret", SECRET, "--store", "memory:", "--threads", "1",
             "--max-connections", "1000000", "--user-rate-limit", "0",
             "--tls-cert", os.path.join(certs, "server.pem"), "--tls-key", os.path.join(certs, "server.key")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in self.proc.stdout:
            m = re.search(r"listening on https?://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        else:
            raise RuntimeError("pushbook-server did not start")
        self.token = subprocess.check_output([binary, "--token-for", "bench", "--secret", SECRET],
                                             text=True).strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)


async def one_request(port, context):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    if context is not None:
        tls = writer.get_extra_info("ssl_object")
        VERSIONS.add(f"{tls.version()} {tls.cipher()[0]}")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    try:
        await writer.wait_closed()
    except (ssl.SSLError, ConnectionError):
        pass  # the server's close_notify and FIN race the client's
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(answer[:80])


async def handshakes(server, n, context, in_flight=32):
    gate = asyncio.Semaphore(in_flight)

    async def go():
        async with gate:
            await one_request(server.port, context)
    before, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    await asyncio.gather(*(go() for _ in range(n)))
    return n / max(cpu_seconds(server.proc.pid) - before, 1e-9), n / (time.monotonic() - t0)


async def idle_websockets(server, n, context, in_flight=64):
    gate = asyncio.Semaphore(in_flight)
    open_ = []
    request = (f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"Authorization: Bearer {server.token}\r\n\r\n").encode()

    async def go():
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(head[:80])
            open_.append(writer)
    await asyncio.sleep(0.3)
    before = rss_bytes(server.proc.pid)
    await asyncio.gather(*(go() for _ in range(n)))
    await asyncio.sleep(1.0)  # the server settles (its buffers shrink once idle)
    grown = rss_bytes(server.proc.pid) - before
    for w in open_:
        w.close()
    await asyncio.sleep(0.5)
    return grown / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default=os.path.join(ROOT, "build", "bin", "pushbook-server"))
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = {}
    with tempfile.TemporaryDirectory(prefix="pushbook-tls-bench-") as tmp:
        for kind in ("ec", "rsa"):
            certs = os.path.join(tmp, kind)
            subprocess.run(["bash", os.path.join(ROOT, "scripts", "make-test-certs.sh"), certs, kind], check=True)
            context = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
            rows = {"tls_per_cpu_s": [], "plain_per_cpu_s": [], "tls_per_s": [], "wss_bytes": [], "ws_bytes": []}
            for run in range(args.runs):
                server = Server(args.server, certs)
                try:
                    # Interleaved in each run: a slow minute of the machine hits both.
                    tls_cpu, tls_wall = asyncio.run(handshakes(server, args.connections, context))
                    plain_cpu, _ = asyncio.run(handshakes(server, args.connections, None))
                    rows["tls_per_cpu_s"].append(tls_cpu)
                    rows["tls_per_s"].append(tls_wall)
                    rows["plain_per_cpu_s"].append(plain_cpu)
                finally:
                    server.stop()
                if kind == "ec":  # memory does not depend on the key type
                    for field, ctx in (("wss_bytes", context), ("ws_bytes", None)):
                        server = Server(args.server, certs)
                        try:
                            rows[field].append(asyncio.run(idle_websockets(server, args.idle, ctx)))
                        finally:
                            server.stop()
                print(f"{kind} run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
            results[kind] = {k: statistics.median(v) for k, v in rows.items() if v}
            results[kind]["runs"] = rows
    results["negotiated"] = sorted(VERSIONS)
    if args.json:
        print(json.dumps(results))
        return
    print(f"pushbook gateway, one thread; medians of {args.runs} runs; load: {os.getloadavg()[0]:.2f}; "
          f"negotiated: {', '.join(sorted(VERSIONS))}")
    for kind, name in (("ec", "ECDSA P-256"), ("rsa", "RSA 2048")):
        r = results[kind]
        print(f"  {name:<12} TLS connection + request: {r['tls_per_cpu_s']:,.0f} per server CPU-second "
              f"({r['tls_per_s']:,.0f}/s wall, client on the same 2 cores); plain connection + request: "
              f"{r['plain_per_cpu_s']:,.0f} per CPU-second (ratio {r['plain_per_cpu_s'] / r['tls_per_cpu_s']:.1f}x)")
    r = results["ec"]
    print(f"  memory per idle connection ({args.idle:,}): wss {r['wss_bytes']:,.0f} B, ws {r['ws_bytes']:,.0f} B "
          f"(TLS adds {r['wss_bytes'] - r['ws_bytes']:,.0f} B)")


if __name__ == "__main__":
    main()
