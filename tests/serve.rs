//! `ember serve` with real microVMs: concurrency, the queue limit, request
//! caps, metrics, the OpenAPI document, functions and graceful shutdown.
//! Servers run in this process (`ember::server::serve` on a loopback port
//! or a Unix socket) or as a child `ember serve`; every sandbox is restored
//! from the suite's shared snapshot, every function clone from the probe
//! function's template (the one tests/function.rs uses).

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember::function::Function;
use ember::pool::{Pool, PoolConfig};
use ember::server::api::Limits;
use ember::server::client::{Client, Target};
use ember::server::functions::{FunctionSet, FunctionSetConfig};
use ember::server::{self, ListenAddr, Listener, ServerConfig, Services};
use serde_json::{json, Value};

/// Upper bound for one request on these (slow, shared) test hosts.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// A server running in this process on its own runtime.
struct TestServer {
    runtime: tokio::runtime::Runtime,
    target: Target,
    pool: Arc<Pool>,
    functions: Option<Arc<FunctionSet>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<Result<(), server::ServerError>>>,
}

impl TestServer {
    fn start(pool_config: PoolConfig, limits: Limits, listen: ListenAddr) -> Self {
        Self::start_with(pool_config, limits, listen, None)
    }

    /// A server of the shared snapshot's pool and `functions`.
    fn start_with(
        pool_config: PoolConfig,
        limits: Limits,
        listen: ListenAddr,
        functions: Option<Arc<FunctionSet>>,
    ) -> Self {
        Self::start_config(
            pool_config,
            ServerConfig::with_limits(limits),
            listen,
            functions,
        )
    }

    /// A server of the shared snapshot's pool and `functions`, configured
    /// as `config` says.
    fn start_config(
        pool_config: PoolConfig,
        config: ServerConfig,
        listen: ListenAddr,
        functions: Option<Arc<FunctionSet>>,
    ) -> Self {
        let snapshot = ember::snapshot::Snapshot::open(common::shared_snapshot().dir())
            .expect("shared snapshot opens");
        let pool = Arc::new(Pool::new(Arc::new(snapshot), pool_config).expect("pool starts"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(Listener::bind(&listen))
            .expect("server binds");
        let target = match listener.local_addr().expect("bound address") {
            ListenAddr::Tcp(addr) => Target::Tcp(addr),
            ListenAddr::Unix(path) => Target::Unix(path),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let services = Services {
            pool: Some(pool.clone()),
            functions: functions.clone(),
            deploy: None,
        };
        let done = runtime.spawn(server::serve(listener, services, config, async move {
            let _ = stopped.await;
        }));
        TestServer {
            runtime,
            target,
            pool,
            functions,
            stop: Some(stop),
            done: Some(done),
        }
    }

    fn client(&self) -> Client {
        Client::new(self.target.clone(), REQUEST_TIMEOUT)
    }

    /// Shuts the server down and checks that no sandbox is left.
    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            self.runtime
                .block_on(done)
                .expect("server task")
                .expect("server ends cleanly");
        }
        let stats = self.pool.stats();
        assert!(stats.closed);
        assert_eq!(stats.live, 0, "no sandbox outlives the server: {stats:?}");
        if let Some(functions) = &self.functions {
            assert_eq!(
                functions.load().live,
                0,
                "no function clone outlives the server"
            );
        }
        if let Target::Unix(path) = &self.target {
            assert!(!path.exists(), "the socket file is removed");
        }
    }
}

fn invoke(client: &mut Client, body: Value) -> ember::server::client::Response {
    client
        .post_json("/v1/invocations", &body)
        .expect("request answered")
}

// --- Prometheus text format -------------------------------------------

/// Parses the Prometheus text format strictly enough to catch mistakes:
/// every sample belongs to a family declared with `# TYPE`, names and
/// labels are well-formed, values are numbers, histogram buckets are
/// cumulative and end in `+Inf` = `_count`. Returns samples by
/// `name{labels}`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(valid_name(name), "{line}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{line}"
                    );
                    assert!(
                        types.insert(name.into(), kind.into()).is_none(),
                        "family declared twice: {line}"
                    );
                }
                (Some("HELP"), Some(name), _) => assert!(valid_name(name), "{line}"),
                _ => {}
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("labels end with }");
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').expect("label has =");
                    assert!(valid_name(k), "{line}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "{line}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(valid_name(name), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no # TYPE before {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate {series}"
        );
    }
    // Histograms: per series (the labels besides `le`), cumulative
    // buckets ending in `+Inf` = `_count`, and a `_sum`.
    let mut series: HashMap<(String, String), Vec<(f64, f64)>> = HashMap::new();
    for (sample, v) in &samples {
        let Some((name, labels)) = sample.split_once('{') else {
            continue;
        };
        let Some(family) = name.strip_suffix("_bucket") else {
            continue;
        };
        if types.get(family).map(String::as_str) != Some("histogram") {
            continue;
        }
        let labels = labels.strip_suffix('}').expect("labels end with }");
        let mut le = None;
        let mut rest = Vec::new();
        for pair in labels.split(',') {
            match pair.strip_prefix("le=") {
                Some(bound) => le = Some(bound.trim_matches('"').to_string()),
                None => rest.push(pair),
            }
        }
        let le = le.unwrap_or_else(|| panic!("{sample} has no le"));
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or_else(|_| panic!("bad le in {sample}"))
        };
        series
            .entry((family.to_string(), rest.join(",")))
            .or_default()
            .push((le, *v));
    }
    for (family, kind) in &types {
        if kind == "histogram" {
            assert!(
                series.keys().any(|(f, _)| f == family),
                "{family} has buckets"
            );
        }
    }
    for ((family, labels), mut buckets) in series {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{family}{{{labels}}} buckets are cumulative"
        );
        let inf = buckets.last().expect("buckets");
        assert_eq!(
            inf.0,
            f64::INFINITY,
            "{family}{{{labels}}} has a +Inf bucket"
        );
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        assert_eq!(
            Some(&inf.1),
            samples.get(&format!("{family}_count{braced}")),
            "{family}{braced}"
        );
        assert!(samples.contains_key(&format!("{family}_sum{braced}")));
    }
    samples
}

