"""pushbook: booking decisions pushed to clients instead of polled.

The C++ engine, bus and gateway run in their own threads; Python supplies the business step
(``handler=``) and reacts to events (``subscribe`` or ``async for ... in bus.stream(...)``).
"""
import asyncio as _asyncio
import collections as _collections

from . import _core
from ._types import (AlreadyExists, Error, IdempotencyConflict, InvalidTransition, NotFound,
                     Overloaded, QuotaExceeded, Reason, Status, Unauthorized, ValidationError)

__version__ = _core.__version__

Ack = _core.Ack
Booking = _core.Booking
BookingStore = _core.BookingStore
MemoryStore = _core.MemoryStore
SqliteStore = _core.SqliteStore
PostgresStore = _core.PostgresStore
open_store = _core.open_store
Decision = _core.Decision
Event = _core.Event
Subscription = _core.Subscription
sign_token = _core.sign_token
KeySet = _core.KeySet

from .protocol import ProtocolHost, ProtocolSession  # noqa: E402  (needs _core)


class LocalBus(_core.LocalBus):
    """The in-process event bus: ``publish``, ``subscribe``, ``last``, ``history``, ``stream``."""

    def publish(self, topic, data, seq=None):
        """Publishes data (JSON-like Python values) to topic; returns the event's seq. With
        ``seq`` the publisher numbers the event: one whose seq the topic already has (or passed)
        is dropped and raises AlreadyExists."""
        return super().publish(topic, data, seq=seq)

    def subscribe(self, topic, callback, since=None, max_queue=4096, overflow="drop_oldest", snapshot=True):
        """Calls ``callback(event)`` on a bus thread for every event of ``topic`` (or a trailing
        wildcard pattern): the current state first (a snapshot) unless ``since`` (a seq) asks for
        a replay from there. Returns a Subscription (``cancel()``, or use it as a context manager)."""
        return super().subscribe(topic, callback, since=since, max_queue=max_queue, overflow=overflow,
                                 snapshot=snapshot)

    def stream(self, topic, since=None, max_queue=4096):
        """An async iterator of the topic's events, delivered on the caller's event loop.

        ``async for ev in bus.stream("user/u1"): ...``. It starts with the topic's current state
        (a snapshot) unless ``since`` is given. If the consumer falls ``max_queue`` events
        behind, the oldest are dropped and a gap event (``ev.kind == "gap"``) says how many.
        """
        return _Stream(self, topic, since, max_queue)


class RedisBus(_core.RedisBus):
    """The event bus on Redis: every process on the same Redis (and ``key_prefix``) shares each
    topic's numbering, history and events. ``RedisBus("redis://127.0.0.1:6379")``; also
    ``redis://:password@host:port/db`` and ``unix:/path``. The same methods as LocalBus;
    ``publish`` raises Overloaded (code ``bus_unavailable``) while Redis is unreachable."""

    def __init__(self, address="redis://127.0.0.1:6379", history_limit=256, history_max_age=600.0,
                 delivery_threads=1, key_prefix="pushbook:", command_timeout=2.0, connect_wait=2.0):
        super().__init__(address, history_limit=history_limit, history_max_age=history_max_age,
                         delivery_threads=delivery_threads, key_prefix=key_prefix,
                         command_timeout=command_timeout, connect_wait=connect_wait)

    def subscribe(self, topic, callback, since=None, max_queue=4096, overflow="drop_oldest", snapshot=True):
        """As LocalBus.subscribe; after a lost connection the subscriber catches up from history
        (or a snapshot); a wildcard subscriber gets a gap event instead."""
        return super().subscribe(topic, callback, since=since, max_queue=max_queue, overflow=overflow,
                                 snapshot=snapshot)

    def stream(self, topic, since=None, max_queue=4096):
        """As LocalBus.stream."""
        return _Stream(self, topic, since, max_queue)


