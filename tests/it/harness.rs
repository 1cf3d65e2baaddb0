//! The harness for test authors, used as a host would: virtual-time
//! simulation (deterministic: the same seed gives the same log, record for
//! record), rule assertions on whole logs, and property tests that hammer the
//! engine's API with random concurrent commands (hostile hosts).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use instance_lifecycle::engine::{Cleanup, Engine, EngineConfig, StepFuture};
use instance_lifecycle::log::{InstanceSpec, Log, LogConfig, Record};
use instance_lifecycle::machine::{InstanceName, Preset, State};
use instance_lifecycle::testing::simulate::simulation_policy;
use instance_lifecycle::testing::{self, SimAction, SimBehaviour, SimTransport, assert_rules_hold};
use proptest::prelude::*;

fn records(log: &Log) -> Vec<Record> {
    log.records().collect::<Result<_, _>>().expect("readable log")
}

fn seed() -> u64 {
    std::env::var("LIFECYCLE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_124)
}

/// Two runs of the same seeded simulation write identical logs; an hour of a
/// 40-instance fleet's life (engine restarts included) takes seconds.
#[test]
fn a_seeded_virtual_simulation_is_deterministic() {
    let seed = seed();
    let replay = format!(
        "replay with: LIFECYCLE_SEED={seed} cargo test --test it harness::a_seeded_virtual_simulation_is_deterministic"
    );
    let policy = simulation_policy(Preset::Whatsapp);
    let hour = Duration::from_secs(3_600);
    let first = testing::simulate_virtual(seed, 40, hour, policy.clone()).unwrap_or_else(|e| panic!("{e}; {replay}"));
    let second = testing::simulate_virtual(seed, 40, hour, policy.clone()).unwrap_or_else(|e| panic!("{e}; {replay}"));
    let (a, b) = (records(&first), records(&second));
    assert!(a.len() > 5_000, "an hour of chaos should be thousands of transitions, got {}; {replay}", a.len());
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("runs differ at record {i}:\n{:#?}\n{:#?}\n{replay}", a[i], b[i]);
    }
    assert_eq!(a.len(), b.len(), "{replay}");
    assert_rules_hold(&first, &policy);
    let other = testing::simulate_virtual(seed + 1, 40, Duration::from_secs(600), policy).expect("another seed");
    assert_ne!(records(&other)[..100], a[..100], "a different seed gives a different run");
}

/// A host's cleanup hook under test: it counts how often each instance was cleaned.
#[derive(Clone, Default)]
struct CountingCleanup {
    runs: Arc<Mutex<HashMap<String, u32>>>,
}

impl Cleanup for CountingCleanup {
    fn steps(&self) -> Vec<String> {
        vec!["session-store".into()]
    }

    fn run(&self, instance: InstanceName, _: &str) -> StepFuture {
        let runs = self.runs.clone();
        Box::pin(async move {
            *runs.lock().expect("lock").entry(instance.to_string()).or_default() += 1;
            Ok(())
        })
    }
}

#[derive(Clone, Debug)]
enum HostOp {
    Create(usize),
    Connect(usize),
    Logout(usize),
    Restart(usize),
    Delete(usize),
    PeerDrops(usize),
    PeerZombie(usize),
    PeerHangsLogouts(usize),
    Wait(u64),
}

fn host_op() -> impl Strategy<Value = HostOp> {
    let i = 0usize..4;
    prop_oneof![
        3 => i.clone().prop_map(HostOp::Create),
        3 => i.clone().prop_map(HostOp::Connect),
        2 => i.clone().prop_map(HostOp::Logout),
        2 => i.clone().prop_map(HostOp::Restart),
        2 => i.clone().prop_map(HostOp::Delete),
        1 => i.clone().prop_map(HostOp::PeerDrops),
        1 => i.clone().prop_map(HostOp::PeerZombie),
        1 => i.prop_map(HostOp::PeerHangsLogouts),
        2 => (1u64..5_000).prop_map(HostOp::Wait),
    ]
}

/// Runs `ops` concurrently in virtual time: each op starts 10 ms after the
/// previous one, without waiting for it (commands overlap, names are reused
/// after removal). Returns the log and the cleanup counts.
fn hammer(ops: &[HostOp]) -> (Log, HashMap<String, u32>, testing::SimTransport) {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime");
    runtime.block_on(async {
        let transport = SimTransport::new();
        let cleanup = CountingCleanup::default();
        let log = Log::in_memory().expect("log");
        let config = EngineConfig {
            policy: simulation_policy(Preset::Whatsapp),
            log: LogConfig { durability: instance_lifecycle::log::Durability::Buffered, ..LogConfig::default() },
            transport: Arc::new(transport.clone()),
            cleanup: Arc::new(cleanup.clone()),
            epoch: Some(testing::EPOCH),
            ..EngineConfig::default()
        };
        let engine = Engine::with_log(log.clone(), config).await.expect("engine");
        let mut tasks = tokio::task::JoinSet::new();
        for op in ops.iter().cloned() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let (engine, transport) = (engine.clone(), transport.clone());
            tasks.spawn(async move {
                let n = |i: usize| format!("h{i}");
                let spec = || InstanceSpec { url: "ws://sim/".into() };
                // Refusals are part of the hammering; the log records what happened.
                match op {
                    HostOp::Create(i) => drop(engine.create(&n(i), spec()).await),
                    HostOp::Connect(i) => drop(engine.connect(&n(i)).await),
                    HostOp::Logout(i) => drop(engine.logout(&n(i)).await),
                    HostOp::Restart(i) => drop(engine.restart(&n(i)).await),
                    HostOp::Delete(i) => drop(engine.delete(&n(i)).await),
                    HostOp::PeerDrops(i) => {
                        transport.act(&n(i), SimAction::Close(None));
                    }
                    HostOp::PeerZombie(i) => {
                        transport.act(&n(i), SimAction::Zombify);
                    }
                    HostOp::PeerHangsLogouts(i) => transport.set(&n(i), SimBehaviour::HangOnLogout),
                    HostOp::Wait(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        // Let every bounded wait run out.
        tokio::time::sleep(Duration::from_secs(30)).await;
        engine.shutdown().await.expect("shutdown");
        let runs = cleanup.runs.lock().expect("lock").clone();
        (log, runs, transport)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Hostile hosts: random concurrent commands over a few instances, names
    /// reused after removal, a peer that drops, goes half-open or ignores
    /// logouts. Every rule holds on the resulting log.
    #[test]
    fn hostile_hosts_cannot_break_the_rules(ops in prop::collection::vec(host_op(), 1..60)) {
        let (log, _, _) = hammer(&ops);
        let violations = testing::check_rules(&log, &simulation_policy(Preset::Whatsapp));
        prop_assert!(violations.is_empty(), "{violations:#?}");
    }

    /// The README's example of a host property-testing its own cleanup hook:
    /// whatever the host and the peer do, each removal of an instance runs the
    /// hook exactly once, and nothing that was not removed is cleaned.
    #[test]
    fn host_cleanup_hook_runs_exactly_once_per_removal(ops in prop::collection::vec(host_op(), 1..60)) {
        let (log, runs, _) = hammer(&ops);
        let mut removals: HashMap<String, u32> = HashMap::new();
        for r in log.records() {
            let r = r.expect("record");
            if matches!(r.to.state, State::Removed { .. }) {
                *removals.entry(r.instance.to_string()).or_default() += 1;
            }
        }
        prop_assert_eq!(runs, removals);
    }
}
