// A pushbook-server child process on a free loopback port, for the tests in this directory.
//   PUSHBOOK_SERVER   the server binary (default: build/bin/pushbook-server)
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const serverPath = process.env.PUSHBOOK_SERVER ?? path.resolve(here, '../../build/bin/pushbook-server');

/**
 * Starts `pushbook-server --port 0 ...args`; resolves once it listens. Unless `args` names a
 * store, the server keeps its bookings in a SQLite file of a temporary directory (`dir`), removed
 * by stop().
 */
export async function startServer(args) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pushbook-browser-'));
  const store = args.includes('--store') ? [] : ['--store', `sqlite:${path.join(dir, 'pushbook.db')}`];
  return watch(spawn(serverPath, ['--port', '0', ...store, ...args], { stdio: ['ignore', 'pipe', 'pipe'] }), dir,
    serverPath);
}

/**
 * A Python web app serving the protocol through pushbook's adapter (tests/python/protocol_host.py;
 * `kind`: aiohttp or asgi), with the Python module of build/python (or PUSHBOOK_PYTHONPATH), run by
 * /usr/bin/python3 (where Debian's aiohttp, FastAPI and uvicorn are).
 */
export async function startPythonHost(kind, args) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pushbook-browser-'));
  const script = path.resolve(here, '../python/protocol_host.py');
  const env = { ...process.env,
                PYTHONPATH: process.env.PUSHBOOK_PYTHONPATH ?? path.resolve(path.dirname(serverPath), '../python') };
  return watch(spawn('/usr/bin/python3', [script, '--kind', kind, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env }),
    dir, `protocol_host.py --kind ${kind}`);
}

async function watch(child, dir, name) {
  let output = '';
  child.stdout.on('data', (chunk) => { output += chunk; });
  child.stderr.on('data', (chunk) => { output += chunk; });  // kept for failure messages only
  const port = await new Promise((resolve, reject) => {
    const fail = (why) => { clearTimeout(timer); reject(new Error(`${name}: ${why}\n${output}`)); };
    const timer = setTimeout(() => fail('no "listening" line within 10 s'), 10_000);
    child.on('error', (error) => fail(error.message));
    child.on('exit', (code, signal) => fail(`exited (${code ?? signal})`));
    child.stdout.on('data', () => {
      const match = /listening on https?:\/\/[\d.]+:(\d+) /.exec(output);  // the whole port
      if (match) { clearTimeout(timer); resolve(Number(match[1])); }
    });
  });
  child.removeAllListeners('exit');
  return {
    port,
    dir,
    url: `http://127.0.0.1:${port}`,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
        await exited;
        clearTimeout(timer);
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
    kill() { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL'); },
  };
}
