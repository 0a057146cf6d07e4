//! `ember serve`: an HTTP/1.1 JSON API in front of a [`Pool`] and/or a
//! [`FunctionSet`] ([`Services`]).
//!
//! This module is the only async code in ember: axum on tokio. Every call
//! into the pool or a function (which block) runs on tokio's blocking
//! threads through `spawn_blocking`, so the VMM core stays synchronous.
//!
//! Routes (`vmm/openapi.yaml` is the full description):
//!
//! - `POST /v1/invocations`: run one invocation, answer with its outcome
//!   as one JSON object. `?stream=true` answers `application/x-ndjson`
//!   instead: one JSON event per line, `stdout`/`stderr` chunks as they
//!   come, then one `exit` (or `error`) event. The status line is sent
//!   once a sandbox is secured, so a full queue is still a 429.
//!   (Only with a pool.)
//! - `PUT /v1/functions/{name}`: deploy a function from a bundle (a zip,
//!   settings in the query); checked at once (400), built in the
//!   background in a jailed template worker (202), stored under the data
//!   directory and served again after a restart (see [`deploy`]).
//!   `GET /v1/functions/{name}`: its state (`building`, `ready`, `failed`
//!   with the build log's tail). `DELETE`: drain and remove it (204).
//! - `POST /v1/functions/{name}/invocations`: the body is the event; a
//!   recycled clone of the function handles it (see [`recycled`]; a fresh
//!   clone per invocation for functions without a hot path, or with
//!   `recycle` off). The answer is the handler's result (200), or a JSON
//!   error: raised 500, timed out 504, runtime gone 502; headers carry the
//!   timings (`Ember-Timings`, `Ember-Path`, `Ember-Recycle`, ...).
//!   Query `timeout_ms`, `max_output_bytes`, `envelope=1` (the JSON
//!   envelope, 200 whatever the handler did), `stream=1` (NDJSON events,
//!   sent when the invocation ends: the hot path returns output with the
//!   result). At most `max_live` invocations run at once, with a bounded
//!   queue (429, 503) as for the pool. A client that disconnects cancels
//!   its invocation: the jailed worker running it is killed ([`cancel`]).
//! - `GET /v1/functions`: the functions served and deployed, with status.
//! - `GET /v1/health`: 200 with the pool's state, 503 once shutting down.
//! - `GET /v1/ready`: readiness: 503 while draining or, at start, until
//!   each function's warm minimum is made.
//! - `GET /metrics`: Prometheus text format.
//!
//! Errors are JSON `{"error": "..."}`: 400 for a malformed request or one
//! over the [`Limits`], 413 for a body over the size limit, 429 with
//! `Retry-After` when every sandbox is busy and the queue is full, 503
//! while shutting down. Before any of that, [`guard`] answers 421 for a
//! foreign `Host` on a loopback listener, 401 without the bearer token
//! ([`ServerConfig::auth_token`]), 413 for a body declared too large and
//! 415 for a body not labelled as JSON; a request is admitted (a sandbox
//! or a slot, or 429) before its body is read (408 if it does not arrive
//! within [`BODY_READ_TIMEOUT`]). At most
//! [`ServerConfig::max_connections`] connections are open at once. Each invocation request logs one JSON line
//! (target `ember::invocation`) with its id, outcome, exit status,
//! timings and usage; each function invocation one line (target
//! `ember::function`) with its function, result kind, path and timings.
//!
//! Shutdown (SIGINT or SIGTERM with [`run`], the `shutdown` future with
//! [`serve`]): the listener closes, the pool refuses new work, running
//! invocations get the pool's grace to finish (then isolated workers are
//! killed), and every sandbox is destroyed before [`serve`] returns.

pub mod api;
pub mod cancel;
pub mod client;
mod conn_cap;
pub mod deploy;
mod fair_slots;
mod function_api;
pub mod functions;
pub mod guard;
pub mod memory;
pub mod metrics;
pub mod records;
pub mod recycled;
mod streaming;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use self::api::{
    ErrorBody, InvocationRequest, InvocationResponse, InvocationSummary, Limits, StreamEvent,
};
use self::deploy::{DeployConfig, Deployer};
use self::functions::FunctionSet;
use self::metrics::{Metrics, Outcome};
use crate::function::FunctionError;
use crate::pool::{Lease, Pool, PoolError, PoolOutcome};
use crate::sandbox::Invocation;

