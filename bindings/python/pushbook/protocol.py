"""The push protocol served from a Python web app's own WebSocket (and thus its own port, origin
and authentication): the same protocol code the built-in gateway runs, driven by the app.

``ProtocolHost`` is what the app's connections share (engine, bus, one bus subscription per topic
for all of them, limits); ``ProtocolSession`` is one client. The app authenticates the client its
own way, then feeds each text message to the session; the session delivers server frames to
``send`` (an async or plain callable) in order, on the event loop. Events arrive on the engine's
and bus's threads: they wake the loop through an eventfd, never taking the GIL on those threads.

``pushbook.aiohttp`` and ``pushbook.asgi`` wrap this for aiohttp and ASGI (FastAPI, Starlette).
"""
import asyncio
import concurrent.futures
import inspect
import itertools

from . import _core
from ._types import Error

__all__ = ["ProtocolHost", "ProtocolSession", "bearer_verifier", "resolve_user"]


async def resolve_user(user_of, request):
    """``(user, expires_at)`` from a host's ``user_of(request)``, which may be async and may return
    a user id, ``(user, expires_at)`` or None."""
    user = user_of(request)
    if inspect.isawaitable(user):
        user = await user
    expires = None
    if isinstance(user, tuple):
        user, expires = user
    return user, expires


def bearer_verifier(secret_or_keys):
    """``verify(authorization, access_token, subprotocols)`` -> ``(user, expires_at)`` or None: a
    pushbook token (``KeySet``, or an HS256 secret string) taken from an ``Authorization: Bearer``
    header, an ``access_token`` query parameter or a ``bearer.<token>`` WebSocket subprotocol
    (browsers), as the built-in gateway takes it. The framework adapters' ``bearer_user`` use it."""
    keys = secret_or_keys
    if isinstance(keys, str):
        keys = _core.KeySet()
        keys.add_hs256("", secret_or_keys)  # the key of tokens without a kid

    def verify(authorization=None, access_token=None, subprotocols=()):
        token = None
        if authorization and authorization.startswith("Bearer "):
            token = authorization[7:].strip()
        elif access_token:
            token = access_token
        else:
            for proto in subprotocols:
                proto = proto.strip()
                if proto.startswith("bearer."):
                    token = proto[7:]
        if not token:
            return None
        try:
            return keys.verify_claims(token)
        except (Error, ValueError):
            return None

    return verify


class ProtocolHost:
    """What the protocol sessions of one web app share, on one event loop.

    ``ProtocolHost(engine, bus, secret=None, keys=None, max_message_bytes=65536,
    max_subscriptions=256, rate_limit=100.0, rate_burst=200, max_queued_bytes=1048576,
    slow_consumer="disconnect", token_refresh_grace=30.0, authorize=None)``: the limits mean what
    they mean in ``PushGateway``; ``secret``/``keys`` verify the token of a ``refresh`` message
    (only needed when sessions are given a ``token_expires``); ``authorize(user, topic) -> bool``
    replaces the default per-topic rule (it runs while a message is fed, on the feeding thread).
    Raises ValidationError for bad limits.

    The first session binds the host to the running event loop (or ``loop=``); ``close()``
    unbinds it. ``drain()`` refuses new bookings while the ones in flight are pushed (call it when
    the app begins to shut down).
    """

    def __init__(self, engine, bus, *, loop=None, **limits):
        self._core = _core._ProtocolHost(engine, bus, **limits)
        self.max_message_bytes = limits.get("max_message_bytes", 64 * 1024)
        self._authorize = limits.get("authorize") is not None
        self._pool = None  # feeds that may wait for the store (ProtocolSession.afeed)
        self._waker = _core._Waker()
        self._sessions = {}
        self._ids = itertools.count(1)
        self._loop = loop
        self._watching = False

    def _attach(self, loop):
        if self._loop is None:
            self._loop = loop
        elif loop is not None and loop is not self._loop:
            raise RuntimeError("a ProtocolHost serves one event loop; make one per loop")
        if self._loop is None:
            raise RuntimeError("ProtocolSession needs a running event loop, or loop=")
        if not self._watching:
            self._watching = True
            if _running_loop() is self._loop:
                self._loop.add_reader(self._waker.fileno(), self._on_wake)
            else:  # another thread: the loop registers the reader itself
                self._loop.call_soon_threadsafe(self._loop.add_reader, self._waker.fileno(), self._on_wake)
        return self._loop

    def _add(self, session):
        sid = next(self._ids)
        self._sessions[sid] = session
        return sid

    def _on_wake(self):
        for sid in self._waker.take():
            session = self._sessions.get(sid)
            if session is not None:
                session._kick()

    def drain(self):
        """From now on ``book`` is answered "overloaded" (the app is shutting down)."""
        self._core.drain()

    @property
    def sessions(self):
        """Open sessions."""
        return self._core.sessions

    def metrics(self):
        """The sessions', engine's and bus's counters in Prometheus text format."""
        return self._core.metrics()

    async def close_all(self, code=1001, reason="going away", timeout=5.0):
        """Drains, then closes every open session with ``code``/``reason`` once what is queued
        for it is sent (for up to ``timeout`` seconds) (an app's shutdown hook)."""
        self.drain()
        await asyncio.gather(*(s.aclose(code, reason, timeout) for s in list(self._sessions.values())),
                             return_exceptions=True)

    def close(self):
        """Stops watching the loop (after the sessions are closed)."""
        if self._watching and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._waker.fileno())
        self._watching = False
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _executor(self):
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="pushbook-feed")
        return self._pool


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_default_hosts = {}


