"""pushbook: booking decisions pushed to clients instead of polled.

The C++ engine, bus and gateway run in their own threads; Python supplies the business step
(``handler=``) and reacts to events (``subscribe`` or ``async for ... in bus.stream(...)``).
"""
import asyncio as _asyncio

from . import _core
from ._types import (AlreadyExists, Error, IdempotencyConflict, InvalidTransition, NotFound,
                     Overloaded, Reason, Status, Unauthorized, ValidationError)

Ack = _core.Ack
Booking = _core.Booking
BookingEngine = _core.BookingEngine
BookingStore = _core.BookingStore
MemoryStore = _core.MemoryStore
SqliteStore = _core.SqliteStore
open_store = _core.open_store
Decision = _core.Decision
Event = _core.Event
Subscription = _core.Subscription
sign_token = _core.sign_token


class LocalBus(_core.LocalBus):
    """The in-process event bus: ``publish``, ``subscribe``, ``last``, ``history``, ``stream``."""

    def stream(self, topic, since=None, max_queue=4096):
        """An async iterator of the topic's events, delivered on the caller's event loop.

        ``async for ev in bus.stream("user/u1"): ...``. It starts with the topic's current state
        (a snapshot) unless ``since`` is given. If the consumer falls ``max_queue`` events
        behind, the oldest are dropped and a gap event (``ev.kind == "gap"``) says how many.
        """
        return _Stream(self, topic, since, max_queue)


class _Stream:
    def __init__(self, bus, topic, since, max_queue):
        self._bus, self._topic, self._since, self._max = bus, topic, since, max_queue
        self._queue = None
        self._sub = None

    def __aiter__(self):
        return self

    def _start(self):
        loop = _asyncio.get_running_loop()
        self._queue = _asyncio.Queue()
        queue, limit = self._queue, self._max

        def put(ev):  # on the loop's thread
            if queue.qsize() >= limit:
                queue.get_nowait()
                ev = _Gap(1)
            queue.put_nowait(ev)

        def deliver(ev):  # on a bus thread: hand over to the loop, no busy-waiting
            try:
                loop.call_soon_threadsafe(put, ev)
            except RuntimeError:
                pass  # the loop is closed

        self._sub = self._bus.subscribe(self._topic, deliver, since=self._since)

    async def __anext__(self):
        if self._queue is None:
            self._start()
        return await self._queue.get()

    async def aclose(self):
        if self._sub is not None:
            self._sub.cancel()

    def __del__(self):
        if self._sub is not None:
            self._sub.cancel()


class _Gap:
    """A gap marker made by a stream whose consumer fell behind."""

    kind = "gap"
    topic = ""
    seq = 0
    data = None
    snapshot = False

    def __init__(self, dropped):
        self.dropped = dropped

    def __repr__(self):
        return f"<pushbook.Event gap dropped={self.dropped}>"


class PushGateway(_core.PushGateway):
    """The HTTP + WebSocket + SSE gateway. ``with PushGateway(...) as gw:`` starts and stops it."""

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
    "IdempotencyConflict", "InvalidTransition", "LocalBus", "MemoryStore", "NotFound", "Overloaded",
    "PushGateway", "Reason", "SqliteStore", "Status", "Subscription", "Unauthorized",
    "ValidationError", "open_store", "sign_token",
]
