#!/usr/bin/python3
"""The push protocol served by a Python web app (pushbook.aiohttp; pushbook.asgi on FastAPI under
uvicorn) beside the Beast gateway, in one sitting (docs/benchmarks.md, "Python hosts").

    /usr/bin/python3 bench/python_hosts_bench.py [--users 1000] [--rate 500] [--duration 10]
                                                 [--closed 10] [--runs 3] [--build build] [--json]

Each run starts each server in turn (interleaved: gateway, aiohttp, asgi), each with one engine
over the in-memory store, one event-loop (or gateway) thread and the resource "bench", and loads
it with pushbook-bench --mode push (a separate process: --users WebSockets, each booking and
waiting for its decision pushed; --rate bookings per second in all, for --duration seconds).
Then a throughput run on the same server: each user books --closed times one after another
(closed model). Reported per server: medians over the runs of book-to-confirmation p50 and p99
and the server's CPU per booking at the offered rate (from /proc, the server process and its
threads), and bookings decided per second in the throughput run.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "python-hosts-bench-secret-32-bytes-long"
KINDS = ["gateway", "aiohttp", "asgi"]


def start(kind, build):
    common = ["--secret", SECRET, "--resource", "bench:100000000"]
    if kind == "gateway":
        cmd = [os.path.join(build, "bin", "pushbook-server"), "--port", "0", "--store", "memory:", "--threads", "1",
               "--user-rate-limit", "0", *common]
        env = os.environ
    else:
        cmd = [sys.executable, os.path.join(ROOT, "tests", "python", "protocol_host.py"), "--kind", kind, *common]
        env = dict(os.environ, PYTHONPATH=os.path.join(build, "python"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        m = re.search(r"listening on https?://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    raise RuntimeError(f"{kind} did not start")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench(kind, port, pid, args, load):
    out = subprocess.run(
        [os.path.join(args.build, "bin", "pushbook-bench"), "--url", f"http://127.0.0.1:{port}", "--mode", "push",
         "--users", str(args.users), "--secret", SECRET, "--resource", "bench",
         "--server-pid", str(pid), "--json", "--no-progress", *load],
        capture_output=True, text=True, timeout=args.duration + 300)
    if out.returncode != 0:
        raise RuntimeError(f"pushbook-bench against {kind} failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one(kind, args):
    proc, port = start(kind, args.build)
    try:
        # Latency at the offered rate (arrival-rate model), then throughput: every user books
        # --closed bookings one after another (closed model), as fast as the server decides them.
        r = bench(kind, port, proc.pid, args,
                  ["--rate", str(args.rate), "--duration", str(args.duration), "--warmup", "2", "--ramp-ms", "3000"])
        c = bench(kind, port, proc.pid, args, ["--bookings-per-user", str(args.closed), "--ramp-ms", "200"])
        return {"p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
                "cpu_us_per_booking": (r["server_cpu_s_per_booking"] or 0) * 1e6,
                "bookings_per_s": c["bookings"] / c["duration_s"],
                "errors": r["errors"] + r["timeouts"] + c["errors"] + c["timeouts"]}
    finally:
        stop(proc)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--rate", type=float, default=500)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--closed", type=int, default=10, help="bookings per user in the throughput run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = {k: [] for k in KINDS}
    for run in range(args.runs):
        for kind in KINDS:
            r = one(kind, args)
            results[kind].append(r)
            print(f"run {run + 1} {kind:8} p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                  f"{r['bookings_per_s']:.0f}/s  cpu {r['cpu_us_per_booking']:.0f} us/booking  errors {r['errors']}",
                  file=sys.stderr, flush=True)
    med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for k, rs in results.items()}
    if args.json:
        print(json.dumps({"users": args.users, "rate": args.rate, "runs": args.runs, "medians": med, "all": results}))
        return
    g = med["gateway"]
    print(f"{args.users} users; latency and CPU at {args.rate:g} bookings/s for {args.duration:g} s; "
          f"throughput with {args.closed} bookings per user back to back; medians of {args.runs} runs")
    print(f"{'server':10}{'p50 ms':>10}{'p99 ms':>10}{'p99 / gw':>10}{'booked/s':>10}{'CPU us/bk':>11}{'errors':>8}")
    for k in KINDS:
        m = med[k]
        print(f"{k:10}{m['p50_ms']:10.2f}{m['p99_ms']:10.2f}{m['p99_ms'] / g['p99_ms']:10.2f}"
              f"{m['bookings_per_s']:10.0f}{m['cpu_us_per_booking']:11.0f}{m['errors']:8.0f}")


if __name__ == "__main__":
    main()
