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
//! the path between here and the peer. The callers of a bucket are served
//! in the order they asked: with R15 a queued connection no longer times
//! out, so the queue, not luck, must bound how long each one waits.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Permits spaced by a window, per bucket, granted in the order asked for.
#[derive(Debug)]
pub struct Pacer {
    buckets: Mutex<Vec<Bucket>>,
    /// Per bucket: a permit was granted or a waiter gave up (the queue moved).
    moved: Vec<Notify>,
    window: Duration,
    margin: Duration,
}

/// One bucket: when its last permit was granted, and who waits, in order.
#[derive(Debug, Default)]
struct Bucket {
    last: Option<Instant>,
    queue: VecDeque<u64>,
    next_ticket: u64,
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
        Ok(Self {
            buckets: Mutex::new((0..buckets).map(|_| Bucket::default()).collect()),
            moved: (0..buckets).map(|_| Notify::new()).collect(),
            window,
            margin,
        })
    }

    /// The number of buckets.
    pub fn buckets(&self) -> usize {
        self.moved.len()
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

    /// Waits for a permit of bucket `key % buckets`. Callers of one bucket
    /// are served in the order they called (a queue, so none waits longer
    /// than the ones ahead of it allow). Cancel-safe: a caller dropped while
    /// waiting takes nothing and leaves its place to the next.
    pub async fn acquire(&self, key: u64) {
        let b = usize::try_from(key % self.buckets() as u64).unwrap_or(0);
        let ticket = {
            let mut buckets = self.lock();
            let bucket = &mut buckets[b];
            let ticket = bucket.next_ticket;
            bucket.next_ticket = bucket.next_ticket.wrapping_add(1);
            bucket.queue.push_back(ticket);
            ticket
        };
        let mut place = Place { pacer: self, bucket: b, ticket, granted: false };
        loop {
            // Listen before looking, so a move between the look and the wait is not missed.
            let moved = self.moved[b].notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let due = {
                let mut buckets = self.lock();
                let bucket = &mut buckets[b];
                if bucket.queue.front() != Some(&ticket) {
                    None
                } else {
                    let now = Instant::now();
                    match bucket.last {
                        Some(last) if now < last + self.window + self.margin => Some(last + self.window + self.margin),
                        _ => {
                            bucket.last = Some(now);
                            bucket.queue.pop_front();
                            place.granted = true;
                            drop(buckets);
                            // The next in line now waits for its own turn.
                            self.moved[b].notify_waiters();
                            return;
                        }
                    }
                }
            };
            match due {
                // First in line: wait out the window (or a move, which cannot take the place).
                Some(at) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = &mut moved => {}
                },
                // Behind others: wait until the queue moves.
                None => moved.await,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Bucket>> {
        // A panic while holding this lock leaves plain data behind: go on with it.
        self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A caller's place in a bucket's queue, given up if it is dropped before its permit.
struct Place<'a> {
    pacer: &'a Pacer,
    bucket: usize,
    ticket: u64,
    granted: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let mut buckets = self.pacer.lock();
        let queue = &mut buckets[self.bucket].queue;
        let first = queue.front() == Some(&self.ticket);
        queue.retain(|t| *t != self.ticket);
        drop(buckets);
        if first {
            self.pacer.moved[self.bucket].notify_waiters();
        }
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

    #[tokio::test(start_paused = true)]
    async fn callers_of_a_bucket_are_served_in_the_order_they_asked() {
        let pacer = std::sync::Arc::new(Pacer::new(1, Duration::from_secs(5)).expect("pacer"));
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for n in 0..6u64 {
            let (pacer, order) = (pacer.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                pacer.acquire(0).await;
                order.lock().expect("lock").push(n);
            }));
            // Each asks after the one before it has taken its place.
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(*order.lock().expect("lock"), [0, 1, 2, 3, 4, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_leaves_its_place_to_the_next() {
        let pacer = std::sync::Arc::new(Pacer::new(1, Duration::from_secs(5)).expect("pacer"));
        let start = Instant::now();
        pacer.acquire(0).await;
        // Second in line, given up before its turn; the third takes its turn on time.
        let second = tokio::spawn({
            let pacer = pacer.clone();
            async move { pacer.acquire(0).await }
        });
        tokio::task::yield_now().await;
        let third = tokio::spawn({
            let pacer = pacer.clone();
            async move {
                pacer.acquire(0).await;
                Instant::now()
            }
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        second.abort();
        let granted = third.await.expect("third");
        assert_eq!(granted - start, Duration::from_secs(5) + Duration::from_millis(100));
    }

    #[test]
    fn a_pacer_without_buckets_or_window_is_refused() {
        assert_eq!(Pacer::new(0, Duration::from_secs(1)).err(), Some(PacerError::NoBuckets));
        assert_eq!(Pacer::new(1, Duration::ZERO).err(), Some(PacerError::ZeroWindow));
        assert_eq!(Pacer::new(4, Duration::from_secs(5)).expect("pacer").lower_bound(0), Duration::ZERO);
    }
}
