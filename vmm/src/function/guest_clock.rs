//! Setting a clone's wall clock to the host's without running the guest
//! kernel.
//!
//! A clone resumes with kvm-clock at the snapshot's value (its monotonic
//! clock continues from the snapshot instant), so its wall clock would be
//! the snapshot's: minutes or days behind. The vsock path lets the agent
//! set the time, but a hot-path invocation never enters the guest kernel.
//! So the host does what `settimeofday()` does, in guest memory, before the
//! clone runs: it shifts the wall-clock bases of the vDSO data page (what
//! `clock_gettime(CLOCK_REALTIME)`, `time.time()` and `datetime.now()`
//! read, with no system call) and of the kernel's timekeeper and its shadow
//! copy (so the kernel's next timekeeping update keeps the new time instead
//! of writing the old one back). The monotonic clock is not touched.
//!
//! Layouts are Linux 6.1's (`include/vdso/datapage.h`,
//! `include/linux/timekeeper_internal.h`), for ember's own kernel; the
//! addresses come from the kernel image's symbol table. Before writing a
//! timekeeper, its fields are checked against the vDSO page the kernel
//! derived from it (same clock multiplier, shift, cycle count and seconds);
//! a timekeeper that does not match is left alone, and a vDSO page whose
//! multiplier or shift is zero is not written at all. Not adjusted: timers
//! armed on `CLOCK_REALTIME` in the snapshot (the kernel's hrtimer offsets
//! catch up at its next clock change).

use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::guest_rng::find_symbols;
use crate::snapshot::GuestWrite;

/// `struct vdso_data`: `clock_mode`, `cycle_last`, `mult`, `shift`,
/// `basetime[]`; two of them, high-resolution then raw, 240 bytes each.
const VD_CLOCK_MODE: u64 = 4;
const VD_CYCLE_LAST: u64 = 8;
const VD_MULT: u64 = 24;
const VD_SHIFT: u64 = 28;
const VD_BASETIME: u64 = 32;
/// `struct vdso_timestamp` is `{ u64 sec; u64 nsec; }`.
const TIMESTAMP_LEN: u64 = 16;
const VD_SIZE: u64 = 240;
const CLOCK_REALTIME: u64 = 0;
const CLOCK_MONOTONIC: u64 = 1;
const CLOCK_MONOTONIC_RAW: u64 = 4;
const CLOCK_REALTIME_COARSE: u64 = 5;
const CLOCK_BOOTTIME: u64 = 7;
const CLOCK_TAI: u64 = 11;
/// `enum vdso_clock_mode` on x86.
const CLOCKMODE_TSC: u32 = 1;
const CLOCKMODE_PVCLOCK: u32 = 2;

/// `struct timekeeper` (`tkr_mono` first).
const TK_CYCLE_LAST: u64 = 16;
const TK_MULT: u64 = 24;
const TK_SHIFT: u64 = 28;
const TK_XTIME_NSEC: u64 = 32;
const TK_BASE_REAL: u64 = 48;
const TK_XTIME_SEC: u64 = 112;
const TK_WALL_TO_MONO_SEC: u64 = 128;
const TK_WALL_TO_MONO_NSEC: u64 = 136;
const TK_OFFS_REAL: u64 = 144;
const TK_OFFS_TAI: u64 = 160;
/// `tk_core` is `{ seqcount_raw_spinlock_t seq; struct timekeeper
/// timekeeper; }`; without lockdep or PREEMPT_RT the count is 4 bytes and
/// the timekeeper 8-aligned.
const TK_CORE_TIMEKEEPER: u64 = 8;

const NSEC_PER_SEC: i128 = 1_000_000_000;

/// What the guest's clock sources read when a clone starts.
#[derive(Debug, Clone, Copy)]
pub struct ClockReading {
    /// kvm-clock, guest nanoseconds (the snapshot's value: set at start).
    pub kvmclock_ns: u64,
    /// The guest's TSC now, if it could be read.
    pub tsc: Option<u64>,
}

/// Where a guest kernel keeps its wall clock (guest-physical addresses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestClock {
    /// `_vdso_data[0]` (the high-resolution and coarse clocks).
    pub vdso_data: u64,
    /// `tk_core.timekeeper` and `shadow_timekeeper`, where found.
    pub timekeepers: Vec<u64>,
}

