"""pushbook.ProtocolSession and the adapters, in-process: what a Python host sees (the wire
protocol itself is tested against every server in test_gateway_websockets.py)."""
import asyncio
import json
import threading
import time

import aiohttp
import pytest
from aiohttp import web

import pushbook
import pushbook.aiohttp

SECRET = "protocol-session-test-secret-32-bytes"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def split(frames):
    return [json.loads(line) for frame in frames for line in frame.split("\n") if line]


async def until(pred, timeout=5):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def make_engine(capacity=5):
    bus = pushbook.LocalBus()
    engine = pushbook.BookingEngine(bus)
    engine.add_resource("hall", capacity)
    return engine, bus


def test_book_then_the_decision_through_an_async_send():
    engine, bus = make_engine()

    async def go():
        frames = []

        async def send(frame):
            await asyncio.sleep(0)  # a real socket's write yields
            frames.append(frame)

        session = pushbook.ProtocolSession(engine, bus, user="alice", send=send)
        session.feed(json.dumps({"id": 1, "op": "book", "resource": "hall"}))
        await until(lambda: any(m.get("type") == "event" for m in split(frames)))
        ack, decided = split(frames)[:2]
        assert ack["result"]["status"] == "processing" and decided["data"]["status"] == "confirmed"
        assert session.subscriptions == 1 and session.user == "alice"
        session.close()
        assert session.closed
        await session.wait_closed()
    run(go())
    engine.shutdown()


def test_protocol_closes_call_close_after_the_last_frame():
    engine, bus = make_engine()

    async def go():
        host = pushbook.ProtocolHost(engine, bus, max_message_bytes=64)
        events = []
        session = pushbook.ProtocolSession(host, user="alice", send=lambda f: events.append(("send", f)),
                                           close=lambda code, reason: events.append(("close", code, reason)))
        session.feed(json.dumps({"id": 1, "op": "ping"}))
        session.feed("x" * 65)
        await session.wait_closed()
        assert [e[0] for e in events] == ["send", "close"]
        assert events[1][1] == 1009 and session.close_code == 1009
        assert host.sessions == 0
    run(go())
    engine.shutdown()


def test_an_expired_token_is_refreshed_or_the_session_is_closed_with_4001():
    engine, bus = make_engine()

    async def go():
        host = pushbook.ProtocolHost(engine, bus, secret=SECRET, token_refresh_grace=0.3)
        frames, closed = [], []
        session = pushbook.ProtocolSession(host, user="alice", send=frames.append,
                                           close=lambda code, reason: closed.append((code, reason)),
                                           token_expires=time.time() + 0.2)
        await until(lambda: any(m.get("code") == "token_expired" for m in split(frames)))
        session.feed(json.dumps({"id": 1, "op": "refresh", "token": pushbook.sign_token("alice", 60, SECRET)}))
        await until(lambda: any(m.get("id") == 1 for m in split(frames)))
        assert [m for m in split(frames) if m.get("id") == 1][0]["ok"] is True
        await asyncio.sleep(0.5)  # past the first grace: refreshed, so still open
        assert not closed
        other = pushbook.ProtocolSession(host, user="bob", send=lambda f: None,
                                         close=lambda code, reason: closed.append((code, reason)),
                                         token_expires=time.time() + 0.1)
        await other.wait_closed()
        assert closed == [(4001, "token expired")]
        session.close()
    run(go())
    engine.shutdown()


def test_feed_from_another_thread():
    engine, bus = make_engine()

    async def go():
        frames = []
        session = pushbook.ProtocolSession(engine, bus, user="alice", send=frames.append)
        t = threading.Thread(target=lambda: [session.feed(json.dumps({"id": i, "op": "ping"})) for i in range(50)])
        t.start()
        await asyncio.get_running_loop().run_in_executor(None, t.join)
        await until(lambda: len(split(frames)) == 50)
        assert [m["id"] for m in split(frames)] == list(range(50))
        session.close()
    run(go())
    engine.shutdown()


