//! Cached function templates: one per (function, VM), made on first use and
//! kept next to the guest artifacts, like the default snapshot.

use std::path::{Path, PathBuf};

use super::template::{runtime_fingerprint, FunctionSpec, Runtime, TemplateOptions};
use super::{create, FunctionError, MANIFEST_FILE};
use crate::host::HostKind;
use crate::paths;
use crate::snapshot::FORMAT_VERSION;

/// What a template records besides its snapshot (the manifest's
/// contents): bumped when ember starts recording something new in it, so
/// cached templates are made again (2: the guest's clock addresses).
const TEMPLATE_CONTENTS: u32 = 2;

/// Where the cached template of `spec` in `options`'s VM lives. The key
/// covers everything the template depends on: the kernel, initramfs and
/// root image (resolved to their content-addressed cache entries, plus the
/// image file's identity), the handler's and runtime's contents, the
/// warm-up event, the environment and the VM's shape.
pub fn cached_function_dir(spec: &FunctionSpec, options: &TemplateOptions) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let resolve = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let identity = |p: &Path| {
        std::fs::metadata(p).map_or((0, 0, 0, 0), |m| {
            (m.len(), m.ino(), m.mtime(), m.mtime_nsec())
        })
    };
    let contents = |p: &Path| std::fs::read(p).map_or(0, |bytes| crc32fast::hash(&bytes));
    let handler = match &spec.runtime {
        Runtime::Python3 { file, name } => format!("python3:{:08x}:{name}", contents(file)),
        Runtime::Exec { program, args } => format!("exec:{:08x}:{args:?}", contents(program)),
    };
    let key = format!(
        "{}|{}|{:?}|{}|{}|{:?}|{:?}|{}|{}|{}|{}|{}|{}",
        resolve(&options.kernel).display(),
        resolve(&options.initrd).display(),
        options
            .root_drive
            .as_deref()
            .map(|p| (resolve(p), identity(p))),
        options.mem_mib,
        handler,
        spec.warmup_event,
        spec.env,
        spec.hot_path,
        runtime_fingerprint(),
        crate::kernel_cmdline::fingerprint(HostKind::detect()),
        FORMAT_VERSION,
        env!("CARGO_PKG_VERSION"),
        TEMPLATE_CONTENTS,
    );
    paths::cache_dir().join(format!("function-{:08x}", crc32fast::hash(key.as_bytes())))
}

/// The cached template of `spec`, made first if there is none
/// (`on_create` is told: that takes a cold boot and the runtime's start).
/// Concurrent callers may each make one; the first to finish wins.
pub fn ensure_cached_function(
    spec: &FunctionSpec,
    options: &TemplateOptions,
    on_create: impl FnOnce(&Path),
) -> Result<PathBuf, FunctionError> {
    let dir = cached_function_dir(spec, options);
    if dir.join(MANIFEST_FILE).exists() {
        return Ok(dir);
    }
    on_create(&dir);
    // The manifest is written last, so a directory with one is complete.
    paths::build_cache_entry(
        &dir,
        MANIFEST_FILE,
        |building| create(spec, options, building).map(drop),
        FunctionError::Io,
    )?;
    Ok(dir)
}
