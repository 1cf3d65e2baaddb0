#!/usr/bin/env node
// A host that holds its own connections (Baileys in Node, say) and lets
// instance-lifecycle decide every step of their lifecycle. It creates an
// `external` instance, carries out the effects the service publishes on
// GET /v1/effects (SSE) and reports what its session did on
// POST /v1/instances/NAME/signals. Node 18 or newer, no packages.
//
//   lifecycle serve &                                  # the service, on 127.0.0.1:8080
//   node examples/host.mjs [BASE_URL] [INSTANCE]       # LIFECYCLE_API_KEY if the service has a key
//
// The session here is a stand-in (`FakeSession`) that speaks Baileys' event
// shapes, so the example runs anywhere: with Baileys, `open` becomes
// makeWASocket(...) and its `connection.update` events go through
// `signalFromBaileys` unchanged. The run walks one session through the rules
// (open, a 408 that reconnects and resumes, a stale signal ignored, logout,
// delete), prints each step and exits 1 at the first surprise.

const base = (process.argv[2] ?? "http://127.0.0.1:8080").replace(/\/$/, "");
const name = process.argv[3] ?? `node-host-${process.pid}`;
const key = process.env.LIFECYCLE_API_KEY;

// --- Baileys → lifecycle -----------------------------------------------------

/** Baileys' `connection.update` as a lifecycle signal for `generation` (or null: nothing to report). */
export function signalFromBaileys(update, generation, user) {
  if (update.qr) return { signal: "pairing", generation, code: update.qr };
  if (update.connection === "open") return { signal: "opened", generation, identity: user?.id ?? null };
  if (update.connection === "close") {
    // Baileys puts the status on a Boom error: lastDisconnect.error.output.statusCode
    // (401 logged out, 408 timed out, 440 replaced, 515 restart required).
    const status = update.lastDisconnect?.error?.output?.statusCode ?? null;
    const reason = update.lastDisconnect?.error?.message ?? "";
    return { signal: "closed", generation, status, reason, initiator: status === null ? "transport" : "peer" };
  }
  return null;
}

// --- The service -------------------------------------------------------------

async function call(method, path, body) {
  const headers = { ...(key ? { apikey: key } : {}), ...(body ? { "content-type": "application/json" } : {}) };
  const res = await fetch(base + path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = text;
  }
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

const signal = (s) => call("POST", `/v1/instances/${name}/signals`, s);

/** Yields each effect of the SSE stream `/v1/effects?instance=NAME`. */
async function* effects(ready) {
  const res = await fetch(`${base}/v1/effects?instance=${encodeURIComponent(name)}`, {
    headers: key ? { apikey: key } : {},
  });
  if (!res.ok) throw new Error(`effects: ${res.status} ${await res.text()}`);
  ready();
  const decoder = new TextDecoder();
  let buffer = "";
  for await (const chunk of res.body) {
    buffer += decoder.decode(chunk, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart())
        .join("\n");
      if (data && /^event: ?effect$/m.test(block)) yield JSON.parse(data);
    }
  }
}

// --- A stand-in session ------------------------------------------------------

/** Speaks Baileys' event shapes: `connection.update` with `open`, or `close` and a Boom-like error. */
class FakeSession {
  constructor(generation, resume, emit) {
    this.generation = generation;
    this.user = { id: resume ?? "5511999990000@s.whatsapp.net" };
    this.emit = emit;
    setTimeout(() => this.emit(this, { connection: "open" }), 20);
  }
  /** The peer ends the session with a status, as WhatsApp does. */
  dropWith(statusCode, message) {
    this.emit(this, { connection: "close", lastDisconnect: { error: { message, output: { statusCode } } } });
  }
}

// --- The run -----------------------------------------------------------------

const sessions = new Map(); // generation → FakeSession
const seen = []; // every effect, in order
let failed = false;

function step(what) {
  console.log(`ok  ${what}`);
}

function fail(what) {
  console.error(`FAIL ${what}`);
  failed = true;
  process.exit(1);
}

async function until(what, ok, ms = 10_000) {
  const start = Date.now();
  for (;;) {
    const got = await ok();
    if (got) return got;
    if (Date.now() - start > ms) fail(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

async function report(session, update) {
  const s = signalFromBaileys(update, session.generation, session.user);
  if (s) await signal(s);
}

/** Carries out each effect the engine decides. */
async function carryOut(stream) {
  for await (const e of stream) {
    seen.push(e);
    switch (e.effect) {
      case "open":
        sessions.set(e.generation, new FakeSession(e.generation, e.resume, (s, u) => report(s, u).catch(onError)));
        break;
      case "send_logout":
        await signal({ signal: "logout_confirmed", generation: e.generation });
        break;
      case "close":
        sessions.delete(e.generation);
        await signal({ signal: "closed", generation: e.generation, status: e.status, initiator: "local" });
        break;
      case "ping":
        await signal({ signal: "pong", generation: e.generation });
        break;
      case "abort":
        sessions.delete(e.generation);
        break;
    }
  }
}

function onError(err) {
  if (!failed) fail(err.message ?? String(err));
}

const state = async () => (await call("GET", `/v1/instances/${name}`)).kind;

async function main() {
  const ready = new Promise((resolve) => carryOut(effects(resolve)).catch(onError));
  await ready;
  await call("POST", "/v1/instances", { name, transport: "external" });
  step(`created ${name} (external: this process holds the connection)`);
  await call("POST", `/v1/instances/${name}/connect`);
  await until("Open", async () => (await state()) === "Open");
  const first = seen.find((e) => e.effect === "open");
  step(`open effect for generation ${first.generation}; reported opened; the engine says Open`);

  sessions.get(first.generation).dropWith(408, "Connection was lost");
  const second = await until("a reconnect", async () => seen.find((e) => e.effect === "open" && e.generation > first.generation));
  if (second.resume !== "5511999990000@s.whatsapp.net") fail(`the reconnect does not resume the session: ${JSON.stringify(second)}`);
  await until("Open again", async () => (await state()) === "Open");
  step(`408 closed it; the engine reconnected (generation ${second.generation}), resuming ${second.resume}`);

  const stale = await signal({ signal: "opened", generation: first.generation, identity: "someone-else" });
  if (stale.outcome?.outcome !== "ignored") fail(`a stale signal changed something: ${JSON.stringify(stale)}`);
  step(`a late signal of generation ${first.generation} is ignored (R12)`);

  const closed = await call("POST", `/v1/instances/${name}/logout`);
  if (closed.kind !== "Closed") fail(`logout ended ${closed.kind}`);
  if (!seen.some((e) => e.effect === "send_logout") || !seen.some((e) => e.effect === "close")) fail("no send_logout/close effects");
  step("logout: send_logout and close carried out; Closed");

  const removed = await call("DELETE", `/v1/instances/${name}`);
  if (removed.kind !== "Removed") fail(`delete ended ${removed.kind}`);
  step("deleted: Removed");
  process.exit(0);
}

main().catch(onError);
