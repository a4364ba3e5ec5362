//! `rolehost serve`: every role of a manifest over HTTP, with health,
//! metrics, hot reload and graceful shutdown.
//!
//! - `POST /roles/{role}`: the body goes to the role's handler; 200 with
//!   the response body, or a JSON error `{"error":kind,"message":…}`.
//! - `GET /healthz` (alive), `GET /readyz` (backend reachable),
//!   `GET /health` (details), `GET /metrics` (Prometheus text).
//! - `POST /admin/roles/{role}/reload` (the role's file) and
//!   `POST /admin/reload` (the manifest's roles), with
//!   `Authorization: Bearer TOKEN` (`ROLEHOST_ADMIN_TOKEN`); disabled when
//!   the variable is unset.
//!
//! A client gets `read_timeout` to send a request's headers (also how long
//! an idle keep-alive connection stays open) and again its body, and as
//! long to take each part of a response (a connection whose writes make no
//! progress for that long is closed); at most `max_connections`
//! connections are open at once (past it, new ones wait in the listen
//! backlog), so slow, idle or stalled clients cannot pile up.
//!
//! Connections are accepted here and served on `threads` worker threads,
//! each by the one serving the fewest (`workers.rs`); the watcher and
//! shutdown stay on the runtime `serve` is called on, and compiling
//! (loads, reloads) runs on a blocking thread, never on a worker.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes, HttpBody as _};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use crate::backend::Health;
use crate::config::StateConfig;
use crate::error::{CallError, StateResult};
use crate::manifest::Manifest;
use crate::runtime::{Host, RoleSpec};
use crate::workers::{Loads, Workers};

/// Environment variable holding the admin token for reloads.
pub const ADMIN_TOKEN_ENV: &str = "ROLEHOST_ADMIN_TOKEN";

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body; past it, 413.
    pub max_body_bytes: usize,
    /// Request bodies held at once over all requests, in bytes (those being
    /// read and those whose calls run); past it, 503. At least
    /// `max_body_bytes`.
    pub max_buffered_bytes: usize,
    /// Time a client has to send a request's headers (and an idle
    /// keep-alive connection stays open), and again its body; past it the
    /// connection is closed, or for a body, 408.
    pub read_timeout: Duration,
    /// Connections open at once; past it new ones wait to be accepted.
    pub max_connections: usize,
    /// How long in-flight calls may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Poll role files (and the manifest) this often and reload changed
    /// ones (none: never).
    pub watch: Option<Duration>,
    /// The admin token; none disables the admin routes.
    pub admin_token: Option<String>,
    /// The manifest the host was started from, to read its roles again.
    pub manifest: Option<ManifestSource>,
    /// Worker threads serving connections (at least 1).
    pub threads: usize,
}

impl ServeOptions {
    /// Checks the request body limits, naming the flags that set them: the
    /// bodies held at once must take one largest body, and neither may be
    /// more than the host can count.
    pub fn check(&self) -> anyhow::Result<()> {
        let most = tokio::sync::Semaphore::MAX_PERMITS;
        for (flag, value) in
            [("--max-body-bytes", self.max_body_bytes), ("--max-buffered-bytes", self.max_buffered_bytes)]
        {
            anyhow::ensure!(value <= most, "{flag} is {value}, more than the most it may be, {most}");
        }
        anyhow::ensure!(
            self.max_buffered_bytes >= self.max_body_bytes,
            "--max-buffered-bytes is {}: the request bodies held at once must take at least one largest body \
             (--max-body-bytes, {})",
            self.max_buffered_bytes,
            self.max_body_bytes
        );
        Ok(())
    }
}

/// The manifest `serve` was started from: `POST /admin/reload` and
/// `--watch` read its roles again.
#[derive(Debug, Clone)]
pub struct ManifestSource {
    /// The manifest file.
    pub path: PathBuf,
    /// The manifest as the host was started with: changes to its state,
    /// global prefix and `[redis]` take a restart.
    pub started: Manifest,
    /// Settings a flag or an environment variable gave instead of the
    /// manifest (`global-prefix`, `state`): a change of them in the
    /// manifest would not apply after a restart either.
    pub overridden: Vec<&'static str>,
    /// With `acl-users`, the state a role added later connects to (as its
    /// own user).
    pub acl_state: Option<StateConfig>,
}

