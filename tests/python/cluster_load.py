"""Clients for the cluster test (test_cluster.py): WebSocket, SSE and long-poll users booking
through the balancer while nodes die and restart, each recording what it was told.

Every user books one booking after another with an idempotency key of its own, and retries what
failed for want of a node (a connection refused or cut, 502, 503, 504) with the same key, as a
real client must. What each user saw is kept per booking, so that the test can check that every
booking acknowledged was decided once and that its decision reached its client once.

- WsUser: one WebSocket (through nginx, to whichever node). Half of them book with the `book` op
  on it, half with POST /v1/bookings (so the node that takes the booking is usually not the one
  holding the WebSocket); the decision comes on `booking/<id>`. When the WebSocket closes (1001
  from a draining node, or cut by a kill) the user reconnects and resubscribes each undecided
  booking with `since` = the last version it saw: nothing missed, nothing twice.
- SseUser: one Server-Sent Events stream on `user/<id>`, resumed with Last-Event-ID; books with
  POST. The `user/` topic may repeat an event after a crash (at least once, docs/architecture.md);
  a client orders and deduplicates booking states by `data.version`.
- PollUser: POST, then GET /v1/bookings/<id>?wait=25 (a long poll) until the booking is decided.
"""
import asyncio
import collections
import json
import random
import time

import aiohttp
import websockets

FINAL = {"confirmed", "rejected", "held", "cancelled", "released", "expired"}
RETRYABLE_STATUS = {502, 503, 504}


class Record:
    """What one client saw of one booking."""

    __slots__ = ("booking_id", "user", "key", "acked_at", "versions", "final", "decided", "trace")

    def __init__(self, booking_id, user, key):
        self.booking_id = booking_id
        self.user = user
        self.key = key
        self.acked_at = time.monotonic()
        self.versions = collections.Counter()  # data.version -> deliveries
        self.final = None  # the decision's status
        self.decided = asyncio.Event()
        self.trace = []  # how each delivery came: for the message of a failed check


class Load:
    """The shared state of one run: records, counters, errors, and the stop flag."""

    def __init__(self, url, token, resources, seed, prefix="", log=print):
        self.url = url
        self.prefix = prefix  # of user names: each run its own users and idempotency keys
        self.ws_url = url.replace("http://", "ws://") + "/v1/ws"
        self.token = token  # user -> JWT
        self.resources = resources
        self.random = random.Random(seed)
        self.log = log
        self.records = {}  # booking id -> Record
        self.refused = collections.Counter()  # sold_out and such: answered, no booking
        self.retries = collections.Counter()  # what was retried (and then recovered)
        self.errors = []  # what no retry could fix: the test fails on any
        self.reconnects = collections.Counter()
        self.close_codes = collections.Counter()
        self.nodes_seen = collections.Counter()  # Pushbook-Node of responses: who served
        self.stopping = asyncio.Event()  # no new bookings after it
        self.session = None
        self.users = []

    def error(self, what):
        if len(self.errors) < 50:
            self.errors.append(what)

    def record(self, booking_id, user, key):
        r = self.records.get(booking_id)
        if r is None:
            r = self.records[booking_id] = Record(booking_id, user, key)
        elif r.user != user:
            self.error(f"booking {booking_id} acknowledged to {user} and to {r.user}")
        return r

    def think(self, low=0.2, high=0.8):
        return asyncio.sleep(self.random.uniform(low, high))

    def resource(self):
        return self.random.choice(self.resources)

    async def post_booking(self, user, key, resource):
        """POST /v1/bookings until a node answers for good: the Record, or None when refused."""
        headers = {"Authorization": f"Bearer {self.token(user)}", "Idempotency-Key": key,
                   "Content-Type": "application/json"}
        body = json.dumps({"resource": resource})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                async with self.session.post(self.url + "/v1/bookings", data=body, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=10)) as res:
                    text = await res.text()
                    self.nodes_seen[res.headers.get("Pushbook-Node", "?")] += 1
                    if res.status in (200, 202):
                        b = json.loads(text)
                        return self.record(b["booking_id"], user, key)
                    if res.status == 409:  # sold_out before it was taken
                        self.refused[json.loads(text)["error"]["code"]] += 1
                        return None
                    if res.status == 429:
                        self.retries["post 429"] += 1
                        await asyncio.sleep(float(res.headers.get("Retry-After", "1")))
                        continue
                    if res.status in RETRYABLE_STATUS:
                        self.retries[f"post {res.status}"] += 1
                    else:
                        self.error(f"POST /v1/bookings for {user}: {res.status} {text[:200]}")
                        return None
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                self.retries[f"post {type(e).__name__}"] += 1
            await asyncio.sleep(0.1)
        self.error(f"POST /v1/bookings for {user} (key {key}): no node took it within 60 s")
        return None


