// The fleet view: live tiles per state and a virtualised table of every
// instance. Rows come from `/v1/fleet`; each event of `/v1/events` is then
// applied with `apply`, the few lines that mirror the service's own fold
// (`FleetIndex::apply` in src/serve/fleet.rs). Both replay one table of
// cases, tests/fixtures/fleet-fold.json (a Rust test writes and checks it,
// tests/ui/fleet-fold.test.mjs replays it here). Events are applied as they
// come and drawn once per animation frame, so 10,000 instances stay smooth.

import { KINDS, STORM, HOUR, duration, close, detail, el, badge } from './words.js';

export const model = {
  rows: new Map(),
  /** `from|to` → times the fleet took that edge. */
  edges: new Map(),
  position: 0,
  readOnly: false,
  policy: '',
  /** Server time minus this browser's, so times in state use the service's clock. */
  skew: 0,
  /** A replay's fixed "now" (its newest record), or null when live. */
  frozenNow: null,
  /** In a cluster: the host that answered (rows then show their owner). */
  host: null,
};

export function now() {
  return model.frozenNow ?? Date.now() + model.skew;
}

/** Loads `/v1/fleet` into the model. */
export function load(view) {
  model.rows.clear();
  model.edges.clear();
  for (const r of view.instances) model.rows.set(r.name, r);
  for (const e of view.edges) bump(e.from, e.to, e.count);
  model.position = view.position;
  model.readOnly = view.read_only;
  model.policy = view.policy;
  model.frozenNow = view.read_only ? view.now : null;
  model.skew = view.now - Date.now();
  model.host = view.host ?? null;
  globalThis.document?.body.classList.toggle('cluster', model.host !== null);
}

function bump(from, to, n) {
  const k = `${from}|${to}`;
  model.edges.set(k, (model.edges.get(k) || 0) + n);
}

/** One event of `/v1/events` (the same fold as the service's). */
export function apply(e) {
  if (e.global <= model.position) return;
  model.position = e.global;
  let row = model.rows.get(e.instance);
  if (!row) {
    row = { name: e.instance, since: e.at, close: null, reconnects: [] };
    model.rows.set(e.instance, row);
  }
  if (e.event === 'created') {
    row.close = null;
    row.reconnects = [];
    row.since = e.at;
  } else if (e.from !== e.to) {
    row.since = e.at;
  }
  row.kind = e.to;
  row.status = e.status;
  row.state = e.state;
  row.generation = e.generation;
  row.global = e.global;
  if (e.close) row.close = e.close;
  if (e.host) row.owner = e.host;
  if (e.reconnect) row.reconnects.push(e.at);
  if (e.from && e.input) bump(e.from, e.to, 1);
}

function reconnects(row, at) {
  let n = 0;
  for (const t of row.reconnects) if (t >= at - HOUR) n++;
  return n;
}

const COLUMNS = [
  { key: 'name', label: 'Name', value: (r) => r.name },
  { key: 'state', label: 'State', value: (r) => KINDS.indexOf(r.kind) * 1e6 },
  { key: 'since', label: 'In state', value: (r) => -r.since, num: true },
  { key: 'generation', label: 'Gen', value: (r) => r.generation, num: true },
  { key: 'close', label: 'Last close', value: (r) => (r.close ? r.close.code ?? 0 : -1) },
  { key: 'reconnects', label: 'Reconnects 1 h', value: (r, t) => reconnects(r, t), num: true },
  // Only in a cluster (the page shows it when the service says it is one host of one).
  { key: 'owner', label: 'Owner', value: (r) => r.owner ?? '', extra: 'owner' },
];

export class FleetView {
  constructor(root) {
    this.root = root;
    this.sort = { key: 'name', dir: 1 };
    this.filter = { name: '', state: 'live' };
    this.shown = [];
    this.dirty = true;
    this.tiles = document.getElementById('tiles');
    this.body = document.getElementById('rows');
    this.spacer = document.getElementById('spacer');
    this.rowHeight = 32;
    this.drawn = new Map();
    this.buildTiles();
    this.buildHead();
    document.getElementById('filter-name').addEventListener('input', (e) => {
      this.filter.name = e.target.value.trim().toLowerCase();
      this.invalidate();
    });
    this.select = document.getElementById('filter-state');
    this.select.addEventListener('change', (e) => {
      this.filter.state = e.target.value;
      this.invalidate();
    });
    this.body.addEventListener('scroll', () => this.drawRows(false));
    window.addEventListener('resize', () => this.drawRows(true));
  }

  buildTiles() {
    this.tileCounts = new Map();
    for (const kind of [...KINDS, 'storm']) {
      const count = el('span', { class: 'count' }, '0');
      const label = kind === 'storm' ? `Storming (≥ ${STORM} reconnects / h)` : kind;
      const tile = el('button', {
        type: 'button', class: kind === 'storm' ? 'tile extra' : 'tile', 'data-kind': kind, 'aria-pressed': 'false',
        onclick: () => {
          this.filter.state = this.filter.state === kind ? 'live' : kind;
          this.select.value = this.filter.state;
          this.invalidate();
        },
      }, count, label);
      this.tileCounts.set(kind, count);
      this.tiles.append(tile);
    }
  }

