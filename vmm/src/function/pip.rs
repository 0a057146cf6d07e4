//! A bundle's dependencies: its `requirements.txt` installed on the host
//! with pip, for the guest's interpreter (Debian 12's CPython 3.11 on
//! x86_64), into a site directory cached by the requirements' content.
//!
//! pip is told the guest's platform, so it takes wheels only: manylinux
//! wheels for x86_64/cp311 (glibc up to 2.28, below Debian 12's 2.36), and
//! pure-python wheels. A requirement published only as an sdist has no
//! wheel to take; when pip says so, the requirements are built into wheels
//! on the host (`pip wheel`), the pure-python ones (`*-none-any.whl`) are
//! kept, and the install is tried once more with them on hand. Anything
//! else pip cannot install for the guest is an error naming it, with the
//! tail of pip's output.
//!
//! Every pip run is jailed ([`super::pip_jail`]): a requirements file can
//! make pip run the tenant's code (a build backend), even for the
//! wheels-only install.

use std::path::{Path, PathBuf};

use super::pip_jail::{PipJail, PipJailError, Session, BUILD_DIR, REQ_DIR};
use crate::cache_key::KeyBuilder;
use crate::paths;

/// The directory inside a cache entry that holds the installed packages.
pub const SITE: &str = "site";
/// Written last into a complete cache entry.
const COMPLETE: &str = "complete";
/// pip's options that pick the guest's wheels.
const GUEST_PLATFORM: [&str; 12] = [
    "--only-binary=:all:",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
    "--no-compile",
];
/// Bytes of pip's output quoted in an error.
const TAIL: usize = 1500;

/// The dependencies could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum PipError {
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// pip could not be run in its jail.
    #[error(transparent)]
    Jail(#[from] PipJailError),
    /// pip refused or failed.
    #[error("cannot install {what} for the guest (CPython 3.11, manylinux x86_64 wheels or pure-python packages): pip says:\n{tail}")]
    Install {
        /// The requirement pip named, or "the requirements".
        what: String,
        /// The end of pip's output.
        tail: String,
    },
}

/// The site directory with `requirements`'s packages installed, made first
/// if it is not cached (`on_install` is told); pip runs in `jail`.
pub fn ensure_site(
    requirements: &Path,
    jail: &PipJail,
    on_install: impl FnOnce(),
) -> Result<PathBuf, PipError> {
    let dir = paths::cache_dir().join(format!("site-{}", site_key(requirements)?));
    if !dir.join(COMPLETE).exists() {
        on_install();
        paths::build_cache_entry(
            &dir,
            COMPLETE,
            |building| install(requirements, building, jail),
            PipError::Io,
        )?;
    }
    Ok(dir.join(SITE))
}

/// The cache key of the site `requirements` makes.
fn site_key(requirements: &Path) -> Result<String, PipError> {
    let text = std::fs::read(requirements).map_err(|e| PipError::Io(requirements.into(), e))?;
    let mut key = KeyBuilder::new("python-site");
    for arg in GUEST_PLATFORM {
        key.field("pip arg", arg);
    }
    key.field("requirements", &text);
    // Requirements that name anything but index packages (a path, a URL,
    // another file, a --find-links directory) read the bundle's files:
    // two bundles with the same text may then mean different packages, so
    // the files are part of the key.
    if !index_only(&String::from_utf8_lossy(&text)) {
        let bundle = requirements.parent().unwrap_or(Path::new("."));
        tree_digest(bundle, &mut key).map_err(|e| PipError::Io(bundle.into(), e))?;
    }
    Ok(key.finish())
}

/// Whether every requirement line names a package of the index only (a
/// PEP 508 name, extras, version specifiers, markers, `--hash` options):
/// nothing pip would read from the bundle or fetch from a URL it names.
fn index_only(text: &str) -> bool {
    text.lines().all(|line| {
        // Comments (and a URL's #fragment, which is refused anyway).
        let line = line.split('#').next().unwrap_or_default();
        line.split_whitespace()
            .all(|word| match word.strip_prefix("--hash=") {
                Some(hash) => hash.chars().all(|c| c.is_ascii_alphanumeric() || c == ':'),
                None => {
                    !word.starts_with('-')
                        && word
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-[],<>=!~*;'\"()".contains(c))
                }
            })
    })
}

