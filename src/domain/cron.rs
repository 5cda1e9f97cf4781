//! Cron expressions, evaluated in UTC.

use std::str::FromStr;

use chrono::{DateTime, Utc};

/// A parsed cron expression, evaluated in UTC. Accepts the classic five fields (`0 2 * * *`) or the
/// six/seven-field form with seconds (and years).
#[derive(Debug, Clone)]
pub struct CronExpr {
    source: String,
    schedule: cron::Schedule,
}

impl PartialEq for CronExpr {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl FromStr for CronExpr {
    type Err = String;

    fn from_str(expr: &str) -> std::result::Result<Self, Self::Err> {
        let fields = expr.split_whitespace().count();
        let full = match fields {
            5 => format!("0 {expr}"),
            6 | 7 => expr.to_owned(),
            _ => {
                return Err(format!(
                    "cron expression {expr:?} has {fields} fields: expected 5 (minute hour day month weekday), or 6-7 with seconds first"
                ));
            }
        };
        let schedule = cron::Schedule::from_str(&full)
            .map_err(|e| format!("cron expression {expr:?} is invalid: {e}"))?;
        Ok(Self {
            source: expr.to_owned(),
            schedule,
        })
    }
}

impl CronExpr {
    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The latest tick at or before `now`.
    pub fn latest_tick(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // `after` is exclusive, so start just past `now` to include a tick exactly at `now`.
        self.schedule
            .after(&(now + chrono::Duration::milliseconds(1)))
            .next_back()
    }

    /// The first tick after `now`.
    pub fn next_tick(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.after(&now).next()
    }
}