struct App {
    host: Host,
    admin_token: Option<String>,
    manifest: Option<ManifestSource>,
    /// Held by a manifest reload (the admin route's or the watcher's);
    /// holds the files of the roles the last one refused, as they were
    /// before it tried them, for the watcher to try again when one changes.
    applying: std::sync::Mutex<BTreeMap<PathBuf, Option<FileStamp>>>,
    next_request: AtomicU64,
    max_body_bytes: usize,
    /// What is left of `max_buffered_bytes`, one permit a byte.
    buffered: Arc<tokio::sync::Semaphore>,
    max_buffered_bytes: usize,
    read_timeout: Duration,
    /// The connections each worker thread serves now.
    connections: Loads,
    health: HealthProbe,
}

/// The backend's health for `/readyz`, `/health` and `/metrics`, probed
/// for one request at a time: those that come while a probe runs take its
/// answer, so a flood of checks and scrapes costs Redis one probe at once.
#[derive(Default)]
struct HealthProbe {
    /// Held while a probe runs.
    turn: tokio::sync::Mutex<()>,
    /// Probes finished, and the last one's answer.
    last: std::sync::Mutex<(u64, Option<StateResult<Health>>)>,
}

impl HealthProbe {
    async fn probe(&self, host: &Host) -> StateResult<Health> {
        let last = || self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let asked = last().0;
        let _turn = self.turn.lock().await;
        // A probe that ended while this one waited was running when it
        // was asked: its answer will do.
        if let (done, Some(answer)) = &*last() {
            if *done != asked {
                return answer.clone();
            }
        }
        let answer = host.backend().health().await;
        let mut kept = last();
        *kept = (kept.0 + 1, Some(answer.clone()));
        answer
    }
}

/// The most a connection buffers of a request's line and headers (hyper's
/// default, about 400 KiB, times `--max-connections` would be gigabytes
/// held outside `--max-buffered-bytes`); past it the answer is 431.
const MAX_HEADER_BYTES: usize = 32 << 10;

/// Serves until SIGINT or SIGTERM, then lets calls in flight finish (up to
/// the grace period). `ready` receives the bound address.
pub async fn serve(host: Host, options: ServeOptions, ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    options.check()?;
    let workers = Workers::start(options.threads)?;
    let app = Arc::new(App {
        host,
        admin_token: options.admin_token.clone(),
        manifest: options.manifest.clone(),
        applying: std::sync::Mutex::new(BTreeMap::new()),
        next_request: AtomicU64::new(1),
        max_body_bytes: options.max_body_bytes,
        buffered: Arc::new(tokio::sync::Semaphore::new(options.max_buffered_bytes)),
        max_buffered_bytes: options.max_buffered_bytes,
        read_timeout: options.read_timeout,
        connections: workers.loads(),
        health: HealthProbe::default(),
    });
    let router = Router::new()
        .route("/roles/{role}", post(call_role))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/roles/{role}/reload", post(reload))
        .route("/admin/reload", post(reload_manifest))
        .with_state(app.clone());
    // Listened for from the start: a signal before any wait for it is
    // kept, not lost (nor does it kill the process once it is ready).
    let mut signals = Signals::listen()?;
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    let address = listener.local_addr()?;
    tracing::info!(%address, roles = app.host.roles().len(), "serving");
    ready(address);
    let watcher = options.watch.map(|every| tokio::spawn(watch_files(app.clone(), every)));

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(options.read_timeout);
    http.max_buf_size(MAX_HEADER_BYTES).max_header_size(MAX_HEADER_BYTES);
    let connections = Arc::new(tokio::sync::Semaphore::new(options.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit?,
            () = signals.next() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, say: pause rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = signals.next() => break,
        };
        // Handed over as a plain socket: it must join the worker's runtime.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot hand a connection to a worker");
                continue;
            }
        };
        let (service, http, watcher) = (TowerToHyperService::new(router.clone()), http.clone(), graceful.watcher());
        let stall = options.read_timeout;
        workers.spawn(move || async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => {
                    let stream = TokioIo::new(Stalling::new(stream, stall));
                    if let Err(error) = watcher.watch(http.serve_connection(stream, service)).await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                Err(error) => tracing::warn!(%error, "a worker cannot take a connection"),
            }
            drop(permit);
        });
    }
    tracing::info!("shutting down: no new connections; finishing calls in flight");
    drop(listener);
    // No reload starts during the grace period (one compiling now is left
    // to the runtime's end, which waits for it only briefly).
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    // One grace period for both waits; a second signal ends them at once.
    let grace = options.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    let finish = async {
        if tokio::time::timeout_at(deadline, graceful.shutdown()).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "calls still in flight after the grace period; stopping anyway"
            );
        }
        if tokio::time::timeout_at(deadline, app.host.settle()).await.is_err() {
            tracing::warn!("fire-and-forget writes still unsent after the grace period; stopping anyway");
        }
    };
    tokio::select! {
        () = finish => {}
        () = signals.next() => {
            tracing::warn!("a second signal: stopping now, not waiting for calls in flight or unsent writes");
        }
    }
    Ok(())
}

