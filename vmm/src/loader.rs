//! Loading the guest kernel and initramfs into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::boot::{BootEntry, InitrdRegion};
use crate::arch::x86_64::layout;

/// Kernel image formats ember boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A compressed `bzImage` (Linux x86 boot protocol).
    BzImage,
}

/// Offset of the boot protocol's "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;

/// Recognises the kernel format from its first bytes.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, LoaderError> {
    let io = |source| LoaderError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    if file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET)).is_ok()
        && file.read_exact(&mut magic).is_ok()
        && magic == *b"HdrS"
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(LoaderError::UnknownFormat(path.to_path_buf()))
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Where and how the boot vCPU enters it.
    pub entry: BootEntry,
    /// First guest address past the kernel image.
    pub end: GuestAddress,
    /// The bzImage setup header, which the zero page must carry.
    pub setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Loads the kernel at `path` above 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let mut file = File::open(path).map_err(|source| LoaderError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let format = detect_format(&mut file, path)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|source| LoaderError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let himem = GuestAddress(layout::HIMEM_START);
    let load = |e: linux_loader::loader::Error| LoaderError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, Some(himem)).map_err(load)?,
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, Some(himem)).map_err(load)?,
    };
    let entry = BootEntry::from_loader_result(&result).map_err(|e| LoaderError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(LoadedKernel {
        entry,
        end: GuestAddress(result.kernel_end),
        setup_header: result.setup_header,
    })
}

/// Copies the initramfs at `path` to the top of low memory.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: GuestAddress,
) -> Result<InitrdRegion, LoaderError> {
    let io = |source| LoaderError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let size = usize::try_from(size).map_err(|_| LoaderError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
    })?;
    let addr = layout::initrd_load_addr(mem, size, kernel_end).map_err(|_| {
        LoaderError::InitrdTooLarge {
            path: path.to_path_buf(),
            size: size as u64,
        }
    })?;
    mem.read_exact_volatile_from(addr, &mut file, size)
        .map_err(|e| LoaderError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(InitrdRegion { addr, size })
}

/// The kernel or initramfs could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("{0} is not a kernel ember can boot (expected an ELF vmlinux or a bzImage)")]
    UnknownFormat(PathBuf),
    /// linux-loader rejected the image.
    #[error("cannot load kernel {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// linux-loader's reason.
        message: String,
    },
    /// The initramfs does not fit in guest memory.
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory; give the VM more memory"
    )]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, bytes: &[u8]) -> (File, PathBuf) {
        let path = std::env::temp_dir().join(format!("ember-loader-{name}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        (File::open(&path).unwrap(), path)
    }

    #[test]
    fn detects_formats() {
        let (mut f, p) = temp("elf", b"\x7fELF\x02\x01\x01");
        assert_eq!(detect_format(&mut f, &p).unwrap(), KernelFormat::Elf);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let (mut f, p2) = temp("bz", &bz);
        assert_eq!(detect_format(&mut f, &p2).unwrap(), KernelFormat::BzImage);
        let (mut f, p3) = temp("txt", b"#!/bin/sh\necho not a kernel\n");
        let err = detect_format(&mut f, &p3).unwrap_err();
        assert!(err.to_string().contains("is not a kernel ember can boot"));
        for p in [p, p2, p3] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn truncated_elf_is_an_error_not_a_panic() {
        let (_f, p) = temp("trunc", b"\x7fELF\x02\x01\x01\x00");
        let mem = crate::vstate::memory::create_guest_memory(64 << 20).unwrap();
        assert!(matches!(
            load_kernel(&mem, &p),
            Err(LoaderError::Load { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }
}
