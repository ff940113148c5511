"""Python-side throughput of the pushbook module.

    PYTHONPATH=build/python /usr/bin/python3 bench/python_bench.py [--runs 5]

submit: engine.submit() calls per second from one Python thread (no handler, memory store);
events: bus events per second delivered to a Python callback (one subscriber).
Medians of --runs runs.
"""
import argparse
import statistics
import threading
import time

import pushbook


def bench_submit(n):
    bus = pushbook.LocalBus()
    engine = pushbook.BookingEngine(bus, workers=2, max_queue=1 << 22, max_in_flight_per_user=0)
    engine.add_resource("r", capacity=1 << 30)
    submit = engine.submit
    t0 = time.perf_counter()
    for i in range(n):
        submit(user="u", resource="r")
    secs = time.perf_counter() - t0
    engine.shutdown()
    return n / secs


def bench_events(n):
    bus = pushbook.LocalBus()
    done = threading.Event()
    count = [0]

    def cb(ev):
        count[0] += 1
        if count[0] == n:
            done.set()

    sub = bus.subscribe("t/1", cb, max_queue=n + 1)
    t0 = time.perf_counter()
    publish = bus.publish
    for i in range(n):
        publish("t/1", i)
    assert done.wait(120), "events were not all delivered"
    secs = time.perf_counter() - t0
    sub.cancel()
    return n / secs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--n", type=int, default=200_000)
    a = p.parse_args()
    submit = [bench_submit(a.n) for _ in range(a.runs)]
    events = [bench_events(a.n) for _ in range(a.runs)]
    print(f"submit calls/s from one Python thread: {statistics.median(submit):,.0f} (median of {a.runs})")
    print(f"events/s delivered to a Python callback: {statistics.median(events):,.0f} (median of {a.runs})")


if __name__ == "__main__":
    main()
