// Shared by the suites: a fresh log directory per engine, and waiting for a
// condition without a fixed sleep.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
export const { Engine, LifecycleError } = require('../index.js');

/** A temporary directory, removed when the test ends. */
export function tempDir(t) {
  const dir = mkdtempSync(join(tmpdir(), 'lifecycle-node-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Resolves once `check()` is truthy; rejects after `ms` with `what`. */
export async function until(check, what, ms = 10_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** An engine on a fresh log, closed when the test ends. */
export async function engine(t, options = {}) {
  const dir = tempDir(t);
  const e = await Engine.open(dir, options);
  t.after(() => e.close());
  return { engine: e, dir };
}
