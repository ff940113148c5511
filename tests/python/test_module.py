"""The pushbook Python module: every public call, callbacks from C++ threads, asyncio, the GIL."""
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import websockets

import pushbook

DEADLINE = 10.0


class Collector:
    """Collects events from C++ threads; wait() blocks with a deadline, never a bare sleep."""

    def __init__(self):
        self.items = []
        self.cond = threading.Condition()

    def __call__(self, ev):
        with self.cond:
            self.items.append(ev)
            self.cond.notify_all()

    def wait(self, predicate, timeout=DEADLINE):
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.items), timeout), f"timed out; got {self.items}"
            return list(self.items)


def wait_until(predicate, timeout=DEADLINE):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.001)


def decided(engine, booking_id):
    wait_until(lambda: engine.get(booking_id).status != pushbook.Status.PROCESSING)
    return engine.get(booking_id)


@pytest.fixture
def bus():
    return pushbook.LocalBus()


@pytest.fixture
def engine(bus):
    e = pushbook.BookingEngine(bus, workers=2)
    e.add_resource("room-1", capacity=1)
    e.add_resource("room-2", capacity=2)
    yield e
    e.shutdown()


def test_the_documented_calls(bus, engine):
    ack = engine.submit(user="u1", resource="room-1", quantity=1, idempotency_key="k1")
    assert ack.status == "processing"
    assert ack.status is pushbook.Status.PROCESSING
    assert len(ack.booking_id) == 26
    events = Collector()
    sub = bus.subscribe("booking/" + ack.booking_id, events, since=0)
    got = events.wait(lambda items: any(e.data["status"] == "confirmed" for e in items))
    assert [(e.topic, e.seq, e.data["status"]) for e in got] == [
        ("booking/" + ack.booking_id, 1, "processing"), ("booking/" + ack.booking_id, 2, "confirmed")]
    assert got[0].snapshot is False
    assert engine.get(ack.booking_id).status == "confirmed"
    both = engine.submit(user="u1", lines=[("room-1", 1), ("room-2", 1)])
    assert decided(engine, both.booking_id).reason == pushbook.Reason.SOLD_OUT  # all or nothing
    assert engine.availability("room-2") == 2
    assert engine.cancel(ack.booking_id).status == "cancelled"
    assert engine.availability("room-1") == 1
    sub.cancel()
    assert not sub.active


def test_idempotency_and_errors(engine):
    a = engine.submit(user="u1", resource="room-2", idempotency_key="k")
    b = engine.submit(user="u1", resource="room-2", idempotency_key="k")
    assert a.booking_id == b.booking_id and b.replayed
    with pytest.raises(pushbook.IdempotencyConflict) as e:
        engine.submit(user="u1", resource="room-2", quantity=2, idempotency_key="k")
    assert e.value.code == "idempotency_conflict"
    assert isinstance(e.value, pushbook.Error)
    with pytest.raises(pushbook.ValidationError, match="quantity must be at least 1"):
        engine.submit(user="u1", resource="room-2", quantity=0)
    with pytest.raises(pushbook.ValidationError):
        engine.submit(user="u1", resource="room-2", quantity=3)  # more than capacity
    with pytest.raises(pushbook.NotFound):
        engine.submit(user="u1", resource="nope")
    with pytest.raises(pushbook.NotFound):
        engine.get("nope")
    with pytest.raises(pushbook.AlreadyExists):
        engine.add_resource("room-1", capacity=3)
    with pytest.raises(ValueError):
        engine.submit(user="u1", resource="room-2", lines=[("room-1", 1)])
    with pytest.raises(TypeError):
        engine.submit(user="u1", resource="room-2", metadata={"x": object()})
    # Numbers of the wrong kind or range: pushbook.ValidationError naming the argument, never
    # pybind11's TypeError with C++ signatures.
    for call, message in [
        (lambda: engine.add_resource("neg", capacity=-1), "capacity must be a whole number from 0 to 4294967295, not -1"),
        (lambda: engine.add_resource("big", capacity=2**40), "capacity must be a whole number"),
        (lambda: engine.set_capacity("room-1", "3"), "capacity must be a whole number from 0 to 4294967295, not str"),
        (lambda: engine.add_resource("flag", capacity=True), "not bool"),
        (lambda: engine.submit(user="u1", resource="room-2", quantity=-2), "quantity must be a whole number"),
        (lambda: engine.submit(user="u1", resource="room-2", quantity=1.5), "not float"),
        (lambda: engine.submit(user="u1", lines=[("room-2",)]), r"lines\[0\] must be a \(resource, quantity\) pair"),
        (lambda: engine.submit(user="u1", lines=[("room-2", -1)]), r"lines\[0\] quantity must be a whole number"),
        (lambda: engine.submit(user="u1", lines="room-2"), "lines must be a list"),
    ]:
        with pytest.raises(pushbook.ValidationError, match=message):
            call()
    rejected = decided(engine, engine.submit(user="u2", resource="room-1").booking_id)
    if rejected.status == "confirmed":
        with pytest.raises(pushbook.InvalidTransition):
            engine.confirm(rejected.booking_id)


