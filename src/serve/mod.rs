//! `paligemma serve`: the model behind HTTP.
//!
//! Routes: `POST /v1/generate` ([`api`]), `POST /v1/chat/completions` ([`openai`]), `GET /health`
//! (no auth, for load balancers), `GET /metrics` ([`metrics`], Prometheus text) and `GET /` (a test
//! page). Requests are batched by one worker thread that owns the model ([`batcher`]).
//!
//! Why axum on tokio: hyper underneath is the most used Rust HTTP implementation; axum adds
//! routing, extractors, SSE and graceful shutdown without hand-written HTTP parsing; tokio gives
//! disconnect detection (a client that leaves drops its handler future, which cancels its job)
//! and signals. CORS and bearer auth are a few lines each, written here rather than pulling in
//! tower-http.
//!
//! Connections ([`connections`]): hyper's HTTP/1 under header, body and write timeouts and a cap
//! on open connections, so slow or idle clients cannot hold the server.
//!
//! Shutdown (SIGTERM or Ctrl-C): stop accepting, close idle and unfinished connections, let
//! running and queued requests finish for up to `--shutdown-timeout` (then they are cancelled),
//! the worker drains the queue and the process exits 0.

pub mod api;
pub mod batcher;
pub mod command;
pub mod connections;
pub mod metrics;
pub mod openai;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use subtle::ConstantTimeEq;

use crate::api::{ErrorCode, ErrorType, Health};
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::prompt::PromptEncoder;
use crate::serve::api::{ApiError, Limits};
use crate::serve::batcher::{Batching, Queue};
use crate::serve::connections::{ConnectionLimits, Running};
use crate::serve::metrics::Metrics;

pub struct ServeOptions {
    pub pipeline: PipelineOptions,
    pub host: String,
    pub port: u16,
    pub max_batch: usize,
    pub batching: Batching,
    pub max_queue: usize,
    pub limits: Limits,
    pub connections: ConnectionLimits,
    /// Bearer token required on every route but `/health` and `/`.
    pub api_key: Option<String>,
    /// `Access-Control-Allow-Origin` to answer with; no CORS headers without it.
    pub cors_origin: Option<String>,
}

/// Shared by every handler.
pub struct AppState {
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// The pipeline's prompt encoder: prompts are checked in the handler, before queueing.
    pub prompts: Arc<PromptEncoder>,
    /// `/health`'s body, fixed once the model has loaded.
    pub info: Health,
    api_key: Option<String>,
    cors_origin: Option<HeaderValue>,
}

/// Loads the model, listens, serves until SIGTERM/SIGINT, then finishes the queued jobs.
pub fn run(options: ServeOptions) -> Result<()> {
    let cors_origin = options
        .cors_origin
        .as_deref()
        .map(HeaderValue::from_str)
        .transpose()
        .context("--cors-origin is not a valid header value")?;
    let (model, dtype) = (options.pipeline.model.clone(), options.pipeline.dtype.to_string());
    let pipeline = Pipeline::load(options.pipeline)?;
    for warning in pipeline.warnings() {
        eprintln!("warning: {warning}");
    }
    if let Some(note) = pipeline.one_at_a_time_note() {
        eprintln!("note: {note}");
    }
    let info = Health::new(model, dtype, &pipeline);
    let prompts = pipeline.prompt_encoder();
    let slots = pipeline.capacity().map_or(options.max_batch, |c| c.min(options.max_batch));
    let metrics = Arc::new(Metrics::new(slots));
    let (queue, worker) = batcher::start(pipeline, slots, options.batching, options.max_queue, Arc::clone(&metrics))
        .context("cannot start the model worker thread")?;
    let state = Arc::new(AppState {
        queue,
        metrics,
        limits: options.limits,
        prompts,
        info,
        api_key: options.api_key,
        cors_origin,
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((options.host.as_str(), options.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", options.host, options.port))?;
        let address: SocketAddr = listener.local_addr()?;
        // Tests and scripts wait for this line (with --port 0 it names the port).
        eprintln!("listening on http://{address}");
        let queue = state.queue.clone();
        connections::serve(listener, router(state), options.connections, shutdown_signal(), move || {
            queue.cancel_all()
        })
        .await;
        anyhow::Ok(())
    })?;
    // The router, and with it every queue handle, is gone: the worker finishes what is queued.
    worker.join().map_err(|_| anyhow::anyhow!("the model worker thread panicked"))?;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    eprintln!("shutting down: closing idle connections, finishing running requests");
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/generate", post(api::generate))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // read_body bounds every body before routing.
        .layer(DefaultBodyLimit::disable())
        // Outermost last: metrics see every answer, CORS headers go on auth failures too, auth
        // is checked before the body is read.
        .layer(middleware::from_fn_with_state(Arc::clone(&state), read_body))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), auth))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), cors))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    Json(state.info.clone())
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorType::InvalidRequestError,
        ErrorCode::NotFound,
        format!(
            "no route {}; the routes are POST /v1/generate, POST /v1/chat/completions, GET /health, GET /metrics, GET /",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    let allowed = if uri.path().starts_with("/v1/") { "POST" } else { "GET" };
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorType::InvalidRequestError,
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}; use {allowed}", uri.path()),
    )
}

