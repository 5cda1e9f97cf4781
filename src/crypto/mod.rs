//! Secrets at rest: a versioned Fernet keyring (`CONNECTOR_KEK_V1..Vn`, `CONNECTOR_KEK_ACTIVE_VERSION`), the
//! sealed-field envelope that records which key made each ciphertext, and rotation as a pure function.
//!
//! Pure: no I/O. Callers say which fields of a JSON document are secret; this room never needs to know what
//! a connector is.

use std::collections::BTreeMap;
use std::fmt;

use fernet::Fernet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::KeyEncryptionKeys;

/// A secret field as stored: the Fernet token and the version of the key that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The key version (`CONNECTOR_KEK_V<n>`) that encrypted this field.
    pub kek_version: u32,
    /// The Fernet token.
    pub ciphertext: String,
}

impl Sealed {
    /// Reads a stored field as a sealed value, if that is what it is.
    pub fn from_value(value: &Value) -> Option<Self> {
        serde_json::from_value(value.clone()).ok()
    }
}

/// Why a sealed field could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The key version that sealed it is not configured (any more).
    #[error(
        "it was encrypted with key version {0}, which is not configured (set CONNECTOR_KEK_V{0})"
    )]
    MissingKey(u32),
    /// The key is configured but the token does not verify: wrong key material, or a corrupted value.
    #[error(
        "it does not decrypt with key version {0} (a different key with the same version, or a corrupted value)"
    )]
    Corrupt(u32),
    /// The field holds something that is not a sealed value.
    #[error("it is not an encrypted value")]
    NotSealed,
}

/// Every configured key-encryption key, and which one encrypts.
pub struct Keyring {
    keys: BTreeMap<u32, Fernet>,
    active: u32,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

impl Keyring {
    /// Builds the keyring from validated settings.
    pub fn new(kek: &KeyEncryptionKeys) -> Result<Self, String> {
        let mut keys = BTreeMap::new();
        for (version, secret) in &kek.keys {
            let fernet = Fernet::new(secret.expose())
                .ok_or_else(|| format!("CONNECTOR_KEK_V{version} is not a valid Fernet key"))?;
            keys.insert(*version, fernet);
        }
        if !keys.contains_key(&kek.active_version) {
            return Err(format!(
                "CONNECTOR_KEK_V{v} is missing: CONNECTOR_KEK_ACTIVE_VERSION={v} must name a configured key",
                v = kek.active_version
            ));
        }
        Ok(Self {
            keys,
            active: kek.active_version,
        })
    }

    /// The version new ciphertexts are made with.
    pub fn active_version(&self) -> u32 {
        self.active
    }

    /// Encrypts with the active key.
    pub fn seal(&self, plaintext: &str) -> Sealed {
        Sealed {
            kek_version: self.active,
            ciphertext: self.keys[&self.active].encrypt(plaintext.as_bytes()),
        }
    }

    /// Decrypts with the key version the value records.
    pub fn open(&self, sealed: &Sealed) -> Result<String, OpenError> {
        let key = self
            .keys
            .get(&sealed.kek_version)
            .ok_or(OpenError::MissingKey(sealed.kek_version))?;
        let bytes = key
            .decrypt(&sealed.ciphertext)
            .map_err(|_| OpenError::Corrupt(sealed.kek_version))?;
        String::from_utf8(bytes).map_err(|_| OpenError::Corrupt(sealed.kek_version))
    }
}

/// A secret field that could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret field `{field}` cannot be read: {error}")]
pub struct FieldError {
    /// The field.
    pub field: String,
    /// Why.
    pub error: OpenError,
}

/// Replaces each present secret field's plaintext with its sealed form; returns the key version used.
/// A field that is already sealed is left as it is.
pub fn seal_fields(doc: &mut Map<String, Value>, secret_fields: &[&str], keyring: &Keyring) -> u32 {
    for field in secret_fields {
        if let Some(Value::String(plaintext)) = doc.get(*field) {
            let sealed = keyring.seal(plaintext);
            doc.insert(
                (*field).to_owned(),
                serde_json::to_value(sealed).unwrap_or(Value::Null),
            );
        }
    }
    keyring.active_version()
}

/// Replaces each sealed secret field with its plaintext.
pub fn open_fields(
    doc: &mut Map<String, Value>,
    secret_fields: &[&str],
    keyring: &Keyring,
) -> Result<(), FieldError> {
    for field in secret_fields {
        let Some(value) = doc.get(*field) else {
            continue;
        };
        if value.is_null() {
            continue;
        }
        let sealed = Sealed::from_value(value).ok_or_else(|| FieldError {
            field: (*field).to_owned(),
            error: OpenError::NotSealed,
        })?;
        let plaintext = keyring.open(&sealed).map_err(|error| FieldError {
            field: (*field).to_owned(),
            error,
        })?;
        doc.insert((*field).to_owned(), Value::String(plaintext));
    }
    Ok(())
}

/// Replaces every secret field's value (sealed or not) with `"<redacted>"`, for display.
pub fn redact_fields(doc: &mut Map<String, Value>, secret_fields: &[&str]) {
    for field in secret_fields {
        if let Some(value) = doc.get_mut(*field)
            && !value.is_null()
        {
            *value = Value::String("<redacted>".to_owned());
        }
    }
}

/// What rotating one stored document comes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Rotation {
    /// Every secret re-sealed with the active key.
    Rotated(Map<String, Value>),
    /// Nothing to re-seal (no secret fields present); only the row's version moves.
    NothingSealed,
    /// A secret could not be opened; the document must be left exactly as it is.
    Failed(FieldError),
}

