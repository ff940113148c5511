"""The push protocol at a route of your own aiohttp application: one port, one origin, your auth.

    from aiohttp import web
    import pushbook, pushbook.aiohttp

    app = web.Application()
    pushbook.aiohttp.setup(app, engine, bus, user_of=current_user)   # GET /v1/ws

``user_of(request)`` (plain or async) returns the id of the user the request is authenticated as
(your session cookie, your own tokens), or ``(user, expires_at)`` when the credential expires (Unix
seconds: the client is then asked to ``refresh``), or None to refuse the upgrade with 401.
``bearer_user(secret_or_keys)`` makes one that accepts pushbook tokens as the built-in gateway does
(pass the same secret or keys to ``setup`` so that ``refresh`` messages can be verified).
Clients speak docs/protocol.md exactly as with the gateway (web/pushbook.js works unchanged).
"""
import asyncio

from aiohttp import WSMsgType, web

from ._types import Error
from .protocol import ProtocolHost, ProtocolSession, bearer_verifier, resolve_user as _user

__all__ = ["setup", "websocket_handler", "events_handler", "bearer_user"]

# The HTTP status of a refused event stream, by error code (as the gateway answers).
_STATUS = {"bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404}

HOST_KEY = "pushbook.protocol_host"


def bearer_user(secret_or_keys):
    """A ``user_of`` that verifies a pushbook token (``KeySet`` or an HS256 secret string) from the
    ``Authorization: Bearer`` header, the ``access_token`` query parameter or a ``bearer.<token>``
    WebSocket subprotocol (browsers), as the built-in gateway does."""
    verify = bearer_verifier(secret_or_keys)

    def user_of(request):
        return verify(request.headers.get("Authorization"), request.query.get("access_token"),
                      request.headers.get("Sec-WebSocket-Protocol", "").split(","))

    return user_of


def _unauthorized(message):
    return web.json_response({"error": {"code": "unauthorized", "message": message}}, status=401)


def events_handler(host, user_of, *, keepalive=15.0):
    """An aiohttp handler serving ``GET /v1/events?topic=...`` (Server-Sent Events, resumed with
    Last-Event-ID) as the gateway does. ``host``: a ProtocolHost, or a function of the app
    returning one."""

    async def handler(request):
        h = host(request.app) if callable(host) and not isinstance(host, ProtocolHost) else host
        user, _ = await _user(user_of, request)
        if not user:
            return _unauthorized("a valid token or session is required")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        ready = asyncio.Event()
        ended = asyncio.Event()

        async def send(text):
            await ready.wait()
            await response.write(text.encode())

        try:
            session = ProtocolSession.events(h, user=user, topic=request.query.get("topic"), send=send,
                                             close=lambda code, reason: ended.set(),
                                             last_event_id=request.headers.get("Last-Event-ID"),
                                             since=request.query.get("since"), epoch=request.query.get("epoch"))
        except Error as e:
            return web.json_response({"error": {"code": e.code, "message": e.message}},
                                     status=_STATUS.get(e.code, 503))
        try:
            await response.prepare(request)
            ready.set()
            while not ended.is_set():  # a comment line now and then keeps proxies from timing out
                try:
                    await asyncio.wait_for(ended.wait(), keepalive)
                except asyncio.TimeoutError:
                    await response.write(b": keep-alive\n\n")
        finally:  # the client went away (aiohttp cancels the handler), or the stream ended
            session.close()
        return response

    return handler


def websocket_handler(host, user_of, *, heartbeat=30.0):
    """An aiohttp handler serving the protocol over a WebSocket. ``host``: a ProtocolHost, or a
    function of the app returning one (``setup`` passes the app's)."""

    async def handler(request):
        h = host(request.app) if callable(host) and not isinstance(host, ProtocolHost) else host
        user, expires = await _user(user_of, request)
        if not user:
            return _unauthorized("a valid token or session is required")
        ws = web.WebSocketResponse(protocols=("pushbook.v1",), max_msg_size=h.max_message_bytes,
                                   heartbeat=heartbeat)
        await ws.prepare(request)

        async def close(code, reason):
            await ws.close(code=code, message=reason.encode()[:123])

        session = ProtocolSession(h, user=user, send=ws.send_str, close=close, token_expires=expires)
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await session.afeed(msg.data)
        finally:
            if session.close_code is not None:
                # The server is closing it (shutdown, rate limit, too slow...): its close frame
                # goes out before aiohttp ends the response with a plain 1000.
                await session.wait_closed()
            session.close()
        return ws

    return handler


def setup(app, engine, bus, *, user_of, path="/v1/ws", events_path="/v1/events", heartbeat=30.0, keepalive=15.0,
          **limits):
    """Adds ``GET path`` (the protocol's WebSocket) and ``GET events_path`` (Server-Sent Events;
    None: not served) to ``app``, with a ProtocolHost made when the app starts (``limits``: see
    ProtocolHost) and, when the app shuts down, new bookings refused and every WebSocket closed with
    1001 "going away" once its queued frames are sent (event streams end). Returns nothing; the
    host is ``app["pushbook.protocol_host"]`` once the app runs."""

    async def start(app):
        app[HOST_KEY] = ProtocolHost(engine, bus, **limits)

    async def shutdown(app):
        host = app.get(HOST_KEY)
        if host is not None:
            await host.close_all(1001, "going away")

    async def cleanup(app):
        host = app.get(HOST_KEY)
        if host is not None:
            host.close()

    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    app.router.add_get(path, websocket_handler(lambda a: a[HOST_KEY], user_of, heartbeat=heartbeat))
    if events_path:
        app.router.add_get(events_path, events_handler(lambda a: a[HOST_KEY], user_of, keepalive=keepalive))