impl GuestClock {
    /// Finds the clock's data in an ELF `vmlinux`; `None` without the vDSO
    /// data symbol.
    pub fn find(vmlinux: &Path) -> Option<GuestClock> {
        let found = find_symbols(vmlinux, &[b"_vdso_data", b"tk_core", b"shadow_timekeeper"]);
        let vdso_data = (*found.first()?)?;
        let mut timekeepers = Vec::new();
        if let Some(Some(core)) = found.get(1) {
            timekeepers.push(core + TK_CORE_TIMEKEEPER);
        }
        if let Some(Some(shadow)) = found.get(2) {
            timekeepers.push(*shadow);
        }
        Some(GuestClock {
            vdso_data,
            timekeepers,
        })
    }

    /// The addresses, for a manifest's bounds check.
    pub fn addresses(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.vdso_data).chain(self.timekeepers.iter().copied())
    }

    /// The writes that move the wall clock of a clone whose memory is
    /// `memory` (the template's content at these addresses) and whose clock
    /// sources read `reading` to `host_unix_ns`. The vDSO bases are also
    /// rebased to `reading`, so the guest's first clock reads compute a
    /// short interval (an interval as long as the snapshot's age would
    /// overflow the vDSO's 64-bit arithmetic after tens of minutes).
    /// Empty when the page does not look like a vDSO data page, its clock
    /// source cannot be read, or the clock is already right to within a
    /// millisecond.
    pub fn sync_writes(
        &self,
        memory: &GuestMemoryMmap,
        reading: ClockReading,
        host_unix_ns: u64,
    ) -> Vec<GuestWrite> {
        let read = |addr: u64| -> Option<u64> {
            let mut b = [0u8; 8];
            memory.read_slice(&mut b, GuestAddress(addr)).ok()?;
            Some(u64::from_le_bytes(b))
        };
        let read32 = |addr: u64| -> Option<u32> {
            let mut b = [0u8; 4];
            memory.read_slice(&mut b, GuestAddress(addr)).ok()?;
            Some(u32::from_le_bytes(b))
        };
        let vd = self.vdso_data;
        let (Some(mode), Some(cycle_last), Some(mult), Some(shift)) = (
            read32(vd + VD_CLOCK_MODE),
            read(vd + VD_CYCLE_LAST),
            read32(vd + VD_MULT),
            read32(vd + VD_SHIFT),
        ) else {
            return Vec::new();
        };
        let now_cycles = match (mode, reading.tsc) {
            (CLOCKMODE_PVCLOCK, _) => reading.kvmclock_ns,
            (CLOCKMODE_TSC, Some(tsc)) => tsc,
            _ => return Vec::new(),
        };
        if mult == 0 || shift == 0 || shift > 32 {
            return Vec::new();
        }
        let realtime = vd + VD_BASETIME + CLOCK_REALTIME * TIMESTAMP_LEN;
        let (Some(sec), Some(nsec_shifted)) = (read(realtime), read(realtime + 8)) else {
            return Vec::new();
        };
        // Since the last update, in shifted nanoseconds (the vDSO's own
        // arithmetic, without its overflow).
        let elapsed = i128::from(now_cycles.wrapping_sub(cycle_last) as i64) * i128::from(mult);
        let guest_ns =
            i128::from(sec) * NSEC_PER_SEC + ((i128::from(nsec_shifted) + elapsed) >> shift);
        let offset = i128::from(host_unix_ns) - guest_ns;
        if offset.abs() < 1_000_000 && elapsed.abs() < (NSEC_PER_SEC << shift) {
            return Vec::new();
        }
        let mut writes = vec![write_u64(vd + VD_CYCLE_LAST, now_cycles)];
        // High-resolution bases (shifted nanoseconds) move to now; the
        // wall-clock ones also by the offset. The coarse wall clock (plain
        // nanoseconds, no clock source) only by the offset.
        for (clock, wall) in [
            (CLOCK_REALTIME, true),
            (CLOCK_MONOTONIC, false),
            (CLOCK_BOOTTIME, false),
            (CLOCK_TAI, true),
        ] {
            let at = vd + VD_BASETIME + clock * TIMESTAMP_LEN;
            let (Some(s), Some(n)) = (read(at), read(at + 8)) else {
                continue;
            };
            let by = elapsed + if wall { offset << shift } else { 0 };
            let (s, n) = add_shifted(s, n, shift, by);
            writes.push(write_u64(at, s));
            writes.push(write_u64(at + 8, n));
        }
        let coarse = vd + VD_BASETIME + CLOCK_REALTIME_COARSE * TIMESTAMP_LEN;
        if let (Some(s), Some(n)) = (read(coarse), read(coarse + 8)) {
            let (s, n) = add_shifted(s, n, 0, offset);
            writes.push(write_u64(coarse, s));
            writes.push(write_u64(coarse + 8, n));
        }
        // The raw clock has its own page entry, rebased the same way when
        // it is there.
        let raw = vd + VD_SIZE;
        if let (Some(m), Some(raw_mult), Some(raw_shift), Some(raw_last)) = (
            read32(raw + VD_CLOCK_MODE),
            read32(raw + VD_MULT),
            read32(raw + VD_SHIFT),
            read(raw + VD_CYCLE_LAST),
        ) {
            let at = raw + VD_BASETIME + CLOCK_MONOTONIC_RAW * TIMESTAMP_LEN;
            if let (true, Some(s), Some(n)) = (
                m == mode && raw_mult != 0 && (1..=32).contains(&raw_shift),
                read(at),
                read(at + 8),
            ) {
                let by =
                    i128::from(now_cycles.wrapping_sub(raw_last) as i64) * i128::from(raw_mult);
                let (s, n) = add_shifted(s, n, raw_shift, by);
                writes.push(write_u64(raw + VD_CYCLE_LAST, now_cycles));
                writes.push(write_u64(at, s));
                writes.push(write_u64(at + 8, n));
            }
        }
        // The kernel's timekeepers keep their own last reading (the kernel
        // accumulates the interval itself at its next update); only their
        // wall-clock fields move.
        for &tk in &self.timekeepers {
            let consistent = read(tk + TK_CYCLE_LAST) == Some(cycle_last)
                && read32(tk + TK_MULT) == Some(mult)
                && read32(tk + TK_SHIFT) == Some(shift)
                && read(tk + TK_XTIME_SEC) == Some(sec)
                && read(tk + TK_XTIME_NSEC) == Some(nsec_shifted);
            if !consistent {
                log::debug!("guest clock: timekeeper at {tk:#x} does not match the vDSO page");
                continue;
            }
            let (s, n) = add_shifted(sec, nsec_shifted, shift, offset << shift);
            writes.push(write_u64(tk + TK_XTIME_SEC, s));
            writes.push(write_u64(tk + TK_XTIME_NSEC, n));
            if let (Some(w_sec), Some(w_nsec)) = (
                read(tk + TK_WALL_TO_MONO_SEC),
                read(tk + TK_WALL_TO_MONO_NSEC),
            ) {
                let total =
                    i128::from(w_sec as i64) * NSEC_PER_SEC + i128::from(w_nsec as i64) - offset;
                let (q, r) = (
                    total.div_euclid(NSEC_PER_SEC),
                    total.rem_euclid(NSEC_PER_SEC),
                );
                writes.push(write_u64(tk + TK_WALL_TO_MONO_SEC, q as i64 as u64));
                writes.push(write_u64(tk + TK_WALL_TO_MONO_NSEC, r as u64));
            }
            for field in [TK_OFFS_REAL, TK_OFFS_TAI, TK_BASE_REAL] {
                if let Some(v) = read(tk + field) {
                    let moved = i128::from(v as i64) + offset;
                    writes.push(write_u64(tk + field, moved as i64 as u64));
                }
            }
        }
        writes
    }
}

