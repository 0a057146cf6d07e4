//! Per-runtime base snapshots: the python3 image booted, its root
//! mounted, ember's runtime started with the hot path set up and waiting
//! for its code (`ember_runtime.py --wait-for-code`), saved once and
//! cached by the content of everything it was made from.
//!
//! A function template is then made from a clone of the base (see
//! `function::template`): the clone's agent gets a
//! [`FunctionLoad`] (the handler's files, its code drive, its arguments),
//! the runtime imports the handler, and the rest is as for a booted
//! template (warm-up through the hot path, calibration, snapshot). That
//! skips the boot and the interpreter's start, over a minute on PVM hosts,
//! for every function but the first.
//!
//! A base holds nothing of any tenant: it is made in this process (as the
//! default snapshot is), and jailed template workers are handed it
//! read-only. A template made from a clone is self-contained: saving a
//! clone writes every page of its memory (those it still shares with the
//! base's memory file included) into the template's own memory file, so
//! deleting or remaking a base never touches a function made from it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_protocol::protocol::{FunctionLoad, FunctionStart, HotPathPages, PYTHON_RUNTIME_PATH};
use serde::{Deserialize, Serialize};

use super::spec::{
    duration_ms, start_request, vm_config, FunctionSpec, Runtime, TemplateOptions, ARENA_MIB_ENV,
    PYTHON_MEMORY_ENV,
};
use super::vm_steps::{boot_and_connect, quiesce, startup_error};
use super::FunctionError;
use crate::cache_key::KeyBuilder;
use crate::host::HostKind;
use crate::paths;
use crate::snapshot::FORMAT_VERSION;

/// Bumped when what a base holds or how it is made changes, so cached
/// bases are made again.
const BASE_FORMAT: u32 = 1;

/// ember's python3 runtime, as the agent in the initramfs installs it (the
/// initramfs's own hash covers it too; keyed on its own so that an edited
/// runtime never meets a stale base, whatever the initramfs).
const PYTHON_RUNTIME: &[u8] =
    include_bytes!("../../../guest-agent/runtimes/python3/ember_runtime.py");

/// The apparent size of the code drive a base for bundles boots with: a
/// sparse file of zeros, replaced in each clone by the function's drive,
/// which may be up to this large (the guest keeps the capacity it read at
/// boot; ext4 reads only within its own size). The guest mounts the drive
/// only after the clone's LOAD, so it never saw the placeholder's content.
pub const CODE_PLACEHOLDER_BYTES: u64 = 4 << 30;

/// The file a complete base directory holds, written last.
pub const BASE_FILE: &str = "base.json";

/// Prefixes of environment variables a base cannot take at load time:
/// glibc's allocator, the runtime's own setup and the interpreter's
/// locale and time zone read them when the process starts, before the base
/// is saved. A function that sets one is booted (`EMBER_ARENA_MIB` aside:
/// the runtime reads it again after the load).
const READ_AT_START_ENV: [&str; 5] = ["EMBER_", "MALLOC_", "LANG", "LC_", "TZ"];

/// What a base records besides its snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseInfo {
    /// The base format (`BASE_FORMAT`) of the ember that made it.
    pub format: u32,
    /// The waiting runtime's hot-path buffers.
    pub hot_path: HotPathPages,
    /// Boot to the agent's greeting.
    pub boot_ms: u64,
    /// The runtime's start to `READY`, as the guest measured it.
    pub startup_ms: u64,
}

impl TemplateOptions {
    /// The base snapshot `spec`'s template is made from, made first if
    /// needed (`None`: booted, see [`TemplateOptions::no_base`]).
    pub(crate) fn base_for(&self, spec: &FunctionSpec) -> Result<Option<PathBuf>, FunctionError> {
        if self.no_base || !applies(spec, self) {
            return Ok(None);
        }
        if let Some(base) = &self.base {
            return Ok(Some(base.clone()));
        }
        ensure_base(self, has_code_drive(spec), |dir| {
            log::info!(
                "making the python3 base snapshot {} (a boot and the runtime's start, once)",
                dir.display()
            )
        })
        .map(Some)
    }
}