/// Where the server listens: a TCP address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `127.0.0.1:8080`, `[::1]:0`, ...
    Tcp(SocketAddr),
    /// `unix:/run/ember.sock`.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path".into()),
            Some(path) => Ok(ListenAddr::Unix(path.into())),
            None => s
                .parse()
                .map(ListenAddr::Tcp)
                .map_err(|_| format!("{s:?} is neither ADDR:PORT nor unix:PATH")),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket, removed when the server stops.
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A Unix socket file left by a dead server is replaced;
    /// one that still answers is an error.
    pub async fn bind(addr: &ListenAddr) -> Result<Listener, ServerError> {
        let err = |e| ServerError::Bind(addr.to_string(), e);
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(
                tokio::net::TcpListener::bind(a).await.map_err(err)?,
            )),
            ListenAddr::Unix(path) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(err(std::io::ErrorKind::AddrInUse.into()));
                }
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path).map_err(err)?;
                }
                let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    /// The bound address (the actual port after binding port 0).
    pub fn local_addr(&self) -> Result<ListenAddr, ServerError> {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(ListenAddr::Tcp)
                .map_err(|e| ServerError::Bind("tcp".into(), e)),
            Listener::Unix(_, path) => Ok(ListenAddr::Unix(path.clone())),
        }
    }
}

pub use self::conn_cap::DEFAULT_MAX_CONNECTIONS;
use self::guard::{AuthToken, Guard};

/// How long a request's body may take to arrive once the request was
/// admitted (it holds a sandbox or a slot meanwhile).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How the server treats requests.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Per-request limits.
    pub limits: Limits,
    /// Every route but `/v1/health` requires `Authorization: Bearer
    /// <token>`. Required to listen on an address other than loopback.
    pub auth_token: Option<AuthToken>,
    /// Most connections open at once; more are closed as they come.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            auth_token: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl ServerConfig {
    /// The default configuration with `limits`.
    pub fn with_limits(limits: Limits) -> Self {
        ServerConfig {
            limits,
            ..ServerConfig::default()
        }
    }
}

/// What a server serves: snapshot invocations from a pool
/// (`/v1/invocations`), functions (`/v1/functions/...`), or both.
#[derive(Debug, Clone, Default)]
pub struct Services {
    /// The pool behind `/v1/invocations` (without one, that route is 404).
    pub pool: Option<Arc<Pool>>,
    /// The functions behind `/v1/functions`.
    pub functions: Option<Arc<FunctionSet>>,
    /// Deployments over the API (`PUT /v1/functions/{name}`), kept in a
    /// data directory; without, that route is refused (405).
    pub deploy: Option<DeployConfig>,
}

impl From<Arc<Pool>> for Services {
    fn from(pool: Arc<Pool>) -> Self {
        Services {
            pool: Some(pool),
            functions: None,
            deploy: None,
        }
    }
}

impl From<Pool> for Services {
    fn from(pool: Pool) -> Self {
        Arc::new(pool).into()
    }
}

/// The server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is unusable.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The listening socket could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    /// The async runtime or the signal handlers could not be set up.
    #[error("cannot start the server runtime: {0}")]
    Runtime(std::io::Error),
    /// Serving failed.
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    /// A function could not be opened.
    #[error("function {0}: {1}")]
    Function(String, FunctionError),
    /// The data directory of deployed functions could not be opened.
    #[error("deployed functions: {0}")]
    Deploy(#[from] deploy::DeployError),
}

#[derive(Debug)]
struct AppState {
    pool: Option<Arc<Pool>>,
    functions: Arc<FunctionSet>,
    deployer: Option<Arc<Deployer>>,
    limits: Limits,
    metrics: Metrics,
    /// One permit per sandbox and queue place of the pool: a request
    /// holds one from before its body is read until it is answered.
    pool_admission: Arc<tokio::sync::Semaphore>,
    /// The same for function clones.
    function_admission: Arc<tokio::sync::Semaphore>,
    next_id: AtomicU64,
    id_prefix: String,
}

type Shared = Arc<AppState>;

