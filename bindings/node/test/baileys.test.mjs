// The seeds' scenarios, through the Baileys adapter, against a socket that
// behaves as Baileys 7 does (test/fake-baileys.mjs).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { attachBaileys } from '../baileys.mjs';
import { DisconnectReason, fakeFactory } from './fake-baileys.mjs';
import { engine, until } from './support.mjs';

const FAST = {
  heartbeatIntervalMs: 200,
  heartbeatDeadlineMs: 200,
  backoffBaseMs: 50,
  backoffCapMs: 200,
  stablePeriodMs: 500,
  connectTimeoutMs: 2_000,
  pairingCodeTimeoutMs: 2_000,
  logoutTimeoutMs: 300,
  closeConnectionTimeoutMs: 300,
  cleanupTimeoutMs: 1_500,
};

const JID = '5511999999999:1@s.whatsapp.net';

/** An engine with the adapter on a fake Baileys, and one external instance connecting. */
async function session(t, name, timing = {}, options = {}) {
  const errors = [];
  const { engine: e } = await engine(t, { timing: { ...FAST, ...timing }, ...options });
  const fake = fakeFactory();
  const baileys = attachBaileys(e, { makeSocket: fake.makeSocket, onError: (err) => errors.push(err) });
  t.after(() => baileys.detach());
  await e.create(name, { external: true });
  const connected = e.connect(name).catch((err) => err);
  const sock = await until(() => fake.latest(name), 'the socket');
  return { e, fake, sock, connected, errors };
}

const kind = (e, name) => e.state(name).kind;

/** Resolves when the instance is in `wanted`; fails with its last state. */
async function reaches(e, name, wanted) {
  await until(() => kind(e, name) === wanted, `${name} to be ${wanted} (it is ${e.state(name).state})`);
}

/** Waits long enough for a reconnect to have happened (three backoff caps), then says how many sockets there are. */
async function settledSockets(fake, name) {
  await new Promise((r) => setTimeout(r, 3 * FAST.backoffCapMs + 200));
  return fake.sockets.filter((s) => s.instance === name).length;
}

test('open with the user id makes the instance Open; pings are answered by the keep-alive query', async (t) => {
  const { e, sock, connected } = await session(t, 'wa');
  sock.open(JID);
  await reaches(e, 'wa', 'Open');
  assert.equal(e.state('wa').identity, JID);
  assert.equal((await connected).kind, 'Connecting', 'connect answers once the connection is asked for');
  // Three heartbeat intervals: pongs keep it Open (R7 does not fire).
  await new Promise((r) => setTimeout(r, 3 * FAST.heartbeatIntervalMs + FAST.heartbeatDeadlineMs));
  assert.equal(kind(e, 'wa'), 'Open');
  assert.ok(sock.calls.filter((c) => c === 'query:ping').length >= 2, sock.calls.join());
});

test('PR 2520: delete of a zombie whose logout() throws "Connection Closed" ends Removed, cleanup run', async (t) => {
  // Heartbeats slow enough that the zombie is not detected first: delete meets it Open.
  const cleaned = [];
  const cleanup = { steps: ['auth-files', 'cache'], run: async (instance, step) => cleaned.push(`${instance}:${step}`) };
  const slow = { heartbeatIntervalMs: 60_000, heartbeatDeadlineMs: 10_000 };
  const { e, sock, errors } = await session(t, 'zombie', slow, { cleanup });
  sock.open(JID);
  await reaches(e, 'zombie', 'Open');
  sock.goZombie();
  const removed = await e.delete('zombie');
  assert.equal(removed.kind, 'Removed');
  assert.deepEqual(cleaned, ['zombie:auth-files', 'zombie:cache'], 'every step ran once, in order');
  assert.deepEqual(
    removed.detail.Removed.cleanup.Finished.steps.map((s) => [s.step, s.outcome]),
    [
      ['auth-files', 'Done'],
      ['cache', 'Done'],
    ],
  );
  assert.ok(sock.calls.includes('logout'), sock.calls.join());
  const inputs = (await e.history('zombie')).map((r) => Object.keys(r.event.Transition?.input ?? r.event)[0]);
  assert.ok(inputs.includes('LogoutFailed'), inputs.join());
  assert.deepEqual(errors, [], 'the throw was reported as a signal, not raised');
});

test('PR 2501: logout on a dead socket ends Closed, and a later 401 does not reconnect', async (t) => {
  const { e, fake, sock } = await session(t, 'dead', { heartbeatIntervalMs: 60_000, heartbeatDeadlineMs: 10_000 });
  sock.open(JID);
  await reaches(e, 'dead', 'Open');
  sock.goZombie();
  const out = await e.logout('dead');
  assert.equal(out.kind, 'Closed');
  sock.close(DisconnectReason.loggedOut, 'logged out'); // the dead socket's late 401
  assert.equal(await settledSockets(fake, 'dead'), 1, 'no reconnect');
  assert.equal(kind(e, 'dead'), 'Closed');
});

test('a logout on a live socket is confirmed before its close is reported', async (t) => {
  const { e, sock } = await session(t, 'bye');
  sock.open(JID);
  await reaches(e, 'bye', 'Open');
  const out = await e.logout('bye');
  assert.equal(out.kind, 'Closed');
  const inputs = (await e.history('bye')).map((r) => Object.keys(r.event.Transition?.input ?? {})[0]).filter(Boolean);
  const confirmed = inputs.indexOf('LogoutConfirmed');
  assert.ok(confirmed >= 0, inputs.join());
  assert.ok(inputs.slice(confirmed).some((i) => i.startsWith('TransportClosed') || i === 'CloseFinished'), inputs.join());
  assert.deepEqual(e.state('bye').detail.Closed.cause, { LoggedOut: { logout: 'Confirmed' } });
});

