//! The function routes: listing, deploying (`PUT`), status (`GET`),
//! removing (`DELETE`) and invoking functions (see the [server
//! docs](super) for what each answers).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::api::{
    self, flag, FunctionErrorBody, FunctionInfo, FunctionInvocationResponse, FunctionList,
    FunctionQuery, FunctionStatusBody,
};
use super::cancel::{Cancel, CancelOnDrop};
use super::deploy::{tail, DeployError, LOG_TAIL_BYTES};
use super::functions::{Refusal, ServedFunction, Slot};
use super::metrics::FunctionOutcomeKind;
use super::records::{Record, Status};
use super::recycled::RecycledClone;
use super::streaming;
use super::{error, refusal, task_failed, with_id, Shared, BODY_READ_TIMEOUT};
use crate::function::{
    FunctionError, FunctionInvokeOptions, FunctionOutcome, HandlerResult, InvocationPath,
};

/// The listing of a served version (and of the record, if deployed).
fn info(served: Option<&ServedFunction>, record: Option<&Record>, name: &str) -> FunctionInfo {
    let status = record.map_or(Status::Ready, |r| r.latest.status);
    match served {
        Some(f) => {
            let manifest = f.function.manifest();
            FunctionInfo {
                name: name.to_owned(),
                runtime: manifest.runtime.clone(),
                handler: manifest.handler.clone(),
                hot_path: manifest.hot_path.is_some(),
                hot_path_capacity_bytes: f.function.hot_path_capacity(),
                status,
                serving: true,
                deployed: f.deployed,
            }
        }
        None => {
            let settings = record.map(|r| &r.latest.version.settings);
            FunctionInfo {
                name: name.to_owned(),
                runtime: settings.map_or_else(String::new, |s| s.runtime.clone()),
                handler: settings.map_or_else(String::new, |s| s.handler.clone()),
                hot_path: false,
                hot_path_capacity_bytes: 0,
                status,
                serving: false,
                deployed: true,
            }
        }
    }
}

fn status_body(state: &Shared, name: &str) -> Option<FunctionStatusBody> {
    let served = state.functions.get(name);
    let record = state.deployer.as_ref().and_then(|d| d.record(name));
    if served.is_none() && record.is_none() {
        return None;
    }
    let latest = record.as_ref().map(|r| &r.latest);
    let active = record
        .as_ref()
        .and_then(|r| r.active.clone())
        .filter(|a| Some(a) != latest.map(|l| &l.version));
    Some(FunctionStatusBody {
        info: info(served.as_deref(), record.as_ref(), name),
        status_url: format!("/v1/functions/{name}"),
        invocations_url: format!("/v1/functions/{name}/invocations"),
        settings: latest.map(|l| l.version.settings.clone()),
        template: latest.map(|l| l.version.template.clone()),
        bundle_sha256: latest.map(|l| l.version.bundle_sha256.clone()),
        created_unix_ms: latest.map(|l| l.version.created_unix_ms),
        updated_unix_ms: latest.map(|l| l.updated_unix_ms),
        log_tail: latest.and_then(|l| l.log_tail.clone()),
        active,
    })
}

pub(super) async fn list_functions(State(state): State<Shared>) -> Response {
    let records: BTreeMap<String, Record> = state
        .deployer
        .as_ref()
        .map(|d| {
            d.records()
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect()
        })
        .unwrap_or_default();
    let mut functions: BTreeMap<String, FunctionInfo> = state
        .functions
        .list()
        .into_iter()
        .map(|f| {
            (
                f.name.clone(),
                info(Some(&f), records.get(&f.name), &f.name),
            )
        })
        .collect();
    for (name, record) in &records {
        functions
            .entry(name.clone())
            .or_insert_with(|| info(None, Some(record), name));
    }
    Json(FunctionList {
        functions: functions.into_values().collect(),
    })
    .into_response()
}

/// The path's name, or why it has none.
fn name_of(name: Result<Path<String>, PathRejection>) -> Result<String, String> {
    name.map(|Path(n)| n).map_err(|e| e.body_text())
}

