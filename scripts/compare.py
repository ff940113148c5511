#!/usr/bin/python3
"""Polling versus push, measured side by side: the README's demo.

Starts pushbook-server on a free loopback port for each block (the decision delay is a server
setting), runs build/bin/pushbook-bench against it in each mode at the same offered load
(arrival-rate model: the same bookings per second for every mode, latency counted from each
booking's scheduled time), stops the server, prints a table in the case study's terms and writes
a picture (latency CDF per mode, SVG) and the raw results (JSON).

Standard library only. Usage: scripts/compare.py [--build DIR] [--out DIR] [--quick]
"""

import argparse
import json
import math
import os
import re
import secrets
import select
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "cluster"))
from run_cluster import Cluster  # noqa: E402

# The blocks of one run. Each block has one server (its decision delay) and one offered load;
# every mode in a block sees exactly the same load.
BLOCKS = [
    {
        "name": "1k",
        "title": "1,000 users, 500 bookings/s, decision delay 0 ms",
        "users": 1000, "rate": 500, "duration": 4, "ramp_ms": 1000, "delay_ms": 0,
        "modes": [("poll", "keep-alive"), ("longpoll", "keep-alive"), ("sse", "keep-alive"),
                  ("push", "keep-alive")],
    },
    {
        "name": "10k",
        "title": "10,000 users, 2,000 bookings/s, decision delay 0 ms",
        "users": 10000, "rate": 2000, "duration": 5, "ramp_ms": 3000, "delay_ms": 0,
        "modes": [("poll", "keep-alive"), ("push", "keep-alive")],
    },
    {
        "name": "slow-1k",
        "title": "1,000 users, 200 bookings/s, business step 4.5-5.5 s",
        "users": 1000, "rate": 200, "duration": 5, "ramp_ms": 1000, "delay_ms": 4500, "jitter_ms": 1000,
        "modes": [("poll", "keep-alive"), ("poll", "close"), ("push", "keep-alive")],
    },
    {
        "name": "slow-10k",
        "title": "10,000 users, 2,000 bookings/s, business step 4.5-5.5 s",
        "users": 10000, "rate": 2000, "duration": 5, "ramp_ms": 3000, "delay_ms": 4500, "jitter_ms": 1000,
        "modes": [("poll", "keep-alive"), ("push", "keep-alive")],
    },
    {
        # The case study's production shape: nodes behind an L7 balancer, a Redis layer, the
        # bookings in a database that every poll reads (GET /v1/bookings/<id> loads the booking
        # from PostgreSQL). CPU per booking is summed over every process of the cluster.
        "name": "cluster-10k",
        "title": "3 nodes behind nginx, PostgreSQL + Redis: 10,000 users, 2,000 bookings/s, decision delay 0 ms",
        "users": 10000, "rate": 2000, "duration": 5, "ramp_ms": 3000, "delay_ms": 0, "cluster": 3,
        "modes": [("poll", "keep-alive"), ("push", "keep-alive")],
    },
    {
        # The same cluster in the case study's regime: decisions take seconds, so every waiting
        # client polls ~10 times per booking through nginx, each poll a PostgreSQL read.
        "name": "cluster-slow-10k",
        "title": "3 nodes behind nginx, PostgreSQL + Redis: 10,000 users, 1,000 bookings/s, business step 4.5-5.5 s",
        "users": 10000, "rate": 1000, "duration": 5, "ramp_ms": 3000, "delay_ms": 4500, "jitter_ms": 1000,
        "cluster": 3, "modes": [("poll", "keep-alive"), ("push", "keep-alive")],
    },
    {
        # The case study's clients paid "TCP/TLS handshake overhead for every status check": a new
        # TLS connection per request (a full handshake: the client keeps no session), against
        # polling over one kept-alive TLS connection and push over one WSS connection per user.
        # The server speaks TLS only (an ECDSA P-256 certificate made for the run).
        "name": "tls-1k",
        "title": "TLS: 1,000 users, 100 bookings/s (one booking each), business step 4.5-5.5 s",
        "users": 1000, "rate": 100, "duration": 10, "ramp_ms": 1000, "delay_ms": 4500, "jitter_ms": 1000,
        "tls": True, "modes": [("poll", "close"), ("poll", "keep-alive"), ("push", "keep-alive")],
        "server_args": ["--handshake-timeout-ms", "30000"],
    },
    {
        # 10,000 TLS handshakes (server and client on the same 2 cores) take seconds: the users
        # connect over a 10 s ramp, not counted in CPU per booking (reported apart).
        "name": "tls-10k",
        "title": "TLS: 10,000 users, 1,000 bookings/s (one booking each), decision delay 0 ms",
        "users": 10000, "rate": 1000, "duration": 10, "ramp_ms": 10000, "delay_ms": 0,
        "tls": True, "modes": [("poll", "close"), ("poll", "keep-alive"), ("push", "keep-alive")],
        # The bench opens each keep-alive connection during the ramp, up to 15 s before its first
        # request; the gateway closes a connection whose first request takes longer than
        # handshake_timeout (10 s by default, against slow-loris clients).
        "server_args": ["--handshake-timeout-ms", "30000"],
    },
]

