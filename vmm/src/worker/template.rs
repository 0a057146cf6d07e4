//! Function templates built in a jailed worker: the tenant's runtime
//! start, import and warm-up (and the calibration clone) run in a worker
//! process as its own unprivileged uid, in its namespaces and cgroups,
//! exactly as [`crate::function::create_in_process`] runs them.
//!
//! The parent opens every input the template reads (kernel, initramfs,
//! handler files, ...) and a fresh staging directory owned by the
//! worker's uid; the worker bind-mounts them read-only (the staging
//! directory writable) into its otherwise empty root and calls the
//! library's template builder on the whole [`FunctionSpec`] and
//! [`TemplateOptions`], its paths rewritten to the mounts. Once the worker
//! is gone, the parent takes the regular files it left in the staging
//! directory, makes them root's, and moves them into the function
//! directory.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cgroup::Limits;
use super::function::{read_message, read_message_by, write_message};
use super::{describe_exit, launch, Isolation, WorkerError, CONTROL_FD};
use crate::config::ConsoleOutput;
use crate::function::{FunctionError, FunctionSpec, TemplateInfo, TemplateOptions};
use crate::jail::{self, Bind, JailConfig};
use crate::ready::BOOT_TIMEOUT;

/// The worker's third argument for template mode.
pub const TEMPLATE_MODE: &str = "template";
/// Where the staging directory is mounted in the worker.
const OUT_DIR: &str = "/out";
/// Where the inputs are mounted in the worker (`/in/<n>/<name>`).
const IN_DIR: &str = "/in";
/// The worker's descriptors after its control socket.
const KVM_FD: RawFd = CONTROL_FD + 1;
const OUT_FD: RawFd = CONTROL_FD + 2;
const FIRST_INPUT_FD: RawFd = CONTROL_FD + 3;
/// Largest request a template worker reads (a warm-up event and paths).
const MAX_REQUEST: u32 = 80 << 20;
/// Largest answer the parent reads.
const MAX_ANSWER: u32 = 1 << 20;
/// Memory a template worker may use beyond twice its guest's RAM (the
/// template and its calibration clone) for the VMM and written files.
const TEMPLATE_OVERHEAD_BYTES: u64 = 256 << 20;

#[derive(Serialize, Deserialize)]
struct Request {
    spec: FunctionSpec,
    options: TemplateOptions,
    /// The guest console goes to the worker's stdout (the parent shows it
    /// prefixed, like its stderr).
    console: bool,
    /// The staging directory's host path.
    stage: Vec<u8>,
    /// The inputs' host paths and mount points, in descriptor order.
    inputs: Vec<(Vec<u8>, String)>,
}

/// A failure, sorted as the in-process builder sorts it.
#[derive(Serialize, Deserialize)]
enum WireError {
    Startup(String),
    Warmup(String),
    BadRequest(String),
    Template(String),
    Other(String),
}

impl From<WireError> for FunctionError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Startup(m) => FunctionError::Startup(m),
            WireError::Warmup(m) => FunctionError::Warmup(m),
            WireError::BadRequest(m) => FunctionError::BadRequest(m),
            WireError::Template(m) => FunctionError::Template(m),
            WireError::Other(m) => FunctionError::Worker(m),
        }
    }
}

impl From<FunctionError> for WireError {
    fn from(e: FunctionError) -> Self {
        match e {
            FunctionError::Startup(m) => WireError::Startup(m),
            FunctionError::Warmup(m) => WireError::Warmup(m),
            FunctionError::BadRequest(m) => WireError::BadRequest(m),
            FunctionError::Template(m) => WireError::Template(m),
            other => WireError::Other(other.to_string()),
        }
    }
}

fn worker_error(e: WorkerError) -> FunctionError {
    FunctionError::Worker(e.to_string())
}