pub(super) async fn get_function(
    State(state): State<Shared>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = match name_of(name) {
        Ok(name) => name,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match status_body(&state, &name) {
        Some(body) => Json(body).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no function {name:?}")),
    }
}

/// The answer to a deployment that cannot go on.
fn deploy_error(e: &DeployError) -> Response {
    let (status, retry_after) = match e {
        DeployError::BadRequest(_) => (StatusCode::BAD_REQUEST, None),
        DeployError::TooLarge(..) => (StatusCode::PAYLOAD_TOO_LARGE, None),
        DeployError::NotFound(_) => (StatusCode::NOT_FOUND, None),
        DeployError::Conflict(_) => (StatusCode::CONFLICT, None),
        DeployError::Busy { .. } => (StatusCode::TOO_MANY_REQUESTS, Some("5")),
        DeployError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
    };
    refusal(status, retry_after, e.to_string())
}

/// Why a body could not be read.
enum ReadError {
    /// Over the limit: this many bytes or more (the rest is unread).
    TooLarge(u64),
    /// Broken off, or too slow.
    Failed(StatusCode, String),
}

/// Reads a body: at most `max` bytes, within [`BODY_READ_TIMEOUT`] (408).
async fn read_limited(request: Request, max: usize) -> Result<Bytes, ReadError> {
    use tokio_stream::StreamExt;
    let mut stream = request.into_body().into_data_stream();
    let read = async {
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ReadError::Failed(StatusCode::BAD_REQUEST, e.to_string()))?;
            if bytes.len() + chunk.len() > max {
                return Err(ReadError::TooLarge((bytes.len() + chunk.len()) as u64));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(bytes))
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(ReadError::Failed(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )),
    }
}

pub(super) async fn put_function(
    State(state): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let name = match name_of(name) {
        Ok(name) => name,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let Some(deployer) = state.deployer.clone() else {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "this server takes no deployments (no data directory)".into(),
        );
    };
    // Name, settings and a build place before a byte of the bundle.
    let admitted = match deployer.admit(&name, query.as_deref().unwrap_or_default()) {
        Ok(admitted) => admitted,
        Err(e) => return deploy_error(&e),
    };
    let max = deployer.max_bundle_bytes();
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > max as u64) {
        return deploy_error(&DeployError::TooLarge(len, max));
    }
    let bundle = match read_limited(request, max).await {
        Ok(bundle) => bundle,
        Err(ReadError::TooLarge(len)) => return deploy_error(&DeployError::TooLarge(len, max)),
        Err(ReadError::Failed(status, message)) => return error(status, message),
    };
    match deployer.accept(admitted, bundle).await {
        Ok(_) => {
            let body = status_body(&state, &name);
            let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
            if let Ok(location) = HeaderValue::from_str(&format!("/v1/functions/{name}")) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Err(e) => deploy_error(&e),
    }
}

pub(super) async fn delete_function(
    State(state): State<Shared>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = match name_of(name) {
        Ok(name) => name,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let result = match &state.deployer {
        Some(deployer) => deployer.delete(&name).await,
        None if state.functions.get(&name).is_some() => Err(DeployError::Conflict(format!(
            "{name} is served from the --functions directory, which is read-only"
        ))),
        None => Err(DeployError::NotFound(name)),
    };
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => deploy_error(&e),
    }
}

/// One function request's bookkeeping: id, start, the log line and the
/// metrics.
struct FunctionLog {
    state: Shared,
    id: String,
    function: String,
    served: Option<Arc<ServedFunction>>,
    started: Instant,
}

impl FunctionLog {
    fn new(state: &Shared, function: &str) -> Self {
        let n = state.next_id.fetch_add(1, Ordering::Relaxed);
        FunctionLog {
            id: format!("{}-{n}", state.id_prefix),
            state: state.clone(),
            function: function.to_string(),
            served: state.functions.get(function),
            started: Instant::now(),
        }
    }

    /// Counts, logs and answers a request that did not run.
    fn refuse(
        &self,
        status: StatusCode,
        retry_after: Option<&'static str>,
        kind: FunctionOutcomeKind,
        message: String,
    ) -> Response {
        if let Some(served) = &self.served {
            served.counters.count(kind, None);
        }
        tracing::info!(
            target: "ember::function",
            id = %self.id,
            function = %self.function,
            outcome = kind.as_str(),
            status = status.as_u16(),
            total_ms = api::ms(self.started.elapsed()),
            error = %message,
            "invocation"
        );
        refusal(status, retry_after, message)
    }

