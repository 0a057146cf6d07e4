//! What a function runtime writes into guest memory, read by the host:
//! the hot-path response buffer and the function manifest.
//!
//! The first 8 input bytes are the sequence number the host expects; the
//! rest is the response buffer. Checks: no panic; a decoded response's
//! sections lie within the buffer and re-encode to the same bytes; request
//! headers decode without panicking.

#![no_main]

use ember_protocol::hotpath::{decode_response, encode_response, RequestHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((seq, buf)) = data.split_first_chunk::<8>() else {
        return;
    };
    let seq = u64::from_le_bytes(*seq);
    if let Ok(response) = decode_response(buf, seq) {
        let total = response.header.total_len();
        assert!(total <= buf.len() as u64);
        let again = encode_response(
            seq,
            response.header.status,
            &response.result,
            &response.stdout,
            &response.stderr,
        );
        let back = decode_response(&again, seq).expect("a re-encoded response decodes");
        assert_eq!(back.result, response.result);
        assert_eq!(back.stdout, response.stdout);
        assert_eq!(back.stderr, response.stderr);
    }
    let _ = RequestHeader::decode(buf);
    let _ = ember::function::Manifest::from_json(buf, 256 << 20);
});
