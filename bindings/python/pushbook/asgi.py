"""The push protocol in an ASGI app (FastAPI, Starlette, or any ASGI framework): one port, one
origin, your auth.

    import pushbook, pushbook.asgi
    push = pushbook.asgi.PushEndpoint(engine, bus, user_of=current_user)
    app = FastAPI()
    app.add_websocket_route("/v1/ws", push)      # Starlette: Route list or add_websocket_route
    app.add_route("/v1/events", pushbook.asgi.EventsEndpoint(push))   # Server-Sent Events

``user_of(scope)`` (plain or async) returns the id of the user the connection is authenticated
as, ``(user, expires_at)`` when the credential expires (Unix seconds; the client is then asked to
``refresh``), or None to refuse the upgrade. ``bearer_user(secret_or_keys)`` accepts pushbook
tokens as the built-in gateway does. Clients speak docs/protocol.md exactly as with the gateway.

Two differences come from ASGI itself: a refused upgrade is answered 403 (ASGI servers such as
uvicorn 0.17 have no way to send 401 before accepting), and at shutdown uvicorn drops WebSockets
without a close frame before the app's lifespan shutdown runs. ``pushbook.asgi.Server`` (a
``uvicorn.Server``) closes the endpoints' WebSockets with 1001 "going away" first, as the gateway
does; with another server, ``await push.close_all()`` before it stops.
"""
import asyncio
import json
from urllib.parse import parse_qs

from ._types import Error
from .protocol import ProtocolHost, ProtocolSession, bearer_verifier, resolve_user as _user

__all__ = ["PushEndpoint", "EventsEndpoint", "bearer_user", "Server"]

# The HTTP status of a refused event stream, by error code (as the gateway answers).
_STATUS = {"bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404}


async def _json_error(send, status, code, message):
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name):
    name = name.lower().encode()
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def bearer_user(secret_or_keys):
    """A ``user_of(scope)`` that verifies a pushbook token (``KeySet`` or an HS256 secret string)
    from the ``Authorization: Bearer`` header, the ``access_token`` query parameter or a
    ``bearer.<token>`` WebSocket subprotocol, as the built-in gateway does."""
    verify = bearer_verifier(secret_or_keys)

    def user_of(scope):
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return verify(_header(scope, "authorization"), (query.get("access_token") or [None])[0],
                      scope.get("subprotocols") or ())

    return user_of


class PushEndpoint:
    """An ASGI application serving the protocol's WebSocket (mount it at ``/v1/ws``).

    ``PushEndpoint(engine, bus, user_of=..., **limits)``: ``limits`` as ``ProtocolHost``. The host
    is made on the first connection, on the server's event loop (``.host`` then)."""

    def __init__(self, engine, bus, *, user_of, **limits):
        self._engine, self._bus, self._limits = engine, bus, limits
        self._user_of = user_of
        self.host = None

    def _host(self):
        if self.host is None:
            self.host = ProtocolHost(self._engine, self._bus, **self._limits)
        return self.host

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            raise RuntimeError("PushEndpoint serves WebSocket connections (mount it with a WebSocket route)")
        host = self._host()
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        user, expires = await _user(self._user_of, scope)
        if not user:
            await send({"type": "websocket.close", "code": 1008})  # the server answers 403
            return
        offered = [p.strip() for p in scope.get("subprotocols") or ()]
        await send({"type": "websocket.accept", "subprotocol": "pushbook.v1" if "pushbook.v1" in offered else None})

        async def send_text(text):
            await send({"type": "websocket.send", "text": text})

        async def close(code, reason):
            await send({"type": "websocket.close", "code": code, "reason": reason})

        session = ProtocolSession(host, user=user, send=send_text, close=close, token_expires=expires)
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    text = message.get("text")
                    await session.afeed(text if text is not None else (message.get("bytes") or b""))
                elif kind == "websocket.disconnect":
                    break
        finally:
            if session.close_code is not None:
                await session.wait_closed()  # the server's close frame goes out first
            session.close()

    async def close_all(self, code=1001, reason="going away"):
        """New bookings refused; every open WebSocket closed with ``code`` once its queued frames
        are sent (call it when the app begins to shut down)."""
        if self.host is not None:
            await self.host.close_all(code, reason)


class EventsEndpoint:
    """An ASGI application serving ``GET /v1/events?topic=...`` (Server-Sent Events, resumed with
    Last-Event-ID) as the gateway does. ``EventsEndpoint(push)`` shares the PushEndpoint's host and
    user_of; mount it at ``/v1/events`` (Starlette/FastAPI: ``app.add_route("/v1/events",
    EventsEndpoint(push))``)."""

    def __init__(self, push, *, keepalive=15.0):
        self._push = push
        self._keepalive = keepalive

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise RuntimeError("EventsEndpoint serves HTTP requests")
        if scope.get("method", "GET") != "GET":
            return await _json_error(send, 405, "bad_request", "use GET")
        host = self._push._host()
        user, _ = await _user(self._push._user_of, scope)
        if not user:
            return await _json_error(send, 401, "unauthorized", "a valid token or session is required")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        first = lambda key: (query.get(key) or [None])[0]  # noqa: E731
        ready = asyncio.Event()
        ended = asyncio.Event()

        async def write(text):
            await ready.wait()
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        try:
            session = ProtocolSession.events(host, user=user, topic=first("topic"), send=write,
                                             close=lambda code, reason: ended.set(),
                                             last_event_id=_header(scope, "last-event-id"), since=first("since"),
                                             epoch=first("epoch"))
        except Error as e:
            return await _json_error(send, _STATUS.get(e.code, 503), e.code, e.message)

        async def watch():  # the client going away shows as http.disconnect
            while (await receive())["type"] != "http.disconnect":
                pass
            ended.set()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
                                    (b"x-accel-buffering", b"no")]})
            ready.set()
            while not ended.is_set():  # a comment line now and then keeps proxies from timing out
                try:
                    await asyncio.wait_for(ended.wait(), self._keepalive)
                except asyncio.TimeoutError:
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away under a write
            pass
        finally:
            watcher.cancel()
            session.close()


def Server(config, endpoints):
    """A ``uvicorn.Server`` for ``config`` that, when told to stop (SIGTERM, SIGINT), closes the
    WebSockets of ``endpoints`` (PushEndpoint objects) with 1001 "going away" before uvicorn's own
    shutdown (which would drop them without a close frame)."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            for endpoint in endpoints:
                await endpoint.close_all()
            await super().shutdown(sockets=sockets)

    return _Server(config)
