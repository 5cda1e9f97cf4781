//! Cron schedules that fire once per tick across any number of processes.
//!
//! Each process keeps time with an apalis-cron worker per schedule; firing a tick means advancing the
//! schedule's `last_tick` row and enqueuing the tick's job in one transaction, so only the first process to
//! get there fires it. Ticks missed while every scheduler was down collapse into one catch-up fire at start.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::WorkerBuilder;
use apalis_cron::{CronScheduler, Tick, timezone::Utc as CronUtc};
use chrono::{DateTime, TimeZone, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::domain::CronExpr;

use super::{Job, new_job};
use crate::backoff::{Backoff, Retries};
use crate::error::{Error, Result};
use crate::metrics::metrics;
use crate::store::jobs as store;

impl apalis_cron::Schedule<CronUtc> for CronExpr {
    fn next_tick(&mut self, _: &CronUtc) -> Option<Tick<CronUtc>> {
        CronExpr::next_tick(self, Utc::now()).map(|t| Tick::new(t.timestamp() as u64))
    }
}

type MakeJob = Arc<dyn Fn(DateTime<Utc>) -> Result<store::NewJob> + Send + Sync>;

#[derive(Clone)]
struct Entry {
    name: String,
    cron: CronExpr,
    kind: &'static str,
    make: MakeJob,
}

/// The schedules this process keeps.
#[derive(Clone)]
pub struct Scheduler {
    pool: PgPool,
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| (&e.name, e.cron.source())))
            .finish()
    }
}

impl Scheduler {
    /// No schedules yet.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            entries: Vec::new(),
        }
    }

    /// Fires `make(tick)` as a job of kind `J` on every tick of `cron`. `name` identifies the schedule across
    /// processes and restarts; each tick's job gets the idempotency key `<name>@<tick>`.
    pub fn add<J: Job>(
        &mut self,
        name: &str,
        cron: CronExpr,
        make: impl Fn(DateTime<Utc>) -> J + Send + Sync + 'static,
    ) -> &mut Self {
        let schedule_name = name.to_owned();
        let make: MakeJob = Arc::new(move |tick| {
            let mut job = new_job(&make(tick), None)?;
            job.unique_key = Some(format!("{schedule_name}@{}", tick.to_rfc3339()));
            job.unique_while_active = false;
            job.unique_while_pending = false;
            Ok(job)
        });
        self.entries.push(Entry {
            name: name.to_owned(),
            cron,
            kind: J::KIND,
            make,
        });
        self
    }

    /// Names of the schedules, with their expressions.
    pub fn schedules(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|e| (e.name.clone(), e.cron.source().to_owned()))
            .collect()
    }

    /// Fires the latest due tick of schedule `name` if no process has yet; returns the job it enqueued.
    pub async fn fire_due(
        &self,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<crate::domain::JobId>> {
        let entry = self
            .entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::NotFound {
                what: "schedule",
                id: name.to_owned(),
            })?;
        fire(&self.pool, entry, now).await
    }

    /// Starts keeping time for every schedule (each first records itself, retrying while the database is
    /// unreachable); stops when `stop` is cancelled.
    pub async fn start(self, stop: CancellationToken) -> Result<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for entry in self.entries {
            tasks.push(tokio::spawn(keep_time(
                self.pool.clone(),
                entry,
                stop.clone(),
            )));
        }
        Ok(tokio::spawn(async move {
            for task in tasks {
                let _ = task.await;
            }
        }))
    }
}