/// A connection whose writes fail once they have made no progress for
/// `patience`: a client that stops reading its responses (its window shut,
/// kept open by the kernel's probes) would otherwise hold its connection,
/// and one of `max_connections`, for good. hyper has no write timeout.
struct Stalling<S> {
    inner: S,
    patience: Duration,
    /// Armed while a write waits; disarmed by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Stalling<S> {
    fn new(inner: S, patience: Duration) -> Self {
        Self { inner, patience, stalled: None }
    }

    /// Passes a write's poll through, and fails it once it has waited for
    /// `patience` in all.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let patience = self.patience;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(patience)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took nothing for {} ms", patience.as_millis()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Stalling<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Stalling<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

/// SIGINT and SIGTERM, each counted from when it is listened for.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    /// The next signal of either kind (one that came while nothing waited
    /// included). Cancel-safe.
    async fn next(&mut self) {
        tokio::select! { _ = self.interrupt.recv() => {}, _ = self.terminate.recv() => {} }
    }
}

/// The HTTP status for each way a call can fail.
fn status(error: &CallError) -> StatusCode {
    match error {
        CallError::UnknownRole(_) => StatusCode::NOT_FOUND,
        CallError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        CallError::Role { error, .. } => match error.kind() {
            "quota-exceeded" => StatusCode::TOO_MANY_REQUESTS,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        },
        CallError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
        CallError::OutOfFuel { .. } | CallError::OutOfMemory { .. } | CallError::Trap { .. } => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

fn error_body(kind: &str, message: &str) -> Json<serde_json::Value> {
    Json(json!({ "error": kind, "message": message }))
}

/// The request body, read within the read timeout and up to the size
/// limit, and its bytes' share of `max_buffered_bytes`, to hold while the
/// call runs.
async fn read_body(app: &App, body: Body) -> Result<(Bytes, OwnedSemaphorePermit), Response> {
    enum Failed {
        Busy,
        Read(axum::BoxError),
    }
    let fail = |status: StatusCode, kind: &str, message: String| (status, error_body(kind, &message)).into_response();
    let too_large = || {
        let message = format!("the request body is over the limit of {} bytes", app.max_body_bytes);
        fail(StatusCode::PAYLOAD_TOO_LARGE, "too-large", message)
    };
    // A Content-Length past the limit is refused before reading anything.
    let declared = body.size_hint().lower();
    if declared > app.max_body_bytes as u64 {
        return Err(too_large());
    }
    // The buffer's bytes count against the host's budget as it grows with
    // what arrives (not with what a Content-Length promises, which costs
    // a client nothing to send), so that many large bodies at once meet a
    // 503, not the host's memory. Refused rather than waited for: bodies
    // half read would wait on each other.
    let grow = |share: &mut OwnedSemaphorePermit, to: usize| {
        let mut bytes = to.saturating_sub(share.num_permits());
        while bytes > 0 {
            let piece = bytes.min(u32::MAX as usize);
            share.merge(app.buffered.clone().try_acquire_many_owned(piece as u32).map_err(|_| Failed::Busy)?);
            bytes -= piece;
        }
        Ok(())
    };
    let read = async {
        let mut share = app.buffered.clone().try_acquire_many_owned(0).map_err(|_| Failed::Busy)?;
        let mut data = Vec::new();
        let mut body = Limited::new(body, app.max_body_bytes);
        while let Some(frame) = body.frame().await {
            let Ok(chunk) = frame.map_err(Failed::Read)?.into_data() else { continue };
            let needed = data.len() + chunk.len();
            if needed > data.capacity() {
                // Doubling, as a Vec grows, but within the body limit.
                let grown = (data.capacity() * 2).min(app.max_body_bytes).max(needed);
                grow(&mut share, grown)?;
                data.reserve_exact(grown - data.len());
            }
            data.extend_from_slice(&chunk);
        }
        Ok((Bytes::from(data), share))
    };
    let within = app.read_timeout;
    match tokio::time::timeout(within, read).await {
        Ok(Ok(read)) => Ok(read),
        Ok(Err(Failed::Busy)) => {
            let message = format!(
                "the host holds as many request bodies as it may ({} bytes in all); try again",
                app.max_buffered_bytes
            );
            let mut response = fail(StatusCode::SERVICE_UNAVAILABLE, "busy", message);
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            Err(response)
        }
        Ok(Err(Failed::Read(e))) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(Failed::Read(e))) => {
            Err(fail(StatusCode::BAD_REQUEST, "bad-request", format!("cannot read the request body: {e}")))
        }
        Err(_) => Err(fail(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            format!("the request body did not arrive within {} ms", within.as_millis()),
        )),
    }
}

async fn call_role(State(app): State<Arc<App>>, Path(role): Path<String>, body: Body) -> Response {
    let id = app.next_request.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    // An unknown role is refused before its body is read: reading waits
    // for the client and holds its bytes, for nothing.
    let response = match app.host.role(&role) {
        None => call_response(Err(CallError::UnknownRole(role.clone()))),
        Some(_) => match read_body(&app, body).await {
            // The body's share of the budget goes when the call returns.
            Ok((body, _share)) => call_response(app.host.call(&role, &body).await),
            // Logged as a call too: refused bodies (413, 408, busy) are
            // what an operator looks for.
            Err(response) => response,
        },
    };
    tracing::info!(
        request = id,
        role = role.as_str(),
        status = response.status().as_u16(),
        duration_us = start.elapsed().as_micros() as u64,
        "call"
    );
    response
}

/// A call's answer: its response, or its error as JSON with the status
/// (and `Retry-After` where trying again helps).
fn call_response(result: Result<Vec<u8>, CallError>) -> Response {
    match result {
        Ok(response) => (StatusCode::OK, response).into_response(),
        Err(error) => {
            let kind = match &error {
                CallError::Role { error, .. } => error.kind(),
                other => other.kind(),
            };
            let mut response = (status(&error), error_body(kind, &error.to_string())).into_response();
            if matches!(error, CallError::Busy { .. }) || kind == "quota-exceeded" || kind == "unavailable" {
                response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            response
        }
    }
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.health.probe(&app.host).await {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

async fn health(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let backend = app.host.backend();
    let (connected, details, error) = match app.health.probe(&app.host).await {
        Ok(health) => (true, health.details, None),
        Err(e) => (false, BTreeMap::new(), Some(e.to_string())),
    };
    let roles: Vec<_> = app
        .host
        .roles()
        .iter()
        .map(|role| json!({ "name": role.name(), "sha256": role.sha256(), "prefix": role.namespace().prefix() }))
        .collect();
    Json(json!({
        "backend": { "kind": backend.kind(), "connected": connected, "details": details, "error": error },
        "roles": roles,
    }))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let backend = crate::metrics::render_backend(&app.health.probe(&app.host).await);
    let workers = crate::metrics::render_workers(&app.connections.now());
    let held = app.max_buffered_bytes - app.buffered.available_permits();
    let bodies = crate::metrics::render_request_bodies(held, app.max_buffered_bytes);
    let body = app.host.metrics().render() + &backend + &workers + &bodies;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The answer to an admin request whose `headers` lack the admin token.
fn not_admin(app: &App, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &app.admin_token else {
        return Some(
            (StatusCode::NOT_FOUND, error_body("not-found", "admin routes are off (no ROLEHOST_ADMIN_TOKEN)"))
                .into_response(),
        );
    };
    // The scheme's name is case-insensitive (RFC 9110, 11.1).
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start())
    });
    if !given.is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())) {
        let mut refused =
            (StatusCode::UNAUTHORIZED, error_body("unauthorized", "missing or wrong admin token")).into_response();
        refused.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return Some(refused);
    }
    None
}

