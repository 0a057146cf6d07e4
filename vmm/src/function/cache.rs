//! Cached function templates: one per (function, VM), made on first use and
//! kept next to the guest artifacts, like the default snapshot.

use std::path::{Path, PathBuf};

use ember_protocol::protocol::FunctionStart;

use super::manifest::MANIFEST_VERSION;
use super::spec::{start_request, vm_config, FunctionSpec, TemplateOptions};
use super::{FunctionError, Runtime, MANIFEST_FILE};
use crate::cache_key::KeyBuilder;
use crate::paths;
use crate::snapshot::snapshot_key;

/// What a template records besides its snapshot (the manifest's
/// contents): bumped when ember starts recording something new in it, so
/// cached templates are made again (2: the guest's clock addresses).
const TEMPLATE_CONTENTS: u32 = 2;

/// Where the cached template of `spec` in `options`'s VM lives:
/// `function-<key>` in the cache (see [`function_key`]).
pub fn cached_function_dir(
    spec: &FunctionSpec,
    options: &TemplateOptions,
) -> Result<PathBuf, FunctionError> {
    Ok(paths::cache_dir().join(format!("function-{}", function_key(spec, options)?)))
}

/// The cache key of `spec`'s template in `options`'s VM, a SHA-256 over
/// what the template is made from: the VM, keyed as its default snapshot
/// would be (the contents of the kernel, the initramfs with the agent and
/// the root image, the VM's shape, the host's kernel parameters and the
/// state format), the manifest's format, and the runtime's start request as the guest gets it
/// (argv, environment, and every file put in the function directory: the
/// handler or executable, and ember's python runtime), the hot path
/// setting and the warm-up event.
pub fn function_key(
    spec: &FunctionSpec,
    options: &TemplateOptions,
) -> Result<String, FunctionError> {
    let vm = snapshot_key(&vm_config(options))?;
    let (start, _, _) = start_request(spec, options)?;
    let code = match &spec.runtime {
        Runtime::Python3Bundle { code, .. } => Some(super::code_image::code_key(code)?),
        _ => None,
    };
    Ok(key_of(
        &vm,
        &start,
        spec.warmup_event.as_deref(),
        code.as_deref(),
    ))
}

fn key_of(
    vm: &str,
    start: &FunctionStart,
    warmup_event: Option<&[u8]>,
    code_drive: Option<&str>,
) -> String {
    let mut key = KeyBuilder::new("function");
    key.field("manifest", MANIFEST_VERSION.to_le_bytes())
        .field("contents", TEMPLATE_CONTENTS.to_le_bytes())
        .field("vm", vm);
    if let Some(code) = code_drive {
        key.field("code drive", code);
    }
    for arg in &start.argv {
        key.field("arg", arg);
    }
    for (name, value) in &start.env {
        key.field("env name", name).field("env value", value);
    }
    for file in &start.files_in {
        key.field("file path", &file.path)
            .field("file mode", file.mode.to_le_bytes())
            .field("file data", &file.data);
    }
    key.field("hot path", [u8::from(start.hot_path)]);
    if let Some(device) = &start.code_drive {
        key.field("code drive device", device);
    }
    match warmup_event {
        Some(event) => key.field("warm-up event", event),
        None => key.field("no warm-up event", ""),
    };
    key.finish()
}

