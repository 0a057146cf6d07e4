//! `ember image import`: container images to root images for `--image`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use ember::image::{self, ImportOptions, Limits};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Convert a container image (a `docker save` archive, or an OCI image
    /// layout as a directory or a tar) into a read-only ext4 root for
    /// `--image`: layers applied in order, whiteouts honoured, devices
    /// skipped
    Import(ImportArgs),
}

#[derive(Args)]
pub struct ImportArgs {
    /// The image: IMAGE.tar (`docker save`, or an OCI layout packed as a
    /// tar) or an OCI layout directory
    input: PathBuf,
    /// The ext4 image to write (a regular file there is replaced)
    #[arg(long)]
    out: PathBuf,
    /// Which image, if the archive holds several
    #[arg(long = "ref", value_name = "NAME:TAG")]
    reference: Option<String>,
    /// Most bytes of file contents in all layers together
    #[arg(long, default_value_t = Limits::default().max_bytes)]
    max_bytes: u64,
    /// Most entries in all layers together
    #[arg(long, default_value_t = Limits::default().max_entries)]
    max_entries: u64,
}

pub fn run(command: ImageCommand) -> Result<ExitCode> {
    match command {
        ImageCommand::Import(args) => import(args),
    }
}

fn import(args: ImportArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let options = ImportOptions {
        reference: args.reference,
        limits: Limits {
            max_bytes: args.max_bytes,
            max_entries: args.max_entries,
        },
        ..ImportOptions::default()
    };
    let report = image::import(&args.input, &args.out, &options)
        .with_context(|| format!("cannot import {}", args.input.display()))?;
    for note in &report.notes {
        eprintln!("ember: note: {note}");
    }
    let s = &report.stats;
    eprintln!(
        "ember: imported {} ({}, {} layers: {} files, {} directories, {} symlinks, {} hard links, {} whiteouts; {:.1} MB) into {} ({} MiB ext4) in {:.1} s",
        report.image,
        report.format,
        report.layers,
        s.files,
        s.dirs,
        s.symlinks,
        s.hard_links,
        s.whiteouts,
        s.bytes as f64 / 1e6,
        args.out.display(),
        report.image_bytes >> 20,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
