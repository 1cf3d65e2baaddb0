//! Fleet-wide pacing: at most one permit per bucket per window, shared by
//! every connection that holds the same [`Pacer`].
//!
//! Discord allows `max_concurrency` IDENTIFYs per 5 s, one per bucket
//! (`shard_id % max_concurrency`); a WhatsApp gateway that restarts wants its
//! thousands of sessions to reconnect at a rate the service will not read as
//! abuse. Both are this: a permit per bucket, spaced by a window. A permit
//! is granted at the instant the caller acts (it writes the paced frame, or
//! opens the socket, right after), so two permits of one bucket are always
//! at least `window` apart as the peer sees them, plus a small margin for
//! the path between here and the peer.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Permits spaced by a window, per bucket.
#[derive(Debug)]
pub struct Pacer {
    buckets: Mutex<Vec<Option<Instant>>>,
    window: Duration,
    margin: Duration,
}

/// Why a pacer could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacerError {
    /// No bucket.
    #[error("a pacer needs at least one bucket (max_concurrency ≥ 1)")]
    NoBuckets,
    /// A window of nothing paces nothing.
    #[error("a pacer's window must be longer than zero")]
    ZeroWindow,
}

impl Pacer {
    /// `buckets` permits per `window`, one per bucket. The margin added to
    /// each window is 2 % of it (at most 100 ms).
    pub fn new(buckets: usize, window: Duration) -> Result<Self, PacerError> {
        if buckets == 0 {
            return Err(PacerError::NoBuckets);
        }
        if window.is_zero() {
            return Err(PacerError::ZeroWindow);
        }
        let margin = (window / 50).min(Duration::from_millis(100));
        Ok(Self { buckets: Mutex::new(vec![None; buckets]), window, margin })
    }

    /// The number of buckets.
    pub fn buckets(&self) -> usize {
        self.lock().len()
    }

    /// The window between two permits of one bucket (without the margin).
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The least time `permits` permits take from an idle pacer: the lower
    /// bound of a storm of that many connections.
    pub fn lower_bound(&self, permits: usize) -> Duration {
        let rounds = permits.div_ceil(self.buckets()).saturating_sub(1);
        (self.window + self.margin).saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX))
    }

    /// Waits for a permit of bucket `key % buckets`. Cancel-safe: a caller
    /// dropped while waiting takes nothing.
    pub async fn acquire(&self, key: u64) {
        loop {
            let wait = {
                let mut buckets = self.lock();
                let n = buckets.len() as u64;
                let slot = &mut buckets[usize::try_from(key % n).unwrap_or(0)];
                let now = Instant::now();
                match *slot {
                    Some(last) if now < last + self.window + self.margin => last + self.window + self.margin,
                    _ => {
                        *slot = Some(now);
                        return;
                    }
                }
            };
            tokio::time::sleep_until(wait).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Instant>>> {
        // A panic while holding this lock leaves plain data behind: go on with it.
        self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn permits_of_a_bucket_are_a_window_apart_and_buckets_are_independent() {
        let pacer = std::sync::Arc::new(Pacer::new(2, Duration::from_secs(5)).expect("pacer"));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for key in 0..6u64 {
            let pacer = pacer.clone();
            tasks.push(tokio::spawn(async move {
                pacer.acquire(key).await;
                (key % 2, Instant::now())
            }));
        }
        let mut grants = Vec::new();
        for t in tasks {
            grants.push(t.await.expect("task"));
        }
        for bucket in 0..2 {
            let mut times: Vec<Instant> = grants.iter().filter(|(b, _)| *b == bucket).map(|(_, t)| *t).collect();
            times.sort();
            assert_eq!(times.len(), 3);
            assert_eq!(times[0], start, "the first permit of a bucket is at once");
            for pair in times.windows(2) {
                assert!(pair[1] - pair[0] >= Duration::from_secs(5), "{:?}", pair[1] - pair[0]);
            }
        }
        let last = grants.iter().map(|(_, t)| *t).max().expect("grants");
        assert_eq!(last - start, pacer.lower_bound(6), "6 permits over 2 buckets take exactly the bound");
    }

    #[test]
    fn a_pacer_without_buckets_or_window_is_refused() {
        assert_eq!(Pacer::new(0, Duration::from_secs(1)).err(), Some(PacerError::NoBuckets));
        assert_eq!(Pacer::new(1, Duration::ZERO).err(), Some(PacerError::ZeroWindow));
        assert_eq!(Pacer::new(4, Duration::from_secs(5)).expect("pacer").lower_bound(0), Duration::ZERO);
    }
}