/// Serves the API on `listener` until `shutdown` completes, then shuts
/// down gracefully (see the [module docs](self)); the pool is shut down,
/// and running function invocations get the functions' shutdown grace,
/// before this returns.
pub async fn serve(
    listener: Listener,
    services: impl Into<Services>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    config.limits.validate().map_err(ServerError::Config)?;
    if config.max_connections == 0 {
        return Err(ServerError::Config(
            "max_connections must be at least 1".into(),
        ));
    }
    let loopback = match &listener {
        Listener::Tcp(l) => {
            let addr = l
                .local_addr()
                .map_err(|e| ServerError::Bind("tcp".into(), e))?;
            if !addr.ip().is_loopback() && config.auth_token.is_none() {
                return Err(ServerError::Config(format!(
                    "refusing to listen on {addr}, which is not a loopback address, without \
                     an auth token (--auth-token-file): anyone who reaches it could run code"
                )));
            }
            addr.ip().is_loopback()
        }
        // Only local processes reach it, and no browser.
        Listener::Unix(..) => false,
    };
    let guard = Arc::new(Guard {
        token: config.auth_token.clone(),
        loopback_host: loopback,
        max_body_bytes: config.limits.max_body_bytes,
    });
    let Services {
        pool,
        functions,
        deploy,
    } = services.into();
    let has_functions = functions.as_ref().is_some_and(|f| !f.is_empty());
    if pool.is_none() && !has_functions && deploy.is_none() {
        return Err(ServerError::Config(
            "nothing to serve: no snapshot pool, no functions and no data directory".into(),
        ));
    }
    let functions = functions.unwrap_or_else(|| Arc::new(FunctionSet::empty()));
    // Opening the deployed functions reads their templates: blocking.
    let deployer = match deploy {
        Some(deploy) => {
            let (functions, max_timeout_ms) = (functions.clone(), config.limits.max_timeout_ms);
            Some(
                tokio::task::spawn_blocking(move || {
                    Deployer::open(deploy, functions, max_timeout_ms)
                })
                .await
                .map_err(|e| {
                    ServerError::Config(format!("cannot open deployed functions: {e}"))
                })??,
            )
        }
        None => None,
    };
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let state = Arc::new(AppState {
        pool: pool.clone(),
        functions: functions.clone(),
        deployer,
        limits: config.limits,
        metrics: Metrics::default(),
        pool_admission: admission(pool.as_ref().map_or(0, |p| {
            p.config().max_live.saturating_add(p.config().max_queue)
        })),
        function_admission: admission(
            functions
                .config()
                .max_live
                .saturating_add(functions.config().max_queue),
        ),
        next_id: AtomicU64::new(1),
        id_prefix: format!("{started:x}-{:x}", std::process::id()),
    });
    let mut app = Router::new();
    if pool.is_some() {
        app = app.route("/v1/invocations", post(invocations));
    }
    let app = app
        .route("/v1/functions", get(function_api::list_functions))
        .route(
            "/v1/functions/{name}",
            get(function_api::get_function)
                .put(function_api::put_function)
                .delete(function_api::delete_function),
        )
        .route(
            "/v1/functions/{name}/invocations",
            post(function_api::function_invocations),
        )
        .route("/v1/health", get(health))
        .route("/v1/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route".into()) })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into())
        })
        .layer(DefaultBodyLimit::max(config.limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(guard, guard::check))
        .layer(axum::middleware::map_response(close_after_refusal))
        .with_state(state);

    // Recycled clones unused for the idle timeout are destroyed; each
    // function's minimum of warm ones is made at start and again after
    // invocations take them.
    let expiry = {
        let functions = functions.clone();
        tokio::spawn(async move {
            loop {
                let keeper = functions.clone();
                let _ = tokio::task::spawn_blocking(move || keeper.top_up()).await;
                functions.warm_wanted(Duration::from_secs(1)).await;
                functions.expire_idle().await;
            }
        })
    };
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let closer = (pool.clone(), functions.clone());
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, draining");
        if let Some(pool) = &closer.0 {
            pool.close();
        }
        closer.1.close().await;
        let _ = signalled_tx.send(());
    };
    // After the signal, the pool's shutdown bounds the drain: it waits for
    // running invocations (its grace), kills isolated workers that
    // outlive it, and then in-flight requests answer at once. Function
    // clones (in this process) get the functions' grace; one still
    // running after it ends with the process.
    let drained = {
        let pool = pool.clone();
        let functions = functions.clone();
        async move {
            if signalled_rx.await.is_ok() {
                let pool_down = async move {
                    if let Some(pool) = pool {
                        let _ = tokio::task::spawn_blocking(move || pool.shutdown()).await;
                    }
                };
                let (_, left) = tokio::join!(pool_down, functions.drain());
                if left > 0 {
                    tracing::warn!(
                        running = left,
                        "function invocations still running after the shutdown grace"
                    );
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            } else {
                std::future::pending::<()>().await;
            }
        }
    };
    let max_connections = config.max_connections;
    let unix_path = match &listener {
        Listener::Unix(_, path) => Some(path.clone()),
        Listener::Tcp(_) => None,
    };
    let served = async {
        match listener {
            Listener::Tcp(l) => {
                axum::serve(conn_cap::Capped::new(l, max_connections), app)
                    .with_graceful_shutdown(signal)
                    .await
            }
            Listener::Unix(l, _) => {
                axum::serve(conn_cap::Capped::new(l, max_connections), app)
                    .with_graceful_shutdown(signal)
                    .await
            }
        }
    };
    let result = tokio::select! {
        result = served => result.map_err(ServerError::Serve),
        () = drained => {
            tracing::warn!("connections still open after the shutdown grace; closing them");
            Ok(())
        }
    };
    if let Some(pool) = pool {
        let left = tokio::task::spawn_blocking(move || pool.shutdown())
            .await
            .unwrap_or(0);
        if left > 0 {
            tracing::warn!(running = left, "in-process sandboxes still running at exit");
        }
    }
    expiry.abort();
    functions.close().await;
    let left = functions.load().live;
    if left > 0 {
        tracing::warn!(running = left, "function clones still running at exit");
    }
    if let Some(path) = unix_path {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    result
}

/// A semaphore of `places` permits (as many as a semaphore can hold).
fn admission(places: usize) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        places.min(tokio::sync::Semaphore::MAX_PERMITS),
    ))
}

