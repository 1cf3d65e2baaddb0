// The Node package's benchmark (not a test): signals/s from JavaScript
// through the binding against the same signals through the Rust engine API
// directly (`cargo bench --bench signals`, run here, in the same run), and
// the JavaScript heap per idle instance (what the package adds beyond the
// engine's own memory).
//
// Usage: npm run build && node bench/signals.mjs     (BENCH_SCALE=0.1 for a quick run)
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const { Engine } = require('../index.js');
const here = dirname(dirname(fileURLToPath(import.meta.url)));
const scale = Number(process.env.BENCH_SCALE ?? 1);
const scaled = (n) => Math.max(1, Math.floor(n * scale));

async function signalsPerSecond() {
  const dir = mkdtempSync(join(tmpdir(), 'lifecycle-bench-'));
  const engine = await Engine.open(dir);
  const [instances, rounds] = [scaled(200), scaled(250)];
  const names = Array.from({ length: instances }, (_, i) => `sig-${String(i).padStart(4, '0')}`);
  const generations = new Map();
  engine.onEffect((e) => e.kind === 'open' && generations.set(e.instance, e.generation));
  for (const n of names) {
    await engine.create(n, { external: true });
    await engine.connect(n);
  }
  while (generations.size < instances) await new Promise((r) => setTimeout(r, 1));
  for (const n of names) await engine.signal(n, { kind: 'opened', generation: generations.get(n), identity: `${n}@s.whatsapp.net` });
  const start = process.hrtime.bigint();
  for (let r = 0; r < rounds; r++) {
    await Promise.all(names.map((n) => engine.signal(n, { kind: 'pong', generation: generations.get(n) })));
  }
  const took = Number(process.hrtime.bigint() - start) / 1e9;
  await engine.close();
  rmSync(dir, { recursive: true, force: true });
  return (instances * rounds) / took;
}

async function heapPerIdleInstance() {
  const dir = mkdtempSync(join(tmpdir(), 'lifecycle-bench-'));
  const engine = await Engine.open(dir);
  const count = scaled(10_000);
  const js = () => {
    globalThis.gc?.();
    const m = process.memoryUsage();
    return m.heapUsed + m.external + m.arrayBuffers;
  };
  const before = { js: js(), rss: process.memoryUsage().rss };
  for (let i = 0; i < count; i++) await engine.create(`idle-${i}`, { external: true });
  const after = { js: js(), rss: process.memoryUsage().rss };
  await engine.close();
  rmSync(dir, { recursive: true, force: true });
  return { count, js: (after.js - before.js) / count, rss: (after.rss - before.rss) / count };
}

const rustOnce = () =>
  JSON.parse(
    execFileSync('cargo', ['bench', '--bench', 'signals'], {
      cwd: join(here, '..', '..'),
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
    })
      .trim()
      .split('\n')
      .at(-1),
  ).signals_per_s;
// Each side's best of three, interleaved: the machine is shared and noisy.
let [rust, ours] = [0, 0];
for (let i = 0; i < 3; i++) {
  rust = Math.max(rust, rustOnce());
  ours = Math.max(ours, await signalsPerSecond());
}
const heap = await heapPerIdleInstance();
console.log(`## Node package (\`node bindings/node/bench/signals.mjs\`, BENCH_SCALE=${scale})\n`);
console.log('| measurement | from JavaScript | baseline, same run | ratio | target |');
console.log('|---|---|---|---|---|');
console.log(
  `| signals/s (pongs of ${scaled(200)} open instances, all at once, ${scaled(250)} rounds; best of 3 each, interleaved) | ${ours.toFixed(0)} | the Rust engine API directly: ${rust.toFixed(0)} | ${(ours / rust).toFixed(2)}× | ≥ 0.50× |`,
);
console.log(
  `| JavaScript heap per idle instance, ${heap.count} created (what the package adds beyond the engine) | ${heap.js > 0 ? `${heap.js.toFixed(0)} B` : `0 B (measured ${heap.js.toFixed(0)} B: the collector's noise)`} | (resident memory per instance, engine and log included: ${heap.rss.toFixed(0)} B) | | ≤ 2048 B |`,
);
