//! Embedding the engine in a host service: create, connect, turn transitions
//! into webhooks, plug in cleanup, delete. Runs against the built-in peer:
//!
//! ```sh
//! cargo run --example embed
//! ```

use std::sync::Arc;
use std::time::Duration;

use instance_lifecycle::engine::{Cleanup, Engine, EngineConfig, StepFuture};
use instance_lifecycle::log::InstanceSpec;
use instance_lifecycle::machine::{InstanceName, Policy, Preset};
use instance_lifecycle::testing::peer::{Action, TestPeer};

/// The host's own cleanup: named steps, run once per delete, in order.
struct HostCleanup;

impl Cleanup for HostCleanup {
    fn steps(&self) -> Vec<String> {
        vec!["session-store".into(), "media-files".into()]
    }

    fn run(&self, instance: InstanceName, step: &str) -> StepFuture {
        let step = step.to_owned();
        Box::pin(async move {
            println!("cleanup {step} for {instance}");
            Ok(())
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let peer = TestPeer::start().await?; // stands in for WhatsApp, Discord, …
    let data = tempfile::tempdir()?;
    let config = EngineConfig {
        policy: Policy::preset(Preset::Whatsapp),
        cleanup: Arc::new(HostCleanup),
        ..EngineConfig::default()
    };
    let engine = Engine::open(data.path(), config).await?;

    // Every transition, in order: what a host turns into webhooks.
    let mut events = engine.subscribe();
    tokio::spawn(async move {
        while let Ok(n) = events.recv().await {
            println!("webhook: {} {} → {} ({})", n.instance, n.from, n.to.kind(), n.to.coarse().as_str());
        }
    });

    engine.create("customer-42", InstanceSpec { url: peer.url() }).await?;
    engine.connect("customer-42").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("state: {}", engine.state("customer-42")?);

    // The socket dies without a close frame; the rules reconnect with backoff.
    peer.act("customer-42", Action::Drop);
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("state after a drop: {}", engine.state("customer-42")?);

    // Delete always reaches Removed, whatever the socket does (R2).
    let removed = engine.delete("customer-42").await?;
    println!("deleted: {removed}");
    engine.shutdown().await?;
    Ok(())
}
