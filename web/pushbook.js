// pushbook.js: a dependency-free client for the pushbook wire protocol v1 (docs/protocol.md).
// One ES module for browsers and Node 20+, no build step. The guide is
// docs/getting-started-browser.md.
//
//   import { PushbookClient } from './pushbook.js';
//   const client = new PushbookClient({ url: 'https://book.example.com', token: fetchToken });
//   await client.connect();
//   const { booking_id, subscription } = await client.book({ resource: 'room-101' });
//   for await (const ev of subscription) console.log(ev.data.status);  // processing, confirmed

/** The WebSocket subprotocol of wire protocol v1. */
export const PROTOCOL = 'pushbook.v1';

/**
 * An error with a stable `code`: the server's (`forbidden`, `not_found`, `idempotency_conflict`,
 * ...) or the client's own: `disconnected` (the connection dropped before the reply and the
 * request is not safe to repeat), `timeout` (no answer within `requestTimeoutMs`), `closed`
 * (`close()` was called).
 */
export class PushbookError extends Error {
  constructor(code, message, { status } = {}) {
    super(message || code);
    this.name = 'PushbookError';
    this.code = code;
    if (status !== undefined) this.status = status;  // the HTTP status, for REST calls
  }
}

/**
 * Delay before reconnect attempt `attempt` (0-based): exponential backoff with full jitter,
 * uniformly random in [0, min(maxMs, initialMs * 2^attempt)). Full jitter spreads the clients a
 * restarted server lost, so they do not all come back at once.
 * @param {number} attempt
 * @param {{initialMs?: number, maxMs?: number}} [backoff]
 * @param {() => number} [random] uniform in [0, 1)
 */
export function backoffDelay(attempt, { initialMs = 250, maxMs = 10_000 } = {}, random = Math.random) {
  const ceiling = Math.min(maxMs, initialMs * 2 ** attempt);
  return Math.floor(random() * ceiling);
}

