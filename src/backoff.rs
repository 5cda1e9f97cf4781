//! Waiting between tries, in one shape for the whole process: job retries (their delay is persisted on the job)
//! and the loops that retry in place (the LISTEN connection, Pub/Sub sessions, migrations at start-up,
//! schedules, job fetches and result writes).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff with jitter and a cap: try `n` after a failure waits `base * factor^(n-1)`, capped, then
/// spread by up to `jitter` either way so that a burst of failures does not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Growth per attempt.
    pub factor: f64,
    /// Longest delay.
    pub cap: Duration,
    /// Fraction of the delay added or removed at random (0.0-1.0).
    pub jitter: f64,
}

impl Backoff {
    /// Exponential backoff with 20 % jitter.
    pub fn exponential(base: Duration, factor: f64, cap: Duration) -> Self {
        Self {
            base,
            factor,
            cap,
            jitter: 0.2,
        }
    }

    /// Doubling from `base` up to `cap`, with 20 % jitter: what a reconnect loop wants.
    pub fn doubling(base: Duration, cap: Duration) -> Self {
        Self::exponential(base, 2.0, cap)
    }

    /// The delay before the attempt after failed attempt `attempt` (1-based), for a random draw `unit` in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let raw = self.base.as_secs_f64() * self.factor.powi(exponent);
        let capped = raw.min(self.cap.as_secs_f64());
        let spread = capped * self.jitter * (2.0 * unit - 1.0);
        Duration::from_secs_f64((capped + spread).clamp(0.0, self.cap.as_secs_f64()))
    }

    /// The waits of one retry loop, starting from no failure.
    pub fn retries(self) -> Retries {
        Retries {
            backoff: self,
            failures: 0,
        }
    }
}

/// The waits of one retry loop in process: each failure in a row waits longer, a success starts over.
#[derive(Debug, Clone)]
pub struct Retries {
    backoff: Backoff,
    failures: u32,
}

impl Retries {
    /// Counts a failure; the wait before the next try.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.delay(self.failures, rand::random())
    }

    /// The next try worked: the next failure waits the shortest delay again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Sleeps `wait` unless `stop` fires first; true when stopped.
    pub async fn sleep(wait: Duration, stop: &CancellationToken) -> bool {
        tokio::select! {
            () = stop.cancelled() => true,
            () = tokio::time::sleep(wait) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_the_factor_and_stops_at_the_cap() {
        let backoff = Backoff {
            jitter: 0.0,
            ..Backoff::exponential(Duration::from_secs(10), 2.0, Duration::from_secs(300))
        };
        let delays: Vec<u64> = (1..=7).map(|n| backoff.delay(n, 0.5).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
    }

    #[test]
    fn backoff_jitter_stays_within_its_fraction_and_under_the_cap() {
        let backoff = Backoff::exponential(Duration::from_secs(10), 2.0, Duration::from_secs(300));
        assert_eq!(backoff.delay(1, 0.0), Duration::from_secs(8));
        assert_eq!(backoff.delay(1, 1.0), Duration::from_secs(12));
        assert!(backoff.delay(30, 1.0) <= Duration::from_secs(300));
        assert!(backoff.delay(30, 0.0) >= Duration::from_secs(240));
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let backoff = Backoff::exponential(Duration::from_secs(1), 10.0, Duration::from_secs(60));
        assert!(backoff.delay(u32::MAX, 0.5) <= Duration::from_secs(60));
    }

    #[test]
    fn a_retry_loop_waits_longer_after_each_failure_and_starts_over_after_a_success() {
        let mut retries = Backoff {
            jitter: 0.0,
            ..Backoff::doubling(Duration::from_millis(250), Duration::from_secs(1))
        }
        .retries();
        let waits: Vec<u128> = (0..4).map(|_| retries.failed().as_millis()).collect();
        assert_eq!(waits, [250, 500, 1000, 1000]);
        assert_eq!(retries.failures(), 4);
        retries.succeeded();
        assert_eq!(retries.failed(), Duration::from_millis(250));
    }
}