/// The label of a path in metrics: the routes, everything else as "other" (unknown paths must
/// not grow the series without bound).
fn endpoint(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/generate" => "/v1/generate",
        "/v1/chat/completions" => "/v1/chat/completions",
        _ => "other",
    }
}

async fn track(State(state): State<Arc<AppState>>, request: axum::extract::Request, next: Next) -> HttpResponse {
    let started = Instant::now();
    let label = endpoint(request.uri().path());
    let response = next.run(request).await;
    state.metrics.record_request(label, response.status().as_u16(), started.elapsed());
    response
}

/// The `Content-Length` a request declares.
fn declared_length(request: &axum::extract::Request) -> Option<u64> {
    request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

/// Reads the whole body (up to `--max-body-bytes`, within `--body-timeout`) before the handler
/// runs; from then on the request counts as running on its connection (see
/// `connections::Running`). A body over the limit is read on, and dropped, up to twice the limit
/// before the 413, so that a client still sending reads its answer instead of a reset
/// connection; one declared over twice the limit is answered at once.
async fn read_body(State(state): State<Arc<AppState>>, request: axum::extract::Request, next: Next) -> HttpResponse {
    let limit = state.limits.max_body_bytes;
    if declared_length(&request).is_some_and(|n| n > 2 * limit as u64) {
        return ApiError::body_too_large(limit).into_response();
    }
    let (parts, body) = request.into_parts();
    match api::read_limited(body, limit, state.limits.body_timeout).await {
        Ok(bytes) => {
            if let Some(running) = parts.extensions.get::<Running>() {
                running.start();
            }
            next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Err(e) => e.into_response(),
    }
}

/// How long a request refused before its body was read may still send it: reading what it sent
/// lets the client read its answer rather than a reset connection.
const REFUSED_BODY_GRACE: Duration = Duration::from_secs(2);

/// Adds the CORS headers when `--cors-origin` is set, and answers preflights before auth (a
/// browser's preflight carries no credentials).
async fn cors(State(state): State<Arc<AppState>>, request: axum::extract::Request, next: Next) -> HttpResponse {
    let Some(origin) = state.cors_origin.clone() else {
        return next.run(request).await;
    };
    let preflight = request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    headers.insert(header::VARY, HeaderValue::from_static("origin"));
    response
}

/// `Authorization: Bearer KEY` on every route but `/health` and `/` when `--api-key` is set,
/// checked from the head alone: a client without the key never gets to hold the server with a
/// slow body (what it sends within [`REFUSED_BODY_GRACE`] is read and dropped).
async fn auth(State(state): State<Arc<AppState>>, request: axum::extract::Request, next: Next) -> HttpResponse {
    let Some(key) = state.api_key.as_deref() else {
        return next.run(request).await;
    };
    if matches!(request.uri().path(), "/health" | "/") {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let refusal = match given {
        Some(token) if same_secret(token.as_bytes(), key.as_bytes()) => return next.run(request).await,
        Some(_) => unauthorized("the API key is wrong; send Authorization: Bearer KEY with the server's --api-key"),
        None => unauthorized("this server needs an API key; send Authorization: Bearer KEY (the server's --api-key)"),
    };
    let limit = state.limits.max_body_bytes;
    if declared_length(&request).is_none_or(|n| n <= 2 * limit as u64) {
        let _ = api::read_limited(request.into_body(), limit, REFUSED_BODY_GRACE).await;
    }
    refusal.into_response()
}

/// The token of an `Authorization: Bearer TOKEN` value; the scheme is case-insensitive (RFC 9110
/// 11.1: `bearer`, `BEARER`), spaces around the token are not part of it.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorType::AuthenticationError,
        ErrorCode::InvalidApiKey,
        message,
    )
}

/// Equality in time that does not depend on where the bytes differ (`subtle`, as rustls uses), so
/// a wrong key's matching prefix cannot be timed.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    bool::from(given.ct_eq(expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_when_equal_in_length_and_bytes() {
        assert!(same_secret(b"key", b"key"));
        assert!(!same_secret(b"kex", b"key"));
        assert!(!same_secret(b"ke", b"key"));
        assert!(!same_secret(b"key\0", b"key"));
        assert!(!same_secret(b"", b"key"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer k", "bearer k", "BEARER  k ", "  Bearer k"] {
            assert_eq!(bearer_token(value), Some("k"), "{value:?}");
        }
        assert_eq!(bearer_token("Basic k"), None);
        assert_eq!(bearer_token("Bearerk"), None);
    }

    #[test]
    fn unknown_paths_share_one_metrics_label() {
        assert_eq!(endpoint("/v1/generate"), "/v1/generate");
        assert_eq!(endpoint("/secret/../x"), "other");
    }
}