# Bookings scheduled in each run's first second are made but not measured (caches, allocator and
# the kernel's socket buffers settle), the same for every mode.
WARMUP_S = 1

COLORS = {"poll": "#d62728", "poll/close": "#ff7f0e", "longpoll": "#9467bd", "sse": "#2ca02c",
          "push": "#1f77b4"}


def label(mode, connection):
    return mode + ("/close" if connection == "close" else "")


CERTS_MADE = set()


def make_certs(out_dir):
    """A test CA and a server certificate for 127.0.0.1 (scripts/make-test-certs.sh), made anew
    by each invocation (they are valid for a week) in `out_dir`/certs; their keys stay there."""
    certs = os.path.join(out_dir, "certs")
    if certs not in CERTS_MADE:
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "make-test-certs.sh"), certs], check=True)
        CERTS_MADE.add(certs)
    return certs


def start_server(build, delay_ms, jitter_ms, secret, log_path, store, certs=None, extra=()):
    log = open(log_path, "w")
    tls = [] if certs is None else ["--tls-cert", os.path.join(certs, "server.pem"),
                                    "--tls-key", os.path.join(certs, "server.key"), "--tls-only"]
    proc = subprocess.Popen(
        [os.path.join(build, "bin", "pushbook-server"), "--port", "0", "--secret", secret,
         "--threads", "1", "--workers", "1", "--resource", "bench:100000000", "--store", store,
         "--decision-delay-ms", str(delay_ms), "--decision-jitter-ms", str(jitter_ms), *tls, *extra],
        stdout=subprocess.PIPE, stderr=log, text=True)
    # The "listening on" line (after the store's), within 15 s: a server that hangs before it must
    # not hang the demo.
    # Raw reads of the pipe: a buffered readline could hold the line select() waits for.
    deadline = time.monotonic() + 15
    m = None
    seen = b""
    while m is None and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout.fileno()], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            break
        seen += chunk
        m = re.search(rb"listening on https?://127\.0\.0\.1:(\d+) ", seen)
    if not m:
        proc.kill()
        sys.exit(f"pushbook-server did not start; its log: {log_path}")
    return proc, int(m.group(1))


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_block(build, block, out_dir, quick, store):
    secret = secrets.token_hex(16)
    scale = 0.25 if quick else 1.0
    users = max(10, int(block["users"] * scale))
    rate = max(10, int(block["rate"] * scale))
    results = []
    for mode, connection in block["modes"]:
        # A fresh server per mode: no mode inherits another's connections, topics or heap.
        name = f"{block['name']}-{label(mode, connection).replace('/', '-')}"
        db = None
        if block.get("cluster"):
            results.append(run_cluster_mode(build, block, mode, connection, users, rate))
            continue
        if store is None:  # the server's default kind: a SQLite file, new for each server
            db = os.path.join(out_dir, f"store-{name}.db")
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.remove(db + suffix)
        certs = make_certs(out_dir) if block.get("tls") else None
        proc, port = start_server(build, block["delay_ms"], block.get("jitter_ms", 0), secret,
                                  os.path.join(out_dir, f"server-{name}.log"), store or f"sqlite:{db}", certs,
                                  block.get("server_args", ()))
        try:
            scheme = "https" if certs else "http"
            cmd = bench_command(build, f"{scheme}://127.0.0.1:{port}", secret, [proc.pid], mode, connection,
                                users, rate, block)
            if certs:
                # Two client threads: the clients' own handshakes (certificate checks included)
                # must not be what limits a mode.
                cmd += ["--ca", os.path.join(certs, "ca.pem"), "--client-threads", "2"]
            print(f"  {label(mode, connection):<11} {users} users, {rate} bookings/s for "
                  f"{block['duration']} s ...", file=sys.stderr, flush=True)
            r = run_bench(cmd, mode, connection, block)
            results.append(r)
        finally:
            stop_server(proc)
            for suffix in ("", "-wal", "-shm"):
                if db and os.path.exists(db + suffix):
                    os.remove(db + suffix)
    return {"name": block["name"], "title": block["title"], "users": users, "rate": rate,
            "delay_ms": block["delay_ms"], "results": results}


