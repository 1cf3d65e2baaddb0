// The dashboard's start: load the fleet, follow the event stream, route
// between the fleet (`#/`) and one instance (`#/instance/NAME`).

import { request, follow } from './api.js';
import { model, load, apply, FleetView } from './fleet.js';
import { InstanceView } from './instance.js';
import { time } from './words.js';

const fleetRoot = document.getElementById('fleet-view');
const instanceRoot = document.getElementById('instance-view');
const banner = document.getElementById('banner');
const live = document.getElementById('live');

const fleet = new FleetView(fleetRoot);
const instance = new InstanceView(instanceRoot);
let table = [];

function route() {
  const m = location.hash.match(/^#\/instance\/(.+)$/);
  if (m) {
    fleetRoot.hidden = true;
    instanceRoot.hidden = false;
    instance.open(decodeURIComponent(m[1]), table).catch(show);
  } else {
    instance.name = null;
    instanceRoot.hidden = true;
    fleetRoot.hidden = false;
    fleet.invalidate();
  }
  document.getElementById('main').focus({ preventScroll: true });
}

function show(e) {
  live.textContent = `error: ${e.message}`;
}

let queued = [];
let counted = 0;

/** Events are applied at once but drawn once per frame. */
function onEvent(e) {
  queued.push(e);
  if (queued.length === 1) {
    requestAnimationFrame(() => {
      const batch = queued;
      queued = [];
      for (const ev of batch) {
        apply(ev);
        if (!instanceRoot.hidden) instance.event(ev);
      }
      counted += batch.length;
      live.textContent = `live · ${counted} transition${counted === 1 ? '' : 's'} since load · at #${model.position}`;
      // Already in a frame: draw now rather than one frame later.
      if (!fleetRoot.hidden) fleet.draw();
    });
  }
}

function onStatus(status, detail) {
  banner.hidden = status === 'live';
  if (status !== 'live') banner.textContent = `Disconnected — retrying…${detail ? ` (${detail})` : ''}`;
  else live.textContent = `live · at #${model.position}`;
}

async function start() {
  const [view, edges] = await Promise.all([request('/v1/fleet'), request('/v1/table')]);
  table = edges;
  load(view);
  document.getElementById('mode').textContent = model.readOnly
    ? `replay of a copied log (read-only) · as of ${time(view.now)} · policy ${model.policy}`
    : `policy ${model.policy}`;
  if (model.readOnly) {
    live.textContent = `read-only · ${view.instances.length} instances · up to #${model.position}`;
  } else {
    follow(model.position, { onEvent, onStatus });
    // Times in state move on with the clock.
    setInterval(() => fleet.invalidate(), 5000);
  }
  window.addEventListener('hashchange', route);
  route();
}

start().catch(show);
