// Talking to the service: JSON requests with the API key, and the event
// stream. The key is asked once, kept in sessionStorage (this tab only) and
// sent in the `apikey` header, never in a URL. The stream is read with
// fetch rather than EventSource, which cannot send a header.

const KEY = 'instance-lifecycle.apikey';

/** The error the API answered, with its code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, apikey: key } : extra;
}

let asking = null;

/** Shows the key dialog until a key is given; one dialog for every caller waiting. */
function askForKey(message) {
  if (asking) return asking;
  const dialog = document.getElementById('key-dialog');
  const input = document.getElementById('key-input');
  document.getElementById('key-error').textContent = message || '';
  asking = new Promise((resolve) => {
    const done = () => {
      if (!input.value) return;
      sessionStorage.setItem(KEY, input.value);
      input.value = '';
      dialog.close();
      asking = null;
      resolve();
    };
    document.getElementById('key-ok').onclick = done;
    input.onkeydown = (e) => { if (e.key === 'Enter') done(); };
    dialog.oncancel = (e) => e.preventDefault(); // nothing works without a key
    dialog.showModal();
    input.focus();
  });
  return asking;
}

/** A JSON request; asks for the key and retries when the service wants one. */
export async function request(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: headers(options.headers) });
    if (response.status === 401 || response.status === 403) {
      const had = sessionStorage.getItem(KEY);
      sessionStorage.removeItem(KEY);
      await askForKey(had ? 'That key was refused. Try again.' : '');
      continue;
    }
    const text = await response.text();
    const body = text ? JSON.parse(text) : null;
    if (!response.ok) {
      const e = (body && body.error) || {};
      throw new ApiError(response.status, e.code || 'http_' + response.status, e.message || response.statusText);
    }
    return body;
  }
}

/**
 * Follows `/v1/events` from `after`, calling `onEvent(event)` for each
 * record and `onStatus('live' | 'retrying', detail)` when the connection
 * changes. Reconnects with a growing pause, resuming with `Last-Event-ID`
 * so nothing is missed or seen twice. Returns a function that stops it.
 */
export function follow(after, { onEvent, onStatus }) {
  let last = String(after);
  let stopped = false;
  let controller = null;
  let pause = 250;

  async function once() {
    controller = new AbortController();
    // The server sends a comment every 15 s: silence for 40 s means a dead connection.
    let watchdog = null;
    const alive = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => controller.abort(), 40000);
    };
    alive();
    try {
      const response = await fetch('/v1/events', {
        headers: headers({ 'Last-Event-ID': last, Accept: 'text/event-stream' }),
        signal: controller.signal,
        cache: 'no-store',
      });
      if (response.status === 401 || response.status === 403) {
        sessionStorage.removeItem(KEY);
        await askForKey('The event stream needs a key.');
        return;
      }
      if (!response.ok || !response.body) throw new Error('HTTP ' + response.status);
      onStatus('live');
      pause = 250;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let event = { id: null, type: 'message', data: [] };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        alive();
        buffer += value;
        let cut;
        while ((cut = buffer.search(/\r?\n/)) >= 0) {
          const line = buffer.slice(0, cut);
          buffer = buffer.slice(cut + (buffer[cut] === '\r' ? 2 : 1));
          if (line === '') {
            if (event.data.length) dispatch(event);
            event = { id: null, type: 'message', data: [] };
            continue;
          }
          if (line.startsWith(':')) continue; // keep-alive
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let v = colon < 0 ? '' : line.slice(colon + 1);
          if (v.startsWith(' ')) v = v.slice(1);
          if (field === 'data') event.data.push(v);
          else if (field === 'event') event.type = v;
          else if (field === 'id') event.id = v;
        }
      }
    } finally {
      clearTimeout(watchdog);
    }
  }

  function dispatch(e) {
    if (e.type === 'dropped' || e.type === 'error' || e.type === 'lagged') {
      onStatus('retrying', e.data.join('\n'));
      controller.abort();
      return;
    }
    const body = JSON.parse(e.data.join('\n'));
    if (e.id) last = e.id;
    onEvent(body);
  }

  (async () => {
    while (!stopped) {
      try {
        await once();
      } catch (e) {
        if (stopped) return;
      }
      if (stopped) return;
      onStatus('retrying');
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, 5000);
    }
  })();

  return () => {
    stopped = true;
    if (controller) controller.abort();
  };
}