fn metrics(client: &mut Client) -> HashMap<String, f64> {
    let r = client.request("GET", "/metrics", None).expect("metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    parse_prometheus(&String::from_utf8(r.body).expect("metrics are UTF-8"))
}

fn outcome_count(m: &HashMap<String, f64>, outcome: &str) -> f64 {
    m[&format!("ember_invocations_total{{outcome=\"{outcome}\"}}")]
}

// --- Functions ------------------------------------------------------------

use common::probe_template;

/// A functions directory: `probe` (a symlink to the probe template), plus
/// entries that are not functions.
fn functions_dir(name: &str) -> PathBuf {
    let dir = common::temp_path(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("not-a-function")).unwrap();
    std::os::unix::fs::symlink(probe_template(), dir.join("probe")).unwrap();
    std::os::unix::fs::symlink(probe_template(), dir.join("bad name")).unwrap();
    std::fs::write(dir.join("README"), "not a function").unwrap();
    dir
}

fn function_metric(m: &HashMap<String, f64>, outcome: &str, path: &str) -> f64 {
    m[&format!(
        "ember_function_invocations_total{{function=\"probe\",outcome=\"{outcome}\",path=\"{path}\"}}"
    )]
}

// --- Tests --------------------------------------------------------------

#[test]
fn twenty_concurrent_invocations_succeed_and_are_counted() {
    let server = TestServer::start(
        PoolConfig {
            warm: 4,
            max_live: 8,
            max_queue: 32,
            queue_timeout: REQUEST_TIMEOUT,
            ..PoolConfig::default()
        },
        Limits::default(),
        "127.0.0.1:0".parse().unwrap(),
    );
    let results: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let mut client = server.client();
                scope.spawn(move || {
                    let r = invoke(
                        &mut client,
                        json!({
                            // Shell builtins only: a fork costs ~0.5 s of
                            // emulated guest kernel time on PVM hosts.
                            "argv": ["sh", "-c", "echo \"$N\"; read -r l; echo \"$l\"; read -r f < in.txt; echo \"$f\" >&2"],
                            "env": {"N": format!("n{i}")},
                            "stdin": format!("stdin {i}\n"),
                            "files_in": [{"path": "in.txt", "data_b64": "ZmlsZQ=="}],
                            "timeout_ms": 120000,
                        }),
                    );
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    assert!(r.header("x-ember-invocation-id").is_some());
                    r.json().expect("JSON body")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    for (i, body) in results.iter().enumerate() {
        assert_eq!(body["exit_code"], 0, "{body}");
        assert_eq!(body["stdout"], format!("n{i}\nstdin {i}\n"), "{body}");
        assert_eq!(body["stderr"], "file\n", "{body}");
        assert_eq!(body["timed_out"], false);
        assert!(body["usage"]["wall_ms"].as_u64().is_some_and(|w| w > 0));
        assert!(body["host"]["restore_ms"].as_f64().is_some_and(|r| r > 0.0));
        assert!(body["host"]["warm"].is_boolean());
    }
    let warm = results.iter().filter(|b| b["host"]["warm"] == true).count();
    assert!(warm >= 1, "the warm pool served some");

    let mut client = server.client();
    let m = metrics(&mut client);
    assert_eq!(outcome_count(&m, "ok"), 20.0);
    assert_eq!(outcome_count(&m, "error"), 0.0);
    assert_eq!(m["ember_invocation_duration_ms_count"], 20.0);
    assert_eq!(m["ember_restore_duration_ms_count"], 20.0);
    assert_eq!(m["ember_pool_acquired_total{origin=\"warm\"}"], warm as f64);
    assert!(m["ember_restores_total"] >= 20.0);
    assert!(m["ember_pool_live"] <= 8.0);
    assert_eq!(m["ember_pool_in_use"], 0.0);
    server.stop();
}

/// POSTs to `uri` of the server at `path` on a fresh connection, declaring
/// a JSON body of `declared` bytes but sending none of it, and returns the
/// raw answer. For refusals made before the body is read: a server that
/// refuses a body closes the connection with it unread, and the kernel may
/// then report a reset to a client still sending before it reads the
/// answer; a body never sent cannot race.
fn refused_before_the_body(path: &Path, uri: &str, declared: usize) -> (u16, Value, String) {
    let mut raw = std::os::unix::net::UnixStream::connect(path).expect("connect");
    raw.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    std::io::Write::write_all(
        &mut raw,
        format!(
            "POST {uri} HTTP/1.1\r\nHost: localhost\r\n\
             Content-Type: application/json\r\nContent-Length: {declared}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut raw, &mut answer);
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, body, head.to_ascii_lowercase())
}

#[test]
fn full_queue_gets_429_and_requests_over_the_caps_get_400() {
    let limits = Limits {
        max_timeout_ms: 60_000,
        max_body_bytes: 1 << 20,
        ..Limits::default()
    };
    let socket = common::temp_path("serve-queue.sock");
    let server = TestServer::start(
        PoolConfig {
            warm: 1,
            max_live: 1,
            max_queue: 0,
            queue_timeout: REQUEST_TIMEOUT,
            ..PoolConfig::default()
        },
        limits,
        ListenAddr::Unix(socket),
    );
    // Hold the only sandbox with a streaming invocation; its first output
    // says it is running.
    let (started_tx, started_rx) = mpsc::channel();
    let mut long_client = server.client();
    let long = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let mut events = Vec::new();
        let mut started = Some(started_tx);
        let (status, headers) = long_client
            .request_streaming(
                "POST",
                "/v1/invocations?stream=true",
                Some(br#"{"argv":["sh","-c","echo started; sleep 2; echo done >&2"]}"#),
                |chunk| {
                    buffer.extend_from_slice(chunk);
                    while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=end).collect();
                        let event: Value = serde_json::from_slice(&line).expect("NDJSON line");
                        if event["type"] == "stdout" {
                            if let Some(tx) = started.take() {
                                let _ = tx.send(());
                            }
                        }
                        events.push(event);
                    }
                },
            )
            .expect("streaming request");
        assert!(buffer.is_empty(), "the stream ends with a newline");
        (status, headers, events)
    });
    started_rx
        .recv_timeout(REQUEST_TIMEOUT)
        .expect("the long invocation starts");

    // While the queue is full, a request is refused before its body is
    // read (here: before it is even sent).
    let Target::Unix(path) = server.target.clone() else {
        unreachable!("a Unix socket server")
    };
    let (status, body, head) = refused_before_the_body(&path, "/v1/invocations", 64);
    assert_eq!(status, 429, "{head}{body}");
    assert!(
        head.lines().any(|l| l
            .strip_prefix("retry-after: ")
            .is_some_and(|v| v.trim().parse::<u64>().is_ok())),
        "{head}"
    );
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("busy")),
        "{body}"
    );
    let (status, _, _) = refused_before_the_body(&path, "/v1/invocations", 9);
    assert_eq!(status, 429);

    let (status, headers, events) = long.join().expect("long invocation thread");
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/x-ndjson"));
    let last = events.last().expect("events");
    assert_eq!(last["type"], "exit", "{events:?}");
    assert_eq!(last["exit_code"], 0);
    let text = |kind: &str| -> String {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .filter_map(|e| e["data"].as_str())
            .collect()
    };
    assert_eq!(text("stdout"), "started\n");
    assert_eq!(text("stderr"), "done\n");

    // Over the caps, or malformed: 400 with a message, no sandbox used
    // (once the queue has room: admission comes first).
    let mut client = server.client();
    let bad = [
        (
            json!({"argv": ["true"], "timeout_ms": 60_001}),
            "timeout_ms",
        ),
        (
            json!({"argv": ["true"], "max_output_bytes": 1u64 << 40}),
            "max_output_bytes",
        ),
        (
            json!({"argv": ["echo", "x".repeat(300 << 10)]}),
            "argv and env",
        ),
        (json!({"argv": []}), "argv is empty"),
        (json!({"argv": ["true"], "stdin_b64": "%%%"}), "base64"),
        (json!({"argv": ["true"], "surprise": 1}), "unknown field"),
        (json!({"argv": "true"}), "invalid request body"),
    ];
    for (body, needle) in &bad {
        let r = invoke(&mut client, body.clone());
        assert_eq!(r.status, 400, "{body}");
        let error = r.json().expect("JSON error")["error"].clone();
        assert!(
            error.as_str().is_some_and(|e| e.contains(needle)),
            "{needle:?} in {error}"
        );
    }
    let r = client
        .request("POST", "/v1/invocations", Some(b"{not json"))
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.json().unwrap()["error"].is_string());
    let r = client
        .request("POST", "/v1/invocations?stream=maybe", Some(b"{}"))
        .unwrap();
    assert_eq!(r.status, 400);
    // Over the body limit: 413, answered on the declared length.
    let (status, body, head) = refused_before_the_body(&path, "/v1/invocations", 2 << 20);
    assert_eq!(status, 413, "{head}{body}");
    assert!(body["error"].is_string(), "{body}");
    let mut client = server.client();
    let r = client.request("GET", "/nowhere", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.json().unwrap()["error"].is_string());

    let m = metrics(&mut client);
    assert_eq!(outcome_count(&m, "ok"), 1.0);
    assert_eq!(outcome_count(&m, "rejected"), 2.0);
    // The 413 is answered on the declared length, before the request is
    // an invocation: it is not counted as one.
    assert_eq!(outcome_count(&m, "invalid"), (bad.len() + 2) as f64);
    assert_eq!(m["ember_pool_in_use"], 0.0);
    server.stop();
}

#[test]
fn pool_api_warm_on_demand_and_shutdown() {
    let snapshot = Arc::new(
        ember::snapshot::Snapshot::open(common::shared_snapshot().dir()).expect("snapshot opens"),
    );
    // `Pool::new` returns with its first warm sandbox restored.
    let pool = Pool::new(
        snapshot.clone(),
        PoolConfig {
            warm: 1,
            max_live: 1,
            max_queue: 0,
            ..PoolConfig::default()
        },
    )
    .expect("pool starts");
    assert_eq!(pool.stats().warm, 1);
    let lease = pool.acquire().expect("a warm sandbox");
    assert!(lease.warm());
    assert!(matches!(
        pool.invoke(&common::sh("true")),
        Err(ember::pool::PoolError::Busy { .. })
    ));
    let result = lease.invoke(&common::sh("echo warm")).expect("invocation");
    assert_eq!(result.outcome.stdout, b"warm\n");
    assert!(result.warm && result.restore > Duration::ZERO);
    assert!(matches!(
        pool.invoke(&ember::Invocation::new(Vec::<String>::new())),
        Err(ember::pool::PoolError::Invalid(_))
    ));
    pool.shutdown();
    assert_eq!(pool.stats().live, 0);
    assert!(matches!(
        pool.acquire(),
        Err(ember::pool::PoolError::ShuttingDown)
    ));

    // Without a warm pool every sandbox is restored on demand.
    let cold = Pool::new(
        snapshot,
        PoolConfig {
            warm: 0,
            ..PoolConfig::default()
        },
    )
    .expect("pool starts");
    assert_eq!(cold.stats().live, 0);
    let result = cold.invoke(&common::sh("echo cold")).expect("invocation");
    assert_eq!(result.outcome.stdout, b"cold\n");
    assert!(!result.warm);
    let stats = cold.stats();
    assert_eq!((stats.on_demand, stats.warm_hits, stats.live), (1, 0, 0));
}

#[test]
fn shutdown_kills_isolated_workers_that_outlive_the_grace() {
    let snapshot = Arc::new(
        ember::snapshot::Snapshot::open(common::shared_snapshot().dir()).expect("snapshot opens"),
    );
    let pool = Arc::new(
        Pool::new(
            snapshot,
            PoolConfig {
                warm: 1,
                max_live: 2,
                shutdown_grace: Duration::from_secs(1),
                restore_options: ember::snapshot::RestoreOptions {
                    isolation: Some(ember::worker::Isolation::new(env!("CARGO_BIN_EXE_ember"))),
                    ..Default::default()
                },
                ..PoolConfig::default()
            },
        )
        .expect("pool starts"),
    );
    assert!(
        !worker_processes().is_empty(),
        "the warm sandbox has a worker"
    );
    let (started_tx, started_rx) = mpsc::channel();
    let runner = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            let mut inv = common::sh("echo started; sleep 100");
            inv.timeout_ms = 200_000;
            let mut started = Some(started_tx);
            pool.invoke_streaming(&inv, |_, _| {
                if let Some(tx) = started.take() {
                    let _ = tx.send(());
                }
            })
        })
    };
    started_rx
        .recv_timeout(REQUEST_TIMEOUT)
        .expect("the invocation starts");
    let workers = worker_processes();
    let started = Instant::now();
    let left = pool.shutdown();
    assert_eq!(left, 0, "nothing left running");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "shutdown did not wait for the 100 s invocation"
    );
    let result = runner.join().expect("runner thread");
    assert!(result.is_err(), "the killed invocation fails: {result:?}");
    assert_eq!(pool.stats().live, 0);
    // A worker's namespace init dies of its parent's death signal: a
    // process with a VM to tear down takes a moment to finish exiting.
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers.iter().any(|w| alive(*w)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for worker in workers {
        assert!(!alive(worker), "worker {worker} outlived the pool");
    }
}

// --- OpenAPI ------------------------------------------------------------

fn openapi() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("openapi.yaml");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("openapi.yaml is YAML");
    serde_json::to_value(yaml).expect("openapi.yaml converts to JSON")
}

/// Checks `value` against an OpenAPI 3.0 schema: `$ref`, `allOf`,
/// `oneOf`, `type`, `nullable`, `enum`, `required`, `properties`,
/// `additionalProperties: false` and `items` (what openapi.yaml uses).
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .ok_or_else(|| format!("unsupported $ref {reference}"))?;
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("dangling $ref {reference}"));
        }
        return check(doc, target, value, at);
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            check(doc, s, value, at)?;
        }
    }
    if let Some(one) = schema["oneOf"].as_array() {
        let errors: Vec<String> = one
            .iter()
            .filter_map(|s| check(doc, s, value, at).err())
            .collect();
        if errors.len() != one.len() - 1 {
            return Err(format!("{at}: must match exactly one of oneOf: {errors:?}"));
        }
    }
    if value.is_null() && schema["nullable"] == true {
        return Ok(());
    }
    if let Some(kind) = schema["type"].as_str() {
        let ok = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            other => return Err(format!("unsupported type {other}")),
        };
        if !ok {
            return Err(format!("{at}: {value} is not of type {kind}"));
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let Some(object) = value.as_object() {
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap_or_default();
            if !object.contains_key(key) {
                return Err(format!("{at}: required field {key} is missing"));
            }
        }
        let properties = schema["properties"].as_object();
        for (key, v) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(s) => check(doc, s, v, &format!("{at}.{key}"))?,
                None if schema["additionalProperties"] == false => {
                    return Err(format!("{at}: field {key} is not documented"))
                }
                None => {}
            }
        }
        if let Some(values) = schema["additionalProperties"].as_object() {
            for (key, v) in object {
                if !properties.is_some_and(|p| p.contains_key(key)) {
                    check(
                        doc,
                        &Value::Object(values.clone()),
                        v,
                        &format!("{at}.{key}"),
                    )?;
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            check(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// The documented schema of `path` `method` answering `status` with
/// `content_type`.
fn response_schema<'a>(
    doc: &'a Value,
    path: &str,
    method: &str,
    status: u16,
    content_type: &str,
) -> &'a Value {
    let response = &doc["paths"][path][method]["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which is not documented"
    );
    let schema = &response["content"][content_type]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status}: {content_type} is not documented"
    );
    schema
}

