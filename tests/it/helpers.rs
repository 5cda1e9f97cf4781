//! The test harness: a private database per test (cloned from a migrated template), the real app on port
//! 0, typed request helpers, and re-running this test binary as a child process for crash tests.

use std::sync::Once;
use std::time::Duration;

use activekg::app::{self, AppError, Roles};
use activekg::config::{JobSettings, Settings};
use activekg::store;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A valid Fernet key for tests.
pub const KEK: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
/// The admin token test apps use.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// The server tests create their databases on (`ACTIVEKG_TEST_DATABASE_URL`, default the local one).
pub fn admin_url() -> String {
    std::env::var("ACTIVEKG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn url_for(database: &str) -> String {
    let admin = admin_url();
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    format!("{base}/{database}")
}

/// Shows logs when `TEST_LOG` is set (e.g. `TEST_LOG=debug`).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// A log writer that keeps everything written to it, for tests that read log lines.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A database of its own for one test, with our migrations applied.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// A pool for the test's own queries.
    pub pool: PgPool,
}

impl TestDb {
    /// Clones the migrated template (creating it once per set of migrations, under an advisory lock so
    /// parallel test processes agree).
    pub async fn new() -> Self {
        init_tracing();
        let mut admin = PgConnection::connect(&admin_url()).await.expect(
            "tests need PostgreSQL: set ACTIVEKG_TEST_DATABASE_URL or run one on 127.0.0.1:5432",
        );
        let template = template_name();
        sqlx::query("SELECT pg_advisory_lock(727274)")
            .execute(&mut admin)
            .await
            .unwrap();
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&template)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        if !exists {
            let building = format!("{template}_building");
            sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {building} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await
            .unwrap();
            sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {building}")))
                .execute(&mut admin)
                .await
                .unwrap();
            let pool = PgPool::connect(&url_for(&building)).await.unwrap();
            store::migrate(&pool)
                .await
                .expect("migrations apply to a fresh database");
            // What start-up adds when the server has pgvector, so clones have it without an app.
            store::embeddings::prepare(&pool).await;
            pool.close().await;
            sqlx::query(AssertSqlSafe(format!(
                "ALTER DATABASE {building} RENAME TO {template}"
            )))
            .execute(&mut admin)
            .await
            .unwrap();
        }
        sqlx::query("SELECT pg_advisory_unlock(727274)")
            .execute(&mut admin)
            .await
            .unwrap();
        let name = format!("activekg_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE {template}"
        )))
        .execute(&mut admin)
        .await
        .unwrap();
        let url = url_for(&name);
        let pool = PgPool::connect(&url).await.unwrap();
        Self { name, url, pool }
    }

    /// Drops the database (tests call this at the end; a failed test leaves it for inspection, and
    /// `.ci/run` sweeps leftovers).
    pub async fn drop_db(self) {
        // close() waits for checked-out connections; a test may still hold one, and FORCE ends it anyway.
        let _ = tokio::time::timeout(Duration::from_millis(500), self.pool.close()).await;
        if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

/// The template's name changes whenever a migration does, so a stale template is never used.
fn template_name() -> String {
    let mut hash: u64 = 0xcbf29ce484222325;
    for migration in store::MIGRATOR.iter() {
        for byte in migration
            .version
            .to_le_bytes()
            .iter()
            .chain(migration.checksum.iter())
        {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x100000001b3);
        }
    }
    format!("activekg_tpl_{hash:016x}")
}

/// A keyring holding `keys` (version, key) with `active` encrypting.
pub fn keyring(keys: &[(u32, &str)], active: u32) -> activekg::crypto::Keyring {
    activekg::crypto::Keyring::new(&activekg::config::KeyEncryptionKeys {
        keys: keys
            .iter()
            .map(|(v, k)| (*v, activekg::config::Secret::new(*k)))
            .collect(),
        active_version: active,
    })
    .unwrap()
}

/// A connector registry on `pool` with the test key as version 1.
pub fn registry(pool: &PgPool) -> std::sync::Arc<activekg::registry::Registry> {
    std::sync::Arc::new(activekg::registry::Registry::new(
        pool.clone(),
        std::sync::Arc::new(keyring(&[(1, KEK)], 1)),
    ))
}

