// The Baileys adapter: the engine decides, Baileys carries out.
//
// It turns the engine's effects for `external` instances into Baileys calls
// (`open` → your socket factory, `sendLogout` → `sock.logout()`, `close` →
// `sock.end(...)`, `ping` → a keep-alive query, `abort` → `sock.ws.close()`)
// and each socket's `connection.update` into signals (`qr` → pairing,
// `connection: 'open'` → opened with `sock.user.id`, `connection: 'close'` →
// closed with `lastDisconnect.error.output.statusCode`). It does not import
// Baileys: you pass the factory (`makeWASocket` with your auth state), so it
// works with any Baileys 6/7 build and is tested against a fake.
//
//   import { Engine } from 'instance-lifecycle';
//   import { attachBaileys } from 'instance-lifecycle/baileys.mjs';
//   const engine = await Engine.open('./data');
//   const baileys = attachBaileys(engine, {
//     makeSocket: async (instance, { resume }) => makeWASocket({ auth: await authFor(instance) }),
//   });

/** Baileys' keep-alive: the IQ it sends itself every `keepAliveIntervalMs`. */
const PING = { tag: 'iq', attrs: { to: 's.whatsapp.net', type: 'get', xmlns: 'w:p' }, content: [{ tag: 'ping', attrs: {} }] };

function statusOf(update) {
  const error = update.lastDisconnect?.error;
  const status = error?.output?.statusCode ?? error?.statusCode;
  return Number.isInteger(status) ? status : null;
}

function reasonOf(update) {
  const error = update.lastDisconnect?.error;
  return String(error?.message ?? error ?? '');
}

/**
 * Drives Baileys sockets for every `external` instance of `engine`.
 *
 * @param {import('./index').Engine} engine
 * @param {object} options
 * @param {(instance: string, open: { generation: number, resume: string | null }) => any} options.makeSocket
 *   Makes (or resolves to) a Baileys socket for the instance.
 * @param {(sock: any) => Promise<unknown>} [options.ping] Answers a ping (default: Baileys' keep-alive query).
 * @param {number} [options.pingTimeoutMs] How long a ping may take (default 10 000).
 * @param {(error: unknown, context: object) => void} [options.onError] Errors of the adapter (default: a warning).
 * @returns {{ detach(): void, socket(instance: string): any }}
 */
