//! Host-reported signals through the Rust engine API, directly: the
//! baseline of the Node package's signal benchmark
//! (`bindings/node/bench/signals.mjs` runs this in the same run and prints
//! the ratio). The workload is the JavaScript one: `INSTANCES` external
//! instances made Open by signals, then `ROUNDS` rounds in which every
//! instance reports a pong for its connection, all at once, answers awaited.
//! Prints one JSON line: `{"signals_per_s": …, "signals": …}`.

use std::sync::Arc;
use std::time::Instant;

use instance_lifecycle::engine::{Engine, EngineConfig};
use instance_lifecycle::log::InstanceSpec;
use instance_lifecycle::machine::{Generation, Identity, Input, Policy, Preset};
use instance_lifecycle::transport::{Endpoint, HostAction, Hub, ReferenceProtocol, Routed, WsLimits, WsTransport};

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * scale) as usize).max(1)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (instances, rounds) = (scaled(200), scaled(250));
    let dir = tempfile::tempdir().expect("dir");
    let hub = Hub::new();
    let (tx, mut opens) = tokio::sync::mpsc::unbounded_channel();
    hub.listen(Box::new(move |e| {
        if matches!(e.action, HostAction::Open { .. }) {
            let _ = tx.send((e.instance.clone(), e.generation));
        }
    }));
    let ws = WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default());
    let config = EngineConfig {
        policy: Policy::preset(Preset::Whatsapp),
        transport: Arc::new(Routed::new(ws, hub.clone())),
        ..EngineConfig::default()
    };
    let engine = Engine::open(dir.path(), config).await.expect("engine");
    let names: Vec<String> = (0..instances).map(|i| format!("sig-{i:04}")).collect();
    for n in &names {
        engine.create(n, InstanceSpec { url: Endpoint::EXTERNAL.into() }).await.expect("create");
        engine.connect(n).await.expect("connect");
    }
    let mut generations = std::collections::HashMap::new();
    while generations.len() < instances {
        let (name, generation) = opens.recv().await.expect("open effect");
        generations.insert(name.to_string(), Generation(generation));
    }
    for n in &names {
        let identity = Identity::new(format!("{n}@s.whatsapp.net")).ok();
        engine.signal(n, Input::TransportOpened { generation: generations[n], identity }).await.expect("opened");
    }
    let start = Instant::now();
    for _ in 0..rounds {
        let pongs = names.iter().map(|n| engine.signal(n, Input::Pong { generation: generations[n] }));
        for answer in futures_util::future::join_all(pongs).await {
            answer.expect("pong");
        }
    }
    let took = start.elapsed().as_secs_f64();
    let signals = instances * rounds;
    println!("{{\"signals_per_s\": {:.0}, \"signals\": {signals}}}", signals as f64 / took);
    engine.shutdown().await.expect("shutdown");
}
