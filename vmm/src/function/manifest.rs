//! `function.json`: what a function template is, next to its snapshot.

use std::io::Read;
use std::path::Path;

use ember_protocol::protocol::HotPathPages;
use serde::{Deserialize, Serialize};

use super::guest_clock::GuestClock;
use super::guest_rng::GuestRng;
use super::FunctionError;
use crate::snapshot::working_set::PageRun;

/// The manifest's file name in a function directory.
pub const MANIFEST_FILE: &str = "function.json";
/// The manifest format this ember writes and reads.
pub(crate) const MANIFEST_VERSION: u32 = 1;
/// A manifest is a few KiB; anything larger is not one.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// What a function template holds besides its snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// `python3` or `exec`.
    pub runtime: String,
    /// The handler (`FILE.py:NAME`, or the executable's name).
    pub handler: String,
    /// The waiting runtime's hot-path buffers, if it has them.
    pub hot_path: Option<HotPathPages>,
    /// The request sequence number clones use (one past the warm-up's).
    pub next_seq: u64,
    /// Where the guest kernel's CRNG lives, for reseeding clones in memory.
    pub guest_rng: Option<GuestRng>,
    /// Where the guest kernel keeps its wall clock, for setting clones'
    /// clocks in memory (absent in templates made before it existed).
    #[serde(default)]
    pub guest_clock: Option<GuestClock>,
    /// When the template was made, Unix milliseconds.
    pub created_unix_ms: u64,
    /// The guest pages a hot-path request touched in a calibration clone,
    /// populated up front in every clone.
    pub working_set: Vec<PageRun>,
    /// The python runtime's heap pre-touched at template time, MiB
    /// (`EMBER_ARENA_MIB`; absent for other runtimes and older templates).
    #[serde(default)]
    pub arena_mib: Option<u32>,
}

impl Manifest {
    /// A manifest for a new template.
    pub(crate) fn new(runtime: &str, handler: String) -> Self {
        Manifest {
            version: MANIFEST_VERSION,
            runtime: runtime.to_owned(),
            handler,
            hot_path: None,
            next_seq: 1,
            guest_rng: None,
            guest_clock: None,
            created_unix_ms: 0,
            working_set: Vec::new(),
            arena_mib: None,
        }
    }

    /// Reads and checks `dir/function.json` against a guest of
    /// `mem_bytes` of RAM.
    pub fn read(dir: &Path, mem_bytes: u64) -> Result<Self, FunctionError> {
        let path = dir.join(MANIFEST_FILE);
        let io = |e| FunctionError::Io(path.clone(), e);
        let file = std::fs::File::open(&path).map_err(io)?;
        let mut text = Vec::new();
        file.take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(FunctionError::Manifest(format!(
                "{} is over {MAX_MANIFEST_BYTES} bytes",
                path.display()
            )));
        }
        Self::from_json(&text, mem_bytes)
            .map_err(|e| FunctionError::Manifest(format!("{}: {e}", path.display())))
    }

    /// Decodes and checks a manifest's JSON text (at most 1 MiB).
    pub fn from_json(text: &[u8], mem_bytes: u64) -> Result<Self, FunctionError> {
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(FunctionError::Manifest(format!(
                "over {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        let manifest: Manifest =
            serde_json::from_slice(text).map_err(|e| FunctionError::Manifest(e.to_string()))?;
        manifest.validate(mem_bytes)?;
        Ok(manifest)
    }

    /// The manifest's JSON text.
    pub fn to_json(&self) -> Result<Vec<u8>, FunctionError> {
        serde_json::to_vec_pretty(self).map_err(|e| FunctionError::Manifest(format!("encode: {e}")))
    }

    fn validate(&self, mem_bytes: u64) -> Result<(), FunctionError> {
        if self.version != MANIFEST_VERSION {
            return Err(FunctionError::Manifest(format!(
                "version {}, this ember reads {MANIFEST_VERSION} (re-create the function)",
                self.version
            )));
        }
        if self.next_seq == 0 {
            return Err(FunctionError::Manifest("next_seq is 0".into()));
        }
        if let Some(pages) = &self.hot_path {
            super::buffers::validate(pages, mem_bytes)?;
        }
        let ws_pages: u64 = self.working_set.iter().map(|r| u64::from(r.pages)).sum();
        if ws_pages > mem_bytes / 4096 {
            return Err(FunctionError::Manifest(format!(
                "a working set of {ws_pages} pages in {mem_bytes} bytes of memory"
            )));
        }
        if let Some(clock) = &self.guest_clock {
            if let Some(addr) = clock
                .addresses()
                .find(|a| a.saturating_add(4096) > (4u64 << 30) + mem_bytes)
            {
                return Err(FunctionError::Manifest(format!(
                    "clock address {addr:#x} outside guest memory"
                )));
            }
        }
        if let Some(rng) = &self.guest_rng {
            if rng.addr.saturating_add(64) > (4u64 << 30) + mem_bytes {
                return Err(FunctionError::Manifest(format!(
                    "CRNG address {:#x} outside guest memory",
                    rng.addr
                )));
            }
        }
        Ok(())
    }

    /// Writes the manifest into `dir` (atomically: temporary file, rename).
    pub(crate) fn write(&self, dir: &Path) -> Result<(), FunctionError> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
        let text = self.to_json()?;
        std::fs::write(&tmp, text).map_err(|e| FunctionError::Io(tmp.clone(), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| FunctionError::Io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("ember-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut manifest = Manifest::new("python3", "echo.py:handler".into());
        manifest.next_seq = 2;
        manifest.write(&dir).unwrap();
        assert_eq!(Manifest::read(&dir, 256 << 20).unwrap(), manifest);

        manifest.version = 99;
        manifest.write(&dir).unwrap();
        assert!(Manifest::read(&dir, 256 << 20).is_err());

        std::fs::write(dir.join(MANIFEST_FILE), b"{not json").unwrap();
        assert!(matches!(
            Manifest::read(&dir, 256 << 20),
            Err(FunctionError::Manifest(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            Manifest::read(&dir, 256 << 20),
            Err(FunctionError::Io(..))
        ));
    }
}