def booking_data(message):
    """(booking id, version, status) of an event carrying a booking, else None."""
    if message.get("type") != "event":
        return None
    data = message.get("data") or {}
    if "booking_id" not in data:
        return None
    return data["booking_id"], data.get("version"), data.get("status")


class WsUser:
    def __init__(self, load, name, book_over_ws):
        self.load = load
        self.name = name
        self.book_over_ws = book_over_ws
        self.ws = None
        self.connected = asyncio.Event()
        self.pending = {}  # booking id -> Record, undecided: resubscribed after a reconnect
        self.replies = {}  # request id -> Future
        self.next_id = 0
        self.subscribed = set()  # topics of the current connection
        self.bookings = 0
        self.connections = 0
        self.node = None
        self.highest = {}

    async def run(self):
        keeper = asyncio.create_task(self.keep_connected())
        try:
            while not self.load.stopping.is_set():
                self.bookings += 1
                key = f"{self.name}-{self.bookings}"
                resource = self.load.resource()
                record = await (self.book_ws(key, resource) if self.book_over_ws else self.book_http(key, resource))
                if record is not None:
                    await self.wait_decided(record)
                await self.load.think()
            while self.pending:
                await self.wait_decided(next(iter(self.pending.values())))
        finally:
            keeper.cancel()
            if self.ws is not None:
                await self.ws.close()

    async def wait_decided(self, record):
        try:
            await asyncio.wait_for(record.decided.wait(), 45)
        except asyncio.TimeoutError:
            self.load.error(f"{self.name}: no decision pushed for {record.booking_id} within 45 s "
                            f"(versions seen {dict(record.versions)})")
        self.pending.pop(record.booking_id, None)
        # Done with its topic: a connection may follow at most 256 (GatewayOptions::max_subscriptions).
        topic = "booking/" + record.booking_id
        if topic in self.subscribed and self.ws is not None:
            self.subscribed.discard(topic)
            self.next_id += 1
            try:
                await self.ws.send(json.dumps({"id": self.next_id, "op": "unsubscribe", "topic": topic}))
            except websockets.exceptions.ConnectionClosed:
                pass

    async def keep_connected(self):
        load = self.load
        headers = {"Authorization": f"Bearer {load.token(self.name)}"}
        first = True
        while True:
            try:
                ws = await websockets.connect(load.ws_url, extra_headers=headers, subprotocols=["pushbook.v1"],
                                              open_timeout=10, max_size=2**22, ping_interval=None)
            except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as e:
                load.retries[f"ws connect {type(e).__name__}"] += 1
                await asyncio.sleep(0.1 + load.random.random() * 0.2)
                continue
            if not first:
                load.reconnects["ws"] += 1
            first = False
            self.node = ws.response_headers.get("Pushbook-Node", "?")
            self.connections += 1
            load.nodes_seen[self.node] += 1
            self.ws = ws
            self.subscribed = set()
            self.highest = {}  # booking id -> highest version this connection delivered
            # Resume every undecided booking from the last version seen.
            for record in list(self.pending.values()):
                await self.subscribe(record)
            self.connected.set()
            try:
                async for frame in ws:
                    for line in frame.split("\n"):
                        if line:
                            self.on_message(json.loads(line))
            except websockets.exceptions.ConnectionClosed:
                pass
            self.connected.clear()
            load.close_codes[ws.close_code] += 1
            for f in self.replies.values():
                if not f.done():
                    f.set_exception(ConnectionError("WebSocket closed"))
            self.replies.clear()
            await asyncio.sleep(0.05 + load.random.random() * 0.2)

    async def subscribe(self, record):
        topic = "booking/" + record.booking_id
        if topic in self.subscribed or self.ws is None:
            return
        self.subscribed.add(topic)
        since = max(record.versions) if record.versions else 1
        record.trace.append(f"ws conn {self.connections}: subscribe since {since}")
        self.next_id += 1
        try:
            await self.ws.send(json.dumps({"id": self.next_id, "op": "subscribe", "topic": topic, "since": since}))
        except websockets.exceptions.ConnectionClosed:
            pass  # resubscribed after the reconnect

    def on_message(self, m):
        if m.get("type") == "reply":
            f = self.replies.pop(m.get("id"), None)
            if f is not None and not f.done():
                f.set_result(m)
            elif not m.get("ok", True):
                self.load.error(f"{self.name}: request failed: {m}")
            return
        b = booking_data(m)
        if b is None:
            if m.get("type") == "gap":
                self.load.error(f"{self.name}: gap marker {m}")
            return
        booking_id, version, status = b
        record = self.load.records.get(booking_id)
        if record is None:
            # The decision may come before the POST's answer was read: keep it for the record.
            record = self.load.record(booking_id, self.name, None)
        # On one connection a booking's states only go forward (docs/protocol.md: never an older
        # state, never the same twice; a resume may repeat the state it resumes from, as a
        # snapshot, on the new connection).
        highest = self.highest.get(booking_id, 0)
        if version <= highest:
            self.load.error(f"{self.name}: {booking_id} version {version} after {highest} on one connection: {m}")
        self.highest[booking_id] = max(highest, version)
        record.versions[version] += 1
        record.trace.append(f"ws conn {self.connections} via {self.node}: {m}")
        if status in FINAL:
            record.final = status
            record.decided.set()

    async def request(self, message, timeout=10):
        await asyncio.wait_for(self.connected.wait(), 30)
        self.next_id += 1
        message["id"] = self.next_id
        f = asyncio.get_running_loop().create_future()
        f.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if unawaited
        self.replies[self.next_id] = f
        await self.ws.send(json.dumps(message))
        return await asyncio.wait_for(f, timeout)

    async def book_ws(self, key, resource):
        load = self.load
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                reply = await self.request({"op": "book", "resource": resource, "idempotency_key": key})
            except (ConnectionError, asyncio.TimeoutError, websockets.exceptions.ConnectionClosed) as e:
                load.retries[f"ws book {type(e).__name__}"] += 1
                await asyncio.sleep(0.1)
                continue
            if reply.get("ok"):
                result = reply["result"]
                record = load.record(result["booking_id"], self.name, key)
                record.trace.append(f"ws conn {self.connections} via {self.node}: book reply {reply}")
                record.key = key
                self.pending[record.booking_id] = record
                # This connection follows booking/<id> from the reply's seq on.
                self.subscribed.add("booking/" + record.booking_id)
                return record
            code = reply["error"]["code"]
            if code == "sold_out":
                load.refused[code] += 1
                return None
            if code in ("overloaded", "quota_exceeded", "rate_limited"):
                load.retries[f"ws book {code}"] += 1
                await asyncio.sleep(0.2)
                continue
            load.error(f"{self.name}: book: {reply}")
            return None
        load.error(f"{self.name}: book (key {key}): not taken within 60 s")
        return None

    async def book_http(self, key, resource):
        record = await self.load.post_booking(self.name, key, resource)
        if record is None:
            return None
        record.key = key
        self.pending[record.booking_id] = record
        if self.connected.is_set():
            await self.subscribe(record)
        return record


