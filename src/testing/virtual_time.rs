//! The engine under virtual time: an engine on an in-memory log with the
//! simulated transport and a fixed epoch, driven by a seeded chaos schedule
//! on a paused tokio clock. The same seed gives the same log, record for
//! record; hours of simulated fleet life take seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::chaos::{Chaos, schedule_iter};
use super::{SimAction, SimTransport};
use crate::engine::{Engine, EngineConfig, EngineError};
use crate::log::{Event, InstanceSpec, Log, LogConfig, Record};
use crate::machine::{Generation, Input, Policy, State, Timestamp, step};
use crate::transport::{Protocol, ReferenceProtocol};

/// The fixed wall-clock epoch of simulated engines (2023-11-14), so records are reproducible.
pub const EPOCH: Timestamp = Timestamp(1_700_000_000_000);

/// An engine on a fresh in-memory log with `transport`, for use under
/// `tokio::time::pause` (or a runtime built with `start_paused(true)`).
pub async fn sim_engine(policy: Policy, transport: SimTransport) -> Result<Engine, EngineError> {
    sim_engine_on(Log::in_memory()?, policy, transport).await
}

/// [`sim_engine`] on an existing log (e.g. to restart a simulated engine).
pub async fn sim_engine_on(log: Log, policy: Policy, transport: SimTransport) -> Result<Engine, EngineError> {
    let config = EngineConfig {
        policy,
        log: LogConfig { durability: crate::log::Durability::Buffered, ..LogConfig::default() },
        transport: Arc::new(transport),
        epoch: Some(EPOCH),
        // Compaction runs on a blocking thread, outside virtual time: a
        // simulation that wants it calls `Engine::compact` at a chosen moment.
        compaction: None,
        ..EngineConfig::default()
    };
    Engine::with_log(log, config).await
}

/// Runs the seeded chaos schedule of `lifecycle simulate` against the
/// simulated transport in virtual time, on its own single-threaded paused
/// runtime, and returns the log. Deterministic: same arguments, same log.
pub fn simulate_virtual(seed: u64, instances: usize, duration: Duration, policy: Policy) -> Result<Log, EngineError> {
    simulate_virtual_on(Log::in_memory()?, seed, instances, duration, policy)
}

/// [`simulate_virtual`] on a log of your choice (a sled log, to test what an
/// engine writes to disk; a log that already holds a run, to go on from it:
/// the engine recovers it first). Open a sled log `Buffered`: a durable mode
/// waits for real fsyncs, and virtual time runs ahead while it waits. With a
/// sled log the run is not reproducible record for record.
pub fn simulate_virtual_on(
    log: Log,
    seed: u64,
    instances: usize,
    duration: Duration,
    policy: Policy,
) -> Result<Log, EngineError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| EngineError::log(None, crate::log::LogError::Failed(format!("runtime: {e}"))))?;
    runtime.block_on(async move {
        let transport = SimTransport::new();
        let mut engine = sim_engine_on(log.clone(), policy.clone(), transport.clone()).await?;
        let spec = InstanceSpec { url: "ws://simulated/".into() };
        let start = tokio::time::Instant::now();
        let mut in_flight = tokio::task::JoinSet::new();
        for (at, i, what) in schedule_iter(seed, instances, duration, true) {
            tokio::time::sleep_until(start + at).await;
            let name = format!("sim-{i:04}");
            let peer_status = |code: u16| Some(ReferenceProtocol.status_of(code));
            match &what {
                Chaos::Zombify | Chaos::DeleteZombie => drop(transport.act(&name, SimAction::Zombify)),
                Chaos::Close(code) => drop(transport.act(&name, SimAction::Close(peer_status(*code)))),
                Chaos::Drop => drop(transport.act(&name, SimAction::Close(None))),
                Chaos::EngineRestart => {
                    engine.shutdown().await?;
                    in_flight.abort_all();
                    while in_flight.join_next().await.is_some() {}
                    engine = sim_engine_on(log.clone(), policy.clone(), transport.clone()).await?;
                    continue;
                }
                _ => {}
            }
            let (engine, spec) = (engine.clone(), spec.clone());
            let delay = if what == Chaos::DeleteZombie {
                policy.heartbeat.interval + policy.heartbeat.deadline
            } else {
                Duration::ZERO
            };
            in_flight.spawn(async move {
                tokio::time::sleep(delay).await;
                // Refusals (connect while closing, …) are part of chaos; the log records what happened.
                let _ = match what {
                    Chaos::Create => match engine.create(&name, spec).await {
                        Ok(()) | Err(EngineError::AlreadyExists { .. }) => engine.connect(&name).await.map(drop),
                        Err(e) => Err(e),
                    },
                    // A removed name comes back as a new instance (R1: only by a create).
                    Chaos::Connect => match engine.connect(&name).await {
                        Err(EngineError::Removed { .. }) => match engine.create(&name, spec).await {
                            Ok(()) => engine.connect(&name).await.map(drop),
                            Err(e) => Err(e),
                        },
                        other => other.map(drop),
                    },
                    Chaos::Restart => engine.restart(&name).await.map(drop),
                    Chaos::Logout | Chaos::HangingLogout => engine.logout(&name).await.map(drop),
                    Chaos::Delete | Chaos::DeleteZombie => engine.delete(&name).await.map(drop),
                    Chaos::Zombify | Chaos::Close(_) | Chaos::Drop | Chaos::EngineRestart => Ok(()),
                };
            });
        }
        tokio::time::sleep_until(start + duration).await;
        while in_flight.join_next().await.is_some() {}
        engine.shutdown().await?;
        Ok(log)
    })
}

