// Host-driven sessions from JavaScript: effects arrive in order, signals
// are applied in the order reported, stale generations are ignored (R12),
// and an open without identity never opens (R6).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { engine, until } from './support.mjs';

/** Effects of one instance, as they arrive. */
function recorder(e, name) {
  const seen = [];
  e.onEffect((effect) => {
    if (effect.instance === name) seen.push(effect);
  });
  return seen;
}

test('connect asks the host to open; opened with an identity makes it Open', async (t) => {
  const { engine: e } = await engine(t);
  await e.create('acme', { external: true });
  const effects = recorder(e, 'acme');
  const connecting = e.connect('acme');
  const open = await until(() => effects.find((x) => x.kind === 'open'), 'the open effect');
  assert.equal(open.resume, null);
  const answer = await e.signal('acme', { kind: 'opened', generation: open.generation, identity: '5511@s.whatsapp.net' });
  assert.equal(answer.outcome, 'applied');
  assert.equal(answer.state, 'Open');
  await connecting;
  const state = e.state('acme');
  assert.equal(state.kind, 'Open');
  assert.equal(state.identity, '5511@s.whatsapp.net');
});

test('an open without an identity never becomes Open (R6)', async (t) => {
  const { engine: e } = await engine(t);
  await e.create('anon', { external: true });
  const effects = recorder(e, 'anon');
  e.connect('anon').catch(() => {});
  const open = await until(() => effects.find((x) => x.kind === 'open'), 'the open effect');
  await e.signal('anon', { kind: 'opened', generation: open.generation });
  assert.notEqual(e.state('anon').kind, 'Open');
});

test('a signal of an older generation is ignored (R12)', async (t) => {
  const { engine: e } = await engine(t);
  await e.create('gen', { external: true });
  const effects = recorder(e, 'gen');
  e.connect('gen').catch(() => {});
  const first = await until(() => effects.find((x) => x.kind === 'open'), 'the first open');
  // The peer closes with a status that reconnects: a second connection, a new generation.
  await e.signal('gen', { kind: 'closed', generation: first.generation, status: 428, reason: 'connection closed' });
  const second = await until(
    () => effects.find((x) => x.kind === 'open' && x.generation > first.generation),
    'the reconnect',
  );
  const stale = await e.signal('gen', { kind: 'opened', generation: first.generation, identity: '1@s.whatsapp.net' });
  assert.equal(stale.outcome, 'ignored');
  assert.notEqual(e.state('gen').kind, 'Open');
  const fresh = await e.signal('gen', { kind: 'opened', generation: second.generation, identity: '1@s.whatsapp.net' });
  assert.equal(fresh.outcome, 'applied');
  assert.equal(e.state('gen').kind, 'Open');
});

test('signals reported without awaiting are applied in the order reported', async (t) => {
  const { engine: e } = await engine(t);
  const names = ['o1', 'o2', 'o3', 'o4'];
  const effects = [];
  e.onEffect((x) => effects.push(x));
  const transitions = [];
  e.onTransition((x) => transitions.push(x));
  for (const n of names) await e.create(n, { external: true });
  for (const n of names) e.connect(n).catch(() => {});
  const opens = await until(() => {
    const found = names.map((n) => effects.find((x) => x.instance === n && x.kind === 'open'));
    return found.every(Boolean) && found;
  }, 'every open');
  // For each instance, in one synchronous burst: opened, pong, then a final
  // close (401: logged out, never reconnects). In order that ends Closed; if
  // the close overtook the open it would be ignored or the open would be.
  const answers = [];
  for (const open of opens) {
    const g = open.generation;
    answers.push(e.signal(open.instance, { kind: 'opened', generation: g, identity: `${open.instance}@s.whatsapp.net` }));
    answers.push(e.signal(open.instance, { kind: 'pong', generation: g }));
    answers.push(e.signal(open.instance, { kind: 'closed', generation: g, status: 401, reason: 'logged out' }));
  }
  const outcomes = (await Promise.all(answers)).map((a) => a.outcome);
  assert.deepEqual(outcomes, Array(answers.length).fill('applied'));
  for (const n of names) {
    const s = e.state(n);
    assert.equal(s.kind, 'Closed', `${n}: ${s.state}`);
    // Transitions reach JavaScript on their own channel, possibly after the answers.
    const mine = () => transitions.filter((x) => x.instance === n).map((x) => x.input);
    await until(() => mine().includes('closed'), `${n}'s closed transition`);
    assert.deepEqual(mine().slice(-2), ['opened', 'closed'], `${n}: ${mine()}`);
  }
});

