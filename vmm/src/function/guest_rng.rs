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

use object::elf::PT_LOAD;
use object::read::elf::{ElfFile64, ProgramHeader};
use object::{LittleEndian, Object, ObjectSymbol};
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

/// A 64-bit little-endian ELF file, parsed by `object`, which bounds-checks
/// every offset it reads: a kernel image is a file, and files are
/// untrusted.
struct Elf<'a> {
    file: ElfFile64<'a, LittleEndian>,
}

impl<'a> Elf<'a> {
    fn parse(image: &'a [u8]) -> Option<Self> {
        ElfFile64::parse(image).ok().map(|file| Elf { file })
    }

    /// The value of the first symbol called `name` in the symbol table.
    fn symbol(&self, name: &[u8]) -> Option<u64> {
        self.file
            .symbols()
            .find(|sym| sym.name_bytes() == Ok(name))
            .map(|sym| sym.address())
    }

    /// The physical address a loaded virtual address ends up at.
    fn physical(&self, vaddr: u64) -> Option<u64> {
        let endian = self.file.endian();
        self.file.elf_program_headers().iter().find_map(|seg| {
            (seg.p_type(endian) == PT_LOAD).then_some(())?;
            let delta = vaddr.checked_sub(seg.p_vaddr(endian))?;
            (delta < seg.p_memsz(endian)).then(|| seg.p_paddr(endian).checked_add(delta))?
        })
    }
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
