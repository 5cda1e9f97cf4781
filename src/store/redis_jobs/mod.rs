//! The job tables' counterpart in Redis: the same operations as [`super::jobs`] (claim, claim fairly, finish,
//! hand back, rescue, checkpoint, prune), each one Lua script so that it is as atomic as the SQL statement it
//! stands for, and fenced the same way: only the worker holding an attempt may end it.
//!
//! Ids come from PostgreSQL (jobs reach Redis through the outbox, see [`super::jobs::relay`]), so a job has
//! one id whichever backend runs it, and sending a job twice adds it once. Times are Redis's clock (`TIME`),
//! as the SQL uses the database's `now()`. The key layout is described in `prelude.lua`; every key carries the
//! prefix's hash tag, so the scripts stay atomic on Redis Cluster (where all of one prefix lives in one slot).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use redis::aio::ConnectionManager;
use redis::{Script, Value as Reply};
use serde_json::{Value, json};

use crate::domain::{AttemptError, JobId, JobState};
use crate::error::{Error, Result};
use crate::store::jobs::{
    Claimed, Completion, Finish, HistoryRow, JobFilter, JobRecord, Outgoing, QueueCounts, Replayed,
    Rescued,
};

/// The scripts, each with the shared prelude in front.
struct Scripts {
    enqueue: Script,
    claim: Script,
    finish: Script,
    release: Script,
    rescue: Script,
    hold: Script,
    prune: Script,
    counts: Script,
    pending: Script,
    list: Script,
    admin: Script,
    bulk: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let with_prelude =
        |body: &str| Script::new(&format!("{}\n{body}", include_str!("prelude.lua")));
    Scripts {
        enqueue: with_prelude(include_str!("enqueue.lua")),
        claim: with_prelude(include_str!("claim.lua")),
        finish: with_prelude(include_str!("finish.lua")),
        release: with_prelude(include_str!("release.lua")),
        rescue: with_prelude(include_str!("rescue.lua")),
        hold: with_prelude(include_str!("hold.lua")),
        prune: with_prelude(include_str!("prune.lua")),
        counts: with_prelude(include_str!("counts.lua")),
        pending: with_prelude(include_str!("pending.lua")),
        list: with_prelude(include_str!("list.lua")),
        admin: with_prelude(include_str!("admin.lua")),
        bulk: with_prelude(include_str!("bulk.lua")),
    }
});

/// What sending one job to Redis did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// It was added.
    New,
    /// It was there already (sent before): nothing changed.
    Exists,
    /// Its idempotency key is held by this other job: it was not added.
    Duplicate(JobId),
}

/// An operator's action on one job in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run a waiting job now, or replay a dead or cancelled one.
    Retry,
    /// Cancel a waiting or running job.
    Cancel,
    /// Move a waiting job's run time.
    Reschedule(DateTime<Utc>),
}

/// What an operator's action on one job in Redis did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acted {
    /// Done.
    Done,
    /// A running attempt was cancelled: its worker is to be told to stop it.
    CancelledRunning {
        /// The attempt.
        attempt: i32,
    },
    /// No such job in Redis.
    Missing,
    /// The action does not apply to a job in this state.
    NotIn(JobState),
    /// A replay refused: this other job holds the idempotency key.
    Held(JobId),
}

/// A bulk operator action on jobs in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bulk {
    /// Replay dead jobs.
    Replay,
    /// Delete dead jobs.
    Purge,
    /// Cancel waiting jobs.
    Cancel,
    /// Count waiting jobs.
    Count,
}

fn filter_json(filter: &JobFilter) -> String {
    json!({
        "queue": filter.queue,
        "kind": filter.kind,
        "state": filter.state.map(JobState::as_str),
        "tenant_id": filter.tenant_id,
        "since_ms": filter.since.map(millis),
        "until_ms": filter.until.map(millis),
        "ids": filter.ids,
    })
    .to_string()
}

/// Jobs in Redis under one key prefix. Cheap to clone (one multiplexed connection, reconnecting by itself).
#[derive(Clone)]
pub struct RedisJobs {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    mirror: Option<Arc<Mirror>>,
}