#[test]
fn openapi_document_matches_the_server() {
    let doc = openapi();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let functions = FunctionSet::new(
        vec![(
            "probe".into(),
            probe_template().to_path_buf(),
            Function::open(probe_template()).expect("probe opens"),
        )],
        FunctionSetConfig {
            max_live: 2,
            ..FunctionSetConfig::default()
        },
    )
    .expect("function set");
    let server = TestServer::start_with(
        PoolConfig {
            warm: 1,
            max_live: 2,
            queue_timeout: REQUEST_TIMEOUT,
            ..PoolConfig::default()
        },
        Limits::default(),
        "127.0.0.1:0".parse().unwrap(),
        Some(Arc::new(functions)),
    );
    let mut client = server.client();
    // A request in the documented shape, with every field, validates
    // against the request schema and is accepted.
    let request = json!({
        "argv": ["sh", "-c", "cat; printf '\\377' >&2; echo out > out.txt; exit 3"],
        "env": {"A": "1"},
        "stdin": "in",
        "timeout_ms": 60000,
        "max_output_bytes": 1024,
        "files_in": [{"path": "f", "data_b64": "AA==", "mode": 420}],
        "collect": ["out.txt", "missing"],
    });
    let request_schema = &doc["paths"]["/v1/invocations"]["post"]["requestBody"]["content"]
        ["application/json"]["schema"];
    check(&doc, request_schema, &request, "request").unwrap();
    let function_path = "/v1/functions/{name}/invocations";
    let parameters: Vec<&str> = doc["paths"][function_path]["post"]["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        parameters,
        [
            "name",
            "timeout_ms",
            "max_output_bytes",
            "envelope",
            "stream"
        ]
    );

    let mut documented = 0;
    let paths = doc["paths"].as_object().expect("paths");
    for (path, item) in paths {
        for method in item.as_object().expect("path item").keys() {
            // Shared by the path's operations, not one.
            if method == "parameters" {
                continue;
            }
            documented += 1;
            let r = match (path.as_str(), method.as_str()) {
                ("/v1/invocations", "post") => invoke(&mut client, request.clone()),
                ("/v1/functions/{name}/invocations", "post") => client
                    .request(
                        "POST",
                        "/v1/functions/probe/invocations?timeout_ms=60000&max_output_bytes=1024",
                        Some(br#"{"op": "print"}"#),
                    )
                    .unwrap(),
                ("/v1/functions/{name}", "get") => {
                    client.request("GET", "/v1/functions/probe", None).unwrap()
                }
                // This server has no data directory: no deployments, and
                // probe is read-only.
                ("/v1/functions/{name}", "put") => {
                    let r = client
                        .request_as(
                            "PUT",
                            "/v1/functions/probe?handler=app:handler",
                            b"PK",
                            "application/zip",
                        )
                        .unwrap();
                    assert_eq!(r.status, 405);
                    r
                }
                ("/v1/functions/{name}", "delete") => {
                    let r = client
                        .request("DELETE", "/v1/functions/probe", None)
                        .unwrap();
                    assert_eq!(r.status, 409);
                    r
                }
                (p, "get") => client.request("GET", p, None).unwrap(),
                other => panic!("no check for {other:?}: extend this test"),
            };
            let content_type = r
                .header("content-type")
                .and_then(|t| t.split(';').next())
                .unwrap_or("")
                .to_string();
            let schema = response_schema(&doc, path, method, r.status, &content_type);
            if content_type == "application/json" {
                let body = r.json().unwrap();
                check(&doc, schema, &body, &format!("{method} {path}")).unwrap();
                if path == "/v1/invocations" {
                    assert_eq!(body["exit_code"], 3);
                    assert_eq!(body["stdout"], "in");
                    assert_eq!(body["stderr_b64"], "/w==", "non-UTF-8 comes as base64");
                    assert_eq!(body["files_out"][0]["data_b64"], "b3V0Cg==");
                    assert!(body["files_out"][1]["error"].is_string());
                }
                if path == function_path {
                    // The handler's result, as is.
                    assert_eq!(body, json!("printed"));
                }
                if path == "/v1/functions/{name}" && method == "get" {
                    assert_eq!(body["status"], "ready");
                    assert_eq!(body["deployed"], false);
                }
                if path == "/v1/functions" {
                    assert_eq!(body["functions"][0]["name"], "probe");
                }
            } else {
                assert_eq!(schema["type"], "string");
            }
        }
    }
    assert_eq!(documented, 9);

    // Every kind of handler result the probe makes validates.
    let result_schema = json!({"$ref": "#/components/schemas/FunctionInvocationResponse"});
    for (event, kind) in [
        (json!({"op": "bytes"}), "bytes"),
        (json!({"op": "fail"}), "error"),
        (json!({"op": "echo"}), "json"),
    ] {
        let r = client
            .post_json("/v1/functions/probe/invocations?envelope=1", &event)
            .unwrap();
        assert_eq!(r.status, 200);
        let body = r.json().unwrap();
        check(&doc, &result_schema, &body, kind).unwrap();
        assert_eq!(body["result"]["kind"], kind, "{body}");
    }

    // The streaming variant: every line is a documented event.
    let mut stream = Vec::new();
    let (status, headers) = client
        .request_streaming(
            "POST",
            "/v1/invocations?stream=true",
            Some(br#"{"argv":["sh","-c","echo a; echo b >&2"]}"#),
            |chunk| stream.extend_from_slice(chunk),
        )
        .unwrap();
    let content_type = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let schema = response_schema(&doc, "/v1/invocations", "post", status, &content_type);
    let lines: Vec<Value> = stream
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("NDJSON"))
        .collect();
    for (i, event) in lines.iter().enumerate() {
        check(&doc, schema, event, &format!("event {i}")).unwrap();
    }
    assert_eq!(lines.last().unwrap()["type"], "exit");

    // Documented error answers.
    let r = invoke(&mut client, json!({"argv": ["true"], "timeout_ms": 0}));
    let schema = response_schema(
        &doc,
        "/v1/invocations",
        "post",
        r.status,
        "application/json",
    );
    check(&doc, schema, &r.json().unwrap(), "400").unwrap();
    for (uri, status) in [
        ("/v1/functions/nope/invocations", 404),
        ("/v1/functions/probe/invocations?timeout_ms=0", 400),
    ] {
        let r = client.request("POST", uri, Some(b"{}")).unwrap();
        assert_eq!(r.status, status, "{uri}");
        let schema = response_schema(&doc, function_path, "post", status, "application/json");
        check(&doc, schema, &r.json().unwrap(), uri).unwrap();
    }
    server.stop();
}

// --- A child `ember serve` ------------------------------------------------

/// Every descendant of `pid`, from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // The field after the parenthesised command name: state, then ppid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        if let Some(ppid) = ppid {
            parents.entry(ppid).or_default().push(child);
        }
    }
    let mut found = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in parents.get(&p).into_iter().flatten() {
            found.push(c);
            todo.push(c);
        }
    }
    found
}

/// The worker processes this test process started (other tests' child
/// servers have workers too), with their descendants.
/// The child's stderr, one JSON object per line (others wrapped as
/// `{"unstructured": line}`), read on a thread until it closes.
fn json_log_lines(
    child: &mut std::process::Child,
) -> (mpsc::Receiver<Value>, std::thread::JoinHandle<()>) {
    let (lines_tx, lines) = mpsc::channel::<Value>();
    let stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let value =
                serde_json::from_str(&line).unwrap_or_else(|_| json!({"unstructured": line}));
            let _ = lines_tx.send(value);
        }
    });
    (lines, reader)
}

