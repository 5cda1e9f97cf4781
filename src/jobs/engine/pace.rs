//! How many rows a worker claims at once: as far ahead of its free slots as the kind's recent pace says those
//! jobs will start soon, in claims that grow while a backlog lasts. Claimed rows waiting in one worker's
//! memory cannot run on another replica, so slow kinds never claim ahead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How quickly a kind's attempts finish, so a worker can claim ahead of its free slots exactly as far as it
/// will start those jobs soon. Claimed rows waiting in one worker's memory cannot run on another replica, so
/// slow kinds claim only free slots (as River and Oban do) while fast ones claim whole batches.
#[derive(Debug, Default)]
pub struct Pace {
    /// Exponentially weighted mean attempt duration in nanoseconds, as f64 bits; 0 until the first attempt.
    mean_ns: AtomicU64,
}

impl Pace {
    /// A claimed job should start within this long.
    const HORIZON_NS: f64 = 50_000_000.0;

    /// Records one attempt's duration. Concurrent updates may drop a sample; the mean stays a mean.
    pub fn observe(&self, took: Duration) {
        let sample = took.as_nanos() as f64;
        let old = f64::from_bits(self.mean_ns.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            sample.max(1.0)
        } else {
            old * 0.9 + sample * 0.1
        };
        self.mean_ns.store(new.to_bits(), Ordering::Relaxed);
    }

    /// Rows to claim: every free slot, plus what `concurrency` slots get through within the horizon at the
    /// recent pace, capped by the current claim size (see [`ClaimSize`]).
    pub fn claim_limit(&self, free: usize, concurrency: usize, size: usize) -> usize {
        let mean = f64::from_bits(self.mean_ns.load(Ordering::Relaxed));
        let ahead = if mean > 0.0 {
            (Self::HORIZON_NS * concurrency as f64 / mean).min(size as f64) as usize
        } else {
            0
        };
        (free + ahead).clamp(1, size.max(1))
    }
}

/// The claim size of one worker: the configured batch (`CONNECTOR_WORKER_BATCH_SIZE`) at first and whenever
/// the queue runs short, doubled after every claim that the size alone held back (it came back full), up
/// to [`ClaimSize::MAX`]. A deep backlog of quick jobs is so claimed in a few large statements instead of
/// many small ones (graphile-worker's local queue does the same), while a trickle costs one small claim.
#[derive(Debug, Clone, Copy)]
pub struct ClaimSize {
    batch: usize,
    now: usize,
}

impl ClaimSize {
    /// The most rows one claim takes, however long the backlog.
    pub const MAX: usize = 1000;

    /// Starts at `batch`.
    pub fn new(batch: usize) -> Self {
        let batch = batch.clamp(1, Self::MAX);
        Self { batch, now: batch }
    }

    /// The size to claim with now.
    pub fn get(&self) -> usize {
        self.now
    }

    /// Learns from a claim: whether it came back `full`, and whether this size is what held it back
    /// (`bound_by_size`), rather than the free slots or the kind's pace.
    pub fn claimed(&mut self, bound_by_size: bool, full: bool) {
        self.now = match (full, bound_by_size) {
            (true, true) => (self.now * 2).min(Self::MAX),
            (true, false) => self.now,
            (false, _) => self.batch,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_with_no_history_claims_only_free_slots() {
        assert_eq!(Pace::default().claim_limit(3, 8, 100), 3);
    }

    #[test]
    fn fast_kinds_claim_ahead_up_to_the_batch_size() {
        let pace = Pace::default();
        pace.observe(Duration::from_micros(100));
        assert_eq!(pace.claim_limit(1, 1, 10), 10);
        assert_eq!(pace.claim_limit(1, 1, 100), 100);
    }

    #[test]
    fn slow_kinds_claim_only_what_starts_within_the_horizon() {
        let pace = Pace::default();
        pace.observe(Duration::from_secs(2));
        assert_eq!(
            pace.claim_limit(2, 8, 100),
            2,
            "no claiming ahead of 2 s jobs"
        );
        let medium = Pace::default();
        medium.observe(Duration::from_millis(10));
        // 8 slots at 10 ms each get through 40 jobs in 50 ms.
        assert_eq!(medium.claim_limit(1, 8, 100), 41);
    }

    #[test]
    fn the_claim_size_doubles_while_claims_come_back_full_and_falls_back_when_one_does_not() {
        let mut size = ClaimSize::new(10);
        let mut seen = Vec::new();
        for _ in 0..9 {
            size.claimed(true, true);
            seen.push(size.get());
        }
        assert_eq!(seen, [20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        size.claimed(true, false);
        assert_eq!(size.get(), 10, "a short claim means the backlog is gone");
    }

    #[test]
    fn a_claim_held_back_by_free_slots_does_not_grow_the_size() {
        let mut size = ClaimSize::new(10);
        size.claimed(false, true);
        assert_eq!(size.get(), 10);
    }

    #[test]
    fn the_pace_follows_recent_attempts() {
        let pace = Pace::default();
        pace.observe(Duration::from_secs(1));
        for _ in 0..100 {
            pace.observe(Duration::from_micros(50));
        }
        assert_eq!(pace.claim_limit(1, 1, 10), 10);
    }
}
