// The demo page (index.html), served by `pushbook-server --demo`. It uses only pushbook.js and
// the gateway's demo endpoints. Hooks for tests:
//   #connection[data-state]        connecting | connected | reconnecting | closed
//   li[data-resource=ID]           .available[data-available], button[data-book=ID]
//   li[data-booking-key]           [data-booking-id], [data-status], [data-reason],
//                                  [data-replayed] (the reply came to a retry),
//                                  .latency[data-latency-ms] (click to decision)
//   window.pushbookDemo            {client, events: [{topic, seq, status, snapshot}],
//                                   connection: [states in order], ready}
// ?transport=sse|websocket|auto picks the client's transport.
import { PushbookClient, randomKey } from './pushbook.js';

const $ = (selector, root = document) => root.querySelector(selector);
const transport = new URLSearchParams(location.search).get('transport') || 'auto';
const demo = (window.pushbookDemo = { client: null, events: [], connection: [], tokens: [], ready: false,
  book: null });
const DECIDED = new Set(['confirmed', 'rejected', 'cancelled', 'released', 'expired']);

// POST /v1/demo/token makes a new demo user; sent with a token that is still good it renews that
// user's token. So a long-lived page stays one user, and a reconnect resumes its bookings' topics.
let demoToken = null;
async function token({ refused = false } = {}) {
  // A refused token (the server restarted with a new secret): forget it and become a new user.
  if (refused) demoToken = null;
  if (demoToken && demoToken.expires_at - Date.now() > 30_000) return demoToken.token;
  // The server announces expiry at `exp` and accepts a token up to 5 s past it (clock leeway), so
  // renewing on its notice (or a reconnect) keeps the same user.
  const renew = demoToken && demoToken.expires_at - Date.now() > -4_000;
  const res = await fetch('/v1/demo/token', {
    method: 'POST',
    headers: renew ? { Authorization: `Bearer ${demoToken.token}` } : {},
  });
  if (!res.ok) throw new Error(`POST /v1/demo/token: HTTP ${res.status}`);
  demoToken = await res.json();
  demo.tokens.push({ user: demoToken.user, renewed: Boolean(renew) });
  $('#user').textContent = demoToken.user;
  return demoToken.token;
}

const client = (demo.client = new PushbookClient({ url: location.origin, token, transport }));

// --- connection indicator ------------------------------------------------------------------

// Booking needs a connection, and a sold-out resource cannot be booked: buttons say so. While
// disconnected, the availability shown is the last known one, marked stale.
function updateButtons() {
  const connected = document.body.dataset.connection === 'connected';
  for (const li of document.querySelectorAll('#resources li[data-resource]')) {
    const soldOut = li.classList.contains('sold-out');
    const button = $('button', li);
    button.disabled = !connected || soldOut;
    button.textContent = soldOut ? 'Sold out' : 'Book';
    li.classList.toggle('stale', !connected);
  }
}

function showConnection(state, text, attempt) {
  document.body.dataset.connection = state;
  updateButtons();
  const el = $('#connection');
  el.dataset.state = state;
  if (attempt === undefined) delete el.dataset.attempt;
  else el.dataset.attempt = String(attempt);
  $('#connection-text').textContent = text;
  if (demo.connection.at(-1) !== state) demo.connection.push(state);
}

client.on('open', ({ transport }) => {
  showConnection('connected', 'connected');
  $('#transport').textContent = transport;
});
client.on('close', ({ willReconnect }) => {
  if (willReconnect) showConnection('reconnecting', 'connection lost');
  else showConnection('closed', 'closed');
});
client.on('reconnecting', ({ attempt, delayMs }) => {
  showConnection('reconnecting', `reconnecting · attempt ${attempt} in ${delayMs} ms`, attempt);
});

// --- event log -----------------------------------------------------------------------------

client.on('event', (ev) => {
  const status = ev.data?.status ?? null;
  demo.events.push({ topic: ev.topic, seq: ev.seq, status, snapshot: ev.snapshot === true });
  const item = document.createElement('li');
  const what = status ?? (ev.data && 'available' in ev.data ? `${ev.data.available} free` : '');
  const topic = ev.topic.replace(/^booking\/.*(.{6})$/, 'booking/…$1');  // ids share their time prefix
  item.textContent = `${topic} #${ev.seq}${ev.snapshot ? ' (snapshot)' : ''} ${what}`;
  const log = $('#event-log');
  log.prepend(item);
  while (log.children.length > 40) log.lastElementChild.remove();
});