    /// Runs `event` in a clone of `function` (blocking) and answers; a
    /// recycled clone in a jailed worker is killed if `cancel` fires.
    fn run(
        &self,
        function: &ServedFunction,
        event: &[u8],
        options: &FunctionInvokeOptions,
        slot: Slot,
        envelope: bool,
        cancel: &Cancel,
    ) -> Response {
        let queued = slot.queued;
        function.counters.observe_queue(queued);
        let functions = &self.state.functions;
        let lease = match functions.lease(function) {
            Ok(lease) => lease,
            Err(refusal) => {
                return self.refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    Some("1"),
                    FunctionOutcomeKind::Rejected,
                    refusal.to_string(),
                )
            }
        };
        let result = if functions.recycles(function) {
            functions
                .recycled_clone(function, lease, options)
                .and_then(|(clone, made)| {
                    let armed = match &clone.clone {
                        RecycledClone::Jailed(jailed) => {
                            jailed.worker_pid().is_none_or(|pid| cancel.arm(pid))
                        }
                        RecycledClone::InProcess(_) => !cancel.is_cancelled(),
                    };
                    if !armed {
                        // Killed before it ran: dropped (reaped) here.
                        drop(clone);
                        return Err(FunctionError::Worker("cancelled".into()));
                    }
                    functions.invoke_in(function, (clone, made), event, options, Some(cancel))
                })
        } else {
            // A fresh clone, destroyed by the invocation; its charge is
            // held until then. Its jailed worker is killed if the client
            // goes away.
            let _charge = lease;
            let result = function
                .function
                .invoke_watched(event, options, |pid| cancel.arm(pid));
            cancel.disarm();
            result
        };
        // The invocation is over (its clone destroyed or idle): its slot
        // is free.
        drop(slot);
        if cancel.is_cancelled() {
            let kind = FunctionOutcomeKind::Cancelled;
            function.counters.count(kind, None);
            tracing::info!(
                target: "ember::function",
                id = %self.id,
                function = %function.name,
                outcome = kind.as_str(),
                status = 499,
                total_ms = api::ms(self.started.elapsed()),
                "invocation"
            );
            return error(
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "the client went away; the invocation was cancelled".into(),
            );
        }
        match result {
            Ok(outcome) => self.answer(function, event, &outcome, queued, envelope, options),
            Err(e) => {
                let (status, kind) = match e {
                    FunctionError::BadRequest(_) => {
                        (StatusCode::BAD_REQUEST, FunctionOutcomeKind::Invalid)
                    }
                    _ => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        FunctionOutcomeKind::Failed,
                    ),
                };
                function.counters.count(kind, None);
                tracing::warn!(
                    target: "ember::function",
                    id = %self.id,
                    function = %function.name,
                    outcome = kind.as_str(),
                    status = status.as_u16(),
                    event_bytes = event.len(),
                    total_ms = api::ms(self.started.elapsed()),
                    error = %e,
                    "invocation"
                );
                let body = FunctionErrorBody {
                    error: e.to_string(),
                    kind: if status == StatusCode::BAD_REQUEST {
                        "invalid"
                    } else {
                        "failed"
                    },
                    error_type: None,
                    message: None,
                    traceback: None,
                    id: self.id.clone(),
                };
                (status, Json(body)).into_response()
            }
        }
    }

    /// Counts, logs and answers a finished invocation.
    fn answer(
        &self,
        function: &ServedFunction,
        event: &[u8],
        outcome: &FunctionOutcome,
        queued: Duration,
        envelope: bool,
        options: &FunctionInvokeOptions,
    ) -> Response {
        let metrics = &self.state.metrics;
        let kind = FunctionOutcomeKind::of(&outcome.result);
        let t = &outcome.timings;
        function.counters.count(kind, Some(outcome.path));
        function.counters.observe_run(t.run);
        metrics.observe_function(outcome.path, t.restore + t.run);
        let body = FunctionInvocationResponse::new(&self.id, &function.name, outcome, queued);
        let (status, mut response) = if envelope {
            (StatusCode::OK, Json(&body).into_response())
        } else {
            result_response(&self.id, outcome, options)
        };
        *response.status_mut() = status;
        let path = path_label(outcome.path);
        tracing::info!(
            target: "ember::function",
            id = %self.id,
            function = %function.name,
            outcome = kind.as_str(),
            status = status.as_u16(),
            path,
            event_bytes = event.len(),
            output_truncated = outcome.output_truncated,
            queue_ms = body.timings_ms.queue,
            restore_ms = body.timings_ms.restore,
            run_ms = body.timings_ms.run,
            handler_ms = body.timings_ms.handler,
            teardown_ms = body.timings_ms.teardown,
            invoke_ms = body.timings_ms.total,
            total_ms = api::ms(self.started.elapsed()),
            "invocation"
        );
        let t = &body.timings_ms;
        let mut timings = format!("queue={};restore={};run={}", t.queue, t.restore, t.run);
        if let Some(handler) = t.handler {
            timings.push_str(&format!(";handler={handler}"));
        }
        timings.push_str(&format!(
            ";teardown={};total={}",
            t.teardown,
            api::ms(self.started.elapsed())
        ));
        let mut headers = vec![
            ("ember-invocation-id", self.id.clone()),
            ("ember-timings", timings),
            ("ember-path", path.to_owned()),
            ("ember-outcome", kind.as_str().to_owned()),
        ];
        if let Some(r) = &body.recycle {
            headers.push((
                "ember-recycle",
                format!(
                    "invocation={};reused={};reset_ms={}",
                    r.invocation, r.reused, r.reset_ms
                ),
            ));
        }
        if outcome.output_truncated {
            headers.push(("ember-output-truncated", "true".into()));
        }
        for (name, value) in headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(name), value);
            }
        }
        response
    }
}

