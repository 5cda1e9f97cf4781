//! A TCP hop to PostgreSQL that loses answers the way a connection cut at the worst moment does: once
//! armed, the next statements whose text holds a marker and that return rows run and commit on the server,
//! and then their connection closes before the client hears a byte of the answer.
//!
//! It reads the wire protocol (so the URL it hands out turns TLS off): a statement is recognised when it is
//! prepared (Parse) and followed to each execution (Bind), and the answer is held back until the server's
//! ReadyForQuery, which PostgreSQL sends only once the statement's implicit transaction has committed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// See the module docs.
pub struct ReplyLoss {
    port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    marker: String,
    /// Answers still to lose.
    armed: AtomicUsize,
    lost: AtomicUsize,
}

/// One client connection: its marked statements, and whether the answer in flight is to one of them.
#[derive(Default)]
struct Session {
    marked: Mutex<HashSet<Vec<u8>>>,
    watching: AtomicBool,
}

impl ReplyLoss {
    /// Forwards a local port to `upstream` (host:port), watching for statements containing `marker`.
    pub async fn start(upstream: &str, marker: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            marker: marker.to_owned(),
            armed: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
        });
        let upstream = upstream.to_owned();
        let hop = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, hop.clone()));
            }
        });
        Self { port, shared, task }
    }

    /// Loses the answers to the next `count` marked statements that return rows (on any connections).
    pub fn arm(&self, count: usize) {
        self.shared.armed.store(count, Ordering::SeqCst);
    }

    /// Answers lost so far.
    pub fn lost(&self) -> usize {
        self.shared.lost.load(Ordering::SeqCst)
    }

    /// A PostgreSQL URL like `url` (no query string) but through this hop, in plain text.
    pub fn url(&self, url: &str) -> String {
        format!(
            "{}?sslmode=disable",
            crate::netsplit::through(url, self.port)
        )
    }
}

impl Drop for ReplyLoss {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let session = Session::default();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Whichever direction ends first ends both: dropping the halves closes both sockets.
    tokio::select! {
        () = from_client(&mut client_read, &mut server_write, &session, &shared) => {}
        () = from_server(&mut server_read, &mut client_write, &session, &shared) => {}
    }
}

async fn from_client(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    session: &Session,
    shared: &Shared,
) {
    // The startup packet has no type byte.
    let Ok(len) = from.read_u32().await else {
        return;
    };
    let mut startup = len.to_be_bytes().to_vec();
    startup.resize(len as usize, 0);
    if from.read_exact(&mut startup[4..]).await.is_err() || to.write_all(&startup).await.is_err() {
        return;
    }
    while let Some(message) = frame(from).await {
        let body = &message[5..];
        match message[0] {
            b'P' => {
                let mut parts = body.split(|b| *b == 0);
                let (name, query) = (parts.next().unwrap_or_default(), parts.next());
                let mut marked = session.marked.lock().unwrap();
                if query.is_some_and(|q| String::from_utf8_lossy(q).contains(&shared.marker)) {
                    marked.insert(name.to_vec());
                } else {
                    marked.remove(name);
                }
            }
            b'B' => {
                let mut parts = body.split(|b| *b == 0);
                let statement = parts.nth(1).unwrap_or_default();
                // Every marked answer is held to its end: whether to lose it is decided there.
                if session.marked.lock().unwrap().contains(statement) {
                    session.watching.store(true, Ordering::SeqCst);
                }
            }
            _ => {}
        }
        if to.write_all(&message).await.is_err() {
            return;
        }
    }
}

async fn from_server(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    session: &Session,
    shared: &Shared,
) {
    let mut held: Vec<u8> = Vec::new();
    let mut rows = false;
    while let Some(message) = frame(from).await {
        if !session.watching.load(Ordering::SeqCst) {
            if to.write_all(&message).await.is_err() {
                return;
            }
            continue;
        }
        rows |= message[0] == b'D';
        held.extend_from_slice(&message);
        if message[0] != b'Z' {
            continue;
        }
        // The statement's transaction has committed: lose its answer, or pass on one that returned nothing.
        session.watching.store(false, Ordering::SeqCst);
        let lose = rows
            && shared
                .armed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if lose {
            shared.lost.fetch_add(1, Ordering::SeqCst);
            return;
        }
        if to.write_all(&held).await.is_err() {
            return;
        }
        held.clear();
        rows = false;
    }
}

/// One typed message: its type byte, length and body.
async fn frame(from: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut message = vec![0u8; 5];
    from.read_exact(&mut message).await.ok()?;
    let len = u32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
    message.resize(1 + len, 0);
    from.read_exact(&mut message[5..]).await.ok()?;
    Some(message)
}
