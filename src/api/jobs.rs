//! `/_admin/jobs` and `/_admin/queues`: inspect jobs, retry, cancel, reschedule, the dead-letter queue, and
//! queue statistics. Every route needs the admin token.

use axum::Json;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::{ApiState, optional_tenant};
use crate::domain::{AttemptError, JobId, JobState};
use crate::jobs::engine::admin;
use crate::jobs::engine::stats::{self, Counts};
use crate::store::jobs::{JobFilter, JobRecord};

pub(super) fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs))
        .routes(routes!(list_dead_jobs))
        .routes(routes!(replay_dead_jobs))
        .routes(routes!(purge_dead_jobs))
        .routes(routes!(cancel_waiting_jobs))
        .routes(routes!(get_job))
        .routes(routes!(retry_job))
        .routes(routes!(cancel_job))
        .routes(routes!(reschedule_job))
        .routes(routes!(queue_stats))
        .routes(routes!(list_schedules))
        .routes(routes!(queue_history))
}

/// A job as operators see it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// Id.
    pub id: i64,
    /// Kind (e.g. `ingest_object`).
    pub kind: String,
    /// Queue.
    pub queue: String,
    /// State.
    #[schema(value_type = StateName)]
    pub state: JobState,
    /// Arguments.
    #[schema(value_type = Object)]
    pub args: serde_json::Value,
    /// Higher runs first.
    pub priority: i16,
    /// Attempts started (including one in progress).
    pub attempt: i32,
    /// Attempt budget before dead-lettering.
    pub max_attempts: i32,
    /// Every failed or interrupted attempt, oldest first.
    pub errors: Vec<AttemptView>,
    /// When it was enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// When it is (or was) due; for a scheduled job, its next run.
    pub run_at: DateTime<Utc>,
    /// When the latest attempt started.
    pub attempted_at: Option<DateTime<Utc>>,
    /// When it completed, died or was cancelled.
    pub finished_at: Option<DateTime<Utc>>,
    /// The worker process running it.
    pub worker: Option<String>,
    /// Its tenant, when it has one.
    pub tenant_id: Option<String>,
    /// Its storage provider, when it has one.
    pub provider: Option<String>,
    /// Its idempotency key, while it holds one.
    pub unique_key: Option<String>,
    /// What it has done so far (long jobs such as key rotation checkpoint it), or its final result.
    #[schema(value_type = Option<Object>)]
    pub progress: Option<serde_json::Value>,
}

/// One failed or interrupted attempt.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    /// Attempt number.
    pub attempt: i32,
    /// When it ended.
    pub at: DateTime<Utc>,
    /// `transient`, `retry_after`, `permanent`, `timeout`, `panic`, `crash`, `interrupted`, `undecodable`
    /// or `replayed`.
    pub class: String,
    /// Machine-readable reason, when given.
    pub code: Option<String>,
    /// What happened.
    pub error: String,
    /// The worker that ran it.
    pub worker: Option<String>,
}

impl From<AttemptError> for AttemptView {
    fn from(e: AttemptError) -> Self {
        Self {
            attempt: e.attempt,
            at: e.at,
            class: e.class,
            code: e.code,
            error: e.error,
            worker: e.worker,
        }
    }
}

impl From<JobRecord> for JobView {
    fn from(j: JobRecord) -> Self {
        Self {
            id: j.id.0,
            kind: j.kind,
            queue: j.queue,
            state: j.state,
            args: j.args,
            priority: j.priority,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            errors: j.errors.into_iter().map(AttemptView::from).collect(),
            enqueued_at: j.enqueued_at,
            run_at: j.run_at,
            attempted_at: j.attempted_at,
            finished_at: j.finished_at,
            worker: j.locked_by,
            tenant_id: j.tenant_id,
            provider: j.provider,
            unique_key: j.unique_key,
            progress: j.progress,
        }
    }
}

/// Filters and paging for job listings.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this state.
    #[param(value_type = Option<StateName>)]
    pub state: Option<String>,
    /// Only this tenant.
    pub tenant_id: Option<String>,
    /// Enqueued at or after (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Enqueued before (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = r"^[0-9]{1,18}$")]
    pub cursor: Option<String>,
    /// Page size, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

