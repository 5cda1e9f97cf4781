//! The zero-configuration database: a private PostgreSQL cluster started from the machine's binaries when
//! no server is found. Slow (initdb), so each path runs once.

use std::time::Duration;

use activekg::store::embedded;

use crate::helpers::{eventually, free_port, spawn_serve, terminate};

#[tokio::test]
async fn a_private_cluster_starts_is_adopted_by_a_second_process_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cluster = embedded::start_private(dir.path(), port)
        .await
        .expect("the private cluster starts");
    assert!(!cluster.is_adopted());
    assert!(cluster.data_dir().join("PG_VERSION").exists());
    let url = cluster.url("activekg");
    assert!(
        embedded::can_connect(&url).await,
        "its activekg database accepts connections"
    );

    // A second start (a restarted process finding the first one's cluster) adopts it.
    let adopted = embedded::start_private(dir.path(), port).await.unwrap();
    assert!(adopted.is_adopted());
    drop(adopted);

    cluster.stop().await.expect("the cluster stops");
    assert!(
        !embedded::can_connect(&url).await,
        "nothing listens after stop"
    );
}

#[tokio::test]
async fn serve_without_any_configuration_runs_on_a_private_cluster_and_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let (api_port, pg_port, dead_port) = (free_port(), free_port(), free_port());
    let child = spawn_serve(&[
        ("ACTIVEKG_LISTEN", format!("127.0.0.1:{api_port}")),
        ("ACTIVEKG_DATA_DIR", dir.path().display().to_string()),
        // Nothing answers here, standing in for a machine without a running server.
        ("ACTIVEKG_LOCAL_PG_PORT", dead_port.to_string()),
        ("ACTIVEKG_EMBEDDED_PG_PORT", pg_port.to_string()),
    ]);
    let client = reqwest::Client::new();
    let health: serde_json::Value = eventually(
        Duration::from_secs(60),
        "the service to answer /health",
        || async {
            let response = client
                .get(format!("http://127.0.0.1:{api_port}/health"))
                .send()
                .await
                .ok()?;
            let body: serde_json::Value = response.json().await.ok()?;
            (body["database"]["migrated"] == true).then_some(body)
        },
    )
    .await;
    assert_eq!(health["status"], "ok");
    // With no CONNECTOR_KEK_V1 the quickstart keeps a development key beside its data, readable by us only.
    let key = dir.path().join("dev-kek");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        activekg::config::Settings::from_vars([
            (
                "CONNECTOR_KEK_V1",
                std::fs::read_to_string(&key).unwrap().trim()
            ),
            ("ACTIVEKG_DSN", "postgres://x/y"),
        ])
        .is_ok()
    );
    // Nor an ADMIN_TOKEN: a development token, kept beside the data, opens the admin API at once.
    let token_file = dir.path().join("dev-admin-token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file).unwrap();
    let queues = client
        .get(format!("http://127.0.0.1:{api_port}/_admin/queues"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(queues.status(), 200);
    let pg_url = format!("postgres://activekg@127.0.0.1:{pg_port}/activekg");
    assert!(embedded::can_connect(&pg_url).await);

    terminate(&child);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{log}");
    assert!(
        log.contains("private PostgreSQL cluster"),
        "the log says which database it used:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "http://127.0.0.1:{api_port}/dashboard#/?token={}",
            token.trim()
        )) && log.contains(&format!("curl -H 'Authorization: Bearer {}'", token.trim())),
        "the log gives a link that signs in and a curl line:\n{log}"
    );
    assert!(
        !embedded::can_connect(&pg_url).await,
        "the private cluster was stopped on shutdown"
    );
}
