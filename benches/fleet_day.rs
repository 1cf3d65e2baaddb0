//! `cargo bench --bench fleet_day`: a day of a fleet (10,000 instances by
//! default; `BENCH_SCALE` scales it) through the chaos schedule of
//! `lifecycle simulate`, on the core's drivers in virtual time
//! (`testing::fleet`), every rule checked after every step. Reported: the
//! ratio of simulated to wall time, and the steps checked per second, beside
//! the plain `step` rate (the table alone, nothing checked, same run).

use std::time::{Duration, Instant};

use instance_lifecycle::machine::{Input, Instance, InstanceName, Policy, Preset, Timestamp, step};
use instance_lifecycle::testing::fleet::{FleetReport, fleet_shard};

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * scale) as usize).max(10)
}

/// The table alone: `step` on a connect from Closed, as fast as it goes.
fn bare_steps_per_second() -> f64 {
    let (name, policy) = (InstanceName::new("bare").expect("name"), Policy::preset(Preset::Whatsapp));
    let instance = Instance::new();
    let n = 2_000_000u64;
    let start = Instant::now();
    let mut moved = 0u64;
    for t in 0..n {
        if matches!(
            step(&name, &instance, &Input::Connect, &policy, Timestamp(t)),
            instance_lifecycle::machine::Outcome::Transition(_)
        ) {
            moved += 1;
        }
    }
    assert_eq!(moved, n);
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let instances = scaled(10_000);
    let day = Duration::from_secs(24 * 3600);
    let policy = Policy::preset(Preset::Whatsapp);
    let shards = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    let start = Instant::now();
    let reports: Vec<FleetReport> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..shards)
            .map(|k| {
                let policy = &policy;
                s.spawn(move || fleet_shard(1, instances, day, policy, k, shards))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("shard")).collect()
    });
    let wall = start.elapsed();
    let steps: u64 = reports.iter().map(|r| r.steps).sum();
    let transitions: u64 = reports.iter().map(|r| r.transitions).sum();
    let upkeep: u64 = reports.iter().map(|r| r.upkeep).sum();
    let chaos: u64 = reports.iter().map(|r| r.chaos).sum();
    let violations: Vec<&String> = reports.iter().flat_map(|r| &r.violations).collect();
    let bare = bare_steps_per_second();
    println!("## Fleet-day (`cargo bench --bench fleet_day`, {instances} instances, 24 h, {shards} threads)\n");
    println!("| measurement | harness | baseline, same run | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| a day of the fleet in virtual time, every rule checked after every step | {:.1} s wall | 60 s | {:.0}× simulated/wall | ≥ 1440× |",
        wall.as_secs_f64(),
        day.as_secs_f64() / wall.as_secs_f64()
    );
    println!(
        "| steps checked per second ({steps} steps: {transitions} transitions, {upkeep} heartbeats; {chaos} chaos events) | {:.0} | `step` alone, one thread: {bare:.0} | {:.2}× | (shown) |",
        steps as f64 / wall.as_secs_f64(),
        steps as f64 / wall.as_secs_f64() / bare
    );
    println!("| rules broken | {} | | | 0 |", violations.len());
    for v in violations.iter().take(5) {
        println!("<!-- {v} -->");
    }
}
