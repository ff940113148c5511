"""The protocol driven by a client nobody here wrote (Python's websockets, a Debian package), against
every server that speaks it: the Beast gateway and the Python web-app hosts (conftest.protocol_server)."""
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


def test_book_gets_ack_then_decision_on_the_same_socket(protocol_server):
    server = protocol_server
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


def test_capacity_one_two_users_exactly_one_confirmed(protocol_server):
    server = protocol_server
    async def book(user):
        async with connect(server, user) as ws:
            await ws.send(json.dumps({"id": 1, "op": "book", "resource": "room-1"}))
            reply = (await messages(ws, 1))[0]
            return (await until_decided(ws, "booking/" + reply["result"]["booking_id"]))["data"]["status"]

    async def go():
        return sorted(await asyncio.gather(book("alice"), book("bob")))
    assert run(go()) == ["confirmed", "rejected"]


def test_other_users_topic_is_forbidden(protocol_server):
    server = protocol_server
    async def go():
        async with connect(server, "alice") as ws:
            await ws.send(json.dumps({"id": 9, "op": "subscribe", "topic": "user/bob"}))
            reply = (await messages(ws, 1))[0]
            assert reply == {"type": "reply", "id": 9, "ok": False,
                             "error": {"code": "forbidden", "message": "you may not subscribe to 'user/bob'"}}
    run(go())


def test_handshake_without_token_is_refused_with_401(protocol_server):
    server = protocol_server
    async def go():
        with pytest.raises(websockets.InvalidStatusCode) as e:
            async with websockets.connect(server.url):
                pass
        # ASGI servers answer an upgrade the app refuses with 403 (no 401 before accepting).
        assert e.value.status_code == (403 if server.kind == "asgi" else 401)
    run(go())


def test_oversize_message_is_closed_with_1009(protocol_server):
    server = protocol_server
    async def go():
        async with connect(server, "alice", max_size=None) as ws:
            await ws.send("x" * (65 * 1024))
            with pytest.raises(websockets.ConnectionClosed) as e:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert e.value.code == 1009
    run(go())


def test_sigterm_closes_websockets_with_1001(protocol_server):
    server = protocol_server
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


def test_bad_input_is_answered_and_the_connection_goes_on(protocol_server):
    server = protocol_server

    async def go():
        async with connect(server, "alice") as ws:
            await ws.send("not json")
            (m,) = await messages(ws, 1)
            assert m["ok"] is False and m["id"] is None and m["error"]["code"] == "bad_request"
            await ws.send(b"\x00binary")
            (m,) = await messages(ws, 1)
            assert m["error"]["code"] == "bad_request" and "binary" in m["error"]["message"]
            await ws.send(json.dumps({"id": 2, "op": "dance"}))
            (m,) = await messages(ws, 1)
            assert m["id"] == 2 and m["error"]["code"] == "bad_request" and "unknown op" in m["error"]["message"]
            await ws.send(json.dumps({"id": 3, "op": "book", "resource": "nowhere"}))
            (m,) = await messages(ws, 1)
            assert m["id"] == 3 and m["error"]["code"] == "not_found"
            await ws.send(json.dumps({"id": 4, "op": "ping"}))
            (m,) = await messages(ws, 1)
            assert m["id"] == 4 and m["ok"] is True and m["result"]["pong"] is True
    run(go())


def test_a_flood_is_refused_then_closed_with_1008(protocol_server):
    server = protocol_server

    async def go():
        async with connect(server, "alice") as ws:
            async def flood():
                for i in range(1000):  # the limit: 100 per second, a burst of 200
                    await ws.send(json.dumps({"id": i, "op": "ping"}))

            sender = asyncio.create_task(flood())
            refused = 0
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    for m in await messages(ws, 1):
                        refused += m.get("ok") is False and m["error"]["code"] == "rate_limited"
            await asyncio.gather(sender, return_exceptions=True)
            if server.kind == "aiohttp" and ws.close_code == 1006:
                # aiohttp's close waits for one message only, then closes the socket: a client
                # still sending then gets a reset, which can discard what it had not read yet
                # (the refusals and the close frame). The connection ends all the same.
                return
            assert refused > 0
            assert ws.close_code == 1008 and ws.close_reason == "rate limit exceeded"
    run(go())


def test_a_client_that_reconnects_resumes_with_since_and_misses_nothing(protocol_server):
    server = protocol_server

    async def go():
        async with connect(server, "alice") as ws:
            await ws.send(json.dumps({"id": 1, "op": "book", "resource": "hall"}))
            (ack,) = await messages(ws, 1)
            booking = ack["result"]["booking_id"]
        # Gone before the decision came; back, it resumes from the version the ACK reported.
        async with connect(server, "alice") as ws:
            await ws.send(json.dumps({"id": 2, "op": "subscribe", "topic": "booking/" + booking,
                                      "since": ack["result"]["seq"]}))
            (reply,) = await messages(ws, 1)
            assert reply["ok"] is True
            decided = await until_decided(ws, "booking/" + booking)
            assert decided["data"]["status"] == "confirmed" and decided["seq"] == 2
    run(go())


async def sse_messages(resp, n):
    """The next n messages of an event stream: {"id": ..., "data": parsed JSON} (comments and
    the retry line skipped)."""
    out, current = [], {}
    while len(out) < n:
        line = (await asyncio.wait_for(resp.content.readline(), TIMEOUT)).decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if not line:
            if "data" in current:
                out.append(current)
            current = {}
        elif line.startswith("id: "):
            current["id"] = line[4:]
        elif line.startswith("data: "):
            current["data"] = json.loads(line[6:])
    return out


def test_events_stream_pushes_and_resumes_with_last_event_id(protocol_server):
    server = protocol_server
    import aiohttp
    base = f"http://127.0.0.1:{server.port}/v1/events"
    auth = {"Authorization": "Bearer " + server.token("alice")}

    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "?topic=user/alice", headers=auth) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                async with connect(server, "alice") as ws:
                    await ws.send(json.dumps({"id": 1, "op": "book", "resource": "hall"}))
                    (ack,) = await messages(ws, 1)
                    await until_decided(ws, "booking/" + ack["result"]["booking_id"])
                first, second = await sse_messages(resp, 2)
            assert [m["data"]["data"]["status"] for m in (first, second)] == ["processing", "confirmed"]
            epoch, seq = first["id"].split(":")
            assert second["id"] == f"{epoch}:{int(seq) + 1}"
            # EventSource reconnects with the last id it saw: the stream goes on from there.
            async with http.get(base + "?topic=user/alice", headers={**auth, "Last-Event-ID": first["id"]}) as resp:
                (again,) = await sse_messages(resp, 1)
                assert again["id"] == second["id"] and again["data"] == second["data"]
            # Refusals are HTTP statuses with the protocol's error body.
            for query, headers, status, code in [
                    ("", auth, 400, "bad_request"),
                    ("?topic=user/bob", auth, 403, "forbidden"),
                    ("?topic=user/alice", {}, 401, "unauthorized"),
                    ("?topic=user/alice", {**auth, "Last-Event-ID": "x:y"}, 400, "bad_request")]:
                async with http.get(base + query, headers=headers) as resp:
                    assert (resp.status, (await resp.json())["error"]["code"]) == (status, code), query
    run(go())