def test_holds(engine):
    ack = engine.submit(user="u1", resource="room-2", hold=60)
    assert decided(engine, ack.booking_id).status == "held"
    assert engine.confirm(ack.booking_id).status == "confirmed"
    with pytest.raises(pushbook.InvalidTransition, match="already reached 'confirmed'"):
        engine.release(ack.booking_id)
    short = engine.submit(user="u1", resource="room-2", hold=0.05)
    wait_until(lambda: engine.get(short.booking_id).status == "expired")


def test_decide_on_caller(bus):
    # Without a handler, over the in-memory store: decided within submit, on the calling thread.
    engine = pushbook.BookingEngine(bus)
    engine.add_resource("solo", 1)
    first = engine.submit("alice", "solo")
    second = engine.submit("bob", "solo")
    assert engine.get(first.booking_id).status == "confirmed"
    assert engine.get(second.booking_id).status == "rejected"  # in arrival order
    # Off: the workers decide, after submit returned.
    workers = pushbook.BookingEngine(bus, decide_on_caller=False)
    workers.add_resource("duo", 2)
    ack = workers.submit("alice", "duo")
    assert decided(workers, ack.booking_id).status == "confirmed"
    with pytest.raises(TypeError):
        pushbook.BookingEngine(bus, decide_on_caller="yes please")


def test_limits_and_quotas_raise_clear_exceptions(bus):
    engine = pushbook.BookingEngine(bus, max_hold=60, max_metadata_bytes=32, max_held_units_per_user=2)
    try:
        engine.add_resource("hall", 100)
        with pytest.raises(pushbook.ValidationError, match="at most 32 are allowed"):
            engine.submit(user="u1", resource="hall", metadata={"note": "x" * 40})
        with pytest.raises(pushbook.ValidationError, match="from 1 ms to 60000 ms"):
            engine.submit(user="u1", resource="hall", hold=61)
        engine.submit(user="u1", resource="hall", quantity=2, hold=30)
        with pytest.raises(pushbook.QuotaExceeded, match="holds 2 units") as refused:
            engine.submit(user="u1", resource="hall", hold=30)
        assert refused.value.code == "quota_exceeded"
        engine.submit(user="u2", resource="hall", hold=30)  # another user's quota
        assert engine.stats["quota_exceeded"] == 1
        with pytest.raises(pushbook.ValidationError, match="max_hold"):
            pushbook.BookingEngine(bus, max_hold=0)
    finally:
        engine.shutdown()


def test_memory_store_forgets_finished_bookings_beyond_max_finished(bus):
    engine = pushbook.BookingEngine(bus, store=pushbook.MemoryStore(max_finished=1))
    try:
        engine.add_resource("one", 1)
        kept = engine.submit(user="u", resource="one")
        assert decided(engine, kept.booking_id).status == "confirmed"
        first = engine.submit(user="u", resource="one")
        assert decided(engine, first.booking_id).status == "rejected"
        second = engine.submit(user="u", resource="one")
        assert decided(engine, second.booking_id).status == "rejected"
        def forgotten():  # the commit of `second` forgets `first` just after `second` shows
            try:
                engine.get(first.booking_id)
            except pushbook.NotFound:
                return True
            return False
        wait_until(forgotten)
        assert engine.get(kept.booking_id).status == "confirmed"
        with pytest.raises(pushbook.ValidationError):
            pushbook.MemoryStore(finished_retention=-1)
    finally:
        engine.shutdown()


def test_publish_last_history_and_metadata(bus):
    assert bus.publish("t/1", {"a": [1, 2.5, None, True, "x"]}) == 1
    assert bus.publish("t/1", {"b": 2}) == 2
    assert bus.last("t/1").data == {"b": 2}
    assert [e.seq for e in bus.history("t/1")] == [1, 2]
    assert bus.last("t/none") is None
    with pytest.raises(pushbook.ValidationError):
        bus.publish("bad topic", {})
    assert bus.stats["published"] == 2


