// The dashboard's diagram (src/serve/ui/diagram.js `layout`), laid out from
// the service's own transition table (tests/fixtures/table.json, checked
// against `/v1/table` by a Rust test): no edge count covers another, or a
// state, or leaves the picture — at the widest counts a fleet shows.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { layout, labelBox, nodeBox } from '../../src/serve/ui/diagram.js';
import { KINDS } from '../../src/serve/ui/words.js';

const table = JSON.parse(readFileSync(fileURLToPath(new URL('../fixtures/table.json', import.meta.url)), 'utf8'));

function overlaps(a, b) {
  return a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1;
}

for (const [what, count] of [['no counts', () => 0], ['three digits', (i) => 100 + i], ['five digits', () => 99999], ['mixed', (i) => (i % 2 ? 831 : 100000)]]) {
  test(`edge counts never cover each other or a state (${what})`, () => {
    const counts = new Map(table.map((e, i) => [`${e.from}|${e.to}`, count(i)]));
    const edges = layout(table, counts);
    assert.equal(edges.length, table.length);
    const boxes = edges.map((e) => [e.key, labelBox(e.label, e.text)]);
    for (const [i, [key, box]] of boxes.entries()) {
      assert.ok(box.x0 >= 0 && box.y0 >= 0 && box.x1 <= 720 && box.y1 <= 420, `${key}'s count leaves the picture`);
      for (const kind of KINDS) assert.ok(!overlaps(box, nodeBox(kind)), `${key}'s count covers ${kind}`);
      for (const [other, b] of boxes.slice(i + 1)) assert.ok(!overlaps(box, b), `${key}'s count covers ${other}'s`);
    }
  });
}
