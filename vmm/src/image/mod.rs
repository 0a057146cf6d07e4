//! Container images as read-only root drives (`ember image import`).
//!
//! A `docker save` archive or an OCI image layout (a directory, or packed
//! as a tar) becomes an ext4 image for `--image`: [`source`] reads the
//! archive, [`docker`] and [`oci`] pick the image and its layers,
//! [`layers`] applies them in order into a staging directory (whiteouts,
//! hard links, nothing resolved outside the staging root), and [`ext4`]
//! makes the file system. [`import()`] puts them together.
//!
//! ```no_run
//! use ember::image::{import, ImportOptions};
//! let report = import("app.tar".as_ref(), "app.ext4".as_ref(), &ImportOptions::default())?;
//! println!("{} layers, {} bytes", report.layers, report.image_bytes);
//! # Ok::<(), ember::image::ImportError>(())
//! ```

mod digest;
pub mod docker;
pub mod ext4;
mod fsat;
mod import;
pub mod layers;
pub mod manifest;
pub mod oci;
pub mod source;

#[cfg(test)]
mod tests;

pub use import::{import, ImportError, ImportOptions, ImportReport};
pub use layers::Limits;
pub use manifest::Format;