def test_bad_arguments_raise():
    engine, bus = make_engine()

    async def go():
        with pytest.raises(pushbook.ValidationError):
            pushbook.ProtocolHost(engine, bus, max_queued_bytes=0)
        with pytest.raises(pushbook.ValidationError):
            pushbook.ProtocolHost(engine, bus, slow_consumer="sometimes")
        with pytest.raises(pushbook.ValidationError):
            pushbook.ProtocolSession(engine, bus, user="", send=print)
        with pytest.raises(TypeError):
            pushbook.ProtocolSession(engine, bus, user="a", send=None)
        host = pushbook.ProtocolHost(engine, bus)
        with pytest.raises(pushbook.Unauthorized) as e:
            pushbook.ProtocolSession.events(host, user="alice", topic="user/bob", send=print)
        assert e.value.code == "forbidden"
        with pytest.raises(pushbook.ValidationError):
            pushbook.ProtocolSession.events(host, user="alice", topic="user/alice", last_event_id="x:y", send=print)
    run(go())
    with pytest.raises(RuntimeError):  # no event loop to deliver on
        pushbook.ProtocolSession(engine, bus, user="a", send=print)
    engine.shutdown()


def test_the_event_loop_never_waits_for_a_slow_check():
    """A subscription whose check is slow (the host's authorize callable, or a booking topic's
    owner read from the store) is fed on a worker thread: other clients are served meanwhile."""
    engine, bus = make_engine()

    def authorize(user, topic):
        if topic == "resource/slow":
            time.sleep(1.0)
        return True

    async def go():
        app = web.Application()
        pushbook.aiohttp.setup(app, engine, bus, user_of=lambda r: r.headers.get("X-User"), authorize=authorize)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/ws"
        order = []
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(url, headers={"X-User": "a"}) as slow, \
                    client.ws_connect(url, headers={"X-User": "b"}) as quick:
                async def slow_one():
                    await slow.send_json({"id": 1, "op": "subscribe", "topic": "resource/slow"})
                    await slow.receive_str()
                    order.append("slow")

                async def quick_one():
                    await asyncio.sleep(0.1)  # the slow check is under way
                    await quick.send_json({"id": 1, "op": "ping"})
                    await quick.receive_str()
                    order.append("quick")
                await asyncio.gather(slow_one(), quick_one())
        await runner.cleanup()
        assert order == ["quick", "slow"]
    run(go())
    engine.shutdown()


def test_aiohttp_host_closes_websockets_with_1001_and_ends_streams_at_shutdown():
    engine, bus = make_engine()

    async def go():
        app = web.Application()
        pushbook.aiohttp.setup(app, engine, bus, user_of=lambda r: r.headers.get("X-User"))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(base + "/v1/ws", headers={"X-User": "a"}) as ws, \
                    client.get(base + "/v1/events?topic=user/a", headers={"X-User": "a"}) as stream:
                assert await stream.content.readline() == b"retry: 2000\n"
                assert app["pushbook.protocol_host"].sessions == 2
                cleanup = asyncio.create_task(runner.cleanup())
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001 and msg.extra == "going away"
                rest = await asyncio.wait_for(stream.content.read(), 5)  # the stream ends
                assert b"data:" not in rest
                await cleanup
    run(go())
    engine.shutdown()


def test_a_client_that_stops_reading_is_closed_with_1013_by_the_aiohttp_host():
    """The socket's buffers fill, the host's writes wait, the session's bounded queue fills: the
    client is closed with 1013 (as by the gateway) and the host goes on."""
    import base64
    import os
    import socket

    engine, bus = make_engine()

    async def go():
        app = web.Application()
        pushbook.aiohttp.setup(app, engine, bus, user_of=lambda r: r.headers.get("X-User"), max_queued_bytes=64 * 1024)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        # A client by hand that subscribes and then never reads.
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nX-User: a\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await loop.run_in_executor(None, sock.recv, 1)
        assert head.startswith(b"HTTP/1.1 101")
        payload = json.dumps({"id": 1, "op": "subscribe", "topic": "resource/hall"}).encode()
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)  # masked with zeros
        host = app["pushbook.protocol_host"]
        await until(lambda: 'pushbook_subscriptions 1' in host.metrics())
        big = {"padding": "x" * 1000}
        for i in range(20000):  # ~20 MB: more than the socket buffers hold
            bus.publish("resource/hall", big)
            if i % 500 == 0:
                await asyncio.sleep(0)
                if "pushbook_slow_consumer_disconnects_total 1" in host.metrics():
                    break
        await until(lambda: "pushbook_slow_consumer_disconnects_total 1" in host.metrics())
        await until(lambda: host.sessions == 0)
        sock.close()
        # The host goes on: a new client is served.
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(f"http://127.0.0.1:{port}/v1/ws", headers={"X-User": "b"}) as ws:
                await ws.send_json({"id": 1, "op": "ping"})
                assert json.loads(await ws.receive_str())["ok"] is True
        await runner.cleanup()
    run(go())
    engine.shutdown()
