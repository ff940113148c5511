// Browser tests of the demo page (web/index.html + web/pushbook.js) against a real
// pushbook-server, in headless Chromium driven by playwright-core. Run by scripts/browser-test.sh.
//   PUSHBOOK_SERVER   the server binary (default: build/bin/pushbook-server)
//   CHROMIUM          the browser (default: /usr/bin/chromium)
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer as startPushbookServer } from './server.mjs';

const DECISION_DELAY_MS = 1500;
const WAIT_MS = 15_000;  // deadline of every wait on page state
const TEST_OPTIONS = { timeout: 90_000 };
const startServer = (args) => startPushbookServer(['--demo', ...args]);

// A TCP proxy between the browser and the server, to cut the network path: dropAll() resets
// every connection; while `refusing`, new connections are reset at once (the network is down).
// `trap` cuts the path at the browser's next WebSocket message: 'request' before passing it on
// (the server never sees it), 'reply' once the server starts answering (the answer is lost).
async function startProxy(targetPort) {
  const sockets = new Set();
  const proxy = { refusing: false, trap: null };
  const server = net.createServer((client) => {
    if (proxy.refusing) return client.resetAndDestroy();
    const upstream = net.connect(targetPort, '127.0.0.1');
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => {});
    }
    let first = true, webSocket = false, dropOnAnswer = false;
    client.on('data', (chunk) => {
      if (first) webSocket = chunk.toString('latin1', 0, 10) === 'GET /v1/ws';
      else if (webSocket && proxy.trap === 'request') return (proxy.trap = null), proxy.dropAll();
      else if (webSocket && proxy.trap === 'reply') [proxy.trap, dropOnAnswer] = [null, true];
      first = false;
      upstream.write(chunk);
    });
    upstream.on('data', (chunk) => (dropOnAnswer ? proxy.dropAll() : client.write(chunk)));
    client.on('end', () => upstream.end());
    upstream.on('end', () => client.end());
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return Object.assign(proxy, {
    url: `http://127.0.0.1:${server.address().port}`,
    dropAll() { for (const socket of sockets) socket.resetAndDestroy(); },
    close() {
      proxy.dropAll();
      return new Promise((resolve) => server.close(resolve));
    },
  });
}

// Polls `probe` until `accept(value)`; fails with the last value after `timeoutMs`.
async function poll(probe, accept, what, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (accept(value)) return value;
    if (Date.now() > deadline)
      assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${JSON.stringify(value)}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// --- fixtures: one server (capacity-1 resource "solo" for the sold-out case) and one browser ---

let server;
let context;
let profileDir;
const cleanups = [];

before(async () => {
  const resources = ['room-101:10', 'room-102:10', 'concert:100', 'solo:1'];
  server = await startServer(['--decision-delay-ms', String(DECISION_DELAY_MS),
    ...resources.flatMap((r) => ['--resource', r])]);
  process.once('exit', () => server?.kill());  // last resort if the run is torn down
  profileDir = mkdtempSync(path.join(os.tmpdir(), 'pushbook-chromium-'));
  context = await chromium.launchPersistentContext(profileDir, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 720 },
    // The https test's server has a certificate of a CA made for the run (made at test time by
    // scripts/make-test-certs.sh), which this browser accepts; plain http pages are unaffected.
    ignoreHTTPSErrors: true,
  });
});

after(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch(() => {});
  await context?.close().catch(() => {});
  await server?.stop();
  if (profileDir) rmSync(profileDir, { recursive: true, force: true });
});

// Opens the demo and waits until it is connected. Uncaught page errors fail the test.
async function openDemo(baseUrl, query = '') {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (error) => errors.push(error));
  page.assertNoErrors = () => assert.deepEqual(errors.map(String), [], 'uncaught errors in the page');
  cleanups.push(() => page.close());
  await page.goto(`${baseUrl}/${query}`);
  await page.locator('#connection[data-state="connected"]').waitFor({ timeout: WAIT_MS });
  // Ready: connected, and every resource's subscription answered (a snapshot came).
  await page.waitForFunction(() => {
    const { ready, events } = window.pushbookDemo;
    const followed = new Set(events.filter((e) => e.topic.startsWith('resource/')).map((e) => e.topic));
    return ready && followed.size > 0 && followed.size === document.querySelectorAll('#resources li').length;
  }, null, { timeout: WAIT_MS });
  return page;
}

const bookings = (page, resource) => page.locator(`#bookings li[data-resource="${resource}"]`);
// A booking row by its key, optionally only while it has one of `statuses`.
const row = (page, key, ...statuses) => page.locator(statuses.length
  ? statuses.map((s) => `#bookings li[data-booking-key="${key}"][data-status="${s}"]`).join(', ')
  : `#bookings li[data-booking-key="${key}"]`);

