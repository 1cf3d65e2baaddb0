// The engine's API from JavaScript: commands, reads, errors with the REST
// codes, persistence across a reopen, and a log the CLI verifies.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Engine, LifecycleError, engine, tempDir, until } from './support.mjs';

const repo = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

test('create, state, list, history and delete of an external instance', async (t) => {
  const { engine: e } = await engine(t);
  const created = await e.create('acme', { external: true });
  assert.equal(created.name, 'acme');
  assert.equal(created.kind, 'Closed');
  assert.equal(e.state('acme').kind, 'Closed');
  assert.deepEqual(e.list().map((v) => v.name), ['acme']);
  const removed = await e.delete('acme');
  assert.equal(removed.kind, 'Removed');
  assert.deepEqual(e.list(), []);
  const history = await e.history('acme');
  assert.ok(history.length >= 2, 'created and removed are recorded');
  assert.equal(history[0].seq, 1);
  assert.ok('Created' in history[0].event, JSON.stringify(history[0].event));
});

test('errors are LifecycleErrors with the REST API codes', async (t) => {
  const { engine: e } = await engine(t);
  const code = async (f) => {
    try {
      await f();
    } catch (err) {
      assert.ok(err instanceof LifecycleError, `${err}`);
      assert.ok(err instanceof Error);
      return err.code;
    }
    assert.fail('no error');
  };
  assert.equal(await code(() => e.state('NOPE!')), 'invalid_name');
  assert.equal(await code(() => e.connect('nobody')), 'unknown_instance');
  await e.create('dup', { external: true });
  assert.equal(await code(() => e.create('dup', { external: true })), 'already_exists');
  assert.equal(await code(() => e.create('bad-url', { url: 'http://not-a-websocket' })), 'invalid_url');
  assert.equal(await code(() => e.create('both', { url: 'ws://x/', external: true })), 'invalid_body');
  await e.delete('dup');
  assert.equal(await code(() => e.connect('dup')), 'removed');
  assert.equal(await code(() => e.signal('dup', { kind: 'sideways', generation: 1 })), 'invalid_body');
  assert.equal(await code(() => Engine.open(tempDir(t), { policy: 'carrier-pigeon' })), 'invalid_option');
});

test('instances survive a close and reopen (R11)', async (t) => {
  const dir = tempDir(t);
  const first = await Engine.open(dir);
  await first.create('keep', { external: true });
  await first.create('gone', { external: true });
  await first.delete('gone');
  await first.close();
  await first.close(); // idempotent
  const again = await Engine.open(dir);
  t.after(() => again.close());
  assert.deepEqual(again.list().map((v) => v.name), ['keep']);
  assert.equal(again.state('keep').kind, 'Closed');
});

test('a log written from Node verifies with `lifecycle verify`', async (t) => {
  const dir = tempDir(t);
  const e = await Engine.open(dir);
  await e.create('a', { external: true });
  const opened = e.connect('a');
  await new Promise((r) => setTimeout(r, 50));
  await e.close();
  await opened.catch(() => {}); // interrupted by the close: either answer is fine here
  // `cargo test` passes its own build of the CLI; alone, the workspace's debug build (made if missing).
  const target = process.env.CARGO_TARGET_DIR ?? join(repo, 'target');
  const bin = process.env.INSTANCE_LIFECYCLE_CLI ?? join(target, 'debug', 'lifecycle');
  if (!existsSync(bin)) execFileSync('cargo', ['build', '--bin', 'lifecycle'], { cwd: repo, stdio: 'inherit' });
  const out = execFileSync(bin, ['verify', dir], { encoding: 'utf8' });
  assert.match(out, /clean/, out);

  // And `lifecycle replay` serves it to the dashboard: the fleet and the instance's history.
  const replay = spawn(bin, ['replay', dir, '--quiet'], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.after(() => replay.kill());
  let printed = '';
  replay.stdout.on('data', (chunk) => (printed += chunk));
  const url = await until(() => /http:\/\/127\.0\.0\.1:\d+/.exec(printed)?.[0], 'the replay URL');
  const fleet = await (await fetch(`${url}/v1/fleet`)).json();
  assert.deepEqual(fleet.instances.map((i) => i.name), ['a']);
  assert.equal(fleet.read_only, true);
  const history = await (await fetch(`${url}/v1/instances/a/history`)).json();
  assert.deepEqual(history.slice(0, 2).map((e) => e.input ?? e.event), ['created', 'connect']);
});
