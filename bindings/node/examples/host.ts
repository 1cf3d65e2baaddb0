// Type-checked against index.d.ts (`npm run typecheck`): the shape of a
// host that holds its own connections. Not run.
import { Engine, LifecycleError, type HostEffect, type Signaled, type Transition } from '../index';

async function main(): Promise<void> {
  const engine = await Engine.open('./data', { policy: 'whatsapp', durability: 'group-commit', closeTimeoutMs: 2000 });
  const stop = engine.onEffect((effect: HostEffect) => {
    switch (effect.kind) {
      case 'open':
        console.log(`open ${effect.instance} #${effect.generation}, resuming ${effect.resume ?? 'nothing'}`);
        break;
      case 'close':
        console.log(`close with ${effect.status}`);
        break;
      case 'sendLogout':
      case 'ping':
      case 'abort':
        break;
    }
  });
  await engine.create('acme', { external: true });
  const view = await engine.connect('acme');
  const answer: Signaled = await engine.signal('acme', { kind: 'opened', generation: 1, identity: '5511@s.whatsapp.net' });
  if (answer.outcome === 'ignored') console.log(`stale: now ${answer.state}, generation ${answer.generation}`);
  for await (const t of engine.transitions()) {
    const seen: Transition = t;
    console.log(seen.instance, seen.from, '->', seen.to.kind, view.name);
    break;
  }
  try {
    await engine.connect('nobody');
  } catch (e) {
    if (e instanceof LifecycleError && e.code === 'unknown_instance') console.log(e.message);
  }
  stop();
  await engine.close();
}

void main();