class BookingEngine(_core.BookingEngine):
    """Validates, ACKs, decides on a worker pool, never overbooks, publishes every state change.

    ``BookingEngine(bus, workers=2, handler=None, loop=None, handler_timeout=10.0,
    max_queue=65536, idempotency_window=86400.0, store=None, recovery="requeue", max_hold=900.0,
    max_metadata_bytes=4096, max_in_flight_per_user=1000, max_held_units_per_user=0,
    decide_on_caller=True)``.

    The limits a public service needs: ``max_hold`` (seconds) is the longest hold a booking may ask
    for, ``max_metadata_bytes`` the largest metadata (as JSON); ``max_in_flight_per_user`` and
    ``max_held_units_per_user`` are per-user quotas (0: none) whose excess raises QuotaExceeded.
    Without a handler and over the in-memory store, ``decide_on_caller`` decides a booking within
    ``submit`` (no hand-off to a worker thread); ``False`` sends every booking to the workers.
    """

    # Python signatures over the extension's calls: inspect.signature() and help() show them.
    def __init__(self, bus, workers=2, handler=None, loop=None, handler_timeout=10.0, max_queue=65536,
                 idempotency_window=86400.0, store=None, recovery="requeue", max_hold=900.0,
                 max_metadata_bytes=4096, max_in_flight_per_user=1000, max_held_units_per_user=0,
                 decide_on_caller=True):
        super().__init__(bus, workers=workers, handler=handler, loop=loop, handler_timeout=handler_timeout,
                         max_queue=max_queue, idempotency_window=idempotency_window, store=store,
                         recovery=recovery, max_hold=max_hold, max_metadata_bytes=max_metadata_bytes,
                         max_in_flight_per_user=max_in_flight_per_user,
                         max_held_units_per_user=max_held_units_per_user, decide_on_caller=decide_on_caller)
        self._bus = bus

    def add_resource(self, resource_id, capacity):
        """Adds a resource (reconciled with the store when the store has it already)."""
        return super().add_resource(resource_id, capacity)

    def set_capacity(self, resource_id, capacity):
        """Changes a resource's capacity, never below what is reserved or confirmed."""
        return super().set_capacity(resource_id, capacity)

    def submit(self, user, resource=None, quantity=1, lines=None, idempotency_key=None, metadata=None,
               hold=None):
        """Validates and ACKs once the booking is stored (status 'processing'); the decision
        follows on booking/<id>. ``lines=[(resource, quantity), ...]`` books several at once, all
        or none; ``hold`` (seconds) asks for a hold."""
        return super().submit(user, resource=resource, quantity=quantity, lines=lines,
                              idempotency_key=idempotency_key, metadata=metadata, hold=hold)

    def submit_async(self, user, resource=None, quantity=1, lines=None, idempotency_key=None,
                     metadata=None, hold=None):
        """submit() without waiting for the store: a concurrent.futures.Future of the Ack."""
        return super().submit_async(user, resource=resource, quantity=quantity, lines=lines,
                                    idempotency_key=idempotency_key, metadata=metadata, hold=hold)

    def get(self, booking_id):
        """The booking as stored now."""
        return super().get(booking_id)

    def cancel(self, booking_id):
        """confirmed -> cancelled, freeing its units."""
        return super().cancel(booking_id)

    def confirm(self, booking_id):
        """held -> confirmed."""
        return super().confirm(booking_id)

    def release(self, booking_id):
        """held -> released, freeing its units."""
        return super().release(booking_id)

    async def book(self, user, resource=None, quantity=1, lines=None, idempotency_key=None,
                   metadata=None, hold=None, timeout=30.0):
        """Books and waits for the decision, without blocking the event loop: the Booking as
        decided (``confirmed``, ``rejected`` with a reason, or ``held``).

        ``booking = await engine.book(user="u1", resource="room-101", timeout=10)``. Raises what
        ``submit`` raises, and ``TimeoutError`` when no decision came within ``timeout`` seconds
        (the booking goes on: ``engine.get(booking_id)`` tells its state later).
        """
        loop = _asyncio.get_running_loop()
        ack = await _asyncio.wrap_future(self.submit_async(
            user, resource=resource, quantity=quantity, lines=lines, idempotency_key=idempotency_key,
            metadata=metadata, hold=hold))
        decided = loop.create_future()

        def settle():
            if not decided.done():
                decided.set_result(None)

        def on_event(ev):  # a bus thread; the first event is the current state (a snapshot)
            if ev.kind == "ended" or (isinstance(ev.data, dict) and ev.data.get("status") != "processing"):
                try:
                    loop.call_soon_threadsafe(settle)
                except RuntimeError:
                    pass  # the loop is closed

        sub = self._bus.subscribe("booking/" + ack.booking_id, on_event)
        try:
            await _asyncio.wait_for(decided, timeout)
        finally:
            sub.cancel()
        return await loop.run_in_executor(None, self.get, ack.booking_id)