/// Records the schedule, catches up, then fires on every tick until stopped; restarts the cron worker if it
/// ever fails.
async fn keep_time(pool: PgPool, entry: Entry, stop: CancellationToken) {
    // A new schedule starts at its latest past tick, so deploying it does not fire immediately.
    let mut retries =
        Backoff::doubling(Duration::from_millis(250), Duration::from_secs(10)).retries();
    loop {
        let now = Utc::now();
        let initial = entry.cron.latest_tick(now).unwrap_or(now);
        match store::upsert_schedule(&pool, &entry.name, entry.cron.source(), entry.kind, initial)
            .await
        {
            Ok(_) => break,
            Err(err) => {
                let wait = retries.failed();
                tracing::warn!(schedule = %entry.name, %err, retry_in = ?wait, "could not record the schedule; retrying");
                if Retries::sleep(wait, &stop).await {
                    return;
                }
            }
        }
    }
    loop {
        if let Err(err) = fire(&pool, &entry, Utc::now()).await {
            tracing::warn!(schedule = %entry.name, %err, "could not fire the catch-up tick");
        }
        let fire_on_tick = {
            let pool = pool.clone();
            let entry = entry.clone();
            move |tick: Tick<CronUtc>| -> BoxFuture<'static, std::result::Result<(), Error>> {
                let pool = pool.clone();
                let entry = entry.clone();
                async move {
                    let at = Utc
                        .timestamp_opt(tick.get_timestamp() as i64, 0)
                        .single()
                        .unwrap_or_else(Utc::now);
                    let mut retries =
                        Backoff::doubling(Duration::from_secs(1), Duration::from_secs(4)).retries();
                    while let Err(err) = fire(&pool, &entry, at.max(Utc::now())).await {
                        let wait = retries.failed();
                        let attempt = retries.failures();
                        tracing::warn!(schedule = %entry.name, attempt, %err, "could not fire a tick");
                        if attempt >= 3 {
                            break;
                        }
                        tokio::time::sleep(wait).await;
                    }
                    Ok(())
                }
                .boxed()
            }
        };
        let context = apalis::prelude::WorkerContext::new(&format!(
            "cron/{}/{:08x}",
            entry.name,
            rand::random::<u32>()
        ));
        let worker = WorkerBuilder::new(&context)
            .backend(CronScheduler::new(entry.cron.clone()))
            .build(fire_on_tick);
        let ended = tokio::select! {
            () = stop.cancelled() => {
                let _ = context.stop();
                return;
            }
            ended = worker.run() => ended,
        };
        if let Err(err) = ended {
            tracing::warn!(schedule = %entry.name, %err, "cron worker stopped; restarting");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// This process, as a schedule's `fired_by` names it.
fn firing_process() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        format!(
            "{}:{}",
            gethostname::gethostname().to_string_lossy(),
            std::process::id()
        )
    })
}

/// A schedule as stored, and its next tick from now.
#[derive(Debug, Clone)]
pub struct ScheduleState {
    /// Its row: last tick, who fired it, its job.
    pub stored: store::ScheduleRow,
    /// The next tick.
    pub next_tick: Option<DateTime<Utc>>,
}

/// Every schedule with its last and next tick, who fired it and how its job went.
pub async fn states(pool: &PgPool) -> Result<Vec<ScheduleState>> {
    let now = Utc::now();
    Ok(store::list_schedules(pool)
        .await?
        .into_iter()
        .map(|stored| ScheduleState {
            next_tick: stored
                .cron
                .parse::<CronExpr>()
                .ok()
                .and_then(|c| c.next_tick(now)),
            stored,
        })
        .collect())
}

/// Fires the latest tick at or before `now`, if it is newer than the schedule's last fired tick.
async fn fire(
    pool: &PgPool,
    entry: &Entry,
    now: DateTime<Utc>,
) -> Result<Option<crate::domain::JobId>> {
    let Some(tick) = entry.cron.latest_tick(now) else {
        return Ok(None);
    };
    let mut tx = pool.begin().await?;
    if !store::claim_tick(&mut tx, &entry.name, tick).await? {
        return Ok(None);
    }
    let job = (entry.make)(tick)?;
    let result = store::insert(&mut tx, &[job]).await?;
    store::set_schedule_job(&mut tx, &entry.name, result[0].id, firing_process()).await?;
    tx.commit().await?;
    metrics()
        .schedule_ticks_fired
        .with_label_values(&[&entry.name])
        .inc();
    if result[0].inserted {
        metrics()
            .jobs_enqueued
            .with_label_values(&[entry.kind])
            .inc();
    }
    tracing::debug!(schedule = %entry.name, tick = %tick, job = ?result[0].id, "schedule fired");
    Ok(result[0].id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn five_field_expressions_are_classic_cron() {
        let daily: CronExpr = "0 2 * * *".parse().unwrap();
        assert_eq!(
            daily.next_tick(at("2026-11-29T12:00:00Z")),
            Some(at("2026-11-30T02:00:00Z"))
        );
        assert_eq!(
            daily.latest_tick(at("2026-11-29T12:00:00Z")),
            Some(at("2026-11-29T02:00:00Z"))
        );
    }

    #[test]
    fn a_tick_exactly_now_is_the_latest_tick() {
        let daily: CronExpr = "0 2 * * *".parse().unwrap();
        assert_eq!(
            daily.latest_tick(at("2026-11-29T02:00:00Z")),
            Some(at("2026-11-29T02:00:00Z"))
        );
    }

    #[test]
    fn six_fields_include_seconds() {
        let every_2s: CronExpr = "*/2 * * * * *".parse().unwrap();
        assert_eq!(
            every_2s.next_tick(at("2026-11-29T12:00:01Z")),
            Some(at("2026-11-29T12:00:02Z"))
        );
    }

    #[test]
    fn malformed_expressions_say_what_is_wrong() {
        assert!(
            "* * *"
                .parse::<CronExpr>()
                .unwrap_err()
                .contains("3 fields")
        );
        assert!(
            "0 25 * * *"
                .parse::<CronExpr>()
                .unwrap_err()
                .contains("invalid")
        );
    }
}
