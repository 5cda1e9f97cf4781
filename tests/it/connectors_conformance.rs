//! One conformance suite every storage backend passes: S3 against moto, GCS against fake-gcs-server, and
//! the local folder on a temporary directory.

use activekg::connectors::config::{GcsConfig, LocalConfig, S3Config};
use activekg::connectors::gcs::GcsSource;
use activekg::connectors::local::LocalSource;
use activekg::connectors::s3::S3Source;
use activekg::connectors::{ObjectMeta, ObjectSource, SourceError};

use crate::emulators;

/// Where the suite writes its objects.
enum Store {
    S3(aws_sdk_s3::Client, String),
    Gcs(String),
    Local(std::path::PathBuf),
}

impl Store {
    async fn put(&self, key: &str, body: &[u8]) {
        match self {
            Store::S3(client, bucket) => emulators::s3_put(client, bucket, key, body, None).await,
            Store::Gcs(bucket) => emulators::gcs_put(bucket, key, body, None).await,
            Store::Local(root) => {
                let path = root.join(key);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, body).unwrap();
            }
        }
    }
}

const OBJECTS: &[(&str, &str)] = &[
    ("docs/a.txt", "alpha"),
    ("docs/b b.md", "# with a space"),
    ("docs/c+plus.json", "{\"plus\": true}"),
    ("docs/deep/d.csv", "x,y\n1,2\n"),
    ("docs/e.txt", "echo echo echo echo"),
    ("docs/ünïcode.txt", "unicode key"),
    ("other/x.txt", "outside the prefix"),
];

async fn conformance<S: ObjectSource>(store: &Store, source: &S) {
    for (key, body) in OBJECTS {
        store.put(key, body.as_bytes()).await;
    }

    let meta = source
        .stat("docs/e.txt")
        .await
        .unwrap()
        .expect("an existing object stats");
    assert_eq!((meta.key.as_str(), meta.size), ("docs/e.txt", 19));
    assert!(!meta.version.is_empty());
    assert!(
        source.stat("docs/missing.txt").await.unwrap().is_none(),
        "a missing object stats as None"
    );

    assert_eq!(
        source
            .fetch(&stat(source, "docs/b b.md").await, 1024)
            .await
            .unwrap(),
        b"# with a space"
    );
    assert_eq!(
        source
            .fetch(&stat(source, "docs/ünïcode.txt").await, 1024)
            .await
            .unwrap(),
        b"unicode key"
    );
    match source.fetch(&meta, 10).await {
        Err(SourceError::TooLarge { size, limit }) => assert!(size > 10 && limit == 10),
        other => panic!("a fetch over the cap is refused with sizes, got {other:?}"),
    }
    let mut gone = meta.clone();
    gone.key = "docs/missing.txt".to_owned();
    assert!(matches!(
        source.fetch(&gone, 1024).await,
        Err(SourceError::NotFound(_))
    ));

    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = source.list("docs/", token.as_deref(), 2).await.unwrap();
        assert!(page.objects.len() <= 2, "pages respect their size");
        keys.extend(page.objects.iter().map(|o| o.key.clone()));
        pages += 1;
        token = page.next_token;
        if token.is_none() {
            break;
        }
        assert!(pages < 20, "the listing ends");
    }
    let mut expected: Vec<String> = OBJECTS
        .iter()
        .map(|(k, _)| (*k).to_owned())
        .filter(|k| k.starts_with("docs/"))
        .collect();
    expected.sort();
    assert_eq!(
        keys, expected,
        "every object under the prefix, once, in key order"
    );
    assert!(pages >= 3, "listed in pages");

    let before = stat(source, "docs/a.txt").await;
    // Local versions include the modification time; make sure the clock moves.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    store.put("docs/a.txt", b"alpha, changed").await;
    let after = source.stat("docs/a.txt").await.unwrap().unwrap();
    assert_ne!(
        after.version.as_str(),
        before.version,
        "a changed object has a new version"
    );
    assert_eq!(after.size, 14);
    assert!(
        matches!(
            source.fetch(&before, 1024).await,
            Err(SourceError::Changed(_))
        ),
        "a fetch of a version the store no longer has is refused, never answered with other content"
    );
    assert_eq!(source.fetch(&after, 1024).await.unwrap(), b"alpha, changed");
}

async fn stat<S: ObjectSource>(source: &S, key: &str) -> ObjectMeta {
    source.stat(key).await.unwrap().expect("the object exists")
}

#[tokio::test]
async fn s3_passes_the_conformance_suite_against_moto() {
    let client = emulators::s3_client().await;
    let bucket = emulators::unique_bucket("conf");
    emulators::s3_bucket(&client, &bucket).await;
    let config: S3Config = serde_json::from_value(emulators::s3_config(&bucket)).unwrap();
    let source = S3Source::new(&config).await;
    conformance(&Store::S3(client, bucket), &source).await;
}

#[tokio::test]
async fn gcs_passes_the_conformance_suite_against_fake_gcs_server() {
    let bucket = emulators::unique_bucket("conf");
    emulators::gcs_bucket(&bucket).await;
    let config: GcsConfig = serde_json::from_value(emulators::gcs_config(&bucket)).unwrap();
    let source = GcsSource::new(&config).await.unwrap();
    conformance(&Store::Gcs(bucket), &source).await;
}

#[tokio::test]
async fn local_folders_pass_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalConfig {
        path: dir.path().display().to_string(),
        prefix: String::new(),
        poll_interval_seconds: None,
    };
    let source = LocalSource::new(&config);
    conformance(&Store::Local(dir.path().to_owned()), &source).await;
}

#[tokio::test]
async fn a_local_key_cannot_reach_outside_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let inside = dir.path().join("in");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::write(dir.path().join("secret.txt"), "outside").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), inside.join("link.txt")).unwrap();
    let source = LocalSource::new(&LocalConfig {
        path: inside.display().to_string(),
        prefix: String::new(),
        poll_interval_seconds: None,
    });
    let forged = |key: &str| ObjectMeta {
        key: key.to_owned(),
        version: "0-0".to_owned(),
        size: 7,
        content_type: None,
        updated: None,
    };
    for key in ["../secret.txt", "/etc/passwd", "a/../../secret.txt"] {
        assert!(
            matches!(source.stat(key).await, Err(SourceError::Invalid(_))),
            "{key}"
        );
        assert!(
            matches!(
                source.fetch(&forged(key), 1024).await,
                Err(SourceError::Invalid(_))
            ),
            "{key}"
        );
    }
    assert!(matches!(
        source.fetch(&forged("link.txt"), 1024).await,
        Err(SourceError::Denied(_))
    ));
    assert!(
        source.list("", None, 10).await.unwrap().objects.is_empty(),
        "the escaping link is not listed"
    );
}
