// A Baileys-shaped fake socket, behaving as Baileys 7 does where the
// adapter can see it: `ev` emits `connection.update` ({ connection, qr,
// isNewLogin, lastDisconnect: { error: Boom-like with output.statusCode } }),
// `user.id` is set on open, `logout()` sends and then ends the socket with
// 401 before it resolves (and throws "Connection Closed" on a dead socket),
// `end(error)` emits the close with the error's status, `ws.close()` drops
// it, and `query(node)` answers the keep-alive ping while the link is up.
import { EventEmitter } from 'node:events';

export const DisconnectReason = {
  connectionClosed: 428,
  connectionLost: 408,
  connectionReplaced: 440,
  timedOut: 408,
  loggedOut: 401,
  badSession: 500,
  restartRequired: 515,
  multideviceMismatch: 411,
  forbidden: 403,
  unavailableService: 503,
};

function boom(message, statusCode) {
  return Object.assign(new Error(message), { isBoom: true, output: { statusCode, payload: { statusCode, message } } });
}

export class FakeSocket {
  constructor(instance, generation) {
    this.instance = instance;
    this.generation = generation;
    this.ev = new EventEmitter();
    this.user = undefined;
    this.state = 'connecting'; // connecting | open | closed
    this.zombie = false; // half-open: nothing answers, nothing closes
    this.calls = [];
    this.ws = { close: () => this.calls.push('ws.close') };
  }

  #emit(update) {
    this.ev.emit('connection.update', update);
  }

  // -- what the network does (driven by the test) --
  qr(code) {
    this.#emit({ qr: code });
  }

  open(jid) {
    this.state = 'open';
    this.user = jid === undefined ? undefined : { id: jid };
    this.#emit({ connection: 'open', isNewLogin: false });
  }

  close(statusCode, message = 'closed by the peer') {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.#emit({ connection: 'close', lastDisconnect: { error: boom(message, statusCode), date: new Date() } });
  }

  goZombie() {
    this.zombie = true;
  }

  // -- Baileys' API (called by the adapter) --
  async logout() {
    this.calls.push('logout');
    if (this.zombie || this.state !== 'open') throw boom('Connection Closed', DisconnectReason.connectionClosed);
    await new Promise((r) => setTimeout(r, 1));
    this.close(DisconnectReason.loggedOut, 'Intentional Logout');
  }

  end(error) {
    this.calls.push('end');
    this.close(error?.output?.statusCode ?? DisconnectReason.connectionClosed, error?.message);
  }

  query(node) {
    this.calls.push(`query:${node?.content?.[0]?.tag}`);
    if (this.zombie || this.state !== 'open') return new Promise(() => {}); // never answered
    return Promise.resolve({ tag: 'iq', attrs: { type: 'result' } });
  }
}

/** A factory for `attachBaileys`, keeping every socket it made. */
export function fakeFactory() {
  const sockets = [];
  return {
    sockets,
    makeSocket: (instance, { generation }) => {
      const sock = new FakeSocket(instance, generation);
      sockets.push(sock);
      return sock;
    },
    /** The newest socket made for `instance`. */
    latest: (instance) => sockets.filter((s) => s.instance === instance).at(-1),
  };
}
