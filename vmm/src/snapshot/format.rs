//! The snapshot `state` file: a fixed header, then a postcard-encoded
//! payload.
//!
//! ```text
//! offset  size  field
//!      0     8  magic, b"EMBRSNAP"
//!      8     4  format version, u32 little-endian (FORMAT_VERSION)
//!     12     8  payload length in bytes, u64 little-endian
//!     20     4  CRC-32 (IEEE) of the payload, u32 little-endian
//!     24     …  payload: postcard encoding of the state value
//! ```
//!
//! The file is untrusted input: [`read_state`] checks the magic, the
//! version and the payload length against both a fixed bound and the real
//! file length before it allocates or reads the payload, then the
//! checksum, and only then decodes. Any change to the payload's types is a
//! new [`FORMAT_VERSION`]: postcard is not self-describing, so an old
//! payload decoded with new types would be garbage, not an error.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{write_atomically, FileError};

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"EMBRSNAP";
/// The state format this build writes and reads.
///
/// 2: the devices have an optional root drive (`DeviceStates::block`).
/// 3: the root drive is recorded by its name in the snapshot directory.
/// 4: the devices have an optional code drive (`DeviceStates::code`).
pub const FORMAT_VERSION: u32 = 4;
/// Size of the header before the payload.
pub const HEADER_LEN: u64 = 24;
/// Largest payload accepted: far above any real state (a few KiB per
/// vCPU plus devices), low enough that a corrupt length cannot make the
/// reader allocate much.
pub const MAX_STATE_LEN: u64 = 4 << 20;

/// Errors writing or reading a state file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An I/O operation on the file failed.
    #[error(transparent)]
    Io(#[from] FileError),
    /// The file is empty.
    #[error("{}: state file is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file is shorter than the header.
    #[error("{}: state file truncated: {len} bytes, shorter than the {HEADER_LEN}-byte header", path.display())]
    ShortHeader {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The magic does not match.
    #[error("{}: not an ember snapshot state file (bad magic)", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The file has another format version.
    #[error("{}: snapshot format version {found}, this ember reads version {FORMAT_VERSION}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
    },
    /// The header claims a payload larger than [`MAX_STATE_LEN`].
    #[error("{}: state payload of {len} bytes exceeds the {MAX_STATE_LEN}-byte limit (file corrupt)", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The length the header claims.
        len: u64,
    },
    /// The file holds fewer payload bytes than the header says.
    #[error("{}: state file truncated: header says {expected} bytes, file has {actual}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Payload length from the header.
        expected: u64,
        /// Payload bytes in the file.
        actual: u64,
    },
    /// The file holds more bytes than the header accounts for.
    #[error("{}: state file has {actual} payload bytes, header says {expected} (trailing data)", path.display())]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// Payload length from the header.
        expected: u64,
        /// Payload bytes in the file.
        actual: u64,
    },
    /// The payload's CRC-32 does not match the header's.
    #[error("{}: state checksum mismatch (file corrupt)", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
    },
    /// The payload does not decode as the expected type.
    #[error("{}: state payload does not decode: {reason}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The value does not encode, or encodes larger than [`MAX_STATE_LEN`].
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
}

/// Encodes `value` as a complete state file image: header and payload.
fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(value).map_err(|e| FormatError::Encode(e.to_string()))?;
    let len = payload.len() as u64;
    if len > MAX_STATE_LEN {
        // The reader would refuse it; fail now rather than at restore.
        return Err(FormatError::Encode(format!(
            "{len} bytes exceeds the {MAX_STATE_LEN}-byte limit"
        )));
    }
    let mut image = Vec::with_capacity(payload.len() + HEADER_LEN as usize);
    image.extend_from_slice(&MAGIC);
    image.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    image.extend_from_slice(&len.to_le_bytes());
    image.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    image.extend_from_slice(&payload);
    Ok(image)
}

/// Writes `value` to the state file at `path`, atomically: a temporary file
/// in the same directory is written and fsynced, then renamed over `path`,
/// and the directory is fsynced, so `path` holds either the old or the
/// whole new state, never a part.
pub fn write_state<T: Serialize>(path: &Path, value: &T) -> Result<(), FormatError> {
    let image = encode(value)?;
    write_atomically(path, |file, tmp| {
        let mut file = file;
        file.write_all(&image)
            .map_err(|source| FileError::new(tmp, "write", source))
    })?;
    Ok(())
}