def test_publish_json_keeps_the_text_and_refuses_what_is_not_one_value(bus):
    got = Collector()
    sub = bus.subscribe("t/j", got)
    text = '{"a": [1, 2.5, null, true, "\\u00e9"]}'
    assert bus.publish_json("t/j", text) == 1
    assert bus.last("t/j").data == {"a": [1, 2.5, None, True, "\u00e9"]}
    assert bus.publish_json("t/j", "7", seq=5) == 5
    with pytest.raises(pushbook.AlreadyExists):
        bus.publish_json("t/j", "7", seq=5)
    for bad in ["", "{", "{} {}", "[1,]", "{'a': 1}"]:
        with pytest.raises(pushbook.ValidationError):
            bus.publish_json("t/j", bad)
    with pytest.raises(pushbook.ValidationError):
        bus.publish_json("bad topic", "{}")
    assert [e.seq for e in bus.history("t/j")] == [1, 5]
    assert [e.data for e in got.wait(lambda items: len(items) == 2)] == [{"a": [1, 2.5, None, True, "\u00e9"]}, 7]
    sub.cancel()


def test_publish_with_seq_drops_what_the_topic_already_has(bus):
    assert bus.publish("t/n", {"v": 1}, seq=1) == 1
    with pytest.raises(pushbook.AlreadyExists):
        bus.publish("t/n", {"v": 1}, seq=1)
    assert bus.publish("t/n", {"v": 3}, seq=3) == 3
    assert [e.seq for e in bus.history("t/n")] == [1, 3]


def test_ack_version_and_publish_stats(engine):
    ack = engine.submit(user="u1", resource="room-2", idempotency_key="kv")
    assert ack.version == 1
    wait_until(lambda: engine.get(ack.booking_id).status != pushbook.Status.PROCESSING)
    again = engine.submit(user="u1", resource="room-2", idempotency_key="kv")
    assert again.replayed and again.version == 2
    stats = engine.stats
    for key in ("publish_failures", "publish_retries", "publish_backlog", "publish_dropped", "relayed"):
        assert stats[key] == 0


def test_callbacks_run_on_cpp_threads_and_a_raising_callback_is_counted(bus):
    seen = Collector()
    main = threading.get_ident()

    def cb(ev):
        seen((threading.get_ident(), ev.seq))
        if ev.seq == 1:
            raise RuntimeError("boom")

    sub = bus.subscribe("t/x", cb)
    bus.publish("t/x", {})
    bus.publish("t/x", {})
    items = seen.wait(lambda items: len(items) == 2)
    assert all(tid != main for tid, _ in items)
    assert [seq for _, seq in items] == [1, 2]  # the raise did not stop deliveries
    wait_until(lambda: sub.errors == 1)
    with bus.subscribe("t/x", lambda ev: None) as s2:
        assert s2.active
    assert not s2.active


def test_asyncio_stream(bus):
    async def go():
        bus.publish("user/u1", {"n": 0})
        stream = bus.stream("user/u1")
        got = []
        async for ev in stream:
            got.append((ev.seq, ev.snapshot))
            if len(got) == 1:
                threading.Thread(target=lambda: [bus.publish("user/u1", {"n": i}) for i in (1, 2)]).start()
            if len(got) == 3:
                break
        await stream.aclose()
        return got
    assert asyncio.run(asyncio.wait_for(go(), DEADLINE)) == [(1, True), (2, False), (3, False)]


def test_a_stream_that_overflows_keeps_the_newest_events_after_one_true_gap(bus):
    async def go():
        stream = bus.stream("t/x", max_queue=3)
        first = asyncio.ensure_future(stream.__anext__())  # subscribes (empty topic: no snapshot)
        while stream._items is None:
            await asyncio.sleep(0.001)
        bus.publish("t/x", 0)
        assert (await asyncio.wait_for(first, DEADLINE)).seq == 1
        for i in range(1, 8):  # seven more while nobody reads: room for three
            bus.publish("t/x", i)
        deadline = time.monotonic() + DEADLINE
        while len(stream._items) + stream._dropped < 7:  # every delivery reached the loop
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        got = [await stream.__anext__() for _ in range(4)]
        await stream.aclose()
        return got
    gap, *events = asyncio.run(asyncio.wait_for(go(), DEADLINE))
    assert (gap.kind, gap.dropped, gap.topic, gap.topics) == ("gap", 4, "t/x", ["t/x"])
    assert [(ev.kind, ev.seq, ev.data) for ev in events] == [("event", 6, 5), ("event", 7, 6), ("event", 8, 7)]
    with pytest.raises(pushbook.ValidationError):
        bus.stream("t/x", max_queue=0)


