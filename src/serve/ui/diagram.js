// The state diagram, drawn from the transition table (`/v1/table`): each
// edge with how often the fleet took it; the instance's state and the edge
// of the step on show are marked. SVG, no library.

import { KINDS } from './words.js';

const NS = 'http://www.w3.org/2000/svg';
/** Where each state sits: the happy path across the top, the ways out below. */
const AT = {
  Closed: [90, 170],
  Connecting: [330, 60],
  Open: [600, 60],
  Zombie: [600, 290],
  Closing: [330, 290],
  Removed: [90, 360],
};
const W = 120, H = 40;

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

/** Where the line from the centre of `a` toward `p` leaves the box of `a`. */
function exit([x, y], [px, py]) {
  const dx = px - x, dy = py - y;
  const s = Math.min(Math.abs((W / 2 + 4) / (dx || 1e-9)), Math.abs((H / 2 + 4) / (dy || 1e-9)));
  return [x + dx * s, y + dy * s];
}

/** The view box, and a label's size: 11 px digits (bold when taken), a margin round them. */
const VIEW = [720, 420];
const CHAR = 7, PAD = 4, ABOVE = 10, BELOW = 3;

/** The box a label covers, its text centred on `x` with its baseline at `y`. */
export function labelBox([x, y], text) {
  const w = text.length * CHAR + PAD;
  return { x0: x - w / 2, x1: x + w / 2, y0: y - ABOVE, y1: y + BELOW };
}

/** The box a state covers, with the margin a label keeps from it. */
export function nodeBox(kind) {
  const [x, y] = AT[kind];
  return { x0: x - W / 2 - 2, x1: x + W / 2 + 2, y0: y - H / 2 - 2, y1: y + H / 2 + 2 };
}

function overlaps(a, b) {
  return a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1;
}

function inside(b) {
  return b.x0 >= 0 && b.y0 >= 0 && b.x1 <= VIEW[0] && b.y1 <= VIEW[1];
}

/**
 * Every edge's path and where its count goes: at the curve's middle, then
 * moved along the edge's bend (and, failing that, along the edge) to the
 * nearest spot where it covers no other label, no state and stays in view.
 * Pure (no DOM): `tests/ui/diagram.test.mjs` checks the layout for the
 * service's whole table with the widest counts.
 */
export function layout(table, counts) {
  const pairs = new Set(table.map((e) => `${e.from}|${e.to}`));
  const nodes = KINDS.map(nodeBox);
  const placed = [];
  return table.map((e) => {
    const key = `${e.from}|${e.to}`;
    const text = `×${counts.get(key) || 0}`;
    const a = AT[e.from], b = AT[e.to];
    let d, at, normal, along;
    if (e.from === e.to) {
      const [x, y] = a;
      d = `M${x - 20},${y - H / 2} C${x - 40},${y - 75} ${x + 40},${y - 75} ${x + 20},${y - H / 2}`;
      at = [x, y - 66];
      normal = [0, -1];
      along = [1, 0];
    } else {
      // A pair of opposite edges bend apart; a single edge bends a little.
      const bend = pairs.has(`${e.to}|${e.from}`) ? 28 : 10;
      const [mx, my] = [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2];
      const [dx, dy] = [b[0] - a[0], b[1] - a[1]];
      const len = Math.hypot(dx, dy);
      normal = [-dy / len, dx / len];
      along = [dx / len, dy / len];
      const c = [mx + normal[0] * bend, my + normal[1] * bend];
      const [sx, sy] = exit(a, c), [tx, ty] = exit(b, c);
      d = `M${sx},${sy} Q${c[0]},${c[1]} ${tx},${ty}`;
      at = [(sx + 2 * c[0] + tx) / 4, (sy + 2 * c[1] + ty) / 4 - 4];
    }
    const free = (p) => {
      const box = labelBox(p, text);
      return inside(box) && !nodes.some((n) => overlaps(box, n)) && !placed.some((l) => overlaps(box, l));
    };
    let label = at;
    search: for (const dir of [normal, along]) {
      for (let step = 0; step <= 40; step++) {
        for (const sign of step === 0 ? [1] : [1, -1]) {
          const p = [at[0] + dir[0] * step * 3 * sign, at[1] + dir[1] * step * 3 * sign];
          if (free(p)) {
            label = p;
            break search;
          }
        }
      }
    }
    placed.push(labelBox(label, text));
    return { key, from: e.from, to: e.to, inputs: e.inputs, n: counts.get(key) || 0, d, label, text };
  });
}

/**
 * Draws into `root`. `table`: [{from, to, inputs}]; `counts`: Map `from|to` → n;
 * `current`: the state kind to mark; `taken`: `from|to` of the step on show.
 */
export function draw(root, table, counts, current, taken) {
  const box = svg('svg', { viewBox: `0 0 ${VIEW[0]} ${VIEW[1]}`, role: 'img', 'aria-label': `State diagram; current state ${current}` });
  const defs = svg('defs');
  for (const id of ['arrow', 'arrow-taken']) {
    const m = svg('marker', { id, viewBox: '0 0 10 10', refX: '9', refY: '5', markerWidth: '9', markerHeight: '9', markerUnits: 'userSpaceOnUse', orient: 'auto-start-reverse' });
    m.append(svg('path', { d: 'M0,0 L10,5 L0,10 z' }));
    defs.append(m);
  }
  box.append(defs);
  for (const e of layout(table, counts)) {
    const g = svg('g', { class: `edge${e.key === taken ? ' taken' : ''}`, 'data-edge': e.key });
    g.append(svg('title', {}, `${e.from} → ${e.to}: ${e.inputs.join(', ')} (fleet: ${e.n})`));
    g.append(svg('path', { d: e.d, 'marker-end': `url(#${e.key === taken ? 'arrow-taken' : 'arrow'})` }));
    g.append(svg('text', { x: e.label[0], y: e.label[1], 'text-anchor': 'middle' }, e.text));
    box.append(g);
  }
  for (const kind of KINDS) {
    const [x, y] = AT[kind];
    const g = svg('g', { class: `node${kind === current ? ' current' : ''}`, 'data-kind': kind });
    g.append(svg('rect', { x: x - W / 2, y: y - H / 2, width: W, height: H, rx: 8 }));
    g.append(svg('text', { x, y: y + 5, 'text-anchor': 'middle' }, kind === current ? `${kind} ●` : kind));
    box.append(g);
  }
  root.replaceChildren(box);
}