/// `(sec, nsec)` plus `by`, both nanoseconds shifted left by `shift`,
/// normalised so that the nanoseconds stay within a second.
fn add_shifted(sec: u64, nsec: u64, shift: u32, by: i128) -> (u64, u64) {
    let per_sec = NSEC_PER_SEC << shift;
    let total = (i128::from(sec) * per_sec + i128::from(nsec) + by).max(0);
    ((total / per_sec) as u64, (total % per_sec) as u64)
}

fn write_u64(addr: u64, value: u64) -> GuestWrite {
    GuestWrite {
        addr,
        bytes: value.to_le_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanoseconds_carry_into_seconds() {
        assert_eq!(
            add_shifted(10, 900_000_000, 0, 200_000_000),
            (11, 100_000_000)
        );
        assert_eq!(
            add_shifted(10, 100 << 8, 8, -200 << 8),
            (9, (NSEC_PER_SEC as u64 - 100) << 8)
        );
        assert_eq!(add_shifted(10, 0, 0, 5 * NSEC_PER_SEC), (15, 0));
    }

    #[test]
    fn the_vdso_page_and_timekeepers_move_together() {
        use crate::vstate::memory::create_guest_memory;
        let memory = create_guest_memory(16 << 20).unwrap();
        let vd = 0x10_0000u64;
        let tk = 0x20_0000u64;
        let shift = 8u32;
        let put = |addr: u64, v: u64| {
            memory
                .write_slice(&v.to_le_bytes(), GuestAddress(addr))
                .unwrap()
        };
        let put32 = |addr: u64, v: u32| {
            memory
                .write_slice(&v.to_le_bytes(), GuestAddress(addr))
                .unwrap()
        };
        let get = |addr: u64| {
            let mut b = [0u8; 8];
            memory.read_slice(&mut b, GuestAddress(addr)).unwrap();
            u64::from_le_bytes(b)
        };
        // A guest at 1000 s of wall time and 10 s of monotonic time, its
        // TSC (1 cycle per ns) read 5000 at the last update.
        put32(vd + VD_CLOCK_MODE, CLOCKMODE_TSC);
        put(vd + VD_CYCLE_LAST, 5000);
        put32(vd + VD_MULT, 1 << shift);
        put32(vd + VD_SHIFT, shift);
        put(vd + VD_BASETIME, 1000);
        put(vd + VD_BASETIME + CLOCK_MONOTONIC * TIMESTAMP_LEN, 10);
        put(tk + TK_CYCLE_LAST, 5000);
        put32(tk + TK_MULT, 1 << shift);
        put32(tk + TK_SHIFT, shift);
        put(tk + TK_XTIME_SEC, 1000);
        put(tk + TK_WALL_TO_MONO_SEC, (-990i64) as u64);
        let clock = GuestClock {
            vdso_data: vd,
            timekeepers: vec![tk],
        };
        // The TSC is 1 s past the last update; the host is at 2000.5 s.
        let reading = ClockReading {
            kvmclock_ns: 0,
            tsc: Some(5000 + 1_000_000_000),
        };
        let writes = clock.sync_writes(&memory, reading, 2_000_500_000_000);
        for w in &writes {
            memory.write_slice(&w.bytes, GuestAddress(w.addr)).unwrap();
        }
        // The vDSO is rebased to now: the host's wall time, 11 s of
        // monotonic time.
        assert_eq!(get(vd + VD_CYCLE_LAST), 5000 + 1_000_000_000);
        assert_eq!(get(vd + VD_BASETIME), 2000);
        assert_eq!(get(vd + VD_BASETIME + 8), 500_000_000 << shift);
        assert_eq!(get(vd + VD_BASETIME + CLOCK_MONOTONIC * TIMESTAMP_LEN), 11);
        // The timekeeper keeps its reading; its wall clock moved by 999.5 s.
        assert_eq!(get(tk + TK_CYCLE_LAST), 5000);
        assert_eq!(get(tk + TK_XTIME_SEC), 1999);
        assert_eq!(get(tk + TK_XTIME_NSEC), 500_000_000 << shift);
        assert_eq!(get(tk + TK_WALL_TO_MONO_SEC) as i64, -1990);
        assert_eq!(get(tk + TK_WALL_TO_MONO_NSEC), 500_000_000);
        // Already right and rebased: nothing to write.
        assert!(clock
            .sync_writes(&memory, reading, 2_000_500_000_000)
            .is_empty());
        // An unknown clock source: nothing is written.
        put32(vd + VD_CLOCK_MODE, 3);
        assert!(clock
            .sync_writes(&memory, reading, 9_000_000_000_000)
            .is_empty());
    }
}