async fn reload(State(app): State<Arc<App>>, Path(role): Path<String>, headers: HeaderMap) -> Response {
    if let Some(refused) = not_admin(&app, &headers) {
        return refused;
    }
    if app.host.role(&role).is_none() {
        return (StatusCode::NOT_FOUND, error_body("unknown-role", &format!("unknown role `{role}`"))).into_response();
    }
    match reload_off_runtime(&app, &role).await {
        Ok(new) => {
            tracing::info!(role = %role, sha256 = new.sha256(), "reloaded");
            Json(json!({ "role": role, "sha256": new.sha256() })).into_response()
        }
        Err(e) => {
            tracing::error!(role = %role, "reload refused, the old version keeps serving: {e:#}");
            (StatusCode::UNPROCESSABLE_ENTITY, error_body("reload-refused", &format!("{e:#}"))).into_response()
        }
    }
}

/// Reads the manifest again and applies its roles: 200 with what changed,
/// 422 when a role was refused (what did change is still listed) or the
/// manifest itself is unreadable (then nothing changed).
async fn reload_manifest(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some(refused) = not_admin(&app, &headers) {
        return refused;
    }
    if app.manifest.is_none() {
        return (StatusCode::NOT_FOUND, error_body("not-found", "serve was not started from a manifest"))
            .into_response();
    }
    match apply_manifest_off_runtime(&app).await {
        Ok(changes) if changes.refused.is_empty() => Json(changes).into_response(),
        Ok(changes) => (StatusCode::UNPROCESSABLE_ENTITY, Json(changes)).into_response(),
        Err(e) => {
            tracing::error!("manifest reload refused, nothing changed: {e:#}");
            (StatusCode::UNPROCESSABLE_ENTITY, error_body("reload-refused", &format!("{e:#}"))).into_response()
        }
    }
}

