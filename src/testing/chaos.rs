//! The chaos schedule of `lifecycle simulate` and of the virtual-time
//! harness: which instance, what fault, when. A pure function of its
//! arguments, generated one second at a time.

use std::time::Duration;

use crate::machine::SplitMix64;

/// One step of the chaos schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chaos {
    /// Create and connect.
    Create,
    /// Host: connect.
    Connect,
    /// Host: logout.
    Logout,
    /// Host: delete.
    Delete,
    /// Host: restart the instance.
    Restart,
    /// Peer: the connection goes half-open.
    Zombify,
    /// Peer: close with this wire code.
    Close(u16),
    /// Peer: drop TCP without a close frame.
    Drop,
    /// Peer: stop answering logouts, then the host logs out.
    HangingLogout,
    /// Peer: the connection goes half-open; the host deletes the instance as
    /// soon as the heartbeat finds the zombie (PR 2520).
    DeleteZombie,
    /// Restart the whole engine on the same log.
    EngineRestart,
}

impl Chaos {
    fn is_peer_fault(&self) -> bool {
        matches!(self, Self::Zombify | Self::Close(_) | Self::Drop | Self::HangingLogout | Self::DeleteZombie)
    }
}

/// The schedule: (offset, instance index, what), in time order. Pure
/// function of its arguments. See [`schedule_iter`].
pub fn schedule(seed: u64, instances: usize, duration: Duration, with_faults: bool) -> Vec<(Duration, usize, Chaos)> {
    schedule_iter(seed, instances, duration, with_faults).collect()
}

/// The schedule, generated as it is consumed: creates spread over the first
/// tenth of the run, then about one event per instance every ten seconds,
/// drawn one second at a time from a generator seeded by (seed, second), and
/// an engine restart at each third. Memory is the creates plus one second's
/// events, whatever the length.
pub fn schedule_iter(
    seed: u64,
    instances: usize,
    duration: Duration,
    with_faults: bool,
) -> impl Iterator<Item = (Duration, usize, Chaos)> {
    let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1_000);
    let mut rng = SplitMix64::new(seed);
    let mut creates: Vec<_> =
        (0..instances).map(|i| (Duration::from_millis(rng.below(ms / 10)), i, Chaos::Create)).collect();
    creates.sort_by_key(|(at, i, _)| (*at, *i));
    let restarts = [1, 2].map(|third| (Duration::from_millis(ms * third / 3), 0, Chaos::EngineRestart));
    let (first, span) = (ms / 10, ms - ms / 10);
    let events = (instances as u64).saturating_mul(ms) / 10_000;
    let events = events.max(1);
    let slices = span.div_ceil(1_000).max(1);
    let slice = move |k: u64| {
        let mut rng = SplitMix64::new(seed ^ k.wrapping_mul(0xa076_1d64_78bd_642f) ^ 0x5eed);
        // Events are split evenly over the seconds; the remainder goes to the later ones.
        let count = events * (k + 1) / slices - events * k / slices;
        let width = (span - k * 1_000).min(1_000);
        let mut out: Vec<_> = (0..count)
            .filter_map(|_| {
                let at = first + k * 1_000 + rng.below(width);
                let i = usize::try_from(rng.below(instances as u64)).unwrap_or(0);
                let what = chaos_of(rng.below(100));
                (with_faults || !what.is_peer_fault()).then_some((Duration::from_millis(at), i, what))
            })
            .collect();
        out.sort_by_key(|(at, i, _)| (*at, *i));
        out
    };
    let mut creates = creates.into_iter().peekable();
    let mut restarts = restarts.into_iter().peekable();
    let mut events = (0..slices).flat_map(slice).peekable();
    std::iter::from_fn(move || {
        let key = |e: Option<&(Duration, usize, Chaos)>| e.map(|(at, i, _)| (*at, *i));
        let candidates = [key(creates.peek()), key(restarts.peek()), key(events.peek())];
        let (source, _) =
            candidates.iter().enumerate().filter_map(|(n, k)| k.map(|k| (n, k))).min_by_key(|(_, k)| *k)?;
        match source {
            0 => creates.next(),
            1 => restarts.next(),
            _ => events.next(),
        }
    })
}

fn chaos_of(draw: u64) -> Chaos {
    match draw {
        0..=11 => Chaos::Zombify,
        12..=17 => Chaos::Close(4401),
        18..=25 => Chaos::Close(4408),
        26..=29 => Chaos::Close(4440),
        30..=35 => Chaos::Close(4515),
        36..=41 => Chaos::Close(1011),
        42..=53 => Chaos::Drop,
        54..=59 => Chaos::HangingLogout,
        60..=67 => Chaos::DeleteZombie,
        68..=75 => Chaos::Logout,
        76..=81 => Chaos::Delete,
        82..=89 => Chaos::Restart,
        _ => Chaos::Connect,
    }
}
