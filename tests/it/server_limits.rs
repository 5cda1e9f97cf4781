//! The HTTP server facing floods: connections that send nothing, or a byte at a time, are closed after the
//! header timeout and never more than the connection limit are open; the process stays up and answers
//! again as soon as the flood's connections are gone; health answers at once while the database is down.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestDb, eventually, free_port, spawn_role};

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn api_process(db: &TestDb, port: u16) -> tokio::process::Child {
    let child = spawn_role(
        "api",
        &[
            ("ACTIVEKG_DSN", db.url.clone()),
            ("CONNECTOR_KEK_V1", crate::helpers::KEK.to_owned()),
            ("ADMIN_TOKEN", crate::helpers::ADMIN_TOKEN.to_owned()),
            ("ACTIVEKG_LISTEN", format!("127.0.0.1:{port}")),
            ("EMBEDDING_BACKEND", "hash".to_owned()),
            ("PUBSUB_SUBSCRIBER_ENABLED", "false".to_owned()),
            ("ACTIVEKG_HTTP_MAX_CONNECTIONS", "100".to_owned()),
            ("ACTIVEKG_HTTP_HEADER_TIMEOUT_SECONDS", "2".to_owned()),
        ],
    );
    eventually(Duration::from_secs(60), "the API to answer", || async {
        reqwest::get(format!("http://127.0.0.1:{port}/health"))
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ())
    })
    .await;
    child
}

async fn health_within(port: u16, within: Duration) -> bool {
    let client = reqwest::Client::builder().timeout(within).build().unwrap();
    client
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

#[tokio::test]
async fn a_flood_of_idle_connections_is_bounded_and_the_server_answers_again_once_it_times_out() {
    let db = TestDb::new().await;
    let port = free_port();
    let server = api_process(&db, port).await;
    let pid = server.id().unwrap();
    let baseline = open_descriptors(pid);

    // 2,000 connections that never send a byte, twenty times the limit.
    let mut flood = Vec::new();
    for _ in 0..2000 {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
            flood.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = open_descriptors(pid);
    assert!(
        during <= baseline + 100 + 20,
        "the server holds {during} descriptors under the flood (it had {baseline}); the limit is 100 connections"
    );
    // The idle connections are closed after the 2 s header timeout; the server answers again.
    let flooded_at = Instant::now();
    eventually(
        Duration::from_secs(10),
        "health to answer after the flood",
        || async {
            health_within(port, Duration::from_secs(1))
                .await
                .then_some(())
        },
    )
    .await;
    assert!(
        flooded_at.elapsed() < Duration::from_secs(5),
        "recovered after {:?}",
        flooded_at.elapsed()
    );
    drop(flood);
    db.drop_db().await;
}

#[tokio::test]
async fn slowloris_connections_are_closed_after_the_header_timeout() {
    let db = TestDb::new().await;
    let port = free_port();
    let _server = api_process(&db, port).await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    let started = Instant::now();
    // Keep dribbling a header byte every 300 ms; the server must hang up regardless.
    let mut closed = vec![false; slow.len()];
    while closed.iter().any(|c| !c) && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (stream, closed) in slow.iter_mut().zip(closed.iter_mut()) {
            if *closed {
                continue;
            }
            let mut buffer = [0u8; 256];
            let hung_up = match tokio::time::timeout(
                Duration::from_millis(1),
                stream.read(&mut buffer),
            )
            .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => true,
                // An answer (a 408) followed by the close counts as hanging up too.
                Ok(Ok(_)) => true,
                Err(_) => stream.write_all(b"X").await.is_err(),
            };
            *closed = hung_up;
        }
    }
    assert!(closed.iter().all(|c| *c), "every slow client was cut off");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "within the 2 s header timeout (and a margin): {:?}",
        started.elapsed()
    );
    assert!(health_within(port, Duration::from_secs(1)).await);
    db.drop_db().await;
}

#[tokio::test]
async fn health_answers_at_once_while_the_database_is_down() {
    let app = crate::helpers::TestApp::spawn().await;
    let admin = sqlx::PgPool::connect(&crate::helpers::admin_url())
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS false",
        app.db.name
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&app.db.name)
        .execute(&admin)
        .await
        .unwrap();
    // Within the Kubernetes default probe timeout (1 s), every time, and without internals.
    for _ in 0..20 {
        let asked = Instant::now();
        let response = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap()
            .get(app.url("/health"))
            .send()
            .await
            .expect("health answers within 1 s");
        assert!(asked.elapsed() < Duration::from_millis(500));
        let body: serde_json::Value = response.json().await.unwrap();
        let error = body["database"]["error"].as_str().unwrap_or("");
        assert!(
            !error.contains("127.0.0.1") && !error.contains(&app.db.name),
            "{error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS true",
        app.db.name
    )))
    .execute(&admin)
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the database to be back",
        || async {
            let body: serde_json::Value = app.get("/health").await.json().await.ok()?;
            (body["database"]["reachable"] == true).then_some(())
        },
    )
    .await;
    app.stop().await;
}