/// Parent side: builds the template of `spec` into `out` in a jailed
/// worker (see the module documentation).
pub fn create(
    spec: &FunctionSpec,
    options: &TemplateOptions,
    out: &Path,
    isolation: &Isolation,
) -> Result<TemplateInfo, FunctionError> {
    // Refused here already: the worker would refuse it after a boot.
    crate::function::check_spec(spec, options)?;
    let console = match &options.console {
        ConsoleOutput::Sink => false,
        ConsoleOutput::Stdout => true,
        ConsoleOutput::File(_) => {
            return Err(FunctionError::BadRequest(
                "a console file needs an in-process template build".into(),
            ))
        }
    };
    let ids = isolation.ids.lease().map_err(|e| worker_error(e.into()))?;
    let stage = Stage::create(out, ids.id())?;
    let mut spec = spec.clone();
    let mut options = options.clone();
    options.isolation = None;
    // The base holds no tenant code: made here (once, cached) like the
    // default snapshot, and handed to the worker read-only, like the
    // kernel.
    options.base = options.base_for(&spec)?;
    let base = options.base.clone();
    if let Some(image) = options.root_drive.take() {
        stage.link_drive(&image, crate::snapshot::DRIVE_FILE)?;
        options.root_drive = Some(Path::new(OUT_DIR).join(crate::snapshot::DRIVE_FILE));
    }
    // A bundle's dependencies are installed (by pip, wheels only) here,
    // before the worker starts: the jail has no network and no cache.
    if let crate::function::Runtime::Python3Bundle { code, module, .. } = &spec.runtime {
        let image = match options.code_drive.take() {
            Some(made) => made,
            None => crate::function::make_code_drive(code, module, Some(isolation))?,
        };
        stage.link_drive(&image, crate::snapshot::CODE_DRIVE_FILE)?;
        options.code_drive = Some(Path::new(OUT_DIR).join(crate::snapshot::CODE_DRIVE_FILE));
    }
    let mut inputs = Vec::new();
    let mut files = Vec::new();
    for path in spec
        .host_paths_mut()
        .into_iter()
        .chain(options.host_paths_mut())
    {
        let (file, host, name) = open_input(path)?;
        let target = format!("{IN_DIR}/{}/{name}", files.len());
        *path = PathBuf::from(&target);
        inputs.push((host.into_os_string().into_vec(), target));
        files.push(file);
    }
    let kvm = File::open("/dev/kvm").map_err(|e| FunctionError::Io("/dev/kvm".into(), e))?;
    let mut fds = vec![kvm.as_raw_fd(), stage.dir.as_raw_fd()];
    fds.extend(files.iter().map(AsRawFd::as_raw_fd));
    let limits = Limits {
        memory_bytes: isolation
            .memory_limit_bytes
            .unwrap_or((u64::from(options.mem_mib) << 21) + TEMPLATE_OVERHEAD_BYTES),
        cpus: 1,
    };
    let args = [TEMPLATE_MODE.to_string()];
    let (mut worker, mut control) =
        launch(isolation, ids, limits, &fds, &args, console).map_err(worker_error)?;
    drop((kvm, files));
    let limit = BOOT_TIMEOUT + options.startup_timeout * 2 + options.warmup_timeout * 2;
    let request = Request {
        spec,
        options,
        console,
        stage: stage.path.clone().into_os_string().into_vec(),
        inputs,
    };
    write_message(&mut control, &request).map_err(worker_error)?;
    let answer: Result<Result<TemplateInfo, WireError>, WorkerError> =
        read_message_by(&control, MAX_ANSWER, Instant::now() + limit);
    // The worker and everything it started are gone after this: nothing
    // changes the staging directory while it is read below.
    let status = worker.finish(Duration::from_secs(5));
    match answer {
        Ok(Ok(mut info)) => {
            stage.publish(out)?;
            info.dir = out.to_path_buf();
            info.base = base;
            Ok(info)
        }
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(FunctionError::Worker(format!(
            "the template worker gave no answer ({e}); {}",
            describe_exit(status)
        ))),
    }
}

