// Unit tests of web/pushbook.js without a browser or a server: the pure helpers (backoff, seq
// bookkeeping) and the client's reconnect/resume logic over a scripted fake WebSocket,
// EventSource and fetch.
import { afterEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { PushbookClient, SeqTracker, backoffDelay, randomKey } from '../../web/pushbook.js';

// Polls `condition` until it holds; fails after `timeoutMs`.
async function until(condition, what, timeoutMs = 2000) {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

// A WebSocket the test plays the server of. `FakeSocket.all` holds every one made.
class FakeSocket {
  static all = [];
  static refuse = false;  // new sockets fail before opening
  constructor(url, protocols) {
    Object.assign(this, { url, protocols, sent: [], closed: false });
    FakeSocket.all.push(this);
    if (FakeSocket.refuse) setTimeout(() => this.onclose?.({ code: 1006, reason: '' }), 0);
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close() { this.closed = true; }
  // server side
  open() { this.onopen?.({}); }
  push(...messages) { this.onmessage?.({ data: messages.map((m) => JSON.stringify(m)).join('\n') }); }
  drop(code = 1006) { this.onclose?.({ code, reason: '' }); }
  requests(op) { return this.sent.filter((m) => m.op === op); }
  reply(request, result) { this.push({ type: 'reply', id: request.id, ok: true, result }); }
}

const event = (topic, seq, data = {}, snapshot = false) =>
  ({ type: 'event', topic, seq, ts: 0, ...(snapshot ? { snapshot } : {}), data });

const clients = [];
afterEach(() => { for (const client of clients.splice(0)) client.close(); });  // even after a failure

// A fetch that answers only GET /v1/whoami (the token check after a failed upgrade): 200.
const whoamiOk = async (url) => {
  if (!String(url).endsWith('/v1/whoami')) throw new Error(`no fetch of ${url} in this test`);
  return { ok: true, status: 200, json: async () => ({ user: 'u' }) };
};

function makeClient(options = {}) {
  FakeSocket.all = [];
  FakeSocket.refuse = false;
  let tokens = 0;
  const client = new PushbookClient({
    url: 'http://gateway.test', token: async () => `t${++tokens}`, WebSocket: FakeSocket,
    EventSource: null, fetch: whoamiOk, random: () => 0, ...options,
  });
  clients.push(client);
  const log = [];
  for (const type of ['open', 'close', 'reconnecting'])
    client.on(type, (detail) => log.push({ type, ...detail }));
  return { client, log, socket: (i) => FakeSocket.all[i] };
}

// makeClient(), connected over its first socket.
async function connectedClient(options = {}) {
  const made = makeClient(options);
  const connected = made.client.connect();
  await until(() => made.socket(0), 'a socket');
  made.socket(0).open();
  await connected;
  return made;
}

test('backoffDelay: full jitter between 0 and min(max, initial * 2^attempt)', () => {
  const backoff = { initialMs: 100, maxMs: 1000 };
  assert.equal(backoffDelay(0, backoff, () => 0), 0);
  assert.equal(backoffDelay(0, backoff, () => 0.5), 50);
  assert.equal(backoffDelay(1, backoff, () => 0.5), 100);
  assert.equal(backoffDelay(3, backoff, () => 0.5), 400);
  assert.equal(backoffDelay(4, backoff, () => 0.5), 500);  // 1600 capped at 1000
  assert.equal(backoffDelay(60, backoff, () => 0.999), 999);
  assert.equal(backoffDelay(2000, backoff, () => 0.5), 500);  // 2^2000 is Infinity: still capped
  for (let attempt = 0; attempt < 12; ++attempt) {
    const delay = backoffDelay(attempt, backoff);
    assert.ok(delay >= 0 && delay < Math.min(1000, 100 * 2 ** attempt), `attempt ${attempt}: ${delay}`);
  }
  assert.equal(backoffDelay(2, undefined, () => 0.5), 500);  // defaults: 250 ms, 10 s
});

test('SeqTracker: delivers each seq once, in order; snapshots replace; gaps are flagged', () => {
  const seqs = new SeqTracker();
  const verdicts = (topic, list) => list.map(([seq, snapshot]) => seqs.classify({ topic, seq, snapshot }));
  assert.deepEqual(verdicts('a', [[3, true], [4], [4], [3], [5], [7], [6]]),
    ['deliver', 'deliver', 'duplicate', 'duplicate', 'deliver', 'gap', 'deliver']);
  assert.equal(seqs.last('a'), 6);
  assert.deepEqual(verdicts('a', [[6, true], [9, true], [10]]), ['duplicate', 'deliver', 'deliver']);
  assert.deepEqual(verdicts('a', [[2, true], [3]]), ['deliver', 'deliver']);  // sequence restarted
  seqs.seed('b', 5);
  seqs.seed('b', 1);  // no effect: b has a position
  assert.deepEqual(verdicts('b', [[5], [6], [8]]), ['duplicate', 'deliver', 'gap']);
  seqs.forget('b');
  assert.equal(seqs.last('b'), undefined);
  // Epochs: a snapshot of another numbering replaces state whatever its seq; a plain event of
  // another numbering is a gap (resubscribe: the server answers with a snapshot).
  assert.deepEqual(verdicts('c', [[4, true]]), ['deliver']);
  const withEpoch = (list) => list.map(([seq, epoch, snapshot]) => seqs.classify({ topic: 'e', seq, epoch, snapshot }));
  assert.deepEqual(withEpoch([[3, 'aaaaaaaa', true], [4, 'aaaaaaaa'], [1, 'bbbbbbbb'], [4, 'bbbbbbbb', true],
    [5, 'bbbbbbbb'], [5, 'bbbbbbbb']]), ['deliver', 'deliver', 'gap', 'deliver', 'deliver', 'duplicate']);
  assert.equal(seqs.epoch('e'), 'bbbbbbbb');
  seqs.seed('f', 7, 'cccccccc');
  assert.equal(seqs.epoch('f'), 'cccccccc');
  assert.match(randomKey(), /^[0-9a-f]{32}$/);
  assert.notEqual(randomKey(), randomKey());
});

test('resume after a drop: resubscribe with since, no event lost or doubled', async () => {
  const { client, log, socket } = makeClient();
  const connected = client.connect();
  await until(() => socket(0), 'a socket');
  assert.equal(socket(0).url, 'ws://gateway.test/v1/ws');
  assert.deepEqual(socket(0).protocols, ['pushbook.v1', 'bearer.t1']);
  socket(0).open();
  await connected;

  const seen = [];
  const sub = client.subscribe('resource/a', { onEvent: (ev) => seen.push(ev.seq) });
  const [subscribe] = socket(0).requests('subscribe');
  assert.deepEqual(subscribe, { id: subscribe.id, op: 'subscribe', topic: 'resource/a' });
  socket(0).reply(subscribe, { topic: 'resource/a' });
  socket(0).push(event('resource/a', 3, {}, true), event('resource/a', 4));
  socket(0).drop();

  await until(() => socket(1), 'a second socket');
  assert.deepEqual(socket(1).protocols, ['pushbook.v1', 'bearer.t2']);  // the token is fetched again
  socket(1).open();
  await until(() => socket(1).requests('subscribe').length, 'the resubscribe');
  const [again] = socket(1).requests('subscribe');
  assert.equal(again.since, 4);
  socket(1).reply(again, { topic: 'resource/a' });
  const a = (seq) => event('resource/a', seq);
  socket(1).push(a(4), a(5), a(5), a(6));
  assert.deepEqual(seen, [3, 4, 5, 6]);
  assert.deepEqual(log.map((e) => e.type), ['open', 'close', 'reconnecting', 'open']);
  assert.deepEqual(log[2], { type: 'reconnecting', attempt: 1, delayMs: 0, transport: 'websocket' });

  sub.unsubscribe();
  assert.deepEqual(socket(1).requests('unsubscribe').map((m) => m.topic), ['resource/a']);
  socket(1).push(event('resource/a', 7));  // in flight before the unsubscribe: ignored
  assert.deepEqual(seen, [3, 4, 5, 6]);
  client.close();
});

test('a book in flight is sent again with its idempotency key; cancel is rejected', async () => {
  const { client, socket } = await connectedClient();

  const seen = [];
  const onEvent = (ev) => seen.push(ev.data.status);
  const booking = client.book({ resource: 'room-101', metadata: { seat: 4 }, onEvent });
  const cancel = client.cancel('B0');
  const [first] = socket(0).requests('book');
  assert.equal(first.resource, 'room-101');
  assert.equal(first.quantity, 1);
  assert.deepEqual(first.metadata, { seat: 4 });
  assert.match(first.idempotency_key, /^[0-9a-f]{32}$/);
  socket(0).drop();
  await assert.rejects(cancel, { code: 'disconnected' });

  await until(() => socket(1), 'a second socket');
  socket(1).open();
  await until(() => socket(1).requests('book').length, 'the book sent again');
  const [second] = socket(1).requests('book');
  assert.equal(second.idempotency_key, first.idempotency_key);
  // The reply and the booking's first event come in one frame.
  const replayed = { booking_id: 'B1', status: 'processing', replayed: true };
  socket(1).push({ type: 'reply', id: second.id, ok: true, result: replayed },
    event('booking/B1', 1, { status: 'processing' }, true));
  const result = await booking;
  assert.equal(result.booking_id, 'B1');
  assert.equal(result.replayed, true);
  assert.equal(result.subscription.topic, 'booking/B1');
  assert.equal(socket(1).requests('subscribe').length, 0);  // book subscribed on the server's side

  // A later subscriber gets the latest event at once; the book's onEvent and iterator go on.
  const late = [];
  client.subscribe('booking/B1', { onEvent: (ev) => late.push(ev.data.status) });
  const iterator = result.subscription[Symbol.asyncIterator]();
  socket(1).drop();
  await until(() => socket(2), 'a third socket');
  socket(2).open();
  await until(() => socket(2).requests('subscribe').length, 'the resubscribe');
  assert.equal(socket(2).requests('subscribe')[0].since, 1);
  socket(2).push(event('booking/B1', 2, { status: 'confirmed' }));
  assert.deepEqual(seen, ['processing', 'confirmed']);
  assert.deepEqual(late, ['processing', 'confirmed']);
  assert.deepEqual((await iterator.next()).value.data, { status: 'confirmed' });
  client.close();
  assert.equal((await iterator.next()).done, true);
});

test('book over WebSocket: the reply is the first event; a reconnect before the decision resumes from its seq',
  async () => {
    const { client, socket } = await connectedClient();

    const seen = [];
    const logged = [];
    client.on('event', (ev) => logged.push([ev.topic, ev.seq]));
    const booking = client.book({ resource: 'room-101', quantity: 2, metadata: { seat: 4 },
      onEvent: (ev) => seen.push(ev) });
    const [request] = socket(0).requests('book');
    // The server sends no processing event after this reply: it follows the topic from seq 1.
    socket(0).reply(request, { booking_id: 'B3', status: 'processing', seq: 1 });
    const result = await booking;
    assert.equal(result.seq, 1);
    assert.equal(seen.length, 1);
    const { ts, ...first } = seen[0];
    assert.equal(typeof ts, 'number');
    assert.deepEqual(first, { type: 'event', topic: 'booking/B3', seq: 1, ack: true, data: {
      booking_id: 'B3', status: 'processing', version: 1, lines: [{ resource: 'room-101', quantity: 2 }],
      metadata: { seat: 4 } } });
    assert.deepEqual(logged, [['booking/B3', 1]]);  // the 'event' listeners see it too
    assert.equal(socket(0).requests('subscribe').length, 0);

    // Cut after the reply, before the decision: the resubscribe resumes from the reply's seq (no
    // epoch: the server's numbering of a booking is its version), and the decision comes once.
    socket(0).drop();
    await until(() => socket(1), 'a second socket');
    socket(1).open();
    await until(() => socket(1).requests('subscribe').length, 'the resubscribe');
    const [resume] = socket(1).requests('subscribe');
    assert.deepEqual(resume, { id: resume.id, op: 'subscribe', topic: 'booking/B3', since: 1 });
    socket(1).reply(resume, { topic: 'booking/B3' });
    const confirmed = { ...event('booking/B3', 2, { status: 'confirmed' }), epoch: '0000abcd' };
    socket(1).push(confirmed, confirmed);
    assert.deepEqual(seen.map((ev) => [ev.seq, ev.data.status]), [[1, 'processing'], [2, 'confirmed']]);

    // A server that sends no seq (before this protocol addition): its events come as they are.
    const older = [];
    const again = client.book({ resource: 'room-101', onEvent: (ev) => older.push(ev.data.status) });
    const [second] = socket(1).requests('book');
    socket(1).push({ type: 'reply', id: second.id, ok: true, result: { booking_id: 'B4', status: 'processing' } },
      event('booking/B4', 1, { status: 'processing' }, true));
    await again;
    assert.deepEqual(older, ['processing']);
    client.close();
  });

test("book with follow: 'decision': the subscription ends at the decision, without an unsubscribe",
  async () => {
    const { client, socket } = await connectedClient();

    await assert.rejects(client.book({ resource: 'room-101', follow: 'first' }), TypeError);
    assert.equal(socket(0).requests('book').length, 0);

    // Alone: the server ends its side after the decision, so the client sends nothing.
    const seen = [];
    const booking = client.book({ resource: 'room-101', follow: 'decision', onEvent: (ev) => seen.push(ev) });
    const [request] = socket(0).requests('book');
    assert.equal(request.follow, 'decision');
    socket(0).reply(request, { booking_id: 'B5', status: 'processing', seq: 1 });
    const { subscription } = await booking;
    socket(0).push(event('booking/B5', 2, { status: 'confirmed' }), event('booking/B5', 3, { status: 'cancelled' }));
    assert.deepEqual(seen.map((ev) => [ev.seq, ev.data.status]), [[1, 'processing'], [2, 'confirmed']]);
    assert.deepEqual(await subscription.next(), { value: undefined, done: true });
    assert.equal(socket(0).requests('unsubscribe').length, 0);

    // With another subscription of the topic: it goes on, with a subscribe of its own from the
    // decision (the server's book subscription ends there).
    const again = client.book({ resource: 'room-101', follow: 'decision' });
    const [, second] = socket(0).requests('book');
    socket(0).reply(second, { booking_id: 'B6', status: 'processing', seq: 1 });
    const mine = (await again).subscription;
    const watcher = [];
    client.subscribe('booking/B6', { onEvent: (ev) => watcher.push(ev.data.status) });
    assert.equal(socket(0).requests('subscribe').length, 0);  // joined the followed topic
    socket(0).push(event('booking/B6', 2, { status: 'confirmed' }));
    assert.equal((await mine.next()).value.data.status, 'processing');  // made from the reply
    assert.deepEqual(await mine.next(), { value: event('booking/B6', 2, { status: 'confirmed' }), done: false });
    assert.deepEqual(await mine.next(), { value: undefined, done: true });
    const [resume] = socket(0).requests('subscribe');
    assert.deepEqual(resume, { id: resume.id, op: 'subscribe', topic: 'booking/B6', since: 2 });
    socket(0).reply(resume, { topic: 'booking/B6' });
    socket(0).push(event('booking/B6', 3, { status: 'cancelled' }));
    assert.deepEqual(watcher, ['processing', 'confirmed', 'cancelled']);

    // Cut before the decision: the resubscribe follows everything, so after the decision the
    // client unsubscribes itself.
    const third = client.book({ resource: 'room-101', follow: 'decision' });
    const [, , request3] = socket(0).requests('book');
    socket(0).reply(request3, { booking_id: 'B7', status: 'processing', seq: 1 });
    const cut = (await third).subscription;
    socket(0).drop();
    await until(() => socket(1), 'a second socket');
    socket(1).open();
    await until(() => socket(1).requests('subscribe').some((m) => m.topic === 'booking/B7'), 'the resubscribe');
    const again7 = socket(1).requests('subscribe').find((m) => m.topic === 'booking/B7');
    assert.equal(again7.since, 1);
    socket(1).reply(again7, { topic: 'booking/B7' });
    socket(1).push(event('booking/B7', 2, { status: 'rejected' }));
    assert.equal((await cut.next()).value.data.status, 'processing');
    assert.deepEqual(await cut.next(), { value: event('booking/B7', 2, { status: 'rejected' }), done: false });
    assert.deepEqual(await cut.next(), { value: undefined, done: true });
    assert.deepEqual(socket(1).requests('unsubscribe').map((m) => m.topic), ['booking/B7']);
    client.close();
  });

test('gap markers and skipped seqs make the client resubscribe from the last seq', async () => {
  const { client, socket } = makeClient();
  const sub = client.subscribe('resource/a', { since: 10 });
  client.connect();
  await until(() => socket(0), 'a socket');
  socket(0).open();
  const [subscribe] = socket(0).requests('subscribe');
  assert.equal(subscribe.since, 10);
  socket(0).reply(subscribe, { topic: 'resource/a' });
  const gap = { type: 'gap', dropped: 3, topics: ['resource/a'] };
  socket(0).push(event('resource/a', 10), event('resource/a', 11), gap);
  const [, resync] = socket(0).requests('subscribe');
  assert.equal(resync.since, 11);
  socket(0).reply(resync, { topic: 'resource/a' });
  socket(0).push(event('resource/a', 12), event('resource/a', 14));  // 13 is missing
  const [, , again] = socket(0).requests('subscribe');
  assert.equal(again.since, 12);
  socket(0).push(event('resource/a', 15));  // still out of order: dropped, no second resubscribe
  assert.equal(socket(0).requests('subscribe').length, 3);
  socket(0).reply(again, { topic: 'resource/a' });
  socket(0).push(event('resource/a', 13), event('resource/a', 14), event('resource/a', 15));
  const seqs = [];
  for await (const ev of sub) {
    seqs.push(ev.seq);
    if (ev.seq === 15) break;  // leaving the loop unsubscribes
  }
  assert.deepEqual(seqs, [11, 12, 13, 14, 15]);
  assert.deepEqual(socket(0).requests('unsubscribe').map((m) => m.topic), ['resource/a']);

  // A refused subscription ends with the server's error.
  const refused = client.subscribe('user/bob');
  const [, , , forbidden] = socket(0).requests('subscribe');
  socket(0).push({ type: 'reply', id: forbidden.id, ok: false, error: { code: 'forbidden', message: 'no' } });
  await assert.rejects(refused.next(), { code: 'forbidden' });
  client.close();
});

test('auto transport falls back to SSE and REST after repeated WebSocket failures', async () => {
  const streams = [];
  class FakeEventSource {
    constructor(url) { Object.assign(this, { url: new URL(url), closed: false }); streams.push(this); }
    close() { this.closed = true; }
  }
  const posts = [];
  const whoami = [];
  const fetch = async (url, init) => {
    if (String(url).endsWith('/v1/whoami')) {  // after each failed upgrade: the token is good
      whoami.push(init.headers.authorization);
      return { ok: true, status: 200, json: async () => ({ user: 'u' }) };
    }
    posts.push({ url, ...init });
    return { ok: true, status: 202, json: async () => ({ booking_id: 'B7', status: 'processing' }) };
  };
  const { client, log } = makeClient({ EventSource: FakeEventSource, fetch });
  FakeSocket.refuse = true;
  const seen = [];
  client.subscribe('resource/a', { onEvent: (ev) => seen.push(ev.seq) });
  const connected = client.connect();
  await until(() => streams.length, 'an event stream');
  assert.equal(FakeSocket.all.length, 3);
  assert.deepEqual(whoami, ['Bearer t1', 'Bearer t2', 'Bearer t3']);
  assert.equal(client.transport, 'sse');
  assert.equal(streams[0].url.pathname, '/v1/events');
  assert.equal(streams[0].url.searchParams.get('topic'), 'resource/a');
  assert.equal(streams[0].url.searchParams.get('access_token'), 't4');
  assert.equal(streams[0].url.searchParams.get('since'), null);
  streams[0].onopen();
  await connected;
  assert.deepEqual(log.at(-1), { type: 'open', transport: 'sse' });
  streams[0].onmessage({ data: JSON.stringify(event('resource/a', 1, {}, true)) });

  const booked = await client.book({ resource: 'room-101', idempotencyKey: 'k-1' });
  assert.equal(booked.booking_id, 'B7');
  assert.equal(posts[0].url, 'http://gateway.test/v1/bookings');
  assert.equal(posts[0].method, 'POST');
  assert.equal(posts[0].headers.authorization, 'Bearer t4');
  assert.equal(posts[0].headers['idempotency-key'], 'k-1');
  assert.deepEqual(JSON.parse(posts[0].body), { idempotency_key: 'k-1', resource: 'room-101', quantity: 1 });
  assert.equal(streams[1].url.searchParams.get('topic'), 'booking/B7');

  // A failed stream reconnects every stream from its last seq.
  streams[0].onerror();
  await until(() => streams.length === 4, 'the streams reopened');
  assert.equal(streams[2].url.searchParams.get('since'), '1');
  assert.equal(streams[3].url.searchParams.get('since'), null);
  assert.equal(streams[2].url.searchParams.get('access_token'), 't5');
  streams[2].onmessage({ data: JSON.stringify(event('resource/a', 1)) });
  streams[2].onmessage({ data: JSON.stringify(event('resource/a', 2)) });
  assert.deepEqual(seen, [1, 2]);
  client.close();
  assert.ok(streams.every((s) => s.closed));
});

test('close() stops reconnecting and rejects pending requests', async () => {
  const { client, log, socket } = makeClient();
  client.connect().catch(() => {});
  await until(() => socket(0), 'a socket');
  const booking = client.book({ resource: 'room-101' });
  client.close();
  await assert.rejects(booking, { code: 'closed' });
  await assert.rejects(client.connect(), { code: 'closed' });
  socket(0).drop();
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(FakeSocket.all.length, 1);
  assert.deepEqual(log.map((e) => e.type), ['close']);
  assert.equal(client.state, 'closed');
});

test('a refused token: whoami says 401, the client says so and asks its token function anew', async () => {
  const asked = [];
  const answers = [];
  const fetch = async (url, init) => {
    answers.push(init.headers.authorization);
    const refused = init.headers.authorization === 'Bearer old';
    return { ok: !refused, status: refused ? 401 : 200,
             json: async () => (refused ? { error: { code: 'unauthorized', message: 'bad signature' } } : {}) };
  };
  const token = async ({ refused }) => { asked.push(refused); return refused ? 'new' : 'old'; };
  const { client, socket } = makeClient({ token, fetch });
  const unauthorized = [];
  client.on('unauthorized', (detail) => unauthorized.push(detail));
  const connected = client.connect();
  await until(() => socket(0), 'the first socket');
  assert.deepEqual(socket(0).protocols, ['pushbook.v1', 'bearer.old']);
  socket(0).drop();  // the upgrade is refused: the browser only sees a close
  await until(() => socket(1), 'a second socket');
  assert.deepEqual(answers, ['Bearer old']);
  assert.deepEqual(unauthorized, [{ message: 'bad signature', willReconnect: true }]);
  assert.deepEqual(asked, [false, true]);
  assert.deepEqual(socket(1).protocols, ['pushbook.v1', 'bearer.new']);
  socket(1).open();
  await connected;
});

test('a fixed token the server refuses closes the client instead of retrying it forever', async () => {
  const fetch = async () => ({ ok: false, status: 401, json: async () => ({ error: { message: 'expired' } }) });
  const { client, log, socket } = makeClient({ token: 'fixed', fetch });
  const connected = client.connect();
  await until(() => socket(0), 'a socket');
  socket(0).drop();
  await assert.rejects(connected, (error) => error.code === 'unauthorized' &&
    error.message === 'the server refuses the token: expired');
  assert.equal(FakeSocket.all.length, 1);
  assert.deepEqual(log.at(-1), { type: 'close', code: 4001, reason: 'the server refuses the token: expired',
                                 willReconnect: false });
});

test('without a WebSocket the error names the missing WebSocket, not SSE', () => {
  assert.throws(() => new PushbookClient({ url: 'http://x', WebSocket: null, EventSource: null, fetch: null }),
    /no WebSocket implementation \(Node 20: run with --experimental-websocket/);
  assert.throws(() => new PushbookClient({ url: 'http://x', transport: 'sse', EventSource: null }),
    /SSE needs EventSource and fetch/);
});
