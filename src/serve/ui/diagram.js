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

/**
 * Draws into `root`. `table`: [{from, to, inputs}]; `counts`: Map `from|to` → n;
 * `current`: the state kind to mark; `taken`: `from|to` of the step on show.
 */
export function draw(root, table, counts, current, taken) {
  const box = svg('svg', { viewBox: '0 0 720 420', role: 'img', 'aria-label': `State diagram; current state ${current}` });
  const defs = svg('defs');
  for (const id of ['arrow', 'arrow-taken']) {
    const m = svg('marker', { id, viewBox: '0 0 10 10', refX: '9', refY: '5', markerWidth: '9', markerHeight: '9', markerUnits: 'userSpaceOnUse', orient: 'auto-start-reverse' });
    m.append(svg('path', { d: 'M0,0 L10,5 L0,10 z' }));
    defs.append(m);
  }
  box.append(defs);
  const pairs = new Set(table.map((e) => `${e.from}|${e.to}`));
  for (const e of table) {
    const key = `${e.from}|${e.to}`;
    const n = counts.get(key) || 0;
    const g = svg('g', { class: `edge${key === taken ? ' taken' : ''}`, 'data-edge': key });
    g.append(svg('title', {}, `${e.from} → ${e.to}: ${e.inputs.join(', ')} (fleet: ${n})`));
    const a = AT[e.from], b = AT[e.to];
    let d, label;
    if (e.from === e.to) {
      const [x, y] = a;
      d = `M${x - 20},${y - H / 2} C${x - 40},${y - 75} ${x + 40},${y - 75} ${x + 20},${y - H / 2}`;
      label = [x, y - 66];
    } else {
      // A pair of opposite edges bend apart; a single edge bends a little.
      const bend = pairs.has(`${e.to}|${e.from}`) ? 28 : 10;
      const [mx, my] = [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2];
      const [dx, dy] = [b[0] - a[0], b[1] - a[1]];
      const len = Math.hypot(dx, dy);
      const c = [mx - (dy / len) * bend, my + (dx / len) * bend];
      const [sx, sy] = exit(a, c), [tx, ty] = exit(b, c);
      d = `M${sx},${sy} Q${c[0]},${c[1]} ${tx},${ty}`;
      label = [(sx + 2 * c[0] + tx) / 4, (sy + 2 * c[1] + ty) / 4 - 4];
    }
    g.append(svg('path', { d, 'marker-end': `url(#${key === taken ? 'arrow-taken' : 'arrow'})` }));
    g.append(svg('text', { x: label[0], y: label[1], 'text-anchor': 'middle' }, `×${n}`));
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