  buildHead() {
    const head = document.getElementById('head');
    for (const c of COLUMNS) {
      const cell = el('div', { role: 'columnheader', class: [c.num ? 'num' : '', c.extra ?? ''].join(' ').trim(), 'data-key': c.key },
        el('button', { type: 'button', onclick: () => this.sortBy(c.key) }, c.label));
      head.append(cell);
    }
    this.markSort();
  }

  sortBy(key) {
    this.sort = { key, dir: this.sort.key === key ? -this.sort.dir : 1 };
    this.markSort();
    this.invalidate();
  }

  markSort() {
    for (const cell of document.querySelectorAll('#head [data-key]')) {
      const on = cell.dataset.key === this.sort.key;
      cell.setAttribute('aria-sort', on ? (this.sort.dir > 0 ? 'ascending' : 'descending') : 'none');
    }
  }

  /** Something changed: redraw on the next frame (once, however many changes). */
  invalidate() {
    if (this.dirty === 'scheduled') return;
    this.dirty = 'scheduled';
    requestAnimationFrame(() => this.draw());
  }

  draw() {
    this.dirty = false;
    if (!this.ready) {
      // The first complete view: what the dashboard's benchmark times.
      this.ready = true;
      queueMicrotask(() => {
        performance.mark('fleet-ready');
        document.body.dataset.ready = 'fleet';
      });
    }
    const t = now();
    const counts = new Map([...KINDS, 'storm'].map((k) => [k, 0]));
    const f = this.filter;
    const shown = [];
    for (const r of model.rows.values()) {
      const storming = reconnects(r, t) >= STORM;
      counts.set(r.kind, (counts.get(r.kind) || 0) + 1);
      if (storming) counts.set('storm', counts.get('storm') + 1);
      if (f.name && !r.name.toLowerCase().includes(f.name)) continue;
      if (f.state === 'live' ? r.kind === 'Removed' : f.state === 'storm' ? !storming : f.state !== 'all' && r.kind !== f.state) continue;
      shown.push(r);
    }
    const col = COLUMNS.find((c) => c.key === this.sort.key);
    const dir = this.sort.dir;
    shown.sort((a, b) => {
      const x = col.value(a, t), y = col.value(b, t);
      return (x < y ? -1 : x > y ? 1 : a.name < b.name ? -1 : 1) * dir;
    });
    this.shown = shown;
    for (const [k, n] of counts) this.tileCounts.get(k).textContent = String(n);
    for (const tile of this.tiles.children) tile.setAttribute('aria-pressed', String(tile.dataset.kind === f.state));
    const total = model.rows.size;
    const parts = KINDS.map((k) => `${counts.get(k)} ${k.toLowerCase()}`).join(', ');
    document.getElementById('shown').textContent = `showing ${shown.length} of ${total} instances (${parts})`;
    this.spacer.style.height = `${shown.length * this.rowHeight}px`;
    this.drawRows(true);
  }

  /** Draws only the rows in view (and a few around them). */
  drawRows(all) {
    const top = this.body.scrollTop;
    const first = Math.max(0, Math.floor(top / this.rowHeight) - 5);
    const last = Math.min(this.shown.length, Math.ceil((top + this.body.clientHeight) / this.rowHeight) + 5);
    const t = now();
    const keep = new Set();
    for (let i = first; i < last; i++) {
      const r = this.shown[i];
      keep.add(r.name);
      let node = this.drawn.get(r.name);
      if (!node) {
        node = el('div', { role: 'row', class: 'row' });
        this.drawn.set(r.name, node);
        this.body.append(node);
      } else if (!all && node.dataset.at === String(i)) {
        continue;
      }
      this.fill(node, r, t);
      node.dataset.at = String(i);
      node.style.transform = `translateY(${i * this.rowHeight}px)`;
      node.setAttribute('aria-rowindex', String(i + 2));
    }
    for (const [name, node] of this.drawn) {
      if (!keep.has(name)) {
        node.remove();
        this.drawn.delete(name);
      }
    }
  }

  fill(node, r, t) {
    const n = reconnects(r, t);
    node.className = `row${r.kind === 'Zombie' ? ' zombie' : ''}${n >= STORM ? ' storm' : ''}`;
    node.dataset.name = r.name;
    node.dataset.kind = r.kind;
    node.replaceChildren(
      el('div', { role: 'cell' }, el('a', { href: `#/instance/${encodeURIComponent(r.name)}` }, r.name)),
      el('div', { role: 'cell', title: r.state }, badge(r.kind), ' ', el('span', { class: 'words' }, detail(r.state))),
      el('div', { role: 'cell', class: 'num since' }, duration(t - r.since)),
      el('div', { role: 'cell', class: 'num' }, String(r.generation)),
      el('div', { role: 'cell', class: 'close', title: close(r.close) }, close(r.close)),
      el('div', { role: 'cell', class: 'num reconnects' }, n >= STORM ? `${n} storm` : String(n)),
      el('div', { role: 'cell', class: 'owner', title: r.owner ? `held by ${r.owner}` : 'no live owner' }, r.owner ?? '—'),
    );
  }
}
