//! Every Prometheus metric the process exports, declared once, in one registry.
//!
//! Names the operations guide uses (`connector_*`, `webhook_*`) keep its spelling; the job engine's own metrics
//! are prefixed `activekg_job`. Gauges that describe the database (queue depths) are sampled when `/metrics` is
//! scraped, so every replica reports the same truth and none goes stale.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Every family as (name, help, type), including label vectors with no series yet.
    families: Vec<(String, String, &'static str)>,
    /// HTTP requests by method, matched route and status.
    pub http_requests: IntCounterVec,
    /// HTTP request latency by method and matched route.
    pub http_duration: HistogramVec,
    /// Connections closed at once because `ACTIVEKG_HTTP_MAX_CONNECTIONS` were open.
    pub http_connections_refused: IntCounterVec,
    /// Jobs inserted, by kind (duplicates skipped by idempotency key are not counted).
    pub jobs_enqueued: IntCounterVec,
    /// Jobs skipped at enqueue because one with the same idempotency key exists, by kind.
    pub jobs_deduplicated: IntCounterVec,
    /// Attempts started, by kind.
    pub jobs_started: IntCounterVec,
    /// Attempts that succeeded, by kind.
    pub jobs_succeeded: IntCounterVec,
    /// Attempts that failed, by kind and class (transient, retry_after, permanent, timeout, panic, crash).
    pub jobs_failed: IntCounterVec,
    /// Failed attempts rescheduled for another try, by kind.
    pub jobs_retried: IntCounterVec,
    /// Jobs dead-lettered, by kind.
    pub jobs_dead: IntCounterVec,
    /// Jobs that waited for back-pressure without using an attempt, by kind.
    pub jobs_snoozed: IntCounterVec,
    /// Jobs taken back from workers that stopped heartbeating, by kind.
    pub jobs_rescued: IntCounterVec,
    /// Attempt duration, by kind.
    pub job_duration: HistogramVec,
    /// Seconds from a job becoming due (enqueued, or reaching its run time) to a worker starting it, by kind.
    pub job_start_latency: HistogramVec,
    /// Jobs by queue, kind and state (pending, scheduled, running, dead), sampled at scrape.
    pub queue_depth: IntGaugeVec,
    /// Age of the oldest pending job, by queue and kind, sampled at scrape.
    pub queue_oldest_pending_age: IntGaugeVec,
    /// Pending and scheduled jobs by queue and tenant, sampled at scrape.
    pub queue_tenant_depth: IntGaugeVec,
    /// The guide's backlog gauge: pending and scheduled connector jobs by provider and tenant.
    pub connector_queue_depth: IntGaugeVec,
    /// Workers that heartbeated within the orphan timeout, sampled at scrape.
    pub workers_alive: IntGaugeVec,
    /// Processes firing schedules that heartbeated within the orphan timeout, sampled at scrape (0 means
    /// no purge, no polling).
    pub schedulers_alive: IntGaugeVec,
    /// Times this process fenced itself: no heartbeat reached the database for most of the orphan timeout.
    pub worker_fenced: IntCounterVec,
    /// Schedule ticks this process fired (each tick is fired by exactly one process), by schedule.
    pub schedule_ticks_fired: IntCounterVec,
    /// Key rotation outcomes per connector row: rotated, skipped (nothing to re-encrypt), error.
    pub rotation: IntCounterVec,
    /// Connector secrets that did not decrypt, by provider and field.
    pub config_decrypt_failures: IntCounterVec,
    /// Reconnects of long-lived listeners (`config_cache`, and the GCS subscriber), by source.
    pub pubsub_reconnects: IntCounterVec,
    /// Objects ingested (created, updated, unchanged, deleted), by provider and tenant.
    pub ingest: IntCounterVec,
    /// Failed ingest attempts, by provider and tenant.
    pub ingest_errors: IntCounterVec,
    /// Failed ingest attempts by the guide's error types: no_config, parse, processing, unsupported_provider.
    pub worker_errors: IntCounterVec,
    /// Ingest duration (stat to commit), by provider.
    pub ingest_duration: HistogramVec,
    /// Time spent in each stage of the pipeline from object to vector, by stage ([`Stage`]), as
    /// each job saw it: summed, the shares say where a document's time goes.
    pub pipeline_stage: HistogramVec,
    /// Pub/Sub push authentication results (the guide's metric: secret_ok, oidc_ok, skipped, token_missing,
    /// token_invalid, signature_invalid, keys_unavailable, not_configured), by provider (`gcs`).
    pub webhook_verify: IntCounterVec,
    /// SNS signature checks (signature_ok, skipped, signature_invalid, cert_url_invalid, cert_unavailable,
    /// stale), by provider (`s3`). Apart from the guide's metric, whose failure query counts every result but
    /// `secret_ok|oidc_ok|skipped` as a failure.
    pub webhook_sns_verify: IntCounterVec,
    /// Webhook deliveries refused because the tenant's topic allowlist does not name the topic.
    pub webhook_topic_rejected: IntCounterVec,
    /// Webhook deliveries by provider and outcome (accepted, duplicate, ignored, no_connector, malformed,
    /// rejected, test_event, subscription_confirmation).
    pub webhook_events: IntCounterVec,
    /// Texts per embedding model call.
    pub embedding_batch_size: Histogram,
    /// Duration of one embedding model call (a whole batch).
    pub embedding_call_duration: Histogram,
    /// Texts embedded, by result (ok, rejected, unavailable, rate_limited).
    pub embedding_texts: IntCounterVec,
    /// Nodes embedded, by tenant and result (ready, skipped, failed).
    pub embedding_nodes: IntCounterVec,
    /// Purger executions, by result (success, error, dry_run).
    pub purger: IntCounterVec,
    /// Duration of a purge run (an attempt, from start or resume to its end).
    pub purger_duration: Histogram,
    /// Rows hard-deleted by the purger, by kind (document, chunk, edge).
    pub purged: IntCounterVec,
    /// Pub/Sub messages the GCS subscriber handled, by result (acked, nacked, ignored).
    pub pubsub_messages: IntCounterVec,
    /// Poll passes over buckets without notifications, by provider and result (started, completed, failed).
    pub poller_runs: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        // Every family, including label vectors that have no series yet: the scrape declares them all, and
        // dashboards and alerts can be checked against what we export.
        let names = std::cell::RefCell::new(Vec::new());
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                names
                    .borrow_mut()
                    .push((name.to_owned(), help.to_owned(), "counter"));
                Ok(metric)
            };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            names
                .borrow_mut()
                .push((name.to_owned(), help.to_owned(), "gauge"));
            Ok(metric)
        };
        let histogram =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<HistogramVec> {
                let metric = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )?;
                registry.register(Box::new(metric.clone()))?;
                names
                    .borrow_mut()
                    .push((name.to_owned(), help.to_owned(), "histogram"));
                Ok(metric)
            };
        let single = |opts: HistogramOpts| -> prometheus::Result<Histogram> {
            names.borrow_mut().push((
                opts.common_opts.name.clone(),
                opts.common_opts.help.clone(),
                "histogram",
            ));
            let metric = Histogram::with_opts(opts)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        Ok(Self {
            http_requests: counter(
                "http_requests_total",
                "HTTP requests by method, route and status.",
                &["method", "route", "status"],
            )?,
            http_duration: histogram(
                "http_request_duration_seconds",
                "HTTP request latency by method and route.",
                &["method", "route"],
            )?,
            http_connections_refused: counter(
                "http_connections_refused_total",
                "Connections closed at once because ACTIVEKG_HTTP_MAX_CONNECTIONS were already open.",
                &[],
            )?,
            jobs_enqueued: counter(
                "activekg_jobs_enqueued_total",
                "Jobs inserted, by kind.",
                &["kind"],
            )?,
            jobs_deduplicated: counter(
                "activekg_jobs_deduplicated_total",
                "Enqueues skipped because a job with the same idempotency key exists, by kind.",
                &["kind"],
            )?,
            jobs_started: counter(
                "activekg_jobs_started_total",
                "Job attempts started, by kind.",
                &["kind"],
            )?,
            jobs_succeeded: counter(
                "activekg_jobs_succeeded_total",
                "Job attempts that succeeded, by kind.",
                &["kind"],
            )?,
            jobs_failed: counter(
                "activekg_jobs_failed_total",
                "Job attempts that failed, by kind and class.",
                &["kind", "class"],
            )?,
            jobs_retried: counter(
                "activekg_jobs_retried_total",
                "Failed attempts rescheduled with backoff, by kind.",
                &["kind"],
            )?,
            jobs_snoozed: counter(
                "activekg_jobs_snoozed_total",
                "Jobs that could not start yet (back-pressure) and wait without using an attempt, by kind.",
                &["kind"],
            )?,
            jobs_dead: counter(
                "activekg_jobs_dead_total",
                "Jobs dead-lettered, by kind.",
                &["kind"],
            )?,
            jobs_rescued: counter(
                "activekg_jobs_rescued_total",
                "Jobs taken back from workers that stopped heartbeating, by kind.",
                &["kind"],
            )?,
            job_duration: histogram(
                "activekg_job_duration_seconds",
                "Job attempt duration, by kind.",
                &["kind"],
            )?,
            job_start_latency: histogram(
                "activekg_job_start_latency_seconds",
                "Seconds from a job becoming due to a worker starting it, by kind.",
                &["kind"],
            )?,
            queue_depth: gauge(
                "activekg_job_queue_depth",
                "Jobs by queue, kind and state (sampled at scrape).",
                &["queue", "kind", "state"],
            )?,
            queue_oldest_pending_age: gauge(
                "activekg_job_queue_oldest_pending_age_seconds",
                "Age of the oldest pending job by queue and kind (sampled at scrape).",
                &["queue", "kind"],
            )?,
            queue_tenant_depth: gauge(
                "activekg_job_queue_tenant_depth",
                "Pending and scheduled jobs by queue and tenant (sampled at scrape).",
                &["queue", "tenant"],
            )?,
            connector_queue_depth: gauge(
                "connector_worker_queue_depth",
                "Connector backlog (pending and scheduled ingest jobs) by provider and tenant.",
                &["provider", "tenant"],
            )?,
            workers_alive: gauge(
                "activekg_job_workers_alive",
                "Worker processes that heartbeated recently, by host (sampled at scrape).",
                &["host"],
            )?,
            schedulers_alive: gauge(
                "activekg_schedulers_alive",
                "Processes firing cron schedules that heartbeated recently (sampled at scrape).",
                &[],
            )?,
            worker_fenced: counter(
                "activekg_worker_fenced_total",
                "Times this process stopped its attempts because no heartbeat reached the database for most of the orphan timeout.",
                &[],
            )?,
            schedule_ticks_fired: counter(
                "activekg_schedule_ticks_fired_total",
                "Schedule ticks this process fired (one process fires each tick), by schedule.",
                &["schedule"],
            )?,
            rotation: counter(
                "connector_rotation_total",
                "Connector config rows processed by key rotation, by result (rotated, skipped, error).",
                &["result"],
            )?,
            config_decrypt_failures: counter(
                "connector_config_decrypt_failures_total",
                "Connector config secrets that did not decrypt, by provider and field.",
                &["provider", "field"],
            )?,
            pubsub_reconnects: counter(
                "connector_pubsub_reconnect_total",
                "Reconnects of long-lived subscriptions (config cache listener, GCS subscriber), by source.",
                &["source"],
            )?,
            ingest: counter(
                "connector_ingest_total",
                "Objects ingested successfully, by provider, tenant and result (created, updated, unchanged, deleted).",
                &["provider", "tenant", "result"],
            )?,
            ingest_errors: counter(
                "connector_ingest_errors_total",
                "Failed ingest attempts, by provider and tenant.",
                &["provider", "tenant"],
            )?,
            worker_errors: counter(
                "connector_worker_errors_total",
                "Failed ingest attempts by error type (no_config, parse, processing, unsupported_provider).",
                &["error_type"],
            )?,
            ingest_duration: histogram(
                "connector_ingest_duration_seconds",
                "Time to ingest one object (stat, fetch, extract, chunk, write), by provider.",
                &["provider"],
            )?,
            pipeline_stage: histogram(
                "activekg_pipeline_stage_seconds",
                "Time one job spent in one pipeline stage: fetch (stat and read the object), extract (the sandboxed parse, child start included), chunk, embed (waiting for and running the model), write (the graph or vector transaction).",
                &["stage"],
            )?,
            webhook_verify: counter(
                "webhook_pubsub_verify_total",
                "Pub/Sub push authentication results, by provider and result.",
                &["provider", "result"],
            )?,
            webhook_sns_verify: counter(
                "webhook_sns_verify_total",
                "SNS delivery signature checks, by provider and result.",
                &["provider", "result"],
            )?,
            webhook_topic_rejected: counter(
                "webhook_topic_rejected_total",
                "Webhook deliveries refused by a tenant's topic allowlist, by provider and tenant.",
                &["provider", "tenant"],
            )?,
            webhook_events: counter(
                "webhook_events_total",
                "Webhook deliveries by provider and outcome.",
                &["provider", "result"],
            )?,
            embedding_batch_size: single(
                HistogramOpts::new("embedding_batch_size", "Texts per embedding model call.")
                    .buckets(vec![
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
                    ]),
            )?,
            embedding_call_duration: single(
                HistogramOpts::new(
                    "embedding_call_duration_seconds",
                    "Duration of one embedding model call (a whole batch).",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            embedding_texts: counter(
                "embedding_texts_total",
                "Texts embedded, by result (ok, rejected, unavailable, rate_limited).",
                &["result"],
            )?,
            embedding_nodes: counter(
                "embedding_nodes_total",
                "Nodes whose embedding request ended, by tenant and result (ready, skipped, failed).",
                &["tenant", "result"],
            )?,
            purger: counter(
                "connector_purger_total",
                "Purger executions, by result (success, error, dry_run).",
                &["result"],
            )?,
            purger_duration: single(
                HistogramOpts::new(
                    "connector_purger_duration_seconds",
                    "Duration of a purge run.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            purged: counter(
                "connector_purger_deleted_total",
                "Rows hard-deleted by the purger, by kind (document, chunk, edge).",
                &["kind"],
            )?,
            pubsub_messages: counter(
                "connector_pubsub_messages_total",
                "Pub/Sub messages the GCS subscriber handled, by result (acked, nacked, ignored).",
                &["result"],
            )?,
            poller_runs: counter(
                "connector_poller_runs_total",
                "Poll passes over buckets without notifications, by provider and result (started, completed, failed).",
                &["provider", "result"],
            )?,
            registry,
            families: names.take(),
        })
    }

    /// The name of every metric family this process exports.
    pub fn names(&self) -> Vec<&str> {
        self.families
            .iter()
            .map(|(name, _, _)| name.as_str())
            .collect()
    }

    /// Creates the zero series of every label value known before any event (results, error types, classes,
    /// the job kinds this process runs, providers, and the tenants with connectors), so panels and
    /// `absent()`-style alerts see them from the first scrape. Idempotent.
    pub fn preset(&self, known: &Known<'_>) {
        let zero = |vec: &IntCounterVec, labels: &[&str]| {
            vec.with_label_values(labels);
        };
        zero(&self.http_connections_refused, &[]);
        zero(&self.worker_fenced, &[]);
        self.schedulers_alive.with_label_values(&[] as &[&str]);
        for kind in known.kinds {
            for vec in [
                &self.jobs_enqueued,
                &self.jobs_deduplicated,
                &self.jobs_started,
                &self.jobs_succeeded,
                &self.jobs_retried,
                &self.jobs_snoozed,
                &self.jobs_dead,
                &self.jobs_rescued,
            ] {
                zero(vec, &[kind]);
            }
            for class in JOB_FAILURE_CLASSES {
                zero(&self.jobs_failed, &[kind, class]);
            }
            self.job_duration.with_label_values(&[kind]);
            self.job_start_latency.with_label_values(&[kind]);
        }
        for schedule in known.schedules {
            zero(&self.schedule_ticks_fired, &[schedule]);
        }
        for result in ["rotated", "skipped", "error"] {
            zero(&self.rotation, &[result]);
        }
        for (provider, field) in known.secret_fields {
            zero(&self.config_decrypt_failures, &[provider, field]);
        }
        for source in ["config_cache", "gcs_subscriber"] {
            zero(&self.pubsub_reconnects, &[source]);
        }
        for error_type in ["no_config", "parse", "processing", "unsupported_provider"] {
            zero(&self.worker_errors, &[error_type]);
        }
        for stage in Stage::ALL {
            self.pipeline_stage.with_label_values(&[stage.label()]);
        }
        for provider in known.providers {
            self.ingest_duration.with_label_values(&[provider]);
            for result in ["started", "completed", "failed"] {
                zero(&self.poller_runs, &[provider, result]);
            }
        }
        for result in SNS_VERIFY_RESULTS {
            zero(&self.webhook_sns_verify, &["s3", result]);
        }
        for result in PUSH_VERIFY_RESULTS {
            zero(&self.webhook_verify, &["gcs", result]);
        }
        for provider in ["s3", "gcs"] {
            for result in WEBHOOK_EVENT_RESULTS {
                zero(&self.webhook_events, &[provider, result]);
            }
        }
        for result in ["ok", "rejected", "unavailable", "rate_limited"] {
            zero(&self.embedding_texts, &[result]);
        }
        for result in ["success", "error", "dry_run"] {
            zero(&self.purger, &[result]);
        }
        for kind in ["document", "chunk", "edge"] {
            zero(&self.purged, &[kind]);
        }
        for result in ["acked", "nacked", "ignored", "rejected"] {
            zero(&self.pubsub_messages, &[result]);
        }
        for (tenant, provider) in known.tenants {
            self.preset_tenant(tenant, provider);
        }
    }

    /// The zero series of one tenant's connector (at start-up, and when a connector is registered).
    pub fn preset_tenant(&self, tenant: &str, provider: &str) {
        for result in ["created", "updated", "unchanged", "deleted", "skipped"] {
            self.ingest.with_label_values(&[provider, tenant, result]);
        }
        self.ingest_errors.with_label_values(&[provider, tenant]);
        if provider != "local" {
            self.webhook_topic_rejected
                .with_label_values(&[provider, tenant]);
        }
        for result in ["ready", "skipped", "failed"] {
            self.embedding_nodes.with_label_values(&[tenant, result]);
        }
    }

    /// All metrics in the Prometheus text exposition format. Families without series yet (labelled by
    /// tenants none of which has a connector, say) are still declared, with `# HELP` and `# TYPE`.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        let gathered = self.registry.gather();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&gathered, &mut buffer);
        let mut text = String::from_utf8(buffer).unwrap_or_default();
        for (name, help, kind) in &self.families {
            if !gathered.iter().any(|family| family.name() == name) {
                text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            }
        }
        text
    }
}

/// What [`Metrics::preset`] creates series for, besides the fixed label values.
#[derive(Debug, Default)]
pub struct Known<'a> {
    /// Job kinds this process runs or enqueues.
    pub kinds: &'a [&'a str],
    /// Providers of this build.
    pub providers: &'a [&'a str],
    /// Schedules this process may fire.
    pub schedules: &'a [&'a str],
    /// (provider, field) of every sealed connector secret.
    pub secret_fields: &'a [(&'a str, &'a str)],
    /// (tenant, provider) of every connector configured at start-up.
    pub tenants: &'a [(String, String)],
}