/// Re-seals every secret field of a stored document under the active key. Each field is opened with the
/// version it records, so rotating twice never encrypts a ciphertext.
pub fn rotate(doc: &Map<String, Value>, secret_fields: &[&str], keyring: &Keyring) -> Rotation {
    let mut open = doc.clone();
    if let Err(error) = open_fields(&mut open, secret_fields, keyring) {
        return Rotation::Failed(error);
    }
    let present = secret_fields
        .iter()
        .any(|f| open.get(*f).is_some_and(|v| !v.is_null()));
    if !present {
        return Rotation::NothingSealed;
    }
    seal_fields(&mut open, secret_fields, keyring);
    Rotation::Rotated(open)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use serde_json::json;

    const V1: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
    const V2: &str = "5mHtEP6IXbNDdmbmm2HkIW9r8LdmXV-Qx_tsXShOZUA=";
    const FIELDS: &[&str] = &["secret_access_key", "access_key_id"];

    fn keyring(keys: &[(u32, &str)], active: u32) -> Keyring {
        Keyring::new(&KeyEncryptionKeys {
            keys: keys.iter().map(|(v, k)| (*v, Secret::new(*k))).collect(),
            active_version: active,
        })
        .unwrap()
    }

    fn doc(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_sealed_field_opens_to_its_plaintext_and_records_its_key() {
        let ring = keyring(&[(1, V1)], 1);
        let sealed = ring.seal("AKIAEXAMPLE");
        assert_eq!(sealed.kek_version, 1);
        assert_ne!(sealed.ciphertext, "AKIAEXAMPLE");
        assert_eq!(ring.open(&sealed).unwrap(), "AKIAEXAMPLE");
    }

    #[test]
    fn fields_seal_and_open_in_place_leaving_the_rest_alone() {
        let ring = keyring(&[(1, V1)], 1);
        let mut config =
            doc(json!({"bucket": "b", "secret_access_key": "s3cr3t", "access_key_id": "AKIA"}));
        seal_fields(&mut config, FIELDS, &ring);
        assert_eq!(config["bucket"], "b");
        assert!(!config.values().any(|v| v == "s3cr3t" || v == "AKIA"));
        open_fields(&mut config, FIELDS, &ring).unwrap();
        assert_eq!(
            config,
            doc(json!({"bucket": "b", "secret_access_key": "s3cr3t", "access_key_id": "AKIA"}))
        );
    }

    #[test]
    fn a_value_sealed_with_an_old_key_still_opens_with_it() {
        let old = keyring(&[(1, V1)], 1).seal("kept");
        let ring = keyring(&[(1, V1), (2, V2)], 2);
        assert_eq!(ring.open(&old).unwrap(), "kept");
        assert_eq!(ring.seal("new").kek_version, 2);
    }

    #[test]
    fn rotation_reseals_under_the_active_key_and_is_idempotent() {
        let mut stored = doc(json!({"bucket": "b", "secret_access_key": "s3cr3t"}));
        seal_fields(&mut stored, FIELDS, &keyring(&[(1, V1)], 1));
        let ring = keyring(&[(1, V1), (2, V2)], 2);
        let Rotation::Rotated(once) = rotate(&stored, FIELDS, &ring) else {
            panic!("rotates")
        };
        assert_eq!(
            Sealed::from_value(&once["secret_access_key"])
                .unwrap()
                .kek_version,
            2
        );
        let Rotation::Rotated(twice) = rotate(&once, FIELDS, &ring) else {
            panic!("rotates again")
        };
        let mut opened = twice.clone();
        open_fields(&mut opened, FIELDS, &ring).unwrap();
        assert_eq!(
            opened["secret_access_key"], "s3cr3t",
            "never a ciphertext of a ciphertext"
        );
    }

    #[test]
    fn a_value_from_a_missing_key_fails_rotation_and_names_the_field() {
        let mut stored = doc(json!({"secret_access_key": "s3cr3t"}));
        seal_fields(&mut stored, FIELDS, &keyring(&[(3, V1)], 3));
        let ring = keyring(&[(1, V1), (2, V2)], 2);
        match rotate(&stored, FIELDS, &ring) {
            Rotation::Failed(FieldError { field, error }) => {
                assert_eq!(field, "secret_access_key");
                assert_eq!(error, OpenError::MissingKey(3));
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_value_sealed_with_other_key_material_is_reported_as_corrupt() {
        let mut stored = doc(json!({"secret_access_key": "s3cr3t"}));
        seal_fields(&mut stored, FIELDS, &keyring(&[(1, V2)], 1));
        let err = open_fields(&mut stored, FIELDS, &keyring(&[(1, V1)], 1)).unwrap_err();
        assert_eq!(err.error, OpenError::Corrupt(1));
    }

    #[test]
    fn a_document_without_secrets_has_nothing_to_reseal() {
        let ring = keyring(&[(1, V1)], 1);
        assert_eq!(
            rotate(&doc(json!({"bucket": "b"})), FIELDS, &ring),
            Rotation::NothingSealed
        );
    }

    #[test]
    fn redaction_hides_plain_and_sealed_values() {
        let ring = keyring(&[(1, V1)], 1);
        let mut config =
            doc(json!({"secret_access_key": "x", "access_key_id": "AKIA", "bucket": "b"}));
        seal_fields(&mut config, &FIELDS[..1], &ring);
        redact_fields(&mut config, FIELDS);
        assert_eq!(
            config,
            doc(
                json!({"secret_access_key": "<redacted>", "access_key_id": "<redacted>", "bucket": "b"})
            )
        );
    }

    #[test]
    fn the_keyring_debug_output_shows_versions_only() {
        let debug = format!("{:?}", keyring(&[(1, V1), (2, V2)], 2));
        assert!(!debug.contains(V1) && !debug.contains(V2));
        assert!(debug.contains("active: 2"));
    }
}