def bench_command(build, url, secret, pids, mode, connection, users, rate, block):
    return [os.path.join(build, "bin", "pushbook-bench"), "--url", url, "--secret", secret,
            "--server-pid", ",".join(str(p) for p in pids), "--mode", mode, "--connection", connection,
            "--users", str(users), "--rate", str(rate), "--duration", str(block["duration"]),
            "--ramp-ms", str(block["ramp_ms"]), "--warmup", str(WARMUP_S), "--timeout-ms", "60000", "--json"]


def run_bench(cmd, mode, connection, block):
    """Runs pushbook-bench; its JSON result, labelled."""
    try:  # ramp + duration + the slowest decision + the bench's own 60 s timeout, with room
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        sys.exit(f"pushbook-bench did not finish within 300 s: {' '.join(cmd)}")
    if done.returncode != 0 or not done.stdout.strip():
        sys.exit(f"pushbook-bench failed ({done.returncode}): {' '.join(cmd)}")
    r = json.loads(done.stdout)
    r["label"] = label(mode, connection)
    r["decision_delay_ms"] = block["delay_ms"]
    r["decision_jitter_ms"] = block.get("jitter_ms", 0)
    return r


def run_cluster_mode(build, block, mode, connection, users, rate):
    """One mode against a fresh cluster (examples/cluster): pushbook-bench through nginx, CPU of
    the nodes, nginx, Redis and PostgreSQL (with their children) together."""
    args = ["--resource", "bench:100000000", "--workers", "1", "--decision-delay-ms", str(block["delay_ms"]),
            "--decision-jitter-ms", str(block.get("jitter_ms", 0)), "--max-connections", "100000"]
    os.environ.setdefault("PUSHBOOK_SERVER", os.path.join(build, "bin", "pushbook-server"))
    cluster = Cluster(nodes=block["cluster"], threads=1, server_args=args, port=0)
    print(f"  {label(mode, connection):<11} starting the cluster ...", file=sys.stderr, flush=True)
    cluster.start()
    try:
        roots = cluster.pids()
        cmd = bench_command(build, cluster.url, cluster.secret, roots, mode, connection, users, rate, block)
        print(f"  {label(mode, connection):<11} {users} users, {rate} bookings/s for {block['duration']} s "
              f"through nginx ...", file=sys.stderr, flush=True)
        r = run_bench(cmd, mode, connection, block)
        r["processes"] = len(cluster.pids())
        return r
    finally:
        cluster.stop()


def fmt_ms(v):
    return f"{v:,.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def fmt_cpu(v):
    return "n/a" if v is None else f"{v * 1e6:,.0f} us"


def connect_cpu_per_booking(r):
    """Server CPU of the connect ramp (users opening their connections, not counted in
    CPU/booking), per booking; None when unknown."""
    ramp, bookings = r.get("server_cpu_s_ramp"), r.get("bookings")
    return ramp / bookings if ramp is not None and bookings else None


