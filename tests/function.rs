//! Functions: a python handler snapshotted waiting, invoked in fresh clones
//! through the hot path (guest memory + doorbell) and the vsock path.
//!
//! The template is made once per run (and cached across runs by its
//! inputs): one cold boot of the python3 image plus the interpreter's
//! start, about a minute on PVM hosts.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ember::function::{
    Function, FunctionInvokeOptions, FunctionOutcome, HandlerResult, InvocationCancel,
    InvocationPath, OutputSink, OutputStream,
};
use serde_json::{json, Value};

/// The probe function, made on first use.
fn function() -> &'static Function {
    static FUNCTION: OnceLock<Function> = OnceLock::new();
    FUNCTION
        .get_or_init(|| Function::open(common::probe_template()).expect("open the probe function"))
}

fn invoke_with(event: &Value, options: &FunctionInvokeOptions) -> FunctionOutcome {
    let event = serde_json::to_vec(event).unwrap();
    function().invoke(&event, options).expect("invoke")
}

fn invoke(event: Value) -> FunctionOutcome {
    invoke_with(&event, &FunctionInvokeOptions::default())
}

fn json_result(outcome: &FunctionOutcome) -> &Value {
    match &outcome.result {
        HandlerResult::Json { value } => value,
        other => panic!("expected a JSON result, got {other:?}"),
    }
}

#[test]
fn echo_takes_the_hot_path() {
    let event = json!({"op": "echo", "n": 42, "s": "héllo"});
    let outcome = invoke(event.clone());
    assert_eq!(json_result(&outcome), &json!({"echo": event}));
    assert_eq!(outcome.path, InvocationPath::Hot);
    assert!(
        function().manifest().hot_path.is_some(),
        "python runtime without a hot path"
    );
}

#[test]
fn vsock_path_gives_the_same_answer() {
    let event = json!({"op": "echo", "via": "vsock"});
    let options = FunctionInvokeOptions {
        force_vsock: true,
        ..FunctionInvokeOptions::default()
    };
    let outcome = invoke_with(&event, &options);
    assert_eq!(outcome.path, InvocationPath::Vsock);
    assert_eq!(json_result(&outcome), &json!({"echo": event}));
}

