// Types of the instance-lifecycle Node package (hand-written; checked by
// `npm run typecheck` against examples/host.ts).

/** The REST API's error codes, on every error the engine gives. */
export type ErrorCode =
  | 'invalid_name'
  | 'invalid_url'
  | 'invalid_body'
  | 'invalid_option'
  | 'unknown_instance'
  | 'already_exists'
  | 'removed'
  | 'closing'
  | 'not_a_signal'
  | 'shutting_down'
  | 'timed_out'
  | 'interrupted'
  | 'log_failure'
  | 'internal'
  | (string & {});

/** An error of the engine. */
export class LifecycleError extends Error {
  readonly name: 'LifecycleError';
  /** The REST API's code for it. */
  readonly code: ErrorCode;
}

export interface OpenOptions {
  /** The rules' preset: `whatsapp` (default, Baileys' statuses), `evolution`, `discord` or `rfc6455`. */
  policy?: 'whatsapp' | 'evolution' | 'discord' | 'rfc6455';
  /** What an acknowledged transition survives: `group-commit` (default), `strict` or `buffered`. */
  durability?: 'group-commit' | 'strict' | 'buffered';
  /** Bound on `close()`, in milliseconds (default 5000). */
  closeTimeoutMs?: number;
  /** Open a log that lost records anyway, recording the loss. */
  acceptLoss?: boolean;
  /** The preset's timings, changed (milliseconds). */
  timing?: Timing;
  /**
   * The host's cleanup for a delete: named steps run once per delete, in
   * order, each bounded by a time-out; a step that throws or rejects is
   * recorded as failed in the `Removed` record and the delete goes on.
   * Steps must be idempotent (a crash mid-delete reruns them after a restart).
   */
  cleanup?: { steps: string[]; run: (instance: string, step: string) => unknown | Promise<unknown> };
  /** Called when one of your callbacks throws (default: a process warning). The engine goes on either way. */
  onCallbackError?: (error: unknown, value: unknown) => void;
}

/** Timings of the rules, in milliseconds; each one optional. */
export interface Timing {
  heartbeatIntervalMs?: number;
  /** How long a pong may take before the session is a zombie (R7). */
  heartbeatDeadlineMs?: number;
  backoffBaseMs?: number;
  backoffCapMs?: number;
  /** How long a session stays open before its retry counter resets. */
  stablePeriodMs?: number;
  connectTimeoutMs?: number;
  pairingCodeTimeoutMs?: number;
  logoutTimeoutMs?: number;
  closeConnectionTimeoutMs?: number;
  cleanupTimeoutMs?: number;
}

/** Where an instance's connection is held. */
export type CreateSpec = { url: string; external?: false } | { external: true; url?: undefined };

export type StateKind = 'Connecting' | 'Open' | 'Closing' | 'Closed' | 'Zombie' | 'Removed';

/** An instance's state, as the REST API shows it. */
export interface InstanceView {
  name: string;
  kind: StateKind;
  /** The state in words. */
  state: string;
  /** The session's identity, when open. */
  identity: string | null;
  /** The state in full (the log's own structure). */
  detail: Record<string, unknown>;
}

/** What the host must do for one of its connections. */
export type HostEffect = {
  /** Increasing over the engine's life. */
  id: number;
  instance: string;
  /** The connection it concerns: every signal about it carries this. */
  generation: number;
} & (
  | { kind: 'open'; /** The identity to resume, if any. */ resume: string | null }
  | { kind: 'sendLogout' }
  | { kind: 'close'; status: number }
  | { kind: 'ping' }
  | { kind: 'abort' }
);

/** What a host reports about one of its connections. */
export type HostSignal =
  | { kind: 'opened'; generation: number; identity?: string | null }
  | { kind: 'pairing'; generation: number; code?: string | null }
  | {
      kind: 'closed';
      generation: number;
      /** Baileys' `statusCode`, or a WebSocket close code; absent when lost. */
      status?: number | null;
      reason?: string;
      initiator?: 'peer' | 'local' | 'transport';
    }
  | { kind: 'writeFailed'; generation: number; error?: string }
  | { kind: 'heartbeatMissed'; generation: number }
  | { kind: 'pong'; generation: number }
  | { kind: 'logoutConfirmed'; generation: number }
  | { kind: 'logoutFailed'; generation: number; error?: string }
  | { kind: 'closeFinished'; generation: number }
  /** The peer asks for a new connection that resumes (Discord's op 7): effects `close` 1012, then `open` resuming (R13). */
  | { kind: 'reconnectRequested'; generation: number }
  /** The session is invalid (Discord's op 9, `d: false`): the next `open`, after `retryAfterMs` (default 0, at most an hour), resumes nothing (R14). */
  | { kind: 'sessionInvalid'; generation: number; retryAfterMs?: number }
  /** A heartbeat acknowledged, the next due in `afterMs` (at most an hour): counts as a pong; the next `ping` effect comes then (R7). */
  | { kind: 'heartbeatDue'; generation: number; afterMs: number }
  /** A handshake step after a wait for a fleet-wide permit, or a reminder during one (at least twice per connect time-out): the connect deadline counts from now (R15). */
  | { kind: 'handshakeStep'; generation: number };

/** An application frame received on an engine-held connection, or how many the callbacks missed. */
export type InboundFrame =
  | { instance: string; generation: number; text: string }
  | { instance: string; generation: number; binary: Uint8Array }
  | { missed: number };

/** What the rules made of a signal. */
export interface Signaled {
  /** `ignored`: a signal of an older connection (R12), or one the state does not take. */
  outcome: 'applied' | 'ignored';
  state: StateKind;
  /** The connection generation after it: what the next signals carry. */
  generation: number;
  detail: Record<string, unknown>;
}

/** One transition, after it was recorded. */
export interface Transition {
  instance: string;
  seq: number;
  /** Milliseconds since the Unix epoch. */
  at: number;
  /** What caused it (`connect`, `opened`, `closed`, …). */
  input: string;
  from: StateKind;
  to: InstanceView;
}

export class Engine {
  private constructor();
  /** Opens the engine on the log in `dir` (created if missing) and restores every instance in it. */
  static open(dir: string, options?: OpenOptions): Promise<Engine>;
  create(name: string, spec: CreateSpec): Promise<InstanceView>;
  connect(name: string): Promise<InstanceView>;
  logout(name: string): Promise<InstanceView>;
  restart(name: string): Promise<InstanceView>;
  delete(name: string): Promise<InstanceView>;
  state(name: string): InstanceView;
  /** Every instance that is not removed. */
  list(): InstanceView[];
  /** The instance's records, oldest first (the log's own structure). */
  history(name: string): Promise<Record<string, unknown>[]>;
  /** Reports what a host-held connection did; applied in the order of calls. */
  signal(name: string, signal: HostSignal): Promise<Signaled>;
  /** Every effect for host-held connections, in order. Returns the unsubscribe function. */
  onEffect(callback: (effect: HostEffect) => void): () => void;
  /** Sends an application frame on an engine-held connection that is Open (never waits on the socket). */
  send(name: string, frame: string | Uint8Array): void;
  /** Every application frame received on an engine-held connection. Returns the unsubscribe function. */
  onFrame(callback: (frame: InboundFrame) => void): () => void;
  /** Every transition, after it is recorded. Returns the unsubscribe function. */
  onTransition(callback: (transition: Transition) => void): () => void;
  /** Every transition from now on; `break` unsubscribes. */
  transitions(): AsyncIterableIterator<Transition>;
  /** Stops every instance and closes the log within `closeTimeoutMs`; ends every subscription. */
  close(): Promise<void>;
}
