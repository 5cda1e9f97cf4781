//! The connector registry: each tenant's connector configurations, validated on the way in, sealed at rest,
//! redacted on the way out, and cached for workers with cross-process invalidation.
//!
//! It joins `store` (rows), `crypto` (sealing) and `connectors` (typed configs) so that neither the API nor the
//! jobs handle ciphertexts or SQL themselves.

mod cache;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::connectors::config::Confinement;
use crate::connectors::{ConnectorConfig, secret_fields};
use crate::crypto::{self, FieldError, Keyring, Rotation};
use crate::domain::{Provider, TenantId};
use crate::error::{Error, Result};
use crate::metrics::metrics;
use crate::store::connectors::{self as store, ConnectorRow, RotationScope};
use cache::Cache;

/// A connector as workers use it: decrypted and typed.
#[derive(Debug, Clone)]
pub struct Connector {
    /// Tenant.
    pub tenant_id: TenantId,
    /// Provider.
    pub provider: Provider,
    /// Its configuration, secrets in the clear (typed so they never print). Shared, so backends built
    /// from it can be reused until it changes.
    pub config: Arc<ConnectorConfig>,
    /// Whether ingestion runs for it.
    pub enabled: bool,
}

/// A connector as operators see it: secrets shown as `"<redacted>"`.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectorSummary {
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    pub provider: Provider,
    /// Configuration with secret fields redacted.
    pub config: Map<String, Value>,
    /// Whether ingestion runs for it.
    pub enabled: bool,
    /// Key version its secrets are encrypted with.
    pub key_version: u32,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// Why a stored configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A secret does not decrypt (key missing or wrong); an operator must fix the keys or re-register.
    #[error("the {provider} connector of tenant {tenant_id} cannot be used: {error}")]
    Undecryptable {
        /// Tenant.
        tenant_id: String,
        /// Provider.
        provider: Provider,
        /// The field and why.
        error: FieldError,
    },
    /// The stored document no longer validates (it was edited by hand, or the schema moved on).
    #[error("the {provider} connector of tenant {tenant_id} is invalid: {message}")]
    Invalid {
        /// Tenant.
        tenant_id: String,
        /// Provider.
        provider: Provider,
        /// What is wrong.
        message: String,
    },
    /// The database failed.
    #[error(transparent)]
    Database(#[from] Error),
}

/// A tenant whose connector reads a bucket, as event routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSubscriber {
    /// Tenant.
    pub tenant_id: String,
    /// Only keys under this prefix are the tenant's.
    pub prefix: String,
    /// Topics allowed to deliver (empty: any).
    pub topic_allowlist: Vec<String>,
}

/// A row a rotation could not re-encrypt (left untouched).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationFailure {
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    pub provider: String,
    /// The field that does not decrypt.
    pub field: String,
    /// Why.
    pub reason: String,
    /// The key version the row stays at.
    pub key_version: u32,
}

/// A row a rotation moved, and from which key version to which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotatedRow {
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    pub provider: String,
    /// The version its secrets were sealed with.
    pub from_version: u32,
    /// The version they are sealed with now.
    pub to_version: u32,
}

/// What one rotation batch did.
#[derive(Debug, Clone, Default)]
pub struct RotationBatch {
    /// Rows looked at.
    pub rows: usize,
    /// Rows re-encrypted with the active key.
    pub rotated: u64,
    /// Rows with no secrets to re-encrypt (only their version moved).
    pub skipped: u64,
    /// Rows left untouched because a secret does not decrypt.
    pub failed: Vec<RotationFailure>,
    /// Rows moved to the active key (rotated and skipped alike).
    pub moved: Vec<RotatedRow>,
    /// The last row looked at: the cursor for the next batch.
    pub last: Option<(String, String)>,
}

/// See the module docs.
#[derive(Debug)]
pub struct Registry {
    pool: PgPool,
    keyring: Arc<Keyring>,
    confinement: Confinement,
    cache: Cache,
}