/// A process's LISTEN hub on `pool`, for the engine's and the config cache's channels, until `stop`.
pub fn hub(
    pool: &PgPool,
    stop: &CancellationToken,
) -> std::sync::Arc<activekg::store::listen::Hub> {
    let mut channels = activekg::jobs::engine::runtime::CHANNELS.to_vec();
    channels.push(activekg::store::connectors::NOTIFY_CHANNEL);
    activekg::store::listen::spawn(pool, &channels, stop.clone()).0
}

/// What job handlers need, for `jobs::register`.
pub fn job_deps(pool: &PgPool, settings: &JobSettings) -> activekg::jobs::Deps {
    activekg::jobs::Deps {
        pool: pool.clone(),
        settings: settings.clone(),
        registry: registry(pool),
        sources: std::sync::Arc::default(),
        max_file_bytes: 10 * 1024 * 1024,
        extractor: std::sync::Arc::new(extractor()),
        sns: std::sync::Arc::new(activekg::webhooks::sns::CertFetcher::new(None)),
        embeddings: std::sync::Arc::new(activekg::embedding::Service::new(hash_embedding())),
        embedding_caps: activekg::jobs::embed_node::Caps {
            tenant: 0,
            total: 0,
            redis: None,
        },
    }
}

/// Extraction children of the real `activekg` binary (this test binary cannot be one), with test limits.
pub fn extractor() -> activekg::extract::sandbox::Sandbox {
    activekg::extract::sandbox::Sandbox::new(
        env!("CARGO_BIN_EXE_activekg").into(),
        activekg::extract::sandbox::Limits {
            memory_mb: 1024,
            cpu_seconds: 30,
            wall: Duration::from_secs(60),
        },
    )
}

/// Embedding settings for the model-free `hash` embedder.
pub fn hash_embedding() -> activekg::config::EmbeddingSettings {
    settings_from(&[("EMBEDDING_BACKEND", "hash")]).embedding
}

/// Settings parsed from `vars` on top of a production-like base (no database needed).
pub fn settings_from(vars: &[(&str, &str)]) -> Settings {
    let mut all: Vec<(String, String)> = vec![
        (
            "ACTIVEKG_DSN".into(),
            "postgres://unused@127.0.0.1:1/unused".into(),
        ),
        ("CONNECTOR_KEK_V1".into(), KEK.into()),
    ];
    all.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Settings::from_vars(all).expect("valid settings")
}

/// Job settings suited to tests: fast polling, short timeouts.
pub fn fast_job_settings() -> JobSettings {
    JobSettings {
        batch_size: 10,
        poll_interval: Duration::from_millis(200),
        orphan_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(5),
        keep_completed: Duration::from_secs(24 * 3600),
        keep_dead: Duration::from_secs(30 * 86_400),
        run_scheduler: true,
        redis: None,
        redis_url_unused: false,
    }
}

/// Settings for a test app on `db`, with `extra` variables on top.
pub fn settings(db: &TestDb, extra: &[(&str, &str)]) -> Settings {
    let mut vars: Vec<(String, String)> = vec![
        ("ACTIVEKG_DSN".into(), db.url.clone()),
        ("CONNECTOR_KEK_V1".into(), KEK.into()),
        ("ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ("ACTIVEKG_LISTEN".into(), "127.0.0.1:0".into()),
        ("CONNECTOR_WORKER_POLL_INTERVAL".into(), "0.2".into()),
        ("ACTIVEKG_JOBS_ORPHAN_TIMEOUT_SECONDS".into(), "3".into()),
        // Model-free by default; tests of the real model ask for EMBEDDING_BACKEND=local.
        ("EMBEDDING_BACKEND".into(), "hash".into()),
        // Extraction children are the real binary (this test binary cannot be one).
        (
            "ACTIVEKG_EXTRACTOR".into(),
            env!("CARGO_BIN_EXE_activekg").into(),
        ),
    ];
    vars.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Settings::from_vars(vars).expect("test settings are valid")
}

/// The real application, serving on an ephemeral port.
pub struct TestApp {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub base: String,
    /// HTTP client.
    pub client: reqwest::Client,
    /// The app's database.
    pub db: TestDb,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), AppError>>,
}