/// Whether `spec` can be made from a base: ember's python3 runtime with
/// the hot path, on a root image, without variables read at the runtime's
/// own start (see `READ_AT_START_ENV`). Anything else boots, as with
/// [`TemplateOptions::no_base`].
pub fn applies(spec: &FunctionSpec, options: &TemplateOptions) -> bool {
    matches!(
        spec.runtime,
        Runtime::Python3 { .. } | Runtime::Python3Bundle { .. }
    ) && spec.hot_path
        && options.root_drive.is_some()
        && !spec.env.iter().any(|(name, _)| {
            name != ARENA_MIB_ENV && READ_AT_START_ENV.iter().any(|p| name.starts_with(p))
        })
}

/// Whether `spec`'s base has a code drive (a placeholder its clones
/// replace with the function's): a bundle's. Single-file functions get a
/// base without one, so their templates have the devices a booted one has.
pub fn has_code_drive(spec: &FunctionSpec) -> bool {
    matches!(spec.runtime, Runtime::Python3Bundle { .. })
}

/// Where the base for `spec` in `options`'s VM lives: `base-python3-<key>`
/// (or `base-python3-code-<key>` for bundles) in the cache (see
/// [`base_key`]).
pub fn cached_base_dir(
    spec: &FunctionSpec,
    options: &TemplateOptions,
) -> Result<PathBuf, FunctionError> {
    base_dir(options, has_code_drive(spec))
}

fn base_dir(options: &TemplateOptions, code_drive: bool) -> Result<PathBuf, FunctionError> {
    let kind = if code_drive {
        "python3-code"
    } else {
        "python3"
    };
    Ok(paths::cache_dir().join(format!("base-{kind}-{}", base_key(options, code_drive)?)))
}

/// The cache key of the python3 base in `options`'s VM: a SHA-256 over the
/// contents of the kernel, the initramfs (which holds the agent) and the
/// root image, the VM's shape, the parameters ember adds to the kernel
/// command line on this host, the snapshot and base formats, and the
/// runtime's start request, the runtime file included, and whether it has
/// a code drive. (Unlike the default
/// snapshot's key, not the root image's file identity: a clone of the base
/// is given the caller's root image, which must only have the same
/// content.)
pub fn base_key(options: &TemplateOptions, code_drive: bool) -> Result<String, FunctionError> {
    let config = vm_config(options);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| FunctionError::Io(path, e)
    };
    let mut vm = KeyBuilder::new("vm");
    vm.field("snapshot format", FORMAT_VERSION.to_le_bytes())
        .field(
            "host",
            crate::kernel_cmdline::fingerprint(HostKind::detect()),
        )
        .file("kernel", &config.kernel)
        .map_err(io(&config.kernel))?;
    if let Some(initrd) = &config.initrd {
        vm.file("initrd", initrd).map_err(io(initrd))?;
    }
    if let Some(drive) = &config.root_drive {
        vm.file("root drive", drive).map_err(io(drive))?;
    }
    vm.field("vcpus", [config.vcpus])
        .field("mem_mib", config.mem_mib.to_le_bytes())
        .field("cmdline_extra", &config.cmdline_extra)
        .field("vsock_cid", config.vsock_cid.to_le_bytes());
    Ok(key_of(
        &vm.finish(),
        &base_start(options),
        PYTHON_RUNTIME,
        code_drive,
    ))
}

fn key_of(vm: &str, start: &FunctionStart, runtime: &[u8], code_drive: bool) -> String {
    let mut key = KeyBuilder::new("python3 base");
    key.field("format", BASE_FORMAT.to_le_bytes())
        .field("vm", vm)
        .field("runtime", runtime)
        .field("code drive", CODE_PLACEHOLDER_BYTES.to_le_bytes())
        .field("has code drive", [u8::from(code_drive)]);
    for arg in &start.argv {
        key.field("arg", arg);
    }
    for (name, value) in &start.env {
        key.field("env name", name).field("env value", value);
    }
    key.field("hot path", [u8::from(start.hot_path)]);
    key.finish()
}

/// The start request of a base's runtime: no function, no environment.
fn base_start(options: &TemplateOptions) -> FunctionStart {
    FunctionStart {
        // As for a function (template.rs): isolated, unbuffered, no .pyc
        // writes; the handler comes in the LOAD message.
        argv: [
            "python3",
            "-I",
            "-u",
            "-B",
            PYTHON_RUNTIME_PATH,
            "--wait-for-code",
        ]
        .map(String::from)
        .to_vec(),
        // The allocator's settings are read at the process's start: the
        // defaults every function gets (one that sets its own boots).
        env: PYTHON_MEMORY_ENV
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        files_in: Vec::new(),
        hot_path: true,
        ready_timeout_ms: duration_ms(options.startup_timeout),
        code_drive: None,
        wait_for_code: true,
    }
}

