//! What the image formats' manifests come down to: the chosen image's name
//! and its layers in order, each with the digests to check it against.

use thiserror::Error;

use super::digest::sha256_hex;
use super::source::{Source, SourceError};

/// Largest manifest, index or config file read (they are small JSON).
pub const MAX_JSON_BYTES: u64 = 4 << 20;

/// What failed.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{what}: invalid JSON: {error}")]
    Json {
        what: String,
        error: serde_json::Error,
    },
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
    #[error("the archive holds no image")]
    Empty,
    #[error("the archive holds {count} images ({names}): pick one with --ref NAME:TAG")]
    Ambiguous { count: usize, names: String },
    #[error("no image {wanted} in the archive (it has: {names})")]
    NoSuchRef { wanted: String, names: String },
    #[error(
        "{what}: digest mismatch: the manifest says sha256:{expected}, the data is sha256:{actual}"
    )]
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
}

/// The container image formats read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `docker save`: `manifest.json` and layer tars.
    DockerSave,
    /// OCI image layout: `oci-layout`, `index.json`, `blobs/sha256/...`.
    Oci,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::DockerSave => "docker save archive",
            Format::Oci => "OCI image layout",
        })
    }
}

/// A SHA-256 digest as 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Hex(String);

impl Sha256Hex {
    /// `hex` if it is 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Sha256Hex(hex.to_owned()))
    }

    /// A `sha256:HEX` digest string; other algorithms are refused.
    pub fn parse(digest: &str, what: &str) -> Result<Self, ManifestError> {
        let invalid = |why: String| ManifestError::Invalid {
            what: what.to_owned(),
            why,
        };
        let (algorithm, hex) = digest
            .split_once(':')
            .ok_or_else(|| invalid(format!("digest {digest:?} has no algorithm")))?;
        if algorithm != "sha256" {
            return Err(invalid(format!(
                "digest algorithm {algorithm:?} is not supported (sha256 only)"
            )));
        }
        Self::from_hex(hex).ok_or_else(|| invalid(format!("malformed digest {digest:?}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where an OCI layout keeps the blob with this digest.
    pub fn blob_path(&self) -> String {
        format!("blobs/sha256/{}", self.0)
    }

    /// Errs unless `actual` (hex) is this digest.
    pub fn check(&self, actual: &str, what: &str) -> Result<(), ManifestError> {
        if self.0 == actual {
            Ok(())
        } else {
            Err(ManifestError::Digest {
                what: what.to_owned(),
                expected: self.0.clone(),
                actual: actual.to_owned(),
            })
        }
    }
}

/// One layer to apply.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// The file in the image that holds it.
    pub member: String,
    /// Digest of the file as stored (compressed, if it is).
    pub digest: Option<Sha256Hex>,
    /// Its size as stored.
    pub size: Option<u64>,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: Option<Sha256Hex>,
}

/// The image chosen from an archive.
#[derive(Debug, Clone)]
pub struct SelectedImage {
    pub format: Format,
    /// Its name (a tag, or its manifest digest if it has none).
    pub name: String,
    /// Bottom layer first.
    pub layers: Vec<LayerBlob>,
    /// Anything worth saying about it (e.g. a foreign architecture).
    pub notes: Vec<String>,
}

/// Whether an image known as `name` is the one `wanted` asks for:
/// `python:3.11` is also `docker.io/library/python:3.11`, and an OCI
/// `ref.name` annotation holding just the tag matches any `NAME:TAG`
/// with that tag.
fn ref_matches(name: &str, wanted: &str) -> bool {
    if name == wanted || name.ends_with(&format!("/{wanted}")) {
        return true;
    }
    if !wanted.contains(':') && (name == format!("{wanted}:latest")) {
        return true;
    }
    !name.contains([':', '/']) && wanted.rsplit_once(':').is_some_and(|(_, tag)| tag == name)
}

/// Picks the one candidate (names, value) that `wanted` names, or the only
/// one when nothing is asked for.
pub(crate) fn select<T>(
    candidates: Vec<(Vec<String>, T)>,
    wanted: Option<&str>,
) -> Result<(String, T), ManifestError> {
    let describe = |c: &[(Vec<String>, T)]| {
        c.iter()
            .map(|(names, _)| {
                names
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "<untagged>".into())
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if candidates.is_empty() {
        return Err(ManifestError::Empty);
    }
    match wanted {
        None if candidates.len() == 1 => {
            let Some((names, value)) = candidates.into_iter().next() else {
                return Err(ManifestError::Empty);
            };
            Ok((names.into_iter().next().unwrap_or_default(), value))
        }
        None => Err(ManifestError::Ambiguous {
            count: candidates.len(),
            names: describe(&candidates),
        }),
        Some(wanted) => {
            let names = describe(&candidates);
            let mut found: Vec<_> = candidates
                .into_iter()
                .filter(|(names, _)| names.iter().any(|n| ref_matches(n, wanted)))
                .collect();
            match found.len() {
                1 => {
                    let (_, value) = found.remove(0);
                    Ok((wanted.to_owned(), value))
                }
                0 => Err(ManifestError::NoSuchRef {
                    wanted: wanted.to_owned(),
                    names,
                }),
                count => Err(ManifestError::Ambiguous {
                    count,
                    names: describe(&found),
                }),
            }
        }
    }
}

/// Reads and parses the JSON file `name`, checking it against `digest`
/// when there is one.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    source: &Source,
    name: &str,
    digest: Option<&Sha256Hex>,
) -> Result<T, ManifestError> {
    let data = source.read_member(name, MAX_JSON_BYTES)?;
    if let Some(digest) = digest {
        digest.check(&sha256_hex(&data), name)?;
    }
    serde_json::from_slice(&data).map_err(|source| ManifestError::Json {
        what: name.to_owned(),
        error: source,
    })
}

/// The config's `rootfs.diff_ids` (one per layer) and platform, as both
/// formats store them.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ImageConfig {
    /// The diff IDs, if there is one per layer.
    pub(crate) fn diff_ids(
        &self,
        layers: usize,
        what: &str,
    ) -> Result<Vec<Option<Sha256Hex>>, ManifestError> {
        match &self.rootfs {
            Some(rootfs) if rootfs.diff_ids.len() == layers => rootfs
                .diff_ids
                .iter()
                .map(|d| Sha256Hex::parse(d, what).map(Some))
                .collect(),
            Some(rootfs) if !rootfs.diff_ids.is_empty() => Err(ManifestError::Invalid {
                what: what.to_owned(),
                why: format!("{} diff_ids for {layers} layers", rootfs.diff_ids.len()),
            }),
            _ => Ok(vec![None; layers]),
        }
    }

    /// A note if the image is not for the guests' platform (linux/amd64).
    pub(crate) fn platform_note(&self) -> Option<String> {
        let arch = self.architecture.as_deref().unwrap_or("amd64");
        let os = self.os.as_deref().unwrap_or("linux");
        (arch != "amd64" || os != "linux").then(|| {
            format!("the image is for {os}/{arch}; ember's guests are linux/amd64: its programs will not run")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert!(ref_matches("python:3.11", "python:3.11"));
        assert!(ref_matches("docker.io/library/python:3.11", "python:3.11"));
        assert!(ref_matches("python:latest", "python"));
        assert!(ref_matches("3.11", "python:3.11"));
        assert!(!ref_matches("python:3.12", "python:3.11"));
        assert!(!ref_matches("mypython:3.11", "python:3.11"));
    }

    #[test]
    fn selection() {
        let two = || vec![(vec!["a:1".to_string()], 1), (vec!["b:2".to_string()], 2)];
        assert!(matches!(
            select(two(), None),
            Err(ManifestError::Ambiguous { count: 2, .. })
        ));
        assert_eq!(select(two(), Some("b:2")).unwrap().1, 2);
        assert!(matches!(
            select(two(), Some("c:3")),
            Err(ManifestError::NoSuchRef { .. })
        ));
        assert_eq!(select(vec![(vec![], 7)], None).unwrap().1, 7);
    }

    #[test]
    fn digests() {
        let hex = "a".repeat(64);
        assert!(Sha256Hex::parse(&format!("sha256:{hex}"), "x").is_ok());
        assert!(Sha256Hex::parse(&format!("sha512:{hex}"), "x").is_err());
        assert!(Sha256Hex::parse("sha256:../../etc/passwd", "x").is_err());
        assert!(Sha256Hex::from_hex(&"A".repeat(64)).is_none());
    }
}
