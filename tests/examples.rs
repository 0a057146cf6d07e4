//! The single-file example functions in `examples/functions/`, made into
//! templates and invoked as a user would, with the guest-kernel work each
//! invocation caused (KVM's counters for the clone's vCPU).
//!
//! The point of the runtime's memory defaults (README, "What makes a
//! handler slow"): a handler's fresh allocations land in heap the template
//! already touched, so most cost no guest page fault, where stock
//! allocators fault every new page in (each one emulated guest-kernel work
//! on PVM hosts). The stock template is the control: it shows the counter
//! does see the faults the defaults avoid.

mod common;

use std::path::{Path, PathBuf};

use ember::function::{
    Function, FunctionInvokeOptions, FunctionOutcome, FunctionSpec, HandlerResult, InvocationPath,
};
use serde_json::{json, Value};

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/functions")
        .join(file)
}

/// The cached template of `file`'s `handler`, warmed with `warmup`.
fn template(file: &str, warmup: Value, env: &[(&str, &str)]) -> Function {
    let mut spec = FunctionSpec::python3(example(file), "handler");
    spec.warmup_event = Some(serde_json::to_vec(&warmup).unwrap());
    spec.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let options = common::python_template_options();
    let dir = ember::ensure_cached_function(&spec, &options, |dir| {
        eprintln!("making {file} {env:?} in {}", dir.display())
    })
    .unwrap_or_else(|e| panic!("template of {file}: {e}"));
    Function::open(&dir).expect("open the template")
}

/// One hot-path invocation in a fresh clone of this process (the guest
/// kernel's counters are read from the clone's vCPU).
fn invoke(function: &Function, event: Value) -> (Value, FunctionOutcome) {
    let outcome = function
        .invoke(
            &serde_json::to_vec(&event).unwrap(),
            &FunctionInvokeOptions::in_process(),
        )
        .expect("invoke");
    assert_eq!(outcome.path, InvocationPath::Hot, "{outcome:?}");
    let HandlerResult::Json { value } = &outcome.result else {
        panic!("not a JSON result: {:?}", outcome.result);
    };
    (value.clone(), outcome)
}

fn guest_page_faults(outcome: &FunctionOutcome) -> u64 {
    outcome
        .guest_kernel
        .as_ref()
        .expect("an in-process clone reports its guest-kernel work")
        .guest_page_faults
}

/// The grid the example computes, counted the same way on the host.
fn mandelbrot_inside(size: u32, limit: u32) -> u64 {
    let mut inside = 0;
    for row in 0..size {
        let ci = f64::from(row) * 2.4 / f64::from(size) - 1.2;
        for col in 0..size {
            let cr = f64::from(col) * 3.0 / f64::from(size) - 2.1;
            let (mut zr, mut zi) = (0.0f64, 0.0f64);
            let mut escaped = false;
            for _ in 0..limit {
                (zr, zi) = (zr * zr - zi * zi + cr, 2.0 * zr * zi + ci);
                if zr * zr + zi * zi > 4.0 {
                    escaped = true;
                    break;
                }
            }
            inside += u64::from(!escaped);
        }
    }
    inside
}

#[test]
fn mandelbrot_runs_in_user_mode_only() {
    let function = template("mandelbrot.py", json!({"size": 8, "iterations": 10}), &[]);
    for (size, limit) in [(60, 50), (90, 30)] {
        let (value, outcome) = invoke(&function, json!({"size": size, "iterations": limit}));
        assert_eq!(
            value,
            json!({"size": size, "iterations": limit, "inside": mandelbrot_inside(size, limit)})
        );
        let faults = guest_page_faults(&outcome);
        eprintln!("mandelbrot {size}x{size}: {faults} guest page faults");
        assert!(faults <= 16, "{faults} guest page faults: {outcome:?}");
    }
}

#[test]
fn fresh_allocations_within_the_pre_touched_heap_mostly_cost_no_guest_page_fault() {
    // About 6 MB of new objects per call: 10,000 dicts with their strings
    // (pymalloc arenas, from the heap) and 30 blobs of 100 kB (glibc's
    // heap); the default pre-touched heap is 16 MiB. Warmed with a tiny
    // event, so the warm-up left no peak of its own behind.
    let event = json!({"rows": 10000, "blobs": 30, "blob_bytes": 100000});
    let warmup = json!({"rows": 1, "blobs": 1, "blob_bytes": 1});
    let expected = json!({"rows": 10000, "last": "user9999", "bytes": 3000000});

    let kept = template("alloc.py", warmup.clone(), &[]);
    let stock = template(
        "alloc.py",
        warmup,
        &[("EMBER_KEEP_MEMORY", "0"), ("EMBER_ARENA_MIB", "0")],
    );
    let mut figures = Vec::new();
    for (name, function) in [("kept", &kept), ("stock", &stock)] {
        let (value, outcome) = invoke(function, event.clone());
        assert_eq!(value, expected, "{name}");
        figures.push(guest_page_faults(&outcome));
    }
    let [kept_faults, stock_faults] = figures[..] else {
        unreachable!()
    };
    eprintln!(
        "6 MB of fresh objects: {kept_faults} guest page faults with the runtime's memory \
         defaults, {stock_faults} with stock allocators"
    );
    assert!(
        stock_faults >= 500,
        "stock allocators should fault the new pages in: {stock_faults}"
    );
    // Measured here: 174 against 1,474 (the rest of the 6 MB lands in
    // pre-touched pages). At least 4x fewer, or the defaults do not work.
    assert!(
        kept_faults * 4 <= stock_faults,
        "the pre-touched heap should hold most of them: {kept_faults} guest page faults \
         against {stock_faults}"
    );
}