/// Runs the server on its own runtime until SIGINT or SIGTERM, then
/// shuts down gracefully. Logs JSON lines to stderr (see
/// [`init_logging`]).
pub fn run(
    listen: &ListenAddr,
    services: impl Into<Services>,
    config: ServerConfig,
) -> Result<(), ServerError> {
    let services = services.into();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ember-http")
        .build()
        .map_err(ServerError::Runtime)?;
    let result = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(ServerError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Runtime)?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        let listener = Listener::bind(listen).await?;
        let address = listener.local_addr()?;
        let functions = services.functions.as_ref().map_or(0, |f| f.len());
        match &services.pool {
            Some(pool) => {
                let pool_config = pool.config();
                tracing::info!(
                    address = %address,
                    snapshot = %pool.snapshot().dir().display(),
                    warm = pool_config.warm,
                    max_live = pool_config.max_live,
                    max_queue = pool_config.max_queue,
                    functions,
                    "listening"
                );
            }
            None => tracing::info!(address = %address, functions, "listening"),
        }
        serve(listener, services, config, shutdown).await
    });
    // Every sandbox is gone by now; do not wait on stray blocking tasks
    // (a client's streaming write) for long.
    runtime.shutdown_timeout(Duration::from_secs(5));
    // A template build still running (its blocking task abandoned above)
    // has a worker that would outlive this process.
    let killed = crate::worker::kill_own_workers();
    if killed > 0 {
        tracing::warn!(
            workers = killed,
            "killed workers still running at exit (template builds)"
        );
    }
    result
}

/// Sends `tracing` events to stderr as JSON lines (level from
/// `EMBER_LOG`: error, warn, info (default), debug, trace). Does nothing
/// if a subscriber is installed already.
pub fn init_logging() {
    let level = std::env::var("EMBER_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// An error answer, with `Retry-After` when the client may try again.
/// Every answer but a success ends its connection: a request refused
/// before its body was read leaves that body unread, so the connection
/// cannot carry another request, and a client told nothing would send its
/// next one into a closing socket.
async fn close_after_refusal(mut response: Response) -> Response {
    if !response.status().is_success() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn refusal(status: StatusCode, retry_after: Option<&'static str>, message: String) -> Response {
    let mut response = error(status, message);
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(after));
    }
    response
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(ErrorBody { error: message })).into_response()
}

