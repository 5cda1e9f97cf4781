//! A storage endpoint in front of moto for fault tests: it forwards every request, can hold chosen
//! responses until the test lets them go (a slow object, a GET that is mid-flight when something else
//! happens), and records how many reads of each object overlapped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use tokio::sync::{Notify, Semaphore};

/// See the module docs.
pub struct Gate {
    /// Where connectors should point (`endpoint`).
    pub url: String,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

struct State {
    upstream: String,
    client: reqwest::Client,
    holds: Mutex<Vec<Arc<HoldInner>>>,
    reads: Mutex<HashMap<String, Reads>>,
}

#[derive(Default, Clone, Copy, Debug)]
struct Reads {
    in_flight: usize,
    most_at_once: usize,
    total: usize,
}

struct HoldInner {
    method: Method,
    path: String,
    /// Send the status and headers at once and the body a byte at a time (a slow object), instead of
    /// holding the whole response.
    trickle: bool,
    /// Requests still to be held.
    remaining: Mutex<usize>,
    held: Notify,
    held_count: Mutex<usize>,
    release: Semaphore,
}

/// Holds the responses of matching requests until released.
#[derive(Clone)]
pub struct Hold(Arc<HoldInner>);

impl Hold {
    /// Waits until `n` matching requests are being held.
    pub async fn wait_held(&self, n: usize) {
        loop {
            let notified = self.0.held.notified();
            if *self.0.held_count.lock().unwrap() >= n {
                return;
            }
            notified.await;
        }
    }

    /// Lets every held response (and any later matching one) go.
    pub fn release(&self) {
        self.0.release.add_permits(1_000_000);
    }
}

impl Gate {
    /// A gate in front of `upstream` on an ephemeral port.
    pub async fn start(upstream: &str) -> Self {
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            holds: Mutex::new(Vec::new()),
            reads: Mutex::new(HashMap::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = shared.clone();
                async move { forward(state, method, uri, headers, body).await }
            },
        );
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, state, server }
    }

    /// Holds the responses of the next `count` `method` requests for `path` (e.g. `/bucket/key`).
    pub fn hold(&self, method: Method, path: &str, count: usize) -> Hold {
        self.add(method, path, count, false)
    }

    /// Makes the next `count` GETs of `path` slow: headers at once, then the body a byte every 50 ms until
    /// released. A reader that gives up is seen to (its connection's writes fail).
    pub fn trickle(&self, path: &str, count: usize) -> Hold {
        self.add(Method::GET, path, count, true)
    }

    fn add(&self, method: Method, path: &str, count: usize, trickle: bool) -> Hold {
        let inner = Arc::new(HoldInner {
            method,
            path: path.to_owned(),
            trickle,
            remaining: Mutex::new(count),
            held: Notify::new(),
            held_count: Mutex::new(0),
            release: Semaphore::new(0),
        });
        self.state.holds.lock().unwrap().push(inner.clone());
        Hold(inner)
    }

    /// The most GETs of `path` that were in flight at once (from arrival until the body is sent or the
    /// reader goes away), and how many there were in all.
    pub fn reads(&self, path: &str) -> (usize, usize) {
        let reads = self
            .state
            .reads
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or_default();
        (reads.most_at_once, reads.total)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn forward(
    state: Arc<State>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let path = uri.path().to_owned();
    // Counted from arrival until the response is sent, or the client gives up (the guard's drop).
    let reading = (method == Method::GET).then(|| Reading::start(&state, &path));
    let target = format!(
        "{}{}",
        state.upstream,
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut request = state.client.request(method.clone(), target).body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    let (status, out, bytes) = match request.send().await {
        Ok(response) => {
            let status = response.status();
            let mut out = HeaderMap::new();
            for (name, value) in response.headers() {
                if !matches!(name.as_str(), "transfer-encoding" | "connection") {
                    out.append(name, value.clone());
                }
            }
            let bytes = response.bytes().await.unwrap_or_default();
            (status, out, bytes)
        }
        Err(_) => (StatusCode::BAD_GATEWAY, HeaderMap::new(), Bytes::new()),
    };
    let hold = state
        .holds
        .lock()
        .unwrap()
        .iter()
        .find(|h| {
            h.method == method && h.path == path && {
                let mut remaining = h.remaining.lock().unwrap();
                let take = *remaining > 0;
                if take {
                    *remaining -= 1;
                }
                take
            }
        })
        .cloned();
    let mut response = axum::response::Response::builder().status(status);
    for (name, value) in &out {
        response = response.header(name, value);
    }
    let body = match hold {
        Some(hold) if hold.trickle => {
            *hold.held_count.lock().unwrap() += 1;
            hold.held.notify_waiters();
            axum::body::Body::from_stream(trickle(bytes, hold, reading))
        }
        Some(hold) => {
            *hold.held_count.lock().unwrap() += 1;
            hold.held.notify_waiters();
            let _ = hold.release.acquire().await.map(|p| p.forget());
            drop(reading);
            axum::body::Body::from(bytes)
        }
        None => {
            drop(reading);
            axum::body::Body::from(bytes)
        }
    };
    response.body(body).unwrap()
}

/// The body a byte every 50 ms until the hold is released, then the rest; the reading counts as in flight
/// until the stream ends or is dropped (the reader went away).
fn trickle(
    bytes: Bytes,
    hold: Arc<HoldInner>,
    reading: Option<Reading>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::unfold(
        (bytes, hold, reading),
        |(mut rest, hold, reading)| async move {
            if rest.is_empty() {
                return None;
            }
            let released = tokio::select! {
                permit = hold.release.acquire() => { if let Ok(p) = permit { p.forget(); } true }
                () = tokio::time::sleep(std::time::Duration::from_millis(50)) => false,
            };
            let chunk = if released || rest.len() == 1 {
                if released {
                    // Leave the permit for the next reader of this hold.
                    hold.release.add_permits(1);
                }
                rest.split_to(rest.len())
            } else {
                rest.split_to(1)
            };
            Some((Ok(chunk), (rest, hold, reading)))
        },
    )
}

struct Reading {
    state: Arc<State>,
    path: String,
}

impl Reading {
    fn start(state: &Arc<State>, path: &str) -> Self {
        let mut reads = state.reads.lock().unwrap();
        let entry = reads.entry(path.to_owned()).or_default();
        entry.in_flight += 1;
        entry.total += 1;
        entry.most_at_once = entry.most_at_once.max(entry.in_flight);
        Self {
            state: state.clone(),
            path: path.to_owned(),
        }
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        if let Some(entry) = self.state.reads.lock().unwrap().get_mut(&self.path) {
            entry.in_flight -= 1;
        }
    }
}