/// A job's state as operators see it.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Only its schema is used: the state is parsed by `JobState`, which names the choices.
enum StateName {
    Pending,
    Scheduled,
    Running,
    Completed,
    Dead,
    Cancelled,
}

/// A page of jobs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    /// Jobs, newest first.
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl JobQuery {
    fn parse(
        self,
        forced_state: Option<JobState>,
    ) -> Result<Option<(JobFilter, Option<JobId>, i64)>, ApiError> {
        let asked = self
            .state
            .map(|text| text.parse::<JobState>().map_err(ApiError::invalid))
            .transpose()?;
        // The dead-letter queue asked for another state holds none of them.
        let holds_none = matches!((forced_state, asked), (Some(f), Some(a)) if f != a);
        let cursor = self
            .cursor
            .map(|c| {
                // The shape the spec states, no looser; 18 digits always fit an i64.
                let digits =
                    !c.is_empty() && c.len() <= 18 && c.bytes().all(|b| b.is_ascii_digit());
                digits
                    .then(|| JobId(c.parse().expect("at most 18 digits fit an i64")))
                    .ok_or_else(|| ApiError::invalid("cursor is not a cursor from a previous page"))
            })
            .transpose()?;
        let limit = self.limit.unwrap_or(50);
        if !(1..=500).contains(&limit) {
            return Err(ApiError::invalid("limit must be from 1 to 500"));
        }
        optional_tenant(self.tenant_id.as_deref())?;
        let filter = JobFilter {
            queue: self.queue,
            kind: self.kind,
            state: forced_state.or(asked),
            tenant_id: self.tenant_id,
            since: self.since,
            until: self.until,
            ids: None,
        };
        Ok((!holds_none).then_some((filter, cursor, limit)))
    }
}

async fn page(
    state: &ApiState,
    query: JobQuery,
    forced: Option<JobState>,
) -> Result<Json<JobPage>, ApiError> {
    let Some((filter, cursor, limit)) = query.parse(forced)? else {
        return Ok(Json(JobPage {
            jobs: Vec::new(),
            next_cursor: None,
        }));
    };
    let (jobs, next) = admin::list(stores(state), &filter, cursor, limit).await?;
    Ok(Json(JobPage {
        jobs: jobs.into_iter().map(JobView::from).collect(),
        next_cursor: next.map(|id| id.to_string()),
    }))
}

/// List jobs, newest first, filtered by queue, kind, state, tenant and enqueue time.
#[utoipa::path(get, path = "/_admin/jobs", tag = "jobs", params(JobQuery), security(("admin_token" = [])),
    responses((status = 200, body = JobPage), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn list_jobs(
    _: Admin,
    State(state): State<ApiState>,
    Query(query): Query<JobQuery>,
) -> Result<Json<JobPage>, ApiError> {
    page(&state, query, None).await
}

/// List the dead-letter queue: jobs that failed permanently or ran out of attempts.
#[utoipa::path(get, path = "/_admin/jobs/dlq", tag = "jobs", params(JobQuery), security(("admin_token" = [])),
    responses((status = 200, body = JobPage), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn list_dead_jobs(
    _: Admin,
    State(state): State<ApiState>,
    Query(query): Query<JobQuery>,
) -> Result<Json<JobPage>, ApiError> {
    page(&state, query, Some(JobState::Dead)).await
}

/// Waiting for a job.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Hold the request until the job has finished (completed, dead or cancelled), at most this many
    /// seconds (0-120, default 0: answer at once). The answer is the job as it is then.
    #[serde(default)]
    #[param(maximum = 120)]
    pub wait_seconds: u32,
}

/// One job, with its arguments, every attempt's error and its timestamps.
#[utoipa::path(get, path = "/_admin/jobs/{id}", tag = "jobs", params(("id" = i64, Path, description = "Job id"), WaitQuery),
    security(("admin_token" = [])),
    responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn get_job(
    _: Admin,
    State(state): State<ApiState>,
    Path(id): Path<i64>,
    Query(wait): Query<WaitQuery>,
) -> Result<Json<JobView>, ApiError> {
    if wait.wait_seconds > 120 {
        return Err(ApiError::invalid("wait_seconds must be from 0 to 120"));
    }
    let timeout = std::time::Duration::from_secs(u64::from(wait.wait_seconds));
    Ok(Json(
        admin::wait(stores(&state), JobId(id), timeout)
            .await?
            .into(),
    ))
}

/// Run a pending or scheduled job now, or replay a dead or cancelled one with a fresh set of attempts.
#[utoipa::path(post, path = "/_admin/jobs/{id}/retry", tag = "jobs", params(("id" = i64, Path, description = "Job id")),
    security(("admin_token" = [])),
    responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The job is running or completed", body = ErrorBody)))]
async fn retry_job(
    _: Admin,
    State(state): State<ApiState>,
    Path(id): Path<i64>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(admin::retry(stores(&state), JobId(id)).await?.into()))
}