def test_four_threads_submit_concurrently_without_overbooking(bus):
    engine = pushbook.BookingEngine(bus, workers=2)
    engine.add_resource("seat", capacity=50)
    acks, errors = [], []

    def worker(n):
        for i in range(100):
            try:
                acks.append(engine.submit(user=f"t{n}", resource="seat").booking_id)
            except pushbook.Error as e:
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    statuses = [decided(engine, b).status for b in acks]
    assert statuses.count("confirmed") == 50
    assert statuses.count("rejected") == 350
    assert engine.availability("seat") == 0
    engine.shutdown()


def test_handler_sync_decision_raise_and_timeout(bus):
    def handler(req):
        assert req.lines == [("r", 1)] and isinstance(req.metadata, dict)
        assert req.attempt == 1  # its first run (more after a restart or a takeover)
        if req.user == "raise":
            raise ValueError("card expired")
        if req.user == "slow":
            time.sleep(1.5)
            return True
        if req.user == "decision":
            return pushbook.Decision(False, "fraud check failed")
        return req.user != "blocked"

    engine = pushbook.BookingEngine(bus, workers=2, handler=handler, handler_timeout=1.0)
    engine.add_resource("r", capacity=10)
    ids = {u: engine.submit(user=u, resource="r", metadata={"m": 1}).booking_id
           for u in ("ok", "blocked", "raise", "decision", "slow")}
    assert decided(engine, ids["ok"]).status == "confirmed"
    assert decided(engine, ids["blocked"]).reason == "rejected_by_handler"
    raised = decided(engine, ids["raise"])
    assert raised.reason == "handler_error" and raised.reason_message == "card expired"
    assert decided(engine, ids["decision"]).reason_message == "fraud check failed"
    assert decided(engine, ids["slow"]).reason == "handler_timeout"
    engine.shutdown()


def test_async_handler_on_a_given_loop(bus):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()

    async def handler(req):
        await asyncio.sleep(0.01)  # the payment call
        if req.user == "broke":
            raise RuntimeError("insufficient funds")
        return True

    try:
        engine = pushbook.BookingEngine(bus, workers=2, handler=handler, loop=loop)
        engine.add_resource("r", capacity=10)
        ok = engine.submit(user="rich", resource="r").booking_id
        bad = engine.submit(user="broke", resource="r").booking_id
        assert decided(engine, ok).status == "confirmed"
        failed = decided(engine, bad)
        assert failed.reason == "handler_error" and failed.reason_message == "insufficient funds"
        engine.shutdown()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_a_handler_that_calls_back_into_the_engine_does_not_deadlock(bus):
    holder = {}

    def handler(req):
        return holder["engine"].availability("r") >= 0 and holder["engine"].get(req.booking_id).status == "processing"

    engine = pushbook.BookingEngine(bus, workers=1, handler=handler)
    holder["engine"] = engine
    engine.add_resource("r", capacity=3)
    assert decided(engine, engine.submit(user="u", resource="r").booking_id).status == "confirmed"
    engine.shutdown()


def test_gateway_end_to_end_with_a_websockets_client(bus, engine):
    with pushbook.PushGateway(bus, engine, host="127.0.0.1", port=0, secret="s3cret") as gw:
        assert gw.port > 0
        token = pushbook.sign_token("alice", 60, "s3cret")

        async def go():
            async with websockets.connect(f"ws://127.0.0.1:{gw.port}/v1/ws",
                                          extra_headers={"Authorization": "Bearer " + token}) as ws:
                await ws.send(json.dumps({"id": 1, "op": "book", "resource": "room-2"}))
                lines = []
                while not any(m.get("type") == "event" and m["data"]["status"] == "confirmed" for m in lines):
                    frame = await asyncio.wait_for(ws.recv(), DEADLINE)
                    lines += [json.loads(x) for x in frame.split("\n") if x]
                return lines
        msgs = asyncio.run(go())
        assert msgs[0]["type"] == "reply" and msgs[0]["result"]["status"] == "processing"
        wait_until(lambda: gw.stats["messages_pushed"] >= 2)  # counted once the write completed
        assert "pushbook_connections" in gw.metrics()
    with pytest.raises(pushbook.ValidationError):
        pushbook.PushGateway(bus, engine)  # no secret and not dev_insecure


