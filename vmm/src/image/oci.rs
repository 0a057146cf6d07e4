//! OCI image layouts: `oci-layout`, `index.json` naming manifests (or
//! nested indexes, e.g. one manifest per platform) by digest, and every
//! manifest, config and layer a content-addressed blob under
//! `blobs/sha256/`.

use std::collections::HashMap;

use serde::Deserialize;

use super::manifest::{
    read_json, select, Format, ImageConfig, LayerBlob, ManifestError, SelectedImage, Sha256Hex,
};
use super::source::Source;

/// The file that marks an OCI image layout.
pub const LAYOUT: &str = "oci-layout";

/// The layout's top-level index.
pub const INDEX: &str = "index.json";

/// Nested indexes followed at most.
const MAX_DEPTH: usize = 4;

/// Annotations that name an image.
const NAME_ANNOTATIONS: [&str; 2] = [
    "io.containerd.image.name",
    "org.opencontainers.image.ref.name",
];

#[derive(Debug, Deserialize)]
struct Layout {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

/// An index or a manifest: which one it is shows in what it has.
#[derive(Debug, Deserialize)]
struct Document {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// A manifest found through the index, with the names it goes by.
struct Found {
    digest: Sha256Hex,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// Reads the layout's index and picks the image `wanted` names (for the
/// guests' platform, linux/amd64, where an index lists several).
pub fn read(source: &Source, wanted: Option<&str>) -> Result<SelectedImage, ManifestError> {
    let layout: Layout = read_json(source, LAYOUT, None)?;
    if !layout.version.starts_with("1.") {
        return Err(ManifestError::Invalid {
            what: LAYOUT.into(),
            why: format!("image layout version {:?} is not supported", layout.version),
        });
    }
    let index: Document = read_json(source, INDEX, None)?;
    let mut candidates = Vec::new();
    for desc in index.manifests.unwrap_or_default() {
        collect(source, &desc, Vec::new(), 0, &mut candidates)?;
    }
    let (name, found) = select(candidates, wanted)?;
    let name = if name.is_empty() {
        format!("sha256:{}", found.digest.as_str())
    } else {
        name
    };
    let config_digest = Sha256Hex::parse(&found.config.digest, "the manifest's config")?;
    let config: ImageConfig = read_json(source, &config_digest.blob_path(), Some(&config_digest))?;
    let diff_ids = config.diff_ids(found.layers.len(), "the image config")?;
    let layers = found
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            let digest = Sha256Hex::parse(&layer.digest, "a layer descriptor")?;
            Ok(LayerBlob {
                member: digest.blob_path(),
                digest: Some(digest),
                size: Some(layer.size),
                diff_id,
            })
        })
        .collect::<Result<_, ManifestError>>()?;
    Ok(SelectedImage {
        format: Format::Oci,
        name,
        layers,
        notes: config.platform_note().into_iter().collect(),
    })
}

/// Adds the manifests `desc` leads to (itself, or through an index) to
/// `out`, each with its names and those of the descriptors above it.
fn collect(
    source: &Source,
    desc: &Descriptor,
    mut names: Vec<String>,
    depth: usize,
    out: &mut Vec<(Vec<String>, Found)>,
) -> Result<(), ManifestError> {
    if let Some(p) = &desc.platform {
        if p.os != "linux" || p.architecture != "amd64" {
            return Ok(());
        }
    }
    for key in NAME_ANNOTATIONS {
        if let Some(name) = desc.annotations.get(key) {
            names.insert(0, name.clone());
        }
    }
    let digest = Sha256Hex::parse(&desc.digest, "a descriptor in the index")?;
    let doc: Document = read_json(source, &digest.blob_path(), Some(&digest))?;
    if let Some(children) = doc.manifests {
        if depth >= MAX_DEPTH {
            return Err(ManifestError::Invalid {
                what: digest.blob_path(),
                why: format!("indexes nested deeper than {MAX_DEPTH}"),
            });
        }
        for child in &children {
            collect(source, child, names.clone(), depth + 1, out)?;
        }
        return Ok(());
    }
    let (Some(config), Some(layers)) = (doc.config, doc.layers) else {
        return Err(ManifestError::Invalid {
            what: digest.blob_path(),
            why: format!(
                "neither an index nor an image manifest (media type {})",
                desc.media_type.as_deref().unwrap_or("not given")
            ),
        });
    };
    out.push((
        names,
        Found {
            digest,
            config,
            layers,
        },
    ));
    Ok(())
}