fn worker_processes() -> Vec<u32> {
    let is_worker = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            cmdline.split(|b| *b == 0).nth(1) == Some(ember::worker::WORKER_SUBCOMMAND.as_bytes())
        })
    };
    let own = std::process::id();
    let mut found = Vec::new();
    for child in descendants(own) {
        if is_worker(child) && parent(child) == Some(own) {
            found.push(child);
            found.extend(descendants(child));
        }
    }
    found
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[test]
fn sigterm_drains_in_flight_work_and_leaves_no_worker_behind() {
    let snapshot_dir: PathBuf = common::shared_snapshot().dir().to_path_buf();
    let socket = common::temp_path("serve-child.sock");
    let mut child = common::ember()
        .arg("serve")
        .arg("--snapshot")
        .arg(&snapshot_dir)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args(["--warm", "2", "--max-live", "4"])
        .arg("--data-dir")
        .arg(common::temp_path("serve-child-data"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ember serve starts");
    let pid = child.id();
    // Its stderr carries one JSON object per line.
    let (lines, reader) = json_log_lines(&mut child);
    let mut log = Vec::new();
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("ember serve says it listens");
        let listening = line["message"] == "listening";
        log.push(line);
        if listening {
            break;
        }
    }

    let target = Target::Unix(socket.clone());
    let mut client = Client::new(target.clone(), REQUEST_TIMEOUT);
    let r = invoke(&mut client, json!({"argv": ["echo", "hi"]}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json().unwrap()["stdout"], "hi\n");

    // An invocation in flight when SIGTERM arrives finishes.
    let (started_tx, started_rx) = mpsc::channel();
    let mut stream_client = Client::new(target, REQUEST_TIMEOUT);
    let in_flight = std::thread::spawn(move || {
        let mut started = Some(started_tx);
        let mut data = Vec::new();
        let (status, _) = stream_client
            .request_streaming(
                "POST",
                "/v1/invocations?stream=true",
                Some(br#"{"argv":["sh","-c","echo started; sleep 1; echo finished"]}"#),
                |chunk| {
                    data.extend_from_slice(chunk);
                    if let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                },
            )
            .expect("the in-flight request is answered");
        (status, String::from_utf8(data).expect("UTF-8 events"))
    });
    started_rx
        .recv_timeout(REQUEST_TIMEOUT)
        .expect("the in-flight invocation starts");
    let workers = descendants(pid);
    // SAFETY: kill(2) on our own child's PID.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);

    let (status, events) = in_flight.join().expect("in-flight thread");
    assert_eq!(status, 200);
    assert!(events.contains("finished"), "{events}");
    assert!(events.contains("\"type\":\"exit\""), "{events}");

    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("ember serve exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}");
    reader.join().expect("stderr reader");
    log.extend(lines.try_iter());
    for worker in workers {
        assert!(!alive(worker), "process {worker} outlived the server");
    }
    assert!(!socket.exists(), "the socket file is removed");
    // One structured line per invocation, with accounting fields.
    let invocations: Vec<&Value> = log
        .iter()
        .filter(|l| l["target"] == "ember::invocation")
        .collect();
    assert_eq!(invocations.len(), 2, "{log:?}");
    for line in invocations {
        assert_eq!(line["outcome"], "ok");
        for field in [
            "id",
            "exit_code",
            "restore_ms",
            "total_ms",
            "wall_ms",
            "cpu_user_ms",
            "max_rss_kib",
            "warm",
        ] {
            assert!(!line[field].is_null(), "{field} in {line}");
        }
    }
}

/// A child `ember serve` whose stderr (JSON lines) is collected.
struct ChildServer {
    child: std::process::Child,
    lines: mpsc::Receiver<Value>,
    reader: std::thread::JoinHandle<()>,
    /// The lines up to "listening", then more as they are read.
    log: Vec<Value>,
}

impl ChildServer {
    fn start(args: &[&std::ffi::OsStr]) -> Self {
        // Deployments go to a directory of the test's own, never the
        // host's default.
        let mut command = common::ember();
        command.arg("serve").args(args);
        if !args.iter().any(|a| *a == "--data-dir") {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            command
                .arg("--data-dir")
                .arg(common::temp_path(&format!("serve-data-{n}")));
        }
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("ember serve starts");
        let (lines, reader) = json_log_lines(&mut child);
        let mut server = ChildServer {
            child,
            lines,
            reader,
            log: Vec::new(),
        };
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = server.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("ember serve says it listens: {:?}", server.log);
            });
            let listening = line["message"] == "listening";
            server.log.push(line);
            if listening {
                return server;
            }
        }
    }

    /// SIGTERM; waits for a clean exit and returns the whole log.
    fn stop(mut self) -> Vec<Value> {
        // SAFETY: kill(2) on our own child's PID.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let (done_tx, done_rx) = mpsc::channel();
        let mut child = self.child;
        std::thread::spawn(move || {
            let _ = done_tx.send(child.wait());
        });
        let status = done_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("ember serve exits after SIGTERM")
            .expect("wait");
        assert!(status.success(), "{status}");
        self.reader.join().expect("stderr reader");
        self.log.extend(self.lines.try_iter());
        self.log
    }
}

#[test]
fn serve_functions_from_a_directory() {
    let doc = openapi();
    let dir = functions_dir("serve-functions");
    let socket = common::temp_path("serve-functions.sock");
    let listen = format!("unix:{}", socket.display());
    let server = ChildServer::start(&[
        "--functions".as_ref(),
        dir.as_os_str(),
        "--listen".as_ref(),
        listen.as_ref(),
        "--max-live".as_ref(),
        "2".as_ref(),
    ]);
    // It says which functions it serves, and skips the bad name.
    let loaded: Vec<&Value> = server
        .log
        .iter()
        .filter(|l| l["message"] == "function")
        .collect();
    assert_eq!(loaded.len(), 1, "{:?}", server.log);
    assert_eq!(loaded[0]["function"], "probe");
    assert_eq!(loaded[0]["runtime"], "python3");
    assert_eq!(loaded[0]["hot_path"], true);
    assert!(
        server
            .log
            .iter()
            .any(|l| l["level"] == "WARN"
                && l["dir"].as_str().is_some_and(|d| d.ends_with("bad name"))),
        "{:?}",
        server.log
    );

    let mut client = Client::new(Target::Unix(socket.clone()), REQUEST_TIMEOUT);
    let validate = |path: &str, method: &str, r: &ember::server::client::Response| {
        let schema = response_schema(&doc, path, method, r.status, "application/json");
        check(&doc, schema, &r.json().expect("JSON"), path).unwrap();
    };
    let invoke_function = |client: &mut Client, uri: &str, event: &[u8]| {
        let r = client.request("POST", uri, Some(event)).expect("answered");
        validate("/v1/functions/{name}/invocations", "post", &r);
        r
    };

    let r = client.request("GET", "/v1/functions", None).unwrap();
    assert_eq!(r.status, 200);
    validate("/v1/functions", "get", &r);
    let list = r.json().unwrap();
    let functions = list["functions"].as_array().unwrap();
    assert_eq!(functions.len(), 1, "{list}");
    assert_eq!(functions[0]["name"], "probe");
    assert_eq!(functions[0]["runtime"], "python3");
    assert_eq!(functions[0]["handler"], "probe.py:handler");
    assert_eq!(functions[0]["hot_path"], true);
    assert!(functions[0]["hot_path_capacity_bytes"]
        .as_u64()
        .is_some_and(|c| c > 0));

    // An echo takes the hot path; the answer is the handler's result, as
    // is, with the invocation's timings in headers.
    let event = json!({"op": "echo", "n": 42, "s": "héllo"});
    let uri = "/v1/functions/probe/invocations";
    let r = invoke_function(&mut client, uri, &serde_json::to_vec(&event).unwrap());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json().unwrap(), json!({"echo": event}));
    assert!(r.header("x-ember-invocation-id").is_some());
    assert_eq!(
        r.header("ember-invocation-id"),
        r.header("x-ember-invocation-id")
    );
    assert_eq!(r.header("ember-path"), Some("hot"));
    assert_eq!(r.header("ember-outcome"), Some("json"));
    let timings = r.header("ember-timings").expect("timings header");
    for t in [
        "queue=",
        "restore=",
        "run=",
        "handler=",
        "teardown=",
        "total=",
    ] {
        assert!(timings.contains(t), "{t} in {timings}");
    }
    assert!(
        r.header("ember-recycle")
            .is_some_and(|h| h.starts_with("invocation=1;reused=true;reset_ms=")),
        "{:?}",
        r.header("ember-recycle")
    );
    // The envelope, on request: result, output and timings, as a 200.
    let r = invoke_function(
        &mut client,
        &format!("{uri}?envelope=1"),
        br#"{"op": "print"}"#,
    );
    assert_eq!(r.status, 200);
    let body = r.json().unwrap();
    assert_eq!(body["result"], json!({"kind": "json", "value": "printed"}));
    assert_eq!(body["stdout"], "to stdout\n");
    assert_eq!(body["path"], "hot");
    assert_eq!(body["function"], "probe");
    for t in ["restore", "run", "teardown", "total", "handler", "queue"] {
        assert!(body["timings_ms"][t].as_f64().is_some(), "{t} in {body}");
    }

    // A handler exception is a 500 with the error and its traceback.
    let r = invoke_function(&mut client, uri, br#"{"op": "fail", "why": "testing"}"#);
    assert_eq!(r.status, 500);
    let body = r.json().unwrap();
    assert_eq!(body["kind"], "error", "{body}");
    assert_eq!(body["type"], "ValueError");
    assert_eq!(body["message"], "bad input: testing");
    assert!(body["traceback"]
        .as_str()
        .is_some_and(|t| t.contains("Traceback") && t.contains("probe.py")));
    assert_eq!(r.header("ember-outcome"), Some("error"));

    // A timeout is a 504.
    let r = invoke_function(
        &mut client,
        &format!("{uri}?timeout_ms=2000"),
        br#"{"op": "loop"}"#,
    );
    assert_eq!(r.status, 504);
    assert_eq!(r.json().unwrap()["kind"], "timed_out");
    // Bytes come as bytes.
    let r = client
        .request("POST", uri, Some(br#"{"op": "bytes"}"#))
        .expect("answered");
    assert_eq!((r.status, r.body.as_slice()), (200, &[0u8, 1, 2, 3][..]));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    // Streaming: the output, then the result, once the invocation ends.
    let r = client
        .request(
            "POST",
            &format!("{uri}?stream=1"),
            Some(br#"{"op": "print"}"#),
        )
        .expect("answered");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let events: Vec<Value> = r
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("NDJSON"))
        .collect();
    let schema = response_schema(
        &doc,
        "/v1/functions/{name}/invocations",
        "post",
        200,
        "application/x-ndjson",
    );
    for (i, event) in events.iter().enumerate() {
        check(&doc, schema, event, &format!("event {i}")).unwrap();
    }
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds, ["stdout", "stderr", "result"], "{events:?}");
    assert_eq!(events[0]["data"], "to stdout\n");
    assert_eq!(
        events[2]["result"],
        json!({"kind": "json", "value": "printed"})
    );

    // Refusals.
    let r = invoke_function(&mut client, "/v1/functions/nope/invocations", b"{}");
    assert_eq!(r.status, 404);
    assert!(r.json().unwrap()["error"]
        .as_str()
        .is_some_and(|e| e.contains("nope")));
    for query in [
        "timeout_ms=0",
        "timeout_ms=abc",
        "timeout_ms=300001",
        "bogus=1",
    ] {
        let r = invoke_function(&mut client, &format!("{uri}?{query}"), b"{}");
        assert_eq!(r.status, 400, "{query}");
    }
    // No snapshot was given: no /v1/invocations.
    let r = invoke(&mut client, json!({"argv": ["true"]}));
    assert_eq!(r.status, 404);
    let r = client.request("GET", "/v1/health", None).unwrap();
    assert_eq!(r.status, 200);
    validate("/v1/health", "get", &r);
    let health = r.json().unwrap();
    assert_eq!(health["pool"], Value::Null);
    assert_eq!(health["functions"]["count"], 1);

    let m = metrics(&mut client);
    assert_eq!(function_metric(&m, "json", "hot"), 3.0);
    assert_eq!(function_metric(&m, "bytes", "hot"), 1.0);
    assert_eq!(function_metric(&m, "error", "hot"), 1.0);
    assert_eq!(
        function_metric(&m, "timed_out", "hot") + function_metric(&m, "timed_out", "vsock"),
        1.0
    );
    assert_eq!(function_metric(&m, "invalid", "none"), 4.0);
    assert_eq!(function_metric(&m, "failed", "none"), 0.0);
    assert!(m["ember_function_duration_ms_count{path=\"hot\"}"] >= 2.0);
    assert_eq!(m["ember_function_live"], 0.0);

    let log = server.stop();
    assert!(!socket.exists(), "the socket file is removed");
    let _ = std::fs::remove_dir_all(&dir);
    // One structured line per function request.
    let lines: Vec<&Value> = log
        .iter()
        .filter(|l| l["target"] == "ember::function")
        .collect();
    assert_eq!(lines.len(), 6 + 1 + 4, "{log:?}");
    let ran: Vec<&&Value> = lines.iter().filter(|l| !l["path"].is_null()).collect();
    assert_eq!(ran.len(), 6);
    for line in ran {
        for field in [
            "id",
            "function",
            "outcome",
            "path",
            "restore_ms",
            "run_ms",
            "total_ms",
        ] {
            assert!(!line[field].is_null(), "{field} in {line}");
        }
    }
}

/// The jailed workers `ember serve` (process `server`) runs.
fn workers_of(server: u32) -> Vec<u32> {
    descendants(server)
        .into_iter()
        .filter(|&pid| {
            parent(pid) == Some(server)
                && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                    cmdline.split(|b| *b == 0).nth(1)
                        == Some(ember::worker::WORKER_SUBCOMMAND.as_bytes())
                })
        })
        .collect()
}