def test_gateway_node_name_in_healthz_and_every_answer(bus, engine):
    import urllib.request
    assert bus.available is True
    with pushbook.PushGateway(bus, engine, secret="s3cret", node_name="node-2") as gw:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/healthz", timeout=5) as r:
            assert r.headers["Pushbook-Node"] == "node-2"
            assert json.loads(r.read()) == {"status": "ok", "store": "up", "bus": "up", "node": "node-2"}
    with pytest.raises(pushbook.ValidationError):
        pushbook.PushGateway(bus, engine, secret="s3cret", node_name="bad name\r\n")


def test_gateway_over_tls_wss_https_and_a_certificate_reload(bus, engine, test_certs, tmp_path):
    import shutil
    import ssl
    import urllib.error
    import urllib.request
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(test_certs.file("server.pem"), cert)
    shutil.copy(test_certs.file("server.key"), key)
    with pushbook.PushGateway(bus, engine, secret="s3cret", tls_cert=str(cert), tls_key=str(key),
                              tls_only=True) as gw:
        assert gw.tls_enabled
        context = test_certs.client_context()
        with urllib.request.urlopen(f"https://127.0.0.1:{gw.port}/healthz", context=context, timeout=5) as r:
            assert json.loads(r.read())["status"] == "ok"
        token = pushbook.sign_token("alice", 60, "s3cret")

        async def book():
            async with websockets.connect(f"wss://127.0.0.1:{gw.port}/v1/ws", ssl=context,
                                          extra_headers={"Authorization": "Bearer " + token}) as ws:
                await ws.send(json.dumps({"id": 1, "op": "book", "resource": "room-2"}))
                while True:
                    frame = await asyncio.wait_for(ws.recv(), DEADLINE)
                    for m in (json.loads(x) for x in frame.split("\n") if x):
                        if m.get("type") == "event" and m["data"]["status"] != "processing":
                            return m["data"]["status"]
        assert asyncio.run(book()) == "confirmed"
        # Plain HTTP on a TLS-only port: told what to do.
        with pytest.raises(urllib.error.HTTPError) as plain:
            urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/healthz", timeout=5)
        assert plain.value.code == 400 and b"TLS only" in plain.value.read()
        # A renewed certificate, then a bad one (a key of no certificate here).
        assert test_certs.peer_common_name(gw.port) == "localhost"
        shutil.copy(test_certs.file("server2.pem"), cert)
        shutil.copy(test_certs.file("server2.key"), key)
        gw.reload_tls()
        assert test_certs.peer_common_name(gw.port) == "localhost (renewed)"
        shutil.copy(test_certs.file("other.key"), key)
        with pytest.raises(pushbook.ValidationError, match="does not match"):
            gw.reload_tls()
        assert test_certs.peer_common_name(gw.port) == "localhost (renewed)"
    with pytest.raises(pushbook.ValidationError, match="cannot be read"):
        pushbook.PushGateway(bus, engine, secret="s3cret", tls_cert=str(tmp_path / "none.pem"), tls_key=str(key))
    with pushbook.PushGateway(bus, engine, secret="s3cret") as plain_gw:
        assert not plain_gw.tls_enabled
        with pytest.raises(pushbook.ValidationError, match="no TLS"):
            plain_gw.reload_tls()


def test_key_sets_rotate_and_refuse_bad_input(tmp_path):
    keys = pushbook.KeySet()
    keys.add_hs256("k1", "first-secret")
    old = keys.sign_token("alice", 60)
    keys.add_hs256("k2", b"second-secret")  # the key added last signs
    keys.retire("k1")
    assert keys.kids == ["k1", "k2"] and keys.signing_kid == "k2" and len(keys) == 2 and "k1" in keys
    new = keys.sign_token("bob", 60)
    assert keys.verify(old) == "alice" and keys.verify(new) == "bob"
    assert keys.remove("k1") and not keys.remove("k1")
    with pytest.raises(pushbook.Unauthorized, match='unknown key id "k1"'):
        keys.verify(old)
    with pytest.raises(pushbook.ValidationError, match='key "k2" is in the set already'):
        keys.add_hs256("k2", "again")
    with pytest.raises(pushbook.ValidationError, match='key "ec": curve "P-384" is not supported'):
        pushbook.KeySet.from_jwks('{"keys":[{"kty":"EC","kid":"ec","crv":"P-384","x":"AA","y":"AA"}]}')
    with pytest.raises(pushbook.ValidationError, match="not a PEM public key"):
        keys.add_public_key_pem("rsa", "not a key")
    path = tmp_path / "keys.json"
    path.write_text('{"keys":[{"kty":"oct","kid":"f","k":"c2VjcmV0"}]}')
    assert pushbook.KeySet.load_file(str(path)).kids == ["f"]
    with pytest.raises(pushbook.ValidationError, match="cannot read"):
        pushbook.KeySet.load_file(str(tmp_path / "none.json"))


