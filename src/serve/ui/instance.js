// One instance: its timeline, a step-through replay of its records with the
// rule that decided each, the state diagram with its step marked, and the
// host commands its state allows.

import { request } from './api.js';
import { model, now } from './fleet.js';
import { draw } from './diagram.js';
import { close, detail, el, badge, term, time } from './words.js';

const COMMANDS = { connect: 'post', logout: 'post', restart: 'post', delete: 'delete' };
const HOST_INPUTS = new Set(['connect', 'logout', 'delete', 'restart']);

export class InstanceView {
  constructor(root) {
    this.root = root;
    this.name = null;
    this.records = [];
    this.at = 0;
    this.table = [];
    this.slider = document.getElementById('slider');
    this.slider.addEventListener('input', () => this.show(Number(this.slider.value)));
    document.getElementById('prev').addEventListener('click', () => this.show(this.at - 1));
    document.getElementById('next').addEventListener('click', () => this.show(this.at + 1));
    document.addEventListener('keydown', (e) => {
      if (this.root.hidden || e.target.closest('input:not([type=range]), select, dialog')) return;
      if (e.key === 'ArrowLeft') { this.show(this.at - 1); e.preventDefault(); }
      if (e.key === 'ArrowRight') { this.show(this.at + 1); e.preventDefault(); }
    });
  }

  async open(name, table) {
    this.name = name;
    this.table = table;
    this.records = [];
    document.getElementById('instance-title').textContent = name;
    const [history] = await Promise.all([request(`/v1/instances/${encodeURIComponent(name)}/history`), this.refresh()]);
    if (this.name !== name) return;
    this.records = history;
    this.show(this.records.length - 1);
  }

  /** The instance's state and the commands it allows. */
  async refresh() {
    const name = this.name;
    const view = await request(`/v1/instances/${encodeURIComponent(name)}`);
    if (this.name !== name) return;
    document.getElementById('instance-kind').replaceChildren(badge(view.kind));
    document.getElementById('instance-state').textContent = detail(view.state);
    const actions = document.getElementById('actions');
    actions.replaceChildren();
    if (model.readOnly || !view.actions) return;
    for (const a of view.actions) {
      actions.append(el('button', {
        type: 'button', 'data-action': a.action, disabled: !a.allowed, title: a.why || `${a.action} ${name}`,
        class: a.action === 'delete' ? 'danger' : '',
        onclick: () => this.command(a.action),
      }, a.action[0].toUpperCase() + a.action.slice(1)));
    }
  }

  async command(action) {
    const ok = await confirmIt(`${action[0].toUpperCase() + action.slice(1)} ${this.name}?`, action);
    if (!ok) return;
    const path = action === 'delete'
      ? `/v1/instances/${encodeURIComponent(this.name)}`
      : `/v1/instances/${encodeURIComponent(this.name)}/${action}`;
    try {
      await request(path, { method: COMMANDS[action].toUpperCase() });
    } catch (e) {
      window.alert(`${action} failed: ${e.message}`);
    }
    await this.refresh();
  }

  /** A new event of this instance: append it, and follow it if the last step was on show. */
  event(e) {
    if (e.instance !== this.name || this.records.some((r) => r.global === e.global)) return;
    const following = this.at === this.records.length - 1;
    if (e.event === 'created') this.records = [];
    this.records.push(e);
    this.show(following ? this.records.length - 1 : this.at);
    this.refresh().catch(() => {});
  }

