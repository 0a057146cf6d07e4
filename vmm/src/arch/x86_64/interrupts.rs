//! Local APIC setup: LINT0 and LINT1 wired as on a PC.
//!
//! The MP table says the legacy PIC reaches the BSP through LINT0 (ExtINT)
//! and NMIs arrive on LINT1; the LAPIC's local vector table must agree.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Errors programming the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// `KVM_GET_LAPIC` failed (there is no in-kernel irqchip yet?).
    #[error("cannot get the local APIC state: {0}")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("cannot set the local APIC state: {0}")]
    SetLapic(#[source] kvm_ioctls::Error),
}

/// Offset of the LVT LINT0 register in the APIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// Delivery mode field of an LVT register (bits 10..8).
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;

/// Offset of the LVT timer register.
const APIC_LVTT: usize = 0x320;
/// Offset of the timer's initial count register.
const APIC_TMICT: usize = 0x380;
/// Offset of the timer's current count register.
const APIC_TMCCT: usize = 0x390;
/// Offset of the timer's divide configuration register.
const APIC_TDCR: usize = 0x3e0;
/// LVT mask bit.
const APIC_LVT_MASKED: u32 = 1 << 16;
/// LVT timer mode field (bits 18..17); 0 is one-shot.
const APIC_LVTT_MODE_MASK: u32 = 3 << 17;

const _: () = assert!(APIC_TDCR + 4 <= std::mem::size_of::<kvm_lapic_state>());

/// Reads the 32-bit APIC register at `offset` (little-endian, as KVM lays them out).
///
/// Would panic if `offset + 4` were past the 1 KiB register page: it is
/// private, only called with the constant offsets above, which a
/// compile-time check keeps in range.
fn get_lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let r = &lapic.regs[offset..offset + 4];
    // `regs` is `c_char`: reinterpret each byte as unsigned.
    u32::from_le_bytes([r[0] as u8, r[1] as u8, r[2] as u8, r[3] as u8])
}

/// Writes the 32-bit APIC register at `offset`. Same bounds as [`get_lapic_reg`].
fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as libc::c_char;
    }
}

/// `reg` with its delivery mode replaced by `mode`.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !APIC_DELIVERY_MODE_MASK) | ((mode << 8) & APIC_DELIVERY_MODE_MASK)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a LAPIC state, leaving the
/// other bits of those registers (mask, trigger, vector) as they were.
pub fn configure_lint(lapic: &mut kvm_lapic_state) {
    let lint0 = get_lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(
        lapic,
        APIC_LVT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = get_lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, with_delivery_mode(lint1, APIC_MODE_NMI));
}

/// Pushes an armed one-shot LAPIC timer out to at least `delay_ns` from the
/// moment the state is loaded, in a saved LAPIC state; returns whether it
/// did.
///
/// A restored clone that lives for one short invocation then takes no
/// timer interrupt at all (on PVM hosts each costs ~2 ms of emulated
/// kernel work); a clone that lives longer gets its tick late, once, and
/// carries on. KVM restarts the timer from the saved current count, capped
/// at the initial count, so both are raised. Periodic and TSC-deadline
/// timers are left alone (ember's PVM guests run one-shot with
/// `lapic=notscdeadline`; on hardware KVM a tick is cheap).
pub fn postpone_oneshot_timer(lapic: &mut kvm_lapic_state, delay_ns: u64) -> bool {
    let lvtt = get_lapic_reg(lapic, APIC_LVTT);
    let armed = get_lapic_reg(lapic, APIC_TMICT) != 0;
    if lvtt & APIC_LVT_MASKED != 0 || lvtt & APIC_LVTT_MODE_MASK != 0 || !armed {
        return false;
    }
    // KVM counts one APIC bus cycle per nanosecond, times the divider:
    // TDCR bits 0, 1 and 3 encode 2^(n+1), with 0b111 meaning 1.
    let tdcr = get_lapic_reg(lapic, APIC_TDCR);
    let code = (tdcr & 3) | ((tdcr >> 1) & 4);
    let divide = if code == 7 { 1 } else { 2u64 << code };
    let count = u32::try_from(delay_ns / divide).unwrap_or(u32::MAX).max(1);
    if get_lapic_reg(lapic, APIC_TMCCT) >= count {
        return false;
    }
    set_lapic_reg(lapic, APIC_TMICT, count);
    set_lapic_reg(lapic, APIC_TMCCT, count);
    true
}