/// The cached base for `options`'s VM, with a code drive or not, made
/// first if there is none (`on_create` is told: that takes a cold boot and
/// the runtime's start). Concurrent callers wait for the first one's.
pub fn ensure_base(
    options: &TemplateOptions,
    code_drive: bool,
    on_create: impl FnOnce(&Path),
) -> Result<PathBuf, FunctionError> {
    let dir = base_dir(options, code_drive)?;
    if dir.join(BASE_FILE).exists() {
        return Ok(dir);
    }
    on_create(&dir);
    paths::build_cache_entry(
        &dir,
        BASE_FILE,
        |building| create(options, code_drive, building),
        FunctionError::Io,
    )?;
    Ok(dir)
}

/// Boots `options`'s VM, starts the waiting runtime and saves the base
/// into `out`, readable by everyone (jailed template workers read it).
fn create(options: &TemplateOptions, code_drive: bool, out: &Path) -> Result<(), FunctionError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| FunctionError::Io(path, e)
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut config = vm_config(options);
    config.console = options.console.clone();
    if code_drive {
        // Where the snapshot keeps its code drive already: saved in place.
        let placeholder = out.join(crate::snapshot::CODE_DRIVE_FILE);
        std::fs::File::create(&placeholder)
            .and_then(|f| f.set_len(CODE_PLACEHOLDER_BYTES))
            .map_err(io(&placeholder))?;
        config.code_drive = Some(placeholder);
    }
    let (mut machine, mut agent, boot) = boot_and_connect(&config, Instant::now())?;
    let ready = agent
        .start_function(
            &base_start(options),
            Instant::now() + options.startup_timeout,
        )
        .map_err(startup_error)?;
    let hot_path = ready.hot_path.ok_or_else(|| {
        FunctionError::Template(format!(
            "the base runtime has no hot path: {}; its stderr: {}",
            ready.hot_path_error.as_deref().unwrap_or("none reported"),
            String::from_utf8_lossy(&ready.stderr).trim_end()
        ))
    })?;
    super::buffers::validate(&hot_path, u64::from(options.mem_mib) << 20)?;
    quiesce(&machine, agent)?;
    crate::snapshot::create::save(&mut machine, out)?;
    drop(machine);
    let info = BaseInfo {
        format: BASE_FORMAT,
        hot_path,
        boot_ms: millis(boot),
        startup_ms: ready.startup_ms,
    };
    for entry in std::fs::read_dir(out).map_err(io(out))? {
        let path = entry.map_err(io(out))?.path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(io(&path))?;
    }
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755)).map_err(io(out))?;
    let path = out.join(BASE_FILE);
    let json = serde_json::to_vec_pretty(&info)
        .map_err(|e| FunctionError::Template(format!("base info: {e}")))?;
    std::fs::write(&path, json).map_err(io(&path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).map_err(io(&path))?;
    Ok(())
}

/// Reads a base's [`BaseInfo`], refusing another format.
pub fn read_info(dir: &Path) -> Result<BaseInfo, FunctionError> {
    let path = dir.join(BASE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| FunctionError::Io(path.clone(), e))?;
    let info: BaseInfo = serde_json::from_slice(&bytes)
        .map_err(|e| FunctionError::Template(format!("{}: {e}", path.display())))?;
    if info.format != BASE_FORMAT {
        return Err(FunctionError::Template(format!(
            "{} is a base of format {}, this ember makes {BASE_FORMAT}",
            dir.display(),
            info.format
        )));
    }
    Ok(info)
}