/// Where moves of jobs of some kinds are mirrored: PostgreSQL state that follows those jobs (a node's
/// embedding status, a backfill run) and that the `jobs` table's triggers keep for jobs there.
struct Mirror {
    pool: sqlx::PgPool,
    kinds: Arc<[&'static str]>,
}

/// A job's move, as the scripts report it: kind, arguments (JSON text), state, attempt, last error.
type Move = (String, String, String, i32, String);

impl std::fmt::Debug for RedisJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisJobs")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
            || err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
        {
            Error::Unavailable(format!("Redis is unavailable: {err}"))
        } else {
            Error::Internal(anyhow::anyhow!("Redis: {err}"))
        }
    }
}

/// The span of the slots the scripts count ends in (`ENDED_SLOT_MS` in `prelude.lua`).
const ENDED_SLOT_MS: i64 = 10_000;

fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn bad_reply(what: &str) -> Error {
    Error::Internal(anyhow::anyhow!(
        "Redis answered {what} in a shape the job scripts never send"
    ))
}

impl RedisJobs {
    /// Connects to `url` (`redis://host:port/db`) and keeps jobs under `prefix` (a hash tag such as
    /// `{activekg}`; braces are added when missing). Fails when Redis does not answer.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::Invalid(format!("REDIS_URL is not a Redis URL: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_max_delay(Duration::from_secs(2));
        let conn = client.get_connection_manager_with_config(config).await?;
        let prefix = if prefix.starts_with('{') && prefix.ends_with('}') {
            prefix.to_owned()
        } else {
            format!("{{{prefix}}}")
        };
        Ok(Self {
            client,
            conn,
            prefix,
            mirror: None,
        })
    }

    /// Mirrors the moves of jobs of `kinds` into `pool` (see `activekg_job_moved`): hand-backs and retries
    /// back to waiting, dead letters and cancels, each right after Redis made it.
    pub fn mirror_moves(mut self, pool: sqlx::PgPool, kinds: &[&'static str]) -> Self {
        self.mirror = Some(Arc::new(Mirror {
            pool,
            kinds: kinds.into(),
        }));
        self
    }

    async fn mirror(&self, moves: Vec<Move>) -> Result<()> {
        let Some(mirror) = &self.mirror else {
            return Ok(());
        };
        let moves: Vec<Move> = moves
            .into_iter()
            .filter(|m| mirror.kinds.contains(&m.0.as_str()))
            .collect();
        super::jobs::mirror_moves(&mirror.pool, &moves).await
    }

    /// Whether Redis answers (`PING`).
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Deletes every key under this prefix, jobs and all: for a test's or a benchmark's own prefix.
    pub async fn delete_all(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = {
            let mut scan = redis::AsyncCommands::scan_match::<_, String>(
                &mut conn,
                format!("{}:*", self.prefix),
            )
            .await?;
            let mut keys = Vec::new();
            while let Some(key) = futures::StreamExt::next(&mut scan).await {
                keys.push(key?);
            }
            keys
        };
        for chunk in keys.chunks(1000) {
            let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
        }
        Ok(())
    }

    /// The key prefix (with its braces).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The kinds that got new due work, as the scripts publish them (on `<prefix>:wake`). The stream ends
    /// when the connection drops; wake-ups sent meanwhile are lost, so a caller that subscribes again
    /// should look for work once.
    pub async fn wakes(&self) -> Result<impl futures::Stream<Item = String> + Send + use<>> {
        use futures::StreamExt;
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(format!("{}:wake", self.prefix)).await?;
        Ok(pubsub
            .into_on_message()
            .filter_map(|msg| async move { msg.get_payload::<String>().ok() }))
    }

    async fn run(&self, script: &Script, args: &[&(dyn ToString + Sync)]) -> Result<Reply> {
        let mut invocation = script.key(format!("{}:jobs", self.prefix));
        invocation.arg(&self.prefix);
        for arg in args {
            invocation.arg(arg.to_string());
        }
        let mut conn = self.conn.clone();
        Ok(invocation.invoke_async(&mut conn).await?)
    }

    /// Runs a script that answers {its answer, the jobs it moved}; mirrors the moves, answers the answer.
    /// A process that dies in between, or a mirror PostgreSQL refuses, leaves it one move behind (Redis
    /// holds the truth).
    async fn run_moving(&self, script: &Script, args: &[&(dyn ToString + Sync)]) -> Result<Reply> {
        let Reply::Array(mut parts) = self.run(script, args).await? else {
            return Err(bad_reply("a job script"));
        };
        if parts.len() != 2 {
            return Err(bad_reply("a job script"));
        }
        let moves: Vec<Move> = parse(parts.pop().unwrap_or(Reply::Nil))?;
        // Redis has made the moves: failing here would tell the caller they did not happen.
        if let Err(err) = self.mirror(moves).await {
            tracing::warn!(%err, "could not mirror job moves into PostgreSQL; what follows them is a move behind");
        }
        Ok(parts.pop().unwrap_or(Reply::Nil))
    }

    /// Adds jobs under their outbox ids. Idempotent by id; duplicates by idempotency key are not added.
    pub async fn enqueue(&self, jobs: &[Outgoing]) -> Result<Vec<Pushed>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let payload: Vec<Value> = jobs
            .iter()
            .map(|j| {
                json!({
                    "id": j.id,
                    "kind": j.kind,
                    "queue": j.queue,
                    "args": j.args.to_string(),
                    "priority": j.priority,
                    "max_attempts": j.max_attempts,
                    "run_at": j.run_at.map(millis),
                    "enqueued_at": millis(j.enqueued_at),
                    "unique_key": j.unique_key,
                    "unique_while_active": j.unique_while_active,
                    "unique_while_pending": j.unique_while_pending,
                    "tenant_id": j.tenant_id,
                    "provider": j.provider,
                    "fair": j.fair,
                })
            })
            .collect();
        let payload = Value::Array(payload).to_string();
        let answers: Vec<String> = parse(self.run(&SCRIPTS.enqueue, &[&payload]).await?)?;
        answers
            .into_iter()
            .map(|a| match a.as_str() {
                "new" => Ok(Pushed::New),
                "exists" => Ok(Pushed::Exists),
                other => other
                    .strip_prefix("dup:")
                    .and_then(|id| id.parse().ok())
                    .map(|id| Pushed::Duplicate(JobId(id)))
                    .ok_or_else(|| bad_reply("an enqueue")),
            })
            .collect()
    }

    /// Claims up to `limit` due jobs of `kind` for `worker`, most urgent first (see [`super::jobs::claim`]).
    ///
    /// `token` names the claim: asked again with the same token (after an error, when Redis may have run the
    /// claim and lost only its answer), it answers what that claim took and still holds, and takes nothing
    /// more. Use a new token for each new claim.
    pub async fn claim(
        &self,
        kind: &str,
        worker: &str,
        limit: i64,
        token: &str,
    ) -> Result<Vec<Claimed>> {
        let reply = self
            .run(
                &SCRIPTS.claim,
                &[&kind, &worker, &limit, &"plain", &"", &token],
            )
            .await?;
        claimed_from(reply)
    }

    /// Claims fairly between (tenant, provider) groups, starting after `after` (see
    /// [`super::jobs::claim_fair`]). Returns the jobs and where the next claim should start. `token` as for
    /// [`RedisJobs::claim`].
    pub async fn claim_fair(
        &self,
        kind: &str,
        worker: &str,
        limit: i64,
        after: &str,
        token: &str,
    ) -> Result<(Vec<Claimed>, String)> {
        let reply = self
            .run(
                &SCRIPTS.claim,
                &[&kind, &worker, &limit, &"fair", &after, &token],
            )
            .await?;
        let Reply::Array(mut parts) = reply else {
            return Err(bad_reply("a fair claim"));
        };
        if parts.len() != 2 {
            return Err(bad_reply("a fair claim"));
        }
        let resume: String = parse(parts.pop().unwrap_or(Reply::Nil))?;
        let jobs = claimed_from(parts.pop().unwrap_or(Reply::Nil))?;
        Ok((jobs, resume))
    }

    /// Applies attempt results of `worker`; returns the ids applied (see [`super::jobs::finish`]).
    pub async fn finish(&self, worker: &str, completions: &[Completion]) -> Result<Vec<JobId>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let payload: Vec<Value> = completions
            .iter()
            .map(|c| {
                let (state, delay, error, give_back) = match &c.finish {
                    Finish::Completed => ("completed", None, None, 0),
                    Finish::Retry { delay, error } => ("available", Some(*delay), Some(error), 0),
                    Finish::Dead { error } => ("dead", None, Some(error), 0),
                    Finish::Snooze { delay } => ("available", Some(*delay), None, 1),
                    Finish::Release => ("available", Some(Duration::ZERO), None, 2),
                };
                json!({
                    "id": c.id.0,
                    "attempt": c.attempt,
                    "state": state,
                    "delay_ms": delay.map(|d| d.as_millis() as f64),
                    "error": error.map(|e| serde_json::to_string(e).unwrap_or_default()),
                    "give_back": give_back,
                })
            })
            .collect();
        let payload = Value::Array(payload).to_string();
        let ids: Vec<i64> = parse(
            self.run_moving(&SCRIPTS.finish, &[&worker, &payload])
                .await?,
        )?;
        Ok(ids.into_iter().map(JobId).collect())
    }

    /// Hands jobs of `worker` back (all it holds when `ids` is `None`); see [`super::jobs::release`].
    pub async fn release(
        &self,
        worker: &str,
        ids: Option<&[i64]>,
        note: Option<&AttemptError>,
    ) -> Result<Vec<(JobId, String)>> {
        let ids = ids.map_or(String::new(), |ids| json!(ids).to_string());
        let note = note.map_or(String::new(), |n| {
            serde_json::to_string(n).unwrap_or_default()
        });
        let rows: Vec<(i64, String)> = parse(
            self.run_moving(&SCRIPTS.release, &[&worker, &ids, &note])
                .await?,
        )?;
        Ok(rows
            .into_iter()
            .map(|(id, kind)| (JobId(id), kind))
            .collect())
    }

    /// The workers that hold jobs, for rescue to check against the worker registry.
    pub async fn holders(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("SMEMBERS")
            .arg(format!("{}:holders", self.prefix))
            .query_async(&mut conn)
            .await?)
    }

    /// Takes back up to `limit` jobs of `worker`, found silent by `rescuer`, whose attempt started more than
    /// `silent_for` ago (see [`super::jobs::rescue_orphans`]; the caller applies the witness rule).
    pub async fn rescue(
        &self,
        worker: &str,
        silent_for: Duration,
        rescuer: &str,
        limit: i64,
    ) -> Result<Vec<Rescued>> {
        let silent_ms = silent_for.as_millis() as i64;
        let rows: Vec<(i64, String, i64)> = parse(
            self.run_moving(&SCRIPTS.rescue, &[&worker, &silent_ms, &rescuer, &limit])
                .await?,
        )?;
        Ok(rows
            .into_iter()
            .map(|(id, kind, dead)| Rescued {
                id: JobId(id),
                kind,
                dead: dead == 1,
            })
            .collect())
    }

    /// Whether `worker` still holds attempt `attempt` of job `id`; with `progress`, also saves it.
    pub async fn hold(
        &self,
        id: JobId,
        attempt: i32,
        worker: &str,
        progress: Option<&Value>,
    ) -> Result<bool> {
        let progress = progress.map_or(String::new(), Value::to_string);
        let held: i64 = parse(
            self.run(&SCRIPTS.hold, &[&id.0, &attempt, &worker, &progress])
                .await?,
        )?;
        Ok(held == 1)
    }

    /// Deletes up to `limit` finished jobs past retention; callers loop until it returns less than `limit`.
    pub async fn prune(
        &self,
        keep_completed: Duration,
        keep_dead: Duration,
        limit: i64,
    ) -> Result<u64> {
        let completed = keep_completed.as_millis() as i64;
        let dead = keep_dead.as_millis() as i64;
        let gone: u64 = parse(
            self.run(&SCRIPTS.prune, &[&completed, &dead, &limit])
                .await?,
        )?;
        Ok(gone)
    }

    /// Counts by queue, kind, tenant and provider, as [`super::jobs::queue_counts`] gives them for the
    /// jobs in PostgreSQL (plain kinds' waiting jobs count under no tenant).
    pub async fn queue_counts(&self) -> Result<Vec<QueueCounts>> {
        type Row = (
            String,
            String,
            String,
            String,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
        );
        let (now, rows): (i64, String) = parse(self.run(&SCRIPTS.counts, &[]).await?)?;
        let rows: Vec<Row> =
            serde_json::from_str(&rows).map_err(|_| bad_reply("the queue counts"))?;
        let now = from_millis(now);
        let given = |text: String| (!text.is_empty()).then_some(text);
        Ok(rows
            .into_iter()
            .map(
                |(
                    queue,
                    kind,
                    tenant,
                    provider,
                    pending,
                    scheduled,
                    running,
                    dead,
                    oldest,
                    completed_5m,
                    dead_5m,
                )| {
                    QueueCounts {
                        queue,
                        kind,
                        tenant_id: given(tenant),
                        provider: given(provider),
                        pending,
                        scheduled,
                        running,
                        dead,
                        oldest_pending: (oldest >= 0).then(|| from_millis(oldest)),
                        completed_5m,
                        dead_5m,
                        now,
                    }
                },
            )
            .collect())
    }

    /// Per queue: what waits and runs now, and what completed, failed an attempt or died in the minute
    /// starting at `minute` (from the 10-second slots the scripts count ends in, kept six minutes).
    pub async fn history(&self, minute: DateTime<Utc>) -> Result<Vec<HistoryRow>> {
        let mut rows: std::collections::BTreeMap<String, HistoryRow> = Default::default();
        let row = |rows: &mut std::collections::BTreeMap<String, HistoryRow>, queue: &str| {
            rows.entry(queue.to_owned())
                .or_insert_with(|| HistoryRow {
                    minute,
                    queue: queue.to_owned(),
                    pending: 0,
                    scheduled: 0,
                    running: 0,
                    completed: 0,
                    failed: 0,
                    dead: 0,
                })
                .clone()
        };
        for c in self.queue_counts().await? {
            let mut r = row(&mut rows, &c.queue);
            r.pending += c.pending;
            r.scheduled += c.scheduled;
            r.running += c.running;
            rows.insert(c.queue.clone(), r);
        }
        let first = millis(minute) / ENDED_SLOT_MS;
        let mut pipe = redis::pipe();
        for slot in first..first + 60_000 / ENDED_SLOT_MS {
            pipe.cmd("HGETALL")
                .arg(format!("{}:ended:{slot}", self.prefix));
        }
        let mut conn = self.conn.clone();
        let slots: Vec<std::collections::HashMap<String, i64>> =
            pipe.query_async(&mut conn).await?;
        for (field, n) in slots.iter().flatten() {
            let mut parts = field.split('\t');
            let (Some(state), Some(queue)) = (parts.next(), parts.next()) else {
                continue;
            };
            let mut r = row(&mut rows, queue);
            match state {
                "completed" => r.completed += n,
                "failed" => r.failed += n,
                "dead" => r.dead += n,
                _ => continue,
            }
            rows.insert(queue.to_owned(), r);
        }
        Ok(rows.into_values().collect())
    }

    /// Jobs of `kind` waiting (due or not) or running: `tenant`'s and everyone's, for the pending caps.
    pub async fn pending(&self, kind: &str, tenant: &str) -> Result<(i64, i64)> {
        parse(self.run(&SCRIPTS.pending, &[&kind, &tenant]).await?)
    }

    /// Jobs matching `filter`, newest first, below `before`, at most `limit`, walking at most `walk` jobs.
    /// Answers the jobs and, when the walk stopped before the end, the lowest id it looked at: the answer
    /// vouches only for ids from there up.
    pub async fn list(
        &self,
        filter: &JobFilter,
        before: Option<JobId>,
        limit: i64,
        walk: i64,
    ) -> Result<(Vec<JobRecord>, Option<JobId>)> {
        let before = before.map_or(0, |id| id.0);
        let (ids, lowest): (Vec<i64>, i64) = parse(
            self.run(
                &SCRIPTS.list,
                &[&filter_json(filter), &before, &limit, &walk],
            )
            .await?,
        )?;
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            // A job pruned between the walk and this read is simply not shown.
            if let Some(job) = self.get(JobId(id)).await? {
                jobs.push(job);
            }
        }
        Ok((jobs, (lowest >= 0).then_some(JobId(lowest))))
    }

    /// One operator action on one job, as PostgreSQL's admin queries do it.
    pub async fn act(&self, id: JobId, action: Action) -> Result<Acted> {
        let (op, at) = match action {
            Action::Retry => ("retry", 0),
            Action::Cancel => ("cancel", 0),
            Action::Reschedule(at) => ("reschedule", millis(at)),
        };
        let (outcome, detail): (String, String) =
            parse(self.run_moving(&SCRIPTS.admin, &[&op, &id.0, &at]).await?)?;
        Ok(match outcome.as_str() {
            "ok" => Acted::Done,
            "ok_running" => Acted::CancelledRunning {
                attempt: detail.parse().map_err(|_| bad_reply("a cancel"))?,
            },
            "missing" => Acted::Missing,
            "state" => Acted::NotIn(detail.parse().map_err(|_| bad_reply("a job state"))?),
            "held" => Acted::Held(JobId(detail.parse().map_err(|_| bad_reply("a holder"))?)),
            _ => return Err(bad_reply("an admin action")),
        })
    }

    /// A bulk action on up to `limit` jobs matching `filter`: how many it touched, and for a replay the
    /// jobs left alone because another job holds their key (with that job).
    pub async fn bulk(&self, action: Bulk, filter: &JobFilter, limit: i64) -> Result<Replayed> {
        let op = match action {
            Bulk::Replay => "replay",
            Bulk::Purge => "purge",
            Bulk::Cancel => "cancel",
            Bulk::Count => "count",
        };
        let (count, held): (u64, Vec<(i64, i64)>) = parse(
            self.run_moving(&SCRIPTS.bulk, &[&op, &filter_json(filter), &limit])
                .await?,
        )?;
        Ok(Replayed {
            count,
            held: held
                .into_iter()
                .map(|(id, holder)| (JobId(id), JobId(holder)))
                .collect(),
        })
    }

    /// Everything stored about a job, as [`super::jobs::get`] shows a row.
    pub async fn get(&self, id: JobId) -> Result<Option<JobRecord>> {
        let mut conn = self.conn.clone();
        let (fields, now): (std::collections::HashMap<String, String>, (i64, i64)) = redis::pipe()
            .cmd("HGETALL")
            .arg(format!("{}:job:{}", self.prefix, id.0))
            .cmd("TIME")
            .query_async(&mut conn)
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let now_ms = now.0 * 1000 + now.1 / 1000;
        record_from(id, &fields, now_ms).map(Some)
    }
}