/// Cancel a pending, scheduled or running job (a running attempt is stopped and cannot commit anything more).
#[utoipa::path(post, path = "/_admin/jobs/{id}/cancel", tag = "jobs", params(("id" = i64, Path, description = "Job id")),
    security(("admin_token" = [])),
    responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The job has already finished", body = ErrorBody)))]
async fn cancel_job(
    _: Admin,
    State(state): State<ApiState>,
    Path(id): Path<i64>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(admin::cancel(stores(&state), JobId(id)).await?.into()))
}

/// When to run a job.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reschedule {
    /// The new run time (RFC 3339, UTC).
    pub run_at: DateTime<Utc>,
}

/// Move a pending or scheduled job to another run time.
#[utoipa::path(post, path = "/_admin/jobs/{id}/reschedule", tag = "jobs", params(("id" = i64, Path, description = "Job id")),
    request_body = Reschedule, security(("admin_token" = [])),
    responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The job is no longer pending or scheduled", body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn reschedule_job(
    _: Admin,
    State(state): State<ApiState>,
    Path(id): Path<i64>,
    Json(body): Json<Reschedule>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(
        admin::reschedule(stores(&state), JobId(id), body.run_at)
            .await?
            .into(),
    ))
}

/// Which dead jobs a bulk action applies to. An empty filter is refused unless `all` is true.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this tenant.
    pub tenant_id: Option<String>,
    /// Enqueued at or after.
    pub since: Option<DateTime<Utc>>,
    /// Enqueued before.
    pub until: Option<DateTime<Utc>>,
    /// Only these job ids.
    pub ids: Option<Vec<i64>>,
    /// Confirms that an empty filter means every dead job.
    #[serde(default)]
    pub all: bool,
    /// Most jobs to touch in this call (default and maximum 10000).
    #[schema(minimum = 1, maximum = 10000)]
    pub limit: Option<i64>,
}

impl DeadFilter {
    /// The filter (the dead state is implied by the action), the confirmation and the limit.
    fn parts(self) -> Result<(JobFilter, bool, i64), ApiError> {
        optional_tenant(self.tenant_id.as_deref())?;
        let filter = JobFilter {
            queue: self.queue,
            kind: self.kind,
            state: None,
            tenant_id: self.tenant_id,
            since: self.since,
            until: self.until,
            ids: self.ids,
        };
        Ok((filter, self.all, self.limit.unwrap_or(admin::MAX_BULK)))
    }
}

/// How many jobs a bulk action touched.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BulkResult {
    /// Jobs affected.
    pub count: u64,
}

/// What a replay did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplayResult {
    /// Jobs replayed.
    pub count: u64,
    /// Jobs left dead because another job holds their idempotency key now (the same change was queued
    /// again): replaying them would do that work twice.
    pub not_replayed: Vec<HeldKey>,
}

/// A job not replayed, and the job that holds its idempotency key.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeldKey {
    /// The dead job.
    pub id: i64,
    /// The job holding its key.
    pub held_by: i64,
}

