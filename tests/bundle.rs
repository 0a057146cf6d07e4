//! Functions from code bundles: a directory or a `.zip` with packages,
//! data files and a `requirements.txt` installed with pip (real pip, from
//! PyPI), on a read-only code drive the guest mounts at /var/task.
//!
//! Each template is one cold boot of the python3 image (minutes on PVM
//! hosts, more under load), cached across runs by content: the heavy ones
//! (numpy) are made once. Bad input is refused before anything boots,
//! except a handler that fails to import, which needs the guest to say so.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember::function::{
    Function, FunctionError, FunctionInvokeOptions, FunctionSpec, HandlerResult, TemplateOptions,
};
use serde_json::{json, Value};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bundles")
}

fn options() -> TemplateOptions {
    common::python_template_options()
}

fn spec(code: &Path, handler: &str) -> FunctionSpec {
    let (module, name) = handler.split_once(':').expect("MODULE:NAME");
    let mut spec = FunctionSpec::python3_bundle(code, module, name);
    spec.warmup_event = Some(b"{}".to_vec());
    spec
}

/// The cached template of `code`'s `handler`, made first if needed; how
/// long that took.
fn template(code: &Path, handler: &str) -> (Function, Duration) {
    let started = Instant::now();
    let dir = ember::ensure_cached_function(&spec(code, handler), &options(), |dir| {
        eprintln!("making {} in {}", code.display(), dir.display())
    })
    .unwrap_or_else(|e| panic!("template of {}: {e}", code.display()));
    let took = started.elapsed();
    eprintln!("template of {} ready in {took:?}", code.display());
    (Function::open(&dir).expect("open the template"), took)
}

fn invoke(function: &Function, event: Value) -> Value {
    let started = Instant::now();
    let outcome = function
        .invoke(
            &serde_json::to_vec(&event).unwrap(),
            &FunctionInvokeOptions::default(),
        )
        .expect("invoke");
    eprintln!(
        "invocation: {:?} (total {:?}, path {:?})",
        started.elapsed(),
        outcome.timings.total,
        outcome.path
    );
    match outcome.result {
        HandlerResult::Json { value } => value,
        other => panic!("expected a JSON result, got {other:?}"),
    }
}

/// `dir` packed into a fresh `.zip`.
fn zip_of(dir: &Path, zip_path: &Path) {
    fn add(zip: &mut zip::ZipWriter<std::fs::File>, root: &Path, dir: &Path) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            if path.is_dir() {
                zip.add_directory(format!("{name}/"), zip::write::SimpleFileOptions::default())
                    .unwrap();
                add(zip, root, &path);
            } else {
                zip.start_file(name, zip::write::SimpleFileOptions::default())
                    .unwrap();
                zip.write_all(&std::fs::read(&path).unwrap()).unwrap();
            }
        }
    }
    let mut zip = zip::ZipWriter::new(std::fs::File::create(zip_path).unwrap());
    add(&mut zip, dir, dir);
    zip.finish().unwrap();
}

fn check_hello(function: &Function) {
    let value = invoke(function, json!({"name": "bundle"}));
    assert_eq!(value["greeting"], "HELLO, BUNDLE!", "{value}");
    assert_eq!(value["file"], "/var/task/app/main.py", "{value}");
    assert_eq!(value["cwd"], "/var/task", "{value}");
}

#[test]
fn a_bundle_directory_with_a_package_and_a_data_file() {
    let (function, _) = template(&examples().join("hello"), "app.main:handler");
    check_hello(&function);
}

#[test]
fn a_zip_bundle() {
    let zip = common::temp_path("hello.zip");
    zip_of(&examples().join("hello"), &zip);
    let (function, _) = template(&zip, "app.main:handler");
    check_hello(&function);
    let _ = std::fs::remove_file(&zip);
}

#[test]
fn jinja2_from_requirements_renders_a_template() {
    let (function, _) = template(&examples().join("jinja"), "page:handler");
    let value = invoke(&function, json!({"title": "T<>", "items": ["a", "b&c"]}));
    let html = value["html"].as_str().expect("html");
    assert!(html.contains("<h1>T&lt;&gt;</h1>"), "{html}");
    assert!(html.contains("<li>b&amp;c</li>"), "{html}");
}

#[test]
fn numpy_clones_draw_different_random_numbers_and_the_template_is_cached() {
    let code = examples().join("numpy");
    let (function, _) = template(&code, "compute:handler");
    let first = invoke(&function, json!({"n": 3}));
    let second = invoke(&function, json!({"n": 3}));
    assert_eq!(first["trace"], 12.0, "{first}");
    assert_eq!(first["sum"], 120.0, "{first}");
    assert_ne!(
        first["random"], second["random"],
        "two clones drew the same numpy random number"
    );
    // Made (or found) above: found by content now, without a boot.
    let (_, again) = template(&code, "compute:handler");
    assert!(
        again < Duration::from_secs(30),
        "a cached template took {again:?}"
    );
}

