//! Accepting, serving and closing connections: hyper's HTTP/1 server under the limits that keep
//! slow, idle or hostile clients from holding the server (axum's own `serve` sets none of them).
//!
//! - **Request heads**: a connection that has not sent a whole request head within
//!   `header_timeout` is closed; this is also how long a keep-alive connection may sit idle
//!   between requests (hyper's `header_read_timeout`, which needs the timer set here).
//! - **Bodies**: `api::read_limited` gives up on a body not received within `--body-timeout`.
//! - **Answers**: a client that takes none of its answer (a full socket buffer) for
//!   `write_timeout` is dropped, which cancels its request.
//! - **Count**: at most `max_connections` are open, so the server never runs out of file
//!   descriptors (keep it under `ulimit -n`). At the cap a new connection closes the connection
//!   that has been idle longest (no request running: a slow or idle client), or, when every
//!   connection runs a request, is answered 503 and closed.
//! - **Errors of the HTTP layer** (a malformed request: 400, a URI over 64 KiB: 414, a head over
//!   128 KiB or 100 header fields: 431) are answered in the API's JSON error shape: hyper writes these
//!   with an empty body before any handler runs, so `Io` replaces them on the way out.
//! - **Shutdown**: stop accepting, close every connection that runs no request (idle, or still
//!   sending its head or body), let running requests finish and close their connections; after
//!   `shutdown_timeout` the requests still running are cancelled and answer 503 (an error event
//!   on a stream), and a few seconds later serving ends whatever is left.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower_service::Service;

use crate::api::{ErrorCode, ErrorType};
use crate::serve::api::ApiError;

/// Largest request head (start line and headers), and the most header fields.
const MAX_HEADER_BYTES: usize = 128 * 1024;
const MAX_HEADERS: usize = 100;

/// The limits above.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub write_timeout: Duration,
    pub shutdown_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// One open connection as the accept loop sees it.
struct Entry {
    /// Requests running on it: read whole, not yet answered (a streamed answer counts until its
    /// body is dropped). A connection still sending a head or a body runs nothing.
    busy: Arc<AtomicUsize>,
    /// When `busy` last fell to 0, or when the connection opened.
    idle_since: Instant,
    close: Arc<Notify>,
}

#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // A panic while holding this lock leaves the map consistent: keep using it.
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self) -> (u64, Arc<AtomicUsize>, Arc<Notify>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (busy, close) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let entry = Entry {
            busy: Arc::clone(&busy),
            idle_since: Instant::now(),
            close: Arc::clone(&close),
        };
        self.lock().insert(id, entry);
        (id, busy, close)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn became_idle(&self, id: u64) {
        if let Some(entry) = self.lock().get_mut(&id) {
            entry.idle_since = Instant::now();
        }
    }

    /// Asks the connection idle the longest to close; false when every one runs a request.
    fn close_longest_idle(&self) -> bool {
        let open = self.lock();
        let victim = open
            .values()
            .filter(|e| e.busy.load(Ordering::Relaxed) == 0)
            .min_by_key(|e| e.idle_since);
        victim.map(|e| e.close.notify_one()).is_some()
    }

    /// Asks every connection that runs no request to close.
    fn close_idle(&self) {
        for entry in self.lock().values().filter(|e| e.busy.load(Ordering::Relaxed) == 0) {
            entry.close.notify_one();
        }
    }
}

/// After `--shutdown-timeout`, how long cancelled requests have to send their 503 or error event.
const CANCELLED_ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `shutdown` resolves, then drains as the module says;
/// `cancel_running` is called when `shutdown_timeout` passes with requests still running (they
/// then answer 503, or an error event on a stream).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    cancel_running: impl FnOnce(),
) {
    let registry = Arc::new(Registry::default());
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors (EMFILE) or a connection reset before it was
                        // taken: wait a moment rather than spin.
                        eprintln!("warning: accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if registry.len() >= limits.max_connections && !registry.close_longest_idle() {
                    connections.spawn(refuse(stream, limits.write_timeout));
                    continue;
                }
                let (id, busy, close) = registry.add();
                let task = serve_one(stream, router.clone(), Arc::clone(&registry), id, busy, close, stopping.clone(), limits.clone());
                connections.spawn(task);
            }
            // Reap finished connections so the set does not grow with every one served.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop.send(true);
    registry.close_idle();
    let drained = tokio::time::timeout(limits.shutdown_timeout, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        eprintln!(
            "shutting down: {} connections still running after {} s (--shutdown-timeout); cancelling their requests",
            connections.len(),
            limits.shutdown_timeout.as_secs()
        );
        cancel_running();
        let answered = tokio::time::timeout(CANCELLED_ANSWER_GRACE, async { while connections.join_next().await.is_some() {} }).await;
        if answered.is_err() {
            connections.shutdown().await;
        }
    }
}

