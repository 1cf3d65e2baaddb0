'use strict';
// The instance-lifecycle engine in this process. See index.d.ts for the API
// and README.md ("From Node") for a Baileys host.

const { join } = require('node:path');

const native = require(process.env.INSTANCE_LIFECYCLE_ADDON ?? join(__dirname, 'instance_lifecycle.node'));

/** An error of the engine: `code` is the REST API's error code. */
class LifecycleError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'LifecycleError';
    this.code = code;
  }
}

/** The native side says `[code] message`; JavaScript gets `error.code`. */
function coded(e) {
  const m = /^\[([a-z_]+)\] ([\s\S]*)$/.exec(e instanceof Error ? e.message : '');
  return m ? new LifecycleError(m[1], m[2]) : e;
}

async function settle(promise) {
  try {
    return await promise;
  } catch (e) {
    throw coded(e);
  }
}

function now(f) {
  try {
    return f();
  } catch (e) {
    throw coded(e);
  }
}

/** Signal kinds by index, as the native side reads them (SIGNAL_KINDS in src/lib.rs). */
const SIGNAL_KINDS = [
  'opened', 'pairing', 'closed', 'writeFailed', 'heartbeatMissed', 'pong', 'logoutConfirmed', 'logoutFailed',
  'closeFinished', 'reconnectRequested', 'sessionInvalid', 'heartbeatDue', 'handshakeStep',
];
const SIGNAL_INDEX = new Map(SIGNAL_KINDS.map((k, i) => [k, i]));
/** Kinds that carry nothing beyond their generation: no object crosses for them. */
const BARE = new Set(['heartbeatMissed', 'pong', 'logoutConfirmed', 'closeFinished', 'reconnectRequested', 'handshakeStep']);

/** State kinds by index, as the native side packs them. */
const KINDS = ['Connecting', 'Open', 'Closing', 'Closed', 'Zombie', 'Removed'];

const EFFECTS = { open: 'open', send_logout: 'sendLogout', close: 'close', ping: 'ping', abort: 'abort' };

function fromNativeEffect(e) {
  const { effect, ...rest } = e;
  return { kind: EFFECTS[effect] ?? effect, ...rest };
}

function fromNativeFrame(f) {
  return f.binary === undefined ? f : { ...f, binary: Buffer.from(f.binary) };
}

class Engine {
  #native;
  #onCallbackError;
  #subscriptions = new Set();
  /** ticket → { resolve, reject } of signals waiting for their answer. */
  #pending = new Map();
  /** A timer that keeps Node alive while signals wait (the answers' way back does not). */
  #keepAlive = null;
  /** Signals of this turn of the event loop, handed over together (in order) at its end. */
  #outbox = [];

