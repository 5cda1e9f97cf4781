//! Extraction in a child process, so that no file can take the service down: a document that overflows the
//! parser's stack, inflates to gigabytes, or loops forever ends its own child, never the process serving
//! every tenant.
//!
//! The child is this same binary (`activekg extract-child`). It limits itself (memory with `RLIMIT_DATA`,
//! CPU time with `RLIMIT_CPU`) before reading the document, extracts and chunks it, and writes the result as
//! JSON. The parent adds a wall-clock limit, caps what it reads back, and turns every way the child can end
//! into an answer: the chunks, a refusal with the extractor's reason, or what broke (crash, limit, timeout).

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::tokens::WordPiece;
use super::{Chunk, ChunkPolicy, Format};

/// What the child is told before the document's bytes.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    content_type: Option<String>,
    key: String,
    memory_mb: u64,
    cpu_seconds: u64,
}

/// A document's text, chunked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extraction {
    /// The format it was read as.
    pub format: Format,
    /// A title, when the document declares one.
    pub title: Option<String>,
    /// SHA-256 of the whole text, hex.
    pub content_hash: String,
    /// The chunks.
    pub chunks: Vec<Chunk>,
    /// How long the child took to cut the text into chunks (the rest of its time went to reading the file).
    #[serde(default)]
    pub chunk_time: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Ok(Extraction),
    Refused(String),
}

/// Why a document yielded no chunks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// The extractor read the file and refused it (unsupported, corrupt, too much text).
    #[error("{0}")]
    Refused(String),
    /// The file broke the extractor: it crashed, or hit a memory, CPU or time limit.
    #[error("{0}")]
    Broke(String),
    /// The child could not be started or spoken to (a problem of this machine, not of the file).
    #[error("extraction could not run: {0}")]
    Unavailable(String),
}

/// The limits one extraction runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Heap the child may use, in MiB.
    pub memory_mb: u64,
    /// CPU time the child may use.
    pub cpu_seconds: u64,
    /// Wall-clock time before the child is killed.
    pub wall: Duration,
}

/// Runs extractions in child processes of `program` (this binary).
#[derive(Debug, Clone)]
pub struct Sandbox {
    program: PathBuf,
    limits: Limits,
}

/// The most JSON read back from a child: the text's budget, with room for overlap and escaping.
const MAX_ANSWER: usize = 256 << 20;

impl Sandbox {
    /// Children of `program` (usually `std::env::current_exe()`) under `limits`.
    pub fn new(program: PathBuf, limits: Limits) -> Self {
        Self { program, limits }
    }

