"""The cluster behind nginx (examples/cluster/run_cluster.py): Redis, PostgreSQL, three
pushbook-server nodes, nginx round robin with no sticky sessions. Every request of these tests
goes through nginx.

1. A booking taken (and decided) by one node reaches the client whose WebSocket is on another.
2. Node loss: under load (WebSocket, SSE and long-poll users), kill -9 one node; its clients
   reconnect through nginx and resume; every booking acknowledged is decided exactly once and its
   decision reaches its client exactly once; the dead node's bookings are taken over; no
   overbooking; the node restarted takes traffic again.
3. Rolling restart: SIGTERM each node in turn under load; no error a client did not recover from,
   no decision lost.

The run is randomised (which node dies, the users' choices): the seed is printed, and
PUSHBOOK_TEST_SEED=N repeats it. PUSHBOOK_CLUSTER_SCALE=K multiplies users and durations (the
full version: scripts/cluster-test.sh).
"""
import asyncio
import collections
import json
import os
import random
import sys
import time
import urllib.request

import pytest
import websockets

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples", "cluster"))
sys.path.insert(0, HERE)

from cluster_load import FINAL, Load, run_load  # noqa: E402
from run_cluster import Cluster, http_get  # noqa: E402

SCALE = float(os.environ.get("PUSHBOOK_CLUSTER_SCALE", "1"))
SEED = int(os.environ.get("PUSHBOOK_TEST_SEED", random.SystemRandom().randrange(1 << 31)))
# Small rooms sell out during the run (rejections, and the no-overbooking check bites); the hall
# does not.
RESOURCES = {"hall": 1_000_000, "room-1": 40, "room-2": 40, "room-3": 40}
LEASE_MS = 2000


@pytest.fixture(scope="module")
def cluster():
    print(f"\ncluster test seed {SEED} (PUSHBOOK_TEST_SEED={SEED} repeats it)", flush=True)
    # A business step of 20-220 ms: a node always has bookings in flight when it dies.
    args = ["--workers", "2", "--decision-delay-ms", "20", "--decision-jitter-ms", "200",
            "--shutdown-timeout-s", "5", "--user-rate-limit", "0"]
    for rid, capacity in RESOURCES.items():
        args += ["--resource", f"{rid}:{capacity}"]
    c = Cluster(nodes=3, server_args=args, lease_ms=LEASE_MS, fast_unsafe=True)
    c.start()
    yield c
    c.stop()


