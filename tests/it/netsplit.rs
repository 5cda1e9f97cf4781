//! A TCP hop between a process and PostgreSQL that can cut the network without closing anything: while
//! cut, bytes in both directions are held back (as on a partition or a dead route), so requests simply hang
//! until the link heals or the caller times out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// See the module docs.
pub struct Netsplit {
    /// The address to connect to instead of PostgreSQL's.
    pub port: u16,
    link: Arc<Link>,
    task: tokio::task::JoinHandle<()>,
}

struct Link {
    cut: AtomicBool,
    healed: Notify,
}

impl Link {
    async fn wait_up(&self) {
        loop {
            let healed = self.healed.notified();
            if !self.cut.load(Ordering::SeqCst) {
                return;
            }
            healed.await;
        }
    }
}

impl Netsplit {
    /// Forwards 127.0.0.1:`port` to `upstream` (host:port).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let link = Arc::new(Link {
            cut: AtomicBool::new(false),
            healed: Notify::new(),
        });
        let upstream = upstream.to_owned();
        let shared = link.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let link = shared.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    link.wait_up().await;
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, link.clone()),
                        pump(server_read, client_write, link),
                    );
                });
            }
        });
        Self { port, link, task }
    }

    /// Cuts the link: nothing passes until [`Netsplit::heal`].
    pub fn cut(&self) {
        self.link.cut.store(true, Ordering::SeqCst);
    }

    /// Lets traffic (held back meanwhile included) flow again.
    pub fn heal(&self) {
        self.link.cut.store(false, Ordering::SeqCst);
        self.link.healed.notify_waiters();
    }

    /// A PostgreSQL URL like `url` but through this hop.
    pub fn url(&self, url: &str) -> String {
        through(url, self.port)
    }
}

impl Drop for Netsplit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A PostgreSQL URL like `url` but to 127.0.0.1:`port`.
pub fn through(url: &str, port: u16) -> String {
    let (scheme_and_auth, rest) = url.split_once('@').unwrap();
    let (_, path) = rest.split_once('/').unwrap();
    format!("{scheme_and_auth}@127.0.0.1:{port}/{path}")
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        link.wait_up().await;
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
