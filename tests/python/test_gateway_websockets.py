"""The gateway driven by a client nobody here wrote: Python's websockets (Debian package)."""
import asyncio
import json
import signal

import pytest
import websockets

TIMEOUT = 5


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def messages(ws, n):
    """The next n protocol messages. A server frame may carry several, one per line; what a
    frame holds beyond n is kept for the next call."""
    if not hasattr(ws, "pending_messages"):
        ws.pending_messages = []
    queue = ws.pending_messages
    while len(queue) < n:
        frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
        queue.extend(json.loads(line) for line in frame.split("\n") if line)
    out, queue[:] = queue[:n], queue[n:]
    return out


async def until_decided(ws, topic):
    while True:
        m = (await messages(ws, 1))[0]
        if m.get("type") == "event" and m["topic"] == topic and m["data"]["status"] != "processing":
            return m


def connect(server, user, **kw):
    return websockets.connect(server.url, extra_headers={"Authorization": "Bearer " + server.token(user)}, **kw)


def test_book_gets_ack_then_decision_on_the_same_socket(server):
    async def go():
        async with connect(server, "alice") as ws:
            await ws.send(json.dumps({"id": 1, "op": "book", "resource": "hall", "quantity": 2}))
            reply = (await messages(ws, 1))[0]
            assert reply["type"] == "reply" and reply["id"] == 1 and reply["ok"] is True
            assert reply["result"]["status"] == "processing"
            assert reply["result"]["seq"] == 1  # the booking's version: where the client stands on its topic
            booking = reply["result"]["booking_id"]
            decided = (await messages(ws, 1))[0]  # next: the decision, not "processing" again
            assert decided["type"] == "event" and decided["topic"] == "booking/" + booking
            assert decided["seq"] == 2
            assert decided["data"]["status"] == "confirmed"
            assert decided["data"]["lines"] == [{"resource": "hall", "quantity": 2}]
    run(go())


def test_capacity_one_two_users_exactly_one_confirmed(server):
    async def book(user):
        async with connect(server, user) as ws:
            await ws.send(json.dumps({"id": 1, "op": "book", "resource": "room-1"}))
            reply = (await messages(ws, 1))[0]
            return (await until_decided(ws, "booking/" + reply["result"]["booking_id"]))["data"]["status"]

    async def go():
        return sorted(await asyncio.gather(book("alice"), book("bob")))
    assert run(go()) == ["confirmed", "rejected"]


def test_other_users_topic_is_forbidden(server):
    async def go():
        async with connect(server, "alice") as ws:
            await ws.send(json.dumps({"id": 9, "op": "subscribe", "topic": "user/bob"}))
            reply = (await messages(ws, 1))[0]
            assert reply == {"type": "reply", "id": 9, "ok": False,
                             "error": {"code": "forbidden", "message": "you may not subscribe to 'user/bob'"}}
    run(go())


def test_handshake_without_token_is_refused_with_401(server):
    async def go():
        with pytest.raises(websockets.InvalidStatusCode) as e:
            async with websockets.connect(server.url):
                pass
        assert e.value.status_code == 401
    run(go())


def test_oversize_message_is_closed_with_1009(server):
    async def go():
        async with connect(server, "alice", max_size=None) as ws:
            await ws.send("x" * (65 * 1024))
            with pytest.raises(websockets.ConnectionClosed) as e:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert e.value.code == 1009
    run(go())


def test_sigterm_closes_websockets_with_1001(server):
    async def go():
        async with connect(server, "alice") as ws:
            await ws.send(json.dumps({"id": 1, "op": "ping"}))
            await messages(ws, 1)
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as e:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert e.value.code == 1001
            assert e.value.reason == "going away"
    run(go())
    assert server.stop() == 0
