//! Reseeding a clone's kernel random number generator without running the
//! guest kernel.
//!
//! Every clone of a snapshot starts with the same kernel CRNG state, so
//! without a reseed two clones would read the same `getrandom()` bytes. The
//! vsock path reseeds through the agent (`RNDADDENTROPY`), but a hot-path
//! invocation never enters the guest kernel, so the host does what
//! `crng_reseed()` does, in guest memory, before the clone runs: it writes a
//! fresh random key into Linux's `base_crng` and bumps its generation, which
//! makes every per-CPU CRNG (and the batched `get_random_u*` state) re-key
//! from it on next use. The same thing a VM-generation-ID device triggers,
//! minus the guest work.
//!
//! This depends on the layout of `base_crng` in `drivers/char/random.c`
//! (Linux 5.18 to 6.x: `u8 key[32]` aligned to `long`, `unsigned long
//! birth`, `unsigned long generation`, `spinlock_t lock`); the address comes
//! from the kernel image's symbol table, so kernels without one (bzImage)
//! only get the vsock path's reseed.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::snapshot::GuestWrite;

/// Bytes of `base_crng.key`.
pub const KEY_LEN: usize = 32;
/// Offset of `base_crng.generation`.
const GENERATION_OFFSET: u64 = 40;
/// The symbol.
const SYMBOL: &[u8] = b"base_crng";

/// Where a guest kernel keeps its CRNG base state, and the generation the
/// snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRng {
    /// Guest-physical address of `base_crng`.
    pub addr: u64,
    /// `base_crng.generation` in the snapshot.
    pub generation: u64,
}

impl GuestRng {
    /// The writes that give a clone a fresh CRNG: `key` as the base key and
    /// the next generation (skipping `ULONG_MAX`, which marks a per-CPU CRNG
    /// that was never keyed).
    pub fn reseed_writes(&self, key: [u8; KEY_LEN]) -> Vec<GuestWrite> {
        let mut next = self.generation.wrapping_add(1);
        if next == u64::MAX {
            next = next.wrapping_add(1);
        }
        vec![
            GuestWrite {
                addr: self.addr,
                bytes: key.to_vec(),
            },
            GuestWrite {
                addr: self.addr + GENERATION_OFFSET,
                bytes: next.to_le_bytes().to_vec(),
            },
        ]
    }

    /// Where the generation lives (read from a paused template).
    pub fn generation_addr(addr: u64) -> u64 {
        addr + GENERATION_OFFSET
    }
}

/// Finds the guest-physical address of `base_crng` in an ELF `vmlinux`;
/// `None` if the file is not a 64-bit ELF with that symbol in a loaded
/// segment.
pub fn find_base_crng(vmlinux: &Path) -> Option<u64> {
    let image = std::fs::read(vmlinux).ok()?;
    let elf = Elf::parse(&image)?;
    let vaddr = elf.symbol(SYMBOL)?;
    elf.physical(vaddr)
}

/// The guest-physical addresses of `names` in an ELF `vmlinux` (`None`
/// for each one missing; all `None` if the file is not such an ELF).
pub fn find_symbols(vmlinux: &Path, names: &[&[u8]]) -> Vec<Option<u64>> {
    let image = std::fs::read(vmlinux).unwrap_or_default();
    let elf = Elf::parse(&image);
    names
        .iter()
        .map(|name| {
            let elf = elf.as_ref()?;
            elf.physical(elf.symbol(name)?)
        })
        .collect()
}

/// The few parts of an ELF64 little-endian file this needs. Every offset
/// read from the file is bounds-checked: a kernel image is a file, and
/// files are untrusted.
struct Elf<'a> {
    image: &'a [u8],
    sections: Vec<Section>,
    segments: Vec<Segment>,
}

struct Section {
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
}

struct Segment {
    vaddr: u64,
    paddr: u64,
    memsz: u64,
}

const SHT_SYMTAB: u32 = 2;
const PT_LOAD: u32 = 1;
const SYM_SIZE: usize = 24;

