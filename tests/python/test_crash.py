"""kill -9 in the middle of things: pushbook-server on a SQLite file is killed at random moments
(some while decision handlers are running) and restarted on the same file, under concurrent HTTP
and WebSocket clients that retry with their idempotency keys and resume with `since`. Afterwards:
every ACKed booking exists and is decided, each key names one booking, capacity was never
exceeded, and every WebSocket client got its bookings' decisions, once each.

The seed is printed; PUSHBOOK_CRASH_SEED=<seed> replays the same choices (timing still varies)."""
import asyncio
import concurrent.futures
import http.client
import json
import os
import random
import re
import threading
import time

import websockets

from conftest import Server

CAPACITY = {"crash": 40, "crash2": 1000}
FINAL = {"confirmed", "rejected"}   # the bookings here never hold and are never cancelled
HTTP_CLIENTS = 4
WS_CLIENTS = 4
BOOKINGS_PER_CLIENT = 30            # at most; the chaos phase usually ends first
IO_TIMEOUT = 3                      # every socket operation
SETTLE_S = 25                       # after the last restart: clients finish their work
DECIDED_S = 15                      # then: every ACKed booking decided
TEST_S = 110                        # the whole test, hard bound


class Cluster:
    """The server of the moment: clients read `port` (None while down) and wait on `up`."""

    def __init__(self, seed, db_path, log_dir):
        self.rng = random.Random(f"{seed}-controller")
        self.db_path = db_path
        self.log_dir = log_dir
        self.port = None
        self.up = asyncio.Event()
        self.phase = "chaos"          # then "final": no more kills, no new bookings
        self.settle_deadline = None
        self.server = None
        self.incarnation = 0
        self.delayed = False
        self.kills = []               # (incarnation, bookings in flight, slow handler?, wall ms)
        self.started_at = []          # wall ms at which each incarnation listened
        self.outputs = []             # every incarnation's log lines
        self.recovered = []           # undecided bookings each start recovered

    def _start_blocking(self):
        self.delayed = self.incarnation == 0 or self.rng.random() < 0.7
        args = ["--store", f"sqlite:{self.db_path}", "--workers", "2",
                "--resource", f"crash:{CAPACITY['crash']}", "--resource", f"crash2:{CAPACITY['crash2']}"]
        if self.delayed:
            args += ["--decision-delay-ms", "200", "--decision-jitter-ms", "300"]
        server = Server(*args)
        # Keep reading what it says, or a full pipe would stop it.
        threading.Thread(target=lambda: server.output.extend(server.proc.stdout), daemon=True).start()
        return server

    async def start(self):
        self.server = await asyncio.to_thread(self._start_blocking)
        self.outputs.append(self.server.output)
        recovered = re.search(r"\((\d+) undecided bookings recovered\)", "".join(self.server.output))
        self.recovered.append(int(recovered.group(1)) if recovered else 0)
        self.port = self.server.port
        self.started_at.append(wall_ms())
        self.up.set()

    def kill(self, in_flight):
        self.up.clear()
        self.port = None
        self.server.proc.kill()
        self.server.proc.wait(10)
        self.kills.append((self.incarnation, in_flight, self.delayed, wall_ms()))
        self.incarnation += 1

    async def wait_up(self, deadline):
        try:
            await asyncio.wait_for(self.up.wait(), max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return None
        return self.port

    def dump_logs(self):
        paths = []
        for n, lines in enumerate(self.outputs):
            path = os.path.join(self.log_dir, f"server-{n}.log")
            with open(path, "w") as f:
                f.writelines(list(lines))
            paths.append(path)
        return paths

    def log_lines_naming(self, text):
        return [f"[server-{n}] {line.rstrip()}" for n, lines in enumerate(self.outputs)
                for line in list(lines) if text in line]


def wall_ms():
    return int(time.time() * 1000)


def http_request(port, method, path, token, body=None, headers=None, timeout=IO_TIMEOUT):
    """(status, headers, parsed JSON or text). Raises OSError / HTTPException on a broken connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = {"Authorization": f"Bearer {token}"} if token else {}
        h.update(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=h)
        response = conn.getresponse()
        raw = response.read().decode()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return response.status, dict(response.headers), parsed
    finally:
        conn.close()


def make_lines(rng):
    """Mostly the big resource; about a third of the bookings compete for `crash` (capacity 40)."""
    r = rng.random()
    if r < 0.3:
        return [{"resource": "crash", "quantity": rng.randint(1, 2)}]
    if r < 0.4:
        return [{"resource": "crash", "quantity": 1}, {"resource": "crash2", "quantity": rng.randint(1, 3)}]
    return [{"resource": "crash2", "quantity": rng.randint(1, 3)}]


class Booked:
    """One idempotency key of one client, and what the client saw of it."""

    def __init__(self, client, key, lines):
        self.client = client
        self.key = key
        self.lines = lines
        self.acked_ids = []       # booking id of every ACK (202 or ok reply) for this key
        self.refusals = []        # non-retryable answers
        self.events = []          # WebSocket: every event seen on booking/<id>
        self.resumes = []         # WebSocket: every resubscription (since, epoch, incarnation, wall ms)
        self.last_seq = None
        self.epoch = None
        self.request_id = None    # WebSocket: the `book` in flight on the current connection
        self.retry_at = 0.0

    @property
    def booking_id(self):
        return self.acked_ids[0] if self.acked_ids else None

    def decisions(self):
        return [e for e in self.events if e["status"] in FINAL]


class HttpClient:
    def __init__(self, name, token, seed, cluster):
        self.name, self.token, self.cluster = name, token, cluster
        self.rng = random.Random(f"{seed}-{name}")
        self.booked = []
        self.errors = 0

    async def post_until_acked(self, b, deadline):
        while time.monotonic() < deadline:
            port = await self.cluster.wait_up(deadline)
            if port is None:
                break
            try:
                status, headers, body = await asyncio.to_thread(
                    http_request, port, "POST", "/v1/bookings", self.token, {"lines": b.lines},
                    {"Idempotency-Key": b.key})
            except (OSError, http.client.HTTPException):
                self.errors += 1
                await asyncio.sleep(0.05)  # retry backoff
                continue
            if status == 202:
                b.acked_ids.append(body["booking_id"])
                return
            if status >= 500 or status == 429:
                self.errors += 1
                await asyncio.sleep(0.05)
                continue
            b.refusals.append(f"HTTP {status} {body}")
            return

    async def run(self, hard_deadline):
        for n in range(BOOKINGS_PER_CLIENT):
            if self.cluster.phase != "chaos":
                break
            b = Booked(self.name, f"{self.name}-{n}", make_lines(self.rng))
            self.booked.append(b)
            await self.post_until_acked(b, hard_deadline)
            if self.rng.random() < 0.2:  # a deliberate duplicate
                await self.post_until_acked(b, hard_deadline)
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))  # pacing, part of the randomness


class WsClient:
    """Books over WebSocket and follows its bookings; reconnects, re-books what was not ACKed and
    resumes every booking topic with `since` (and `epoch` when the server sent one)."""

    def __init__(self, name, token, seed, cluster, resources=()):
        self.name, self.token, self.cluster = name, token, cluster
        self.rng = random.Random(f"{seed}-{name}")
        self.resources = resources            # an observer: resource topics to follow
        self.booked = []
        self.by_id = {}
        self.topics = {}                      # resource topic -> {"seq", "epoch"}
        self.resource_events = []
        self.stray = []                       # messages that make no sense to this client
        self.connections = 0
        self.disconnects = 0
        self.next_request = 0
        self.requests = {}
        self.next_book_at = 0.0
        self.stop = False                     # observers: set when the others are done

    def finished(self):
        if self.resources:
            return self.stop
        return self.cluster.phase == "final" and all(b.booking_id and b.decisions() for b in self.booked)

    async def send(self, ws, message):
        self.next_request += 1
        message["id"] = self.next_request
        await asyncio.wait_for(ws.send(json.dumps(message)), IO_TIMEOUT)
        return self.next_request

    async def send_book(self, ws, b):
        b.request_id = await self.send(ws, {"op": "book", "lines": b.lines, "idempotency_key": b.key})
        self.requests[b.request_id] = ("book", b)

    async def subscribe(self, ws, topic, seq, epoch):
        message = {"op": "subscribe", "topic": topic}
        if seq is not None:
            message["since"] = seq
        if epoch is not None:
            message["epoch"] = epoch
        self.requests[await self.send(ws, message)] = ("subscribe", topic)

    async def resume(self, ws):
        self.requests.clear()
        for b in self.booked:
            b.request_id = None
            if b.booking_id:
                b.resumes.append((b.last_seq, b.epoch, self.cluster.incarnation, wall_ms()))
                await self.subscribe(ws, "booking/" + b.booking_id, b.last_seq, b.epoch)
        for topic in self.resources:
            seen = self.topics.get(topic, {})
            await self.subscribe(ws, topic, seen.get("seq"), seen.get("epoch"))

    async def on_message(self, ws, m):
        kind = m.get("type")
        if kind == "reply":
            what, target = self.requests.pop(m.get("id"), (None, None))
            if what == "book":
                target.request_id = None
                if m.get("ok"):
                    booking_id = m["result"]["booking_id"]
                    target.acked_ids.append(booking_id)
                    self.by_id.setdefault(booking_id, target)
                    # A new booking's reply is its first state (the server does not send it again):
                    # resume from its seq. A replayed one's state comes as an event after it.
                    if target.last_seq is None and not m["result"].get("replayed"):
                        target.last_seq = m["result"].get("seq")
                    self.next_book_at = time.monotonic() + self.rng.uniform(0.2, 1.0)
                elif m["error"]["code"] in ("overloaded", "internal", "rate_limited"):
                    target.retry_at = time.monotonic() + 0.1
                else:
                    target.refusals.append(f"reply {m['error']}")
            elif not m.get("ok"):
                self.stray.append(("refused", what, target, m))
        elif kind == "event":
            topic = m["topic"]
            if topic.startswith("booking/"):
                b = self.by_id.get(topic[len("booking/"):])
                if b is None:
                    self.stray.append(("event before its ack", m))
                    return
                b.events.append({"seq": m["seq"], "epoch": m.get("epoch"), "snapshot": m.get("snapshot", False),
                                 "status": m["data"]["status"], "version": m["data"].get("version"),
                                 "incarnation": self.cluster.incarnation, "connection": self.connections,
                                 "at": wall_ms()})
                b.last_seq, b.epoch = m["seq"], m.get("epoch")
            else:
                self.resource_events.append(dict(m["data"], seq=m["seq"], incarnation=self.cluster.incarnation))
                self.topics[topic] = {"seq": m["seq"], "epoch": m.get("epoch")}
        elif kind == "gap":
            for topic in m["topics"]:
                b = self.by_id.get(topic[len("booking/"):]) if topic.startswith("booking/") else None
                seen = {"seq": b.last_seq, "epoch": b.epoch} if b else self.topics.get(topic, {})
                await self.subscribe(ws, topic, seen.get("seq"), seen.get("epoch"))
        elif kind == "notice" and m.get("code") == "subscription_ended":
            self.stray.append(("subscription ended", m))

    async def session(self, ws, hard_deadline):
        pending = []  # a frame holds one or more messages, one per line
        await self.resume(ws)
        while not self.finished() and time.monotonic() < hard_deadline:
            if self.cluster.phase == "final" and time.monotonic() > self.cluster.settle_deadline:
                return
            now = time.monotonic()
            unacked = [b for b in self.booked if not b.booking_id and not b.refusals]
            for b in unacked:
                if b.request_id is None and b.retry_at <= now:
                    await self.send_book(ws, b)
            if (not self.resources and not unacked and self.cluster.phase == "chaos"
                    and len(self.booked) < BOOKINGS_PER_CLIENT and now >= self.next_book_at):
                b = Booked(self.name, f"{self.name}-{len(self.booked)}", make_lines(self.rng))
                self.booked.append(b)
                await self.send_book(ws, b)
            try:
                frame = await asyncio.wait_for(ws.recv(), 0.25)
            except asyncio.TimeoutError:
                continue
            pending.extend(json.loads(line) for line in frame.split("\n") if line)
            while pending:
                await self.on_message(ws, pending.pop(0))

    async def run(self, hard_deadline):
        while not self.finished() and time.monotonic() < hard_deadline:
            deadline = self.cluster.settle_deadline if self.cluster.phase == "final" else hard_deadline
            if time.monotonic() > deadline:
                return
            port = await self.cluster.wait_up(deadline)
            if port is None:
                continue
            try:
                async with websockets.connect(
                        f"ws://127.0.0.1:{port}/v1/ws", extra_headers={"Authorization": "Bearer " + self.token},
                        open_timeout=IO_TIMEOUT, close_timeout=1, ping_interval=None) as ws:
                    self.connections += 1
                    await self.session(ws, hard_deadline)
            except (OSError, asyncio.TimeoutError, websockets.WebSocketException):
                self.disconnects += 1
                await asyncio.sleep(0.05)  # reconnect backoff


async def in_flight(port):
    try:
        status, _, text = await asyncio.to_thread(http_request, port, "GET", "/metrics", None, timeout=1)
    except (OSError, http.client.HTTPException):
        return None
    for line in str(text).splitlines():
        if line.startswith("pushbook_bookings_in_flight "):
            return int(float(line.split()[1]))
    return None


async def chaos(cluster, kills):
    for _ in range(kills):
        await asyncio.sleep(cluster.rng.uniform(1.5, 5.0))  # the random moment
        n = await in_flight(cluster.port)
        if cluster.delayed:  # aim at handlers in flight, for a bounded while
            aim_deadline = time.monotonic() + 1.5
            while not n and time.monotonic() < aim_deadline:
                await asyncio.sleep(0.05)
                n = await in_flight(cluster.port)
        cluster.kill(n)
        await cluster.start()


def decided_in(cluster, updated_at):
    """Which incarnation a wall-clock time falls in, for the reader of a failure."""
    if updated_at is None:
        return "?"
    n = sum(1 for t in cluster.started_at if t <= updated_at) - 1
    return f"in incarnation {n}, {updated_at - cluster.started_at[n]} ms after it listened"


def owner_tokens(clients):
    return {c.name: c.token for c in clients}


def check(cluster, http_clients, ws_clients, observer, failures, summary):
    """The four properties; appends readable failures. Runs blocking HTTP against the last server."""
    port = cluster.port
    tokens = owner_tokens(http_clients + ws_clients)
    booked = [b for c in http_clients + ws_clients for b in c.booked]

    # 2. One booking per key: all ACKs agree, and one more retry names the same booking.
    for b in booked:
        if b.refusals:
            failures.append(f"key {b.key}: refused: {b.refusals}")
        if not b.acked_ids:
            failures.append(f"key {b.key}: never ACKed (events: {b.events})")
            continue
        if len(set(b.acked_ids)) != 1:
            failures.append(f"key {b.key}: ACKs named different bookings {b.acked_ids}")
        status, headers, body = http_request(port, "POST", "/v1/bookings", tokens[b.client], {"lines": b.lines},
                                             {"Idempotency-Key": b.key})
        if status != 202 or body.get("booking_id") != b.booking_id:
            failures.append(f"key {b.key}: final retry answered {status} {body}, ACKed as {b.booking_id}")

    # 1. Every ACKed booking exists and gets decided.
    final = {}
    deadline = time.monotonic() + DECIDED_S
    for b in booked:
        for booking_id in set(b.acked_ids):
            path = f"/v1/bookings/{booking_id}"
            status, _, body = http_request(port, "GET", path, tokens[b.client])
            while status == 200 and body["status"] == "processing" and time.monotonic() < deadline:
                wait = max(1, min(5, int(deadline - time.monotonic())))
                status, _, body = http_request(port, "GET", f"{path}?wait={wait}", tokens[b.client],
                                               timeout=wait + IO_TIMEOUT)
            if status == 304:
                status, _, body = http_request(port, "GET", path, tokens[b.client])
            if status != 200:
                failures.append(f"booking {booking_id} (key {b.key}) ACKed but GET answers {status} {body}")
            elif body["status"] not in FINAL:
                failures.append(f"booking {booking_id} (key {b.key}) still {body['status']} after {DECIDED_S} s")
            else:
                final[booking_id] = body

    # 3. Capacity: on every resource event the observer saw, and at the end.
    for e in observer.resource_events:
        cap = CAPACITY.get(e["resource"])
        if (e["capacity"] != cap or e["confirmed"] + e["reserved"] > cap or e["available"] < 0
                or e["available"] + e["confirmed"] + e["reserved"] != cap):
            failures.append(f"resource event over capacity or inconsistent: {e}")
    # The store shows a decision before the engine's memory applies it (completer thread): wait
    # until nothing is in flight before comparing the engine's counts with the stored decisions.
    settle = time.monotonic() + DECIDED_S
    while time.monotonic() < settle:
        _, _, text = http_request(port, "GET", "/metrics", None)
        if re.search(r"^pushbook_bookings_in_flight 0$", str(text), re.M):
            break
        time.sleep(0.05)
    status, _, body = http_request(port, "GET", "/v1/resources", None)
    resources = {r["resource"]: r for r in body["resources"]}
    summary["resources"] = {r: resources.get(r) for r in CAPACITY}
    summary["outcomes"] = {s: sum(1 for b in final.values() if b["status"] == s) for s in sorted(FINAL)}
    for resource, cap in CAPACITY.items():
        confirmed_units = sum(line["quantity"] for booking in final.values() if booking["status"] == "confirmed"
                              for line in booking["lines"] if line["resource"] == resource)
        r = resources.get(resource)
        expected = {"resource": resource, "capacity": cap, "available": cap - confirmed_units, "reserved": 0,
                    "confirmed": confirmed_units}
        if r != expected:
            failures.append(f"resource {resource} at the end is {r}; the bookings say {expected}")
        if confirmed_units > cap:
            failures.append(f"resource {resource}: {confirmed_units} units confirmed, capacity {cap}")

    # 4. Every WebSocket client got each of its bookings' decision, and only one.
    for c in ws_clients:
        for b in c.booked:
            if not b.booking_id:
                continue
            decisions = {(e["status"], e["version"]) for e in b.decisions()}
            where = f"client {c.name} booking {b.booking_id} (key {b.key})"
            if not decisions:
                server_view = final.get(b.booking_id, {})
                failures.append(f"{where}: no decision received; saw {b.events}; resubscribed with "
                                f"(since, epoch, incarnation, at) {b.resumes}; the server says "
                                f"{server_view.get('status')} version {server_view.get('version')} "
                                f"(updated_at {server_view.get('updated_at')}, "
                                f"{decided_in(cluster, server_view.get('updated_at'))})")
            elif len(decisions) > 1:
                failures.append(f"{where}: contradicting decisions {sorted(decisions)}; saw {b.events}")
            elif b.booking_id in final and next(iter(decisions))[0] != final[b.booking_id]["status"]:
                failures.append(f"{where}: decided {decisions} on the socket, {final[b.booking_id]['status']} "
                                f"on GET")
        for s in c.stray:
            failures.append(f"client {c.name}: {s}")


def test_kill_9_loses_no_acked_booking_and_no_decision(tmp_path):
    seed = int(os.environ.get("PUSHBOOK_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"test_crash seed {seed}")
    started = time.monotonic()
    result = {}

    async def main():
        # Blocking HTTP runs in threads: enough of them that a hung request delays no one else.
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(32))
        cluster = Cluster(seed, str(tmp_path / "crash.db"), str(tmp_path))
        result["cluster"] = cluster
        await cluster.start()
        tokens = {name: cluster.server.token(name) for name in
                  [f"http{i}" for i in range(HTTP_CLIENTS)] + [f"ws{i}" for i in range(WS_CLIENTS)] + ["observer"]}
        http_clients = [HttpClient(f"http{i}", tokens[f"http{i}"], seed, cluster) for i in range(HTTP_CLIENTS)]
        ws_clients = [WsClient(f"ws{i}", tokens[f"ws{i}"], seed, cluster) for i in range(WS_CLIENTS)]
        observer = WsClient("observer", tokens["observer"], seed, cluster,
                            resources=("resource/crash", "resource/crash2"))
        result.update(http=http_clients, ws=ws_clients, observer=observer)
        hard_deadline = time.monotonic() + TEST_S - 20
        observing = asyncio.create_task(observer.run(hard_deadline))
        clients = [asyncio.create_task(c.run(hard_deadline)) for c in http_clients + ws_clients]

        await chaos(cluster, cluster.rng.randint(5, 7))
        cluster.phase = "final"
        cluster.settle_deadline = time.monotonic() + SETTLE_S
        await asyncio.wait_for(asyncio.gather(*clients), SETTLE_S + IO_TIMEOUT + 5)
        observer.stop = True
        await asyncio.wait_for(observing, IO_TIMEOUT + 5)

        failures, summary = [], {}
        await asyncio.to_thread(check, cluster, http_clients, ws_clients, observer, failures, summary)
        result.update(failures=failures, summary=summary)

    try:
        asyncio.run(asyncio.wait_for(main(), TEST_S))
    finally:
        cluster = result.get("cluster")
        if cluster and cluster.server:
            cluster.server.stop()
    elapsed = time.monotonic() - started
    booked = [b for c in result["http"] + result["ws"] for b in c.booked]
    logs = cluster.dump_logs()
    print(f"test_crash: {len(cluster.kills)} kills (incarnation, in flight, slow handler, at): {cluster.kills}; "
          f"recovered at each start: {cluster.recovered}; {len(booked)} keys; "
          f"{sum(c.disconnects for c in result['ws'])} WebSocket disconnects; "
          f"{len(result['observer'].resource_events)} resource events; {result['summary']}; {elapsed:.1f} s; "
          f"logs {logs[0]} ...")

    assert len(cluster.kills) >= 5
    assert any(kill[1] for kill in cluster.kills), f"no kill landed with bookings in flight: {cluster.kills}"
    failures = result["failures"]
    if failures:
        evidence = []
        for f in failures[:5]:
            for word in f.split():
                if len(word) == 26 and word.isalnum():  # a booking id: what the servers said about it
                    evidence += cluster.log_lines_naming(word)[:5]
                    break
        assert not failures, (f"seed {seed}: {len(failures)} failures:\n" + "\n".join(failures[:40])
                              + "\nserver log lines naming them:\n" + ("\n".join(evidence[:20]) or "(none)")
                              + f"\nincarnations listened at (wall ms) {cluster.started_at}")