/// Programs LINT0/LINT1 of `vcpu`'s local APIC. Needs the in-kernel irqchip,
/// so call it after `KVM_CREATE_IRQCHIP`.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), InterruptError> {
    let mut lapic = vcpu.get_lapic().map_err(InterruptError::GetLapic)?;
    configure_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(InterruptError::SetLapic)
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;

    use super::*;

    #[test]
    fn reg_round_trip() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, 0x340, 0x8000_00ff);
        assert_eq!(get_lapic_reg(&lapic, 0x340), 0x8000_00ff);
        assert_eq!(lapic.regs[0x340] as u8, 0xff);
        assert_eq!(lapic.regs[0x343] as u8, 0x80);
    }

    #[test]
    fn delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        // Masked, level-triggered, some vector, fixed delivery mode.
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_80ab);
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x0001_0000 | 0x500);
        configure_lint(&mut lapic);
        assert_eq!(get_lapic_reg(&lapic, APIC_LVT0), 0x0001_87ab);
        assert_eq!(get_lapic_reg(&lapic, APIC_LVT1), 0x0001_0400);
    }

    #[test]
    fn postpones_only_armed_oneshot_timers() {
        let mut lapic = kvm_lapic_state::default();
        // One-shot, vector 0xec, divide by 16 (TDCR 0b011), 1 ms left.
        set_lapic_reg(&mut lapic, APIC_LVTT, 0xec);
        set_lapic_reg(&mut lapic, APIC_TDCR, 0b011);
        set_lapic_reg(&mut lapic, APIC_TMICT, 62_500);
        set_lapic_reg(&mut lapic, APIC_TMCCT, 62_500);
        assert!(postpone_oneshot_timer(&mut lapic, 100_000_000));
        assert_eq!(get_lapic_reg(&lapic, APIC_TMCCT), 6_250_000);
        assert_eq!(get_lapic_reg(&lapic, APIC_TMICT), 6_250_000);
        // Already later than asked: unchanged.
        assert!(!postpone_oneshot_timer(&mut lapic, 1_000_000));
        // Divide-by-1 and a delay beyond 32 bits saturate.
        set_lapic_reg(&mut lapic, APIC_TDCR, 0b1011);
        assert!(postpone_oneshot_timer(&mut lapic, u64::MAX));
        assert_eq!(get_lapic_reg(&lapic, APIC_TMCCT), u32::MAX);
        // Masked, periodic, TSC-deadline or disarmed timers are left alone.
        for (lvtt, tmict) in [(0x1_00ec, 5), (0x2_00ec, 5), (0x4_00ec, 5), (0xec, 0)] {
            set_lapic_reg(&mut lapic, APIC_LVTT, lvtt);
            set_lapic_reg(&mut lapic, APIC_TMICT, tmict);
            set_lapic_reg(&mut lapic, APIC_TMCCT, 1);
            assert!(!postpone_oneshot_timer(&mut lapic, 1_000_000));
            assert_eq!(get_lapic_reg(&lapic, APIC_TMCCT), 1);
        }
    }

    #[test]
    fn on_kvm() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        // Without an irqchip there is no LAPIC to program.
        let vcpu = vm.create_vcpu(0).unwrap();
        assert!(matches!(set_lint(&vcpu), Err(InterruptError::GetLapic(_))));
        drop(vcpu);
        drop(vm);

        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        set_lint(&vcpu).unwrap();
        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!(
            (get_lapic_reg(&lapic, APIC_LVT0) >> 8) & 7,
            APIC_MODE_EXTINT
        );
        assert_eq!((get_lapic_reg(&lapic, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
