//! What a function template is made of: the function (its runtime,
//! handler and environment, [`FunctionSpec`]), the VM it is made in
//! ([`TemplateOptions`]), and the agent request that starts its runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_protocol::protocol::{FileIn, FunctionStart, CODE_DIR, PYTHON_RUNTIME_PATH};
use serde::{Deserialize, Serialize};

use super::FunctionError;
use crate::config::{ConsoleOutput, VmConfig};

/// Prefixes of environment variables a python3 function may not set: the
/// dynamic loader's (`LD_PRELOAD`...) and python's own (`PYTHONPATH`...) run
/// code before the runtime has closed `/dev/mem`.
const FORBIDDEN_PYTHON_ENV: [&str; 2] = ["LD_", "PYTHON"];

/// The python runtime's environment unless the function sets these:
/// glibc's allocator keeps the handler's memory mapped from the
/// interpreter's first allocation on (every thread on the main heap,
/// blocks up to 32 MiB from the heap, the heap never trimmed and grown
/// 64 MiB at a time), and the runtime pre-touches `EMBER_ARENA_MIB` MiB
/// of heap at template time. A fresh page is a guest page fault in every
/// clone (≈3 ms of emulated guest kernel on PVM hosts); see the runtime's
/// `Memory` and the README's "What makes a handler slow".
pub const PYTHON_MEMORY_ENV: [(&str, &str); 5] = [
    ("MALLOC_ARENA_MAX", "1"),
    ("MALLOC_MMAP_THRESHOLD_", "33554432"),
    ("MALLOC_TRIM_THRESHOLD_", "2147483647"),
    ("MALLOC_TOP_PAD_", "67108864"),
    (ARENA_MIB_ENV, "16"),
];

/// The runtime's setting for its pre-touched heap, in MiB.
pub const ARENA_MIB_ENV: &str = "EMBER_ARENA_MIB";
/// `EMBER_KEEP_MEMORY=0`: no `MALLOC_*` defaults, and the runtime leaves
/// glibc and pymalloc as they come.
pub const KEEP_MEMORY_ENV: &str = "EMBER_KEEP_MEMORY";
/// The largest `EMBER_ARENA_MIB` (the runtime's MAX_ARENA_MIB).
const MAX_ARENA_MIB: u32 = 16 << 10;
/// Largest handler file or executable a template takes.
const MAX_HANDLER_BYTES: u64 = 16 << 20;

/// What runs the function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Runtime {
    /// `python3` with the handler `name` from the module file `file`.
    Python3 {
        /// The handler's module (a `.py` file on the host).
        file: PathBuf,
        /// The handler function's name in it.
        name: String,
    },
    /// `python3` with the handler `name` from the module `module` of a
    /// code bundle: a directory or a `.zip` (see [`super::bundle`]), with
    /// its `requirements.txt` installed, on a read-only code drive the
    /// guest mounts at `/var/task` (see [`super::code_image`]).
    Python3Bundle {
        /// The bundle on the host.
        code: PathBuf,
        /// The handler's module, dotted (`app.main`).
        module: String,
        /// The handler function's name in it.
        name: String,
    },
    /// Any executable that speaks the runtime pipe protocol
    /// (`guest-agent/runtimes/README.md`); it is copied into the guest.
    Exec {
        /// The executable on the host.
        program: PathBuf,
        /// Its arguments.
        args: Vec<String>,
    },
}

/// A function to make a template of. (Sent whole to a jailed template
/// worker: every host path it names must be in
/// [`FunctionSpec::host_paths_mut`].)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// The runtime and handler.
    pub runtime: Runtime,
    /// Run once before the snapshot (so lazily initialised state and pages
    /// are in it); must succeed.
    pub warmup_event: Option<Vec<u8>>,
    /// The runtime's environment.
    pub env: Vec<(String, String)>,
    /// Let the runtime take the hot path if it can (on by default).
    pub hot_path: bool,
}

impl FunctionSpec {
    /// A python3 function with the handler `name` in the module `module`
    /// of the bundle `code` (a directory or a `.zip`).
    pub fn python3_bundle(
        code: impl Into<PathBuf>,
        module: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        FunctionSpec {
            runtime: Runtime::Python3Bundle {
                code: code.into(),
                module: module.into(),
                name: name.into(),
            },
            ..Self::python3(PathBuf::new(), String::new())
        }
    }

    /// A python3 function with the handler `name` in `file`.
    pub fn python3(file: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        FunctionSpec {
            runtime: Runtime::Python3 {
                file: file.into(),
                name: name.into(),
            },
            warmup_event: None,
            env: Vec::new(),
            hot_path: true,
        }
    }
}