/// How a pool error is answered, and counted.
fn pool_error(e: &PoolError) -> (StatusCode, Option<&'static str>, Outcome) {
    match e {
        PoolError::Busy { .. } => (StatusCode::TOO_MANY_REQUESTS, Some("1"), Outcome::Rejected),
        PoolError::QueueTimeout(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("1"),
            Outcome::Rejected,
        ),
        PoolError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, None, Outcome::Rejected),
        PoolError::Invalid(_) => (StatusCode::BAD_REQUEST, None, Outcome::Invalid),
        PoolError::Restore(_) => (StatusCode::SERVICE_UNAVAILABLE, Some("1"), Outcome::Error),
        PoolError::Config(_) | PoolError::Thread(_) | PoolError::Invoke(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, None, Outcome::Error)
        }
    }
}

/// One request's bookkeeping: id, start, the log line and the metrics.
#[derive(Clone)]
struct RequestLog {
    state: Shared,
    id: String,
    started: Instant,
}

impl RequestLog {
    fn new(state: &Shared) -> Self {
        let n = state.next_id.fetch_add(1, Ordering::Relaxed);
        RequestLog {
            id: format!("{}-{n}", state.id_prefix),
            state: state.clone(),
            started: Instant::now(),
        }
    }

    /// Counts, logs and answers a request that did not run.
    fn refuse(
        &self,
        status: StatusCode,
        retry_after: Option<&'static str>,
        outcome: Outcome,
        message: String,
    ) -> Response {
        self.state.metrics.count(outcome);
        tracing::info!(
            target: "ember::invocation",
            id = %self.id,
            outcome = outcome.as_str(),
            status = status.as_u16(),
            total_ms = api::ms(self.started.elapsed()),
            error = %message,
            "invocation"
        );
        refusal(status, retry_after, message)
    }

    fn pool_error(&self, e: &PoolError) -> Response {
        let (status, retry_after, outcome) = pool_error(e);
        self.refuse(status, retry_after, outcome, e.to_string())
    }

    /// Counts and logs a finished invocation; returns its summary.
    fn finish(&self, result: &PoolOutcome) -> InvocationSummary {
        let total = self.started.elapsed();
        let outcome = if result.outcome.timed_out {
            Outcome::Timeout
        } else {
            Outcome::Ok
        };
        let metrics = &self.state.metrics;
        metrics.count(outcome);
        metrics.observe(result.restore, result.queue, total);
        let summary = InvocationSummary::new(&self.id, result, total);
        let (host, usage) = (&summary.host, &summary.usage);
        tracing::info!(
            target: "ember::invocation",
            id = %self.id,
            outcome = outcome.as_str(),
            status = 200,
            exit_code = summary.exit_code,
            signal = summary.signal,
            timed_out = summary.timed_out,
            output_truncated = summary.output_truncated,
            warm = host.warm,
            restore_ms = host.restore_ms,
            queue_ms = host.queue_ms,
            invoke_ms = host.invoke_ms,
            total_ms = host.total_ms,
            wall_ms = usage.wall_ms,
            cpu_user_ms = usage.cpu_user_ms,
            cpu_sys_ms = usage.cpu_sys_ms,
            max_rss_kib = usage.max_rss_kib,
            "invocation"
        );
        summary
    }

    /// Counts and logs an invocation that failed in its sandbox.
    fn failed(&self, e: &PoolError) -> (StatusCode, String) {
        let (status, _, outcome) = pool_error(e);
        self.state.metrics.count(outcome);
        tracing::warn!(
            target: "ember::invocation",
            id = %self.id,
            outcome = outcome.as_str(),
            status = status.as_u16(),
            total_ms = api::ms(self.started.elapsed()),
            error = %e,
            "invocation"
        );
        (status, e.to_string())
    }
}

#[derive(Debug, Deserialize)]
struct InvokeQuery {
    #[serde(default)]
    stream: bool,
}