fn as_object(value: Value, what: &str) -> Result<Map<String, Value>> {
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(Error::Invalid(format!("{what} must be a JSON object"))),
    }
}

/// Takes `enabled` out of a document: it is a column, not part of the configuration.
fn take_enabled(doc: &mut Map<String, Value>) -> Result<Option<bool>> {
    match doc.remove("enabled") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(enabled)) => Ok(Some(enabled)),
        Some(_) => Err(Error::Invalid("enabled must be true or false".to_owned())),
    }
}

fn provider_of(row: &ConnectorRow) -> Result<Provider> {
    row.provider
        .parse()
        .map_err(|e: String| Error::Internal(anyhow::anyhow!(e)))
}

impl Registry {
    /// A registry over `pool` sealing with `keyring`, without confinement (tests, tools).
    pub fn new(pool: PgPool, keyring: Arc<Keyring>) -> Self {
        Self::confined(pool, keyring, Confinement::default())
    }

    /// A registry whose configurations must stay within `confinement`.
    pub fn confined(pool: PgPool, keyring: Arc<Keyring>, confinement: Confinement) -> Self {
        Self {
            pool,
            keyring,
            confinement,
            cache: Cache::new(std::time::Duration::from_secs(30)),
        }
    }

    fn validate(&self, provider: Provider, doc: &Map<String, Value>) -> Result<ConnectorConfig> {
        let config = ConnectorConfig::parse(provider, doc).map_err(Error::Invalid)?;
        self.confinement.check(&config).map_err(Error::Invalid)?;
        Ok(config)
    }

    /// The key version new secrets are sealed with.
    pub fn active_key_version(&self) -> u32 {
        self.keyring.active_version()
    }