def node_of(booking_id):
    """The engine node id inside a booking id (src/detail/booking_id.cpp: 128 bits in Crockford
    base32; the node id is bits 48..79)."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    n = 0
    for ch in booking_id:
        n = n * 32 + alphabet.index(ch)
    hi, lo = n >> 64, n & ((1 << 64) - 1)
    return ((hi & 0xFFFF) << 16) | (lo >> 48)


def post_json(url, body, token, key=None):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=10) as res:
        return res.status, dict(res.headers), json.loads(res.read())


def test_decision_pushed_across_nodes(cluster):
    """The WebSocket on one node, the booking taken and decided by another: pushed all the same."""
    async def run():
        token = cluster.token("alice")
        async with websockets.connect(cluster.url.replace("http", "ws") + "/v1/ws",
                                      extra_headers={"Authorization": f"Bearer {token}"},
                                      subprotocols=["pushbook.v1"]) as ws:
            ws_node = ws.response_headers["Pushbook-Node"]
            # Round robin: one of the next few POSTs lands on another node.
            for attempt in range(10):
                status, headers, body = post_json(cluster.url + "/v1/bookings", {"resource": "hall"}, token,
                                                  key=f"across-{SEED}-{attempt}")
                assert status == 202, body
                if headers["Pushbook-Node"] != ws_node:
                    break
            else:
                pytest.fail(f"10 POSTs through nginx all went to {ws_node}: not round robin")
            booking_id, book_node = body["booking_id"], headers["Pushbook-Node"]
            assert f"node-{node_of(booking_id)}" == book_node, (booking_id, book_node)
            await ws.send(json.dumps({"id": 1, "op": "subscribe", "topic": f"booking/{booking_id}", "since": 1}))
            deadline = time.monotonic() + 10
            decision = None
            while decision is None and time.monotonic() < deadline:
                frame = await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
                for line in frame.split("\n"):
                    m = json.loads(line)
                    if m.get("type") == "event" and m["data"].get("status") in FINAL:
                        decision = m
            assert decision is not None, "no decision pushed"
            assert decision["data"]["booking_id"] == booking_id
            assert decision["data"]["status"] == "confirmed"
            # The event of version 2, or, when node A subscribed before B's events reached Redis,
            # the booking read from PostgreSQL as a snapshot: version 2 either way, and once.
            assert decision["data"]["version"] == 2, decision
        # The node that took it wrote the decision (the database says who wrote the last version).
        (written_by,) = cluster.sql(f"SELECT written_by FROM pushbook_bookings WHERE id = '{booking_id}'")
        assert written_by == book_node != ws_node
    asyncio.run(run())


def check_outcome(cluster, load, label):
    """The checks both load tests share: every acknowledged booking decided exactly once, every
    decision delivered exactly once, no overbooking, no unrecovered error."""
    print(f"{label}: {len(load.records)} bookings acknowledged, refused {dict(load.refused)}; "
          f"retried {dict(load.retries)}; reconnects {dict(load.reconnects)}; "
          f"close codes {dict(load.close_codes)}; served by {dict(load.nodes_seen)}", flush=True)
    assert not load.errors, f"{label}: {len(load.errors)} errors, first ones: {load.errors[:10]}"
    assert load.records, "no booking was acknowledged"
    ids = list(load.records)
    rows = {}
    for i in range(0, len(ids), 500):
        chunk = ",".join(f"'{b}'" for b in ids[i:i + 500])
        for line in cluster.sql(f"SELECT id, status, version FROM pushbook_bookings WHERE id IN ({chunk})"):
            bid, status, version = line.split("\t")
            rows[bid] = (status, int(version))
    missing = [b for b in ids if b not in rows]
    assert not missing, f"acknowledged but not stored: {missing[:5]}"
    # Decided exactly once: processing (version 1), then one decision (version 2), nothing after
    # (these users never cancel; a second decision would be a version 3, or refused).
    undecided = [b for b, (s, _) in rows.items() if s not in FINAL]
    assert not undecided, f"{len(undecided)} bookings never decided, e.g. {undecided[:5]}"
    twice = [(b, v) for b, (_, v) in rows.items() if v != 2]
    assert not twice, f"bookings whose version is not 2 (decided more than once?): {twice[:5]}"
    # The decision reached its client exactly once, as the database has it.
    for bid, record in load.records.items():
        status, version = rows[bid]
        assert record.final == status, f"{bid}: client was told {record.final}, database says {status}"
        assert record.versions[version] == 1, \
            f"{bid}: decision delivered {record.versions[version]} times to {record.user}:\n" + "\n".join(record.trace)
    # No overbooking: the counters and the bookings agree, and stay within capacity.
    for line in cluster.sql("SELECT r.id, r.capacity, r.confirmed, r.reserved, coalesce(("
                            " SELECT sum(l.quantity) FROM pushbook_bookings b,"
                            " json_to_recordset(b.lines) AS l(resource text, quantity bigint)"
                            " WHERE b.status = 'confirmed' AND l.resource = r.id), 0)"
                            " FROM pushbook_resources r"):
        rid, capacity, confirmed, reserved, counted = line.split("\t")
        assert int(confirmed) == int(counted), f"{rid}: counter {confirmed}, bookings {counted}"
        assert int(confirmed) + int(reserved) <= int(capacity), f"{rid} overbooked: {line}"
    dups = sum(u.duplicates() for u in load.users if hasattr(u, "duplicates"))
    print(f"{label}: user/ topic repeats seen by SSE clients (deduplicated by version): {dups}", flush=True)


def users(n):
    return max(1, int(n * SCALE))


def new_load(cluster, seed, prefix):
    return Load(cluster.url, cluster.token, list(RESOURCES), seed, prefix=prefix)


def test_node_killed_under_load(cluster):
    rng = random.Random(SEED)
    victim = rng.choice(cluster.nodes)
    load = new_load(cluster, SEED + 1, "kill-")

    async def during():
        await asyncio.sleep(4 * SCALE)
        before = len(load.records)
        print(f"kill -9 {victim.name} after {before} bookings", flush=True)
        victim.kill()
        # Its bookings are taken over within the lease (+ lease/5); its clients reconnect.
        await asyncio.sleep(max(6 * SCALE, 2.5 * LEASE_MS / 1000))
        print(f"restarting {victim.name} after {len(load.records)} bookings", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, victim.start)
        seen = load.nodes_seen[victim.name]
        await asyncio.sleep(4 * SCALE)
        return load.nodes_seen[victim.name] - seen

    served_after_restart = asyncio.run(run_load(load, ws_users=users(120), sse_users=users(20),
                                                poll_users=users(20), during=during))
    check_outcome(cluster, load, "node loss")
    assert load.reconnects["ws"] > 0, "no WebSocket client had to reconnect: did the kill hit anyone?"
    assert served_after_restart > 0, f"{victim.name} took no traffic after its restart"
    # The bookings it had taken and not decided when it died were decided by the others.
    mine = [b for b in load.records if f"node-{node_of(b)}" == victim.name]
    taken_over = 0
    for i in range(0, len(mine), 500):
        chunk = ",".join(f"'{b}'" for b in mine[i:i + 500])
        taken_over += int(cluster.sql(f"SELECT count(*) FROM pushbook_bookings WHERE id IN ({chunk})"
                                      f" AND written_by <> '{victim.name}'")[0])
    print(f"node loss: {taken_over} of {victim.name}'s {len(mine)} bookings decided by another node", flush=True)
    assert taken_over > 0, f"none of {victim.name}'s bookings was taken over"
    # Nothing is left claimed or waiting in the outbox (the marks of the last relays are written
    # a moment after the events went out).
    deadline = time.monotonic() + 10
    while cluster.sql("SELECT (SELECT count(*) FROM pushbook_bookings WHERE status = 'processing')"
                      " + (SELECT count(*) FROM pushbook_outbox)") != ["0"]:
        assert time.monotonic() < deadline, "bookings still processing or versions unpublished after 10 s: " + \
            str(cluster.sql("SELECT booking_id, version, node FROM pushbook_outbox LIMIT 5"))
        time.sleep(0.1)


def test_rolling_restart(cluster):
    load = new_load(cluster, SEED + 2, "roll-")

    async def during():
        await asyncio.sleep(3 * SCALE)
        for node in cluster.nodes:
            print(f"SIGTERM {node.name} after {len(load.records)} bookings", flush=True)
            status = await asyncio.get_running_loop().run_in_executor(None, node.terminate)
            assert status == 0, f"{node.name} exited with {status} after SIGTERM:\n{node.log_tail()}"
            await asyncio.get_running_loop().run_in_executor(None, node.start)
            await asyncio.sleep(2 * SCALE)

    asyncio.run(run_load(load, ws_users=users(120), sse_users=users(20), poll_users=users(20), during=during))
    check_outcome(cluster, load, "rolling restart")
    # Drained nodes said goodbye: WebSockets closed with 1001, not cut.
    assert load.close_codes[1001] > 0, f"no 1001 seen: {dict(load.close_codes)}"
    for node in cluster.nodes:
        status, body = http_get(node.url + "/healthz")
        assert status == 200 and json.loads(body)["node"] == node.name, body
