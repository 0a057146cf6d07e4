//! The guest's time since boot, from `/proc/uptime`.

use std::ffi::CStr;
use std::io;

use thiserror::Error;

use crate::sys;

const PROC_UPTIME: &CStr = c"/proc/uptime";

/// Reading or parsing the uptime failed.
#[derive(Debug, Error)]
pub enum UptimeError {
    /// `/proc/uptime` could not be read.
    #[error("read /proc/uptime: {source}")]
    Read {
        /// Why.
        source: io::Error,
    },
    /// The text does not start with `<seconds>[.<fraction>]`.
    #[error("malformed /proc/uptime: {text:?}")]
    Malformed {
        /// What was read.
        text: String,
    },
    /// The number does not fit in 64 bits of milliseconds.
    #[error("uptime out of range: {text:?}")]
    Overflow {
        /// What was read.
        text: String,
    },
}

/// Parses the first field of `/proc/uptime` ("`12.34 56.78`") into whole
/// milliseconds, truncating finer digits.
///
/// Integer arithmetic on the digits rather than `f64` keeps it exact.
pub fn parse_uptime_ms(text: &str) -> Result<u64, UptimeError> {
    let malformed = || UptimeError::Malformed {
        text: text.to_owned(),
    };
    let first = text.split_whitespace().next().ok_or_else(malformed)?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if secs.is_empty() || !all_digits(secs) || !all_digits(frac) {
        return Err(malformed());
    }
    let secs: u64 = secs.parse().map_err(|_| UptimeError::Overflow {
        text: text.to_owned(),
    })?;
    // Pad or cut the fraction to exactly three digits: milliseconds.
    let frac_ms = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
    secs.checked_mul(1000)
        .and_then(|ms| ms.checked_add(frac_ms))
        .ok_or_else(|| UptimeError::Overflow {
            text: text.to_owned(),
        })
}

/// Milliseconds since the guest booted (procfs must be mounted).
pub fn read_uptime_ms() -> Result<u64, UptimeError> {
    let mut buf = [0u8; 128];
    let bytes = sys::read_proc_file(PROC_UPTIME, &mut buf)
        .map_err(|source| UptimeError::Read { source })?;
    parse_uptime_ms(&String::from_utf8_lossy(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typical() {
        assert_eq!(parse_uptime_ms("27.43 25.10\n").unwrap(), 27_430);
        assert_eq!(parse_uptime_ms("0.00 0.00\n").unwrap(), 0);
        assert_eq!(parse_uptime_ms("123456.78 1.00").unwrap(), 123_456_780);
    }

    #[test]
    fn fraction_lengths() {
        assert_eq!(parse_uptime_ms("1").unwrap(), 1000);
        assert_eq!(parse_uptime_ms("1.").unwrap(), 1000);
        assert_eq!(parse_uptime_ms("1.5").unwrap(), 1500);
        assert_eq!(parse_uptime_ms("1.2345").unwrap(), 1234);
    }

    #[test]
    fn malformed() {
        for text in ["", "\n", "abc 1.0", ".5 1", "1.2.3", "-1.0", "1,5", "1.x"] {
            assert!(
                matches!(parse_uptime_ms(text), Err(UptimeError::Malformed { .. })),
                "{text:?}"
            );
        }
    }

    #[test]
    fn overflow() {
        assert!(matches!(
            parse_uptime_ms("18446744073709551615.00 0"),
            Err(UptimeError::Overflow { .. })
        ));
        assert!(matches!(
            parse_uptime_ms("99999999999999999999999.00 0"),
            Err(UptimeError::Overflow { .. })
        ));
    }
}