    fn summarize(&self, row: ConnectorRow) -> Result<ConnectorSummary> {
        let provider = provider_of(&row)?;
        let mut config = as_object(row.config, "the stored configuration")?;
        crypto::redact_fields(&mut config, secret_fields(provider));
        Ok(ConnectorSummary {
            tenant_id: row.tenant_id,
            provider,
            config,
            enabled: row.enabled,
            key_version: row.key_version as u32,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }

    /// Validates and seals `config`, then stores it as the tenant's connector for `provider`.
    pub async fn register(
        &self,
        tenant: &TenantId,
        provider: Provider,
        config: Value,
    ) -> Result<ConnectorSummary> {
        let mut doc = as_object(config, "config")?;
        let enabled = take_enabled(&mut doc)?.unwrap_or(true);
        self.validate(provider, &doc)?;
        let version = crypto::seal_fields(&mut doc, secret_fields(provider), &self.keyring);
        let mut conn = self.pool.acquire().await?;
        let row = store::insert(&mut conn, tenant.as_str(), provider, &Value::Object(doc), enabled, version)
            .await?
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "tenant {tenant} already has a {provider} connector: PATCH /_admin/connectors/{provider}/config to \
                     change it, or DELETE it first"
                ))
            })?;
        self.cache.forget(provider, tenant.as_str());
        metrics().preset_tenant(tenant.as_str(), provider.as_str());
        tracing::info!(tenant = %tenant, %provider, "connector registered");
        self.summarize(row)
    }

    /// Merges `patch` into the stored configuration (top-level keys replace, `null` removes) and re-seals
    /// every secret with the active key.
    pub async fn patch(
        &self,
        tenant: &TenantId,
        provider: Provider,
        patch: Value,
    ) -> Result<ConnectorSummary> {
        let mut patch = as_object(patch, "config")?;
        let enabled = take_enabled(&mut patch)?;
        let mut tx = self.pool.begin().await?;
        let row = store::get(&mut tx, tenant.as_str(), provider, true)
            .await?
            .ok_or_else(|| not_found(tenant, provider))?;
        let mut doc = as_object(row.config, "the stored configuration")?;
        for (key, value) in patch {
            if value.is_null() {
                doc.remove(&key);
            } else {
                doc.insert(key, value);
            }
        }
        // Secrets the patch did not replace are still sealed; open them to validate and re-seal the whole.
        crypto::open_fields(&mut doc, secret_fields(provider), &self.keyring).map_err(|e| {
            Error::Conflict(format!(
                "{e}; send a new value for `{}` in this PATCH to replace it",
                e.field
            ))
        })?;
        self.validate(provider, &doc)?;
        let version = crypto::seal_fields(&mut doc, secret_fields(provider), &self.keyring);
        let row = store::update(
            &mut tx,
            tenant.as_str(),
            provider,
            &Value::Object(doc),
            enabled.unwrap_or(row.enabled),
            version,
        )
        .await?;
        tx.commit().await?;
        self.cache.forget(provider, tenant.as_str());
        tracing::info!(tenant = %tenant, %provider, "connector updated");
        self.summarize(row)
    }

    /// Turns ingestion for a connector on or off.
    pub async fn set_enabled(
        &self,
        tenant: &TenantId,
        provider: Provider,
        enabled: bool,
    ) -> Result<ConnectorSummary> {
        let mut tx = self.pool.begin().await?;
        let row = store::get(&mut tx, tenant.as_str(), provider, true)
            .await?
            .ok_or_else(|| not_found(tenant, provider))?;
        let row = store::update(
            &mut tx,
            tenant.as_str(),
            provider,
            &row.config,
            enabled,
            row.key_version as u32,
        )
        .await?;
        tx.commit().await?;
        self.cache.forget(provider, tenant.as_str());
        tracing::info!(tenant = %tenant, %provider, enabled, "connector switched");
        self.summarize(row)
    }

    /// Deletes a connector.
    pub async fn delete(&self, tenant: &TenantId, provider: Provider) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        if !store::delete(&mut conn, tenant.as_str(), provider).await? {
            return Err(not_found(tenant, provider));
        }
        self.cache.forget(provider, tenant.as_str());
        tracing::info!(tenant = %tenant, %provider, "connector deleted");
        Ok(())
    }

    /// One connector, redacted.
    pub async fn summary(&self, tenant: &TenantId, provider: Provider) -> Result<ConnectorSummary> {
        let mut conn = self.pool.acquire().await?;
        let row = store::get(&mut conn, tenant.as_str(), provider, false)
            .await?
            .ok_or_else(|| not_found(tenant, provider))?;
        self.summarize(row)
    }

    /// Connectors, redacted, optionally of one tenant and/or provider.
    pub async fn summaries(
        &self,
        tenant: Option<&TenantId>,
        provider: Option<Provider>,
    ) -> Result<Vec<ConnectorSummary>> {
        store::list(&self.pool, tenant.map(TenantId::as_str), provider)
            .await?
            .into_iter()
            .map(|row| self.summarize(row))
            .collect()
    }

    /// Enabled GCS connectors that pull from a Pub/Sub subscription, decrypted (the subscriber needs their
    /// credentials). Connectors that do not open are logged and left out.
    pub async fn pulling_connectors(&self) -> Result<Vec<Arc<Connector>>> {
        let mut connectors = Vec::new();
        for tenant in store::pulling_tenants(&self.pool).await? {
            let Ok(tenant) = TenantId::parse(&tenant) else {
                continue;
            };
            match self.load(&tenant, Provider::Gcs).await {
                Ok(Some(connector)) if connector.enabled => connectors.push(connector),
                Ok(_) => {}
                Err(LoadError::Database(e)) => return Err(e),
                Err(e) => {
                    tracing::error!(tenant = %tenant, error = %e, "GCS connector does not open; its subscription is not pulled")
                }
            }
        }
        Ok(connectors)
    }

    /// Every tenant whose `provider` connector reads `bucket`, with what event routing needs (prefix and
    /// topic allowlist: no secrets, so nothing is decrypted).
    pub async fn bucket_subscribers(
        &self,
        provider: Provider,
        bucket: &str,
    ) -> Result<Vec<BucketSubscriber>> {
        Ok(store::by_bucket(&self.pool, provider, bucket)
            .await?
            .into_iter()
            .map(|row| BucketSubscriber {
                prefix: row
                    .config
                    .get("prefix")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                topic_allowlist: row
                    .config
                    .get("topic_allowlist")
                    .and_then(Value::as_array)
                    .map(|topics| {
                        topics
                            .iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
                tenant_id: row.tenant_id,
            })
            .collect())
    }

    /// Whether some enabled `provider` connector allows `topic` (names it in its `topic_allowlist`).
    pub async fn topic_allowed(&self, provider: Provider, topic: &str) -> Result<bool> {
        store::topic_allowed(&self.pool, provider, topic).await
    }

    /// A connector decrypted and typed, through the cache; `None` when the tenant has none.
    pub async fn load(
        &self,
        tenant: &TenantId,
        provider: Provider,
    ) -> Result<Option<Arc<Connector>>, LoadError> {
        if let Some(hit) = self.cache.get(provider, tenant.as_str()) {
            return Ok(hit);
        }
        let mut conn = self.pool.acquire().await.map_err(Error::from)?;
        let row = store::get(&mut conn, tenant.as_str(), provider, false).await?;
        let loaded = match row {
            None => None,
            Some(row) => Some(Arc::new(self.open(tenant, provider, row)?)),
        };
        self.cache.put(provider, tenant.as_str(), loaded.clone());
        Ok(loaded)
    }

    fn open(
        &self,
        tenant: &TenantId,
        provider: Provider,
        row: ConnectorRow,
    ) -> Result<Connector, LoadError> {
        let invalid = |message: String| LoadError::Invalid {
            tenant_id: tenant.to_string(),
            provider,
            message,
        };
        let mut doc = as_object(row.config, "the stored configuration")
            .map_err(|e| invalid(e.to_string()))?;
        if let Err(error) = crypto::open_fields(&mut doc, secret_fields(provider), &self.keyring) {
            metrics()
                .config_decrypt_failures
                .with_label_values(&[provider.as_str(), &error.field])
                .inc();
            tracing::error!(tenant = %tenant, %provider, field = %error.field, error = %error.error,
                "connector config does not decrypt");
            return Err(LoadError::Undecryptable {
                tenant_id: tenant.to_string(),
                provider,
                error,
            });
        }
        let config = ConnectorConfig::parse(provider, &doc).map_err(invalid)?;
        Ok(Connector {
            tenant_id: tenant.clone(),
            provider,
            config: Arc::new(config),
            enabled: row.enabled,
        })
    }

    /// Follows configuration changes heard on the process's LISTEN hub (`store::connectors::NOTIFY_CHANNEL`), dropping
    /// cache entries when any process changes a configuration.
    pub fn follow_changes(
        self: &Arc<Self>,
        hub: Arc<crate::store::listen::Hub>,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let registry = self.clone();
        tokio::spawn(async move { registry.cache.follow(&hub, stop).await })
    }

    /// Whether the change listener is connected (while it is not, the cache is bypassed).
    pub fn listening(&self) -> bool {
        self.cache.listening()
    }

    /// The connector, for an action that needs it: a missing one is `NotFound`, one whose configuration
    /// cannot be read (a key gone, a broken row) a `Conflict` saying why.
    pub async fn require(&self, tenant: &TenantId, provider: Provider) -> Result<Arc<Connector>> {
        match self.load(tenant, provider).await {
            Ok(Some(connector)) => Ok(connector),
            Ok(None) => Err(not_found(tenant, provider)),
            Err(LoadError::Database(e)) => Err(e),
            Err(e) => Err(Error::Conflict(e.to_string())),
        }
    }

    /// How many rows of `scope` are not at the active key version.
    pub async fn count_behind(&self, scope: &RotationScope) -> Result<u64> {
        store::count_behind(&self.pool, scope, self.keyring.active_version()).await
    }

    /// The rows of `scope` a rotation would leave behind because a secret does not decrypt (at most
    /// `limit` of them, and how many in all), found the way a rotation finds them, writing nothing.
    pub async fn failing_rows(
        &self,
        scope: &RotationScope,
        limit: usize,
    ) -> Result<(u64, Vec<RotationFailure>)> {
        const PAGE: i64 = 500;
        let active = self.keyring.active_version();
        let mut conn = self.pool.acquire().await?;
        let (mut total, mut failures) = (0_u64, Vec::new());
        let mut after: Option<(String, String)> = None;
        loop {
            let rows = store::read_behind(&mut conn, scope, active, after.as_ref(), PAGE).await?;
            let Some(last) = rows.last() else { break };
            after = Some((last.tenant_id.clone(), last.provider.clone()));
            let full = rows.len() as i64 == PAGE;
            for row in rows {
                let provider = provider_of(&row)?;
                let doc = as_object(row.config.clone(), "the stored configuration")?;
                if let Rotation::Failed(error) =
                    crypto::rotate(&doc, secret_fields(provider), &self.keyring)
                {
                    total += 1;
                    if failures.len() < limit {
                        failures.push(RotationFailure {
                            tenant_id: row.tenant_id,
                            provider: row.provider,
                            field: error.field,
                            reason: error.error.to_string(),
                            key_version: u32::try_from(row.key_version).unwrap_or_default(),
                        });
                    }
                }
            }
            if !full {
                break;
            }
        }
        Ok((total, failures))
    }

    /// Re-encrypts up to `limit` rows of `scope` after `after` with the active key, in the caller's
    /// transaction. Rows whose secrets do not decrypt are reported and left exactly as they are.
    pub async fn rotate_batch(
        &self,
        conn: &mut PgConnection,
        scope: &RotationScope,
        after: Option<&(String, String)>,
        limit: i64,
    ) -> Result<RotationBatch> {
        let active = self.keyring.active_version();
        let rows = store::lock_behind(conn, scope, active, after, limit).await?;
        let mut batch = RotationBatch {
            rows: rows.len(),
            last: rows
                .last()
                .map(|r| (r.tenant_id.clone(), r.provider.clone())),
            ..RotationBatch::default()
        };
        for row in rows {
            let provider = provider_of(&row)?;
            let doc = as_object(row.config.clone(), "the stored configuration")?;
            let from_version = u32::try_from(row.key_version).unwrap_or_default();
            let stored = match crypto::rotate(&doc, secret_fields(provider), &self.keyring) {
                Rotation::Rotated(rotated) => {
                    batch.rotated += 1;
                    Value::Object(rotated)
                }
                Rotation::NothingSealed => {
                    batch.skipped += 1;
                    row.config
                }
                Rotation::Failed(error) => {
                    metrics()
                        .config_decrypt_failures
                        .with_label_values(&[provider.as_str(), &error.field])
                        .inc();
                    tracing::error!(tenant = %row.tenant_id, %provider, field = %error.field, error = %error.error,
                        "cannot rotate a connector config: a secret does not decrypt; left untouched");
                    batch.failed.push(RotationFailure {
                        tenant_id: row.tenant_id,
                        provider: row.provider,
                        field: error.field,
                        reason: error.error.to_string(),
                        key_version: from_version,
                    });
                    continue;
                }
            };
            store::store_rotated(conn, &row.tenant_id, &row.provider, &stored, active).await?;
            tracing::info!(tenant = %row.tenant_id, %provider, from_version, to_version = active,
                "connector config moved to the active key");
            batch.moved.push(RotatedRow {
                tenant_id: row.tenant_id,
                provider: row.provider,
                from_version,
                to_version: active,
            });
        }
        Ok(batch)
    }
}

/// The error for a connector that does not exist.
pub fn not_found(tenant: &TenantId, provider: Provider) -> Error {
    Error::NotFound {
        what: "connector",
        id: format!("{provider} of tenant {tenant}"),
    }
}