#[test]
fn handler_exception_is_a_structured_error() {
    let outcome = invoke(json!({"op": "fail", "why": "testing"}));
    match outcome.result {
        HandlerResult::Error {
            error_type,
            message,
            traceback,
        } => {
            assert_eq!(error_type, "ValueError");
            assert_eq!(message, "bad input: testing");
            assert!(traceback.contains("Traceback"), "{traceback}");
            assert!(traceback.contains("probe.py"), "{traceback}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn endless_handler_is_killed_at_the_timeout() {
    let options = FunctionInvokeOptions {
        timeout: Duration::from_secs(2),
        ..FunctionInvokeOptions::default()
    };
    let started = std::time::Instant::now();
    let outcome = invoke_with(&json!({"op": "loop"}), &options);
    assert_eq!(outcome.result, HandlerResult::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(30));
    // The host is fine: the next clone answers.
    let outcome = invoke(json!({"op": "echo"}));
    assert!(matches!(outcome.result, HandlerResult::Json { .. }));
}

#[test]
fn event_larger_than_the_hot_path_buffer_takes_the_vsock_path() {
    let big = "e".repeat(function().hot_path_capacity() as usize + 1000);
    let event = json!({"op": "echo", "big": big});
    let outcome = invoke(event.clone());
    assert_eq!(outcome.path, InvocationPath::Vsock);
    assert_eq!(json_result(&outcome), &json!({"echo": event}));
}

#[test]
fn result_larger_than_the_hot_path_buffer_comes_back_through_the_agent() {
    let n = function().hot_path_capacity() as usize + 1000;
    let outcome = invoke(json!({"op": "big", "n": n}));
    assert_eq!(outcome.path, InvocationPath::HotWithVsockResult);
    assert_eq!(json_result(&outcome).as_str().map(str::len), Some(n));
}

#[test]
fn eight_concurrent_invocations() {
    let outcomes: Vec<FunctionOutcome> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8)
            .map(|i| scope.spawn(move || invoke(json!({"op": "echo", "i": i}))))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (i, outcome) in outcomes.iter().enumerate() {
        assert_eq!(
            json_result(outcome),
            &json!({"echo": {"op": "echo", "i": i}})
        );
    }
}

#[test]
fn clones_share_no_state() {
    for _ in 0..3 {
        let outcome = invoke(json!({"op": "count"}));
        assert_eq!(json_result(&outcome), &json!({"count": 1}));
    }
}

#[test]
fn clones_see_different_urandom() {
    let first = invoke(json!({"op": "rand"}));
    let second = invoke(json!({"op": "rand"}));
    assert_eq!(first.path, InvocationPath::Hot);
    assert_ne!(json_result(&first), json_result(&second));
    let options = FunctionInvokeOptions {
        force_vsock: true,
        ..FunctionInvokeOptions::default()
    };
    let third = invoke_with(&json!({"op": "rand"}), &options);
    assert_ne!(json_result(&first), json_result(&third));
    assert_ne!(json_result(&second), json_result(&third));
}

#[test]
fn root_drive_cannot_be_written_from_the_guest() {
    let image = ember::paths::default_python_image();
    let before = std::fs::read(&image).unwrap();
    let outcome = invoke(json!({"op": "write_root"}));
    let result = json_result(&outcome);
    for path in [
        "/probe-write",
        "/usr/lib/python3/probe-write",
        "/etc/hostname",
    ] {
        assert_eq!(result[path], "Read-only file system", "{path}: {result}");
    }
    assert_ne!(result["/dev/vda"], "opened", "{result}");
    assert_eq!(result["/tmp"], "private");
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );
}

#[test]
fn output_and_bytes_results() {
    let outcome = invoke(json!({"op": "print"}));
    assert_eq!(json_result(&outcome), &json!("printed"));
    assert_eq!(outcome.stdout, b"to stdout\n");
    assert_eq!(outcome.stderr, b"to stderr\n");
    let outcome = invoke(json!({"op": "bytes"}));
    assert_eq!(
        outcome.result,
        HandlerResult::Bytes {
            bytes: vec![0, 1, 2, 3]
        }
    );
}

#[test]
fn bad_requests_are_refused() {
    let options = FunctionInvokeOptions {
        timeout: Duration::ZERO,
        ..FunctionInvokeOptions::default()
    };
    assert!(function().invoke(b"{}", &options).is_err());
    // A directory without a function in it.
    let empty = common::temp_path("no-function");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(Function::open(&empty).is_err());
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn exec_runtime_from_the_command_line() {
    // Any executable speaking the runtime pipe protocol is a function; this
    // one (POSIX sh) runs on the plain initramfs, without a root image.
    let dir = common::temp_path("exec-echo");
    let _ = std::fs::remove_dir_all(&dir);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/functions/echo.sh");
    let dir_arg = dir.to_str().unwrap();
    let create = common::run_ember(
        &[
            "function",
            "create",
            "--runtime",
            "exec",
            "--handler",
            script.to_str().unwrap(),
            "--warmup-event",
            "{}",
            "--out",
            dir_arg,
        ],
        Duration::from_secs(600),
    );
    assert!(
        create.status.success(),
        "{}",
        String::from_utf8_lossy(&create.stderr)
    );
    let invoke = common::run_ember(
        &[
            "invoke",
            "--function",
            dir_arg,
            "--event",
            r#"{"from": "sh"}"#,
            "--json",
        ],
        Duration::from_secs(120),
    );
    assert!(
        invoke.status.success(),
        "{}",
        String::from_utf8_lossy(&invoke.stderr)
    );
    let outcome: Value = serde_json::from_slice(&invoke.stdout).unwrap();
    assert_eq!(outcome["result"]["kind"], "json");
    assert_eq!(outcome["result"]["value"], json!({"from": "sh"}));
    assert_eq!(outcome["path"], "vsock");
    // A bad event file is a clear error, not a panic.
    let missing = common::run_ember(
        &[
            "invoke",
            "--function",
            dir_arg,
            "--event-file",
            "/nonexistent/event.json",
        ],
        Duration::from_secs(60),
    );
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("event"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn isolated_invocations_in_jailed_workers() {
    let options = FunctionInvokeOptions {
        isolation: Some(ember::worker::Isolation::new(env!("CARGO_BIN_EXE_ember"))),
        ..FunctionInvokeOptions::default()
    };
    let event = json!({"op": "echo", "jailed": true});
    let outcome = invoke_with(&event, &options);
    assert_eq!(outcome.path, InvocationPath::Hot);
    assert_eq!(json_result(&outcome), &json!({"echo": event}));
    // The vsock path and a structured error come back through the worker too.
    let options = FunctionInvokeOptions {
        force_vsock: true,
        ..options
    };
    let outcome = invoke_with(&json!({"op": "fail", "why": "jailed"}), &options);
    assert_eq!(outcome.path, InvocationPath::Vsock);
    assert!(matches!(
        outcome.result,
        HandlerResult::Error { ref message, .. } if message == "bad input: jailed"
    ));
}

#[test]
fn clones_prepared_ahead_answer_after_waiting() {
    let function = function();
    let options = FunctionInvokeOptions::default();
    let clones: Vec<_> = (0..2)
        .map(|_| function.prepare(&options).expect("prepare"))
        .collect();
    // A prepared clone may wait in a pool for longer than its pushed-out
    // timer; the timer is armed when it starts, not when it was made.
    std::thread::sleep(Duration::from_millis(700));
    for (i, clone) in clones.into_iter().enumerate() {
        let event = serde_json::to_vec(&json!({"op": "echo", "prepared": i})).unwrap();
        let outcome = function
            .invoke_prepared(clone, &event, &options)
            .expect("invoke a prepared clone");
        assert_eq!(outcome.path, InvocationPath::Hot);
        assert_eq!(
            json_result(&outcome),
            &json!({"echo": {"op": "echo", "prepared": i}})
        );
    }
    // Dropping a prepared clone destroys it without running it.
    drop(function.prepare(&options).expect("prepare"));
}

// --- Hostile handlers and state made at import time ---------------------------------------

/// A python function made from `source` saved as `file_name` (cached by its
/// inputs, like the probe function): one cold boot each on first use.
fn python_function(file_name: &str, source: &str) -> Function {
    let dir = common::temp_path(&format!("src-{file_name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(file_name);
    std::fs::write(&file, source).unwrap();
    let spec = ember::function::FunctionSpec::python3(&file, "handler");
    let options = common::python_template_options();
    let template = ember::ensure_cached_function(&spec, &options, |dir| {
        eprintln!("making {file_name} in {}", dir.display())
    })
    .unwrap_or_else(|err| panic!("template of {file_name}: {err}"));
    let _ = std::fs::remove_dir_all(&dir);
    Function::open(&template).expect("open the function")
}

/// Named like a module the runtime imports (or like the runtime), it logs in
/// `sys` every time it is executed whether fd 5 (the agent's /dev/mem) was
/// open; imported in place of the standard library's module it then becomes
/// that module, so that the runtime keeps working.
const SHADOW: &str = r#"
import os
import sys

try:
    os.fstat(5)
    fd5 = "open"
except OSError as exc:
    fd5 = os.strerror(exc.errno)
log = sys.__dict__.setdefault("_ember_test_fd5", [])
log.append([__name__, fd5])
if __name__ in ("json", "ctypes", "random"):
    here = os.path.dirname(os.path.abspath(__file__))
    del sys.modules[__name__]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import importlib

    sys.modules[__name__] = importlib.import_module(__name__)
    sys.path[:] = saved


def handler(event, context):
    return sys._ember_test_fd5
"#;

#[test]
fn hostile_handlers_never_see_the_doorbell() {
    let names = ["json.py", "ctypes.py", "random.py", "ember_runtime.py"];
    // One after the other: each is a cold boot of the python image, and
    // boots side by side only slow each other down.
    let results: Vec<(&str, Function)> = names
        .iter()
        .map(|&name| {
            // The file's name in its text too: the template cache keys a
            // python handler by its contents and function name only.
            (name, python_function(name, &format!("# {name}\n{SHADOW}")))
        })
        .collect();
    for (name, function) in results {
        // The runtime did get /dev/mem (the hot path is there)...
        assert!(
            function.manifest().hot_path.is_some(),
            "{name}: no hot path"
        );
        let outcome = function
            .invoke(b"{}", &FunctionInvokeOptions::default())
            .expect("invoke");
        assert_eq!(outcome.path, InvocationPath::Hot, "{name}");
        // ...and every execution of the handler's file found fd 5 closed.
        let log = json_result(&outcome)
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!log.is_empty(), "{name}: {log:?}");
        for entry in &log {
            assert_eq!(entry[1], "Bad file descriptor", "{name}: {log:?}");
        }
    }
}

#[test]
fn hostile_environment_is_refused_before_boot() {
    let dir = common::temp_path("env-handler");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("main.py");
    std::fs::write(&file, "def handler(event):\n    return event\n").unwrap();
    for var in ["PYTHONPATH=/run/ember/function", "LD_PRELOAD=/tmp/x.so"] {
        let out = common::run_ember(
            &[
                "function",
                "create",
                "--runtime",
                "python3",
                "--handler",
                &format!("{}:handler", file.display()),
                "--env",
                var,
                "--out",
                dir.join("out").to_str().unwrap(),
            ],
            Duration::from_secs(120),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let key = var.split('=').next().unwrap();
        assert!(!out.status.success(), "{var}: {stderr}");
        assert!(
            stderr.contains(&format!("may not set {key}")) && stderr.contains("LD_* and PYTHON*"),
            "{var}: {stderr}"
        );
        assert!(!dir.join("out").join("manifest.json").exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// State made at import time: the runtime reseeds `random` and numpy's global
/// generator, and runs the handler's `ember.on_restore` hooks, in every
/// clone. numpy is not in the guest image: a stand-in module with numpy's
/// global-generator API (`numpy.random.seed`/`random`) is installed in
/// `sys.modules` at import, so this checks the runtime's side (that it
/// reseeds through `numpy.random.seed`), not numpy itself.
const RESTORE_HANDLER: &str = r#"
import random
import sys
import types

import ember

fake_numpy = types.ModuleType("numpy")
fake_numpy.random = types.ModuleType("numpy.random")
_numpy_state = random.Random(0)
fake_numpy.random.seed = lambda key=None: _numpy_state.seed(repr(key))
fake_numpy.random.random = lambda: _numpy_state.random()
sys.modules["numpy"] = fake_numpy
sys.modules["numpy.random"] = fake_numpy.random
fake_numpy.random.seed(0)

state = {"hooks": 0, "token": "from the snapshot", "mine": random.Random(42)}


@ember.on_restore
def reseed_mine():
    state["hooks"] += 1
    state["token"] = random.getrandbits(64)
    state["mine"].seed(random.getrandbits(64))


def handler(event, context):
    return {
        "hooks": state["hooks"],
        "token": state["token"],
        "mine": state["mine"].random(),
        "random": random.random(),
        "numpy": sys.modules["numpy"].random.random(),
    }
"#;

#[test]
fn clones_are_reseeded_and_run_on_restore_hooks() {
    let function = python_function("restore.py", RESTORE_HANDLER);
    let hot = FunctionInvokeOptions::default();
    let vsock = FunctionInvokeOptions {
        force_vsock: true,
        ..FunctionInvokeOptions::default()
    };
    let outcomes: Vec<FunctionOutcome> = [&hot, &hot, &vsock]
        .into_iter()
        .map(|options| function.invoke(b"{}", options).expect("invoke"))
        .collect();
    assert_eq!(outcomes[0].path, InvocationPath::Hot);
    assert_eq!(outcomes[2].path, InvocationPath::Vsock);
    let values: Vec<&Value> = outcomes.iter().map(json_result).collect();
    for value in &values {
        // One hook call per clone: each clone starts from the snapshot.
        assert_eq!(value["hooks"], 1, "{values:?}");
        assert!(value["token"].is_u64(), "{values:?}");
    }
    for key in ["token", "mine", "random", "numpy"] {
        for (i, a) in values.iter().enumerate() {
            for b in &values[i + 1..] {
                assert_ne!(a[key], b[key], "{key} is shared by clones: {values:?}");
            }
        }
    }
}

/// What a streaming sink saw: each chunk with when it came.
type Seen = Arc<Mutex<Vec<(Instant, OutputStream, Vec<u8>)>>>;

fn recording_sink() -> (OutputSink, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let sink = OutputSink::new(move |stream, bytes| {
        log.lock()
            .unwrap()
            .push((Instant::now(), stream, bytes.to_vec()));
    });
    (sink, seen)
}

fn streamed(seen: &Seen, which: OutputStream) -> Vec<u8> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(_, s, _)| *s == which)
        .flat_map(|(_, _, b)| b.clone())
        .collect()
}

/// Three lines 700 ms of guest user-mode work apart: on the hot path,
/// the first line reaches the sink while the handler still runs (well
/// before the invocation returns), whatever runs the clone; everything
/// streamed is in the outcome too.
fn check_streaming(
    what: &str,
    invoke: impl FnOnce(&[u8], &FunctionInvokeOptions) -> FunctionOutcome,
) {
    let (sink, seen) = recording_sink();
    let options = FunctionInvokeOptions {
        output: Some(sink),
        ..FunctionInvokeOptions::default()
    };
    let event = json!({"op": "drip", "lines": 3, "gap_ms": 700}).to_string();
    let outcome = invoke(event.as_bytes(), &options);
    let returned = Instant::now();
    assert_eq!(
        outcome.result,
        HandlerResult::Json {
            value: json!("dripped")
        },
        "{what}"
    );
    assert_eq!(outcome.path, InvocationPath::Hot, "{what}");
    assert_eq!(
        streamed(&seen, OutputStream::Stdout),
        b"line 0\nline 1\nline 2\n",
        "{what}"
    );
    assert_eq!(streamed(&seen, OutputStream::Stderr), b"err\n", "{what}");
    assert_eq!(outcome.stdout, b"line 0\nline 1\nline 2\n", "{what}");
    assert_eq!(outcome.stderr, b"err\n", "{what}");
    let seen = seen.lock().unwrap();
    let (first, stream, bytes) = &seen[0];
    assert_eq!(
        (*stream, bytes.as_slice()),
        (OutputStream::Stdout, &b"line 0\n"[..]),
        "{what}"
    );
    // 1.4 s of the handler's own work follow the first line.
    let ahead = returned.saturating_duration_since(*first);
    assert!(
        ahead >= Duration::from_millis(700),
        "{what}: the first line came only {ahead:?} before the invocation returned"
    );
}

/// Issue 15, item 3: `FunctionInvokeOptions::output` streams a fresh
/// clone's output while the handler runs, jailed (the default) or in
/// this process.
#[test]
fn output_streams_while_the_handler_runs() {
    check_streaming("jailed fresh clone", |event, options| {
        function().invoke(event, options).expect("invoke")
    });
    check_streaming("in-process fresh clone", |event, options| {
        let options = FunctionInvokeOptions {
            isolation: None,
            ..options.clone()
        };
        function().invoke(event, &options).expect("invoke")
    });
}

/// The same through recycled clones, in a jailed worker and in this
/// process; the clone is reused after a streamed invocation, and the next
/// one (not streamed) sees no trace of it.
#[test]
fn output_streams_from_recycled_clones() {
    use ember::function::RecycleOptions;
    use ember::worker::recycled::JailedRecycledFunction;
    let function = Arc::new(Function::open(common::probe_template()).expect("open"));
    let recycle = RecycleOptions::default();
    let mut jailed = JailedRecycledFunction::new(
        function.clone(),
        &recycle,
        &ember::isolation::Isolation::default(),
    )
    .expect("jailed recycled clone");
    check_streaming("jailed recycled clone", |event, options| {
        let outcome = jailed.invoke(event, options).expect("invoke");
        assert!(outcome.recycle.is_some_and(|r| r.reused), "{outcome:?}");
        outcome
    });
    let outcome = jailed
        .invoke(br#"{"op": "print"}"#, &FunctionInvokeOptions::default())
        .expect("invoke after streaming");
    assert_eq!(outcome.stdout, b"to stdout\n");

    let mut clone = function.recycled(&recycle).expect("recycled clone");
    check_streaming("in-process recycled clone", |event, options| {
        let outcome = clone.invoke(event, options).expect("invoke");
        let recycle = outcome.recycle.expect("recycle info");
        assert!(recycle.reused, "{recycle:?}");
        outcome
    });
    let outcome = clone
        .invoke(br#"{"op": "print"}"#, &FunctionInvokeOptions::in_process())
        .expect("invoke after streaming");
    assert_eq!(outcome.stdout, b"to stdout\n");
}

/// Where output cannot stream live (the vsock path), the sink still gets
/// all of it, at the end; a timed-out invocation keeps what streamed.
#[test]
fn output_reaches_the_sink_on_every_path() {
    let (sink, seen) = recording_sink();
    let options = FunctionInvokeOptions {
        output: Some(sink),
        force_vsock: true,
        ..FunctionInvokeOptions::default()
    };
    let outcome = invoke_with(&json!({"op": "print"}), &options);
    assert_eq!(outcome.path, InvocationPath::Vsock);
    assert_eq!(streamed(&seen, OutputStream::Stdout), b"to stdout\n");
    assert_eq!(streamed(&seen, OutputStream::Stderr), b"to stderr\n");

    let (sink, seen) = recording_sink();
    let options = FunctionInvokeOptions {
        output: Some(sink),
        timeout: Duration::from_millis(2500),
        ..FunctionInvokeOptions::default()
    };
    let outcome = invoke_with(
        &json!({"op": "drip", "lines": 2, "gap_ms": 60000}),
        &options,
    );
    assert_eq!(outcome.result, HandlerResult::TimedOut);
    assert_eq!(streamed(&seen, OutputStream::Stdout), b"line 0\n");
}

/// Runs a handler that never returns with `options` plus a cancel handle,
/// cancels it after `after`, and checks that the invocation ends with
/// `Cancelled` promptly (long before its 120 s timeout).
fn check_cancel(
    what: &str,
    options: &FunctionInvokeOptions,
    invoke: impl FnOnce(
            &[u8],
            &FunctionInvokeOptions,
        ) -> Result<FunctionOutcome, ember::function::FunctionError>
        + Send,
) {
    let cancel = InvocationCancel::new();
    let options = FunctionInvokeOptions {
        timeout: Duration::from_secs(120),
        cancel: Some(cancel.clone()),
        ..options.clone()
    };
    let (result, cancelled) = std::thread::scope(|scope| {
        let running = scope.spawn(|| invoke(br#"{"op": "loop"}"#, &options));
        std::thread::sleep(Duration::from_secs(2));
        cancel.cancel();
        let cancelled = Instant::now();
        (running.join().unwrap(), cancelled)
    });
    assert!(
        matches!(result, Err(ember::function::FunctionError::Cancelled)),
        "{what}: {result:?}"
    );
    assert!(
        cancelled.elapsed() < Duration::from_secs(30),
        "{what}: it ended only {:?} after the cancel",
        cancelled.elapsed()
    );
}

/// Issue 15, item 3 (a client that goes away cancels its invocation):
/// `FunctionInvokeOptions::cancel` ends a running invocation from another
/// thread, in-process or jailed, fresh or recycled, hot path or vsock
/// path; a recycled clone is not reused after it.
#[test]
fn invocations_are_cancelled_from_another_thread() {
    use ember::function::RecycleOptions;
    use ember::worker::recycled::JailedRecycledFunction;
    let in_process = FunctionInvokeOptions::in_process();
    let jailed = FunctionInvokeOptions::default();
    // Made (or found) first: the cancels below land while clones run.
    let _ = function();
    check_cancel("in-process fresh clone", &in_process, |e, o| {
        function().invoke(e, o)
    });
    let vsock = FunctionInvokeOptions {
        force_vsock: true,
        ..in_process.clone()
    };
    check_cancel("in-process fresh clone, vsock path", &vsock, |e, o| {
        function().invoke(e, o)
    });
    check_cancel("jailed fresh clone", &jailed, |e, o| {
        function().invoke(e, o)
    });

    let shared = Arc::new(Function::open(common::probe_template()).expect("open"));
    let mut clone = shared
        .recycled(&RecycleOptions::default())
        .expect("recycled clone");
    check_cancel("in-process recycled clone", &in_process, |e, o| {
        clone.invoke(e, o)
    });
    assert!(!clone.is_usable(), "a cancelled clone is not reused");
    let mut worker = JailedRecycledFunction::new(
        shared.clone(),
        &RecycleOptions::default(),
        &ember::isolation::Isolation::default(),
    )
    .expect("jailed recycled clone");
    let pid = worker.worker_pid().expect("a worker");
    check_cancel("jailed recycled clone", &jailed, |e, o| worker.invoke(e, o));
    assert!(!worker.is_usable(), "a cancelled worker is not reused");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the cancelled worker is gone"
    );
}

/// `ember invoke --stream` writes the handler's output to stderr as it
/// prints it: the first line appears while the handler still works.
#[test]
fn the_cli_streams_output_with_stream() {
    use std::io::Read;
    let function = common::probe_template().to_str().unwrap().to_string();
    let started = Instant::now();
    let mut child = common::ember()
        .args([
            "invoke",
            "--function",
            &function,
            "--stream",
            "--event",
            r#"{"op": "drip", "lines": 3, "gap_ms": 700}"#,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ember invoke");
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut first_line = None;
    let mut buf = [0u8; 1024];
    loop {
        let n = stderr.read(&mut buf).expect("stderr");
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if first_line.is_none() && String::from_utf8_lossy(&seen).contains("line 0") {
            first_line = Some(started.elapsed());
        }
    }
    let output = child.wait_with_output().expect("ember invoke ends");
    let ended = started.elapsed();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "\"dripped\"\n");
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.contains("line 0\nerr\nline 1\nline 2\n"), "{seen}");
    let first = first_line.expect("the first line");
    assert!(
        ended.saturating_sub(first) >= Duration::from_millis(700),
        "the first line came at {first:?}, the end at {ended:?}"
    );
}
