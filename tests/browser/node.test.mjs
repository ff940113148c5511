// web/pushbook.js from Node, against a real pushbook-server: the same module the browser loads,
// with Node's own WebSocket (global from Node 22; behind --experimental-websocket in Node 20).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { serverPath, startPythonHost, startServer } from './server.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const SECRET = 'node-test-secret-at-least-32-bytes';
const flag = globalThis.WebSocket ? [] : ['--experimental-websocket'];
const nodeHasWebSocket = globalThis.WebSocket !== undefined ||
  process.allowedNodeEnvironmentFlags.has('--experimental-websocket');

let server;
before(async () => {
  server = await startServer(['--secret', SECRET, '--decision-delay-ms', '200', '--resource', 'room:1']);
});
after(() => server?.stop());

// Runs `script` (an ES module body with `PushbookClient` and `env` in scope) in a child Node;
// returns what it printed, one JSON value per line. `url`: another server's.
function runClient(script, user, url = server.url) {
  const token = execFileSync(serverPath, ['--token-for', user, '--secret', SECRET], { encoding: 'utf8' }).trim();
  const source = `import { PushbookClient } from ${JSON.stringify(path.resolve(here, '../../web/pushbook.js'))};
    const env = ${JSON.stringify({ url, token })};
    const print = (v) => console.log(JSON.stringify(v));
    ${script}`;
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...flag, '--input-type=module', '-e', source], { stdio: 'pipe' });
    let out = '', err = '';
    child.stdout.on('data', (c) => { out += c; });
    child.stderr.on('data', (c) => { err += c; });
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.on('exit', (code) => {
      clearTimeout(timer);
      if (code !== 0) return reject(new Error(`client exited ${code}: ${err}`));
      resolve(out.trim().split('\n').filter(Boolean).map((line) => JSON.parse(line)));
    });
  });
}

// For a runClient script: Node's WebSocket recording what the client sends (sockets[i].sent), and
// each one kept (sockets[i].close() cuts the connection).
const recordingSocket = `
  const sockets = [];
  class Recording extends WebSocket {
    constructor(...args) { super(...args); this.sent = []; sockets.push(this); }
    send(text) { this.sent.push(JSON.parse(text)); super.send(text); }
  }`;

test('from Node: book, then the decision over the same WebSocket; a second booking is sold out',
  { skip: !nodeHasWebSocket && 'this Node has no WebSocket (Node 20.10+ or 22 needed)' }, async () => {
    const lines = await runClient(`
      const client = new PushbookClient({ url: env.url, token: async () => env.token });
      await client.connect();
      for (let i = 0; i < 2; i++) {
        const { booking_id, subscription } = await client.book({ resource: 'room' });
        for await (const ev of subscription) {
          print({ i, booking_id, topic: ev.topic, seq: ev.seq, status: ev.data.status, reason: ev.data.reason });
          if (ev.data.status !== 'processing') break;
        }
      }
      print({ transport: client.transport });
      client.close();`, 'nora');
    const first = lines.filter((l) => l.i === 0);
    assert.deepEqual(first.map((l) => [l.seq, l.status]), [[1, 'processing'], [2, 'confirmed']]);
    assert.equal(first[0].topic, `booking/${first[0].booking_id}`);
    const second = lines.filter((l) => l.i === 1);
    assert.deepEqual(second.map((l) => [l.status, l.reason]).at(-1), ['rejected', 'sold_out']);
    assert.deepEqual(lines.at(-1), { transport: 'websocket' });
  });

test('from Node: the connection cut after the ACK, before the decision: the decision comes once',
  { skip: !nodeHasWebSocket && 'this Node has no WebSocket (Node 20.10+ or 22 needed)' }, async () => {
    // A server of its own that decides slowly (1.5 s): the cut and the reconnect happen well
    // before the decision, whatever the machine's load.
    const slow = await startServer(['--secret', SECRET, '--decision-delay-ms', '1500', '--resource', 'hall:10']);
    try {
      const lines = await runClient(`
        ${recordingSocket}
        const client = new PushbookClient({ url: env.url, token: async () => env.token, WebSocket: Recording,
                                            random: () => 0 });
        const opened = [];
        client.on('open', () => opened.push(Date.now()));
        await client.connect();
        const { booking_id, seq, subscription } = await client.book({ resource: 'hall' });
        print({ ack: seq });
        sockets[0].close();  // after the ACK: the client reconnects at once and resumes
        for await (const ev of subscription) {
          print({ seq: ev.seq, status: ev.data.status, ack: ev.ack === true, snapshot: ev.snapshot === true,
                  opens: opened.length });
          if (ev.data.status !== 'processing') break;
        }
        print({ resubscribe: sockets[1]?.sent.filter((m) => m.op === 'subscribe').map(({ topic, since }) =>
          ({ topic: topic === 'booking/' + booking_id, since })) });
        client.close();`, 'pia', slow.url);
      assert.deepEqual(lines, [
        { ack: 1 },
        { seq: 1, status: 'processing', ack: true, snapshot: false, opens: 1 },
        { seq: 2, status: 'confirmed', ack: false, snapshot: false, opens: 2 },  // after the reconnect
        { resubscribe: [{ topic: true, since: 1 }] },
      ]);
    } finally {
      await slow.stop();
    }
  });

