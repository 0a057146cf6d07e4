//! Layered templates: `function create` loads the handler into a clone of
//! the python3 base snapshot (the image booted and the runtime started
//! once, waiting for its code, cached by its inputs) instead of booting.
//!
//! The bases are made once per cache (a cold boot each, a minute or two
//! on PVM hosts: one without a code drive for single-file functions, one
//! with the placeholder code drive for bundles); every function after
//! that is a restore, the import, the warm-up and a save.

mod common;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ember::function::base::{self, BASE_FILE};
use ember::function::{
    Function, FunctionError, FunctionInvokeOptions, FunctionSpec, HandlerResult, InvocationPath,
    TemplateOptions, MANIFEST_FILE,
};
use serde_json::{json, Value};

fn invoke(function: &Function, event: &Value) -> (Value, InvocationPath) {
    let outcome = function
        .invoke(
            &serde_json::to_vec(event).unwrap(),
            &FunctionInvokeOptions::default(),
        )
        .expect("invoke");
    match outcome.result {
        HandlerResult::Json { value } => (value, outcome.path),
        other => panic!("expected a JSON result, got {other:?}"),
    }
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn single_file(dir: &Path, name: &str, source: &str) -> FunctionSpec {
    let file = dir.join(name);
    std::fs::write(&file, source).unwrap();
    let mut spec = FunctionSpec::python3(&file, "handler");
    spec.warmup_event = Some(br#"{"n": 1}"#.to_vec());
    spec
}

/// Two functions share one base, made once; both work through the hot
/// path, with their own environment, and the template came from the base.
#[test]
fn functions_share_one_python3_base() {
    let options = common::python_template_options();
    let dir = common::temp_path("base-functions");
    std::fs::create_dir_all(&dir).unwrap();
    let mut made_at = None;
    for (name, source, expected) in [
        (
            "double.py",
            "def handler(event):\n    return event['n'] * 2\n",
            json!(42),
        ),
        (
            "greet.py",
            "import os\ndef handler(event, context):\n    \
             return [os.environ.get('GREETING'), context.hot_path, event['n']]\n",
            json!(["hi", true, 21]),
        ),
    ] {
        let mut spec = single_file(&dir, name, source);
        spec.env = vec![("GREETING".into(), "hi".into())];
        let base = base::cached_base_dir(&spec, &options).expect("base key");
        let out = dir.join(format!("{name}.fn"));
        let info = ember::create_function(&spec, &options, &out)
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        assert_eq!(info.base.as_deref(), Some(base.as_path()), "{name}");
        assert!(info.hot_path, "{name}: {:?}", info.hot_path_error);
        // Made once: the second function finds the first one's base.
        let mtime = modified(&base.join(BASE_FILE));
        assert_eq!(
            *made_at.get_or_insert(mtime),
            mtime,
            "{name}: the base was made again"
        );
        let function = Function::open(&out).expect("open");
        let (result, path) = invoke(&function, &json!({"n": 21}));
        assert_eq!(path, InvocationPath::Hot, "{name}");
        assert_eq!(result, expected, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A template made from a base holds all of its memory: a function still
/// works after the base it came from is deleted.
#[test]
fn a_function_outlives_its_base() {
    let options = common::python_template_options();
    let dir = common::temp_path("base-deleted");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = single_file(
        &dir,
        "main.py",
        "def handler(event):\n    return {'got': event}\n",
    );
    let base = base::ensure_base(&options, false, |_| {}).expect("the base");
    // A private copy of the cached base, deleted below (the shared one is
    // other tests' too).
    let copy = dir.join("base");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(&base).unwrap() {
        let from = entry.unwrap().path();
        let to = copy.join(from.file_name().unwrap());
        // The root image is the caller's, not the base's: linked (or
        // copied across file systems).
        if from.file_name() == Some(ember::snapshot::DRIVE_FILE.as_ref())
            && std::fs::hard_link(&from, &to).is_ok()
        {
            continue;
        }
        let status = std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&from)
            .arg(&to)
            .status()
            .expect("cp");
        assert!(status.success(), "cp {}", from.display());
    }
    let mut options = options;
    options.base = Some(copy.clone());
    let out = dir.join("fn");
    let info = ember::create_function(&spec, &options, &out).expect("create");
    assert_eq!(info.base.as_deref(), Some(copy.as_path()));
    std::fs::remove_dir_all(&copy).unwrap();
    let function = Function::open(&out).expect("open");
    let (result, path) = invoke(&function, &json!({"x": 1}));
    assert_eq!(result, json!({"got": {"x": 1}}));
    assert_eq!(path, InvocationPath::Hot);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A handler that fails to import in a clone of the base: the start error
/// carries its traceback, and no function is written.
#[test]
fn import_failure_on_a_base_shows_the_traceback() {
    let options = common::python_template_options();
    let dir = common::temp_path("base-broken");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = single_file(
        &dir,
        "broken.py",
        "def f():\n    raise RuntimeError('at import')\n\nf()\n",
    );
    assert!(base::applies(&spec, &options));
    let out = dir.join("out");
    let err = ember::create_function(&spec, &options, &out).expect_err("a broken handler");
    let message = err.to_string();
    assert!(matches!(err, FunctionError::Startup(_)), "{message}");
    assert!(message.contains("RuntimeError: at import"), "{message}");
    assert!(message.contains("broken.py\", line 2, in f"), "{message}");
    assert!(!out.join(MANIFEST_FILE).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bundles")
}

/// A bundle with a dependency (jinja2) made from the base for bundles: its
/// code drive replaces the base's placeholder.
#[test]
fn a_jinja_bundle_from_the_base_renders() {
    let options: TemplateOptions = common::python_template_options();
    let mut spec = FunctionSpec::python3_bundle(examples().join("jinja"), "page", "handler");
    spec.warmup_event = Some(br#"{"title": "warm", "items": []}"#.to_vec());
    let base = base::cached_base_dir(&spec, &options).expect("base key");
    let out = common::temp_path("base-jinja");
    let info = ember::create_function(&spec, &options, &out).expect("create");
    assert_eq!(info.base.as_deref(), Some(base.as_path()));
    assert!(info.hot_path, "{:?}", info.hot_path_error);
    let function = Function::open(&out).expect("open");
    let (result, path) = invoke(&function, &json!({"title": "ember", "items": ["a", "b"]}));
    assert_eq!(path, InvocationPath::Hot);
    assert_eq!(
        result,
        json!({"html": "<h1>ember</h1>\n<ul><li>a</li><li>b</li></ul>"})
    );
    let _ = std::fs::remove_dir_all(&out);
}