/// Checks the rules on a whole log, beyond [`Log::verify`] (R8): R1 (nothing
/// leaves `Removed` except a new `Created`), R3 (after a logout, no
/// automatic move to `Connecting` until a connect or restart), R6 (every
/// `Open` came from an "opened" with that identity), R9 (each new attempt
/// takes the next generation) and R12 (no transition caused by another
/// generation's signal). Returns every violation, printed.
pub fn check_rules(log: &Log, policy: &Policy) -> Vec<String> {
    let mut violations: Vec<String> = log.verify(policy).findings.iter().map(|f| format!("R8: {f}")).collect();
    let mut by_instance: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for r in log.records() {
        match r {
            Ok(r) => by_instance.entry(r.instance.to_string()).or_default().push(r),
            Err(e) => violations.push(format!("R8: {e}")),
        }
    }
    for (name, records) in by_instance {
        let mut logged_out = false;
        for r in &records {
            let at = format!("{name}#{}", r.seq);
            match &r.event {
                Event::Created { .. } | Event::Snapshot { .. } => logged_out = false,
                Event::Transition { from, input, .. } => {
                    if matches!(from.state, State::Removed { .. }) {
                        violations.push(format!("R1: {at} left Removed on {:?}", input.kind()));
                    }
                    if let Some(g) = input.generation()
                        && g != from.generation
                    {
                        violations.push(format!("R12: {at} moved on a signal of {g} while at {}", from.generation));
                    }
                    match input {
                        Input::Connect | Input::Restart => logged_out = false,
                        Input::Logout if matches!(r.to.state, State::Closing { .. } | State::Closed { .. }) => {
                            logged_out = true
                        }
                        _ => {}
                    }
                    if logged_out && !input.is_host_command() && matches!(r.to.state, State::Connecting { .. }) {
                        violations.push(format!("R3: {at} reconnected on {:?} after a logout", input.kind()));
                    }
                    if let State::Open { identity, .. } = &r.to.state
                        && !matches!(from.state, State::Open { .. })
                        && !matches!(input, Input::TransportOpened { identity: Some(id), .. } if id == identity)
                    {
                        violations.push(format!("R6: {at} opened on {:?}", input.kind()));
                    }
                    let next: Generation = from.generation.next();
                    if r.to.generation != from.generation && r.to.generation != next {
                        violations.push(format!("R9: {at} jumped from {} to {}", from.generation, r.to.generation));
                    }
                    // The rules of this build reproduce the record (also checked by verify).
                    if let crate::machine::Outcome::Transition(t) = step(&r.instance, from, input, policy, r.at)
                        && t.to != r.to.state
                    {
                        violations.push(format!("R8: {at} diverges"));
                    }
                }
            }
        }
    }
    violations
}

/// Panics with every violation (and how to see the log) when a rule is broken.
#[track_caller]
pub fn assert_rules_hold(log: &Log, policy: &Policy) {
    let violations = check_rules(log, policy);
    assert!(violations.is_empty(), "{} rule violation(s):\n{}", violations.len(), violations.join("\n"));
}
