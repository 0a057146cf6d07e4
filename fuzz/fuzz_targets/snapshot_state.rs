//! The snapshot `state` file decoder on hostile bytes.
//!
//! The first input byte picks how the rest is used: even, as a whole state
//! file image (header checks, checksum, then the payload); odd, as the
//! payload alone, wrapped here in a header with the right length and
//! CRC-32 so that mutations reach the postcard decoder of
//! `SnapshotState`. Checks: no panic; `validate()` never panics; a decoded
//! state re-encodes to an image that decodes and re-encodes to itself;
//! and any single changed byte of a valid image is refused.

#![no_main]

use ember::snapshot::contents::SnapshotState;
use ember::snapshot::format::{decode_state, FORMAT_VERSION, HEADER_LEN, MAGIC};
use libfuzzer_sys::fuzz_target;

/// A state file image around `payload`, as `write_state` makes it.
fn image(payload: &[u8]) -> Vec<u8> {
    let mut image = Vec::with_capacity(HEADER_LEN as usize + payload.len());
    image.extend_from_slice(&MAGIC);
    image.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    image.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    image.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    image.extend_from_slice(payload);
    image
}

fn encode(state: &SnapshotState) -> Vec<u8> {
    image(&postcard::to_stdvec(state).expect("a decoded state must re-encode"))
}

/// Every header byte and a few payload bytes (picked by `seed`), each
/// changed on its own, must make a valid image fail to decode.
fn check_flips(valid: &[u8], seed: &[u8]) {
    let header = 0..HEADER_LEN as usize;
    let payload = seed.iter().take(8).enumerate().map(|(i, b)| {
        let span = valid.len() - HEADER_LEN as usize;
        HEADER_LEN as usize + (usize::from(*b) * 257 + i * 4099) % span.max(1)
    });
    let mut bad = valid.to_vec();
    for (n, pos) in header.chain(payload).enumerate() {
        if pos >= valid.len() {
            continue;
        }
        let delta = seed.get(n).copied().unwrap_or(0x40).max(1);
        bad[pos] ^= delta;
        assert!(
            decode_state::<SnapshotState>(&bad).is_err(),
            "byte {pos} ^ {delta:#x} of a valid {}-byte image was accepted",
            valid.len()
        );
        bad[pos] ^= delta;
    }
}

/// Set EMBER_FUZZ_TRACE to print what each input decoded to.
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("EMBER_FUZZ_TRACE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let input = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        image(rest)
    };
    let state = match decode_state::<SnapshotState>(&input) {
        Ok(state) => state,
        Err(e) => {
            let e = e.to_string();
            if trace() {
                eprintln!("trace: {e}");
            }
            return;
        }
    };
    let valid = state.validate();
    if trace() {
        eprintln!(
            "trace: decoded, {} vCPUs, validate: {valid:?}",
            state.vcpu_states.len()
        );
    }
    // Decoding may normalize (postcard varints; kvm structs are zero-padded
    // or cut to size), so the input need not come back byte for byte; one
    // round later it must.
    let once = encode(&state);
    let again: SnapshotState = decode_state(&once).expect("a re-encoded state must decode");
    assert_eq!(encode(&again), once, "re-encoding is not stable");
    assert_eq!(again.validate().is_ok(), state.validate().is_ok());
    check_flips(&input, rest);
    check_flips(&once, rest);
});