/// `ember serve --functions DIR --listen LISTEN EXTRA...`, started.
fn functions_server(dir: &Path, listen: &str, extra: &[&str]) -> ChildServer {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--functions".as_ref(),
        dir.as_os_str(),
        "--listen".as_ref(),
        listen.as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    ChildServer::start(&args)
}

/// Polls `check` every 100 ms until it holds, at most `within`.
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A function with a hot path is served from recycled clones, each in a
/// jailed worker of its own: invocations one after another reuse one
/// clone (one worker), a clone whose invocation timed out is replaced by
/// a new one, an idle clone is destroyed after the idle timeout (its
/// worker ends), and `--no-recycle` serves each invocation from a fresh
/// clone.
#[test]
fn functions_are_served_from_recycled_clones() {
    let dir = functions_dir("serve-recycled");
    let socket = common::temp_path("serve-recycled.sock");
    let listen = format!("unix:{}", socket.display());
    let start =
        |extra: &[&str]| functions_server(&dir, &listen, &[&["--max-live", "2"], extra].concat());
    let uri = "/v1/functions/probe/invocations?envelope=1";
    let post = |client: &mut Client, uri: &str, event: &[u8]| -> Value {
        let r = client.request("POST", uri, Some(event)).expect("answered");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json().expect("JSON")
    };
    let idle = |client: &mut Client| -> u64 {
        let r = client.request("GET", "/v1/health", None).unwrap();
        r.json().unwrap()["functions"]["idle"]
            .as_u64()
            .expect("idle in health")
    };

    let server = start(&["--idle-timeout-s", "3"]);
    let pid = server.child.id();
    let mut client = Client::new(Target::Unix(socket.clone()), REQUEST_TIMEOUT);
    for n in 1..=4u64 {
        let body = post(&mut client, uri, br#"{"op": "echo", "n": 7}"#);
        assert_eq!(body["result"]["value"]["echo"]["n"], 7, "{body}");
        assert_eq!(body["path"], "hot", "{body}");
        assert_eq!(body["recycle"]["invocation"], n, "{body}");
        assert_eq!(body["recycle"]["reused"], true, "{body}");
        if n > 1 {
            // Reused: nothing restored, only resumed.
            let restore = body["timings_ms"]["restore"].as_f64().unwrap();
            assert!(restore < 1000.0, "{body}");
        }
    }
    assert_eq!(workers_of(pid).len(), 1, "one worker holds the clone");
    assert_eq!(idle(&mut client), 1);

    // A timed-out invocation ends its clone; the next gets a new one.
    let body = post(
        &mut client,
        &format!("{uri}&timeout_ms=2000"),
        br#"{"op": "loop"}"#,
    );
    assert_eq!(body["result"], json!({"kind": "timed_out"}), "{body}");
    assert_eq!(body["recycle"]["reused"], false, "{body}");
    let body = post(&mut client, uri, br#"{"op": "echo"}"#);
    assert_eq!(body["recycle"]["invocation"], 1, "{body}");

    // Idle past the timeout: destroyed, its worker gone.
    assert!(
        eventually(Duration::from_secs(15), || idle(&mut client) == 0),
        "the idle clone expires"
    );
    assert!(
        eventually(Duration::from_secs(15), || workers_of(pid).is_empty()),
        "its worker ends: {:?}",
        workers_of(pid)
    );
    server.stop();

    // --no-recycle: a fresh clone per invocation, no worker left after it.
    let server = start(&["--no-recycle"]);
    let pid = server.child.id();
    let mut client = Client::new(Target::Unix(socket.clone()), REQUEST_TIMEOUT);
    for _ in 0..2 {
        let body = post(&mut client, uri, br#"{"op": "echo"}"#);
        assert_eq!(body["path"], "hot", "{body}");
        assert!(body.get("recycle").is_none(), "{body}");
    }
    assert_eq!(idle(&mut client), 0);
    assert!(
        eventually(Duration::from_secs(15), || workers_of(pid).is_empty()),
        "no worker outlives its invocation: {:?}",
        workers_of(pid)
    );
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

// --- Hostile clients (issue 13, items 5 and 11) --------------------------

/// Sends `request` (which should say `Connection: close`) on a fresh
/// connection to `addr` and returns the status and body of the answer.
fn raw_request(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    stream.write_all(request).expect("request sent");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    (status, body)
}

/// Whether a connection accepted at `addr` is closed without an answer
/// to a request (the connection cap).
fn closed_without_answer(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let _ = stream
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    }
}

/// Hostile clients of the HTTP API (issue 13, item 11): without the token,
/// with a wrong one, with a foreign `Host` (DNS rebinding), with a body
/// that is not labelled JSON, with a body over the limit (answered before
/// it is sent), and beyond the connection cap, requests are refused with
/// JSON errors before anything runs; a proper request still runs. A
/// server on a non-loopback address without a token does not start.
/// Before: every request was served (the API had no token, no `Host` or
/// content-type check and no connection cap) and a body was read whole
/// before its size or the queue were considered.
#[test]
fn hostile_api_requests_are_refused_before_anything_runs() {
    use ember::server::guard::AuthToken;
    let token = AuthToken::new("test-token-5f1d").unwrap();
    let limits = Limits {
        max_body_bytes: 1 << 20,
        ..Limits::default()
    };
    let server = TestServer::start_config(
        PoolConfig {
            warm: 0,
            max_live: 1,
            ..PoolConfig::default()
        },
        ServerConfig {
            limits,
            auth_token: Some(token.clone()),
            max_connections: 4,
        },
        ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        None,
    );
    let Target::Tcp(addr) = server.target.clone() else {
        unreachable!("a TCP server")
    };
    let host = format!("Host: 127.0.0.1:{}\r\n", addr.port());
    let auth = "Authorization: Bearer test-token-5f1d\r\n";
    let json = "Content-Type: application/json\r\n";
    let body = r#"{"argv":["echo","hi"]}"#;
    let post = |headers: &str| {
        raw_request(
            addr,
            format!(
                "POST /v1/invocations HTTP/1.1\r\n{headers}Content-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let get = |path: &str, headers: &str| {
        raw_request(
            addr,
            format!("GET {path} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
        )
    };
    let is_json_error =
        |body: &str| serde_json::from_str::<Value>(body).is_ok_and(|v| v["error"].is_string());

    // Health needs no token; everything else does.
    assert_eq!(get("/v1/health", &host).0, 200);
    for (what, headers) in [
        ("no token", host.clone()),
        (
            "wrong token",
            format!("{host}Authorization: Bearer test-token-5f1e\r\n"),
        ),
        (
            "another scheme",
            format!("{host}Authorization: Basic test-token-5f1d\r\n"),
        ),
    ] {
        let (status, body) = post(&format!("{headers}{json}"));
        assert_eq!(status, 401, "{what}: {body}");
        assert!(is_json_error(&body), "{what}: {body}");
        assert_eq!(get("/metrics", &headers).0, 401, "{what}");
    }
    // A foreign Host on a loopback server: a rebound DNS name.
    for bad_host in ["Host: evil.example\r\n", "Host: evil.example:8080\r\n", ""] {
        let (status, body) = post(&format!("{bad_host}{auth}{json}"));
        assert_eq!(status, 421, "{bad_host:?}: {body}");
        assert!(is_json_error(&body), "{body}");
    }
    // JSON not labelled as JSON (what a cross-site form can send).
    for content_type in ["Content-Type: text/plain\r\n", ""] {
        let (status, body) = post(&format!("{host}{auth}{content_type}"));
        assert_eq!(status, 415, "{content_type:?}: {body}");
        assert!(is_json_error(&body), "{body}");
    }
    // A body over the limit: refused on its declared length, without
    // waiting for (or buffering) a byte of it.
    let started = Instant::now();
    let (status, body) = raw_request(
        addr,
        format!(
            "POST /v1/invocations HTTP/1.1\r\n{host}{auth}{json}Content-Length: {}\r\n\
             Connection: close\r\n\r\n",
            (1 << 20) + 1
        )
        .as_bytes(),
    );
    assert_eq!(status, 413, "{body}");
    assert!(is_json_error(&body), "{body}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Nothing of the above reached a sandbox.
    assert_eq!(server.pool.stats().live, 0);

    // The token, a loopback Host and JSON: served (the client sends them).
    let mut client = server.client().with_token(Some(token.clone()));
    let r = invoke(&mut client, json!({"argv": ["echo", "hi"]}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json().unwrap()["stdout"], "hi\n");
    drop(client);

    // The connection cap: four idle connections hold every permit; the
    // next connection is closed unanswered; once they close, requests are
    // answered again.
    let idle: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    assert!(closed_without_answer(addr), "a fifth connection is refused");
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if !closed_without_answer(addr) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "permits come back when connections close"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.stop();

    // No token, not loopback: refused before listening, in the library and
    // on the command line; with a token the address is accepted.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let serve_on_any = |config: ServerConfig| {
        runtime.block_on(async {
            let listener = Listener::bind(&ListenAddr::Tcp("0.0.0.0:0".parse().unwrap()))
                .await
                .expect("binds");
            server::serve(listener, Services::default(), config, async {})
                .await
                .expect_err("nothing to serve, at least")
                .to_string()
        })
    };
    let err = serve_on_any(ServerConfig::default());
    assert!(err.contains("not a loopback address"), "{err}");
    let err = serve_on_any(ServerConfig {
        auth_token: Some(token),
        ..ServerConfig::default()
    });
    assert!(err.contains("nothing to serve"), "{err}");
    let snapshot = common::shared_snapshot()
        .dir()
        .to_str()
        .unwrap()
        .to_string();
    let out = common::run_ember(
        &[
            "serve",
            "--snapshot",
            &snapshot,
            "--warm",
            "0",
            "--listen",
            "0.0.0.0:0",
        ],
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("not a loopback address"), "{stderr}");
    // A token file readable by everyone is refused.
    let token_file = common::temp_path("token");
    std::fs::write(&token_file, "t0ken\n").unwrap();
    let out = common::run_ember(
        &[
            "serve",
            "--snapshot",
            &snapshot,
            "--warm",
            "0",
            "--listen",
            "0.0.0.0:0",
            "--auth-token-file",
            token_file.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("readable by every user"), "{stderr}");
    let _ = std::fs::remove_file(&token_file);
}

/// Hostile (issue 13, item 5): with one sandbox, a streaming invocation of
/// `yes` whose client sends the request and never reads gets its stream
/// cut and its sandbox destroyed once the output has stalled for the
/// server's stall limit; the next request then runs, long before `yes`
/// would have reached its own timeout. Before the fix the server's send
/// waited forever for the client to read, holding the sandbox (and the
/// next request's place in the queue) for good.
#[test]
fn hostile_streaming_client_that_never_reads_frees_its_sandbox() {
    use std::io::Write;
    /// `yes`'s own timeout: far beyond what the test allows.
    const YES_TIMEOUT_MS: u64 = 290_000;
    let socket = common::temp_path("serve-stall.sock");
    let server = TestServer::start(
        PoolConfig {
            warm: 1,
            max_live: 1,
            max_queue: 4,
            queue_timeout: REQUEST_TIMEOUT,
            ..PoolConfig::default()
        },
        Limits::default(),
        ListenAddr::Unix(socket.clone()),
    );
    let body = format!(r#"{{"argv":["yes"],"timeout_ms":{YES_TIMEOUT_MS}}}"#);
    let mut silent = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    silent
        .write_all(
            format!(
                "POST /v1/invocations?stream=true HTTP/1.1\r\nHost: localhost\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .expect("request sent");
    // The stalled invocation holds the only sandbox first.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    while server.pool.stats().in_use == 0 {
        assert!(Instant::now() < deadline, "the streaming invocation starts");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let mut client = Client::new(server.target.clone(), Duration::from_secs(240));
    let r = invoke(&mut client, json!({"argv": ["echo", "next"]}));
    let waited = started.elapsed();
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json().unwrap()["stdout"], "next\n");
    assert!(
        waited < Duration::from_millis(YES_TIMEOUT_MS) - Duration::from_secs(60),
        "the next request waited {waited:?}"
    );
    eprintln!(
        "the stalled stream's sandbox was freed; the next request ran after {waited:.1?} \
         (stall limit {:?})",
        server::STREAM_STALL_LIMIT
    );
    drop(silent);
    server.stop();
}

// --- Deploying over HTTP (issue 15, items 2 and 3) -------------------------

/// The deployed handler: echoes, spins (burns the CPU for `s` seconds,
/// on the guest's vDSO clock) or reports its environment.
const DEPLOYED_APP: &str = r#"
import os, time

def handler(event):
    if isinstance(event, dict) and event.get("op") == "spin":
        start = time.time()
        while time.time() - start < event.get("s", 60):
            pass
    return {"echo": event, "greeting": os.environ.get("GREETING")}
"#;

/// A zip of `files` (name, text).
fn zip_bytes(files: &[(&str, &str)]) -> Vec<u8> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, text) in files {
        zip.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(text.as_bytes()).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// Polls `GET /v1/functions/{name}` until it is no longer `building`.
fn settled(client: &mut Client, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let r = client
            .request("GET", &format!("/v1/functions/{name}"), None)
            .expect("status answered");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let body = r.json().unwrap();
        if body["status"] != "building" {
            return body;
        }
        assert!(Instant::now() < deadline, "{name} still builds: {body}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The names of the entries of `dir` (none if it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// The cgroups of server `pid`'s workers still there (`worker-<pid>-<n>`
/// under the controllers' `ember-workers`).
fn worker_cgroups(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("worker-{pid}-");
    let mut found = Vec::new();
    let mut todo: Vec<(PathBuf, usize)> = ["memory", "pids", "cpu", "unified", ""]
        .iter()
        .map(|c| (Path::new("/sys/fs/cgroup").join(c), 0))
        .collect();
    while let Some((dir, depth)) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.starts_with(&prefix)) {
                found.push(path);
            } else if depth < 6 {
                todo.push((path, depth + 1));
            }
        }
    }
    found
}

/// Deploys over HTTP into a data directory: bad deployments refused at
/// once with nothing written; a bundle built in the background (202, then
/// `ready`), invoked; a failing import `failed` with the traceback; a
/// busy slot 429 and a client that disconnects freeing it (its worker
/// killed); a re-deployment switched without a rebuild (same template);
/// DELETE; SIGTERM during an invocation (it finishes; no worker, cgroup or
/// staging file left); a restart serving the function again without a
/// build.
#[test]
fn deploy_over_http_build_invoke_cancel_redeploy_delete_and_restart() {
    let data = common::temp_path("deploy-data");
    let socket = common::temp_path("deploy.sock");
    let listen = format!("unix:{}", socket.display());
    let start = || {
        ChildServer::start(&[
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--listen".as_ref(),
            listen.as_ref(),
            // No snapshot sandboxes: only functions run.
            "--warm".as_ref(),
            "0".as_ref(),
            "--max-live".as_ref(),
            "1".as_ref(),
            "--max-queue".as_ref(),
            "0".as_ref(),
            "--max-bundle-bytes".as_ref(),
            "65536".as_ref(),
        ])
    };
    let server = start();
    let pid = server.child.id();
    let mut client = Client::new(Target::Unix(socket.clone()), REQUEST_TIMEOUT);
    let put = |client: &mut Client, uri: &str, body: &[u8]| {
        client
            .request_as("PUT", uri, body, "application/zip")
            .expect("answered")
    };
    let app = zip_bytes(&[("app.py", DEPLOYED_APP)]);
    let written = || ["functions", "templates", "bundles"].map(|d| entries(&data.join(d)));

    // Refused at once, nothing written.
    let evil = zip_bytes(&[("app.py", DEPLOYED_APP), ("../evil.py", "x = 1\n")]);
    for (uri, body, needle) in [
        (
            "/v1/functions/bad%20name?handler=app:handler",
            &app,
            "function name",
        ),
        ("/v1/functions/echo", &app, "handler"),
        (
            "/v1/functions/echo?handler=app:handler",
            &b"not a zip".to_vec(),
            "zip",
        ),
        ("/v1/functions/echo?handler=main:handler", &app, "no module"),
        ("/v1/functions/echo?handler=app:handler", &evil, "refused"),
        (
            "/v1/functions/echo?handler=app:handler&env=PYTHONPATH=/x",
            &app,
            "PYTHONPATH",
        ),
        (
            "/v1/functions/echo?handler=app:handler&env=NOVALUE",
            &app,
            "K=V",
        ),
        (
            "/v1/functions/echo?handler=app:handler&memory_mib=1",
            &app,
            "memory_mib",
        ),
        (
            "/v1/functions/echo?handler=app:handler&bogus=1",
            &app,
            "bogus",
        ),
    ] {
        let r = put(&mut client, uri, body);
        assert_eq!(r.status, 400, "{uri}: {}", String::from_utf8_lossy(&r.body));
        let error = r.json().unwrap()["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(error.contains(needle), "{uri}: {error}");
        assert!(
            !error.contains(&*data.to_string_lossy()),
            "{uri}: the server's paths stay its own: {error}"
        );
    }
    let r = client
        .request("PUT", "/v1/functions/echo?handler=app:handler", Some(&app))
        .unwrap();
    assert_eq!(r.status, 415, "a bundle is labelled application/zip");
    let r = put(
        &mut client,
        "/v1/functions/echo?handler=app:handler",
        &vec![0u8; 70_000],
    );
    assert_eq!(r.status, 413);
    let r = client.request("GET", "/v1/functions/echo", None).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(
        written(),
        [Vec::<String>::new(), vec![], vec![]],
        "nothing was written"
    );

    // Accepted: 202 and the status URL; it builds in the background.
    let r = put(
        &mut client,
        "/v1/functions/echo?handler=app:handler&env=GREETING=hi&timeout_ms=30000&max_queue=0",
        &app,
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("location"), Some("/v1/functions/echo"));
    let body = r.json().unwrap();
    assert_eq!(body["status"], "building", "{body}");
    assert_eq!(body["settings"]["env"], json!([["GREETING", "hi"]]));
    assert_eq!(body["settings"]["timeout_ms"], 30000);
    assert_eq!(body["settings"]["pool"], json!({"max_queue": 0}));
    // While it builds: it cannot change, and is not invoked yet.
    let r = put(&mut client, "/v1/functions/echo?handler=app:handler", &app);
    assert_eq!(r.status, 409);
    let r = client
        .request("DELETE", "/v1/functions/echo", None)
        .unwrap();
    assert_eq!(r.status, 409);
    let echo = "/v1/functions/echo/invocations";
    let r = client.request("POST", echo, Some(b"{}")).unwrap();
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    // A module that fails to import: queued behind the first build.
    let broken = zip_bytes(&[(
        "app.py",
        "raise ImportError('this module does not import')\n",
    )]);
    let r = put(
        &mut client,
        "/v1/functions/broken?handler=app:handler",
        &broken,
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));

    let body = settled(&mut client, "echo");
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["serving"], true);
    assert_eq!(body["hot_path"], true);
    let template = body["template"].as_str().unwrap().to_owned();
    let r = client.request("POST", echo, Some(br#"{"n": 1}"#)).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json().unwrap(),
        json!({"echo": {"n": 1}, "greeting": "hi"})
    );
    assert_eq!(r.header("ember-path"), Some("hot"));

    let body = settled(&mut client, "broken");
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["serving"], false);
    let log = body["log_tail"].as_str().unwrap_or_default();
    assert!(
        log.contains("ImportError") && log.contains("this module does not import"),
        "{log}"
    );
    let r = client
        .request("POST", "/v1/functions/broken/invocations", Some(b"{}"))
        .unwrap();
    assert_eq!(r.status, 409);
    let r = client.request("GET", "/v1/functions", None).unwrap();
    let list = r.json().unwrap();
    let states: Vec<(&str, &str, bool)> = list["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap(),
                f["status"].as_str().unwrap(),
                f["serving"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [("broken", "failed", false), ("echo", "ready", true)]
    );

    // The only slot busy (--max-live 1, no queue): 429. Its client goes
    // away: the worker running it is killed and the slot is free.
    let live = |client: &mut Client| -> u64 {
        let r = client.request("GET", "/v1/health", None).unwrap();
        r.json().unwrap()["functions"]["live"].as_u64().unwrap()
    };
    let spin = br#"{"op": "spin", "s": 120}"#;
    let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    use std::io::Write;
    raw.write_all(
        format!(
            "POST {echo} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            spin.len()
        )
        .as_bytes(),
    )
    .unwrap();
    raw.write_all(spin).unwrap();
    // Its slot is taken at once, its worker a moment later.
    assert!(eventually(Duration::from_secs(60), || live(&mut client)
        == 1
        && workers_of(pid).len() == 1));
    let running = workers_of(pid);
    let r = client.request("POST", echo, Some(b"{}")).unwrap();
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    drop(raw);
    let dropped = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || live(&mut client) == 0),
        "the slot is freed when the client goes away"
    );
    let freed = dropped.elapsed();
    assert!(
        eventually(Duration::from_secs(5), || !alive(running[0])),
        "its worker is killed"
    );
    let r = client.request("POST", echo, Some(b"{}")).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    eprintln!("client gone to slot free: {} ms (n=1)", freed.as_millis());
    let m = metrics(&mut client);
    assert_eq!(
        m["ember_function_invocations_total{function=\"echo\",outcome=\"cancelled\",path=\"none\"}"],
        1.0
    );

    // A re-deployment with another timeout is the same template: ready
    // without a build, switched in, and its timeout applies.
    let r = put(
        &mut client,
        "/v1/functions/echo?handler=app:handler&env=GREETING=hi&timeout_ms=1000",
        &app,
    );
    assert_eq!(r.status, 202);
    let switched = Instant::now();
    let body = settled(&mut client, "echo");
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["template"], template.as_str());
    assert!(switched.elapsed() < Duration::from_secs(30), "no rebuild");
    let r = client
        .request("POST", echo, Some(br#"{"op": "spin", "s": 10}"#))
        .unwrap();
    assert_eq!(r.status, 504, "the new version's 1 s timeout");
    assert_eq!(r.json().unwrap()["kind"], "timed_out");

    // A new version that fails to build: the old one keeps serving.
    let r = put(
        &mut client,
        "/v1/functions/echo?handler=app:handler",
        &broken,
    );
    assert_eq!(r.status, 202);
    let body = settled(&mut client, "echo");
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["serving"], true);
    assert_eq!(body["active"]["template"], template.as_str(), "{body}");
    let r = client.request("POST", echo, Some(br#"{"n": 3}"#)).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // DELETE.
    let r = client
        .request("DELETE", "/v1/functions/broken", None)
        .unwrap();
    assert_eq!(r.status, 204);
    for method in ["GET", "DELETE"] {
        let r = client
            .request(method, "/v1/functions/broken", None)
            .unwrap();
        assert_eq!(r.status, 404, "{method}");
    }

    // SIGTERM while an invocation runs: it finishes, then nothing is left.
    let in_flight = std::thread::spawn({
        let socket = socket.clone();
        move || {
            let mut client = Client::new(Target::Unix(socket), REQUEST_TIMEOUT);
            client
                .request(
                    "POST",
                    "/v1/functions/echo/invocations?timeout_ms=60000",
                    Some(br#"{"op": "spin", "s": 3}"#),
                )
                .map(|r| r.status)
        }
    });
    assert!(eventually(Duration::from_secs(60), || live(&mut client) == 1));
    let log = server.stop();
    assert_eq!(in_flight.join().unwrap().ok(), Some(200), "drained");
    assert!(workers_of(pid).is_empty());
    assert_eq!(
        worker_cgroups(pid),
        Vec::<PathBuf>::new(),
        "no worker cgroup left"
    );
    let [records, templates, bundles] = written();
    assert_eq!(records, ["echo.json"]);
    assert_eq!(
        templates
            .iter()
            .filter(|t| !t.starts_with('.'))
            .collect::<Vec<_>>(),
        [&template],
        "only the template in use is kept"
    );
    assert!(
        !templates.iter().any(|t| t.contains("building")),
        "{templates:?}"
    );
    assert!(bundles.is_empty(), "{bundles:?}");
    assert!(log
        .iter()
        .any(|l| l["message"] == "build failed" && l["function"] == "broken"));

    // A restart serves it again from its template, without a build.
    let server = start();
    let pid = server.child.id();
    let mut client = Client::new(Target::Unix(socket.clone()), REQUEST_TIMEOUT);
    // The version that serves is the last ready one; the failed one is
    // still reported.
    let body = settled(&mut client, "echo");
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["serving"], true);
    assert_eq!(body["active"]["settings"]["timeout_ms"], 1000, "{body}");
    let r = client.request("POST", echo, Some(br#"{"n": 2}"#)).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json().unwrap()["echo"], json!({"n": 2}));
    let r = client
        .request("DELETE", "/v1/functions/echo", None)
        .unwrap();
    assert_eq!(r.status, 204);
    let r = client.request("POST", echo, Some(b"{}")).unwrap();
    assert_eq!(r.status, 404);
    let log = server.stop();
    assert!(
        log.iter()
            .any(|l| l["message"] == "deployed function" && l["function"] == "echo"),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l["message"] == "building"),
        "nothing was rebuilt"
    );
    assert!(workers_of(pid).is_empty());
    let [records, templates, _] = written();
    assert!(records.is_empty(), "{records:?}");
    assert!(
        templates
            .iter()
            .all(|t| t.starts_with('.') && !t.ends_with(".lock")),
        "templates removed: {templates:?}"
    );
    let _ = std::fs::remove_dir_all(&data);
}

/// `--function-min-warm`: the server makes a function's warm clones at
/// start, makes them again after invocations take them, and keeps them
/// past the idle timeout. `--max-memory-mib`: with room for one clone, a
/// second invocation while the first runs is refused (429, Retry-After)
/// and no second worker starts; once the first clone is gone the next
/// invocation runs.
#[test]
fn warm_minimum_is_kept_and_the_memory_cap_refuses_what_does_not_fit() {
    let dir = functions_dir("serve-warm");
    let socket = common::temp_path("serve-warm.sock");
    let listen = format!("unix:{}", socket.display());
    let start = |extra: &[&str]| functions_server(&dir, &listen, extra);
    let uri = "/v1/functions/probe/invocations";
    let health = |client: &mut Client| -> Value {
        let r = client.request("GET", "/v1/health", None).unwrap();
        r.json().unwrap()["functions"].clone()
    };

    let server = start(&["--function-min-warm", "2", "--idle-timeout-s", "1"]);
    let pid = server.child.id();
    let mut client = Client::new(Target::Unix(socket.clone()), REQUEST_TIMEOUT);
    assert!(
        eventually(Duration::from_secs(30), || health(&mut client)["idle"] == 2),
        "two warm clones before any request: {}",
        health(&mut client)
    );
    assert_eq!(workers_of(pid).len(), 2);
    // Ready once the minimum is made (and without the token: a probe).
    let r = client.request("GET", "/v1/ready", None).expect("answered");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json().unwrap(), json!({"ready": true, "reason": null}));
    for _ in 0..3 {
        let r = client
            .request("POST", uri, Some(br#"{"op": "echo"}"#))
            .expect("answered");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    // Each served by a warm clone: reused and reset, none made for it.
    let m = metrics(&mut client);
    for (series, want) in [
        (
            "ember_function_clones_reused_total{function=\"probe\"}",
            3.0,
        ),
        (
            "ember_function_clones_replaced_total{function=\"probe\"}",
            0.0,
        ),
        ("ember_function_queue_ms_count{function=\"probe\"}", 3.0),
        ("ember_function_run_ms_count{function=\"probe\"}", 3.0),
        ("ember_function_reset_ms_count{function=\"probe\"}", 3.0),
        (
            "ember_function_clone_make_ms_count{function=\"probe\"}",
            0.0,
        ),
    ] {
        assert_eq!(m.get(series), Some(&want), "{series}");
    }
    // Past the idle timeout, the minimum is still there.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(health(&mut client)["idle"], 2, "{}", health(&mut client));
    assert_eq!(workers_of(pid).len(), 2);
    server.stop();
    assert!(
        eventually(Duration::from_secs(10), || workers_of(pid).is_empty()),
        "no worker outlives the server"
    );

    // Room for exactly one clone.
    let function = ember::function::Function::open(probe_template()).expect("probe opens");
    let one_clone_mib = ember::worker::memory_limit_bytes(function.snapshot()).div_ceil(1 << 20);
    let cap = one_clone_mib.to_string();
    let server = start(&["--max-memory-mib", &cap, "--max-live", "4"]);
    let pid = server.child.id();
    let mut client = Client::new(Target::Unix(socket.clone()), REQUEST_TIMEOUT);
    let looping = std::thread::spawn({
        let socket = socket.clone();
        move || {
            let mut client = Client::new(Target::Unix(socket), REQUEST_TIMEOUT);
            client
                .request(
                    "POST",
                    "/v1/functions/probe/invocations?timeout_ms=4000",
                    Some(br#"{"op": "loop"}"#),
                )
                .expect("answered")
                .status
        }
    });
    // Its slot is taken at once, its worker a moment later.
    assert!(
        eventually(Duration::from_secs(30), || health(&mut client)["live"] == 1
            && workers_of(pid).len() == 1),
        "the looping invocation runs"
    );
    let r = client
        .request("POST", uri, Some(br#"{"op": "echo"}"#))
        .expect("answered");
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after"), Some("1"));
    let error = r.json().expect("JSON")["error"].clone();
    assert!(
        error.as_str().is_some_and(|e| e.contains("memory")),
        "{error}"
    );
    assert_eq!(workers_of(pid).len(), 1, "no second clone was started");
    // The loop times out and its clone is destroyed: room again.
    looping.join().expect("the looping request");
    let r = client
        .request("POST", uri, Some(br#"{"op": "echo"}"#))
        .expect("answered");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    server.stop();
}

/// SIGTERM while a deployment builds: the server exits without waiting
/// for the build, and its template worker (started from a blocking
/// thread, so not bound to die with the server by itself) is gone too.
#[test]
fn sigterm_during_a_build_leaves_no_worker_behind() {
    let data = common::temp_path("deploy-sigterm-data");
    let _ = std::fs::remove_dir_all(&data);
    let socket = common::temp_path("deploy-sigterm.sock");
    let listen = format!("unix:{}", socket.display());
    let server = ChildServer::start(&[
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--listen".as_ref(),
        listen.as_ref(),
        "--warm".as_ref(),
        "0".as_ref(),
    ]);
    let pid = server.child.id();
    let mut client = Client::new(Target::Unix(socket.clone()), REQUEST_TIMEOUT);
    let app = zip_bytes(&[("app.py", DEPLOYED_APP)]);
    let r = client
        .request_as(
            "PUT",
            "/v1/functions/slow?handler=app:handler",
            &app,
            "application/zip",
        )
        .expect("answered");
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        eventually(Duration::from_secs(60), || !workers_of(pid).is_empty()),
        "the build's template worker starts"
    );
    let building = descendants(pid);
    let stopped = Instant::now();
    server.stop();
    assert!(
        stopped.elapsed() < Duration::from_secs(60),
        "the server did not wait for the build"
    );
    for process in building {
        assert!(
            eventually(Duration::from_secs(10), || !alive(process)),
            "process {process} outlived the server"
        );
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// Invocations running now, as `/v1/health` counts them.
fn live(client: &mut Client) -> u64 {
    let r = client.request("GET", "/v1/health", None).unwrap();
    r.json().unwrap()["functions"]["live"].as_u64().unwrap()
}

/// After one cancelled invocation: the next one is served, and the
/// cancellation was counted once.
fn served_after_one_cancel(client: &mut Client, what: &str) {
    let r = client
        .request(
            "POST",
            "/v1/functions/probe/invocations",
            Some(br#"{"op": "echo"}"#),
        )
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    let m = metrics(client);
    assert_eq!(
        m["ember_function_invocations_total{function=\"probe\",outcome=\"cancelled\",path=\"none\"}"],
        1.0,
        "{what}"
    );
}

/// Sends an invocation of the probe that loops (for two minutes) on a
/// connection of its own; dropping the stream is the client going away.
fn start_looping_invocation(socket: &Path) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let looping = br#"{"op": "loop"}"#;
    let mut raw = std::os::unix::net::UnixStream::connect(socket).unwrap();
    raw.write_all(
        format!(
            "POST /v1/functions/probe/invocations?timeout_ms=120000 HTTP/1.1\r\nHost: localhost\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            looping.len()
        )
        .as_bytes(),
    )
    .unwrap();
    raw.write_all(looping).unwrap();
    raw
}

/// `--no-recycle`: a client that goes away while its fresh clone runs
/// cancels it too: the clone's worker is killed and the only slot frees.
#[test]
fn a_fresh_clones_client_going_away_kills_its_worker() {
    let dir = functions_dir("serve-fresh-cancel");
    let socket = common::temp_path("serve-fresh-cancel.sock");
    let listen = format!("unix:{}", socket.display());
    let server = functions_server(&dir, &listen, &["--no-recycle", "--max-live", "1"]);
    let pid = server.child.id();
    let mut client = Client::new(Target::Unix(socket.clone()), REQUEST_TIMEOUT);
    let raw = start_looping_invocation(&socket);
    assert!(
        eventually(Duration::from_secs(60), || live(&mut client) == 1
            && workers_of(pid).len() == 1),
        "the looping invocation runs in its worker"
    );
    let running = workers_of(pid);
    drop(raw);
    assert!(
        eventually(Duration::from_secs(10), || live(&mut client) == 0),
        "the slot is freed when the client goes away"
    );
    assert!(
        eventually(Duration::from_secs(5), || !alive(running[0])),
        "its worker is killed"
    );
    served_after_one_cancel(&mut client, "fresh clone");
    server.stop();
}

/// Sends `body` to `uri` on the server at `socket` with `?stream=1`
/// semantics and reads the answer as it comes: returns when the first
/// output line arrived and when the answer ended (both from the request),
/// the content type and the decoded (de-chunked) body.
fn timed_stream(
    socket: &Path,
    uri: &str,
    body: &[u8],
    accept: &str,
) -> (Duration, Duration, String, String) {
    use std::io::{Read, Write};
    let mut raw = std::os::unix::net::UnixStream::connect(socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let sent = Instant::now();
    raw.write_all(
        format!(
            "POST {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: {accept}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    raw.write_all(body).unwrap();
    let mut answer = Vec::new();
    let mut first_line = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = raw.read(&mut buf).expect("the answer");
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if first_line.is_none() && String::from_utf8_lossy(&answer).contains("line 0") {
            first_line = Some(sent.elapsed());
        }
    }
    let ended = sent.elapsed();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, chunked) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .expect("a content type");
    // Chunked transfer coding: hex size, CRLF, data, CRLF; 0 ends it.
    let mut body = String::new();
    let mut rest = chunked;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    (first_line.expect("a first line"), ended, content_type, body)
}

/// Issue 15, item 3: `?stream=1` streams a function's output while the
/// handler runs, as NDJSON or (when the client accepts them) as
/// server-sent events: the first line arrives while the handler still has
/// 1.4 s of work to do, then the rest, then the result.
#[test]
fn function_output_streams_live_over_http() {
    let dir = functions_dir("serve-stream-live");
    let socket = common::temp_path("serve-stream-live.sock");
    let listen = format!("unix:{}", socket.display());
    let server = functions_server(&dir, &listen, &[]);
    let uri = "/v1/functions/probe/invocations?stream=1";
    let drip = br#"{"op": "drip", "lines": 3, "gap_ms": 700}"#;
    for accept in ["*/*", "text/event-stream"] {
        let (first, ended, content_type, body) = timed_stream(&socket, uri, drip, accept);
        assert!(
            ended.saturating_sub(first) >= Duration::from_millis(700),
            "{accept}: the first line came at {first:?}, the end at {ended:?}"
        );
        let events: Vec<Value> = if accept == "text/event-stream" {
            assert_eq!(content_type, "text/event-stream");
            body.split("\n\n")
                .filter(|frame| !frame.is_empty())
                .map(|frame| {
                    let (event, data) = frame.split_once('\n').expect("event and data");
                    let event = event.strip_prefix("event: ").expect("an event line");
                    let data: Value =
                        serde_json::from_str(data.strip_prefix("data: ").expect("a data line"))
                            .expect("JSON data");
                    assert_eq!(data["type"], event, "{frame}");
                    data
                })
                .collect()
        } else {
            assert_eq!(content_type, "application/x-ndjson");
            body.lines()
                .map(|l| serde_json::from_str(l).expect("NDJSON"))
                .collect()
        };
        let text = |kind: &str| -> String {
            events
                .iter()
                .filter(|e| e["type"] == kind)
                .filter_map(|e| e["data"].as_str())
                .collect()
        };
        assert_eq!(
            events[0],
            json!({"type": "stdout", "data": "line 0\n"}),
            "{events:?}"
        );
        assert_eq!(text("stdout"), "line 0\nline 1\nline 2\n", "{events:?}");
        assert_eq!(text("stderr"), "err\n", "{events:?}");
        let last = events.last().unwrap();
        assert_eq!(last["type"], "result", "{events:?}");
        assert_eq!(last["result"], json!({"kind": "json", "value": "dripped"}));
        assert_eq!(last["path"], "hot");
        assert!(last.get("stdout").is_none(), "output is not sent twice");
    }
    server.stop();
}

/// Issue 15, "done when": the README's deploy example (a bundle deployed
/// with `curl`, invoked, streamed, deleted) works as written. Run with
/// bash, with only its port, its /tmp paths and the binary's path swapped
/// for this test's.
#[test]
fn readme_deploy_example_works_as_written() {
    use std::os::unix::process::CommandExt;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme
        .find("mkdir -p /tmp/hello\n")
        .expect("the example's start");
    let end = start
        + readme[start..]
            .find("kill %1\n")
            .expect("the example's end")
        + 8;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let work = common::temp_path("readme-deploy");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let script = readme[start..end]
        .replace("8080", &port.to_string())
        .replace("/tmp/hello", &work.join("hello").display().to_string())
        .replace("/tmp/ember-data", &work.join("data").display().to_string())
        .replace("target/release/ember", env!("CARGO_BIN_EXE_ember"));
    let mut child = std::process::Command::new("bash")
        .args(["-e", "-c", &script])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        // Its own process group: whatever it leaves running is killed below.
        .process_group(0)
        .spawn()
        .expect("bash");
    let pgid = child.id() as i32;
    let (sender, receiver) = mpsc::channel();
    let mut stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        let _ = sender.send(out);
    });
    let out = receiver.recv_timeout(Duration::from_secs(600));
    // SAFETY: kill takes integers; the group is this test's bash and its children.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let status = child.wait().unwrap();
    let out = out.expect("the example ended within 10 minutes");
    assert!(status.success(), "{status:?}: {out}");
    for expected in [
        r#""status":"building""#,
        r#""status":"ready""#,
        "HTTP/1.1 200 OK",
        "ember-path: hot",
        r#"{"greeting":"hi","hello":"you"}"#,
        r#"{"data":"hello, you\n","type":"stdout"}"#,
        r#""type":"result""#,
    ] {
        assert!(out.contains(expected), "{expected} in:\n{out}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// Issue 15, item 3: with `--in-process` (recycled clones, or fresh ones
/// with `--no-recycle`), a client that goes away also cancels its
/// invocation: the clone is stopped, its slot freed, the cancellation
/// counted, and the next invocation is served.
#[test]
fn in_process_invocations_are_cancelled_when_the_client_goes_away() {
    for extra in [&["--in-process"][..], &["--in-process", "--no-recycle"][..]] {
        let name = format!("serve-cancel-in-process-{}", extra.len());
        let dir = functions_dir(&name);
        let socket = common::temp_path(&format!("{name}.sock"));
        let listen = format!("unix:{}", socket.display());
        let mut args = vec!["--max-live", "1"];
        args.extend_from_slice(extra);
        let server = functions_server(&dir, &listen, &args);
        let mut client = Client::new(Target::Unix(socket.clone()), REQUEST_TIMEOUT);
        let raw = start_looping_invocation(&socket);
        assert!(
            eventually(Duration::from_secs(60), || live(&mut client) == 1),
            "{extra:?}: the looping invocation runs"
        );
        // Give the clone time to be running the handler.
        std::thread::sleep(Duration::from_secs(1));
        drop(raw);
        assert!(
            eventually(Duration::from_secs(10), || live(&mut client) == 0),
            "{extra:?}: the slot is freed when the client goes away"
        );
        served_after_one_cancel(&mut client, &format!("{extra:?}"));
        server.stop();
    }
}