/** A random idempotency key (128 bits, hex). Works outside secure contexts too. */
export function randomKey() {
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * The last sequence number delivered per topic, and the verdict on each incoming event.
 * Pure bookkeeping, no I/O: the resume and de-duplication rules live here.
 */
export class SeqTracker {
  #last = new Map();
  #epoch = new Map();

  /** The last seq delivered on `topic` (or the `since` it was seeded with), else undefined. */
  last(topic) { return this.#last.get(topic); }

  /**
   * The epoch of that seq (the numbering it belongs to; it changes when the server's numbering of
   * the topic restarts, e.g. after a restart), else undefined.
   */
  epoch(topic) { return this.#epoch.get(topic); }

  /** Starts `topic` at `since` (events up to it count as seen), unless it has a position. */
  seed(topic, since, epoch) {
    if (since === undefined || this.#last.has(topic)) return;
    this.#last.set(topic, since);
    if (epoch !== undefined) this.#epoch.set(topic, epoch);
  }

  forget(topic) { this.#last.delete(topic); this.#epoch.delete(topic); }

  /**
   * 'deliver' (and the seq is recorded): the next event, the first one, or a snapshot newer than
   *   what was seen (a snapshot replaces state: the events it summarises are not replayed).
   *   A snapshot older than what was seen means the topic's sequence restarted (the server lost
   *   its history): it is delivered too, and the position moves back to it.
   *   A snapshot of another epoch (a restarted numbering) is delivered whatever its seq.
   * 'duplicate': seq <= last seen, e.g. a replay overlapping what arrived before a reconnect.
   * 'gap': an event that skips seqs, or an event of another epoch that is not a snapshot: drop it
   *   and resubscribe with since = last (the server then answers with a snapshot).
   * @param {{topic: string, seq: number, epoch?: string, snapshot?: boolean}} event
   */
  classify({ topic, seq, epoch, snapshot }) {
    const last = this.#last.get(topic);
    const known = this.#epoch.get(topic);
    const renumbered = epoch !== undefined && known !== undefined && epoch !== known;
    const deliver = last === undefined ||
      (snapshot === true ? seq !== last || renumbered : !renumbered && seq === last + 1);
    if (deliver) {
      this.#last.set(topic, seq);
      if (epoch !== undefined) this.#epoch.set(topic, epoch);
      return 'deliver';
    }
    return seq <= last && !renumbered ? 'duplicate' : 'gap';
  }
}

const DELIVER = Symbol('deliver');
const END = Symbol('end');
const UNTIL_DECISION = Symbol('untilDecision');  // a book({follow: 'decision'}) subscription
// A booking event with its decision: any status but 'processing' (the server's rule for
// follow: 'decision'), not the event the client made from a book reply.
const isDecision = (event) =>
  !event.ack && typeof event.data?.status === 'string' && event.data.status !== 'processing';
const reportLater = (error) => queueMicrotask(() => { throw error; });  // as an uncaught error

/**
 * The events of one topic, for a callback (`onEvent`) or an async iterator:
 * `for await (const ev of sub)`. Leaving the loop (break, return, throw) unsubscribes. Without
 * `onEvent`, events queue until the iterator takes them.
 */
export class Subscription {
  #release; #onEvent; #onError;
  #queue = [];
  #waiters = [];
  #ended = false;
  #error = null;
  #iterating = false;

  constructor(topic, { onEvent, onError } = {}, release) {
    /** @type {string} */
    this.topic = topic;
    this.#onEvent = onEvent;
    this.#onError = onError;
    this.#release = release;
  }

  /** Stops the events of this subscription (the topic stays followed while others want it). */
  unsubscribe() {
    if (this.#ended) return;
    this.#queue = [];
    this.#release(this);
    this[END]();
  }

  [DELIVER](event) {
    if (this.#ended) return;
    if (this.#onEvent) {
      try { this.#onEvent(event); } catch (error) { reportLater(error); }
      if (!this.#iterating) return;
    }
    const waiter = this.#waiters.shift();
    if (waiter) waiter.resolve({ value: event, done: false });
    else this.#queue.push(event);
  }

  [END](error = null) {
    if (this.#ended) return;
    this.#ended = true;
    this.#error = error;
    if (error && this.#onError) {
      try { this.#onError(error); } catch (e) { reportLater(e); }
    }
    for (const waiter of this.#waiters.splice(0)) {
      if (error) waiter.reject(error);
      else waiter.resolve({ value: undefined, done: true });
    }
  }

  /** @returns {Promise<IteratorResult<object>>} rejects once if the server ended the topic */
  next() {
    this.#iterating = true;
    if (this.#queue.length) return Promise.resolve({ value: this.#queue.shift(), done: false });
    if (this.#ended) {
      const error = this.#error;
      this.#error = null;
      return error ? Promise.reject(error) : Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  return() {
    this.unsubscribe();
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator]() {
    this.#iterating = true;
    return this;
  }
}

/**
 * A connection to a pushbook gateway that survives network drops.
 *
 * Transports: WebSocket (`/v1/ws`), or Server-Sent Events (one `EventSource` per topic on
 * `/v1/events`, booking through `POST /v1/bookings`) when there is no WebSocket, when asked
 * (`transport: 'sse'`), or in 'auto' mode when WebSocket failed `wsFailuresBeforeSse` times in a
 * row without ever opening (a proxy that blocks upgrades, say).
 *
 * On any close but `close()`, it reconnects after a backoff with full jitter, fetching the token
 * again, and resubscribes every topic with `since` = the last seq seen there: missed events are
 * replayed (or a snapshot comes), and events already seen are dropped. A `book` in flight is sent
 * again with its idempotency key, so it never books twice; other requests in flight are rejected
 * with code `disconnected`.
 *
 * A refused token: browsers hide the status of a refused WebSocket upgrade, so after an upgrade
 * that never opened the client asks `GET /v1/whoami` with the token. On 401 it emits
 * 'unauthorized'; with a token function it then calls `token({refused: true})` for a new token
 * and reconnects, with a fixed token it closes (code 'unauthorized'): it never retries a refused
 * token forever.
 *
 * Listeners (`client.on(type, fn)`): 'open' {transport}, 'close' {code, reason, willReconnect},
 * 'reconnecting' {attempt, delayMs, transport}, 'unauthorized' {message, willReconnect},
 * 'event' (every event delivered, any topic).
 */
export class PushbookClient {
  #opts;
  #base;
  #WebSocket; #EventSource; #fetch;
  #mode;                      // the transport in use: 'websocket' or 'sse'
  #state = 'idle';            // idle | connecting | open | reconnecting | closed
  #token;                     // the token of the current connection
  #tokenReady = false;        // SSE: the token is fetched, streams may open
  #conn = null;               // WebSocket: {ws, opened}
  #attempt = 0;               // failed attempts since the last open
  #wsFailures = 0;
  #tokenRefused = false;      // the server refused the last token: ask the token function anew
  #wsEverOpened = false;
  #retryTimer; #connectTimer; #heartbeat;
  #lastHeard = 0;
  #nextId = 1;
  #pending = new Map();       // request id -> request
  #topics = new Map();        // topic -> {subs: Set<Subscription>, latest, stream, streamOpen}
  #seqs = new SeqTracker();
  #resyncing = new Set();     // topics resubscribed after a gap, until the server confirms
  #listeners = new Map();
  #openWaiters = [];

  /**
   * @param {object} options
   * @param {string} [options.url] the gateway's base URL (http[s]://host[:port]); default: the
   *   page's origin
   * @param {string | ((info: {refused: boolean}) => string | Promise<string>)} [options.token] a
   *   JWT, or a function returning one, called on every (re)connect; `refused` is true when the
   *   server refused the last token (make a new one rather than return a cached one)
   * @param {'auto' | 'websocket' | 'sse'} [options.transport='auto']
   * @param {{initialMs?: number, maxMs?: number}} [options.backoff] default 250 ms, 10 s
   * @param {number} [options.requestTimeoutMs=30000] a request's deadline, retries included
   * @param {number} [options.connectTimeoutMs=10000] a WebSocket handshake's deadline
   * @param {number} [options.pingIntervalMs=25000] after this much silence, ping the server...
   * @param {number} [options.pingTimeoutMs=10000] ...and drop the connection after this much more
   * @param {number} [options.wsFailuresBeforeSse=3] 'auto' only
   * @param {typeof WebSocket} [options.WebSocket] default: globalThis.WebSocket
   * @param {typeof EventSource} [options.EventSource] default: globalThis.EventSource
   * @param {typeof fetch} [options.fetch] default: globalThis.fetch
   * @param {() => number} [options.random] default: Math.random (for the jitter)
   */
  constructor(options = {}) {
    const {
      url = globalThis.location?.origin, transport = 'auto',
      WebSocket = globalThis.WebSocket, EventSource = globalThis.EventSource,
      fetch = globalThis.fetch?.bind(globalThis),
    } = options;
    if (!url) throw new TypeError('PushbookClient needs options.url, e.g. "https://book.example.com"');
    if (!['auto', 'websocket', 'sse'].includes(transport))
      throw new TypeError(`transport must be 'auto', 'websocket' or 'sse', not '${transport}'`);
    this.#opts = {
      token: undefined, transport, backoff: {}, requestTimeoutMs: 30_000, connectTimeoutMs: 10_000,
      pingIntervalMs: 25_000, pingTimeoutMs: 10_000, wsFailuresBeforeSse: 3, random: Math.random,
      ...options,
    };
    this.#base = String(url).replace(/\/+$/, '');
    this.#WebSocket = WebSocket;
    this.#EventSource = EventSource;
    this.#fetch = fetch;
    this.#mode = transport === 'sse' || (transport === 'auto' && !WebSocket) ? 'sse' : 'websocket';
    if (this.#mode === 'websocket' && !WebSocket)
      throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    if (this.#mode === 'sse' && !(EventSource && fetch)) {
      // transport 'auto' falls back to SSE only when there is no WebSocket: say that first (Node
      // 20 has a global WebSocket only with --experimental-websocket).
      throw new TypeError(transport === 'auto'
        ? 'no WebSocket implementation (Node 20: run with --experimental-websocket, or pass ' +
          'options.WebSocket), and no EventSource + fetch to fall back to SSE'
        : 'SSE needs EventSource and fetch: pass options.EventSource and options.fetch');
    }
  }

  /** 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' */
  get state() { return this.#state; }

  /** The transport in use: 'websocket' or 'sse'. */
  get transport() { return this.#mode; }

  /**
   * Adds a listener; returns a function that removes it. An exception a listener throws is
   * reported as an uncaught error and does not disturb the client.
   * @param {'open' | 'close' | 'reconnecting' | 'event'} type
   * @param {(detail: object) => void} listener
   */
  on(type, listener) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) { this.#listeners.get(type)?.delete(listener); }

  /**
   * Connects (retrying with backoff as long as it takes). Resolves once connected; rejects only
   * if `close()` is called first. Requests and subscriptions made before wait for it.
   * @returns {Promise<void>}
   */
  connect() {
    if (this.#state === 'closed') return Promise.reject(new PushbookError('closed', 'the client is closed'));
    if (this.#state === 'open') return Promise.resolve();
    const opened = new Promise((resolve, reject) => this.#openWaiters.push({ resolve, reject }));
    if (this.#state === 'idle') this.#dial();
    return opened;
  }

  /** Closes for good: no reconnect; pending requests reject with `closed`; iterators end. */
  close() { this.#closeFor(new PushbookError('closed', 'the client was closed'), 'client closed'); }

  // Closes for good: every request in flight and every waiter for 'open' get `closed`.
  #closeFor(closed, reason = closed.message) {
    if (this.#state === 'closed') return;
    this.#state = 'closed';
    clearTimeout(this.#retryTimer);
    this.#teardown();
    for (const req of [...this.#pending.values()]) this.#settle(req, closed);
    for (const waiter of this.#openWaiters.splice(0)) waiter.reject(closed);
    for (const t of this.#topics.values()) for (const sub of t.subs) sub[END]();
    this.#topics.clear();
    this.#emit('close', { code: closed.code === 'closed' ? 1000 : 4001, reason, willReconnect: false });
  }

  /**
   * Books. Resolves once the server accepted the booking (its decision follows as events on
   * `booking/<id>`, which the client follows from then on). The idempotency key (random by
   * default) makes the retry after a reconnect safe: the server answers the first booking.
   * @param {object} request
   * @param {string} [request.resource]
   * @param {number} [request.quantity=1]
   * @param {{resource: string, quantity: number}[]} [request.lines] instead of resource/quantity
   * @param {string} [request.idempotencyKey]
   * @param {object} [request.metadata]
   * @param {number} [request.holdMs]
   * @param {(event: object) => void} [request.onEvent] the booking's events, from the first.
   *   Over WebSocket the first one of a new booking is made from the server's reply (the
   *   server does not send that state again): `{type: 'event', topic, seq, ts, ack: true, data}`
   *   where `data` has `booking_id`, `status` ('processing'), `version` (= `seq`) and, from the
   *   request, `lines`, `metadata`, `hold_ms`; the events that follow carry the whole booking
   * @param {(error: PushbookError) => void} [request.onError] the server stopped following the
   *   booking for this client (e.g. `forbidden` after a new token made it another user)
   * @param {'all'|'decision'} [request.follow='all'] 'decision': the subscription ends by itself
   *   once the decision (any status but 'processing') has been delivered (the iterator is then
   *   done, no error), and the server stops following the booking for this client without an
   *   `unsubscribe` round trip. Later changes (a cancel) are not delivered. Other subscriptions
   *   of the same topic go on. 'all': followed until `unsubscribe()`.
   * @returns {Promise<{booking_id: string, status: string, seq?: number, replayed?: boolean,
   *   subscription: Subscription}>} `subscription` follows `booking/<id>`; unsubscribe when done
   */
  async book(request = {}) {
    const { resource, quantity = 1, lines, metadata, holdMs, onEvent, onError, follow = 'all' } = request;
    const { idempotencyKey = randomKey() } = request;
    if (follow !== 'all' && follow !== 'decision')
      throw new TypeError(`book's follow is 'all' or 'decision', not ${JSON.stringify(follow)}`);
    const msg = { op: 'book', idempotency_key: idempotencyKey };
    if (follow === 'decision') msg.follow = follow;
    if (lines) msg.lines = lines;
    else Object.assign(msg, { resource, quantity });
    if (metadata !== undefined) msg.metadata = metadata;
    if (holdMs !== undefined) msg.hold_ms = holdMs;
    let subscription;
    // The reply is handled before the events that follow it in the same frame, so the booking's
    // topic is followed before its first event is read.
    const onReply = (result) => {
      const topic = `booking/${result.booking_id}`;
      const websocket = this.#mode === 'websocket';
      subscription = this.#follow(topic, { onEvent, onError, untilDecision: follow === 'decision' }, websocket);
      // Over WebSocket the server follows a new booking's topic from the version its reply
      // reports (`seq`): the reply is the topic's first event, and its seq the resume point (a
      // reconnect before the decision resubscribes with since = seq and still gets it). After a
      // replayed reply the server sends the state it reports as an event, whole: nothing to make.
      if (websocket && !result.replayed && Number.isSafeInteger(result.seq)) {
        const data = { booking_id: result.booking_id, status: result.status, version: result.seq,
          lines: msg.lines ?? [{ resource, quantity }] };
        if (metadata !== undefined) data.metadata = metadata;
        if (holdMs !== undefined) data.hold_ms = holdMs;
        this.#onEvent({ type: 'event', topic, seq: result.seq, ts: Date.now(), ack: true, data });
      }
    };
    const result = await this.#request(msg, { retry: true, onReply });
    return { ...result, subscription };
  }

  /**
   * Cancels a confirmed booking. Not repeated after a reconnect (a second cancel is an error).
   * @returns {Promise<object>} the booking
   */
  cancel(bookingId) { return this.#request({ op: 'cancel', booking_id: bookingId }); }

  /**
   * Follows a topic: 'resource/<id>', 'booking/<id>', 'user/<id>'. Events arrive in seq order,
   * each once, across reconnects. Without `since`, the first event is a snapshot of the current
   * state (`snapshot: true`); with it, the events after `since` are replayed first. A topic the
   * client already follows gives the new subscription its latest event at once.
   * @param {string} topic
   * @param {object} [options]
   * @param {number} [options.since] the last seq the caller has (events after it are replayed)
   * @param {string} [options.epoch] the `epoch` of the event that `since` came from: when the
   *   server's numbering of the topic restarted since (a restart), it sends a snapshot instead
   * @param {(event: object) => void} [options.onEvent]
   * @param {(error: PushbookError) => void} [options.onError] the server refused or ended the
   *   subscription (the iterator throws it too)
   * @returns {Subscription}
   */
  subscribe(topic, { since, epoch, onEvent, onError } = {}) {
    if (typeof topic !== 'string' || !topic) throw new TypeError('subscribe needs a topic');
    return this.#follow(topic, { since, epoch, onEvent, onError }, false);
  }

  // --- topics ----------------------------------------------------------------------------

  // `serverSubscribed`: a book over WebSocket made the server follow the topic already (with
  // `untilDecision`, until the decision).
  #follow(topic, { since, epoch, onEvent, onError, untilDecision = false }, serverSubscribed) {
    const sub = new Subscription(topic, { onEvent, onError }, (s) => this.#release(s));
    sub[UNTIL_DECISION] = untilDecision;
    if (this.#state === 'closed') {
      sub[END](new PushbookError('closed', 'the client is closed'));
      return sub;
    }
    let t = this.#topics.get(topic);
    if (t) {
      t.subs.add(sub);
      if (t.latest) sub[DELIVER](t.latest);
      return sub;
    }
    // serverEnds: the server ends its subscription at the decision (book with follow: 'decision'
    // over WebSocket; a resubscribe follows everything again).
    t = { subs: new Set([sub]), latest: null, stream: null, streamOpen: false,
      serverEnds: serverSubscribed && untilDecision };
    this.#topics.set(topic, t);
    this.#seqs.seed(topic, since, epoch);
    if (this.#mode === 'sse') {
      if (this.#tokenReady) this.#openStream(topic);
    } else if (this.#state === 'open' && !serverSubscribed) {
      this.#sendSubscribe(topic);
    }
    return sub;
  }

  #release(sub) {
    const t = this.#topics.get(sub.topic);
    if (!t || !t.subs.delete(sub) || t.subs.size) return;
    this.#forget(sub.topic);
    if (this.#mode === 'sse') {
      t.stream?.close();
      this.#checkStreamsOpen();
    } else if (this.#state === 'open') this.#request({ op: 'unsubscribe', topic: sub.topic }).catch(() => {});
  }

  #forget(topic) {
    this.#topics.delete(topic);
    this.#seqs.forget(topic);
    this.#resyncing.delete(topic);
  }

  #sendSubscribe(topic) {
    const followed = this.#topics.get(topic);
    if (followed) followed.serverEnds = false;  // a subscribe follows the topic until unsubscribe
    const since = this.#seqs.last(topic);
    const epoch = this.#seqs.epoch(topic);
    const msg = since === undefined ? { op: 'subscribe', topic } : { op: 'subscribe', topic, since };
    if (since !== undefined && epoch !== undefined) msg.epoch = epoch;
    // From the reply on (and synchronously: events may follow in the same frame), a gap is new.
    const onReply = () => this.#resyncing.delete(topic);
    this.#request(msg, { onReply }).catch((error) => {
      if (['disconnected', 'closed', 'timeout'].includes(error.code)) return;  // resubscribed on reconnect
      if (['rate_limited', 'overloaded'].includes(error.code)) {
        const delayMs = backoffDelay(this.#attempt + 2, this.#opts.backoff, this.#opts.random);
        setTimeout(() => {
          if (this.#topics.has(topic) && this.#state === 'open') this.#sendSubscribe(topic);
        }, delayMs);
        return;
      }
      const t = this.#topics.get(topic);
      this.#forget(topic);
      for (const sub of t?.subs ?? []) sub[END](error);
    });
  }

  // Missed events: resubscribe from the last seq seen (once until the server confirms).
  #resync(topic) {
    if (this.#resyncing.has(topic) || !this.#topics.has(topic)) return;
    this.#resyncing.add(topic);
    if (this.#mode === 'sse') this.#openStream(topic);
    else if (this.#state === 'open') this.#sendSubscribe(topic);
  }

  #onEvent(event) {
    const t = this.#topics.get(event.topic);
    if (!t || typeof event.seq !== 'number') return;  // no longer followed
    const verdict = this.#seqs.classify(event);
    if (verdict === 'duplicate') return;
    if (verdict === 'gap') return this.#resync(event.topic);
    t.latest = event;
    this.#emit('event', event);
    for (const sub of [...t.subs]) sub[DELIVER](event);
    if (isDecision(event) && this.#topics.get(event.topic) === t) this.#decided(event.topic, t);
  }

  // The decision of a booking topic was delivered: subscriptions that wanted only it end; the
  // topic stays followed (from the decision on) while others want more.
  #decided(topic, t) {
    for (const sub of [...t.subs]) {
      if (!sub[UNTIL_DECISION]) continue;
      t.subs.delete(sub);
      sub[END]();
    }
    if (t.subs.size) {
      // The server ends its side at the decision: the others need a subscription of their own.
      if (t.serverEnds && this.#state === 'open') this.#sendSubscribe(topic);
      return;
    }
    this.#forget(topic);
    if (this.#mode === 'sse') {
      t.stream?.close();
      this.#checkStreamsOpen();
    } else if (!t.serverEnds && this.#state === 'open') {
      this.#request({ op: 'unsubscribe', topic }).catch(() => {});
    }
  }

  // One server message (a line of a WebSocket frame, or an SSE message of `streamTopic`).
  #onMessage(line, streamTopic) {
    let msg;
    try { msg = JSON.parse(line); } catch { return; }
    switch (msg.type) {
      case 'event': return this.#onEvent(msg);
      case 'reply': return this.#onReply(msg);
      case 'gap': for (const topic of msg.topics ?? [streamTopic]) this.#resync(topic); return;
      case 'notice':
        if (msg.code === 'token_expired' && typeof this.#opts.token === 'function') {
          this.#getToken().then((token) => this.#request({ op: 'refresh', token })).catch(() => {});
        } else if (msg.code === 'subscription_ended' && this.#topics.has(msg.topic)) {
          const t = this.#topics.get(msg.topic);
          this.#forget(msg.topic);
          for (const sub of t.subs) sub[END](new PushbookError('subscription_ended', msg.message));
        }
    }
  }

  // --- requests --------------------------------------------------------------------------

  #request(msg, { retry = false, onReply } = {}) {
    return new Promise((resolve, reject) => {
      const req = { id: this.#nextId++, msg, retry, onReply, resolve, reject, sent: false, attempts: 0 };
      const { requestTimeoutMs } = this.#opts;
      req.timer = setTimeout(() => this.#settle(req, new PushbookError(
        'timeout', `no answer to ${msg.op} within ${requestTimeoutMs} ms`)), requestTimeoutMs);
      this.#pending.set(req.id, req);
      if (this.#state === 'closed') this.#settle(req, new PushbookError('closed', 'the client is closed'));
      else if (this.#state === 'open') this.#transmit(req);
    });
  }

  #transmit(req) {
    req.sent = true;
    req.via = this.#mode;
    if (this.#mode === 'websocket') {
      this.#conn.ws.send(JSON.stringify({ id: req.id, ...req.msg }));
      return;
    }
    this.#rest(req.msg).then((result) => this.#succeed(req, result), (error) => this.#fail(req, error));
  }

  #onReply(msg) {
    const req = this.#pending.get(msg.id);
    if (!req) return;
    if (msg.ok) this.#succeed(req, msg.result);
    else this.#fail(req, new PushbookError(msg.error?.code ?? 'internal', msg.error?.message));
  }

  #succeed(req, result) {
    if (!this.#pending.has(req.id)) return;
    req.onReply?.(result);
    this.#settle(req, null, result);
  }

  #fail(req, error) {
    if (!(error instanceof PushbookError))  // fetch failed: no answer from the server
      error = new PushbookError('disconnected', String(error?.message ?? error));
    const transient = ['disconnected', 'rate_limited', 'overloaded', 'internal'].includes(error.code);
    if (!req.retry || !transient || !this.#pending.has(req.id)) return this.#settle(req, error);
    req.sent = false;  // again after a backoff, with the same idempotency key
    req.retryTimer = setTimeout(() => {
      if (this.#pending.has(req.id) && !req.sent && this.#state === 'open') this.#transmit(req);
    }, backoffDelay(req.attempts++, this.#opts.backoff, this.#opts.random));
  }

  #settle(req, error, result) {
    if (!this.#pending.delete(req.id)) return;
    clearTimeout(req.timer);
    clearTimeout(req.retryTimer);
    if (error) req.reject(error);
    else req.resolve(result);
  }

  // A request over HTTP (the SSE transport). Network failures and 5xx come back as transient
  // errors; a 401 gets one more try with a fresh token.
  async #rest(msg) {
    let method = 'POST', path = '/v1/bookings', body, headers = {};
    if (msg.op === 'book') {
      const { op, follow, ...rest } = msg;  // follow: the client's own business over SSE
      body = JSON.stringify(rest);
      headers = { 'content-type': 'application/json', 'idempotency-key': msg.idempotency_key };
    } else if (msg.op === 'cancel') {
      method = 'DELETE';
      path = `/v1/bookings/${encodeURIComponent(msg.booking_id)}`;
    } else {
      throw new PushbookError('bad_request', `'${msg.op}' needs the WebSocket transport`);
    }
    const send = () => this.#fetch(this.#base + path, {
      method, body, headers: this.#token ? { ...headers, authorization: `Bearer ${this.#token}` } : headers,
    });
    let res = await send();
    if (res.status === 401 && typeof this.#opts.token === 'function') {
      this.#tokenRefused = true;
      this.#token = await this.#getToken();
      res = await send();
    }
    const payload = await res.json().catch(() => ({}));
    if (res.ok) return payload;
    const code = payload.error?.code ?? (res.status >= 500 ? 'internal' : 'bad_request');
    throw new PushbookError(code, payload.error?.message ?? `HTTP ${res.status}`, { status: res.status });
  }

  // --- connection ------------------------------------------------------------------------

  async #getToken() {
    const { token } = this.#opts;
    if (typeof token !== 'function') return token;
    const refused = this.#tokenRefused;
    this.#tokenRefused = false;
    return await token({ refused });
  }

  // After a WebSocket upgrade that never opened: was it the token? Browsers hide the HTTP status
  // of a refused upgrade, so ask. True when the token was refused and a new one will be asked
  // for; with a fixed token the client closes (code 'unauthorized').
  async #checkToken() {
    const token = this.#token;
    if (!this.#fetch || !token) return false;
    let res;
    try {
      res = await this.#fetch(`${this.#base}/v1/whoami`, { headers: { authorization: `Bearer ${token}` } });
    } catch {
      return false;  // the network, not the token: back off and retry as usual
    }
    if (res.status !== 401 || this.#state === 'closed') return false;
    const body = await res.json().catch(() => ({}));
    const message = body.error?.message ?? 'token refused';
    const renewable = typeof this.#opts.token === 'function';
    this.#emit('unauthorized', { message, willReconnect: renewable });
    if (renewable) {
      this.#tokenRefused = true;
      return true;
    }
    this.#closeFor(new PushbookError('unauthorized', `the server refuses the token: ${message}`));
    return false;
  }

  async #dial() {
    this.#state = 'connecting';
    let token;
    try {
      token = await this.#getToken();
    } catch (error) {
      if (this.#state === 'connecting')
        this.#lost({ opened: false, code: 0, reason: `no token: ${error.message}`, transportFailed: false });
      return;
    }
    if (this.#state !== 'connecting') return;  // closed meanwhile
    this.#token = token;
    if (this.#mode === 'websocket') return this.#dialWebSocket(token);
    this.#tokenReady = true;
    for (const topic of this.#topics.keys()) this.#openStream(topic);
    this.#checkStreamsOpen();  // open at once when there is nothing to stream yet
  }

  #dialWebSocket(token) {
    const url = `${this.#base.replace(/^http/, 'ws')}/v1/ws`;
    let ws;
    try {
      ws = new this.#WebSocket(url, token ? [PROTOCOL, `bearer.${token}`] : [PROTOCOL]);
    } catch (error) {
      return this.#lost({ opened: false, code: 0, reason: error.message });
    }
    const conn = { ws, opened: false };
    this.#conn = conn;
    this.#connectTimer = setTimeout(() => this.#drop(conn, 'connect timeout'), this.#opts.connectTimeoutMs);
    ws.onopen = () => {
      clearTimeout(this.#connectTimer);
      conn.opened = true;
      this.#wsEverOpened = true;
      this.#wsFailures = 0;
      this.#lastHeard = Date.now();
      this.#startHeartbeat(conn);
      this.#opened();
    };
    ws.onmessage = (m) => {
      this.#lastHeard = Date.now();
      // A frame holds one or more messages, one per line.
      for (const line of String(m.data).split('\n')) if (line) this.#onMessage(line);
    };
    ws.onclose = (e) => {
      if (this.#conn !== conn) return;
      this.#conn = null;
      this.#lost({ opened: conn.opened, code: e.code, reason: e.reason });
    };
    ws.onerror = () => {};  // a close event follows
  }

  // Gives up on a connection that is silent or stuck in its handshake: a dead TCP path can
  // take minutes to report a close.
  #drop(conn, reason) {
    if (this.#conn !== conn) return;
    this.#conn = null;
    conn.ws.onopen = conn.ws.onmessage = conn.ws.onclose = null;
    try { conn.ws.close(4000, reason); } catch { /* already closed */ }
    this.#lost({ opened: conn.opened, code: 4000, reason });
  }

  #startHeartbeat(conn) {
    const { pingIntervalMs, pingTimeoutMs } = this.#opts;
    clearInterval(this.#heartbeat);
    this.#heartbeat = setInterval(() => {
      const silent = Date.now() - this.#lastHeard;
      if (silent >= pingIntervalMs + pingTimeoutMs) this.#drop(conn, 'no answer to ping');
      else if (silent >= pingIntervalMs) conn.ws.send(JSON.stringify({ id: this.#nextId++, op: 'ping' }));
    }, Math.max(250, Math.min(pingIntervalMs, pingTimeoutMs) / 2));
  }

  #openStream(topic) {
    const t = this.#topics.get(topic);
    t.stream?.close();
    const query = new URLSearchParams({ topic });
    if (this.#token) query.set('access_token', this.#token);
    const since = this.#seqs.last(topic);
    if (since !== undefined) query.set('since', String(since));
    const epoch = this.#seqs.epoch(topic);
    if (since !== undefined && epoch !== undefined) query.set('epoch', epoch);
    const es = new this.#EventSource(`${this.#base}/v1/events?${query}`);
    Object.assign(t, { stream: es, streamOpen: false });
    es.onopen = () => {
      if (t.stream !== es) return;
      t.streamOpen = true;
      this.#resyncing.delete(topic);
      this.#checkStreamsOpen();
    };
    es.onmessage = (m) => { if (t.stream === es) this.#onMessage(m.data, topic); };
    // EventSource would retry by itself, but with the same (maybe expired) token and without
    // telling anyone: the client reconnects everything instead, as for a WebSocket.
    es.onerror = () => {
      if (t.stream !== es) return;
      this.#lost({ opened: this.#state === 'open', code: 0, reason: `event stream of ${topic} failed` });
    };
  }

  // SSE: the connection is open when every topic's stream is.
  #checkStreamsOpen() {
    const allOpen = [...this.#topics.values()].every((t) => t.streamOpen);
    if (this.#state === 'connecting' && this.#tokenReady && allOpen) this.#opened();
  }

  #opened() {
    this.#state = 'open';
    this.#attempt = 0;
    // Resume: every topic from its last seq (SSE streams did that as they opened), then the
    // requests that were never sent or may be repeated.
    if (this.#mode === 'websocket') for (const topic of this.#topics.keys()) this.#sendSubscribe(topic);
    for (const req of [...this.#pending.values()]) if (!req.sent) this.#transmit(req);
    this.#emit('open', { transport: this.#mode });
    for (const waiter of this.#openWaiters.splice(0)) waiter.resolve();
  }

  #teardown() {
    clearTimeout(this.#connectTimer);
    clearInterval(this.#heartbeat);
    if (this.#conn) {
      const { ws } = this.#conn;
      this.#conn = null;
      ws.onopen = ws.onmessage = ws.onclose = null;
      try { ws.close(1000, 'client closed'); } catch { /* already closed */ }
    }
    this.#tokenReady = false;
    for (const t of this.#topics.values()) {
      t.stream?.close();
      Object.assign(t, { stream: null, streamOpen: false });
    }
  }

  #lost({ opened, code, reason, transportFailed = true }) {
    if (this.#state === 'closed' || this.#state === 'reconnecting') return;
    this.#teardown();
    for (const req of [...this.#pending.values()]) {
      if (!req.sent || req.via !== 'websocket') continue;  // HTTP requests finish on their own
      if (req.retry) req.sent = false;
      else this.#settle(req, new PushbookError('disconnected', `no reply to ${req.msg.op}: connection lost`));
    }
    this.#resyncing.clear();
    if (opened) this.#emit('close', { code, reason, willReconnect: true });
    const wsFailed = this.#mode === 'websocket' && !opened && transportFailed;
    if (wsFailed && ++this.#wsFailures >= this.#opts.wsFailuresBeforeSse && this.#opts.transport === 'auto' &&
        !this.#wsEverOpened && this.#EventSource && this.#fetch) {
      this.#mode = 'sse';  // WebSocket never worked here: a proxy may be blocking it
    }
    const delayMs = backoffDelay(this.#attempt, this.#opts.backoff, this.#opts.random);
    this.#attempt += 1;
    this.#state = 'reconnecting';
    this.#emit('reconnecting', { attempt: this.#attempt, delayMs, transport: this.#mode });
    this.#retryTimer = setTimeout(() => this.#dial(), delayMs);
    // An upgrade that never opened may have been a refused token: ask now, and on a 401 retry at
    // once with a new token instead of waiting out the backoff with one that cannot work.
    if (wsFailed) {
      this.#checkToken().then((renewed) => {
        if (!renewed || this.#state !== 'reconnecting') return;
        clearTimeout(this.#retryTimer);
        this.#retryTimer = setTimeout(() => this.#dial(), 0);
      });
    }
  }

  #emit(type, detail) {
    for (const listener of [...(this.#listeners.get(type) ?? [])]) {
      try { listener(detail); } catch (error) { reportLater(error); }
    }
  }
}