#[test]
fn pillow_makes_a_thumbnail_of_the_image_in_the_event() {
    use base64::Engine as _;
    let event_file = examples().join("../events/thumbnail.json");
    let event_bytes = std::fs::read(&event_file).unwrap();
    let event: Value = serde_json::from_slice(&event_bytes).unwrap();
    // Warmed up with the real event (the handler refuses one without an image).
    let code = examples().join("thumbnail");
    let mut spec = spec(&code, "thumb:handler");
    spec.warmup_event = Some(event_bytes);
    let dir = ember::ensure_cached_function(&spec, &options(), |dir| {
        eprintln!("making {} in {}", code.display(), dir.display())
    })
    .unwrap_or_else(|e| panic!("template of {}: {e}", code.display()));
    let function = Function::open(&dir).expect("open the template");
    let value = invoke(&function, event);
    assert_eq!(value["source"], json!([320, 240]), "{value}");
    assert_eq!(
        (&value["width"], &value["height"]),
        (&json!(64), &json!(48))
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(value["thumbnail"].as_str().expect("thumbnail"))
        .expect("base64");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // IHDR: width and height, big-endian, after the signature and chunk header.
    assert_eq!(&png[16..24], &[0, 0, 0, 64, 0, 0, 0, 48]);
    // A bad image is the handler's error, not the runtime's.
    let outcome = function
        .invoke(
            br#"{"image": "bm90IGFuIGltYWdl"}"#,
            &FunctionInvokeOptions::default(),
        )
        .expect("invoke");
    match outcome.result {
        HandlerResult::Error { error_type, .. } => {
            assert_eq!(error_type, "UnidentifiedImageError")
        }
        other => panic!("expected the handler's error, got {other:?}"),
    }
}

#[test]
fn a_handler_that_fails_to_import_shows_its_traceback() {
    let code = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/bundles/broken");
    let out = common::temp_path("broken-fn");
    let err = ember::create_function(&spec(&code, "main:handler"), &options(), &out)
        .expect_err("a handler that raises at import was accepted");
    let text = err.to_string();
    assert!(matches!(err, FunctionError::Startup(_)), "{text}");
    assert!(text.contains("broken at import on purpose"), "{text}");
    assert!(text.contains("/var/task/main.py"), "{text}");
    assert!(text.contains("in helper"), "{text}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_bundles_are_refused_before_anything_boots() {
    let scratch = common::temp_path("bad-bundles");
    std::fs::create_dir_all(&scratch).unwrap();
    let create = |code: &Path, handler: &str| {
        let out = scratch.join("out");
        let started = Instant::now();
        let err = ember::create_function(&spec(code, handler), &options(), &out)
            .expect_err("a bad bundle was accepted");
        assert!(started.elapsed() < Duration::from_secs(120));
        err.to_string()
    };

    // No such module in the bundle.
    let text = create(&examples().join("hello"), "app.nothere:handler");
    assert!(text.contains("no module \"app.nothere\""), "{text}");
    assert!(text.contains("app/nothere.py"), "{text}");

    // A requirement pip rejects.
    let bad_req = scratch.join("bad-req");
    std::fs::create_dir_all(&bad_req).unwrap();
    std::fs::write(bad_req.join("main.py"), "def handler(e):\n    return e\n").unwrap();
    std::fs::write(
        bad_req.join("requirements.txt"),
        "ember-no-such-package-zz9==1.0\n",
    )
    .unwrap();
    let text = create(&bad_req, "main:handler");
    assert!(
        text.contains("cannot install ember-no-such-package-zz9"),
        "{text}"
    );

    // A zip whose entry climbs out.
    let evil = scratch.join("evil.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&evil).unwrap());
    zip.start_file("main.py", zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(b"def handler(e):\n    return e\n").unwrap();
    zip.start_file("../escaped.py", zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(b"x = 1\n").unwrap();
    zip.finish().unwrap();
    let text = create(&evil, "main:handler");
    assert!(text.contains("\"../escaped.py\""), "{text}");
    assert!(text.contains("`..`"), "{text}");
    assert!(!scratch.join("escaped.py").exists());

    // Not a module name.
    let text = create(&examples().join("hello"), "app/main:handler");
    assert!(text.contains("not a dotted python module name"), "{text}");
    let _ = std::fs::remove_dir_all(&scratch);
}