// Clicks Book on `resource`; returns the key of the booking row it adds (newest first).
async function clickBook(page, resource) {
  const rows = bookings(page, resource);
  const before = await rows.count();
  await page.locator(`button[data-book="${resource}"]`).click();
  await poll(() => rows.count(), (n) => n === before + 1, `a new booking row for ${resource}`);
  return rows.first().getAttribute('data-booking-key');
}
const available = async (page, resource) =>
  Number(await page.locator(`li[data-resource="${resource}"] .available`).getAttribute('data-available'));

// The events the page logged for one topic: seqs strictly increasing by one (no gap, no double),
// statuses as expected (or as one of several expected lists).
async function assertCleanHistory(page, topic, ...expectedStatuses) {
  const events = await page.evaluate((t) => window.pushbookDemo.events.filter((e) => e.topic === t), topic);
  const seqs = events.map((e) => e.seq);
  for (let i = 1; i < seqs.length; ++i) assert.equal(seqs[i], seqs[i - 1] + 1, `seqs of ${topic}: ${seqs}`);
  const statuses = JSON.stringify(events.map((e) => e.status));
  assert.ok(expectedStatuses.some((expected) => JSON.stringify(expected) === statuses),
    `statuses of ${topic}: ${statuses}`);
  return events;
}

// --- tests -----------------------------------------------------------------------------------

test('Book: the page shows confirmed and the time from click to confirmation', TEST_OPTIONS, async () => {
  const page = await openDemo(server.url);
  assert.equal(await page.locator('#transport').textContent(), 'websocket');
  const key = await clickBook(page, 'room-101');
  await row(page, key, 'confirmed').waitFor({ timeout: WAIT_MS });
  const booking = row(page, key);
  const latency = booking.locator('.latency');
  assert.match(await latency.textContent(), /^confirmed in \d+ ms$/);
  const ms = Number(await latency.getAttribute('data-latency-ms'));
  assert.ok(ms >= DECISION_DELAY_MS - 100 && ms < WAIT_MS, `click to confirmation: ${ms} ms`);
  const id = await booking.getAttribute('data-booking-id');
  await assertCleanHistory(page, `booking/${id}`, ['processing', 'confirmed']);
  page.assertNoErrors();
});

test('from an https page: wss, and the booking confirmed as over plain http', TEST_OPTIONS, async () => {
  const certs = mkdtempSync(path.join(os.tmpdir(), 'pushbook-certs-'));
  cleanups.push(async () => rmSync(certs, { recursive: true, force: true }));
  const here = path.dirname(fileURLToPath(import.meta.url));
  execFileSync('bash', [path.resolve(here, '../../scripts/make-test-certs.sh'), certs]);
  const tls = await startServer(['--decision-delay-ms', '200', '--resource', 'room-101:10',
    '--tls-cert', path.join(certs, 'server.pem'), '--tls-key', path.join(certs, 'server.key'), '--tls-only']);
  cleanups.push(() => tls.stop());
  const page = await openDemo(`https://127.0.0.1:${tls.port}`);
  assert.equal(await page.evaluate(() => location.protocol), 'https:');
  assert.equal(await page.locator('#transport').textContent(), 'websocket');
  const key = await clickBook(page, 'room-101');
  await row(page, key, 'confirmed').waitFor({ timeout: WAIT_MS });
  const id = await row(page, key).getAttribute('data-booking-id');
  await assertCleanHistory(page, `booking/${id}`, ['processing', 'confirmed']);
  page.assertNoErrors();
});

test('a second tab sees availability drop live', TEST_OPTIONS, async () => {
  const booker = await openDemo(server.url);
  const watcher = await openDemo(server.url);
  const before = await available(watcher, 'room-102');
  assert.equal(await available(booker, 'room-102'), before);
  await booker.locator('button[data-book="room-102"]').click();
  await watcher.locator(`li[data-resource="room-102"] .available[data-available="${before - 1}"]`)
    .waitFor({ timeout: WAIT_MS });
  assert.equal(await bookings(watcher, 'room-102').count(), 0);  // the watcher booked nothing
  booker.assertNoErrors();
  watcher.assertNoErrors();
});

// Bookings the server made (an idempotent replay makes none).
async function bookingsAccepted() {
  const metrics = await (await fetch(`${server.url}/metrics`)).text();
  return Number(/^pushbook_bookings_total\{outcome="accepted"\} (\d+)$/m.exec(metrics)[1]);
}