    /// Extracts and chunks `bytes` in a child.
    pub async fn run(
        &self,
        bytes: Vec<u8>,
        content_type: Option<String>,
        key: &str,
    ) -> Result<Extraction, SandboxError> {
        let request = Request {
            content_type,
            key: key.to_owned(),
            memory_mb: self.limits.memory_mb,
            cpu_seconds: self.limits.cpu_seconds,
        };
        let mut header = serde_json::to_vec(&request)
            .map_err(|e| SandboxError::Unavailable(format!("cannot encode the request: {e}")))?;
        header.push(b'\n');
        let mut child = tokio::process::Command::new(&self.program)
            .arg("extract-child")
            .env_clear()
            .env("RUST_BACKTRACE", "0")
            // mimalloc reserves address space 1 GiB at a time by default, which a memory limit near that
            // size would refuse outright; small steps let the child use its whole allowance.
            .env("MIMALLOC_ARENA_RESERVE", "32MiB")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                SandboxError::Unavailable(format!("cannot start {}: {e}", self.program.display()))
            })?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let talk = async {
            let write = async {
                // A child that dies early closes its end: what it says on the way out explains why.
                let _ = stdin.write_all(&header).await;
                let _ = stdin.write_all(&bytes).await;
                drop(stdin);
            };
            let mut answer = Vec::new();
            let mut limited = (&mut stdout).take(MAX_ANSWER as u64 + 1);
            let read = limited.read_to_end(&mut answer);
            let mut complaint = Vec::new();
            let mut limited_err = (&mut stderr).take(64 * 1024);
            let read_err = limited_err.read_to_end(&mut complaint);
            let (_, read, _) = tokio::join!(write, read, read_err);
            read.map_err(|e| SandboxError::Unavailable(format!("cannot read its answer: {e}")))?;
            let status = reap(&mut child)
                .await
                .map_err(|e| SandboxError::Unavailable(format!("cannot wait for it: {e}")))?;
            Ok::<_, SandboxError>((status, answer, complaint))
        };
        let (status, answer, complaint) = match tokio::time::timeout(self.limits.wall, talk).await {
            Ok(result) => result?,
            Err(_) => {
                let _ = child.start_kill();
                // Bounded: the answer is the same whether or not the exit is seen (kill_on_drop and
                // tokio's orphan reaping take care of a child not yet reaped).
                let _ = tokio::time::timeout(Duration::from_secs(5), reap(&mut child)).await;
                return Err(SandboxError::Broke(format!(
                    "extraction took longer than {} s: refusing the file",
                    self.limits.wall.as_secs()
                )));
            }
        };
        if answer.len() > MAX_ANSWER {
            return Err(SandboxError::Broke(format!(
                "the extractor's answer is larger than {} MiB",
                MAX_ANSWER >> 20
            )));
        }
        if status.success() {
            return match serde_json::from_slice::<Answer>(&answer) {
                Ok(Answer::Ok(extraction)) => Ok(extraction),
                Ok(Answer::Refused(reason)) => Err(SandboxError::Refused(reason)),
                Err(e) => Err(SandboxError::Broke(format!(
                    "the extractor's answer does not read: {e}"
                ))),
            };
        }
        Err(SandboxError::Broke(self.why(status, &complaint)))
    }

    /// Says why the child ended the way it did.
    fn why(&self, status: std::process::ExitStatus, complaint: &[u8]) -> String {
        use std::os::unix::process::ExitStatusExt;
        let complaint = String::from_utf8_lossy(complaint);
        let last_line = complaint
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        if complaint.contains("has overflowed its stack") {
            return "the document is nested too deeply: the extractor's stack overflowed"
                .to_owned();
        }
        if complaint.contains("memory allocation") || complaint.contains("out of memory") {
            return format!(
                "extracting the document needed more than {} MiB of memory: refusing it (a decompression bomb?)",
                self.limits.memory_mb
            );
        }
        match status.signal() {
            // SIGXCPU: the CPU-time limit.
            Some(24) => format!(
                "extraction used more than {} s of CPU time: refusing the file (a parser loop?)",
                self.limits.cpu_seconds
            ),
            Some(signal) => format!("the extractor crashed (signal {signal}): {last_line}"),
            None => format!(
                "the extractor failed (exit code {}): {last_line}",
                status.code().unwrap_or(-1)
            ),
        }
    }
}

/// The child's main: limit itself, read the request and the document from stdin, answer on stdout.
pub fn child_main() -> ExitCode {
    let mut input = std::io::stdin().lock();
    let mut header = Vec::new();
    // The header is one line of JSON; anything longer is not from our parent.
    if (&mut input)
        .take(64 * 1024)
        .read_until(b'\n', &mut header)
        .is_err()
    {
        return ExitCode::from(2);
    }
    let Ok(request) = serde_json::from_slice::<Request>(&header) else {
        eprintln!("activekg extract-child: not a request from activekg");
        return ExitCode::from(2);
    };
    let memory = request.memory_mb.saturating_mul(1 << 20);
    let limits = [
        (rustix::process::Resource::Data, memory, memory),
        (
            rustix::process::Resource::Cpu,
            request.cpu_seconds,
            request.cpu_seconds + 1,
        ),
    ];
    for (resource, soft, hard) in limits {
        let limit = rustix::process::Rlimit {
            current: Some(soft),
            maximum: Some(hard),
        };
        if let Err(err) = rustix::process::setrlimit(resource, limit) {
            eprintln!("activekg extract-child: cannot limit {resource:?}: {err}");
            return ExitCode::from(3);
        }
    }
    let mut bytes = Vec::new();
    if input.read_to_end(&mut bytes).is_err() {
        return ExitCode::from(2);
    }
    let answer = match super::extract(&bytes, request.content_type.as_deref(), &request.key) {
        Ok(extracted) => {
            let started = std::time::Instant::now();
            let chunks = super::chunk(&extracted.text, ChunkPolicy::default(), WordPiece::minilm());
            Answer::Ok(Extraction {
                format: extracted.format,
                content_hash: extracted.content_hash(),
                title: extracted.title,
                chunks,
                chunk_time: started.elapsed(),
            })
        }
        Err(err) => Answer::Refused(err.to_string()),
    };
    let mut out = std::io::stdout().lock();
    if serde_json::to_writer(&mut out, &answer).is_err() || out.flush().is_err() {
        return ExitCode::from(4);
    }
    ExitCode::SUCCESS
}

/// Waits for the child's exit by also asking for it (`waitpid` with `WNOHANG`) every 20 ms, not only on
/// SIGCHLD. Once, with many children ending at once, a hostile file's job stayed `running` past every
/// limit; the wait for the exit after a kill was the only step without a bound, and now it has one.
async fn reap(child: &mut tokio::process::Child) -> std::io::Result<std::process::ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        tokio::select! {
            status = child.wait() => return status,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}
