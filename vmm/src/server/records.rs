//! What a server keeps on disk about the functions deployed over its API:
//! one small JSON record per name under the data directory
//! (`functions/<name>.json`), written atomically (a temporary file,
//! synced, renamed over the old one), so a crash leaves either the old
//! record or the new one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::functions::PoolLimits;

use super::functions::valid_name;

/// Where the records are, under the data directory.
pub const RECORDS_DIR: &str = "functions";
/// Where the templates are, under the data directory (one directory per
/// content key).
pub const TEMPLATES_DIR: &str = "templates";
/// Where uploaded bundles wait for their build, under the data directory.
pub const BUNDLES_DIR: &str = "bundles";

/// Largest record file read: a record is a few KiB (its log tail at most
/// [`super::deploy::LOG_TAIL_BYTES`]); a larger file is not one of ours.
pub const MAX_RECORD_BYTES: u64 = 1 << 20;

/// A record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A record does not parse.
    #[error("{0}: corrupt function record: {1}")]
    Corrupt(PathBuf, String),
}

/// A deployed function's settings (the `PUT` query).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// `python3`.
    pub runtime: String,
    /// `MODULE:FUNCTION`.
    pub handler: String,
    /// Guest memory of its microVMs.
    pub memory_mib: u32,
    /// Its invocations' timeout unless a request asks for another.
    pub timeout_ms: u64,
    /// The runtime's environment, in order.
    pub env: Vec<(String, String)>,
    /// Its own share of the server (none: the server's defaults).
    #[serde(default, skip_serializing_if = "PoolLimits::is_default")]
    pub pool: PoolLimits,
}

/// One version of a deployed function: its settings, bundle and template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Its settings.
    pub settings: Settings,
    /// SHA-256 of the bundle's bytes, hex.
    pub bundle_sha256: String,
    /// Its template's content key: `templates/<key>` in the data directory.
    pub template: String,
    /// When it was deployed (`PUT`), ms since the epoch.
    pub created_unix_ms: u64,
}

/// Where the latest version of a function stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Its template is being made.
    Building,
    /// It serves.
    Ready,
    /// Its template could not be made (the log tail says why).
    Failed,
}

/// The latest version deployed under a name and how its build went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest {
    /// The version.
    pub version: Version,
    /// Its build's state.
    pub status: Status,
    /// The end of its build's log (the error), when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
    /// When the status last changed, ms since the epoch.
    pub updated_unix_ms: u64,
}

/// Everything kept about one deployed function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its name.
    pub name: String,
    /// The version that serves (the latest ready one), if any.
    pub active: Option<Version>,
    /// The latest version deployed (the active one once it is ready).
    pub latest: Latest,
}

impl Record {
    /// A template key of it that could not be one (keys are hex digests):
    /// a record edited by hand or corrupted must not lead outside the
    /// templates directory.
    pub fn bad_template(&self) -> Option<&str> {
        self.templates().find(|key| !valid_template_key(key))
    }

    /// The template keys it needs kept.
    pub fn templates(&self) -> impl Iterator<Item = &str> {
        self.active
            .iter()
            .map(|v| v.template.as_str())
            .chain(std::iter::once(self.latest.version.template.as_str()))
    }
}

