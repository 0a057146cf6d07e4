//! Recycled clones: one microVM of a function serving invocation after
//! invocation, reset in place to the template in between. Each test checks
//! that an invocation in a recycled clone sees exactly what it would see in
//! a fresh clone, whatever the invocations before it did.
//!
//! Uses the probe function (tests/functions/probe.py), made once per run
//! and cached by its inputs.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ember::function::{
    Function, FunctionInvokeOptions, FunctionOutcome, FunctionPool, HandlerResult, PoolOptions,
    RecycleOptions, RecycledFunction,
};
use serde_json::{json, Value};

fn function() -> &'static Arc<Function> {
    static FUNCTION: OnceLock<Arc<Function>> = OnceLock::new();
    FUNCTION.get_or_init(|| {
        Arc::new(Function::open(common::probe_template()).expect("open the probe function"))
    })
}

fn verified() -> RecycleOptions {
    RecycleOptions {
        verify: true,
        ..RecycleOptions::default()
    }
}

fn invoke(clone: &mut RecycledFunction, event: Value) -> FunctionOutcome {
    let event = serde_json::to_vec(&event).unwrap();
    clone
        .invoke(&event, &FunctionInvokeOptions::default())
        .expect("invoke")
}

fn json_result(outcome: &FunctionOutcome) -> &Value {
    match &outcome.result {
        HandlerResult::Json { value } => value,
        other => panic!("expected a JSON result, got {other:?}"),
    }
}

/// What a fresh clone reports for `{"op": "recycle_state"}`.
fn fresh_state() -> Value {
    let outcome = function()
        .invoke(
            br#"{"op": "recycle_state"}"#,
            &FunctionInvokeOptions::default(),
        )
        .expect("fresh invoke");
    json_result(&outcome).clone()
}

#[test]
fn invoke_repeat_starts_every_invocation_from_the_template() {
    let dir = common::probe_template().to_str().unwrap().to_string();
    let out = common::run_ember(
        &[
            "invoke",
            "--function",
            &dir,
            "--event",
            r#"{"op": "count"}"#,
            "--repeat",
            "5",
        ],
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec![r#"{"count":1}"#; 5]
    );

    // --events: one invocation per line, results in order, one clone.
    let events = common::temp_path("events.jsonl");
    std::fs::write(
        &events,
        "{\"op\": \"count\"}\n{\"op\": \"echo\", \"n\": 2}\n\n{\"op\": \"count\"}\n",
    )
    .unwrap();
    let out = common::run_ember(
        &[
            "invoke",
            "--function",
            &dir,
            "--events",
            events.to_str().unwrap(),
            "--json",
        ],
        Duration::from_secs(300),
    );
    let _ = std::fs::remove_file(&events);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON outcome per line"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["result"]["value"], json!({"count": 1}));
    assert_eq!(lines[1]["result"]["value"]["echo"]["n"], 2);
    assert_eq!(lines[2]["result"]["value"], json!({"count": 1}));
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["recycle"]["invocation"], i + 1, "one clone served all");
        assert_eq!(line["recycle"]["reused"], true);
    }
}

#[test]
fn hostile_invocations_leave_nothing_a_verified_reset_misses() {
    let fresh = fresh_state();
    let mut clone = function().recycled(&verified()).expect("recycled clone");
    let mut kernel_ran = 0;
    for step in 0..200u64 {
        let outcome = invoke(&mut clone, json!({"op": "recycle_adversary", "step": step}));
        let result = json_result(&outcome);
        assert_eq!(result["kind"], step % 12, "step {step}: {result}");
        let info = outcome.recycle.expect("recycle info");
        assert!(
            info.reused,
            "step {step}: the clone was not reused: {info:?}"
        );
        kernel_ran += usize::from(info.reset.kernel_ran);
        if step % 25 == 24 {
            let state = invoke(&mut clone, json!({"op": "recycle_state"}));
            assert_eq!(json_result(&state), &fresh, "after step {step}");
        }
    }
    assert_eq!(clone.invocations(), 208);
    eprintln!("the guest kernel ran in {kernel_ran} of 200 hostile invocations");
}

#[test]
fn a_mapping_made_by_one_invocation_is_gone_in_the_next() {
    let mut clone = function().recycled(&verified()).expect("recycled clone");
    for round in 0..3 {
        let mapped = invoke(&mut clone, json!({"op": "recycle_map_fixed"}));
        assert_eq!(
            json_result(&mapped),
            &json!({"mapped": true, "present": true}),
            "round {round}"
        );
        let probe = invoke(&mut clone, json!({"op": "recycle_probe_fixed"}));
        // As in a fresh clone: nothing was mapped there, the new mapping
        // reads zeros, and reading it faulted (the kernel has an entry).
        assert_eq!(
            json_result(&probe),
            &json!({"mapped_before": false, "data": "00".repeat(12), "present_after_read": true}),
            "round {round}"
        );
    }
}