test('R6: an open without a user id never becomes Open', async (t) => {
  const { e, sock } = await session(t, 'anon');
  sock.open(undefined);
  await new Promise((r) => setTimeout(r, 300));
  assert.notEqual(kind(e, 'anon'), 'Open');
});

test('408 before open (QR refs ran out) stops; 408 after open reconnects with backoff', async (t) => {
  const before = await session(t, 'qr');
  before.sock.qr('2@ref-1');
  await until(() => before.e.state('qr').detail.Connecting?.phase?.Pairing, 'pairing');
  before.sock.close(DisconnectReason.timedOut, 'QR refs attempts ended');
  await reaches(before.e, 'qr', 'Closed');
  assert.equal(await settledSockets(before.fake, 'qr'), 1, 'no reconnect before open');

  const after = await session(t, 'lost');
  after.sock.open(JID);
  await reaches(after.e, 'lost', 'Open');
  after.sock.close(DisconnectReason.connectionLost, 'connection lost');
  await until(() => after.e.state('lost').detail.Connecting?.phase?.Backoff, 'a backoff');
  await until(() => after.fake.sockets.length === 2, 'the reconnect');
  assert.equal(after.fake.latest('lost').generation, after.sock.generation + 1);
});

test('515 right after pairing reconnects at once', async (t) => {
  const { e, fake, sock } = await session(t, 'paired', { backoffBaseMs: 60_000, backoffCapMs: 60_000 });
  sock.qr('2@ref-1');
  sock.close(DisconnectReason.restartRequired, 'restart required');
  // With a minute of backoff, only "at once" brings a second socket within the wait.
  await until(() => fake.sockets.length === 2, 'the immediate reconnect', 5_000);
  const again = fake.latest('paired');
  again.open(JID);
  await reaches(e, 'paired', 'Open');
});

for (const [status, what] of [
  [DisconnectReason.connectionReplaced, '440 (replaced)'],
  [DisconnectReason.multideviceMismatch, '411 (multi-device mismatch)'],
  [DisconnectReason.forbidden, '403 (forbidden)'],
  [DisconnectReason.loggedOut, '401 (logged out)'],
]) {
  test(`${what} after open stops`, async (t) => {
    const { e, fake, sock } = await session(t, `stop-${status}`);
    sock.open(JID);
    await reaches(e, `stop-${status}`, 'Open');
    sock.close(status);
    await reaches(e, `stop-${status}`, 'Closed');
    assert.equal(e.state(`stop-${status}`).detail.Closed.status, status);
    assert.equal(await settledSockets(fake, `stop-${status}`), 1, 'no reconnect');
  });
}

for (const status of [DisconnectReason.connectionClosed, DisconnectReason.badSession, DisconnectReason.unavailableService]) {
  test(`${status} after open reconnects`, async (t) => {
    const { e, fake, sock } = await session(t, `again-${status}`);
    sock.open(JID);
    await reaches(e, `again-${status}`, 'Open');
    sock.close(status);
    await until(() => fake.sockets.length === 2, 'the reconnect');
    fake.latest(`again-${status}`).open(JID);
    await reaches(e, `again-${status}`, 'Open');
  });
}

test('a cleanup step that throws is recorded as failed, and the delete still ends Removed', async (t) => {
  const cleanup = {
    steps: ['broken', 'after'],
    run: (instance, step) => {
      if (step === 'broken') throw new Error('disk on fire');
    },
  };
  const { e, sock } = await session(t, 'messy', {}, { cleanup });
  sock.open(JID);
  await reaches(e, 'messy', 'Open');
  const removed = await e.delete('messy');
  assert.equal(removed.kind, 'Removed');
  const [broken, after] = removed.detail.Removed.cleanup.Finished.steps;
  assert.deepEqual(broken, { step: 'broken', outcome: { Failed: { error: 'disk on fire' } } });
  assert.deepEqual(after, { step: 'after', outcome: 'Done' }, 'the next step still ran');
});

test('a connection given up while its socket is being made never keeps that socket', async (t) => {
  // A factory slower than the connect time-out: the engine gives the connection up first.
  const { engine: e } = await engine(t, { timing: { ...FAST, connectTimeoutMs: 100, backoffBaseMs: 60_000, backoffCapMs: 60_000 } });
  const made = [];
  let release;
  const slow = new Promise((r) => (release = r));
  const baileys = attachBaileys(e, {
    makeSocket: async (instance, { generation }) => {
      await slow;
      const sock = fakeFactory().makeSocket(instance, { generation });
      made.push(sock);
      return sock;
    },
  });
  t.after(() => baileys.detach());
  const givenUp = [];
  e.onEffect((x) => (x.kind === 'abort' || x.kind === 'close') && givenUp.push(x));
  await e.create('slow', { external: true });
  e.connect('slow').catch(() => {});
  // The connect time-out: the engine asks for a close (and would drop the connection after).
  await until(() => givenUp.length > 0, 'the engine giving the connection up');
  release();
  await until(() => made.length === 1, 'the late socket');
  await new Promise((r) => setTimeout(r, 50));
  assert.ok(made[0].calls.includes('ws.close'), `the late socket is dropped: ${made[0].calls}`);
  assert.equal(baileys.socket('slow'), undefined);
});