// Cuts the network path between page and server at four moments of a booking:
// - 'request': the book request is lost; the client sends it again after reconnecting.
// - 'reply': the server booked but its reply is lost; the retry (same idempotency key) is
//   answered with the same booking.
// - 'processing, held down': the network stays down until the server has decided, so the
//   decision can only come back by the resume (replay from `since`).
// - 'processing': the client reconnects at once and the decision comes live.
// Each time: the page shows reconnecting, then connected, then confirmed; the booking's events
// have no gap and no double, one is confirmed; the server made exactly one booking.
const DROPS = [
  { name: 'book request lost', trap: 'request' },
  { name: 'book reply lost', trap: 'reply' },
  { name: 'while processing, network down until decided', holdDown: true },
  { name: 'while processing, reconnecting at once', holdDown: false },
];
for (const { name, trap, holdDown } of DROPS) {
  test(`WebSocket cut (${name}): reconnects, confirmed once`, TEST_OPTIONS, async () => {
    const proxy = await startProxy(server.port);
    cleanups.push(() => proxy.close());
    const page = await openDemo(proxy.url);
    const acceptedBefore = await bookingsAccepted();
    proxy.trap = trap ?? null;
    const key = await clickBook(page, 'concert');
    if (!trap) {
      await row(page, key, 'processing').waitFor({ timeout: WAIT_MS });
      proxy.refusing = holdDown;
      proxy.dropAll();
    }
    // Every state the badge showed, in order: a quick reconnect may show one for a few ms only.
    const states = () => page.evaluate(() => window.pushbookDemo.connection);
    await poll(states, (s) => s.slice(2).includes('reconnecting'), 'the page to notice the cut');
    if (holdDown) {
      const badge = page.locator('#connection[data-state="reconnecting"][data-attempt]');
      await badge.waitFor({ timeout: WAIT_MS });  // shown as long as the network is down
      const metrics = async () => (await fetch(`${server.url}/metrics`)).text();
      await poll(metrics, (text) => /^pushbook_bookings_in_flight 0$/m.test(text), 'the decision');
      assert.equal(await row(page, key).getAttribute('data-status'), 'processing');  // not heard of yet
      proxy.refusing = false;
    }
    const history = await poll(states, (s) => s.at(-1) === 'connected', 'the page to reconnect');
    assert.deepEqual(history, ['connecting', 'connected', 'reconnecting', 'connected']);
    await page.locator('#connection[data-state="connected"]').waitFor({ timeout: WAIT_MS });
    await row(page, key, 'confirmed').waitFor({ timeout: WAIT_MS });

    const id = await row(page, key).getAttribute('data-booking-id');
    // After a lost reply, a retry slower than the decision gets the confirmed state as a snapshot.
    const late = trap === 'reply' ? [['confirmed']] : [];
    const events = await assertCleanHistory(page, `booking/${id}`, ['processing', 'confirmed'], ...late);
    assert.equal(events.filter((e) => e.status === 'confirmed').length, 1);
    assert.equal(await bookings(page, 'concert').count(), 1);
    assert.equal(await bookingsAccepted(), acceptedBefore + 1, 'bookings the server made');
    // Only the lost reply makes the server see the same booking twice.
    assert.equal(await row(page, key).getAttribute('data-replayed'), trap === 'reply' ? 'true' : null);
    page.assertNoErrors();
  });
}

test('SSE fallback (?transport=sse): books over REST, confirmed over EventSource', TEST_OPTIONS, async () => {
  const page = await openDemo(server.url, '?transport=sse');
  assert.equal(await page.locator('#transport').textContent(), 'sse');
  const key = await clickBook(page, 'room-101');
  await row(page, key, 'confirmed').waitFor({ timeout: WAIT_MS });
  const booking = row(page, key);
  assert.match(await booking.locator('.latency').textContent(), /^confirmed in \d+ ms$/);
  const id = await booking.getAttribute('data-booking-id');
  await assertCleanHistory(page, `booking/${id}`, ['processing', 'confirmed']);
  page.assertNoErrors();
});