def test_gateway_keys_reload_with_set_keys(bus, engine):
    first = pushbook.KeySet()
    first.add_hs256("k1", "first-secret")
    with pushbook.PushGateway(bus, engine, keys=first) as gw:
        first.remove("k1")  # the gateway has a copy: this changes nothing there
        first.add_hs256("k2", "second-secret")
        old = pushbook.sign_token("alice", 60, "first-secret")  # no kid: no key for it

        async def status(token):
            try:
                async with websockets.connect(f"ws://127.0.0.1:{gw.port}/v1/ws",
                                              extra_headers={"Authorization": "Bearer " + token}) as ws:
                    await ws.send(json.dumps({"id": 1, "op": "ping"}))
                    return json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))["ok"]
            except websockets.exceptions.InvalidStatusCode as e:
                return e.status_code

        k1 = pushbook.KeySet()
        k1.add_hs256("k1", "first-secret")
        assert asyncio.run(status(k1.sign_token("alice", 60))) is True
        assert asyncio.run(status(old)) == 401
        gw.set_keys(first)  # now k2 only
        assert asyncio.run(status(k1.sign_token("alice", 60))) == 401
        assert asyncio.run(status(first.sign_token("alice", 60))) is True
        with pytest.raises(pushbook.ValidationError, match="empty key set"):
            gw.set_keys(pushbook.KeySet())
        assert asyncio.run(status(first.sign_token("alice", 60))) is True
    with pytest.raises(pushbook.ValidationError, match="not both"):
        pushbook.PushGateway(bus, engine, secret="s", keys=first)


SHUTDOWN_SCRIPT = r"""
import threading, pushbook
bus = pushbook.LocalBus()
engine = pushbook.BookingEngine(bus, workers=2, handler=lambda req: True, max_in_flight_per_user=0)
engine.add_resource("r", capacity=100000)
sub = bus.subscribe("user/u", lambda ev: None)
gw = pushbook.PushGateway(bus, engine, secret="x")
gw.start()
for i in range(2000):
    engine.submit(user="u", resource="r")
print("exiting with live objects", flush=True)
"""


def test_interpreter_exit_with_live_objects_and_callbacks_in_flight():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", SHUTDOWN_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "exiting with live objects" in r.stdout


EXIT_WITH_A_BACKLOG_SCRIPT = r"""
import time, pushbook
bus = pushbook.LocalBus()
seen = []
def slow(ev):
    seen.append(ev.seq)
    time.sleep(0.0005)
sub = bus.subscribe("t/x", slow, max_queue=100000)  # never cancelled
for i in range(20000):
    bus.publish("t/x", {"i": i})
print("exiting with", len(seen), "of 20000 delivered", flush=True)
"""