/// Feeds every regular file under `dir` (its path relative to `dir`, and
/// its content) into `key`, in path order. Links and other file types
/// count by their names only.
fn tree_digest(dir: &Path, key: &mut KeyBuilder) -> std::io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else {
                files.push((entry.path(), kind.is_file()));
            }
        }
    }
    files.sort();
    for (path, regular) in files {
        let name = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        if regular {
            key.file(&name, &path)?;
        } else {
            key.field("not a regular file", name);
        }
    }
    Ok(())
}

/// Installs `requirements` into `into`/[`SITE`] (`into` is made; it must
/// not hold a previous attempt), uncached: what [`ensure_site`] caches.
pub fn install_site(requirements: &Path, into: &Path, jail: &PipJail) -> Result<(), PipError> {
    install(requirements, into, jail)
}

fn install(requirements: &Path, building: &Path, jail: &PipJail) -> Result<(), PipError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| PipError::Io(path, e)
    };
    std::fs::create_dir_all(building).map_err(io(building))?;
    let (Some(dir), Some(name)) = (requirements.parent(), requirements.file_name()) else {
        return Err(PipError::Io(
            requirements.into(),
            std::io::ErrorKind::InvalidInput.into(),
        ));
    };
    // Relative paths in the file (`--find-links wheelhouse`) are the
    // bundle's: its directory is all of it the jail sees.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let session = Session::open(jail, &building.join("jail"), dir)?;
    let requirements = format!("{REQ_DIR}/{}", name.to_string_lossy());
    let site = format!("{BUILD_DIR}/site");
    if let Err(output) = session.pip(&install_args(&requirements, &site, None))? {
        if !no_wheel(&output) {
            return Err(install_error(&output));
        }
        // Some requirement has no wheel for the guest: build what can be
        // built, keep the pure-python wheels, and try again with those.
        let wheels = format!("{BUILD_DIR}/wheels");
        let built = session.pip(&[
            "wheel".into(),
            "--quiet".into(),
            "--wheel-dir".into(),
            wheels.clone(),
            "-r".into(),
            requirements.clone(),
        ])?;
        if let Err(output) = built {
            return Err(install_error(&output));
        }
        keep_pure_wheels(&session.host_path("wheels"))?;
        let host_site = session.host_path("site");
        if std::fs::symlink_metadata(&host_site).is_ok() {
            std::fs::remove_dir_all(&host_site).map_err(io(&host_site))?;
        }
        if let Err(output) = session.pip(&install_args(&requirements, &site, Some(&wheels)))? {
            return Err(install_error(&output));
        }
    }
    let out = building.join(SITE);
    if session.host_path("site").is_dir() {
        session.take_dir("site", &out)?;
    } else {
        // Nothing to install (comments only): pip made no directory.
        std::fs::create_dir_all(&out).map_err(io(&out))?;
    }
    drop(session);
    std::fs::write(building.join(COMPLETE), b"").map_err(io(building))
}

/// Removes from the jail's wheel directory (no jailed process runs) all
/// but pure-python wheels, the ones the guest can use.
fn keep_pure_wheels(wheels: &Path) -> Result<(), PipError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| PipError::Io(path, e)
    };
    let Ok(entries) = std::fs::read_dir(wheels) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.map_err(io(wheels))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
        let pure = path.to_string_lossy().ends_with("-none-any.whl");
        if meta.is_dir() {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        } else if !(pure && meta.file_type().is_file()) {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// `pip install` for the guest into `site` (paths in the jail).
fn install_args(requirements: &str, site: &str, find_links: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "install".to_owned(),
        "--quiet".into(),
        "--no-input".into(),
        "--target".into(),
        site.to_owned(),
    ];
    args.extend(GUEST_PLATFORM.map(String::from));
    if let Some(dir) = find_links {
        args.push("--find-links".into());
        args.push(dir.to_owned());
    }
    args.push("-r".into());
    args.push(requirements.to_owned());
    args
}

/// Whether pip failed for want of a wheel (an sdist-only package).
fn no_wheel(output: &str) -> bool {
    output.contains("No matching distribution found for")
}