/// The VM a template is made in. (Sent whole to a jailed template worker:
/// every host path it names, the root drive aside, must be in
/// [`TemplateOptions::host_paths_mut`].)
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TemplateOptions {
    /// Guest kernel (an ELF `vmlinux` also gives the in-memory RNG reseed).
    pub kernel: PathBuf,
    /// The agent's initramfs.
    pub initrd: PathBuf,
    /// The runtime's root filesystem image (read-only virtio-blk).
    pub root_drive: Option<PathBuf>,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Where the template's console goes.
    #[serde(skip)]
    pub console: ConsoleOutput,
    /// Build the template (boot, runtime start, the tenant's import and
    /// warm-up, calibration) in a jailed worker process (see
    /// [`crate::worker`]): the default. `None` builds it in this process,
    /// as root: an explicit choice, only for trusted code.
    #[serde(skip)]
    pub isolation: Option<crate::isolation::Isolation>,
    /// A bundle function's code drive, already made from the spec's
    /// bundle by [`super::code_image::ensure_code_drive`]; `None` makes it
    /// (cached). A jailed build makes it in the parent and hands it over,
    /// so the worker needs neither the bundle nor pip.
    pub code_drive: Option<PathBuf>,
    /// Boot the template's VM even when the cached python3 base snapshot
    /// could be used (see [`super::base`]): the single-boot path, as
    /// before layered templates.
    pub no_base: bool,
    /// The base snapshot directory to make the template from, already
    /// made by [`super::base::ensure_base`] (a jailed build's parent makes
    /// it and hands it over); `None` makes it (cached) when one applies.
    pub base: Option<PathBuf>,
    /// How long the runtime may take to start and load the handler.
    pub startup_timeout: Duration,
    /// How long the warm-up event may take.
    pub warmup_timeout: Duration,
}

impl TemplateOptions {
    /// Options for `kernel`, `initrd` and `root_drive`, 256 MiB of RAM.
    pub fn new(kernel: PathBuf, initrd: PathBuf, root_drive: Option<PathBuf>) -> Self {
        TemplateOptions {
            kernel,
            initrd,
            root_drive,
            code_drive: None,
            no_base: false,
            base: None,
            mem_mib: 256,
            console: ConsoleOutput::default(),
            isolation: Some(crate::isolation::Isolation::default()),
            startup_timeout: Duration::from_secs(600),
            warmup_timeout: Duration::from_secs(600),
        }
    }
}

impl FunctionSpec {
    /// The host files and directories the template reads, so a jailed
    /// worker can be given them (and the paths rewritten to where it sees
    /// them).
    pub(crate) fn host_paths_mut(&mut self) -> Vec<&mut PathBuf> {
        match &mut self.runtime {
            Runtime::Python3 { file, .. } => vec![file],
            Runtime::Exec { program, .. } => vec![program],
            // Read into the code drive before the worker starts; the
            // worker gets the drive (`TemplateOptions::code_drive`).
            Runtime::Python3Bundle { .. } => Vec::new(),
        }
    }
}

impl TemplateOptions {
    /// As [`FunctionSpec::host_paths_mut`], the root drive aside (it goes
    /// into the function directory).
    pub(crate) fn host_paths_mut(&mut self) -> Vec<&mut PathBuf> {
        let mut paths = vec![&mut self.kernel, &mut self.initrd];
        paths.extend(self.base.as_mut());
        paths
    }
}

/// Checks `spec` as the template builder would (handler files readable,
/// names and environment valid), without booting anything.
pub(crate) fn check(spec: &FunctionSpec, options: &TemplateOptions) -> Result<(), FunctionError> {
    start_request(spec, options).map(drop)
}

/// The VM a template for `options` is made in (its console aside).
pub(crate) fn vm_config(options: &TemplateOptions) -> VmConfig {
    let mut config = VmConfig::new(&options.kernel, Some(options.initrd.clone()));
    config.mem_mib = options.mem_mib;
    config.root_drive.clone_from(&options.root_drive);
    config
}

/// The python runtime's command line with `args` after the script:
/// -I: isolated (no script or working directory on sys.path, no PYTHON*
/// variables, no user site directory), so nothing of the function's runs
/// before the runtime closed /dev/mem; -u: unbuffered, so startup errors
/// reach the agent; -B: the root is read-only (its stdlib is precompiled).
fn python_runtime_argv(args: &[&str]) -> Vec<String> {
    ["python3", "-I", "-u", "-B", PYTHON_RUNTIME_PATH]
        .iter()
        .chain(args)
        .map(|a| a.to_string())
        .collect()
}