  show(i) {
    const n = this.records.length;
    if (!n) return;
    this.at = Math.max(0, Math.min(n - 1, i));
    const r = this.records[this.at];
    const before = this.at > 0 ? this.records[this.at - 1] : null;
    this.slider.max = String(n - 1);
    this.slider.value = String(this.at);
    this.slider.setAttribute('aria-valuetext', `record ${this.at + 1} of ${n}`);
    document.getElementById('prev').disabled = this.at === 0;
    document.getElementById('next').disabled = this.at === n - 1;
    const set = (id, ...nodes) => document.getElementById(id).replaceChildren(...nodes);
    set('step-where', `${this.at + 1} of ${n} · seq ${r.seq} · global ${r.global} · ${time(r.at)} · generation ${r.generation}`);
    set('step-from', ...(r.from
      ? [badge(r.from), ' ', before && before.to === r.from ? detail(before.state) : '']
      : [r.event === 'created' ? 'nothing: the host created it' : 'the history before this snapshot was compacted']));
    const input = r.detail && r.detail.input;
    set('step-input', ...(input ? [el('strong', {}, r.input), ' ', el('code', {}, term(input))] : [r.event]),
      ...(r.close ? [' — ', close(r.close)] : []));
    set('step-to', badge(r.to), ' ', detail(r.state));
    const effects = (r.detail && r.detail.effects) || [];
    set('step-effects', ...(effects.length
      ? [el('ul', {}, ...effects.map((x) => el('li', {}, el('code', {}, term(x)))))]
      : ['none']));
    set('step-rule', ...(r.rule
      ? [el('strong', { 'data-rule': r.rule }, r.rule), ` ${r.rule_title}`]
      : [r.event === 'transition' ? 'no rule constrains this step (a host command or a pairing code)' : '—']));
    this.drawTimeline();
    draw(document.getElementById('diagram'), this.table, model.edges, this.records[n - 1].to,
      r.from ? `${r.from}|${r.to}` : null);
  }

  drawTimeline() {
    const NS = 'http://www.w3.org/2000/svg';
    const root = document.getElementById('timeline');
    const rs = this.records;
    const start = rs[0].at;
    const end = Math.max(now(), rs[rs.length - 1].at + 1);
    const x = (t) => ((t - start) / (end - start)) * 1000;
    const box = document.createElementNS(NS, 'svg');
    box.setAttribute('viewBox', '0 0 1000 86');
    box.setAttribute('preserveAspectRatio', 'none');
    box.setAttribute('role', 'img');
    box.setAttribute('aria-label', `Timeline of ${rs.length} records from ${time(start)}`);
    const add = (tag, attrs, text) => {
      const node = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      if (text != null) node.textContent = text;
      box.append(node);
      return node;
    };
    rs.forEach((r, i) => {
      const x0 = x(r.at), x1 = i + 1 < rs.length ? x(rs[i + 1].at) : 1000;
      const band = add('rect', {
        x: x0, y: 22, width: Math.max(1.5, x1 - x0), height: 34, class: `band${i === this.at ? ' selected' : ''}`,
        'data-kind': r.to, fill: `var(--${r.to})`,
      });
      const title = document.createElementNS(NS, 'title');
      title.textContent = `${r.to} from ${time(r.at)}${r.input ? ` (${r.input})` : ''}`;
      band.append(title);
      band.addEventListener('click', () => this.show(i));
      if (r.close) add('text', { x: x0, y: 16 }, r.close.code ?? '✕');
      if (r.input && HOST_INPUTS.has(r.input)) add('text', { x: x0, y: 74 }, `▲${r.input}`);
    });
    const cur = x(rs[this.at].at);
    add('line', { x1: cur, x2: cur, y1: 18, y2: 60, stroke: 'currentColor', 'stroke-width': 2 });
    root.replaceChildren(box);
  }
}

/** Asks with the confirmation dialog; true when confirmed. */
function confirmIt(text, action) {
  const dialog = document.getElementById('confirm-dialog');
  document.getElementById('confirm-text').textContent = text;
  const ok = document.getElementById('confirm-ok');
  ok.textContent = action[0].toUpperCase() + action.slice(1);
  return new Promise((resolve) => {
    const finish = (v) => { dialog.close(); resolve(v); };
    ok.onclick = () => finish(true);
    document.getElementById('confirm-cancel').onclick = () => finish(false);
    dialog.oncancel = () => resolve(false);
    dialog.showModal();
    document.getElementById('confirm-cancel').focus();
  });
}
