//! The `activekg` binary: usage, exit codes, one-shot commands, and graceful shutdown on SIGTERM.

use std::process::{Command, Output};
use std::time::Duration;

use crate::helpers::{KEK, TestDb, admin_url, eventually, free_port, spawn_serve, terminate};

const BIN: &str = env!("CARGO_BIN_EXE_activekg");

/// Runs the binary with exactly these environment variables (plus PATH).
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

#[test]
fn help_lists_the_roles_and_exits_zero() {
    let out = run(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "serve",
        "api",
        "worker",
        "scheduler",
        "migrate",
        "openapi",
        "Exit codes",
    ] {
        assert!(text.contains(word), "{word} missing from --help:\n{text}");
    }
}

#[test]
fn an_unknown_command_is_a_usage_error() {
    assert_eq!(run(&["frobnicate"], &[]).status.code(), Some(2));
}

#[test]
fn a_bad_variable_exits_78_with_one_message_naming_it() {
    let out = run(
        &["migrate"],
        &[
            ("ACTIVEKG_POOL_SIZE", "ten"),
            ("ACTIVEKG_DSN", "postgres://x/y"),
            ("CONNECTOR_KEK_V1", KEK),
        ],
    );
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ACTIVEKG_POOL_SIZE=\"ten\""), "{stderr}");
}

#[test]
fn a_dsn_without_a_key_encryption_key_exits_78() {
    let out = run(&["serve"], &[("ACTIVEKG_DSN", "postgres://x/y")]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CONNECTOR_KEK_V1 is missing"));
}

#[test]
fn migrate_against_an_unreachable_database_exits_69() {
    let out = run(
        &["migrate"],
        &[
            ("ACTIVEKG_DSN", "postgres://postgres@127.0.0.1:9/nowhere"),
            ("CONNECTOR_KEK_V1", KEK),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn openapi_prints_the_committed_document() {
    let out = run(&["openapi"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, activekg::api::openapi());
}

#[test]
fn env_lists_every_variable_by_section_even_when_one_is_wrong() {
    let output = run(&["env"], &[("ACTIVEKG_POOL_SIZE", "ten")]);
    assert_eq!(output.status.code(), Some(0));
    let listed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(listed.trim_end(), activekg::config::vars::markdown());
    for line in [
        "**Database**",
        "| `ACTIVEKG_POOL_SIZE` | connections per process | `10` |",
    ] {
        assert!(listed.contains(line), "{line} missing from:\n{listed}");
    }
}

#[test]
fn gen_key_prints_a_key_the_configuration_accepts() {
    let out = run(&["gen-key"], &[]);
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        activekg::config::Settings::from_vars([
            ("CONNECTOR_KEK_V1", key.as_str()),
            ("ACTIVEKG_DSN", "postgres://x/y")
        ])
        .is_ok()
    );
}

#[tokio::test]
async fn migrate_creates_the_schema_and_the_jobs_verbs_read_it() {
    let db = TestDb::new().await;
    let fresh = format!("{}_empty", db.name);
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {fresh}")))
        .execute(&db.pool)
        .await
        .unwrap();
    let url = format!("{}/{fresh}", admin_url().rsplit_once('/').unwrap().0);
    let env = [("ACTIVEKG_DSN", url.as_str()), ("CONNECTOR_KEK_V1", KEK)];
    let out = run(&["migrate"], &env);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = run(&["migrate"], &env);
    assert_eq!(again.status.code(), Some(0), "migrating twice is a no-op");
    {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        let mut probe = crate::kinds::Probe::new("waiting", crate::kinds::Behavior::Succeed);
        probe.tenant = Some("acme".to_owned());
        activekg::jobs::engine::enqueue(&mut conn, &probe)
            .await
            .unwrap();
        drop(conn);
        pool.close().await;
    }
    let queues = run(&["jobs", "queues"], &env);
    assert_eq!(queues.status.code(), Some(0));
    let printed = String::from_utf8_lossy(&queues.stdout);
    assert!(printed.contains("QUEUE"), "{printed}");
    // The tenant breakdown the verb's help promises.
    assert!(
        printed
            .lines()
            .any(|l| l.split_whitespace().take(4).collect::<Vec<_>>() == ["test", "acme", "-", "1"]),
        "{printed}"
    );
    // Bulk cancel from the terminal: counted first, then done.
    let dry = run(&["jobs", "cancel", "--tenant", "acme", "--dry-run"], &env);
    assert_eq!(
        String::from_utf8_lossy(&dry.stdout).trim(),
        "1 waiting job(s) would be cancelled"
    );
    let cancel = run(&["jobs", "cancel", "--tenant", "acme"], &env);
    assert_eq!(
        String::from_utf8_lossy(&cancel.stdout).trim(),
        "cancelled 1 waiting job(s)"
    );
    let refused = run(&["jobs", "cancel"], &env);
    assert_ne!(
        refused.status.code(),
        Some(0),
        "an empty filter needs --all"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {fresh} WITH (FORCE)"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn serve_stops_cleanly_on_sigterm() {
    let db = TestDb::new().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let child = spawn_serve(&[
        ("ACTIVEKG_DSN", db.url.clone()),
        ("CONNECTOR_KEK_V1", KEK.to_owned()),
        ("ACTIVEKG_LISTEN", listen.clone()),
        // Given but unused: said once at start, not silently accepted.
        ("REDIS_URL", "redis://127.0.0.1:6379/0".to_owned()),
    ]);
    let client = reqwest::Client::new();
    eventually(
        Duration::from_secs(20),
        "the server to be ready",
        || async {
            let response = client
                .get(format!("http://{listen}/readyz"))
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(())
        },
    )
    .await;
    terminate(&child);
    let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("exits within 15 s")
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let workers: i64 = sqlx::query_scalar("SELECT count(*) FROM job_workers")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(workers, 0, "the worker row was removed on the way out");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains("REDIS_URL is set but has no effect: ACTIVEKG_JOBS_BACKEND=postgres"),
        "{log}"
    );
    assert!(
        log.contains("embedder: local"),
        "serve says which embedder: {log}"
    );
    db.drop_db().await;
}