/// Whether `key` can be a template key: a plain file name of ASCII
/// letters and digits (keys are hex digests), at most 128 bytes.
pub fn valid_template_key(key: &str) -> bool {
    (1..=128).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Milliseconds since the epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The records of one data directory.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    /// The records under `data_dir` (created, mode 0700, with the
    /// templates' and bundles' directories).
    pub fn open(data_dir: &Path) -> Result<Self, RecordError> {
        for dir in [
            data_dir.to_path_buf(),
            data_dir.join(RECORDS_DIR),
            data_dir.join(TEMPLATES_DIR),
            data_dir.join(BUNDLES_DIR),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| RecordError::Io(dir.clone(), e))?;
        }
        Ok(RecordStore {
            dir: data_dir.join(RECORDS_DIR),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Writes `record` in place of the old one, atomically.
    pub fn save(&self, record: &Record) -> Result<(), RecordError> {
        let path = self.path(&record.name);
        let temp = self.dir.join(format!(".{}.json.tmp", record.name));
        let io = |e| RecordError::Io(temp.clone(), e);
        let text = serde_json::to_vec_pretty(record)
            .map_err(|e| RecordError::Corrupt(path.clone(), e.to_string()))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io)?;
        file.write_all(&text).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&temp, &path).map_err(|e| RecordError::Io(path.clone(), e))?;
        // The rename itself survives a crash once the directory is synced.
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Removes `name`'s record.
    pub fn remove(&self, name: &str) -> Result<(), RecordError> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RecordError::Io(path, e)),
        }
    }

    /// Every record, by name; files that are not a valid name's record or
    /// do not parse are skipped with a warning (a server still starts).
    pub fn load_all(&self) -> Result<Vec<Record>, RecordError> {
        let io = |e| RecordError::Io(self.dir.clone(), e);
        let mut records = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if name.starts_with('.') || !valid_name(name) {
                continue;
            }
            match Self::read(&path) {
                Ok(record) if record.name == name => match record.bad_template() {
                    None => records.push(record),
                    Some(key) => tracing::warn!(
                        file = %path.display(),
                        template = %key,
                        "function record names a template key that is not one; skipped"
                    ),
                },
                Ok(record) => tracing::warn!(
                    file = %path.display(),
                    name = %record.name,
                    "function record names another function; skipped"
                ),
                Err(e) => tracing::warn!(error = %e, "function record skipped"),
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// Reads the record at `path`: a regular file (a FIFO would block
    /// the server's start, a link leads anywhere) of at most
    /// [`MAX_RECORD_BYTES`].
    fn read(path: &Path) -> Result<Record, RecordError> {
        use std::io::Read;
        let io = |e| RecordError::Io(path.to_path_buf(), e);
        let meta = std::fs::symlink_metadata(path).map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(RecordError::Corrupt(
                path.to_path_buf(),
                "not a regular file".into(),
            ));
        }
        if meta.len() > MAX_RECORD_BYTES {
            return Err(RecordError::Corrupt(
                path.to_path_buf(),
                format!("{} bytes, over {MAX_RECORD_BYTES}", meta.len()),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(io)?;
        let mut text = Vec::new();
        file.take(MAX_RECORD_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_RECORD_BYTES {
            return Err(RecordError::Corrupt(
                path.to_path_buf(),
                format!("over {MAX_RECORD_BYTES} bytes"),
            ));
        }
        serde_json::from_slice(&text)
            .map_err(|e| RecordError::Corrupt(path.to_path_buf(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(template: &str) -> Version {
        Version {
            settings: Settings {
                runtime: "python3".into(),
                handler: "app:handler".into(),
                memory_mib: 256,
                timeout_ms: 1000,
                env: vec![("A".into(), "1".into())],
                pool: PoolLimits {
                    min_warm: Some(1),
                    ..PoolLimits::default()
                },
            },
            bundle_sha256: "ab".into(),
            template: template.into(),
            created_unix_ms: 1,
        }
    }

    #[test]
    fn records_round_trip_and_bad_files_are_skipped() {
        let dir = std::env::temp_dir().join(format!("ember-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = RecordStore::open(&dir).unwrap();
        let record = Record {
            name: "echo".into(),
            active: Some(version("t1")),
            latest: Latest {
                version: version("t2"),
                status: Status::Failed,
                log_tail: Some("Traceback".into()),
                updated_unix_ms: 2,
            },
        };
        store.save(&record).unwrap();
        // Saved again: replaced, never a second file.
        store.save(&record).unwrap();
        std::fs::write(dir.join(RECORDS_DIR).join("corrupt.json"), b"{").unwrap();
        std::fs::write(dir.join(RECORDS_DIR).join("bad name.json"), b"{}").unwrap();
        let mut other = record.clone();
        other.name = "other".into();
        std::fs::write(
            dir.join(RECORDS_DIR).join("liar.json"),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        assert_eq!(store.load_all().unwrap(), vec![record.clone()]);
        assert_eq!(
            record.templates().collect::<Vec<_>>(),
            vec!["t1", "t2"],
            "both the serving and the latest template are kept"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        store.remove("echo").unwrap();
        store.remove("echo").unwrap();
        assert!(store.load_all().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What is in the records directory is read with care: a FIFO does
    /// not block the start, a link is not followed, a huge file is not
    /// read, a truncated one and a template key with a path in it are
    /// skipped; the good record still loads.
    #[test]
    fn hostile_record_files_are_skipped_without_blocking() {
        let dir = std::env::temp_dir().join(format!("ember-records-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = RecordStore::open(&dir).unwrap();
        let records = dir.join(RECORDS_DIR);
        let good = Record {
            name: "good".into(),
            active: Some(version("abc123")),
            latest: Latest {
                version: version("abc123"),
                status: Status::Ready,
                log_tail: None,
                updated_unix_ms: 1,
            },
        };
        store.save(&good).unwrap();
        use std::os::unix::ffi::OsStringExt;
        let fifo =
            std::ffi::CString::new(records.join("fifo.json").into_os_string().into_vec()).unwrap();
        // SAFETY: a valid NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let outside = dir.join("outside.json");
        let mut linked = good.clone();
        linked.name = "linked".into();
        std::fs::write(&outside, serde_json::to_vec(&linked).unwrap()).unwrap();
        std::os::unix::fs::symlink(&outside, records.join("linked.json")).unwrap();
        let mut huge = serde_json::to_vec(&Record {
            name: "huge".into(),
            ..good.clone()
        })
        .unwrap();
        huge.extend(vec![b' '; MAX_RECORD_BYTES as usize]);
        std::fs::write(records.join("huge.json"), huge).unwrap();
        let text = serde_json::to_vec(&Record {
            name: "cut".into(),
            ..good.clone()
        })
        .unwrap();
        std::fs::write(records.join("cut.json"), &text[..text.len() / 2]).unwrap();
        for (name, key) in [("escape", "../../etc"), ("slash", "a/b"), ("empty", "")] {
            let mut bad = good.clone();
            bad.name = name.into();
            bad.latest.version.template = key.into();
            store.save(&bad).unwrap();
        }
        let mut bad_active = good.clone();
        bad_active.name = "badactive".into();
        bad_active.active = Some(version(".."));
        store.save(&bad_active).unwrap();
        assert_eq!(store.load_all().unwrap(), vec![good]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn template_keys() {
        assert!(valid_template_key("0123abcdef"));
        for bad in ["", ".", "..", "a/b", "../x", "a.lock", &"a".repeat(129)] {
            assert!(!valid_template_key(bad), "{bad}");
        }
    }
}