/// Reads and decodes the state file at `path`, checking it first (see the
/// module documentation).
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let io_err = |op| move |source| FileError::new(path, op, source);
    let mut file = File::open(path).map_err(io_err("open"))?;
    let file_len = file.metadata().map_err(io_err("stat"))?.len();
    check_file_len(path, file_len)?;
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact(&mut header)
        .map_err(io_err("read the header"))?;
    let (len, crc) = check_header(path, &header, file_len)?;
    // `len` <= MAX_STATE_LEN, so this allocation is bounded.
    let mut payload = vec![0u8; len as usize];
    file.read_exact(&mut payload)
        .map_err(io_err("read the payload"))?;
    decode_payload(path, &payload, crc)
}

/// Decodes a whole state file image already in memory (header and
/// payload), with the same checks as [`read_state`]. Errors name the
/// source `<state bytes>`.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    let path = Path::new("<state bytes>");
    check_file_len(path, bytes.len() as u64)?;
    let Some((header, payload)) = bytes.split_first_chunk::<{ HEADER_LEN as usize }>() else {
        return Err(FormatError::ShortHeader {
            path: path.into(),
            len: bytes.len() as u64,
        });
    };
    let (_, crc) = check_header(path, header, bytes.len() as u64)?;
    decode_payload(path, payload, crc)
}

/// Refuses files too short to hold a header.
fn check_file_len(path: &Path, file_len: u64) -> Result<(), FormatError> {
    if file_len == 0 {
        return Err(FormatError::Empty { path: path.into() });
    }
    if file_len < HEADER_LEN {
        return Err(FormatError::ShortHeader {
            path: path.into(),
            len: file_len,
        });
    }
    Ok(())
}

/// Checks the header of a file of `file_len` bytes: magic, version, and
/// the payload length against [`MAX_STATE_LEN`] and the file. Returns the
/// payload length and CRC.
fn check_header(
    path: &Path,
    header: &[u8; HEADER_LEN as usize],
    file_len: u64,
) -> Result<(u64, u32), FormatError> {
    let mut magic = [0u8; 8];
    let mut version = [0u8; 4];
    let mut len = [0u8; 8];
    let mut crc = [0u8; 4];
    let mut rest = &header[..];
    for field in [&mut magic[..], &mut version[..], &mut len[..], &mut crc[..]] {
        // The fields add up to the header's length: this cannot fail.
        rest.read_exact(field)
            .map_err(|source| FileError::new(path, "read the header", source))?;
    }
    let (version, len, crc) = (
        u32::from_le_bytes(version),
        u64::from_le_bytes(len),
        u32::from_le_bytes(crc),
    );
    let path = path.to_path_buf();
    if magic != MAGIC {
        return Err(FormatError::BadMagic { path });
    }
    if version != FORMAT_VERSION {
        return Err(FormatError::Version {
            path,
            found: version,
        });
    }
    if len > MAX_STATE_LEN {
        return Err(FormatError::TooLarge { path, len });
    }
    let Some(actual) = file_len.checked_sub(HEADER_LEN) else {
        return Err(FormatError::ShortHeader {
            path,
            len: file_len,
        });
    };
    if actual < len {
        return Err(FormatError::Truncated {
            path,
            expected: len,
            actual,
        });
    }
    if actual > len {
        return Err(FormatError::TrailingData {
            path,
            expected: len,
            actual,
        });
    }
    Ok((len, crc))
}