/// A stage of the pipeline from object to vector, as `activekg_pipeline_stage_seconds` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Looking the object up in its store and reading it.
    Fetch,
    /// The sandboxed parse to text, the child process's start included.
    Extract,
    /// Cutting the text into chunks (in the same child).
    Chunk,
    /// Waiting for the model and running it.
    Embed,
    /// The transaction that writes the graph, or a vector.
    Write,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 5] = [
        Stage::Fetch,
        Stage::Extract,
        Stage::Chunk,
        Stage::Embed,
        Stage::Write,
    ];

    /// The `stage` label.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Extract => "extract",
            Stage::Chunk => "chunk",
            Stage::Embed => "embed",
            Stage::Write => "write",
        }
    }
}

impl Metrics {
    /// Records `took` in `stage`.
    pub fn stage(&self, stage: Stage, took: std::time::Duration) {
        self.pipeline_stage
            .with_label_values(&[stage.label()])
            .observe(took.as_secs_f64());
    }
}

/// Classes of `activekg_jobs_failed_total` (see `jobs::engine::outcome`).
const JOB_FAILURE_CLASSES: &[&str] = &[
    "transient",
    "retry_after",
    "permanent",
    "timeout",
    "panic",
    "crash",
    "interrupted",
    "undecodable",
    "fenced",
    "snoozed",
];
/// Results of `webhook_sns_verify_total`.
const SNS_VERIFY_RESULTS: &[&str] = &[
    "signature_ok",
    "skipped",
    "signature_invalid",
    "cert_url_invalid",
    "cert_unavailable",
    "stale",
];
/// Results of `webhook_pubsub_verify_total`.
const PUSH_VERIFY_RESULTS: &[&str] = &[
    "secret_ok",
    "oidc_ok",
    "skipped",
    "token_missing",
    "token_invalid",
    "signature_invalid",
    "keys_unavailable",
    "not_configured",
];
/// Results of `webhook_events_total`.
const WEBHOOK_EVENT_RESULTS: &[&str] = &[
    "accepted",
    "duplicate",
    "no_connector",
    "rejected",
    "malformed",
    "ignored",
    "test_event",
    "subscription_confirmation",
];

static METRICS: LazyLock<Metrics> =
    LazyLock::new(|| Metrics::new().expect("metric definitions are valid and registered once"));

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}