/// The agent request that starts `spec`'s runtime, the runtime's name and
/// the handler's description.
pub(crate) fn start_request(
    spec: &FunctionSpec,
    options: &TemplateOptions,
) -> Result<(FunctionStart, &'static str, String), FunctionError> {
    let mut files_in = Vec::new();
    let mut code_drive = None;
    let (argv, runtime, handler) = match &spec.runtime {
        Runtime::Python3 { file, name } => {
            let base = file_name(file)?;
            if !base.ends_with(".py") {
                return Err(FunctionError::BadRequest(format!(
                    "the python handler {} is not a .py file",
                    file.display()
                )));
            }
            check_python_name(name)?;
            check_python_env(&spec.env)?;
            files_in.push(FileIn {
                path: base.clone(),
                data: read_limited(file)?,
                mode: 0o644,
            });
            let argv = python_runtime_argv(&[&base, name]);
            (argv, "python3", format!("{base}:{name}"))
        }
        Runtime::Python3Bundle { code, module, name } => {
            super::bundle::check_module_name(module)
                .map_err(|e| FunctionError::BadRequest(e.to_string()))?;
            check_python_name(name)?;
            check_python_env(&spec.env)?;
            if options.code_drive.is_none() && !code.exists() {
                return Err(FunctionError::BadRequest(format!(
                    "the code bundle {} does not exist",
                    code.display()
                )));
            }
            code_drive = Some(
                crate::device_manager::code_drive_guest_device(options.root_drive.is_some())
                    .to_owned(),
            );
            // The runtime imports the module from the code drive the agent
            // mounts at CODE_DIR.
            let argv = python_runtime_argv(&["--bundle", CODE_DIR, module, name]);
            (argv, "python3", format!("{module}:{name}"))
        }
        Runtime::Exec { program, args } => {
            let base = file_name(program)?;
            files_in.push(FileIn {
                path: base.clone(),
                data: read_limited(program)?,
                mode: 0o755,
            });
            let mut argv = vec![format!("./{base}")];
            argv.extend(args.iter().cloned());
            (argv, "exec", base)
        }
    };
    let mut env = spec.env.clone();
    if runtime == "python3" {
        arena_mib(&env)?;
        // EMBER_KEEP_MEMORY=0 leaves the allocators as they come (the
        // runtime skips its own settings too): to measure the difference.
        let stock = env.iter().any(|(k, v)| k == KEEP_MEMORY_ENV && v == "0");
        for (key, value) in PYTHON_MEMORY_ENV {
            let skipped = stock && key.starts_with("MALLOC_");
            let set = env.iter().any(|(k, _)| k == key);
            if !skipped && !set {
                env.push((key.to_owned(), value.to_owned()));
            }
        }
    }
    let start = FunctionStart {
        argv,
        env,
        files_in,
        // The hot path hands the runtime /dev/mem to map its doorbell; only
        // ember's own python runtime is trusted to map it and close it
        // before user code runs. `exec` runtimes use the vsock path.
        hot_path: spec.hot_path
            && matches!(
                spec.runtime,
                Runtime::Python3 { .. } | Runtime::Python3Bundle { .. }
            ),
        ready_timeout_ms: duration_ms(options.startup_timeout),
        code_drive,
        wait_for_code: false,
    };
    start.validate().map_err(FunctionError::BadRequest)?;
    Ok((start, runtime, handler))
}

/// The function's `EMBER_ARENA_MIB`, checked, if it sets one.
pub(crate) fn arena_mib(env: &[(String, String)]) -> Result<Option<u32>, FunctionError> {
    let Some((_, value)) = env.iter().rev().find(|(k, _)| k == ARENA_MIB_ENV) else {
        return Ok(None);
    };
    match value.parse::<u32>() {
        Ok(mib) if mib <= MAX_ARENA_MIB => Ok(Some(mib)),
        _ => Err(FunctionError::BadRequest(format!(
            "{ARENA_MIB_ENV}={value:?} is not a number of MiB in 0..={MAX_ARENA_MIB}"
        ))),
    }
}

fn check_python_name(name: &str) -> Result<(), FunctionError> {
    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return Err(FunctionError::BadRequest(format!(
            "{name:?} is not a python function name"
        )));
    }
    Ok(())
}

/// Refuses the variables of [`FORBIDDEN_PYTHON_ENV`].
fn check_python_env(env: &[(String, String)]) -> Result<(), FunctionError> {
    match env
        .iter()
        .find(|(key, _)| FORBIDDEN_PYTHON_ENV.iter().any(|p| key.starts_with(p)))
    {
        Some((key, _)) => Err(FunctionError::BadRequest(format!(
            "a python3 function may not set {key}: LD_* and PYTHON* variables \
             run code before the runtime's own"
        ))),
        None => Ok(()),
    }
}