/// Checks the payload against its CRC, then decodes it (all of it).
fn decode_payload<T: DeserializeOwned>(
    path: &Path,
    payload: &[u8],
    crc: u32,
) -> Result<T, FormatError> {
    if crc32fast::hash(payload) != crc {
        return Err(FormatError::Checksum { path: path.into() });
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(payload).map_err(|e| FormatError::Decode {
            path: path.into(),
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(FormatError::Decode {
            path: path.into(),
            reason: format!("{} bytes left over after the state", rest.len()),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use std::fs;

    use super::*;
    use crate::snapshot::test_dir::TestDir;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
        flag: Option<bool>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vcpu0".into(),
            values: (0..1000).map(|i| i * 7919).collect(),
            flag: Some(true),
        }
    }

    fn written(dir: &TestDir) -> (PathBuf, Vec<u8>) {
        let path = dir.path().join("state");
        write_state(&path, &sample()).unwrap();
        let bytes = fs::read(&path).unwrap();
        (path, bytes)
    }

    fn read_err(path: &Path) -> String {
        read_state::<Sample>(path).unwrap_err().to_string()
    }

    #[test]
    fn round_trip() {
        let dir = TestDir::new("format-round-trip");
        let (path, bytes) = written(&dir);
        assert_eq!(&bytes[..8], b"EMBRSNAP");
        assert_eq!(read_state::<Sample>(&path).unwrap(), sample());
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // Overwriting replaces the whole file.
        write_state(
            &path,
            &Sample {
                name: "x".into(),
                values: vec![],
                flag: None,
            },
        )
        .unwrap();
        assert_eq!(read_state::<Sample>(&path).unwrap().name, "x");
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let dir = TestDir::new("format-flip");
        let (path, bytes) = written(&dir);
        // Each header byte, and a spread of payload bytes.
        let positions =
            (0..HEADER_LEN as usize).chain((HEADER_LEN as usize..bytes.len()).step_by(97));
        for pos in positions {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            let err = read_err(&path);
            let expected = match pos {
                0..=7 => "bad magic",
                8..=11 => "snapshot format version",
                // A changed length no longer matches the file.
                12..=19 => "",
                _ => "checksum mismatch",
            };
            assert!(err.contains(expected), "byte {pos}: {err}");
        }
    }

    #[test]
    fn decode_state_matches_read_state() {
        let dir = TestDir::new("format-decode-bytes");
        let (path, bytes) = written(&dir);
        assert_eq!(decode_state::<Sample>(&bytes).unwrap(), sample());
        // Every header byte, a spread of payload bytes, and cuts: the
        // in-memory decoder refuses exactly what the file reader refuses.
        let flips = (0..HEADER_LEN as usize).chain((HEADER_LEN as usize..bytes.len()).step_by(97));
        for pos in flips {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            let from_file = read_err(&path);
            let from_bytes = decode_state::<Sample>(&bad).unwrap_err().to_string();
            let strip = |s: &str| s.split_once(": ").map(|(_, rest)| rest.to_owned());
            assert_eq!(strip(&from_file), strip(&from_bytes), "byte {pos}");
        }
        for len in [0, 1, 23, 24, bytes.len() - 1] {
            assert!(decode_state::<Sample>(&bytes[..len]).is_err(), "{len}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_state::<Sample>(&long)
            .unwrap_err()
            .to_string()
            .contains("trailing data"));
    }

    #[test]
    fn truncated_files() {
        let dir = TestDir::new("format-truncated");
        let (path, bytes) = written(&dir);
        for len in [0, 1, 7, 8, 12, 23] {
            fs::write(&path, &bytes[..len]).unwrap();
            let err = read_err(&path);
            if len == 0 {
                assert!(err.contains("state file is empty"), "{err}");
            } else {
                assert!(
                    err.contains("shorter than the 24-byte header"),
                    "{len}: {err}"
                );
            }
        }
        let payload = (bytes.len() - 24) as u64;
        for len in [24, 25, bytes.len() / 2, bytes.len() - 1] {
            fs::write(&path, &bytes[..len]).unwrap();
            let err = read_err(&path);
            let want = format!(
                "state file truncated: header says {payload} bytes, file has {}",
                len - 24
            );
            assert!(err.contains(&want), "{len}: {err}");
        }
        let mut long = bytes.clone();
        long.push(0);
        fs::write(&path, &long).unwrap();
        assert!(read_err(&path).contains("trailing data"));
    }

    #[test]
    fn wrong_version() {
        let dir = TestDir::new("format-version");
        let (path, mut bytes) = written(&dir);
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        assert!(read_err(&path).ends_with(&format!(
            "snapshot format version 7, this ember reads version {FORMAT_VERSION}"
        )));
    }

    #[test]
    fn huge_claimed_length_is_refused_before_reading() {
        let dir = TestDir::new("format-huge");
        let (path, mut bytes) = written(&dir);
        bytes[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        assert!(read_err(&path).contains(&format!("exceeds the {MAX_STATE_LEN}-byte limit")));
        bytes[12..20].copy_from_slice(&(MAX_STATE_LEN).to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        assert!(read_err(&path).contains("state file truncated"));
    }

    #[test]
    fn other_type_does_not_decode() {
        let dir = TestDir::new("format-decode");
        let path = dir.path().join("state");
        write_state(&path, &(1u8, 2u8)).unwrap();
        let err = read_err(&path);
        assert!(err.contains("state payload does not decode"), "{err}");
        // A valid prefix with bytes left over is an error too.
        write_state(&path, &(sample(), 5u32)).unwrap();
        let err = read_err(&path);
        assert!(err.contains("left over"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = TestDir::new("format-missing");
        let path = dir.path().join("nope");
        let err = read_err(&path);
        assert!(err.contains("nope") && err.contains("cannot open"), "{err}");
    }
}