impl<'a> Elf<'a> {
    fn parse(image: &'a [u8]) -> Option<Self> {
        if image.get(..4)? != b"\x7fELF" || *image.get(4)? != 2 || *image.get(5)? != 1 {
            return None;
        }
        let phoff = u64_at(image, 0x20)?;
        let shoff = u64_at(image, 0x28)?;
        let phentsize = u64::from(u16_at(image, 0x36)?);
        let phnum = u64::from(u16_at(image, 0x38)?);
        let shentsize = u64::from(u16_at(image, 0x3a)?);
        let shnum = u64::from(u16_at(image, 0x3c)?);
        let segments = (0..phnum)
            .filter_map(|i| {
                let at = usize::try_from(phoff.checked_add(i.checked_mul(phentsize)?)?).ok()?;
                (u32_at(image, at)? == PT_LOAD).then_some(())?;
                Some(Segment {
                    vaddr: u64_at(image, at.checked_add(16)?)?,
                    paddr: u64_at(image, at.checked_add(24)?)?,
                    memsz: u64_at(image, at.checked_add(40)?)?,
                })
            })
            .collect();
        let sections = (0..shnum)
            .map(|i| {
                let at = usize::try_from(shoff.checked_add(i.checked_mul(shentsize)?)?).ok()?;
                Some(Section {
                    kind: u32_at(image, at.checked_add(4)?)?,
                    offset: u64_at(image, at.checked_add(0x18)?)?,
                    size: u64_at(image, at.checked_add(0x20)?)?,
                    link: u32_at(image, at.checked_add(0x28)?)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Elf {
            image,
            sections,
            segments,
        })
    }

    fn bytes(&self, offset: u64, size: u64) -> Option<&'a [u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        self.image.get(start..end)
    }

    /// The value of the first symbol called `name` in the symbol table.
    fn symbol(&self, name: &[u8]) -> Option<u64> {
        let symtab = self.sections.iter().find(|s| s.kind == SHT_SYMTAB)?;
        let strtab = self.sections.get(usize::try_from(symtab.link).ok()?)?;
        let symbols = self.bytes(symtab.offset, symtab.size)?;
        let strings = self.bytes(strtab.offset, strtab.size)?;
        symbols.chunks_exact(SYM_SIZE).find_map(|sym| {
            let name_at = usize::try_from(u32_at(sym, 0)?).ok()?;
            let rest = strings.get(name_at..)?;
            let end = rest.iter().position(|&b| b == 0)?;
            (rest.get(..end)? == name).then(|| u64_at(sym, 8))?
        })
    }

    /// The physical address a loaded virtual address ends up at.
    fn physical(&self, vaddr: u64) -> Option<u64> {
        self.segments.iter().find_map(|seg| {
            let delta = vaddr.checked_sub(seg.vaddr)?;
            (delta < seg.memsz).then(|| seg.paddr.checked_add(delta))?
        })
    }
}

fn bytes_at<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    bytes_at(buf, at).map(u16::from_le_bytes)
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    bytes_at(buf, at).map(u32::from_le_bytes)
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    bytes_at(buf, at).map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reseed_writes_skip_the_never_keyed_generation() {
        let rng = GuestRng {
            addr: 0x1000,
            generation: u64::MAX - 1,
        };
        let writes = rng.reseed_writes([7; KEY_LEN]);
        assert_eq!(writes[0].addr, 0x1000);
        assert_eq!(writes[0].bytes, vec![7; KEY_LEN]);
        assert_eq!(writes[1].addr, 0x1000 + 40);
        assert_eq!(writes[1].bytes, 0u64.to_le_bytes());
        let rng = GuestRng {
            addr: 0,
            generation: 5,
        };
        assert_eq!(rng.reseed_writes([0; KEY_LEN])[1].bytes, 6u64.to_le_bytes());
    }

    #[test]
    fn garbage_is_not_an_elf() {
        assert!(Elf::parse(b"").is_none());
        assert!(Elf::parse(b"\x7fELF\x02\x01").is_none());
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        // Section table far past the end of the file.
        header[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        header[0x3c] = 3;
        assert!(Elf::parse(&header).is_none());
    }

    #[test]
    fn finds_a_symbol_in_this_test_binary() {
        // The test binary is an ELF64 with a symbol table; `main` is in it.
        let exe = std::env::current_exe().unwrap();
        let image = std::fs::read(exe).unwrap();
        let elf = Elf::parse(&image).unwrap();
        assert!(elf.symbol(b"main").is_some());
        assert!(elf.symbol(b"no such symbol, surely").is_none());
    }

    #[test]
    fn finds_base_crng_in_the_cached_guest_kernel() {
        let vmlinux = crate::paths::default_kernel();
        assert!(
            vmlinux.exists(),
            "{} is missing: run scripts/setup to build the guest kernel",
            vmlinux.display()
        );
        let addr = find_base_crng(&vmlinux).expect("base_crng in vmlinux");
        // Physical, inside the kernel image loaded at 16 MiB.
        assert!((16 << 20..1 << 30).contains(&addr), "{addr:#x}");
    }
}