impl TestApp {
    /// Spawns the whole app (API, workers, scheduler) on a fresh database and waits until it is ready.
    pub async fn spawn() -> Self {
        Self::spawn_with(&[], Roles::all()).await
    }

    /// Spawns the app with extra variables and the given roles, on a fresh database.
    pub async fn spawn_with(extra: &[(&str, &str)], roles: Roles) -> Self {
        let db = TestDb::new().await;
        let settings = settings(&db, extra);
        let app = Self::start(db, settings, roles).await;
        app.wait_ready().await;
        app
    }

    /// Starts the app with exactly these settings, without waiting for readiness.
    pub async fn start(db: TestDb, settings: Settings, roles: Roles) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let pool = store::pool(
            match &settings.database.source {
                activekg::config::DatabaseSource::Dsn(dsn) => dsn.expose(),
                _ => unreachable!("test apps always get a DSN"),
            },
            settings.database.pool_size,
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app::run(
            std::sync::Arc::new(settings),
            pool,
            roles,
            Some(listener),
            shutdown.clone(),
        ));
        Self {
            base,
            client: reqwest::Client::new(),
            db,
            shutdown,
            task,
        }
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(response) = self.client.get(self.url("/readyz")).send().await
                && response.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the app did not become ready within 5 s");
    }

    /// Absolute URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// GET without credentials.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// GET with the admin token.
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
    }

    /// POST a JSON body with the admin token.
    pub async fn admin_post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// GET with the admin token, expecting 200 and a JSON body.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let response = self.admin_get(path).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Stops the app gracefully, checks it exited cleanly, and drops its database.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the app stops within 30 s")
            .expect("the app task does not panic");
        result.expect("the app exits without error");
        self.db.drop_db().await;
    }
}

/// Asserts an error response has the one JSON shape and the given status and code; returns its message.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(response.status().as_u16(), status);
    assert!(
        response
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("application/json")),
        "error responses are JSON"
    );
    let header_id = response
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(
        body["error"]["request_id"].as_str(),
        header_id.as_deref(),
        "{body}"
    );
    body["error"]["message"].as_str().unwrap().to_owned()
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the child's stdout until its `READY` line (libtest prints its own lines first); returns what follows
/// `READY`, and the remaining lines.
pub async fn child_ready(
    child: &mut tokio::process::Child,
) -> (
    String,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    use tokio::io::AsyncBufReadExt;
    let stdout = child.stdout.take().expect("child stdout is piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("the child reports READY within 30 s")
            .expect("the child's stdout is readable")
            .expect("the child printed READY before exiting");
        // libtest may have printed "test <name> ... " on the same line before our output.
        if let Some((_, rest)) = line.split_once("READY") {
            return (rest.trim().to_owned(), lines);
        }
    }
}

/// Re-runs this test binary as a child process that executes `role` (see `children.rs`) against `db_url`.
pub fn spawn_child(role: &str, db_url: &str, extra_env: &[(&str, &str)]) -> tokio::process::Child {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let mut command = tokio::process::Command::new(exe);
    command
        .args([
            "--exact",
            "children::child_process_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ACTIVEKG_CHILD_ROLE", role)
        .env("ACTIVEKG_CHILD_DB", db_url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    command.spawn().expect("the test binary can re-run itself")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `activekg serve` as a child process with exactly `env` (plus PATH); stderr is piped for the test to read.
pub fn spawn_serve(env: &[(&str, String)]) -> tokio::process::Child {
    spawn_activekg("serve", env, std::process::Stdio::piped())
}

/// `activekg <role>` as a child process with exactly `env` (plus PATH), its output discarded.
pub fn spawn_role(role: &str, env: &[(&str, String)]) -> tokio::process::Child {
    spawn_activekg(role, env, std::process::Stdio::null())
}

fn spawn_activekg(
    role: &str,
    env: &[(&str, String)],
    stderr: std::process::Stdio,
) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_activekg"));
    command
        .arg(role)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().expect("the activekg binary starts")
}

/// Sends SIGTERM to a child process.
pub fn terminate(child: &tokio::process::Child) {
    let pid = child.id().expect("the child is running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success(), "SIGTERM was delivered");
}