/// The load request that gives a clone of the base `spec`'s function: the
/// start request's files, code drive and handler arguments (what follows
/// the runtime's path in its `argv`), and `spec`'s environment.
pub(crate) fn load_request(
    spec: &FunctionSpec,
    options: &TemplateOptions,
) -> Result<FunctionLoad, FunctionError> {
    let (start, _, _) = start_request(spec, options)?;
    let args = match start.argv.iter().position(|a| a == PYTHON_RUNTIME_PATH) {
        Some(at) => start.argv[at + 1..].to_vec(),
        None => {
            return Err(FunctionError::BadRequest(
                "only ember's python3 runtime can be loaded into a base".into(),
            ))
        }
    };
    let load = FunctionLoad {
        args,
        env: start.env,
        files_in: start.files_in,
        code_drive: start.code_drive,
        ready_timeout_ms: start.ready_timeout_ms,
    };
    load.validate().map_err(FunctionError::BadRequest)?;
    Ok(load)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> FunctionStart {
        base_start(&TemplateOptions::new(
            "k".into(),
            "i".into(),
            Some("r".into()),
        ))
    }

    #[test]
    fn the_key_follows_the_runtime_file_and_the_vm() {
        let key = key_of("vm", &start(), b"runtime v1", false);
        assert_eq!(key, key_of("vm", &start(), b"runtime v1", false));
        assert_ne!(key, key_of("vm", &start(), b"runtime v2", false));
        assert_ne!(key, key_of("other vm", &start(), b"runtime v1", false));
        assert_ne!(key, key_of("vm", &start(), b"runtime v1", true));
        let mut other = start();
        other.argv.push("x".into());
        assert_ne!(key, key_of("vm", &other, b"runtime v1", false));
    }

    /// The base's key from real files: an edited runtime file (or any
    /// input file) gives another base.
    #[test]
    fn the_key_follows_its_input_files() {
        let dir = std::env::temp_dir().join(format!("ember-base-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, content: &str| {
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            path
        };
        let options = TemplateOptions::new(
            file("vmlinux", "kernel"),
            file("initrd", "agent v1"),
            Some(file("root.ext4", "image")),
        );
        let key = base_key(&options, false).unwrap();
        assert_eq!(key, base_key(&options, false).unwrap());
        assert_ne!(key, base_key(&options, true).unwrap());
        let mut bigger = options.clone();
        bigger.mem_mib *= 2;
        assert_ne!(key, base_key(&bigger, false).unwrap());
        let edited = TemplateOptions::new(
            options.kernel.clone(),
            file("initrd2", "agent v2"),
            options.root_drive.clone(),
        );
        assert_ne!(key, base_key(&edited, false).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_key_has_the_runtime_ember_installs() {
        // The one the agent embeds (guest-agent/src/function/mod.rs).
        let installed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../guest-agent/runtimes/python3/ember_runtime.py"
        ))
        .unwrap();
        assert_eq!(PYTHON_RUNTIME, &installed[..]);
    }

    #[test]
    fn what_a_base_takes() {
        let dir = std::env::temp_dir().join(format!("ember-base-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("main.py");
        std::fs::write(&file, "def handler(e):\n    return e\n").unwrap();
        let options = TemplateOptions::new("k".into(), "i".into(), Some("r".into()));
        let mut spec = FunctionSpec::python3(&file, "handler");
        spec.env = vec![("GREETING".into(), "hi".into())];
        assert!(applies(&spec, &options));
        let load = load_request(&spec, &options).unwrap();
        assert_eq!(load.args, ["main.py", "handler"]);
        assert_eq!(load.env[0], spec.env[0]);
        assert_eq!(load.files_in.len(), 1);
        assert_eq!(load.files_in[0].path, "main.py");

        // What the runtime reads while it sets itself up, before the save.
        for var in [
            "EMBER_HOT_PATH_BYTES",
            "MALLOC_TOP_PAD_",
            "LANG",
            "LC_ALL",
            "TZ",
        ] {
            spec.env = vec![(var.into(), "1".into())];
            assert!(!applies(&spec, &options), "{var}");
        }
        spec.env = vec![(ARENA_MIB_ENV.into(), "32".into())];
        assert!(applies(&spec, &options));
        spec.env.clear();
        spec.hot_path = false;
        assert!(!applies(&spec, &options));
        spec.hot_path = true;
        let exec = FunctionSpec {
            runtime: Runtime::Exec {
                program: file.clone(),
                args: Vec::new(),
            },
            ..spec.clone()
        };
        assert!(!applies(&exec, &options));
        let no_image = TemplateOptions::new("k".into(), "i".into(), None);
        assert!(!applies(&spec, &no_image));
        assert!(!has_code_drive(&spec));
        let bundle = FunctionSpec::python3_bundle(&dir, "app.main", "handler");
        assert!(applies(&bundle, &options));
        assert!(has_code_drive(&bundle));

        // A base given is used as is; --no-base boots, given one or not.
        let mut given = options.clone();
        given.base = Some(dir.join("some-base"));
        assert_eq!(given.base_for(&spec).unwrap(), given.base);
        given.no_base = true;
        assert_eq!(given.base_for(&spec).unwrap(), None);
        assert_eq!(given.base_for(&exec).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