fn parse<T: redis::FromRedisValue>(reply: Reply) -> Result<T> {
    redis::from_redis_value(reply)
        .map_err(|e| Error::Internal(anyhow::anyhow!("a job script's answer did not parse: {e}")))
}

fn claimed_from(reply: Reply) -> Result<Vec<Claimed>> {
    type Row = (i64, String, i32, i32, i64, i64, i64, Option<String>, i32);
    let rows: Vec<Row> = parse(reply)?;
    rows.into_iter()
        .map(
            |(
                id,
                args,
                attempt,
                max_attempts,
                enqueued,
                run_at,
                attempted,
                progress,
                handbacks,
            )| {
                Ok(Claimed {
                    id,
                    args: serde_json::from_str(&args).map_err(|_| bad_reply("job arguments"))?,
                    attempt,
                    max_attempts,
                    enqueued_at: from_millis(enqueued),
                    run_at: from_millis(run_at),
                    attempted_at: from_millis(attempted),
                    progress: progress.and_then(|p| serde_json::from_str(&p).ok()),
                    handbacks,
                })
            },
        )
        .collect()
}

fn record_from(
    id: JobId,
    fields: &std::collections::HashMap<String, String>,
    now_ms: i64,
) -> Result<JobRecord> {
    let text = |name: &str| fields.get(name).cloned();
    let number = |name: &str| fields.get(name).and_then(|v| v.parse::<i64>().ok());
    let time = |name: &str| number(name).map(from_millis);
    let run_at = number("run_at").unwrap_or(now_ms);
    let state = match fields.get("state").map(String::as_str) {
        Some("available") if run_at > now_ms => JobState::Scheduled,
        Some("available") => JobState::Pending,
        Some("running") => JobState::Running,
        Some("completed") => JobState::Completed,
        Some("dead") => JobState::Dead,
        Some("cancelled") => JobState::Cancelled,
        _ => return Err(bad_reply("a job's state")),
    };
    Ok(JobRecord {
        id,
        kind: text("kind").unwrap_or_default(),
        queue: text("queue").unwrap_or_default(),
        state,
        args: text("args")
            .and_then(|a| serde_json::from_str(&a).ok())
            .unwrap_or(Value::Null),
        priority: number("priority").unwrap_or(0) as i16,
        attempt: number("attempt").unwrap_or(0) as i32,
        max_attempts: number("max_attempts").unwrap_or(1) as i32,
        errors: text("errors")
            .and_then(|e| serde_json::from_str(&e).ok())
            .unwrap_or_default(),
        enqueued_at: time("enqueued_at").unwrap_or_default(),
        run_at: from_millis(run_at),
        attempted_at: time("attempted_at"),
        finished_at: time("finished_at"),
        locked_by: text("locked_by"),
        unique_key: text("unique_key"),
        tenant_id: text("tenant_id"),
        provider: text("provider"),
        progress: text("progress").and_then(|p| serde_json::from_str(&p).ok()),
    })
}