/// The error for pip's `output`, naming the requirement it complained of.
fn install_error(output: &str) -> PipError {
    PipError::Install {
        what: failed_requirement(output).unwrap_or_else(|| "the requirements".into()),
        tail: tail(output),
    }
}

/// The requirement pip's output names as the one that failed.
fn failed_requirement(output: &str) -> Option<String> {
    const MARKERS: [&str; 4] = [
        "No matching distribution found for ",
        "Could not find a version that satisfies the requirement ",
        "Invalid requirement: ",
        "Failed to build ",
    ];
    output.lines().rev().find_map(|line| {
        MARKERS.iter().find_map(|marker| {
            line.find(marker).map(|at| {
                let rest = line[at + marker.len()..].trim();
                match rest.strip_prefix('\'') {
                    Some(quoted) => quoted.split('\'').next().unwrap_or(quoted).to_owned(),
                    None => rest.split(" (").next().unwrap_or(rest).to_owned(),
                }
            })
        })
    })
}

fn tail(output: &str) -> String {
    let trimmed = output.trim_end();
    let start = trimmed.len().saturating_sub(TAIL);
    let start = (start..trimmed.len())
        .find(|&i| trimmed.is_char_boundary(i))
        .unwrap_or(trimmed.len());
    trimmed[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_index_requirements_are_keyed_by_their_text_alone() {
        for plain in [
            "",
            "# deps\nrequests==2.31.0\n",
            "numpy>=1.26,<2 ; python_version >= \"3.11\"  # pinned\n",
            "jinja2[i18n]~=3.1\nMarkupSafe\n",
            "six==1.16.0 --hash=sha256:8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254\n",
        ] {
            assert!(index_only(plain), "{plain:?}");
        }
        for local in [
            "./vendor/pkg\n",
            "pkg @ file:///req/pkg.tar.gz\n",
            "pkg @ https://example.com/pkg.whl\n",
            "--find-links vendor\npkg\n",
            "-f vendor\n",
            "-r other.txt\n",
            "-e .\n",
            "vendor/pkg-1.0.tar.gz\n",
            "pkg==1.0 \\\n    --index-url http://x\n",
            "git+https://example.com/r.git\n",
        ] {
            assert!(!index_only(local), "{local:?}");
        }
    }

    #[test]
    fn a_site_that_reads_the_bundle_is_keyed_by_it() {
        let root = std::env::temp_dir().join(format!("ember-site-key-{}", std::process::id()));
        let key_of = |bundle: &str, requirements: &str, vendored: &str| {
            let dir = root.join(bundle);
            std::fs::create_dir_all(dir.join("vendor")).unwrap();
            std::fs::write(dir.join("requirements.txt"), requirements).unwrap();
            std::fs::write(dir.join("vendor/pkg.py"), vendored).unwrap();
            site_key(&dir.join("requirements.txt")).unwrap()
        };
        // Index packages: the same text is the same site, whatever else.
        assert_eq!(
            key_of("a", "six==1.16.0\n", "x"),
            key_of("b", "six==1.16.0\n", "y")
        );
        // Vendored ones: the same text with other files is another site.
        let local = "--find-links vendor\npkg\n";
        assert_ne!(
            key_of("c", local, "tenant one"),
            key_of("d", local, "tenant two")
        );
        assert_eq!(key_of("e", local, "same"), key_of("f", local, "same"));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_failed_requirement_is_named() {
        let out = "ERROR: Could not find a version that satisfies the requirement nosuchpkg-xyz (from versions: none)\nERROR: No matching distribution found for nosuchpkg-xyz\n";
        assert_eq!(failed_requirement(out).as_deref(), Some("nosuchpkg-xyz"));
        assert!(no_wheel(out));
        let out = "ERROR: Invalid requirement: 'jinja2 >>> 3': Expected end\n";
        assert_eq!(failed_requirement(out).as_deref(), Some("jinja2 >>> 3"));
        assert!(!no_wheel(out));
        assert_eq!(failed_requirement("something else"), None);
        assert!(tail(&"é".repeat(2000)).len() <= TAIL);
    }
}
