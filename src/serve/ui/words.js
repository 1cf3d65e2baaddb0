// How things are said: state kinds, durations, closes, effects.

/** The state kinds, in the order the tiles show them. */
export const KINDS = ['Connecting', 'Open', 'Closing', 'Zombie', 'Closed', 'Removed'];

/** Reconnects within an hour at or above this mark an instance as storming. */
export const STORM = 5;

export const HOUR = 3600 * 1000;

/** `12 s`, `3 min`, `2 h 5 min`, `3 d 4 h`. */
export function duration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  const h = Math.floor(m / 60);
  if (h < 24) return m % 60 ? `${h} h ${m % 60} min` : `${h} h`;
  const d = Math.floor(h / 24);
  return h % 24 ? `${d} d ${h % 24} h` : `${d} d`;
}

/** `401 logged out — final`, or `—` when it never closed. */
export function close(c) {
  if (!c) return '—';
  const code = c.code == null ? 'no status' : String(c.code);
  return `${code} ${c.meaning}${c.final ? ' — final' : ''}`;
}

/** The words after the kind: `Closed — logged out (…)` → `logged out (…)`. */
export function detail(state) {
  const cut = state.indexOf(' — ');
  return cut < 0 ? '' : state.slice(cut + 3);
}

/** An ISO time to the second, in the viewer's zone. */
export function time(ms) {
  return new Date(ms).toLocaleString(undefined, { hour12: false });
}

/**
 * An effect or input as the log records it (`"SendPing"`, or
 * `{"ArmTimer": {"timer": …, "after": …}}`), shortened for reading.
 */
export function term(value) {
  if (typeof value === 'string') return value;
  const [name] = Object.keys(value);
  const args = value[name];
  if (args == null || typeof args !== 'object') return `${name}(${args ?? ''})`;
  const parts = Object.entries(args).map(([k, v]) => `${k}: ${short(v)}`);
  return `${name} { ${parts.join(', ')} }`;
}

function short(v) {
  if (v == null) return 'none';
  if (typeof v !== 'object') return String(v);
  if ('secs' in v && 'nanos' in v) return `${v.secs + v.nanos / 1e9} s`;
  if ('kind' in v && 'generation' in v) return `${v.kind}#${v.generation}`;
  return JSON.stringify(v);
}

/** An element with text (never HTML). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v == null) continue;
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

/** A state badge: colour and the kind's name. */
export function badge(kind) {
  return el('span', { class: 'kind', 'data-kind': kind }, kind);
}