/// What a manifest reload did, role by role.
#[derive(Debug, Default, serde::Serialize)]
struct Changes {
    loaded: Vec<String>,
    reloaded: Vec<String>,
    unloaded: Vec<String>,
    unchanged: Vec<String>,
    /// Roles whose new version was refused, with why; an old version keeps
    /// serving.
    refused: BTreeMap<String, String>,
    /// Changed settings that only a restart applies.
    needs_restart: Vec<&'static str>,
    /// The files of the refused roles as they were before the attempt,
    /// which the watcher keeps an eye on: a file that appears or changes
    /// may make its role acceptable.
    #[serde(skip)]
    refused_files: BTreeMap<PathBuf, Option<FileStamp>>,
}

async fn apply_manifest_off_runtime(app: &Arc<App>) -> anyhow::Result<Changes> {
    let app = app.clone();
    let changes = tokio::task::spawn_blocking(move || {
        let mut refused = app.applying.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut result = match &app.manifest {
            Some(source) => apply_manifest(&app.host, source),
            None => Ok(Changes::default()),
        };
        match &mut result {
            Ok(changes) => *refused = std::mem::take(&mut changes.refused_files),
            // Tried again at the files' next change, not at every poll.
            Err(_) => refused.iter_mut().for_each(|(file, before)| *before = file_stamp(file)),
        }
        result
    })
    .await??;
    tracing::info!(?changes, "manifest reloaded");
    Ok(changes)
}

/// Brings the host's roles in line with the manifest file: roles no longer
/// listed are unloaded, new ones loaded, and those whose entry or file
/// changed reloaded. Each role stands alone: one refused leaves the
/// others' changes in place.
fn apply_manifest(host: &Host, source: &ManifestSource) -> anyhow::Result<Changes> {
    let manifest = Manifest::load(&source.path)?;
    let specs = manifest.role_specs()?;
    if specs.is_empty() {
        // More likely a file caught half-written than a wish.
        anyhow::bail!("the manifest lists no roles; a reload does not unload every role (stop the server instead)");
    }
    let mut names = BTreeSet::new();
    if let Some(twice) = specs.iter().find(|spec| !names.insert(spec.name.as_str())) {
        anyhow::bail!("role `{}` is listed twice; role names must be unique", twice.name);
    }
    let started = &source.started;
    let mut changes = Changes::default();
    for (setting, changed) in [
        ("global-prefix", manifest.global_prefix != started.global_prefix),
        ("state", manifest.state != started.state),
        ("[redis]", manifest.redis != started.redis),
    ] {
        if changed && source.overridden.contains(&setting) {
            tracing::info!("the manifest's {setting} changed; a flag or environment variable overrides it");
        } else if changed {
            tracing::warn!("the manifest's {setting} changed; a restart applies it");
            changes.needs_restart.push(setting);
        }
    }
    for role in host.roles() {
        if !names.contains(role.name()) && host.unload(role.name()).is_some() {
            changes.unloaded.push(role.name().to_owned());
        }
    }
    for spec in &specs {
        let before = file_stamp(&spec.wasm);
        let outcome = match host.role(&spec.name) {
            Some(role) if role.spec() == spec && file_sha256(spec).as_deref() == Some(role.sha256()) => {
                changes.unchanged.push(spec.name.clone());
                continue;
            }
            Some(_) => host.reload_with(spec).map(|_| &mut changes.reloaded),
            None => load(host, source, spec).map(|_| &mut changes.loaded),
        };
        match outcome {
            Ok(list) => list.push(spec.name.clone()),
            Err(e) => {
                tracing::error!(role = %spec.name, "refused; an old version, if any, keeps serving: {e:#}");
                changes.refused.insert(spec.name.clone(), format!("{e:#}"));
                changes.refused_files.insert(spec.wasm.clone(), before);
            }
        }
    }
    Ok(changes)
}

