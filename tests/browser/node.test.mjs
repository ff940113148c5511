// web/pushbook.js from Node, against a real pushbook-server: the same module the browser loads,
// with Node's own WebSocket (global from Node 22; behind --experimental-websocket in Node 20).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { serverPath, startServer } from './server.mjs';

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
// returns what it printed, one JSON value per line.
function runClient(script, user) {
  const token = execFileSync(serverPath, ['--token-for', user, '--secret', SECRET], { encoding: 'utf8' }).trim();
  const source = `import { PushbookClient } from ${JSON.stringify(path.resolve(here, '../../web/pushbook.js'))};
    const env = ${JSON.stringify({ url: server.url, token })};
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
