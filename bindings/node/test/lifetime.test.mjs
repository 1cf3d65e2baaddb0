// The package and Node's event loop: a subscription never keeps a process
// alive, and close() ends within its bound even with commands in flight.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Engine, tempDir, until } from './support.mjs';

const index = join(dirname(fileURLToPath(import.meta.url)), '..', 'index.js');

test('pending subscriptions do not keep the process alive', (t) => {
  const dir = tempDir(t);
  // Opens an engine, subscribes every way, leaves an iteration pending and
  // never closes: the script's end must be the process's end.
  const script = `
    const { Engine } = require(${JSON.stringify(index)});
    (async () => {
      const e = await Engine.open(${JSON.stringify(dir)});
      await e.create('idle', { external: true });
      e.onEffect(() => {});
      e.onTransition(() => {});
      (async () => { for await (const _ of e.transitions()) {} })();
      console.log('subscribed');
    })();
  `;
  const child = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(child.signal, null, `killed by ${child.signal}: the process did not exit by itself`);
  assert.equal(child.status, 0, child.stderr);
  assert.match(child.stdout, /subscribed/);
});

test('close() ends within its bound with instances mid-command, and settles them', async (t) => {
  const dir = tempDir(t);
  const closeTimeoutMs = 300;
  const e = await Engine.open(dir, { closeTimeoutMs });
  const names = ['m1', 'm2', 'm3'];
  const opens = new Set();
  e.onEffect((x) => x.kind === 'open' && opens.add(x.instance));
  for (const n of names) await e.create(n, { external: true });
  // Connects whose connections the host never reports on: mid-command when close() comes.
  const inFlight = names.map((n) => e.connect(n).then((s) => s.kind, (err) => err.code));
  await until(() => opens.size === names.length, 'every open effect');
  const started = Date.now();
  await e.close();
  const took = Date.now() - started;
  // The bound plus a second for the log, with room for a loaded machine.
  assert.ok(took < closeTimeoutMs + 1_000 + 5_000, `close took ${took} ms`);
  const settled = await Promise.all(inFlight);
  assert.equal(settled.length, names.length);
  for (const s of settled) assert.ok(typeof s === 'string', `${s}`);
  await assert.rejects(() => e.connect('m1'), { code: 'shutting_down' });
  // The directory is free: another engine opens it, and the instances are there (R11).
  const again = await Engine.open(dir);
  t.after(() => again.close());
  assert.deepEqual(again.list().map((v) => v.name).sort(), names);
});

test('a signal waiting for its answer keeps the process alive until it is answered', (t) => {
  const dir = tempDir(t);
  // Nothing but the signal's answer is pending when the script's code ends.
  const script = `
    const { Engine } = require(${JSON.stringify(index)});
    (async () => {
      const e = await Engine.open(${JSON.stringify(dir)});
      let generation;
      e.onEffect((x) => { if (x.kind === 'open') generation = x.generation; });
      await e.create('wait', { external: true });
      await e.connect('wait');
      while (generation === undefined) await new Promise((r) => setTimeout(r, 1));
      e.signal('wait', { kind: 'opened', generation, identity: 'me@s.whatsapp.net' })
        .then((a) => console.log('answered', a.outcome, a.state));
    })();
  `;
  const child = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(child.signal, null, `killed by ${child.signal}`);
  assert.equal(child.status, 0, child.stderr);
  assert.match(child.stdout, /answered applied Open/);
});