/// Opens an input of the template for the worker (`O_PATH`: the worker
/// reads it through a read-only bind mount, as its own uid); returns it,
/// its canonical path and its name.
fn open_input(path: &Path) -> Result<(File, PathBuf, String), FunctionError> {
    let io = |e| FunctionError::Io(path.to_path_buf(), e);
    let host = std::fs::canonicalize(path).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(&host)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    // The worker runs as a uid of its own: it reads what anyone may.
    let needed = if meta.is_dir() { 0o005 } else { 0o004 };
    if meta.mode() & needed != needed {
        return Err(FunctionError::BadRequest(format!(
            "{} is not readable by the jailed template worker (mode {:o}): \
             make it world-readable, or build the template in-process",
            path.display(),
            meta.mode() & 0o7777
        )));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("input")
        .to_string();
    Ok((file, host, name))
}

/// The directory a template worker writes into, beside the function
/// directory (same file system, so its files move by rename); removed
/// when dropped.
struct Stage {
    path: PathBuf,
    dir: File,
}

impl Stage {
    fn create(out: &Path, id: u32) -> Result<Stage, FunctionError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| FunctionError::Io(parent.clone(), e))?;
        let name = out
            .file_name()
            .map_or_else(|| "function".into(), |n| n.to_string_lossy().into_owned());
        let path = parent.join(format!(
            ".{name}.building-jailed-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |e| FunctionError::Io(path.clone(), e);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io)?;
        let stage = Stage {
            dir: File::open(&path).map_err(io)?,
            path: path.clone(),
        };
        // SAFETY: fchown on a descriptor we own, integer IDs.
        if unsafe { libc::fchown(stage.dir.as_raw_fd(), id, id) } < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(stage)
    }

    /// Puts a drive (root or code) into the staging directory as `name` (a
    /// hard link, or a copy across file systems), root's and read-only to
    /// the worker.
    fn link_drive(&self, image: &Path, name: &str) -> Result<(), FunctionError> {
        let target = self.path.join(name);
        // The file itself: link(2) would link a symlink, not its target.
        let image =
            &std::fs::canonicalize(image).map_err(|e| FunctionError::Io(image.to_path_buf(), e))?;
        if std::fs::hard_link(image, &target).is_err() {
            std::fs::copy(image, &target).map_err(|e| FunctionError::Io(target.clone(), e))?;
        }
        let meta = std::fs::metadata(&target).map_err(|e| FunctionError::Io(target.clone(), e))?;
        if meta.mode() & 0o004 == 0 {
            return Err(FunctionError::BadRequest(format!(
                "{} is not readable by the jailed template worker: \
                 make it world-readable, or build the template in-process",
                image.display()
            )));
        }
        Ok(())
    }

    /// Moves the regular files the worker left into `out` (created if
    /// missing), root's now; anything else there is ignored.
    fn publish(&self, out: &Path) -> Result<(), FunctionError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e| FunctionError::Io(path, e)
        };
        std::fs::create_dir_all(out).map_err(io(out))?;
        for entry in std::fs::read_dir(&self.path).map_err(io(&self.path))? {
            let entry = entry.map_err(io(&self.path))?;
            let from = entry.path();
            let meta = std::fs::symlink_metadata(&from).map_err(io(&from))?;
            if !meta.file_type().is_file() {
                log::warn!(
                    "the template worker left {} (not a regular file): ignored",
                    from.display()
                );
                continue;
            }
            if meta.uid() != 0 || meta.gid() != 0 {
                std::os::unix::fs::lchown(&from, Some(0), Some(0)).map_err(io(&from))?;
            }
            let to = out.join(entry.file_name());
            std::fs::rename(&from, &to).map_err(io(&to))?;
        }
        Ok(())
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Worker side: `ember __worker <uid> <gid> template`. Reads the request,
/// jails itself with the inputs and the staging directory mounted, and
/// builds the template.
pub(super) fn serve(control: &mut UnixStream, config: JailConfig) -> Result<(), WorkerError> {
    jail::become_namespace_init()?;
    // From the parent, before the jail: it names the mounts.
    let request: Request = read_message(control, MAX_REQUEST)?;
    // Whatever fails is answered, so the parent can say what it was.
    let answer = build(request, config);
    write_message(control, &answer)
}

fn build(request: Request, config: JailConfig) -> Result<TemplateInfo, WireError> {
    let setup = |e: WorkerError| WireError::Other(e.to_string());
    // SAFETY: fd 4 was set up by the parent for us alone.
    let kvm = unsafe { kvm_ioctls::Kvm::from_raw_fd(KVM_FD) };
    crate::vstate::use_kvm(kvm);
    let count = RawFd::try_from(request.inputs.len())
        .map_err(|_| setup(WorkerError::Unsupported("too many inputs")))?;
    jail::close_fds_from((FIRST_INPUT_FD + count) as u32).map_err(|e| setup(e.into()))?;
    let bad_mount = || setup(WorkerError::Unsupported("a mount point outside /in"));
    let mut binds = vec![Bind {
        source: CString::new(request.stage).map_err(|_| bad_mount())?,
        fd: OUT_FD,
        target: CString::new(OUT_DIR).map_err(|_| bad_mount())?,
        writable: true,
        exec: false,
        devices: false,
    }];
    for (i, (source, target)) in request.inputs.into_iter().enumerate() {
        if !target.starts_with(IN_DIR) {
            return Err(bad_mount());
        }
        binds.push(Bind {
            source: CString::new(source).map_err(|_| bad_mount())?,
            fd: FIRST_INPUT_FD + i as RawFd,
            target: CString::new(target).map_err(|_| bad_mount())?,
            writable: false,
            exec: false,
            devices: false,
        });
    }
    // Read while /sys is still visible; cached for the boot.
    crate::host::HostKind::detect();
    jail::enter_root_with(&binds, true).map_err(|e| setup(e.into()))?;
    jail::drop_privileges(&JailConfig {
        // The template's memory and state are written here.
        max_file_bytes: None,
        // The calibration clone reads its own /proc/self/pagemap.
        dumpable: true,
        ..config
    })
    .map_err(|e| setup(e.into()))?;
    let mut options = request.options;
    options.isolation = None;
    options.console = if request.console {
        ConsoleOutput::Stdout
    } else {
        ConsoleOutput::Sink
    };
    crate::function::create_in_process(&request.spec, &options, Path::new(OUT_DIR))
        .map_err(WireError::from)
}