class SseUser:
    def __init__(self, load, name):
        self.load = load
        self.name = name
        self.last_event_id = None
        self.seen = collections.Counter()  # (booking id, version) -> deliveries
        self.bookings = 0
        self.pending = {}

    async def run(self):
        reader = asyncio.create_task(self.read_stream())
        try:
            while not self.load.stopping.is_set():
                self.bookings += 1
                key = f"{self.name}-{self.bookings}"
                record = await self.load.post_booking(self.name, key, self.load.resource())
                if record is not None:
                    self.pending[record.booking_id] = record
                    await self.wait_decided(record)
                await self.load.think()
            for record in list(self.pending.values()):
                await self.wait_decided(record)
        finally:
            reader.cancel()

    async def wait_decided(self, record):
        try:
            await asyncio.wait_for(record.decided.wait(), 45)
        except asyncio.TimeoutError:
            self.load.error(f"{self.name} (SSE): no decision for {record.booking_id} within 45 s")
        self.pending.pop(record.booking_id, None)

    async def read_stream(self):
        load = self.load
        first = True
        while True:
            headers = {"Authorization": f"Bearer {load.token(self.name)}"}
            if self.last_event_id:
                headers["Last-Event-ID"] = self.last_event_id
            try:
                async with load.session.get(f"{load.url}/v1/events?topic=user/{self.name}", headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as res:
                    if res.status != 200:
                        if res.status not in RETRYABLE_STATUS:
                            load.error(f"{self.name}: SSE {res.status}")
                        load.retries[f"sse {res.status}"] += 1
                        await asyncio.sleep(0.2)
                        continue
                    if not first:
                        load.reconnects["sse"] += 1
                    first = False
                    load.nodes_seen[res.headers.get("Pushbook-Node", "?")] += 1
                    event_id = None
                    async for raw in res.content:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith("id:"):
                            event_id = line[3:].strip()
                        elif line.startswith("data:"):
                            self.on_message(json.loads(line[5:]))
                            if event_id:
                                self.last_event_id = event_id
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                load.retries[f"sse {type(e).__name__}"] += 1
            await asyncio.sleep(0.1 + load.random.random() * 0.2)

    def on_message(self, m):
        b = booking_data(m)
        if b is None:
            return
        booking_id, version, status = b
        self.seen[(booking_id, version)] += 1
        record = self.load.records.get(booking_id) or self.load.record(booking_id, self.name, None)
        if self.seen[(booking_id, version)] == 1:  # deduplicated by version, as the protocol says
            record.versions[version] += 1
        if status in FINAL:
            record.final = status
            record.decided.set()

    def duplicates(self):
        return sum(n - 1 for n in self.seen.values() if n > 1)


class PollUser:
    def __init__(self, load, name):
        self.load = load
        self.name = name
        self.bookings = 0

    async def run(self):
        load = self.load
        while not load.stopping.is_set():
            self.bookings += 1
            record = await load.post_booking(self.name, f"{self.name}-{self.bookings}", load.resource())
            if record is not None:
                await self.poll(record)
            await load.think()

    async def poll(self, record):
        load = self.load
        headers = {"Authorization": f"Bearer {load.token(self.name)}"}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            try:
                async with load.session.get(f"{load.url}/v1/bookings/{record.booking_id}?wait=25", headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=40)) as res:
                    text = await res.text()
                    if res.status == 200:
                        b = json.loads(text)
                        if b["status"] in FINAL:
                            record.versions[b["version"]] += 1
                            record.final = b["status"]
                            record.decided.set()
                            return
                        continue
                    if res.status == 304:
                        continue
                    if res.status in RETRYABLE_STATUS:
                        load.retries[f"poll {res.status}"] += 1
                    else:
                        load.error(f"{self.name}: GET booking {res.status} {text[:200]}")
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                load.retries[f"poll {type(e).__name__}"] += 1
            await asyncio.sleep(0.1)
        load.error(f"{self.name}: {record.booking_id} not decided within 45 s of polling")


async def run_load(load, ws_users, sse_users, poll_users, during):
    """Runs the users while `during()` (a coroutine: kills, restarts) runs, then lets every user
    finish its booking in flight. Returns what `during` returned."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        load.session = session
        p = load.prefix
        users = [WsUser(load, f"{p}ws-{i}", book_over_ws=(i % 2 == 0)) for i in range(ws_users)]
        users += [SseUser(load, f"{p}sse-{i}") for i in range(sse_users)]
        users += [PollUser(load, f"{p}poll-{i}") for i in range(poll_users)]
        load.users = users
        tasks = [asyncio.create_task(u.run()) for u in users]
        try:
            result = await during()
        finally:
            load.stopping.set()
        done, not_done = await asyncio.wait(tasks, timeout=90)
        for t in not_done:
            t.cancel()
            load.error("a user did not finish within 90 s of the end of the run")
        for t in done:
            if t.exception() is not None:
                load.error(f"a user failed: {t.exception()!r}")
        return result