/// Replay dead jobs matching a filter, each with a fresh set of attempts (history is kept). Each takes its
/// idempotency key back; one whose key another job holds by now is listed instead.
#[utoipa::path(post, path = "/_admin/jobs/dlq/replay", tag = "jobs", request_body = DeadFilter, security(("admin_token" = [])),
    responses((status = 200, body = ReplayResult), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn replay_dead_jobs(
    _: Admin,
    State(state): State<ApiState>,
    Json(body): Json<DeadFilter>,
) -> Result<Json<ReplayResult>, ApiError> {
    let (filter, all, limit) = body.parts()?;
    let replayed = admin::replay_dead(stores(&state), &filter, all, limit).await?;
    Ok(Json(ReplayResult {
        count: replayed.count,
        not_replayed: replayed
            .held
            .into_iter()
            .map(|(id, holder)| HeldKey {
                id: id.0,
                held_by: holder.0,
            })
            .collect(),
    }))
}

/// Delete dead jobs matching a filter.
#[utoipa::path(post, path = "/_admin/jobs/dlq/purge", tag = "jobs", request_body = DeadFilter, security(("admin_token" = [])),
    responses((status = 200, body = BulkResult), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn purge_dead_jobs(
    _: Admin,
    State(state): State<ApiState>,
    Json(body): Json<DeadFilter>,
) -> Result<Json<BulkResult>, ApiError> {
    let (filter, all, limit) = body.parts()?;
    let count = admin::purge_dead(stores(&state), &filter, all, limit).await?;
    Ok(Json(BulkResult { count }))
}

/// Which waiting jobs to cancel. An empty filter is refused unless `all` is true.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this tenant.
    pub tenant_id: Option<String>,
    /// Only jobs due now (`pending`) or later (`scheduled`); both when absent.
    #[schema(value_type = Option<WaitingState>)]
    pub state: Option<String>,
    /// Enqueued at or after.
    pub since: Option<DateTime<Utc>>,
    /// Enqueued before.
    pub until: Option<DateTime<Utc>>,
    /// Only these job ids.
    pub ids: Option<Vec<i64>>,
    /// Confirms that an empty filter means every waiting job.
    #[serde(default)]
    pub all: bool,
    /// Most jobs to cancel in this call (default and maximum 10000).
    #[schema(minimum = 1, maximum = 10000)]
    pub limit: Option<i64>,
    /// Only count the jobs that would be cancelled.
    #[serde(default)]
    pub dry_run: bool,
}

/// The states a bulk cancel can select.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Only its schema is used: `JobState` parses the value.
enum WaitingState {
    Pending,
    Scheduled,
}

/// What a bulk cancel did, or would do.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CancelResult {
    /// Jobs cancelled (or, on a dry run, that would be).
    pub count: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// Cancel waiting (pending or scheduled) jobs matching a filter: a backlog queued by mistake, or a tenant's
/// work that should not run. Running jobs are left to finish (cancel one by id to stop it). Cancelled jobs
/// give up their idempotency keys, so the same change can be queued again later. Try `dry_run` first.
#[utoipa::path(post, path = "/_admin/jobs/cancel", tag = "jobs", request_body = CancelFilter, security(("admin_token" = [])),
    responses((status = 200, body = CancelResult), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn cancel_waiting_jobs(
    _: Admin,
    State(state): State<ApiState>,
    Json(body): Json<CancelFilter>,
) -> Result<Json<CancelResult>, ApiError> {
    optional_tenant(body.tenant_id.as_deref())?;
    let waiting = body
        .state
        .as_deref()
        .map(str::parse::<JobState>)
        .transpose()
        .map_err(ApiError::invalid)?;
    let filter = JobFilter {
        queue: body.queue,
        kind: body.kind,
        state: waiting,
        tenant_id: body.tenant_id,
        since: body.since,
        until: body.until,
        ids: body.ids,
    };
    let limit = body.limit.unwrap_or(admin::MAX_BULK);
    let count =
        admin::cancel_waiting(stores(&state), &filter, body.all, limit, body.dry_run).await?;
    Ok(Json(CancelResult {
        count,
        dry_run: body.dry_run,
    }))
}

/// Counts for a queue, kind or tenant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CountsView {
    /// Due and waiting.
    pub pending: i64,
    /// Waiting for a later run time (including retries in backoff).
    pub scheduled: i64,
    /// Being run.
    pub running: i64,
    /// Dead-lettered.
    pub dead: i64,
    /// How long the oldest pending job has been due, in seconds.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Completed in the last five minutes.
    pub completed_last_5m: i64,
    /// Dead-lettered in the last five minutes.
    pub dead_last_5m: i64,
}

impl From<Counts> for CountsView {
    fn from(c: Counts) -> Self {
        Self {
            pending: c.pending,
            scheduled: c.scheduled,
            running: c.running,
            dead: c.dead,
            oldest_pending_age_seconds: c.oldest_pending_age_seconds,
            completed_last_5m: c.completed_last_5m,
            dead_last_5m: c.dead_last_5m,
        }
    }
}

/// A queue's statistics.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueueView {
    /// Queue.
    pub queue: String,
    /// Totals.
    #[serde(flatten)]
    pub counts: CountsView,
    /// By kind.
    pub kinds: Vec<KindView>,
}