export function attachBaileys(engine, options) {
  const { makeSocket, ping = (sock) => sock.query(PING), pingTimeoutMs = 10_000 } = options;
  const onError =
    options.onError ?? ((error, context) => process.emitWarning(`instance-lifecycle/baileys: ${JSON.stringify(context)}: ${error}`));
  if (typeof makeSocket !== 'function') throw new TypeError('attachBaileys: options.makeSocket must be a function');

  /** instance → { sock, generation, closing, logout, deferred, ended, off } */
  const connections = new Map();

  const report = (instance, signal) =>
    engine.signal(instance, signal).catch((error) => onError(error, { instance, signal: signal.kind }));

  function forget(instance, generation) {
    const c = connections.get(instance);
    if (c && c.generation === generation) {
      c.off();
      connections.delete(instance);
    }
  }

  function closed(c, instance, update) {
    if (c.ended) return;
    c.ended = true;
    const signal = {
      kind: 'closed',
      generation: c.generation,
      status: c.closing ?? statusOf(update),
      reason: reasonOf(update),
      initiator: c.closing !== undefined || c.logout ? 'local' : 'peer',
    };
    if (c.logout) {
      // Baileys' logout() ends the socket before it resolves: report the
      // logout's outcome first, then the close (the order the engine expects).
      c.deferred = signal;
      return;
    }
    report(instance, signal);
    forget(instance, c.generation);
  }

  async function open(instance, generation, resume) {
    // In place before the factory is awaited: an `abort` or `close` that
    // comes meanwhile finds it, and the socket is dropped once it exists.
    const c = { sock: undefined, generation, closing: undefined, logout: false, deferred: undefined, ended: false, off: () => {} };
    const previous = connections.get(instance);
    if (previous) previous.off();
    connections.set(instance, c);
    let sock;
    try {
      sock = await makeSocket(instance, { generation, resume });
    } catch (error) {
      forget(instance, generation);
      report(instance, { kind: 'closed', generation, status: null, reason: `socket factory failed: ${error?.message ?? error}`, initiator: 'transport' });
      return;
    }
    c.sock = sock;
    if (c.ended || connections.get(instance) !== c) {
      // Given up while it was being made (aborted, or a newer connection): drop it.
      try {
        sock.ws?.close();
      } catch (error) {
        onError(error, { instance, effect: 'abort' });
      }
      return;
    }
    const onUpdate = (update) => {
      if (update.qr) report(instance, { kind: 'pairing', generation, code: update.qr });
      if (update.connection === 'open') {
        report(instance, { kind: 'opened', generation, identity: sock.user?.id ?? null });
      } else if (update.connection === 'close') {
        closed(c, instance, update);
      }
    };
    sock.ev.on('connection.update', onUpdate);
    c.off = () => sock.ev.off?.('connection.update', onUpdate);
  }

  async function logout(instance, c) {
    c.logout = true;
    let signal;
    try {
      await c.sock.logout();
      signal = { kind: 'logoutConfirmed', generation: c.generation };
    } catch (error) {
      // A dead socket's logout throws ("Connection Closed", PR 2520): reported, never thrown at the host.
      signal = { kind: 'logoutFailed', generation: c.generation, error: String(error?.message ?? error) };
    }
    c.logout = false;
    report(instance, signal);
    if (c.deferred) {
      report(instance, c.deferred);
      forget(instance, c.generation);
    }
  }

  async function answerPing(instance, c) {
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error('ping timed out')), pingTimeoutMs);
      timer.unref?.();
    });
    try {
      await Promise.race([ping(c.sock), late]);
      report(instance, { kind: 'pong', generation: c.generation });
    } catch {
      // No pong: the engine's heartbeat deadline decides (R7), not the adapter.
    } finally {
      clearTimeout(timer);
    }
  }

  const unsubscribe = engine.onEffect((effect) => {
    const { instance, generation } = effect;
    if (effect.kind === 'open') {
      open(instance, generation, effect.resume).catch((error) => onError(error, { instance, effect: 'open' }));
      return;
    }
    const c = connections.get(instance);
    if (!c || c.generation !== generation) return; // an older connection's: nothing of ours holds it
    if (c.sock === undefined) {
      // The socket is still being made: only giving it up can be done now.
      if (effect.kind === 'abort') {
        c.ended = true;
        connections.delete(instance);
      } else if (effect.kind === 'close') {
        c.ended = true;
        connections.delete(instance);
        report(instance, { kind: 'closed', generation, status: effect.status, reason: 'closed before the socket was made', initiator: 'local' });
      }
      return;
    }
    switch (effect.kind) {
      case 'sendLogout':
        logout(instance, c).catch((error) => onError(error, { instance, effect: 'sendLogout' }));
        break;
      case 'close':
        if (c.ended) {
          report(instance, { kind: 'closeFinished', generation });
          forget(instance, generation);
        } else {
          c.closing = effect.status;
          try {
            c.sock.end(Object.assign(new Error('closed by the engine'), { output: { statusCode: effect.status } }));
          } catch (error) {
            onError(error, { instance, effect: 'close' });
          }
        }
        break;
      case 'ping':
        answerPing(instance, c);
        break;
      case 'abort':
        // The engine gave the connection up: drop it without a goodbye, and stop listening.
        c.ended = true;
        forget(instance, generation);
        try {
          c.sock.ws?.close();
        } catch (error) {
          onError(error, { instance, effect: 'abort' });
        }
        break;
      default:
        break;
    }
  });

  return {
    /** Stops driving sockets (those open stay open). */
    detach() {
      unsubscribe();
      for (const c of connections.values()) c.off();
      connections.clear();
    },
    /** The socket the adapter holds for an instance, if any. */
    socket(instance) {
      return connections.get(instance)?.sock;
    },
  };
}
