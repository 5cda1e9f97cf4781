//! Cron schedules: each tick is fired by advancing its row, so it fires once across replicas.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::domain::JobId;
use crate::error::Result;

// ---------------------------------------------------------------------------------------------------------
// Schedules

/// Records a schedule, keeping its last fired tick when it exists. A new schedule starts at `initial_tick` so
/// that first deploying it does not fire a tick that passed before it existed.
pub async fn upsert_schedule<'e>(
    db: impl PgExecutor<'e>,
    name: &str,
    cron: &str,
    kind: &str,
    initial_tick: DateTime<Utc>,
) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO job_schedules (name, cron, kind, last_tick) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET cron = EXCLUDED.cron, kind = EXCLUDED.kind, updated_at = now()
         RETURNING last_tick",
    )
    .bind(name)
    .bind(cron)
    .bind(kind)
    .bind(initial_tick)
    .fetch_one(db)
    .await?)
}

/// Claims `tick` of schedule `name` if no process has fired it (or a later one) yet. Run in the transaction
/// that enqueues the tick's job: the row lock makes concurrent claimers wait, then see the advanced tick.
pub async fn claim_tick(conn: &mut PgConnection, name: &str, tick: DateTime<Utc>) -> Result<bool> {
    let claimed = sqlx::query(
        "UPDATE job_schedules SET last_tick = $2, updated_at = now() WHERE name = $1 AND last_tick < $2",
    )
    .bind(name)
    .bind(tick)
    .execute(&mut *conn)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// Notes which job a fired tick produced, and which process fired it.
pub async fn set_schedule_job(
    conn: &mut PgConnection,
    name: &str,
    job: Option<JobId>,
    fired_by: &str,
) -> Result<()> {
    sqlx::query("UPDATE job_schedules SET last_job_id = $2, fired_by = $3 WHERE name = $1")
        .bind(name)
        .bind(job.map(|j| j.0))
        .bind(fired_by)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A schedule as stored, with its last job's state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRow {
    /// Name.
    pub name: String,
    /// Cron expression.
    pub cron: String,
    /// The kind of job a tick enqueues.
    pub kind: String,
    /// The newest tick fired (or skipped when the schedule was first registered).
    pub last_tick: DateTime<Utc>,
    /// The process that fired it (`host:pid:nonce`); none before its first fire.
    pub fired_by: Option<String>,
    /// The job it enqueued.
    pub last_job_id: Option<i64>,
    /// That job's state, while it is kept.
    pub last_job_state: Option<String>,
    /// When that job finished.
    pub last_job_finished_at: Option<DateTime<Utc>>,
}

/// Every schedule, by name.
pub async fn list_schedules<'e>(db: impl PgExecutor<'e>) -> Result<Vec<ScheduleRow>> {
    Ok(
        sqlx::query_as::<_, ScheduleRow>(sqlx::AssertSqlSafe(format!(
            "SELECT s.name, s.cron, s.kind, s.last_tick, s.fired_by, s.last_job_id,
                {} AS last_job_state, j.finished_at AS last_job_finished_at
           FROM job_schedules s LEFT JOIN jobs j ON j.id = s.last_job_id
          ORDER BY s.name",
            super::admin::VIEW_STATE
        )))
        .fetch_all(db)
        .await?,
    )
}
