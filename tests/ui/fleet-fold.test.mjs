// The dashboard's fold (src/serve/ui/fleet.js `apply`) replays the service's
// own table of cases: tests/fixtures/fleet-fold.json, written and checked by
// the Rust test `serve::fleet::tests::the_fold_cases_the_page_replays_are_the_services`.
// Run by `cargo test` (tests/it/dashboard.rs), or alone: node --test tests/ui/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { model, load, apply } from '../../src/serve/ui/fleet.js';

const table = JSON.parse(readFileSync(fileURLToPath(new URL('../fixtures/fleet-fold.json', import.meta.url)), 'utf8'));

/** The fields both folds keep, as the service shows a row. */
function row(r) {
  return {
    name: r.name,
    kind: r.kind,
    status: r.status,
    state: r.state,
    since: r.since,
    generation: r.generation,
    close: r.close ?? null,
    reconnects: r.reconnects,
    global: r.global,
    owner: r.owner ?? null,
  };
}

test('the page folds the events into the rows the service folds them into', () => {
  load({ instances: [], edges: [], position: 0, read_only: false, policy: 'p', now: Date.now() });
  for (const e of table.events) apply(e);
  const rows = [...model.rows.values()].sort((a, b) => (a.name < b.name ? -1 : 1)).map(row);
  assert.deepEqual(rows, table.rows.map(row));
  assert.equal(model.position, Math.max(...table.events.map((e) => e.global)));
});

test('an event the page already has changes nothing', () => {
  load({ instances: [], edges: [], position: 0, read_only: false, policy: 'p', now: Date.now() });
  for (const e of table.events) apply(e);
  const before = JSON.stringify([...model.rows.values()]);
  for (const e of table.events) apply(e);
  assert.equal(JSON.stringify([...model.rows.values()]), before);
});

test('the edges the page counts are the ones the events took', () => {
  load({ instances: [], edges: [], position: 0, read_only: false, policy: 'p', now: Date.now() });
  for (const e of table.events) apply(e);
  const transitions = table.events.filter((e) => e.from && e.input).length;
  assert.equal([...model.edges.values()].reduce((a, b) => a + b, 0), transitions);
});