/// Loads a role new to the host, as its own Redis user with `acl-users`.
fn load(host: &Host, source: &ManifestSource, spec: &RoleSpec) -> anyhow::Result<()> {
    match &source.acl_state {
        Some(state) => host.load_with_backend(spec, state.as_role(&spec.name)?.connect()?),
        None => host.load(spec),
    }
    .map(drop)
}

/// A file's modification time and size, if it exists: what the watcher
/// compares to notice a change.
type FileStamp = (Option<SystemTime>, u64);

fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    std::fs::metadata(path).ok().map(|m| (m.modified().ok(), m.len()))
}

/// The sha256 of a role's file as it is now, if it can be read.
fn file_sha256(spec: &RoleSpec) -> Option<String> {
    crate::files::read_component(&spec.wasm).ok().map(|bytes| crate::acl::sha256_hex(&bytes))
}

/// Reloads a role on a blocking thread: compiling a big component takes
/// seconds, which must not stall the threads serving calls.
async fn reload_off_runtime(app: &Arc<App>, role: &str) -> anyhow::Result<Arc<crate::runtime::Role>> {
    let (app, role) = (app.clone(), role.to_owned());
    tokio::task::spawn_blocking(move || app.host.reload(&role)).await?
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reloads a role when its file's modification time or size changes, and
/// the manifest's roles when the manifest's does or when the file of a
/// role the manifest lists but that was refused appears or changes, once
/// the manifest has stayed the same for one more poll (so a manifest being
/// written is not read half-done).
async fn watch_files(app: Arc<App>, every: Duration) {
    // Each role's file and its stamp.
    let role_stamps = || -> BTreeMap<String, (PathBuf, Option<FileStamp>)> {
        let stamp = |wasm: &PathBuf| (wasm.clone(), file_stamp(wasm));
        app.host.roles().iter().map(|r| (r.name().to_owned(), stamp(&r.spec().wasm))).collect()
    };
    let mut seen = role_stamps();
    let manifest_path = app.manifest.as_ref().map(|source| source.path.clone());
    // Nothing counts as applied yet: an edit made while the roles were
    // compiling at start is applied at the first polls (unchanged roles
    // are left alone).
    let (mut applied, mut last) = (None, None);
    loop {
        tokio::time::sleep(every).await;
        if let Some(path) = &manifest_path {
            let now = file_stamp(path);
            let steady = now.is_some() && now == last;
            // Busy: a reload is under way, and this poll's check waits.
            let refused_changed = app
                .applying
                .try_lock()
                .is_ok_and(|refused| refused.iter().any(|(file, before)| file_stamp(file) != *before));
            if steady && (now != applied || refused_changed) {
                applied = now;
                // Files changed during the reload are still seen as
                // changed at the check below; those it reloaded are not.
                let before = role_stamps();
                tracing::info!(manifest = %path.display(), "the manifest changed; applying it");
                if let Err(e) = apply_manifest_off_runtime(&app).await {
                    tracing::error!("the manifest was refused, nothing changed: {e:#}");
                }
                seen.extend(before);
            }
            last = now;
        }
        for role in app.host.roles() {
            let wasm = &role.spec().wasm;
            let now = file_stamp(wasm);
            let before = seen.insert(role.name().to_owned(), (wasm.clone(), now));
            // A role the manifest moved to another file was loaded from it
            // just now.
            if before.is_some_and(|(was, before)| was == *wasm && before != now) {
                match reload_off_runtime(&app, role.name()).await {
                    Ok(new) => tracing::info!(role = role.name(), sha256 = new.sha256(), "file changed; reloaded"),
                    Err(e) => tracing::error!(
                        role = role.name(),
                        "file changed but the reload was refused; the old version keeps serving: {e:#}"
                    ),
                }
            }
        }
    }
}
