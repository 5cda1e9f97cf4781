//! A directory on the worker's disk, for a quickstart without any cloud. Keys are `/`-separated paths
//! relative to the directory; a key can never reach outside it (no `..`, no absolute paths, no symlinks
//! out of the tree).

use std::path::{Component, Path, PathBuf};
use std::time::UNIX_EPOCH;

use tokio::io::AsyncReadExt;

use super::config::LocalConfig;
use super::source::{ObjectMeta, ObjectSource, Page, SourceError};

/// Files a listing cannot offer, as `(name as best shown, why)` (see `Page::refused`).
type Refused = Vec<(String, String)>;

/// A folder of files.
#[derive(Debug, Clone)]
pub struct LocalSource {
    root: PathBuf,
}

impl LocalSource {
    /// The configured folder.
    pub fn new(config: &LocalConfig) -> Self {
        Self {
            root: PathBuf::from(&config.path),
        }
    }

    /// The file behind `key`, checked to stay inside the root.
    fn path(&self, key: &str) -> Result<PathBuf, SourceError> {
        let relative = Path::new(key);
        if key.is_empty()
            || !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(SourceError::Invalid(format!(
                "{key:?} is not a relative path inside the folder"
            )));
        }
        Ok(self.root.join(relative))
    }

    async fn meta(&self, key: &str, path: &Path) -> Result<Option<ObjectMeta>, SourceError> {
        let metadata = match tokio::fs::metadata(path).await {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(key, e)),
        };
        // Symlinks are followed only while they stay inside the folder.
        let real = tokio::fs::canonicalize(path)
            .await
            .map_err(|e| io_error(key, e))?;
        let root = tokio::fs::canonicalize(&self.root)
            .await
            .map_err(|e| io_error(key, e))?;
        if !real.starts_with(&root) {
            return Err(SourceError::Denied(format!(
                "{key} points outside the folder"
            )));
        }
        let modified = metadata.modified().ok();
        let nanos = modified
            .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(Some(ObjectMeta {
            key: key.to_owned(),
            version: format!("{nanos:x}-{:x}", metadata.len()),
            size: metadata.len(),
            content_type: None,
            updated: modified.map(chrono::DateTime::from),
        }))
    }

    /// Every file key under the root, sorted, and the files whose names cannot be keys (not UTF-8).
    fn walk(&self) -> Result<(Vec<String>, Refused), SourceError> {
        let mut keys = Vec::new();
        let mut refused = Vec::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == self.root => {
                    return Err(SourceError::NotFound(format!(
                        "folder {} does not exist",
                        self.root.display()
                    )));
                }
                Err(e) => return Err(io_error(&dir.display().to_string(), e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io_error(&dir.display().to_string(), e))?;
                let kind = entry
                    .file_type()
                    .map_err(|e| io_error(&dir.display().to_string(), e))?;
                if kind.is_dir() {
                    dirs.push(entry.path());
                } else if kind.is_file()
                    && let Ok(relative) = entry.path().strip_prefix(&self.root)
                {
                    let key: Option<Vec<&str>> = relative
                        .components()
                        .map(|c| c.as_os_str().to_str())
                        .collect();
                    match key {
                        Some(parts) => keys.push(parts.join("/")),
                        None => refused.push((
                            relative.to_string_lossy().into_owned(),
                            "the file name is not UTF-8, so it cannot be an object key".to_owned(),
                        )),
                    }
                }
            }
        }
        keys.sort();
        refused.sort();
        Ok((keys, refused))
    }
}

fn io_error(what: &str, err: std::io::Error) -> SourceError {
    match err.kind() {
        std::io::ErrorKind::NotFound => SourceError::NotFound(format!("{what}: {err}")),
        std::io::ErrorKind::PermissionDenied => SourceError::Denied(format!("{what}: {err}")),
        _ => SourceError::Unavailable(format!("{what}: {err}")),
    }
}

impl ObjectSource for LocalSource {
    async fn stat(&self, key: &str) -> Result<Option<ObjectMeta>, SourceError> {
        let path = self.path(key)?;
        self.meta(key, &path).await
    }

    async fn fetch(&self, wanted: &ObjectMeta, max_bytes: u64) -> Result<Vec<u8>, SourceError> {
        let key = &wanted.key;
        let path = self.path(key)?;
        let meta = self
            .meta(key, &path)
            .await?
            .ok_or_else(|| SourceError::NotFound(key.to_owned()))?;
        if meta.version != wanted.version {
            return Err(SourceError::Changed(format!(
                "{key} is version {} now, not {}",
                meta.version, wanted.version
            )));
        }
        if meta.size > max_bytes {
            return Err(SourceError::TooLarge {
                size: meta.size,
                limit: max_bytes,
            });
        }
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_error(key, e))?;
        // The file may grow between stat and read: never read more than the cap allows.
        let mut buffer = Vec::with_capacity(meta.size as usize);
        file.take(max_bytes + 1)
            .read_to_end(&mut buffer)
            .await
            .map_err(|e| io_error(key, e))?;
        if buffer.len() as u64 > max_bytes {
            return Err(SourceError::TooLarge {
                size: buffer.len() as u64,
                limit: max_bytes,
            });
        }
        // A file has no conditional read: what was read is that version only if it is still that version.
        match self.meta(key, &path).await? {
            Some(after) if after.version == wanted.version => Ok(buffer),
            _ => Err(SourceError::Changed(format!(
                "{key} changed while it was being read"
            ))),
        }
    }

    async fn list(
        &self,
        prefix: &str,
        page_token: Option<&str>,
        page_size: u32,
    ) -> Result<Page, SourceError> {
        let source = self.clone();
        let (keys, mut refused) = tokio::task::spawn_blocking(move || source.walk())
            .await
            .map_err(|e| SourceError::Unavailable(format!("listing failed: {e}")))??;
        // Names that are not keys are reported with the first page only.
        if page_token.is_some() {
            refused.clear();
        }
        let mut objects = Vec::new();
        let mut remaining = keys
            .into_iter()
            .filter(|k| k.starts_with(prefix))
            .filter(|k| page_token.is_none_or(|after| k.as_str() > after));
        for key in remaining.by_ref() {
            let path = self.path(&key)?;
            match self.meta(&key, &path).await {
                Ok(Some(meta)) => objects.push(meta),
                Ok(None) => {}
                Err(SourceError::Denied(reason)) => {
                    tracing::warn!(%reason, "skipping a file the folder may not serve")
                }
                Err(err) => return Err(err),
            }
            if objects.len() as u32 >= page_size.max(1) {
                break;
            }
        }
        let next_token = if remaining.next().is_some() {
            objects.last().map(|o| o.key.clone())
        } else {
            None
        };
        Ok(Page {
            objects,
            next_token,
            refused,
        })
    }
}
