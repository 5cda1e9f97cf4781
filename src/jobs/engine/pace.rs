//! How far ahead of its free slots a worker claims: as far as the kind's recent pace says those jobs will
//! start soon. Claimed rows waiting in one worker's memory cannot run on another replica.

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
    /// recent pace, capped by the batch size.
    pub fn claim_limit(&self, free: usize, concurrency: usize, batch: usize) -> usize {
        let mean = f64::from_bits(self.mean_ns.load(Ordering::Relaxed));
        let ahead = if mean > 0.0 {
            (Self::HORIZON_NS * concurrency as f64 / mean).min(batch as f64) as usize
        } else {
            0
        };
        (free + ahead).clamp(1, batch.max(1))
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
    fn the_pace_follows_recent_attempts() {
        let pace = Pace::default();
        pace.observe(Duration::from_secs(1));
        for _ in 0..100 {
            pace.observe(Duration::from_micros(50));
        }
        assert_eq!(pace.claim_limit(1, 1, 10), 10);
    }
}