def print_table(block):
    rs = block["results"]
    base = next(r for r in rs if r["label"] == "poll")
    print(f"\n{block['title']}")
    print(f"  {'mode':<12}{'avg ms':>11}{'p99 ms':>11}{'avg vs poll':>14}{'req/booking':>13}"
          f"{'bytes/booking':>15}{'CPU/booking':>13}{'+connect':>11}{'errors':>8}")
    for r in rs:
        lat = r["latency_ms"]
        if r is base:
            change = "-"
        else:
            pct = (lat["mean"] / base["latency_ms"]["mean"] - 1) * 100
            change = f"{pct:+.1f}%" if abs(pct) < 99.5 else f"{pct:+.2f}%"
        errors = r["errors"] + r["timeouts"]
        print(f"  {r['label']:<12}{fmt_ms(lat['mean']):>11}{fmt_ms(lat['p99']):>11}{change:>14}"
              f"{r['requests_per_booking']:>13.2f}{r['bytes_per_booking']:>15,.0f}"
              f"{fmt_cpu(r['server_cpu_s_per_booking']):>13}{fmt_cpu(connect_cpu_per_booking(r)):>11}{errors:>8}")


def find(blocks, name, lbl):
    for b in blocks:
        if b["name"] == name:
            for r in b["results"]:
                if r["label"] == lbl:
                    return r
    return None


def targets(blocks):
    lines = []
    poll, push = find(blocks, "1k", "poll"), find(blocks, "1k", "push")
    if poll and push:
        ratio = poll["latency_ms"]["mean"] / max(push["latency_ms"]["mean"], 1e-9)
        lines.append(("push mean latency vs 500 ms polling (1,000 users, same decision delay)",
                      f"{ratio:,.0f}x lower", ratio >= 100, ">= 100x"))
    push10 = find(blocks, "10k", "push")
    if push10:
        lines.append(("push p99 at 10,000 users", f"{push10['latency_ms']['p99']:.2f} ms",
                      push10["latency_ms"]["p99"] <= 5, "<= 5 ms"))
    for name in ("slow-1k", "1k"):
        p, q = find(blocks, name, "push"), find(blocks, name, "poll")
        if p and q and p["server_cpu_s_per_booking"] and q["server_cpu_s_per_booking"]:
            share = p["server_cpu_s_per_booking"] / q["server_cpu_s_per_booking"]
            block = next(b for b in blocks if b["name"] == name)
            lines.append((f"push server CPU per booking vs polling ({block['title'].split(', ', 2)[-1]})",
                          f"{share:.2f} of polling's", share <= 0.1, "<= 0.10"))
    cpoll, cpush = find(blocks, "cluster-10k", "poll"), find(blocks, "cluster-10k", "push")
    if cpush:
        lines.append(("cluster (3 nodes behind nginx): push p99 at 10,000 users, 2,000 bookings/s",
                      f"{cpush['latency_ms']['p99']:.2f} ms", cpush["latency_ms"]["p99"] <= 10, "<= 10 ms"))
    if cpoll and cpush and cpoll["server_cpu_s_per_booking"] and cpush["server_cpu_s_per_booking"]:
        share = cpush["server_cpu_s_per_booking"] / cpoll["server_cpu_s_per_booking"]
        lines.append(("cluster: CPU per booking, every process, push vs 500 ms polling",
                      f"{share:.2f} of polling's", share <= 0.2, "<= 0.20"))
        lines.append(("cluster: polling mean / p99 (each poll reads PostgreSQL)",
                      f"{cpoll['latency_ms']['mean']:,.0f} / {cpoll['latency_ms']['p99']:,.0f} ms", None, ""))
    spoll, spush = find(blocks, "cluster-slow-10k", "poll"), find(blocks, "cluster-slow-10k", "push")
    if spoll and spush and spoll["server_cpu_s_per_booking"] and spush["server_cpu_s_per_booking"]:
        share = spush["server_cpu_s_per_booking"] / spoll["server_cpu_s_per_booking"]
        lines.append(("cluster, 5 s business step: CPU per booking, push vs polling",
                      f"{share:.2f} of polling's", share <= 0.2, "<= 0.20"))
        lines.append(("cluster, 5 s business step: latency beyond the step, poll vs push (mean)",
                      f"{spoll['latency_ms']['mean'] - 5000:,.0f} vs {spush['latency_ms']['mean'] - 5000:,.0f} ms",
                      None, ""))
    for name in ("tls-1k", "tls-10k"):
        fresh, push = find(blocks, name, "poll/close"), find(blocks, name, "push")
        if fresh and push and fresh["server_cpu_s_per_booking"] and push["server_cpu_s_per_booking"]:
            share = push["server_cpu_s_per_booking"] / fresh["server_cpu_s_per_booking"]
            block = next(b for b in blocks if b["name"] == name)
            lines.append((f"TLS: push CPU per booking vs polling with a new TLS connection per request "
                          f"({block['users']:,} users)", f"{share:.2f} of polling's", share <= 0.1, "<= 0.10"))
            # The same with each mode's connect ramp (push's WSS handshakes) charged to its bookings.
            all_in = (push["server_cpu_s_per_booking"] + (connect_cpu_per_booking(push) or 0)) / \
                (fresh["server_cpu_s_per_booking"] + (connect_cpu_per_booking(fresh) or 0))
            lines.append(("  the same, with the connections' handshakes counted", f"{all_in:.2f} of polling's",
                          None, ""))
    wss10 = find(blocks, "tls-10k", "push")
    if wss10:
        lines.append(("TLS: push p99 over WSS at 10,000 users", f"{wss10['latency_ms']['p99']:.2f} ms",
                      wss10["latency_ms"]["p99"] <= 5, "<= 5 ms"))
    slow1, slow10 = find(blocks, "slow-1k", "poll"), find(blocks, "slow-10k", "poll")
    push_s1, push_s10 = find(blocks, "slow-1k", "push"), find(blocks, "slow-10k", "push")
    if slow1 and slow10 and push_s1 and push_s10:
        lines.append(("thundering herd: polling p99 from 1,000 to 10,000 users",
                      f"{slow1['latency_ms']['p99']:,.0f} -> {slow10['latency_ms']['p99']:,.0f} ms", None, ""))
        lines.append(("                 push p99 from 1,000 to 10,000 users",
                      f"{push_s1['latency_ms']['p99']:,.0f} -> {push_s10['latency_ms']['p99']:,.0f} ms", None, ""))
    if not lines:
        return  # none of the blocks run has a target
    print("\nTargets")
    for what, value, ok, goal in lines:
        mark = "" if ok is None else ("  met" if ok else "  NOT met")
        print(f"  {what:<72} {value:>22}  {goal:<8}{mark}")