class _Stream:
    """Events of one topic (or pattern) for ``async for``, in a queue of at most ``max_queue``.

    When the consumer falls behind, the oldest queued events are dropped: the newest are kept,
    and one gap marker before them says how many were dropped and from which topics.
    """

    def __init__(self, bus, topic, since, max_queue):
        self._sub = None
        if max_queue < 1:
            raise ValidationError("max_queue must be at least 1", "bad_request")
        self._bus, self._topic, self._since, self._max = bus, topic, since, max_queue
        self._items = None      # collections.deque, on the loop's thread only
        self._dropped = 0
        self._dropped_topics = []
        self._ready = None      # asyncio.Event: set while something can be taken
        self._sub = None

    def __aiter__(self):
        return self

    def _start(self):
        loop = _asyncio.get_running_loop()
        self._items = _collections.deque()
        self._ready = _asyncio.Event()

        def put(ev):  # on the loop's thread
            if len(self._items) >= self._max:
                old = self._items.popleft()
                self._dropped += getattr(old, "dropped", 0) if old.kind == "gap" else 1
                if old.topic and old.topic not in self._dropped_topics:
                    self._dropped_topics.append(old.topic)
            self._items.append(ev)
            self._ready.set()

        def deliver(ev):  # on a bus thread: hand over to the loop, no busy-waiting
            try:
                loop.call_soon_threadsafe(put, ev)
            except RuntimeError:
                pass  # the loop is closed

        self._sub = self._bus.subscribe(self._topic, deliver, since=self._since)

    async def __anext__(self):
        if self._items is None:
            self._start()
        while not self._items and not self._dropped:
            self._ready.clear()
            await self._ready.wait()
        if self._dropped:
            gap = _Gap(self._dropped, self._dropped_topics or [self._topic])
            self._dropped, self._dropped_topics = 0, []
            return gap
        return self._items.popleft()

    async def aclose(self):
        if self._sub is not None:
            self._sub.cancel()

    def __del__(self):
        if self._sub is not None:
            self._sub.cancel()


class _Gap:
    """A gap marker made by a stream whose consumer fell behind: ``dropped`` events of
    ``topics`` (``topic`` is the first of them) were dropped before the events that follow it."""

    kind = "gap"
    seq = 0
    data = None
    snapshot = False

    def __init__(self, dropped, topics):
        self.dropped = dropped
        self.topics = list(topics)
        self.topic = self.topics[0] if self.topics else ""

    def __repr__(self):
        return f"<pushbook.Event gap dropped={self.dropped} topics={self.topics}>"


class PushGateway(_core.PushGateway):
    """The HTTP + WebSocket + SSE gateway. ``with PushGateway(...) as gw:`` starts and stops it.

    Its log lines go to the ``pushbook`` logger (the logger's level when the gateway is made
    decides which lines are sent). ``user_rate_limit`` (requests per second, 0: none) and
    ``user_rate_burst`` bound each user's HTTP requests; ``access_log=True`` logs a line per HTTP
    request and per WebSocket/SSE session at INFO (docs/protocol.md, "Access log"). ``node_name``
    ("node-2") names this gateway in a cluster: the ``Pushbook-Node`` header of every answer and
    the ``node`` of /healthz (docs/deployment.md). ``tls_cert`` and ``tls_key`` (PEM files) turn
    TLS on: https, wss and SSE over TLS, on the same port as plain HTTP unless ``tls_only``;
    ``tls_client_ca`` asks every client for a certificate it signed; ``reload_tls()`` reads the
    files again (a renewed certificate) while connections go on (docs/deployment.md, "TLS")."""

    def __init__(self, bus, engine, host="127.0.0.1", port=0, secret=None, dev_insecure=False, threads=1,
                 allowed_origins=(), static_dir="", keys=None, user_rate_limit=20.0, user_rate_burst=100,
                 access_log=False, node_name="", tls_cert="", tls_key="", tls_only=False, tls_client_ca=""):
        super().__init__(bus, engine, host=host, port=port, secret=secret, dev_insecure=dev_insecure,
                         threads=threads, allowed_origins=list(allowed_origins), static_dir=static_dir,
                         keys=keys, user_rate_limit=user_rate_limit, user_rate_burst=user_rate_burst,
                         access_log=access_log, node_name=node_name, tls_cert=tls_cert, tls_key=tls_key,
                         tls_only=tls_only, tls_client_ca=tls_client_ca)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def __repr__(self):
        return f"<pushbook.PushGateway port={self.port}>"


__all__ = [
    "Ack", "AlreadyExists", "Booking", "BookingEngine", "BookingStore", "Decision", "Error", "Event",
    "IdempotencyConflict", "InvalidTransition", "KeySet", "LocalBus", "MemoryStore", "NotFound", "Overloaded",
    "PostgresStore", "ProtocolHost", "ProtocolSession", "PushGateway", "QuotaExceeded", "Reason", "RedisBus", "SqliteStore",
    "Status", "Subscription", "Unauthorized",
    "ValidationError", "__version__", "open_store", "sign_token",
]