fn path_label(path: InvocationPath) -> &'static str {
    match path {
        InvocationPath::Hot => "hot",
        InvocationPath::HotWithVsockResult => "hot_with_vsock_result",
        InvocationPath::Vsock => "vsock",
    }
}

/// The handler's result as the answer: its JSON (200), its bytes (200,
/// `application/octet-stream`), or an error: raised 500, runtime gone
/// 502, timed out 504.
fn result_response(
    id: &str,
    outcome: &FunctionOutcome,
    options: &FunctionInvokeOptions,
) -> (StatusCode, Response) {
    let error_body = |error: String, kind: &'static str| FunctionErrorBody {
        error,
        kind,
        error_type: None,
        message: None,
        traceback: None,
        id: id.to_owned(),
    };
    match &outcome.result {
        HandlerResult::Json { value } => (StatusCode::OK, Json(value).into_response()),
        HandlerResult::Bytes { bytes } => (
            StatusCode::OK,
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                )],
                bytes.clone(),
            )
                .into_response(),
        ),
        HandlerResult::Error {
            error_type,
            message,
            traceback,
        } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(FunctionErrorBody {
                error_type: Some(error_type.clone()),
                message: Some(message.clone()),
                traceback: Some(tail(traceback, LOG_TAIL_BYTES)),
                ..error_body(
                    format!("the handler raised {error_type}: {message}"),
                    "error",
                )
            })
            .into_response(),
        ),
        HandlerResult::TimedOut => (
            StatusCode::GATEWAY_TIMEOUT,
            Json(error_body(
                format!(
                    "the handler ran past its timeout of {} ms",
                    options.timeout.as_millis()
                ),
                "timed_out",
            ))
            .into_response(),
        ),
        HandlerResult::RuntimeExited { status } => (
            StatusCode::BAD_GATEWAY,
            Json(error_body(
                format!("the runtime ended without answering: {status}"),
                "runtime_exited",
            ))
            .into_response(),
        ),
    }
}

/// The answer for a name no version serves: building (503), failed
/// (409) or unknown (404).
fn not_served(state: &Shared, log: &FunctionLog, name: &str) -> Response {
    let record = state.deployer.as_ref().and_then(|d| d.record(name));
    let (status, retry_after, message) = match record.map(|r| r.latest.status) {
        Some(Status::Building) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("5"),
            format!("function {name:?} is building; try again once GET /v1/functions/{name} says ready"),
        ),
        Some(Status::Failed) => (
            StatusCode::CONFLICT,
            None,
            format!("function {name:?} failed to build (GET /v1/functions/{name} has the log); deploy it again"),
        ),
        _ => (StatusCode::NOT_FOUND, None, format!("no function {name:?}")),
    };
    log.refuse(status, retry_after, FunctionOutcomeKind::Invalid, message)
}