async fn invocations(
    State(state): State<Shared>,
    query: Result<Query<InvokeQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let log = RequestLog::new(&state);
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return log.refuse(
                StatusCode::BAD_REQUEST,
                None,
                Outcome::Invalid,
                e.body_text(),
            )
        }
    };
    let Some(pool) = state.pool.clone() else {
        return log.refuse(
            StatusCode::NOT_FOUND,
            None,
            Outcome::Invalid,
            "this server serves no snapshot".into(),
        );
    };
    // Admitted (or 429) before the body is read: at most as many bodies
    // are in memory as there are sandboxes and queue places.
    let Ok(admitted) = state.pool_admission.clone().try_acquire_owned() else {
        let config = pool.config();
        let busy = PoolError::Busy {
            max_live: config.max_live,
            max_queue: config.max_queue,
        };
        return log.pool_error(&busy);
    };
    let body = match read_body(request).await {
        Ok(body) => body,
        Err((status, message)) => return log.refuse(status, None, Outcome::Invalid, message),
    };
    let invocation = match serde_json::from_slice::<InvocationRequest>(&body)
        .map_err(|e| format!("invalid request body: {e}"))
        .and_then(|request| request.into_invocation(&state.limits))
    {
        Ok(invocation) => invocation,
        Err(message) => {
            return log.refuse(StatusCode::BAD_REQUEST, None, Outcome::Invalid, message)
        }
    };
    drop(body);
    // One blocking job takes the sandbox and runs the invocation (so a
    // sandbox restored on demand is used by the thread that restored it).
    // It tells this task once it holds a sandbox, or why not: only then is
    // the status line decided.
    let (head_tx, head_rx) = oneshot::channel::<Option<Response>>();
    let (done_tx, done_rx) = oneshot::channel::<Response>();
    let (events_tx, events_rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    let id = HeaderValue::from_str(&log.id).ok();
    tokio::task::spawn_blocking(move || {
        let _admitted = admitted;
        let lease = match pool.acquire() {
            Ok(lease) => lease,
            Err(e) => {
                let _ = head_tx.send(Some(log.pool_error(&e)));
                return;
            }
        };
        if head_tx.send(None).is_err() {
            // The client went away while it waited: the sandbox goes back.
            drop(lease);
            log.refuse(
                StatusCode::REQUEST_TIMEOUT,
                None,
                Outcome::Cancelled,
                "the client went away before a sandbox was free".into(),
            );
            return;
        }
        if query.stream {
            stream_invocation(&log, lease, &invocation, &events_tx);
        } else {
            let _ = done_tx.send(run_invocation(&log, lease, &invocation));
        }
    });
    match head_rx.await {
        Ok(Some(refusal)) => return refusal,
        Ok(None) => {}
        Err(_) => return task_failed(),
    }
    let response = if query.stream {
        let mut response = Response::new(Body::from_stream(ReceiverStream::new(events_rx)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        response
    } else {
        done_rx.await.unwrap_or_else(|_| task_failed())
    };
    with_id(response, id)
}

/// Reads a request's body, at most the body limit (413 beyond, without
/// buffering the rest) and within [`BODY_READ_TIMEOUT`] (408).
async fn read_body(request: Request) -> Result<Bytes, (StatusCode, String)> {
    use axum::extract::FromRequest;
    match tokio::time::timeout(BODY_READ_TIMEOUT, Bytes::from_request(request, &())).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err((e.status(), e.body_text())),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// The answer when the blocking task serving a request went away.
fn task_failed() -> Response {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the invocation task failed".into(),
    )
}

/// `response` with the invocation's id header, when there is one.
fn with_id(mut response: Response, id: Option<HeaderValue>) -> Response {
    if let Some(id) = id {
        response.headers_mut().insert("x-ember-invocation-id", id);
    }
    response
}

/// Runs the invocation; the JSON answer.
fn run_invocation(log: &RequestLog, lease: Lease, invocation: &Invocation) -> Response {
    match lease.invoke(invocation) {
        Ok(outcome) => {
            Json(InvocationResponse::new(log.finish(&outcome), &outcome)).into_response()
        }
        Err(e) => {
            let (status, message) = log.failed(&e);
            error(status, message)
        }
    }
}

/// How long a streaming response may wait for a client that stopped
/// reading (its buffers and the event channel full) before the invocation
/// is stopped and its sandbox freed.
pub const STREAM_STALL_LIMIT: Duration = Duration::from_secs(10);

/// Runs the invocation, sending NDJSON events to `events`.
///
/// A client that reads slowly slows the sandbox's output down, but no
/// send waits past [`STREAM_STALL_LIMIT`], nor past the invocation's own
/// deadline (its timeout plus that limit): a client that connects and
/// never reads would otherwise hold the sandbox forever. The invocation is
/// then stopped and its sandbox destroyed. A client that went away no
/// longer gets output (the invocation still ends at its timeout).
fn stream_invocation(
    log: &RequestLog,
    lease: Lease,
    invocation: &Invocation,
    events: &mpsc::Sender<Result<Bytes, Infallible>>,
) {
    let runtime = tokio::runtime::Handle::current();
    let deadline =
        Instant::now() + Duration::from_millis(invocation.timeout_ms) + STREAM_STALL_LIMIT;
    let mut stalled = false;
    let mut send = |event: StreamEvent| -> ControlFlow<()> {
        if stalled {
            return ControlFlow::Break(());
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(STREAM_STALL_LIMIT);
        let line = Bytes::from(event.to_line());
        match runtime.block_on(tokio::time::timeout(wait, events.send(Ok(line)))) {
            Ok(_) => ControlFlow::Continue(()),
            Err(_) => {
                stalled = true;
                tracing::warn!(
                    target: "ember::invocation",
                    id = %log.id,
                    stall_ms = api::ms(wait),
                    "the client stopped reading the stream; stopping the invocation"
                );
                ControlFlow::Break(())
            }
        }
    };
    let result = lease.invoke_streaming_until(invocation, |stream, chunk| {
        send(StreamEvent::output(stream, chunk))
    });
    let _ = match result {
        Ok(outcome) => send(StreamEvent::Exit(log.finish(&outcome))),
        Err(e) => {
            let (_, message) = log.failed(&e);
            send(StreamEvent::Error(ErrorBody { error: message }))
        }
    };
}

async fn health(State(state): State<Shared>) -> Response {
    let closed =
        state.functions.is_closed() || state.pool.as_ref().is_some_and(|p| p.stats().closed);
    let (snapshot, pool) = match &state.pool {
        Some(pool) => {
            let stats = pool.stats();
            let config = pool.config();
            (
                serde_json::json!(pool.snapshot().dir().display().to_string()),
                serde_json::json!({
                    "warm": stats.warm,
                    "restoring": stats.restoring,
                    "in_use": stats.in_use,
                    "live": stats.live,
                    "queued": stats.queued,
                    "target_warm": config.warm,
                    "max_live": config.max_live,
                    "max_queue": config.max_queue,
                }),
            )
        }
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };
    let load = state.functions.load();
    let (memory_charged, memory_cap) = state.functions.memory();
    let body = serde_json::json!({
        "status": if closed { "shutting_down" } else { "ok" },
        "snapshot": snapshot,
        "pool": pool,
        "functions": {
            "count": state.functions.len(),
            "live": load.live,
            "queued": load.queued,
            "idle": load.idle,
            "max_live": state.functions.config().max_live,
            "max_queue": state.functions.config().max_queue,
            "max_idle": state.functions.config().max_idle,
            "min_warm": state.functions.config().min_warm_per_function,
            "memory_charged_mib": memory_charged >> 20,
            "max_memory_mib": memory_cap.map(|b| b >> 20),
        },
    });
    let status = if closed {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// Readiness, for a load balancer: 503 at start until each function's
/// warm minimum is made, and once the server drains (its listener closes
/// at SIGTERM too, so a probe then mostly finds no server); 200
/// otherwise. `/v1/health` stays 200 while starting: the process is
/// alive.
async fn ready(State(state): State<Shared>) -> Response {
    let draining =
        state.functions.is_closed() || state.pool.as_ref().is_some_and(|p| p.stats().closed);
    let reason = if draining {
        Some("draining")
    } else if !state.functions.is_warmed() {
        Some("warming")
    } else {
        None
    };
    let body = serde_json::json!({ "ready": reason.is_none(), "reason": reason });
    let status = match reason {
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
        None => StatusCode::OK,
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Shared>) -> Response {
    let pool = state.pool.as_ref().map(|p| p.stats()).unwrap_or_default();
    let functions = state.functions.list();
    let text = state.metrics.render(
        &pool,
        &state.functions.load(),
        functions.iter().map(|f| metrics::FunctionSeries {
            name: &f.name,
            counters: &f.counters,
            live: f.live(),
            idle: state.functions.idle_count(f),
        }),
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "127.0.0.1:0".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
        );
        assert_eq!(
            "unix:/tmp/x.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/tmp/x.sock".into()))
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("localhost".parse::<ListenAddr>().is_err());
        assert_eq!(
            ListenAddr::Unix("/a".into()).to_string(),
            "unix:/a".to_string()
        );
    }
}