/// A kind's statistics.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KindView {
    /// Kind.
    pub kind: String,
    /// Totals.
    #[serde(flatten)]
    pub counts: CountsView,
}

/// A tenant's statistics in one queue.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    /// Queue.
    pub queue: String,
    /// Tenant.
    pub tenant_id: String,
    /// Provider (s3, gcs, local), for jobs that carry one: each tenant and provider is counted apart.
    pub provider: Option<String>,
    /// Totals.
    #[serde(flatten)]
    pub counts: CountsView,
}

/// A worker process.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerView {
    /// Worker id (host:pid:nonce), as shown in a running job's `worker`.
    pub id: String,
    /// Host.
    pub host: String,
    /// Process id.
    pub pid: i32,
    /// Kinds it runs.
    pub kinds: Vec<String>,
    /// Version.
    pub version: String,
    /// Started at.
    pub started_at: DateTime<Utc>,
    /// Last heartbeat.
    pub last_seen: DateTime<Utc>,
    /// False once it has been silent for the orphan timeout (its jobs are then rescued).
    pub alive: bool,
}

/// Queue statistics.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Overview {
    /// Per queue, with per-kind breakdown.
    pub queues: Vec<QueueView>,
    /// Per tenant and queue, for jobs that carry a tenant.
    pub tenants: Vec<TenantView>,
    /// Worker processes.
    pub workers: Vec<WorkerView>,
}

/// Queue statistics: per queue and kind, per tenant, and the worker processes with their last heartbeat.
#[utoipa::path(get, path = "/_admin/queues", tag = "jobs", security(("admin_token" = [])),
    responses((status = 200, body = Overview), (status = 401, body = ErrorBody)))]
async fn queue_stats(_: Admin, State(state): State<ApiState>) -> Result<Json<Overview>, ApiError> {
    let overview = stats::overview(
        &state.pool,
        state.redis_jobs.as_ref(),
        state.settings.jobs.orphan_timeout,
    )
    .await?;
    Ok(Json(Overview {
        queues: overview
            .queues
            .into_iter()
            .map(|q| QueueView {
                queue: q.queue,
                counts: q.counts.into(),
                kinds: q
                    .kinds
                    .into_iter()
                    .map(|(kind, counts)| KindView {
                        kind,
                        counts: counts.into(),
                    })
                    .collect(),
            })
            .collect(),
        tenants: overview
            .tenants
            .into_iter()
            .map(|t| TenantView {
                queue: t.queue,
                tenant_id: t.tenant_id,
                provider: t.provider,
                counts: t.counts.into(),
            })
            .collect(),
        workers: overview
            .workers
            .into_iter()
            .map(|(w, alive)| WorkerView {
                id: w.id,
                host: w.host,
                pid: w.pid,
                kinds: w.kinds,
                version: w.version,
                started_at: w.started_at,
                last_seen: w.last_seen,
                alive,
            })
            .collect(),
    }))
}