pub(super) async fn function_invocations(
    State(state): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<FunctionQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let name = match name_of(name) {
        Ok(name) => name,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let log = FunctionLog::new(&state, &name);
    let Some(mut served) = log.served.clone() else {
        return not_served(&state, &log, &name);
    };
    let invalid = |status, message| log.refuse(status, None, FunctionOutcomeKind::Invalid, message);
    let parsed = query.map_err(|e| e.body_text()).and_then(|Query(mut q)| {
        let envelope = flag("envelope", q.envelope.as_deref())?;
        let stream = flag("stream", q.stream.as_deref())?;
        if q.timeout_ms.is_none() {
            q.timeout_ms = served
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
                .map(|t| t.min(state.limits.max_timeout_ms));
        }
        Ok((q.into_options(&state.limits)?, envelope, stream))
    });
    let (options, envelope, stream) = match parsed {
        Ok(parsed) => parsed,
        Err(message) => return invalid(StatusCode::BAD_REQUEST, message),
    };
    let framing = streaming::Framing::for_request(request.headers());
    // Larger events would not fit one agent frame on the vsock path: an
    // event declared larger is refused before it is admitted or read.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > state.limits.max_input_bytes as u64) {
        return invalid(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the event is {len} bytes, over the limit of {}",
                state.limits.max_input_bytes
            ),
        );
    }
    // Admitted (or 429) before the body is read: at most as many events
    // are in memory as there are clone slots and queue places.
    let Ok(admitted) = state.function_admission.clone().try_acquire_owned() else {
        let config = state.functions.config();
        return log.refuse(
            StatusCode::TOO_MANY_REQUESTS,
            Some("1"),
            FunctionOutcomeKind::Rejected,
            Refusal::Busy {
                max_live: config.max_live,
                max_queue: config.max_queue,
            }
            .to_string(),
        );
    };
    // Without a declared length (chunked), the limit holds as it is
    // read: never more than the event limit buffered per admission.
    let max = state.limits.max_input_bytes;
    let event = match read_limited(request, max).await {
        Ok(body) => body,
        Err(ReadError::TooLarge(len)) => {
            return invalid(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the event is {len} bytes or more, over the limit of {max}"),
            )
        }
        Err(ReadError::Failed(status, message)) => return invalid(status, message),
    };
    // A version replaced while this waited: the new one serves it.
    let mut tries = 0;
    let slot = loop {
        match state.functions.acquire(&served).await {
            Ok(slot) => break slot,
            Err(Refusal::Retired) if tries == 0 => {
                tries += 1;
                match state.functions.get(&name) {
                    Some(now) => served = now,
                    None => return not_served(&state, &log, &name),
                }
            }
            Err(refusal) => {
                let (status, retry_after) = match refusal {
                    Refusal::Busy { .. }
                    | Refusal::FunctionBusy { .. }
                    | Refusal::MemoryFull { .. } => (StatusCode::TOO_MANY_REQUESTS, Some("1")),
                    Refusal::QueueTimeout(_) | Refusal::Retired => {
                        (StatusCode::SERVICE_UNAVAILABLE, Some("1"))
                    }
                    Refusal::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, None),
                };
                return log.refuse(
                    status,
                    retry_after,
                    FunctionOutcomeKind::Rejected,
                    refusal.to_string(),
                );
            }
        }
    };
    let id = HeaderValue::from_str(&log.id).ok();
    let live = stream.then(|| streaming::LiveOutput::new(options.max_output_bytes));
    let sink = live.as_ref().map(streaming::LiveOutput::sink);
    let functions = state.functions.clone();
    let cancel = Arc::new(Cancel::default());
    // Dropped with this future when the client goes away: the worker
    // running the invocation is killed and the slot freed.
    let mut on_drop = CancelOnDrop(Some(cancel.clone()));
    let run = tokio::task::spawn_blocking(move || {
        let _admitted = admitted;
        let options = FunctionInvokeOptions {
            isolation: functions.config().isolation.clone(),
            output: sink,
            cancel: Some(cancel.token()),
            ..options
        };
        log.run(&served, &event, &options, slot, envelope || stream, &cancel)
    });
    if let Some(live) = live {
        return with_id(streaming::answer(run, on_drop, live, framing), id);
    }
    let answer = run.await;
    on_drop.0 = None;
    with_id(answer.unwrap_or_else(|_| task_failed()), id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use std::convert::Infallible;

    fn chunked(chunks: usize, size: usize) -> Request {
        let stream = tokio_stream::iter(
            (0..chunks).map(move |_| Ok::<_, Infallible>(Bytes::from(vec![7u8; size]))),
        );
        Request::new(Body::from_stream(stream))
    }

    /// A body without a declared length is cut off at the limit as it
    /// is read, not buffered whole first.
    #[test]
    fn bodies_are_read_up_to_the_limit_only() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let read = read_limited(chunked(4, 10), 40).await;
            assert!(read.is_ok_and(|b| b.len() == 40));
            match read_limited(chunked(1000, 10), 45).await {
                Err(ReadError::TooLarge(seen)) => assert_eq!(seen, 50),
                _ => panic!("over the limit"),
            }
        });
    }
}