/// The 503 for a connection over the cap while every open one runs a request.
async fn refuse(mut stream: TcpStream, write_timeout: Duration) {
    let error = ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        ErrorType::ServerError,
        ErrorCode::TooManyConnections,
        "the server has as many connections as it takes (--max-connections), all running requests; retry in a second",
    );
    let answer = raw_answer(503, "Service Unavailable", &error.json().to_string(), &[("retry-after", "1")]);
    let _ = tokio::time::timeout(write_timeout, async {
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// A whole HTTP/1.1 answer with a JSON body, the connection closed after it.
fn raw_answer(status: u16, reason: &str, json: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        json.len()
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    [head.as_bytes(), json.as_bytes()].concat()
}

#[allow(clippy::too_many_arguments)]
async fn serve_one(
    stream: TcpStream,
    router: Router,
    registry: Arc<Registry>,
    id: u64,
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
    mut stopping: watch::Receiver<bool>,
    limits: ConnectionLimits,
) {
    let stalled = Arc::new(Mutex::new(None));
    let io = Io {
        inner: stream,
        stalled: Arc::clone(&stalled),
        replacement: None,
    };
    let service = {
        let (registry, busy) = (Arc::clone(&registry), Arc::clone(&busy));
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let running = Running(Arc::new(Slot {
                registry: Arc::clone(&registry),
                id,
                busy: Arc::clone(&busy),
                counted: AtomicBool::new(false),
            }));
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(running.clone());
            let mut router = router.clone();
            async move {
                let response = router.call(request).await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| Body::new(Guarded { body, _running: running })))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES * 2)
        .max_headers(MAX_HEADERS);
    builder.max_header_size(MAX_HEADER_BYTES);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut draining = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => break,
            () = close.notified() => break,
            changed = stopping.changed(), if !draining => {
                draining = true;
                if changed.is_err() || busy.load(Ordering::Relaxed) == 0 {
                    break;
                }
                connection.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => {
                let since = *stalled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if since.is_some_and(|t: Instant| t.elapsed() > limits.write_timeout) {
                    break;
                }
            }
        }
    }
    registry.remove(id);
}

/// A request's place on its connection, in the request's extensions: the body reader calls
/// [`start`](Running::start) once the body is in, and from then until its answer's body is
/// dropped the connection counts as running a request (not to be closed for a newcomer, and
/// drained rather than closed at shutdown).
#[derive(Clone)]
pub struct Running(Arc<Slot>);

struct Slot {
    registry: Arc<Registry>,
    id: u64,
    busy: Arc<AtomicUsize>,
    counted: AtomicBool,
}

impl Running {
    pub fn start(&self) {
        if !self.0.counted.swap(true, Ordering::Relaxed) {
            self.0.busy.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.counted.load(Ordering::Relaxed) && self.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.registry.became_idle(self.id);
        }
    }
}

/// An answer body that keeps its request counted as running while it is sent.
struct Guarded {
    body: Body,
    _running: Running,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The socket as hyper sees it: it notes when writes stall (for `write_timeout`) and swaps
/// hyper's empty-bodied answers to malformed requests for JSON ones.
struct Io {
    inner: TcpStream,
    stalled: Arc<Mutex<Option<Instant>>>,
    /// The JSON answer being written in place of hyper's, and how much of it went out.
    replacement: Option<(Vec<u8>, usize)>,
}

impl Io {
    fn note<T>(&self, poll: &Poll<T>) {
        let mut stalled = self.stalled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match poll {
            Poll::Pending => {
                stalled.get_or_insert_with(Instant::now);
            }
            Poll::Ready(_) => *stalled = None,
        }
    }

    /// Writes what is left of the replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, sent)) = self.replacement.as_mut() {
            if *sent == bytes.len() {
                break;
            }
            let poll = Pin::new(&mut self.inner).poll_write(cx, &bytes[*sent..]);
            match poll {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The JSON answer for hyper's automatic answer to a request it could not parse: a bare head with
/// status 400, 414 or 431, `content-length: 0` and no content type (the API's own errors always
/// carry a JSON body), alone in the buffer.
fn replace_protocol_error(buf: &[u8]) -> Option<Vec<u8>> {
    let status = buf.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    let head = String::from_utf8_lossy(buf).to_ascii_lowercase();
    if !head.ends_with("\r\n\r\n") || !head.contains("\r\ncontent-length: 0\r\n") || head.contains("content-type") {
        return None;
    }
    let (code, reason, error, message) = match status {
        b"400" => (
            400,
            "Bad Request",
            ErrorCode::BadRequest,
            "the request is not valid HTTP/1.1: its request line or a header could not be parsed; send a well-formed request",
        ),
        b"414" => (
            414,
            "URI Too Long",
            ErrorCode::UriTooLong,
            "the request URI is over 64 KiB; the routes are short paths, send data in the body",
        ),
        b"431" => (
            431,
            "Request Header Fields Too Large",
            ErrorCode::HeadersTooLarge,
            "the request's headers are over 128 KiB or 100 fields; send fewer or smaller headers",
        ),
        _ => return None,
    };
    let status = axum::http::StatusCode::from_u16(code).ok()?;
    let json = ApiError::new(status, ErrorType::InvalidRequestError, error, message)
        .json()
        .to_string();
    Some(raw_answer(code, reason, &json, &[]))
}

impl AsyncRead for Io {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // hyper answers a request it cannot parse itself, before any handler runs: take its
        // bytes, send the JSON answer instead.
        if self.replacement.is_none() {
            if let Some(answer) = replace_protocol_error(buf) {
                self.replacement = Some((answer, 0));
            }
        }
        if self.replacement.is_some() {
            let poll = self.poll_replacement(cx).map_ok(|()| buf.len());
            self.note(&poll);
            return poll;
        }
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&poll);
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = match self.poll_replacement(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        };
        self.note(&poll);
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_replacement(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }

    // Not vectored: hyper then hands over each answer head in one buffer, which is what
    // `poll_write` looks at.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_protocol_errors_become_json_answers() {
        let answer = replace_protocol_error(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n").unwrap();
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 431 ") && head.contains("content-type: application/json"),
            "{head}"
        );
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");
        assert!(replace_protocol_error(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
        // The API's own 400 (JSON body) is left alone.
        let own = raw_answer(400, "Bad Request", "{}", &[]);
        assert!(replace_protocol_error(&own).is_none());
        assert!(replace_protocol_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n").is_none());
        assert!(replace_protocol_error(b"HTTP/1.1 404 Not Found\r\n\r\n").is_none());
    }
}
