// The session's own traffic from JavaScript: on an engine-held connection
// (`lifecycle peer`, the reference peer, which echoes application frames),
// `send` writes frames in order and `onFrame` hears the echoes; `send` in
// any other state throws with the state's code.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { engine, until, LifecycleError } from './support.mjs';

const repo = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/** `lifecycle peer` in its own process; its URL. */
async function peer(t) {
  const target = process.env.CARGO_TARGET_DIR ?? join(repo, 'target');
  const bin = process.env.INSTANCE_LIFECYCLE_CLI ?? join(target, 'debug', 'lifecycle');
  if (!existsSync(bin)) execFileSync('cargo', ['build', '--bin', 'lifecycle'], { cwd: repo, stdio: 'inherit' });
  const child = spawn(bin, ['peer'], { stdio: ['pipe', 'pipe', 'inherit'] });
  t.after(() => child.kill());
  let printed = '';
  child.stdout.on('data', (chunk) => (printed += chunk));
  return until(() => /listening (ws:\/\/\S+)/.exec(printed)?.[1], 'the peer URL');
}

test('send writes frames in order and onFrame hears the echoes', async (t) => {
  const url = await peer(t);
  const { engine: e } = await engine(t);
  await e.create('chat', { url });
  assert.throws(() => e.send('chat', '{"type":"chat"}'), (err) => err instanceof LifecycleError && err.code === 'not_open');
  await e.connect('chat');
  await until(() => e.state('chat').kind === 'Open', 'Open');
  const heard = [];
  const unsubscribe = e.onFrame((f) => heard.push(f));
  for (let n = 0; n < 20; n++) e.send('chat', JSON.stringify({ type: 'chat', n }));
  await until(() => heard.length >= 20, '20 echoes');
  assert.deepEqual(heard.map((f) => JSON.parse(f.text).n), [...Array(20).keys()]);
  assert.ok(heard.every((f) => f.instance === 'chat' && f.generation === heard[0].generation));
  unsubscribe();
  e.send('chat', '{"type":"chat","n":99}');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(heard.length, 20, 'nothing after unsubscribing');
  assert.throws(() => e.send('chat', 42), (err) => err.code === 'invalid_body');
  assert.throws(() => e.send('nobody', 'x'), (err) => err.code === 'unknown_instance');
  await e.create('held', { external: true });
  assert.throws(() => e.send('held', 'x'), (err) => err.code === 'not_open' || err.code === 'host_driven');
});