fn file_name(path: &Path) -> Result<String, FunctionError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| FunctionError::BadRequest(format!("{} has no file name", path.display())))
}

fn read_limited(path: &Path) -> Result<Vec<u8>, FunctionError> {
    let io = |e| FunctionError::Io(path.to_path_buf(), e);
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_HANDLER_BYTES {
        return Err(FunctionError::BadRequest(format!(
            "{} is {len} bytes, over {MAX_HANDLER_BYTES}",
            path.display()
        )));
    }
    std::fs::read(path).map_err(io)
}

pub(super) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, ember_protocol::protocol::MAX_TIMEOUT_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python_spec(dir: &Path, file: &str, env: &[(&str, &str)]) -> FunctionSpec {
        let path = dir.join(file);
        std::fs::write(&path, "def handler(event):\n    return event\n").unwrap();
        let mut spec = FunctionSpec::python3(path, "handler");
        spec.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        spec
    }

    /// A fresh directory for one test, removed at the end.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("ember-template-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn options() -> TemplateOptions {
        TemplateOptions::new("vmlinux".into(), "initrd".into(), None)
    }

    #[test]
    fn python_runs_isolated_with_the_runtime_outside_the_function_dir() {
        let dir = TempDir::new("isolated");
        // Named like the runtime: it is only ever the handler.
        let spec = python_spec(dir.path(), "ember_runtime.py", &[("LANG", "C.UTF-8")]);
        let (start, _, _) = start_request(&spec, &options()).unwrap();
        assert_eq!(
            start.argv,
            [
                "python3",
                "-I",
                "-u",
                "-B",
                PYTHON_RUNTIME_PATH,
                "ember_runtime.py",
                "handler"
            ]
        );
        let paths: Vec<&str> = start.files_in.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["ember_runtime.py"]);
        assert_eq!(
            start.files_in[0].data,
            std::fs::read(spec_file(&spec)).unwrap()
        );
    }

    #[test]
    fn python_gets_the_memory_defaults_unless_it_sets_them() {
        let dir = TempDir::new("memory-env");
        let spec = python_spec(dir.path(), "main.py", &[("MALLOC_TOP_PAD_", "0")]);
        let (start, _, _) = start_request(&spec, &options()).unwrap();
        let value = |key: &str| {
            let values: Vec<&str> = start
                .env
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(values.len(), 1, "{key} set once: {:?}", start.env);
            values[0].to_owned()
        };
        assert_eq!(value("MALLOC_TOP_PAD_"), "0");
        assert_eq!(value("MALLOC_MMAP_THRESHOLD_"), "33554432");
        assert_eq!(value(ARENA_MIB_ENV), "16");
        assert_eq!(arena_mib(&start.env).unwrap(), Some(16));
        for bad in ["lots", "-1", "16385"] {
            let spec = python_spec(dir.path(), "main.py", &[(ARENA_MIB_ENV, bad)]);
            match start_request(&spec, &options()) {
                Err(FunctionError::BadRequest(message)) => {
                    assert!(message.contains(ARENA_MIB_ENV), "{message}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    fn spec_file(spec: &FunctionSpec) -> PathBuf {
        match &spec.runtime {
            Runtime::Python3 { file, .. } => file.clone(),
            Runtime::Python3Bundle { code, .. } => code.clone(),
            Runtime::Exec { program, .. } => program.clone(),
        }
    }

    #[test]
    fn python_env_that_runs_code_first_is_refused() {
        let dir = TempDir::new("env");
        for var in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "PYTHONPATH",
            "PYTHONSTARTUP",
        ] {
            let spec = python_spec(dir.path(), "main.py", &[("LANG", "C"), (var, "/x")]);
            match start_request(&spec, &options()) {
                Err(FunctionError::BadRequest(message)) => {
                    assert!(message.contains(var), "{message}");
                    assert!(message.contains("LD_* and PYTHON*"), "{message}");
                }
                other => panic!("{var}: expected BadRequest, got {other:?}"),
            }
        }
        // Exec runtimes are the tenant's own program, without /dev/mem.
        let program = dir.path().join("run.sh");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        let spec = FunctionSpec {
            runtime: Runtime::Exec {
                program,
                args: Vec::new(),
            },
            warmup_event: None,
            env: vec![("LD_PRELOAD".into(), "/x".into())],
            hot_path: true,
        };
        assert!(start_request(&spec, &options()).is_ok());
    }
}