@pytest.mark.parametrize("attempt", range(5))
def test_interpreter_exit_while_a_subscription_callback_has_a_backlog(attempt):
    # The delivery thread is still calling `slow` when the interpreter exits: _shutdown_all waits
    # for the call in progress and lets no other start (it used to crash now and then).
    r = subprocess.run([sys.executable, "-c", EXIT_WITH_A_BACKLOG_SCRIPT], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "of 20000 delivered" in r.stdout


def test_dropping_the_bus_an_engine_uses_is_safe():
    import gc
    bus = pushbook.LocalBus()
    engine = pushbook.BookingEngine(bus, workers=1)
    engine.add_resource("r", capacity=2)
    del bus
    gc.collect()
    assert decided(engine, engine.submit(user="u", resource="r").booking_id).status == "confirmed"
    assert "BookingEngine" in repr(engine)
    engine.shutdown()


# --- durable bookings -------------------------------------------------------------------------

def test_sqlite_store_keeps_bookings_across_engines(tmp_path):
    path = str(tmp_path / "bookings.db")
    first = pushbook.BookingEngine(pushbook.LocalBus(), store=pushbook.SqliteStore(path))
    first.add_resource("room", 2)
    ack = first.submit("alice", resource="room", idempotency_key="k-1")
    assert decided(first, ack.booking_id).status == pushbook.Status.CONFIRMED
    first.shutdown()
    del first

    second = pushbook.BookingEngine(pushbook.LocalBus(), store=pushbook.open_store(f"sqlite:{path}?sync=full"))
    second.add_resource("room", 2)  # the same capacity as stored: reconciled, not a duplicate
    assert second.availability("room") == 1
    assert second.get(ack.booking_id).status == pushbook.Status.CONFIRMED
    again = second.submit("alice", resource="room", idempotency_key="k-1")
    assert again.booking_id == ack.booking_id and again.replayed
    with pytest.raises(pushbook.AlreadyExists):
        second.add_resource("room", 2)  # reconciled once; a second add is a duplicate
    with pytest.raises(pushbook.InvalidTransition):
        second.set_capacity("room", 0)  # below the unit in use
    second.shutdown()


def test_submit_async_gives_a_future_for_asyncio_and_threads(tmp_path):
    engine = pushbook.BookingEngine(pushbook.LocalBus(), store=pushbook.SqliteStore(str(tmp_path / "a.db")))
    engine.add_resource("room", 1)

    async def main():
        ack = await asyncio.wrap_future(engine.submit_async("bob", resource="room"))
        assert ack.status == pushbook.Status.PROCESSING
        with pytest.raises(pushbook.NotFound):
            await asyncio.wrap_future(engine.submit_async("bob", resource="nowhere"))
        return ack

    ack = asyncio.run(main())
    assert decided(engine, ack.booking_id).status == pushbook.Status.CONFIRMED
    future = engine.submit_async("carol", resource="room")
    assert future.result(timeout=DEADLINE).booking_id != ack.booking_id
    engine.shutdown()


def test_stores_refuse_bad_input_with_clear_errors(tmp_path):
    with pytest.raises(pushbook.ValidationError, match="sync is 'normal' or 'full'"):
        pushbook.SqliteStore(str(tmp_path / "x.db"), sync="sometimes")
    with pytest.raises(pushbook.ValidationError, match="unknown store"):
        pushbook.open_store("redis://localhost")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n" * 100)
    with pytest.raises(pushbook.Error) as e:
        pushbook.SqliteStore(str(notes))
    assert e.value.code == "store_failed"
    assert notes.read_text().startswith("not a database")
    # No server behind this socket directory: refused at once, saying which database and why.
    with pytest.raises(pushbook.Error) as e:
        pushbook.PostgresStore(f"host={tmp_path} port=1 dbname=nowhere", connect_timeout=1)
    assert e.value.code == "store_failed"
    assert "PostgreSQL database 'nowhere'" in str(e.value) and "cannot connect" in str(e.value)
    with pytest.raises(pushbook.ValidationError, match="statement_timeout must be"):
        pushbook.PostgresStore("postgresql:///x", statement_timeout=0)
    with pytest.raises(pushbook.ValidationError, match="lease must be"):
        pushbook.PostgresStore("postgresql:///x", lease=-1)
    with pytest.raises(pushbook.ValidationError, match="poll_interval must be"):
        pushbook.PostgresStore("postgresql:///x", poll_interval=-1)
    with pytest.raises(pushbook.ValidationError, match="recovery is 'requeue' or 'reject'"):
        pushbook.BookingEngine(pushbook.LocalBus(), recovery="sometimes")
    memory = pushbook.MemoryStore()
    engine = pushbook.BookingEngine(pushbook.LocalBus(), store=memory, recovery="reject")
    engine.add_resource("r", 1)
    engine.shutdown()


def test_version_and_error_names_as_users_see_them():
    assert pushbook.__version__ == "0.1.0"
    with pytest.raises(pushbook.NotFound) as e:
        pushbook.BookingEngine(pushbook.LocalBus()).get("nope")
    assert type(e.value).__module__ == "pushbook"
    assert repr(type(e.value)) == "<class 'pushbook.NotFound'>"
    assert "pushbook.NotFound" in "".join(__import__("traceback").format_exception_only(type(e.value), e.value))


def test_await_engine_book_returns_the_decision(tmp_path):
    bus = pushbook.LocalBus()

    async def main():
        engine = pushbook.BookingEngine(bus, store=pushbook.SqliteStore(str(tmp_path / "b.db")),
                                        handler=lambda b: b.metadata.get("card") != "declined")
        engine.add_resource("room", 2)
        confirmed = await engine.book(user="ann", resource="room", timeout=DEADLINE)
        declined = await engine.book(user="bob", resource="room", metadata={"card": "declined"},
                                     timeout=DEADLINE)
        assert (await engine.book(user="cid", resource="room")).status == pushbook.Status.CONFIRMED
        sold_out = await engine.book(user="eve", resource="room", timeout=DEADLINE)
        with pytest.raises(pushbook.NotFound):
            await engine.book(user="dan", resource="nowhere")
        engine.shutdown()
        return confirmed, declined, sold_out

    confirmed, declined, sold_out = asyncio.run(main())
    assert confirmed.status == pushbook.Status.CONFIRMED
    assert (declined.status, declined.reason) == (pushbook.Status.REJECTED, pushbook.Reason.REJECTED_BY_HANDLER)
    assert (sold_out.status, sold_out.reason) == (pushbook.Status.REJECTED, pushbook.Reason.SOLD_OUT)


def test_gateway_log_lines_go_to_the_pushbook_logger():
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    keep = Keep()
    logger = logging.getLogger("pushbook")
    logger.addHandler(keep)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        bus = pushbook.LocalBus()
        engine = pushbook.BookingEngine(bus)
        with pushbook.PushGateway(bus, engine, secret="a-secret-of-at-least-32-bytes-please") as gw:
            port = gw.port
        messages = [r.getMessage() for r in keep.records]
        assert any(f"listening on 127.0.0.1:{port}" in m for m in messages), messages
        assert all(r.levelno >= logging.INFO for r in keep.records)
        engine.shutdown()
    finally:
        logger.removeHandler(keep)
        logger.setLevel(old_level)


def test_the_main_calls_have_python_signatures():
    import inspect
    assert list(inspect.signature(pushbook.BookingEngine.submit).parameters) == [
        "self", "user", "resource", "quantity", "lines", "idempotency_key", "metadata", "hold"]
    assert "store" in inspect.signature(pushbook.BookingEngine).parameters
    assert list(inspect.signature(pushbook.BookingEngine.book).parameters)[-1] == "timeout"
    assert list(inspect.signature(pushbook.LocalBus.subscribe).parameters)[:4] == ["self", "topic", "callback", "since"]
    assert "secret" in inspect.signature(pushbook.PushGateway).parameters


# --- RedisBus ---------------------------------------------------------------------------------

@pytest.fixture
def redis_address(tmp_path):
    """A redis-server of the test's own on a free loopback port, without persistence."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                return c.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_until(answers)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(DEADLINE)


def test_redis_bus_is_shared_by_two_buses_and_drives_an_engine(redis_address):
    one = pushbook.RedisBus(redis_address, key_prefix="py:")
    other = pushbook.RedisBus(redis_address, key_prefix="py:")
    assert one.publish("user/u1", {"n": 1}) == 1
    assert other.publish("user/u1", {"n": 2}) == 2  # one numbering, whichever bus publishes
    events = Collector()
    with other.subscribe("user/u1", events, since=0):
        one.publish("user/u1", {"n": 3})
        got = events.wait(lambda items: len(items) == 3)
    assert [(e.seq, e.data["n"]) for e in got] == [(1, 1), (2, 2), (3, 3)]
    assert other.last("user/u1").data == {"n": 3}
    assert [e.seq for e in one.history("user/u1", since=1)] == [2, 3]
    assert one.stats["published"] == 2 and other.stats["received"] == 1
    assert "RedisBus" in repr(one)
    # An engine publishes its bookings' events through Redis; another bus sees them.
    engine = pushbook.BookingEngine(one, workers=1)
    engine.add_resource("room-1", capacity=1)
    ack = engine.submit(user="u1", resource="room-1", idempotency_key="k1")
    booking = Collector()
    with other.subscribe("booking/" + ack.booking_id, booking, since=0):
        booking.wait(lambda items: any(e.data["status"] == "confirmed" for e in items))
    engine.shutdown()


def test_redis_bus_unreachable_raises_overloaded_and_a_bad_address_a_validation_error(redis_address):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bus = pushbook.RedisBus(f"redis://127.0.0.1:{port}", command_timeout=0.5, connect_wait=0.1)
    assert bus.available is False  # what a health check reports
    with pytest.raises(pushbook.Overloaded) as caught:
        bus.publish("user/u1", {"n": 1})
    assert caught.value.code == "bus_unavailable"
    assert bus.last("user/u1") is None
    with pytest.raises(pushbook.ValidationError):
        pushbook.RedisBus("http://127.0.0.1:6379")