// --- resources -----------------------------------------------------------------------------

function renderResource(r) {
  let li = $(`li[data-resource="${CSS.escape(r.resource)}"]`);
  if (!li) {
    li = $('#resource-template').content.firstElementChild.cloneNode(true);
    li.dataset.resource = r.resource;
    $('.resource-name', li).textContent = r.resource;
    const button = $('button', li);
    button.dataset.book = r.resource;
    button.addEventListener('click', () => book(r.resource));
    $('#resources').append(li);
  }
  $('.available', li).textContent = r.available;
  $('.available', li).dataset.available = String(r.available);
  $('.capacity', li).textContent = r.capacity;
  $('.meter-fill', li).style.width = `${r.capacity ? (100 * r.available) / r.capacity : 0}%`;
  li.classList.toggle('sold-out', r.available === 0);
  updateButtons();
}

async function loadResources() {
  const res = await fetch('/v1/resources');
  if (!res.ok) throw new Error(`GET /v1/resources: HTTP ${res.status}`);
  const { resources } = await res.json();
  for (const r of resources) {
    renderResource(r);
    client.subscribe(`resource/${r.resource}`, { onEvent: (ev) => renderResource(ev.data) });
  }
}

// --- bookings ------------------------------------------------------------------------------

function showBooking(li, { booking_id, status, reason }) {
  if (booking_id) {
    li.dataset.bookingId = booking_id;
    $('.booking-id', li).textContent = booking_id;
  }
  li.dataset.status = status;
  $('.status', li).textContent = status;
  if (reason) {
    li.dataset.reason = reason;
    $('.reason', li).textContent = reason.replace(/_/g, ' ');
  }
}

async function book(resource) {
  const clickedAt = performance.now();
  const key = randomKey();
  const li = $('#booking-template').content.firstElementChild.cloneNode(true);
  li.dataset.bookingKey = key;
  li.dataset.resource = resource;
  $('.booking-resource', li).textContent = resource;
  showBooking(li, { status: 'sending' });
  $('#bookings').prepend(li);
  $('#no-bookings').hidden = true;

  let subscription = null;
  let decided = false;
  // Over SSE each followed topic holds one of the browser's six connections to this host, so
  // stop following a booking once it is decided (the demo offers nothing to do with it after).
  const maybeStopFollowing = () => {
    if (decided && client.transport === 'sse') subscription?.unsubscribe();
  };
  const onEvent = (ev) => {
    showBooking(li, ev.data);
    if (!DECIDED.has(ev.data.status) || li.querySelector('[data-latency-ms]')) return;
    const ms = Math.round(performance.now() - clickedAt);
    const latency = $('.latency', li);
    latency.dataset.latencyMs = String(ms);
    latency.textContent = `${ev.data.status === 'confirmed' ? 'confirmed' : 'decided'} in ${ms} ms`;
    decided = true;
    maybeStopFollowing();
  };
  // The server stopped following it for this page: a restart with a new secret made the page a
  // new demo user, and the booking belongs to the old one. Say so instead of a stale status.
  const onError = (error) => {
    showBooking(li, { status: 'unknown', reason: 'not followed' });
    li.title = `no longer followed: ${error.message}`;
  };
  try {
    const result = await client.book({ resource, idempotencyKey: key, onEvent, onError });
    subscription = result.subscription;
    if (result.replayed) li.dataset.replayed = 'true';  // answered by an idempotent retry
    if (li.dataset.status === 'sending') showBooking(li, result);
    maybeStopFollowing();
  } catch (error) {
    showBooking(li, { status: 'failed', reason: error.code ?? 'error' });
    li.title = error.message;
  }
}

demo.book = book;  // for the console (and the tests): books as the button does, even when disabled

// --- start ---------------------------------------------------------------------------------

showConnection('connecting', 'connecting…');
try {
  await loadResources();
  await client.connect();
  demo.ready = true;
} catch (error) {
  showConnection('closed', `failed: ${error.message}`);
}