test('sold out: the second booking of a capacity-1 resource is rejected sold_out', TEST_OPTIONS, async () => {
  const page = await openDemo(server.url);
  assert.equal(await available(page, 'solo'), 1);
  const first = await clickBook(page, 'solo');
  await row(page, first, 'processing', 'confirmed').waitFor({ timeout: WAIT_MS });
  // The unit is taken (reserved while deciding): the button says so and cannot be clicked...
  const button = page.locator('button[data-book="solo"]');
  await poll(() => button.isDisabled(), (d) => d, 'a disabled Book button on a sold-out resource');
  assert.equal(await button.textContent(), 'Sold out');
  // ...and a booking that comes anyway (another client, or a page that had not heard yet) is
  // rejected by the server: the page's own booking function, as the button would call it.
  const rows = bookings(page, 'solo');
  await page.evaluate(() => { window.pushbookDemo.book('solo'); });
  await poll(() => rows.count(), (n) => n === 2, 'the second booking row');
  const second = await rows.first().getAttribute('data-booking-key');
  const rejected = row(page, second, 'rejected');
  await rejected.waitFor({ timeout: WAIT_MS });
  assert.equal(await rejected.getAttribute('data-reason'), 'sold_out');
  assert.equal(await rejected.locator('.reason').textContent(), 'sold out');
  await row(page, first, 'confirmed').waitFor({ timeout: WAIT_MS });
  assert.equal(await bookings(page, 'solo').count(), 2);
  assert.equal(await available(page, 'solo'), 0);
  page.assertNoErrors();
});

test('a page open past its demo token lifetime renews it and stays the same user, still connected',
  TEST_OPTIONS, async () => {
    // Tokens of 3 s: the server announces the expiry on the open WebSocket, the page renews its
    // token for the same user and refreshes; nothing disconnects and booking goes on.
    const shortLived = await startServer(['--demo-token-ttl-s', '3', '--resource', 'room-101:10']);
    cleanups.push(() => shortLived.stop());
    const page = await openDemo(shortLived.url);
    const user = await page.locator('#user').textContent();
    assert.match(user, /^demo-/);
    const tokens = () => page.evaluate(() => window.pushbookDemo.tokens);
    const all = await poll(tokens, (t) => t.length >= 2, 'a renewed token after the expiry notice', 10_000);
    assert.deepEqual(all.slice(0, 2), [{ user, renewed: false }, { user, renewed: true }]);
    assert.equal(await page.locator('#user').textContent(), user);
    const states = await page.evaluate(() => window.pushbookDemo.connection);
    assert.ok(!states.includes('reconnecting'), `connection states: ${states}`);
    const key = await clickBook(page, 'room-101');
    await row(page, key, 'confirmed').waitFor({ timeout: WAIT_MS });
    page.assertNoErrors();
  });

test('at 390 px wide nothing scrolls sideways', TEST_OPTIONS, async () => {
  const page = await openDemo(server.url);
  await page.setViewportSize({ width: 390, height: 844 });
  const key = await clickBook(page, 'room-102');
  await row(page, key, 'confirmed').waitFor({ timeout: WAIT_MS });
  const widths = await page.evaluate(() => ({
    page: document.documentElement.scrollWidth, view: document.documentElement.clientWidth }));
  assert.ok(widths.page <= widths.view, `the page is ${widths.page} px wide in a ${widths.view} px view`);
  page.assertNoErrors();
});

test('a page open across a restart with a new secret becomes a new user within 15 s and books',
  TEST_OPTIONS, async () => {
    // pushbook-server --demo without --secret makes a secret up at start: after a restart the
    // page's cached token is refused. The page must notice (GET /v1/whoami after the failed
    // upgrade), fetch a new demo user and reconnect, not retry the dead token forever.
    const first = await startServer(['--resource', 'room-101:10']);
    const page = await openDemo(first.url);
    const before = await page.locator('#user').textContent();
    const old = await clickBook(page, 'room-101');
    await row(page, old, 'confirmed').waitFor({ timeout: WAIT_MS });
    first.kill();  // SIGKILL: no goodbye to the page
    await page.locator('#connection[data-state="reconnecting"]').waitFor({ timeout: WAIT_MS });
    // Disconnected: no booking, and the figures are marked as the last known ones.
    assert.equal(await page.locator('button[data-book="room-101"]').isDisabled(), true);
    await page.locator('li.resource.stale[data-resource="room-101"]').waitFor({ timeout: WAIT_MS });
    const second = await startServer(['--port', String(first.port), '--resource', 'room-101:10']);
    cleanups.push(() => second.stop(), () => first.stop());
    const restarted = Date.now();
    await page.locator('#connection[data-state="connected"]').waitFor({ timeout: 15_000 });
    assert.ok(Date.now() - restarted < 15_000);
    const after = await page.locator('#user').textContent();
    assert.match(after, /^demo-/);
    assert.notEqual(after, before);
    const key = await clickBook(page, 'room-101');
    await row(page, key, 'confirmed').waitFor({ timeout: WAIT_MS });
    // The old user's booking is not this user's: the page says it no longer follows it, rather
    // than keep showing "confirmed".
    await row(page, old, 'unknown').waitFor({ timeout: WAIT_MS });
    assert.equal(await page.locator('li.resource.stale').count(), 0);
    page.assertNoErrors();
  });