def svg_cdf(blocks, path):
    """Latency CDFs, one panel per block, drawn as plain SVG. A panel whose latencies span more
    than a factor of 20 gets a log-scale x axis, the others a linear one."""
    panel_w, plot_h, top, legend_line = 540, 260, 42, 17
    rows = math.ceil(len(blocks) / 2)
    max_modes = max(len(b["results"]) for b in blocks)
    panel_h = top + plot_h + 40 + legend_line * max_modes + 10
    width = panel_w * 2 + 20
    height = panel_h * rows + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">'
           'pushbook: booking-to-decision latency seen by clients, polling versus push (CDF)</text>']
    for i, block in enumerate(blocks):
        ox = 10 + (i % 2) * panel_w
        oy = 36 + (i // 2) * panel_h
        px0, py0 = ox + 55, oy + top
        pw, ph = panel_w - 80, plot_h
        values = [p[1] for r in block["results"] for p in r["latency_cdf_ms"] if p[1] > 0] or [1.0]
        if max(values) == min(values):
            values = [min(values) * 0.9, max(values) * 1.1]
        log_scale = max(values) / max(min(values), 1e-3) > 20
        if log_scale:
            lo = 10 ** math.floor(math.log10(max(min(values), 0.01)))
            hi = 10 ** math.ceil(math.log10(max(values)))
            ticks, t = [], lo
            while t <= hi * 1.0001:
                ticks.append(t)
                t *= 10

            def x(v):
                return px0 + pw * (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        else:
            step = 10 ** math.floor(math.log10(max(values) - min(values) or 1))
            step = step / 2 if (max(values) - min(values)) / step < 4 else step
            lo = math.floor(min(values) / step) * step
            hi = math.ceil(max(values) / step) * step
            ticks = [lo + k * step for k in range(int(round((hi - lo) / step)) + 1)]

            def x(v):
                return px0 + pw * (v - lo) / (hi - lo)

        def y(q):
            return py0 + ph * (1 - q)

        out.append(f'<text x="{px0 + pw / 2}" y="{oy + 24}" text-anchor="middle" font-weight="bold">'
                   f'{block["title"]}</text>')
        for t in ticks:
            xv = x(t)
            out.append(f'<line x1="{xv:.1f}" y1="{py0}" x2="{xv:.1f}" y2="{py0 + ph}" stroke="#e4e4e4"/>')
            text = f"{t:,.0f}" if t >= 1 else f"{t:g}"
            out.append(f'<text x="{xv:.1f}" y="{py0 + ph + 16}" text-anchor="middle">{text}</text>')
        for q in (0, 0.25, 0.5, 0.75, 0.9, 1):
            out.append(f'<line x1="{px0}" y1="{y(q):.1f}" x2="{px0 + pw}" y2="{y(q):.1f}" stroke="#eeeeee"/>')
            out.append(f'<text x="{px0 - 6}" y="{y(q) + 4:.1f}" text-anchor="end">{q:g}</text>')
        out.append(f'<rect x="{px0}" y="{py0}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
        out.append(f'<text x="{px0 + pw / 2}" y="{py0 + ph + 33}" text-anchor="middle">latency, ms'
                   f'{" (log scale)" if log_scale else ""}</text>')
        out.append(f'<text x="{ox + 12}" y="{py0 + ph / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 {ox + 12} {py0 + ph / 2})">share of bookings decided</text>')
        for j, r in enumerate(block["results"]):
            color = COLORS.get(r["label"], "#000")
            dash = ' stroke-dasharray="6 4"' if r["label"].endswith("/close") else ""
            pts = " ".join(f"{x(v):.1f},{y(q):.1f}" for q, v in r["latency_cdf_ms"] if v > 0)
            out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            ly = py0 + ph + 52 + legend_line * j
            out.append(f'<line x1="{px0}" y1="{ly - 4}" x2="{px0 + 24}" y2="{ly - 4}" stroke="{color}" '
                       f'stroke-width="3"{dash}/>')
            out.append(f'<text x="{px0 + 32}" y="{ly}">{r["label"]}: mean {fmt_ms(r["latency_ms"]["mean"])} ms, '
                       f'p99 {fmt_ms(r["latency_ms"]["p99"])} ms; per booking {r["requests_per_booking"]:.2f} req, '
                       f'{fmt_cpu(r["server_cpu_s_per_booking"])} CPU</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default="build", help="build directory with bin/pushbook-server and bin/pushbook-bench")
    ap.add_argument("--out", default=None, help="where to write the picture and results (default BUILD/demo)")
    ap.add_argument("--quick", action="store_true", help="a quarter of the users and load (for tests)")
    ap.add_argument("--store", default=None,
                    help="the servers' store (default: a new SQLite file per server in OUT, as "
                         "pushbook-server keeps bookings by default; memory: for none)")
    ap.add_argument("--only", action="append", help="run only the named block(s): " +
                    ", ".join(b["name"] for b in BLOCKS))
    args = ap.parse_args()
    out_dir = args.out or os.path.join(args.build, "demo")
    os.makedirs(out_dir, exist_ok=True)
    chosen = [b for b in BLOCKS if not args.only or b["name"] in args.only]
    if not chosen:
        sys.exit(f"no such block: {args.only}")

    started = time.monotonic()
    print("pushbook: polling versus push, measured side by side on this machine "
          f"({os.cpu_count()} cores); each mode gets the same bookings per second.", flush=True)
    blocks = []
    for block in chosen:
        print(f"\n{block['title']}", file=sys.stderr, flush=True)
        blocks.append(run_block(args.build, block, out_dir, args.quick, args.store))

    print("\nbooking -> decision latency as the client sees it (from the booking's scheduled start), "
          "HTTP requests, bytes on the wire and server CPU per booking")
    for block in blocks:
        print_table(block)
    targets(blocks)

    svg = os.path.join(out_dir, "latency-cdf.svg")
    svg_cdf(blocks, svg)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(blocks, f, indent=1)
    print(f"\npicture: {svg}\nresults: {os.path.join(out_dir, 'results.json')}  "
          f"(took {time.monotonic() - started:.0f} s)")
    print(f"\nWatch one booking live in a browser: {os.path.join(args.build, 'bin', 'pushbook-server')} --demo, "
          "then open http://127.0.0.1:8080/ (docs/getting-started-browser.md).")


if __name__ == "__main__":
    main()