/// A cron schedule and how its last tick went.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScheduleView {
    /// Name (e.g. `connectors.purge_deleted`).
    pub name: String,
    /// Cron expression, UTC (seconds first).
    pub cron: String,
    /// The kind of job each tick enqueues.
    pub kind: String,
    /// The newest tick fired (at first registration: the tick before it, which is skipped).
    pub last_tick: DateTime<Utc>,
    /// The next tick.
    pub next_tick: Option<DateTime<Utc>>,
    /// The process (`host:pid`) that fired the last tick; absent before the first fire.
    pub fired_by: Option<String>,
    /// The job the last tick enqueued; follow it at `GET /_admin/jobs/{id}`.
    pub last_job_id: Option<i64>,
    /// That job's state (absent once retention has removed it).
    #[schema(value_type = Option<StateName>)]
    pub last_job_state: Option<String>,
    /// When that job finished.
    pub last_job_finished_at: Option<DateTime<Utc>>,
}

/// Cron schedules.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScheduleList {
    /// By name.
    pub schedules: Vec<ScheduleView>,
}

/// The cron schedules (the poller, the purger): last and next tick, which process fired the last one, and
/// its job's state. Each tick fires once across every process with `RUN_SCHEDULER=true`.
#[utoipa::path(get, path = "/_admin/schedules", tag = "jobs", security(("admin_token" = [])),
    responses((status = 200, body = ScheduleList), (status = 401, body = ErrorBody)))]
async fn list_schedules(
    _: Admin,
    State(state): State<ApiState>,
) -> Result<Json<ScheduleList>, ApiError> {
    let schedules = crate::jobs::engine::schedule::states(&state.pool).await?;
    Ok(Json(ScheduleList {
        schedules: schedules
            .into_iter()
            .map(|s| ScheduleView {
                next_tick: s.next_tick,
                name: s.stored.name,
                cron: s.stored.cron,
                kind: s.stored.kind,
                last_tick: s.stored.last_tick,
                fired_by: s.stored.fired_by,
                last_job_id: s.stored.last_job_id,
                last_job_state: s.stored.last_job_state,
                last_job_finished_at: s.stored.last_job_finished_at,
            })
            .collect(),
    }))
}

/// How far back.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Minutes of history, 1 to 1440 (default 60).
    #[param(minimum = 1, maximum = 1440)]
    pub minutes: Option<i64>,
}

/// One queue's minute.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MinuteView {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// Queue.
    pub queue: String,
    /// Due and waiting, when the minute was sampled.
    pub pending: i64,
    /// Waiting for a later run time, when sampled.
    pub scheduled: i64,
    /// Running, when sampled.
    pub running: i64,
    /// Completed during the minute.
    pub completed: i64,
    /// Jobs whose attempt failed during the minute (retried or dead-lettered).
    pub failed: i64,
    /// Dead-lettered during the minute.
    pub dead: i64,
}

/// Per-minute history.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueueHistory {
    /// Oldest first; a queue without jobs in a minute has no entry for it.
    pub minutes: Vec<MinuteView>,
}

/// Throughput, failures and depth per queue and minute, for the last `minutes` (sampled by the processes
/// once a minute, kept a day): what the dashboard's charts draw.
#[utoipa::path(get, path = "/_admin/queues/history", tag = "jobs", params(HistoryQuery), security(("admin_token" = [])),
    responses((status = 200, body = QueueHistory), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn queue_history(
    _: Admin,
    State(state): State<ApiState>,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<QueueHistory>, ApiError> {
    let minutes = query.minutes.unwrap_or(60);
    if !(1..=1440).contains(&minutes) {
        return Err(ApiError::invalid("minutes must be from 1 to 1440"));
    }
    let rows = crate::jobs::engine::stats::history(&state.pool, minutes).await?;
    Ok(Json(QueueHistory {
        minutes: rows
            .into_iter()
            .map(|r| MinuteView {
                minute: r.minute,
                queue: r.queue,
                pending: r.pending,
                scheduled: r.scheduled,
                running: r.running,
                completed: r.completed,
                failed: r.failed,
                dead: r.dead,
            })
            .collect(),
    }))
}

/// Where the jobs live, for the admin actions.
fn stores(state: &ApiState) -> admin::Stores<'_> {
    admin::Stores {
        pool: &state.pool,
        redis: state.redis_jobs.as_ref(),
    }
}
