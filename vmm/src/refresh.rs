//! What a clone needs to stop being a copy of its snapshot: fresh entropy
//! from the host kernel and the host's wall clock ([`Refresh`], sent to the
//! agent), and random bytes for the host's own reseeding.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ember_protocol::protocol::Refresh;

/// Fills `buf` from the host kernel's CSPRNG.
pub(crate) fn fill_random(buf: &mut [u8]) {
    // The crate retries interruptions and short reads itself; an error
    // means no source at all (no getrandom(2), no /dev/urandom), and no
    // clone may run on predictable bytes: try until there is one.
    while let Err(e) = getrandom::fill(buf) {
        log::error!("no random bytes from the host kernel: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fresh entropy from the host's kernel and the host's wall clock.
pub(crate) fn fresh_refresh() -> Refresh {
    let mut entropy = vec![0u8; 64];
    fill_random(&mut entropy);
    Refresh {
        entropy,
        unix_time_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
    }
}