test('a throw in a callback is reported and breaks nothing', async (t) => {
  const errors = [];
  const { engine: e } = await engine(t, { onCallbackError: (err) => errors.push(err) });
  e.onTransition(() => {
    throw new Error('a bug in the host');
  });
  await e.create('sturdy', { external: true });
  e.connect('sturdy').catch(() => {});
  await until(() => errors.length > 0, 'the reported throw');
  assert.match(errors[0].message, /a bug in the host/);
  const removed = await e.delete('sturdy');
  assert.equal(removed.kind, 'Removed');
});

test('a refused signal in a burst is rejected alone; the others are applied', async (t) => {
  const { engine: e } = await engine(t);
  await e.create('burst', { external: true });
  const effects = recorder(e, 'burst');
  e.connect('burst').catch(() => {});
  const open = await until(() => effects.find((x) => x.kind === 'open'), 'the open effect');
  const g = open.generation;
  const [opened, bad, badKind, pong] = await Promise.allSettled([
    e.signal('burst', { kind: 'opened', generation: g, identity: 'me@s.whatsapp.net' }),
    e.signal('burst', { kind: 'closed', generation: -1, status: 428 }),
    e.signal('burst', { kind: 'sideways', generation: g }),
    e.signal('burst', { kind: 'pong', generation: g }),
  ]);
  assert.equal(opened.value?.outcome, 'applied');
  assert.equal(bad.reason?.code, 'invalid_body');
  assert.equal(badKind.reason?.code, 'invalid_body');
  assert.equal(pong.value?.outcome, 'applied');
  assert.equal(e.state('burst').kind, 'Open', 'the refused close changed nothing');
});

test('a peer that asks for a reconnect is resumed; an invalid session is not (R13, R14); its heartbeat schedule is kept (R7); a queued handshake reports itself (R15)', async (t) => {
  const { engine: e } = await engine(t);
  await e.create('shard-0', { external: true });
  const effects = recorder(e, 'shard-0');
  e.connect('shard-0').catch(() => {});
  const first = await until(() => effects.find((x) => x.kind === 'open'), 'the first open');
  await e.signal('shard-0', { kind: 'opened', generation: first.generation, identity: 'session-1' });

  // R13: the old connection is closed with 1012 (never 1000/1001, which would end the session) and the next resumes it.
  const asked = await e.signal('shard-0', { kind: 'reconnectRequested', generation: first.generation });
  assert.equal(asked.outcome, 'applied');
  const closed = await until(() => effects.find((x) => x.kind === 'close' && x.generation === first.generation), 'the close');
  assert.equal(closed.status, 1012);
  const second = await until(
    () => effects.find((x) => x.kind === 'open' && x.generation > first.generation),
    'the resuming open',
  );
  assert.equal(second.resume, 'session-1');
  await e.signal('shard-0', { kind: 'opened', generation: second.generation, identity: 'session-1' });

  // R7: an acknowledgement that sets the schedule; the next ping comes after afterMs, not the policy's 30 s.
  const acked = Date.now();
  await e.signal('shard-0', { kind: 'heartbeatDue', generation: second.generation, afterMs: 40 });
  await until(() => effects.find((x) => x.kind === 'ping' && x.generation === second.generation), 'the ping');
  assert.ok(Date.now() - acked < 20_000, 'the ping came on the peer\'s schedule');

  // R14: the session is gone; the next connection starts anew, after the wait the protocol chose.
  await e.signal('shard-0', { kind: 'sessionInvalid', generation: second.generation, retryAfterMs: 50 });
  const third = await until(
    () => effects.find((x) => x.kind === 'open' && x.generation > second.generation),
    'the fresh open',
  );
  assert.equal(third.resume, null, 'an invalid session is never resumed');
  // R15: queued behind the fleet for its IDENTIFY; the report is applied, and the handshake goes on.
  const queued = await e.signal('shard-0', { kind: 'handshakeStep', generation: third.generation });
  assert.equal(queued.outcome, 'applied');
  assert.equal(queued.state, 'Connecting');

  // A wait beyond an hour, or a heartbeatDue without one, is refused as a bad body.
  await assert.rejects(
    e.signal('shard-0', { kind: 'sessionInvalid', generation: third.generation, retryAfterMs: 4_000_000 }),
    (err) => err.code === 'invalid_body' && /an hour/.test(err.message),
  );
  await assert.rejects(
    e.signal('shard-0', { kind: 'heartbeatDue', generation: third.generation }),
    (err) => err.code === 'invalid_body' && /afterMs/.test(err.message),
  );
});