  constructor(handle, onCallbackError) {
    this.#native = handle;
    this.#onCallbackError = onCallbackError;
    handle.onAnswers((answers) => this.#answered(answers));
  }

  /** Answers packed by the native side: four numbers each (see `Answers` in src/lib.rs). */
  #answered(answers) {
    const numbers = answers?.numbers ?? [];
    for (let i = 0; i + 3 < numbers.length; i += 4) {
      const waiting = this.#pending.get(numbers[i]);
      if (waiting === undefined) continue;
      this.#pending.delete(numbers[i]);
      const [outcome, which, generation] = [numbers[i + 1], numbers[i + 2], numbers[i + 3]];
      if (outcome === 2) waiting.reject(coded(new Error(answers.errors[which])));
      else waiting.resolve({ outcome: outcome === 1 ? 'ignored' : 'applied', state: KINDS[which], generation });
    }
    if (this.#pending.size === 0 && this.#keepAlive !== null) {
      clearInterval(this.#keepAlive);
      this.#keepAlive = null;
    }
  }

  /**
   * Opens the engine on the log in `dir` (created if missing) and restores
   * every instance in it.
   */
  static async open(dir, options = {}) {
    const { onCallbackError, cleanup, ...rest } = options;
    let steps;
    let run;
    if (cleanup !== undefined) {
      if (!Array.isArray(cleanup?.steps) || typeof cleanup?.run !== 'function') {
        throw new LifecycleError('invalid_option', 'cleanup: { steps: string[], run(instance, step) }');
      }
      steps = cleanup.steps.map(String);
      // Never throws, never rejects: a step that fails answers its message,
      // which the log records as that step's failure; the delete goes on.
      run = ({ instance, step }) =>
        Promise.resolve()
          .then(() => cleanup.run(instance, step))
          .then(
            () => null,
            (e) => String(e?.message ?? e),
          );
    }
    const handle = await settle(native.NativeEngine.open(String(dir), rest, steps, run));
    return new Engine(handle, onCallbackError);
  }

  create(name, spec) {
    return settle(Promise.resolve().then(() => this.#native.create(name, spec ?? {})));
  }

  connect(name) {
    return this.#command(name, 'connect');
  }

  logout(name) {
    return this.#command(name, 'logout');
  }

  restart(name) {
    return this.#command(name, 'restart');
  }

  delete(name) {
    return this.#command(name, 'delete');
  }

  #command(name, command) {
    return settle(Promise.resolve().then(() => this.#native.command(name, command)));
  }

  state(name) {
    return now(() => this.#native.state(name));
  }

  list() {
    return now(() => this.#native.list());
  }

  history(name) {
    return settle(Promise.resolve().then(() => this.#native.history(name)));
  }

  /**
   * Reports what a connection the host holds did. Signals are applied in
   * the order of calls: the signals of one turn of the event loop are put
   * in line together, in that order, when the turn ends. The promise
   * settles with what the rules made of it: `outcome` is `'applied'` or
   * `'ignored'` (a signal of an older generation: R12).
   */
  signal(name, signal) {
    if (signal === null || typeof signal !== 'object') {
      return Promise.reject(new LifecycleError('invalid_body', 'a signal is an object: { kind, generation, ... }'));
    }
    const kind = SIGNAL_INDEX.get(signal.kind);
    if (kind === undefined) {
      const known = SIGNAL_KINDS.join(', ');
      return Promise.reject(new LifecycleError('invalid_body', `signal kind ${JSON.stringify(signal.kind)}: one of ${known}`));
    }
    if (this.#keepAlive === null) this.#keepAlive = setInterval(() => {}, 1 << 30);
    return new Promise((resolve, reject) => {
      const entry = { name: String(name), kind, signal, resolve, reject };
      if (this.#outbox.push(entry) === 1) queueMicrotask(() => this.#flush());
    });
  }

  /** Hands this turn's signals to the engine in one call, in the order they were reported. */
  #flush() {
    const batch = this.#outbox;
    this.#outbox = [];
    const kinds = new Uint8Array(batch.length);
    const generations = new Float64Array(batch.length);
    batch.forEach((b, i) => {
      kinds[i] = b.kind;
      generations[i] = typeof b.signal.generation === 'number' ? b.signal.generation : Number.NaN;
    });
    const extras = batch.map((b) => (BARE.has(b.signal.kind) ? null : b.signal));
    let taken;
    try {
      taken = this.#native.signals(batch.map((b) => b.name), kinds, generations, extras);
    } catch (e) {
      for (const b of batch) b.reject(coded(e));
      this.#answered(null);
      return;
    }
    const refused = new Map(taken.refused.map((r) => [r.index, r.error]));
    let ticket = taken.first;
    batch.forEach((b, i) => {
      const error = refused.get(i);
      if (error !== undefined) b.reject(coded(new Error(error)));
      else this.#pending.set(ticket++ >>> 0, b);
    });
    this.#answered(null);
  }

  /** Calls `callback(effect)` for each effect of a host-held connection, in order. Returns the unsubscribe function. */
  onEffect(callback) {
    return this.#subscribe('onEffect', callback, fromNativeEffect);
  }

  /**
   * Sends an application frame (a string, or a Buffer/Uint8Array for a
   * binary frame) on an engine-held connection that is Open. Never waits on
   * the socket; throws `not_open`, `send_queue_full`, `rate_limited`, … .
   */
  send(name, frame) {
    if (typeof frame === 'string') return now(() => this.#native.send(name, frame, undefined));
    if (frame instanceof Uint8Array) return now(() => this.#native.send(name, undefined, Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength)));
    throw new LifecycleError('invalid_body', 'send: a string or a Buffer');
  }

  /**
   * Calls `callback(frame)` for every application frame received on an
   * engine-held connection (`{instance, generation, text}` or
   * `{instance, generation, binary}`), and `{missed}` when callbacks fell
   * behind the engine's ring. Returns the unsubscribe function.
   */
  onFrame(callback) {
    return this.#subscribe('onFrame', callback, fromNativeFrame);
  }

  /** Calls `callback(transition)` after every transition. Returns the unsubscribe function. */
  onTransition(callback) {
    return this.#subscribe('onTransition', callback, (t) => t);
  }

  /**
   * Every transition from now on, as an async iterator. Ending the loop
   * (`break`) unsubscribes; a pending iteration never keeps Node alive.
   */
  transitions() {
    const queue = [];
    const waiting = [];
    let done = false;
    const unsubscribe = this.onTransition((t) => {
      const next = waiting.shift();
      if (next) next({ value: t, done: false });
      else queue.push(t);
    });
    const finish = () => {
      done = true;
      unsubscribe();
      for (const next of waiting.splice(0)) next({ value: undefined, done: true });
      return Promise.resolve({ value: undefined, done: true });
    };
    return {
      next: () => {
        if (queue.length > 0) return Promise.resolve({ value: queue.shift(), done: false });
        if (done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => waiting.push(resolve));
      },
      return: finish,
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  #subscribe(method, callback, shape) {
    if (typeof callback !== 'function') throw new LifecycleError('invalid_body', `${method}: a callback function`);
    // A throw in the host's callback is the host's: it is reported, and the
    // engine (which never waits for callbacks) goes on.
    const guarded = (value) => {
      try {
        callback(shape(value));
      } catch (e) {
        if (this.#onCallbackError) this.#onCallbackError(e, value);
        else process.emitWarning(`instance-lifecycle: a ${method} callback threw: ${e?.stack ?? e}`);
      }
    };
    const id = now(() => this.#native[method](guarded));
    const unsubscribe = () => {
      if (this.#subscriptions.delete(unsubscribe)) this.#native.unsubscribe(id);
    };
    this.#subscriptions.add(unsubscribe);
    return unsubscribe;
  }

  /**
   * Stops every instance and closes the log, within `closeTimeoutMs`
   * (instances still mid-command then are stopped where they are). Ends
   * every subscription. Calling it again does nothing.
   */
  async close() {
    for (const unsubscribe of [...this.#subscriptions]) unsubscribe();
    try {
      await settle(this.#native.close());
    } finally {
      // Answers the engine still owed were handed over before close returned;
      // let them be settled, then fail whatever is left.
      await new Promise((r) => setImmediate(r));
      for (const [, waiting] of this.#pending) waiting.reject(new LifecycleError('shutting_down', 'the engine closed before answering'));
      this.#answered(null);
    }
  }
}

module.exports = { Engine, LifecycleError };