/// The cached template of `spec`, made by `create` first if there is none
/// (`on_create` is told: that takes a cold boot and the runtime's start).
/// Concurrent callers may each make one; the first to finish wins.
/// [`crate::dispatch::ensure_cached_function`] passes the builder that
/// `options.isolation` asks for.
pub(crate) fn ensure_cached_with(
    spec: &FunctionSpec,
    options: &TemplateOptions,
    on_create: impl FnOnce(&Path),
    create: impl FnOnce(&Path) -> Result<(), FunctionError>,
) -> Result<PathBuf, FunctionError> {
    let dir = cached_function_dir(spec, options)?;
    if dir.join(MANIFEST_FILE).exists() {
        return Ok(dir);
    }
    on_create(&dir);
    // The manifest is written last, so a directory with one is complete.
    paths::build_cache_entry(&dir, MANIFEST_FILE, create, FunctionError::Io)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stand-in guest artifacts and a handler (keys only hash them).
    struct Inputs {
        dir: PathBuf,
    }

    impl Inputs {
        fn new(name: &str) -> Self {
            let dir = crate::cache_key::scratch_inputs(
                &format!("function-{name}"),
                &[
                    ("vmlinux", "kernel"),
                    ("initrd", "agent v1"),
                    ("python3.ext4", "python v1"),
                    ("handler.py", "def handler(event, context):\n    return 1\n"),
                    ("echo", "#!/bin/sh\nexec cat\n"),
                ],
            );
            Inputs { dir }
        }

        fn options(&self) -> TemplateOptions {
            TemplateOptions::new(
                self.dir.join("vmlinux"),
                self.dir.join("initrd"),
                Some(self.dir.join("python3.ext4")),
            )
        }

        fn python(&self) -> FunctionSpec {
            FunctionSpec::python3(self.dir.join("handler.py"), "handler")
        }

        fn key(&self, spec: &FunctionSpec) -> String {
            function_key(spec, &self.options()).unwrap()
        }

        fn edit(&self, file: &str, data: &str) {
            std::fs::write(self.dir.join(file), data).unwrap();
        }
    }

    impl Drop for Inputs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn key_is_a_sha256_and_stable() {
        let inputs = Inputs::new("stable");
        let key = inputs.key(&inputs.python());
        assert_eq!(key.len(), 64);
        assert_eq!(inputs.key(&inputs.python()), key);
        let dir = cached_function_dir(&inputs.python(), &inputs.options()).unwrap();
        assert_eq!(dir.file_name().unwrap(), format!("function-{key}").as_str());
    }

    #[test]
    fn editing_the_handler_changes_the_key() {
        let inputs = Inputs::new("handler");
        let before = inputs.key(&inputs.python());
        // Same length, same file: only the contents differ.
        inputs.edit("handler.py", "def handler(event, context):\n    return 2\n");
        assert_ne!(inputs.key(&inputs.python()), before);
    }

    #[test]
    fn editing_an_exec_runtime_changes_the_key() {
        let inputs = Inputs::new("exec");
        let spec = FunctionSpec {
            runtime: Runtime::Exec {
                program: inputs.dir.join("echo"),
                args: vec!["-x".into()],
            },
            ..inputs.python()
        };
        let before = inputs.key(&spec);
        inputs.edit("echo", "#!/bin/sh\nexec tac\n");
        let edited = inputs.key(&spec);
        assert_ne!(edited, before);
        let mut other_args = spec.clone();
        other_args.runtime = Runtime::Exec {
            program: inputs.dir.join("echo"),
            args: vec!["-y".into()],
        };
        assert_ne!(inputs.key(&other_args), edited);
    }

    #[test]
    fn editing_an_input_file_changes_the_key() {
        let inputs = Inputs::new("inputs");
        let mut seen = vec![inputs.key(&inputs.python())];
        for (file, data) in [
            ("vmlinux", "kernel v2"),
            ("initrd", "agent v2"),
            ("python3.ext4", "python v2"),
        ] {
            inputs.edit(file, data);
            let key = inputs.key(&inputs.python());
            assert!(!seen.contains(&key), "editing {file} kept the key");
            seen.push(key);
        }
    }

    #[test]
    fn the_runtime_is_keyed_through_the_initramfs() {
        // ember's python runtime is part of the agent, in the initramfs,
        // whose content is in the key (editing it changes the key, above);
        // the start request only names where the agent installed it.
        let inputs = Inputs::new("runtime");
        let (start, _, _) = start_request(&inputs.python(), &inputs.options()).unwrap();
        assert!(start.files_in.iter().all(|f| f.path != "ember_runtime.py"));
        assert!(start
            .argv
            .iter()
            .any(|a| a == ember_protocol::protocol::PYTHON_RUNTIME_PATH));
    }

    #[test]
    fn the_warmup_event_env_and_vm_change_the_key() {
        let inputs = Inputs::new("spec");
        let base = inputs.key(&inputs.python());
        let mut spec = inputs.python();
        spec.warmup_event = Some(b"{}".to_vec());
        let warm = inputs.key(&spec);
        assert_ne!(warm, base);
        spec.warmup_event = Some(b"[]".to_vec());
        assert_ne!(inputs.key(&spec), warm);
        let mut spec = inputs.python();
        spec.env = vec![("A".into(), "1".into())];
        assert_ne!(inputs.key(&spec), base);
        let mut spec = inputs.python();
        spec.hot_path = false;
        assert_ne!(inputs.key(&spec), base);
        let mut options = inputs.options();
        options.mem_mib += 64;
        assert_ne!(function_key(&inputs.python(), &options).unwrap(), base);
        // How long startup may take is not an input.
        let mut options = inputs.options();
        options.startup_timeout /= 2;
        assert_eq!(function_key(&inputs.python(), &options).unwrap(), base);
    }

    #[test]
    fn a_missing_handler_is_an_error() {
        let inputs = Inputs::new("missing");
        std::fs::remove_file(inputs.dir.join("handler.py")).unwrap();
        assert!(function_key(&inputs.python(), &inputs.options()).is_err());
    }
}