#[test]
fn a_secret_planted_by_one_invocation_is_not_found_by_the_next() {
    let mut clone = function().recycled(&verified()).expect("recycled clone");
    let secret: Vec<u8> = (0..32).map(|_| rand_byte()).collect();
    let planted = invoke(
        &mut clone,
        json!({"op": "recycle_plant", "secret": hex(&secret)}),
    );
    assert_eq!(json_result(&planted), &json!({"planted": 32}));
    // The host's view: nowhere in the clone's memory after the reset.
    let memory = clone.guest_memory().expect("a usable clone");
    assert!(
        !ember::snapshot::guest_memory_contains(memory, &secret),
        "the secret is still in guest memory after the reset"
    );
    let (a, b) = secret.split_at(16);
    let search = invoke(
        &mut clone,
        json!({"op": "recycle_search", "a": hex(a), "b": hex(b)}),
    );
    assert_eq!(json_result(&search), &json!({"found": []}));
}

#[test]
fn every_recycled_invocation_gets_fresh_entropy() {
    let mut clone = function()
        .recycled(&RecycleOptions::default())
        .expect("recycled clone");
    let a = invoke(&mut clone, json!({"op": "rand"}));
    let b = invoke(&mut clone, json!({"op": "rand"}));
    assert_ne!(json_result(&a)["rand"], json_result(&b)["rand"]);
}

#[test]
fn a_pool_replaces_a_clone_that_timed_out() {
    let pool = FunctionPool::new(
        Arc::clone(function()),
        PoolOptions {
            min: 1,
            max: 1,
            recycle: RecycleOptions::default(),
        },
    )
    .expect("pool");
    let short = FunctionInvokeOptions {
        timeout: Duration::from_millis(300),
        ..FunctionInvokeOptions::default()
    };
    let outcome = pool.invoke(br#"{"op": "loop"}"#, &short).expect("invoke");
    assert_eq!(outcome.result, HandlerResult::TimedOut);
    assert!(!outcome.recycle.expect("recycle info").reused);
    let outcome = pool
        .invoke(br#"{"op": "count"}"#, &FunctionInvokeOptions::default())
        .expect("invoke");
    assert_eq!(json_result(&outcome), &json!({"count": 1}));
    let stats = pool.stats();
    assert_eq!((stats.replaced, stats.live, stats.invocations), (1, 1, 2));
}

fn rand_byte() -> u8 {
    let mut b = [0u8; 1];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    b[0]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The host's wall clock, seconds since the epoch.
fn host_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `time.time()` and `datetime.now()` in a handler read the host's clock
/// (within 50 ms), not the snapshot's, on every path.
fn assert_clock_is_the_hosts(path: &str, outcome: &FunctionOutcome, before: f64, after: f64) {
    let value = json_result(outcome);
    for key in ["time", "now"] {
        let t = value[key].as_f64().expect("a time");
        assert!(
            t > before - 0.05 && t < after + 0.05,
            "{path}: {key} = {t:.3}, the host read {before:.3} .. {after:.3}"
        );
    }
}

#[test]
fn handlers_read_the_hosts_wall_clock_on_every_path() {
    let function = function();
    let created = function.manifest().created_unix_ms as f64 / 1e3;
    eprintln!("the template is {:.0} s old", host_time() - created);
    assert!(
        function.manifest().guest_clock.is_some(),
        "the template records no guest clock"
    );
    let event = br#"{"op": "clock"}"#;
    let options = FunctionInvokeOptions::default();

    let before = host_time();
    let fresh = function.invoke(event, &options).expect("fresh");
    assert_clock_is_the_hosts("fresh", &fresh, before, host_time());

    let prepared = function.prepare(&options).expect("prepare");
    // A prepared clone may wait in a pool before its request comes.
    std::thread::sleep(Duration::from_millis(300));
    let before = host_time();
    let outcome = function
        .invoke_prepared(prepared, event, &options)
        .expect("prepared");
    assert_clock_is_the_hosts("prepared", &outcome, before, host_time());

    let mut clone = function.recycled(&verified()).expect("recycled clone");
    for round in 0..3 {
        let before = host_time();
        let outcome = clone.invoke(event, &options).expect("recycled");
        assert_clock_is_the_hosts(&format!("recycled #{round}"), &outcome, before, host_time());
    }
}