test("from Node: book with follow: 'decision': the loop ends by itself after the decision, no unsubscribe",
  { skip: !nodeHasWebSocket && 'this Node has no WebSocket (Node 20.10+ or 22 needed)' }, async () => {
    const desk = await startServer(['--secret', SECRET, '--decision-delay-ms', '50', '--resource', 'desk:5']);
    try {
      const lines = await runClient(`
        ${recordingSocket}
        const client = new PushbookClient({ url: env.url, token: async () => env.token, WebSocket: Recording });
        await client.connect();
        for (let i = 0; i < 2; i++) {
          const { subscription } = await client.book({ resource: 'desk', follow: 'decision' });
          for await (const ev of subscription) print({ i, seq: ev.seq, status: ev.data.status });
        }
        print({ sent: sockets[0].sent.map((m) => m.op + (m.follow ? ':' + m.follow : '')) });
        client.close();`, 'quinn', desk.url);
      assert.deepEqual(lines, [
        { i: 0, seq: 1, status: 'processing' }, { i: 0, seq: 2, status: 'confirmed' },
        { i: 1, seq: 1, status: 'processing' }, { i: 1, seq: 2, status: 'confirmed' },
        { sent: ['book:decision', 'book:decision'] },
      ]);
    } finally {
      await desk.stop();
    }
  });

test('from Node: a resource subscription starts with a snapshot; a forbidden topic is refused',
  { skip: !nodeHasWebSocket && 'this Node has no WebSocket (Node 20.10+ or 22 needed)' }, async () => {
    const lines = await runClient(`
      const client = new PushbookClient({ url: env.url, token: env.token });
      await client.connect();
      const sub = client.subscribe('resource/room');
      for await (const ev of sub) { print({ snapshot: ev.snapshot === true, capacity: ev.data.capacity }); break; }
      try {
        for await (const ev of client.subscribe('user/somebody-else')) print({ unexpected: ev });
      } catch (e) { print({ code: e.code }); }
      client.close();`, 'olga');
    assert.deepEqual(lines, [{ snapshot: true, capacity: 1 }, { code: 'forbidden' }]);
  });

// The same client against a Python web app that serves the protocol itself (pushbook.aiohttp,
// and pushbook.asgi on FastAPI under uvicorn): web/pushbook.js cannot tell it from the gateway.
for (const kind of ['aiohttp', 'asgi']) {
  test(`from Node, against the ${kind} host: book, the decision, sold out, a forbidden topic`,
    { skip: !nodeHasWebSocket && 'this Node has no WebSocket (Node 20.10+ or 22 needed)' }, async () => {
      const host = await startPythonHost(kind, ['--secret', SECRET, '--resource', 'room:1']);
      try {
        const lines = await runClient(`
          const client = new PushbookClient({ url: env.url, token: async () => env.token });
          await client.connect();
          for (let i = 0; i < 2; i++) {
            const { subscription } = await client.book({ resource: 'room' });
            for await (const ev of subscription) {
              print({ i, seq: ev.seq, status: ev.data.status, reason: ev.data.reason ?? null });
              if (ev.data.status !== 'processing') break;
            }
          }
          try {
            for await (const ev of client.subscribe('user/somebody-else')) print({ unexpected: ev });
          } catch (e) { print({ code: e.code }); }
          print({ transport: client.transport });
          client.close();`, 'quinn', host.url);
        assert.deepEqual(lines, [
          { i: 0, seq: 1, status: 'processing', reason: null },
          { i: 0, seq: 2, status: 'confirmed', reason: null },
          { i: 1, seq: 1, status: 'processing', reason: null },
          { i: 1, seq: 2, status: 'rejected', reason: 'sold_out' },
          { code: 'forbidden' },
          { transport: 'websocket' },
        ]);
      } finally {
        await host.stop();
      }
    });
}
