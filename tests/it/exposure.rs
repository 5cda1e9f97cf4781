//! What the admin token and the configuration can make the service do: connectors confined to the folders
//! and endpoints the operator allows, and development-only switches refused with a production database.

use serde_json::json;

use crate::helpers::{TestApp, assert_error};

async fn register(app: &TestApp, provider: &str, config: serde_json::Value) -> reqwest::Response {
    app.admin_post(
        &format!("/_admin/connectors/{provider}/register"),
        &json!({"tenant_id": format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..8]), "config": config}),
    )
    .await
}

#[tokio::test]
async fn local_connectors_and_credential_files_stay_inside_the_allowed_folders() {
    let allowed = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("key.json"), "{}").unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), allowed.path().join("escape")).unwrap();
    let roots = allowed.path().display().to_string();
    let app = TestApp::spawn_with(
        &[("ACTIVEKG_LOCAL_ROOTS", &roots)],
        activekg::app::Roles {
            worker: false,
            ..activekg::app::Roles::all()
        },
    )
    .await;
    assert_eq!(
        register(&app, "local", json!({"path": allowed.path()}))
            .await
            .status(),
        201
    );
    for outside in [
        json!({"path": "/etc"}),
        json!({"path": elsewhere.path()}),
        json!({"path": allowed.path().join("escape")}),
        json!({"path": format!("{roots}/../etc")}),
    ] {
        let message = assert_error(
            register(&app, "local", outside.clone()).await,
            422,
            "invalid_request",
        )
        .await;
        assert!(
            message.contains("ACTIVEKG_LOCAL_ROOTS") || message.contains(".."),
            "{outside}: {message}"
        );
    }
    let message = assert_error(
        register(
            &app,
            "gcs",
            json!({"bucket": "creds", "credentials_path": elsewhere.path().join("key.json")}),
        )
        .await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains("credentials_path"), "{message}");
    app.stop().await;
}

#[tokio::test]
async fn credentials_go_only_to_endpoints_the_operator_allows() {
    let app = TestApp::spawn_with(
        &[(
            "ACTIVEKG_CONNECTOR_ENDPOINTS",
            "127.0.0.1:39500,minio.internal",
        )],
        activekg::app::Roles {
            worker: false,
            ..activekg::app::Roles::all()
        },
    )
    .await;
    for allowed in ["http://127.0.0.1:39500", "https://minio.internal:9000/"] {
        let response = register(
            &app,
            "s3",
            json!({"bucket": "docs", "endpoint": allowed, "access_key_id": "a", "secret_access_key": "b"}),
        )
        .await;
        assert_eq!(response.status(), 201, "{allowed}");
    }
    for refused in [
        json!({"bucket": "docs", "endpoint": "https://attacker.example", "access_key_id": "a", "secret_access_key": "b"}),
        json!({"bucket": "docs", "endpoint": "http://127.0.0.1:39501"}),
    ] {
        let message = assert_error(
            register(&app, "s3", refused.clone()).await,
            422,
            "invalid_request",
        )
        .await;
        assert!(
            message.contains("ACTIVEKG_CONNECTOR_ENDPOINTS"),
            "{refused}: {message}"
        );
    }
    let message = assert_error(
        register(
            &app,
            "gcs",
            json!({"bucket": "docs", "pubsub_endpoint": "https://attacker.example", "credentials_json": "{}"}),
        )
        .await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains("pubsub_endpoint"), "{message}");
    app.stop().await;
}

#[tokio::test]
async fn serve_refuses_to_start_with_development_switches_and_a_production_database() {
    let mut child = crate::helpers::spawn_serve(&[
        (
            "ACTIVEKG_DSN",
            "postgres://activekg:secret@db.internal.example:5432/kg".to_owned(),
        ),
        ("CONNECTOR_KEK_V1", crate::helpers::KEK.to_owned()),
        ("ADMIN_TOKEN", crate::helpers::ADMIN_TOKEN.to_owned()),
        (
            "ACTIVEKG_LISTEN",
            format!("127.0.0.1:{}", crate::helpers::free_port()),
        ),
        ("ACTIVEKG_ADMIN_AUTH_DISABLED", "true".to_owned()),
        ("PUBSUB_ALLOW_UNAUTHENTICATED", "true".to_owned()),
    ]);
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .expect("serve exits at once")
        .unwrap();
    assert_eq!(status.code(), Some(78), "bad configuration");
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr)
        .await
        .unwrap();
    for name in [
        "ACTIVEKG_ADMIN_AUTH_DISABLED",
        "PUBSUB_ALLOW_UNAUTHENTICATED",
    ] {
        assert!(
            stderr.contains(name) && stderr.contains("development-only"),
            "{stderr}"
        );
    }
    assert!(
        !stderr.contains("secret"),
        "the DSN's password is not printed: {stderr}"
    );
}
