use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A job's id: the row's key, increasing with insertion order (so it doubles as a pagination cursor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a job is in its life, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker; due now.
    Pending,
    /// Waiting for its run time: enqueued for later, or backing off before a retry.
    Scheduled,
    /// Claimed by a worker that is running it.
    Running,
    /// Finished successfully.
    Completed,
    /// Dead-lettered: a permanent error, or out of attempts. Kept with every attempt's error; can be replayed.
    Dead,
    /// Cancelled by an operator before it ran.
    Cancelled,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Scheduled,
        JobState::Running,
        JobState::Completed,
        JobState::Dead,
        JobState::Cancelled,
    ];

    /// The state's name as the API and metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown job state {s:?}: expected one of {}",
                    JobState::ALL.map(JobState::as_str).join(", ")
                )
            })
    }
}

/// One failed or interrupted attempt, as kept in the job's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptError {
    /// Which attempt (1-based) this was.
    pub attempt: i32,
    /// When the attempt ended.
    pub at: chrono::DateTime<chrono::Utc>,
    /// How it failed: `transient`, `retry_after`, `permanent`, `timeout`, `panic`, `crash`, `interrupted`,
    /// `undecodable`, or `replayed` (an operator gave the job a fresh set of attempts).
    pub class: String,
    /// A short machine-readable reason when the job gave one (e.g. `no_config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// What happened, for people.
    pub error: String,
    /// The worker process that ran the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_states_round_trip_through_their_names() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().unwrap(), state);
        }
        assert!(
            "queued"
                .parse::<JobState>()
                .unwrap_err()
                .contains("pending")
        );
    }
}
