//! `docker save` archives: `manifest.json` lists each image's config
//! file, tags and layer files, bottom layer first.

use serde::Deserialize;

use super::manifest::{
    read_json, select, Format, ImageConfig, LayerBlob, ManifestError, SelectedImage, Sha256Hex,
};
use super::source::{normalize_name, Source};

/// The file that marks a `docker save` archive.
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The digest a member name carries: `blobs/sha256/HEX` (Docker 25 and
/// later) or a legacy config `HEX.json`.
fn digest_in_name(name: &str) -> Option<Sha256Hex> {
    let name = normalize_name(name);
    name.strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))
        .and_then(Sha256Hex::from_hex)
}

/// Reads `manifest.json` and picks the image `wanted` names.
pub fn read(source: &Source, wanted: Option<&str>) -> Result<SelectedImage, ManifestError> {
    let entries: Vec<Entry> = read_json(source, MANIFEST, None)?;
    let candidates = entries
        .into_iter()
        .map(|e| (e.repo_tags.clone().unwrap_or_default(), e))
        .collect();
    let (name, entry) = select(candidates, wanted)?;
    let config_digest = digest_in_name(&entry.config);
    let config: ImageConfig = read_json(source, &entry.config, config_digest.as_ref())?;
    let diff_ids = config.diff_ids(entry.layers.len(), &entry.config)?;
    let layers = entry
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(member, diff_id)| LayerBlob {
            member: normalize_name(member),
            digest: digest_in_name(member).filter(|_| !member.ends_with(".json")),
            size: None,
            diff_id,
        })
        .collect();
    let name = if name.is_empty() {
        config_digest.map_or_else(
            || "<untagged>".to_owned(),
            |d| format!("sha256:{}", d.as_str()),
        )
    } else {
        name
    };
    Ok(SelectedImage {
        format: Format::DockerSave,
        name,
        layers,
        notes: config.platform_note().into_iter().collect(),
    })
}