def _host_for(engine, bus, loop):
    """The shared host of (engine, bus, loop) with the default limits (sessions made without a host;
    other limits: make a ProtocolHost and pass it)."""
    for stale in [k for k, h in _default_hosts.items() if h._loop.is_closed()]:
        del _default_hosts[stale]  # a finished asyncio.run(): its host (and engine) can go
    key = (id(engine), id(bus), id(loop))
    host = _default_hosts.get(key)
    if host is None:
        host = ProtocolHost(engine, bus, loop=loop)
        _default_hosts[key] = host
    return host


class ProtocolSession:
    """One client of the push protocol in a web app's own WebSocket.

    ``ProtocolSession(engine, bus, user="alice", send=ws.send_str, close=...)`` or
    ``ProtocolSession(host, user=..., send=...)``. ``feed(text)`` for each message the client sends
    (``bytes`` counts as a binary message, refused). Frames go to ``send(frame)`` in order (awaited
    when it returns an awaitable); when the protocol ends the connection (rate limit, slow consumer,
    message too big, token expired) ``close(code, reason)`` is called after the last frame.
    ``token_expires``: the Unix time the client's credential expires (the client is then asked to
    ``refresh``), or None. Call ``close()`` (or ``await aclose()``) when the client goes away.

    feed() may be called from any thread; send and close run on the event loop.
    """

    def __init__(self, engine_or_host, bus=None, *, user, send, close=None, token_expires=None, loop=None,
                 _events=None):
        if isinstance(engine_or_host, ProtocolHost):
            if bus is not None:
                raise TypeError("with a ProtocolHost, pass no bus")
            host = engine_or_host
            loop = host._attach(loop or _running_loop())
        else:
            loop = loop or _running_loop()
            if loop is None:
                raise RuntimeError("ProtocolSession needs a running event loop, or loop=")
            host = _host_for(engine_or_host, bus, loop)
            host._attach(loop)
        if not callable(send):
            raise TypeError("send must be a callable taking the frame (str)")
        self._host = host
        self._loop = loop
        self._send = send
        self._on_close = close
        self._id = host._add(self)
        try:
            if _events is not None:
                self._core = _core._ProtocolSession.events(host._core, user, *_events, waker=host._waker, id=self._id)
            else:
                self._core = _core._ProtocolSession(host._core, user, token_expires, host._waker, self._id)
        except BaseException:
            host._sessions.pop(self._id, None)
            raise
        self._task = None
        self._timer = None
        self._done = loop.create_future()
        self.close_code = None
        self.close_reason = None
        if _running_loop() is loop:
            self._arm_deadline()  # the token's expiry, if any
        else:
            loop.call_soon_threadsafe(self._arm_deadline)

    @classmethod
    def events(cls, host, *, user, topic, send, close=None, last_event_id=None, since=None, epoch=None, loop=None):
        """A Server-Sent Events stream of one topic (``GET /v1/events``): ``send`` gets the stream's
        text (write it to the response as it comes), ``close(code, reason)`` when the stream ends
        (end the response: the client's EventSource resumes with Last-Event-ID). ``last_event_id``
        is the request's Last-Event-ID header, ``since``/``epoch`` its query parameters. Raises
        ValidationError (a bad topic or resume point: answer 400) or Unauthorized with code
        "forbidden" (403). Comment lines (": keep-alive") for idle streams are the host's."""
        return cls(host, user=user, send=send, close=close, loop=loop,
                   _events=(topic or "", last_event_id, since or "", epoch or ""))

    @property
    def user(self):
        return self._core.user

    @property
    def subscriptions(self):
        return self._core.subscriptions

    @property
    def closed(self):
        return self._core.closed

    def feed(self, message):
        """One message from the client: a str (a JSON request) or bytes (refused)."""
        if isinstance(message, (bytes, bytearray, memoryview)):
            self._core.feed_binary()
        else:
            self._core.feed(message)

    async def afeed(self, message):
        """feed() for an event loop that must never wait for the engine: a message that may wait
        for the store (a ``cancel``; a ``subscribe`` to a booking topic, whose owner is read from
        the store; any ``subscribe`` when the host has an ``authorize`` callable) is fed on a
        worker thread, the others inline (no thread hop). Await each before feeding the next: the
        messages of one client are handled in order."""
        if isinstance(message, str) and ('"cancel"' in message or '"booking/' in message or
                                         (self._host._authorize and '"subscribe"' in message)):
            await self._loop.run_in_executor(self._host._executor(), self._core.feed, message)
        else:
            self.feed(message)

    def _kick(self):
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._drain())

    async def _drain(self):
        try:
            while True:
                text, close = self._core.poll()
                if text is not None:
                    result = self._send(text)
                    if inspect.isawaitable(result):
                        await result
                if close is not None:
                    await self._close_with(*close)
                    return
                if text is None:
                    break
        except Exception:  # the socket went away under send: the session ends
            self._finish()
            return
        self._arm_deadline()

    def _arm_deadline(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        delay = self._core.next_deadline()
        if delay is not None:
            self._timer = self._loop.call_later(delay + 0.001, self._kick)

    def _finish(self, resolve=True):
        self._core.close()
        self._host._sessions.pop(self._id, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if resolve and not self._done.done() and self.close_code is None:
            self._done.set_result(None)

    def close(self):
        """The client went away: subscriptions end, nothing more is sent. Idempotent."""
        if self._loop.is_closed():
            self._core.close()
            self._host._sessions.pop(self._id, None)
        elif _running_loop() is self._loop:
            self._finish()
        else:
            self._loop.call_soon_threadsafe(self._finish)

    async def aclose(self, code=1001, reason="going away", timeout=5.0):
        """Closes from the server's side: what is queued is sent (for up to ``timeout`` seconds: a
        client that does not read is not waited for longer), then ``close(code, reason)``."""
        if self._done.done():
            return
        deadline = self._loop.time() + timeout
        try:
            if self._task is not None and not self._task.done():
                await asyncio.wait_for(asyncio.shield(self._task), max(0.0, deadline - self._loop.time()))
            if not self._done.done():  # what is queued goes first (one drain at a time: the order)
                self._task = self._loop.create_task(self._drain())
                await asyncio.wait_for(asyncio.shield(self._task), max(0.0, deadline - self._loop.time()))
        except asyncio.TimeoutError:
            self._task.cancel()
        if self._done.done() or self.close_code is not None:  # the protocol closed it meanwhile
            return
        await self._close_with(code, reason)

    async def _close_with(self, code, reason):
        self.close_code, self.close_reason = code, reason
        self._finish(resolve=False)
        try:
            if self._on_close is not None:
                result = self._on_close(code, reason)
                if inspect.isawaitable(result):
                    await result
        finally:
            if not self._done.done():
                self._done.set_result(None)

    async def wait_closed(self):
        """Returns once the session has ended: the client went away (close()), or the server's
        close (``close(code, reason)``) has been made."""
        await asyncio.shield(self._done)
