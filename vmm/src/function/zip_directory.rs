//! What a zip declares about its central directory, read from its end
//! records before the `zip` crate parses anything: the crate reads the
//! whole central directory into memory when an archive is opened (entry
//! count and directory size as the end record claims them), so a bundle's
//! limits must be checked first. The crate exposes no public reader for
//! these records, hence this small one.
//!
//! Every end-of-central-directory signature in the region the crate
//! searches (the last 64 KiB + 22 bytes) is checked, not only the last:
//! the crate falls back to earlier ones when a later one does not parse,
//! so any of them may be the one it uses. A zip64 end record is followed
//! through its locator; a locator pointing outside the file, or at
//! something that is no zip64 end record, is left to the crate (which
//! refuses it) as long as the 32-bit record's own claims are in bounds.

use std::io::{self, Read, Seek, SeekFrom};

/// End of central directory record: signature, then fixed fields.
const EOCD_SIGNATURE: [u8; 4] = *b"PK\x05\x06";
const EOCD_LEN: usize = 22;
/// The longest archive comment.
const MAX_COMMENT: usize = 0xFFFF;
/// Zip64 end of central directory locator: just before the EOCD.
const LOCATOR_SIGNATURE: [u8; 4] = *b"PK\x06\x07";
const LOCATOR_LEN: usize = 20;
/// Zip64 end of central directory record (its fixed part).
const EOCD64_SIGNATURE: [u8; 4] = *b"PK\x06\x06";
const EOCD64_LEN: usize = 56;

/// What one end record claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    /// Entries in the central directory.
    pub entries: u64,
    /// Bytes of the central directory.
    pub directory_bytes: u64,
}

/// The largest claims among every end record of `file` (zero for a file
/// with none: the crate then refuses it on its own).
pub fn declared<R: Read + Seek>(file: &mut R) -> io::Result<Declared> {
    let len = file.seek(SeekFrom::End(0))?;
    let tail_len = len.min((EOCD_LEN + MAX_COMMENT) as u64);
    let tail_start = len - tail_len;
    file.seek(SeekFrom::Start(tail_start))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    file.by_ref().take(tail_len).read_to_end(&mut tail)?;
    let mut most = Declared {
        entries: 0,
        directory_bytes: 0,
    };
    for at in (0..tail.len().saturating_sub(EOCD_LEN - 1)).rev() {
        if tail[at..at + 4] != EOCD_SIGNATURE {
            continue;
        }
        let record = &tail[at..at + EOCD_LEN];
        let mut claim = Declared {
            // This disk's and the total count: the crate takes either.
            entries: u64::from(u16_at(record, 8).max(u16_at(record, 10))),
            directory_bytes: u64::from(u32_at(record, 12)),
        };
        if let Some(zip64) = zip64_claim(file, &tail, tail_start, at, len)? {
            // The 32-bit fields then hold 0xFFFF.. ("see zip64") or, from
            // some writers, the real values: either way the zip64 record
            // says what is read.
            if claim.entries == 0xFFFF {
                claim.entries = 0;
            }
            if claim.directory_bytes == 0xFFFF_FFFF {
                claim.directory_bytes = 0;
            }
            claim.entries = claim.entries.max(zip64.entries);
            claim.directory_bytes = claim.directory_bytes.max(zip64.directory_bytes);
        }
        most.entries = most.entries.max(claim.entries);
        most.directory_bytes = most.directory_bytes.max(claim.directory_bytes);
    }
    Ok(most)
}

/// The claims of the zip64 end record that the locator before the EOCD at
/// `at` (in `tail`, which starts at `tail_start` of a `len`-byte file)
/// points to, if there is a locator and it points at one.
fn zip64_claim<R: Read + Seek>(
    file: &mut R,
    tail: &[u8],
    tail_start: u64,
    at: usize,
    len: u64,
) -> io::Result<Option<Declared>> {
    // The locator may lie before the tail read: read it from the file.
    let eocd_pos = tail_start + at as u64;
    let Some(locator_pos) = eocd_pos.checked_sub(LOCATOR_LEN as u64) else {
        return Ok(None);
    };
    let locator = match tail_slice(tail, tail_start, locator_pos, LOCATOR_LEN) {
        Some(bytes) => bytes.to_vec(),
        None => match read_at(file, locator_pos, LOCATOR_LEN, len)? {
            Some(bytes) => bytes,
            None => return Ok(None),
        },
    };
    if locator[..4] != LOCATOR_SIGNATURE {
        return Ok(None);
    }
    let eocd64_pos = u64_at(&locator, 8);
    // The crate may also search for the record when an archive has bytes
    // prepended; its claims are then found where the locator says, shifted,
    // which this does not follow: such a record is refused by the crate
    // unless its directory reads, entry by entry, within the file.
    let Some(record) = read_at(file, eocd64_pos, EOCD64_LEN, len)? else {
        return Ok(None);
    };
    if record[..4] != EOCD64_SIGNATURE {
        return Ok(None);
    }
    Ok(Some(Declared {
        entries: u64_at(&record, 24).max(u64_at(&record, 32)),
        directory_bytes: u64_at(&record, 40),
    }))
}

fn tail_slice(tail: &[u8], tail_start: u64, pos: u64, n: usize) -> Option<&[u8]> {
    let from = usize::try_from(pos.checked_sub(tail_start)?).ok()?;
    tail.get(from..from.checked_add(n)?)
}

/// `n` bytes at `pos`, or `None` if they are not all inside the file.
fn read_at<R: Read + Seek>(
    file: &mut R,
    pos: u64,
    n: usize,
    len: u64,
) -> io::Result<Option<Vec<u8>>> {
    if pos.checked_add(n as u64).is_none_or(|end| end > len) {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(pos))?;
    let mut bytes = vec![0; n];
    file.read_exact(&mut bytes)?;
    Ok(Some(bytes))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    fn eocd(entries: u16, dir_bytes: u32, dir_offset: u32, comment: &[u8]) -> Vec<u8> {
        let mut r = EOCD_SIGNATURE.to_vec();
        r.extend_from_slice(&[0; 4]);
        r.extend_from_slice(&entries.to_le_bytes());
        r.extend_from_slice(&entries.to_le_bytes());
        r.extend_from_slice(&dir_bytes.to_le_bytes());
        r.extend_from_slice(&dir_offset.to_le_bytes());
        r.extend_from_slice(&(comment.len() as u16).to_le_bytes());
        r.extend_from_slice(comment);
        r
    }

    fn eocd64(entries: u64, dir_bytes: u64) -> Vec<u8> {
        let mut r = EOCD64_SIGNATURE.to_vec();
        r.extend_from_slice(&44u64.to_le_bytes());
        r.extend_from_slice(&[45, 0, 45, 0]);
        r.extend_from_slice(&[0; 8]);
        r.extend_from_slice(&entries.to_le_bytes());
        r.extend_from_slice(&entries.to_le_bytes());
        r.extend_from_slice(&dir_bytes.to_le_bytes());
        r.extend_from_slice(&0u64.to_le_bytes());
        r
    }

    fn locator(eocd64_pos: u64) -> Vec<u8> {
        let mut r = LOCATOR_SIGNATURE.to_vec();
        r.extend_from_slice(&[0; 4]);
        r.extend_from_slice(&eocd64_pos.to_le_bytes());
        r.extend_from_slice(&1u32.to_le_bytes());
        r
    }

    fn claims(bytes: &[u8]) -> Declared {
        declared(&mut Cursor::new(bytes)).unwrap()
    }

    #[test]
    fn a_real_zip_declares_what_it_holds() {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default();
        for name in ["a.py", "b.py", "c/d.py"] {
            zip.start_file(name, options).unwrap();
            zip.write_all(b"x = 1\n").unwrap();
        }
        let bytes = zip.finish().unwrap().into_inner();
        let d = claims(&bytes);
        assert_eq!(d.entries, 3);
        assert!(d.directory_bytes > 3 * 46 && d.directory_bytes < 200);
    }

    #[test]
    fn lying_counts_are_seen_wherever_they_hide() {
        // The 32-bit record alone, lying.
        assert_eq!(claims(&eocd(60_000, 10, 0, b"")).entries, 60_000);
        // A stray record in the comment of a modest one: both checked.
        let inner = eocd(65_000, 0xFFFF_0000, 0, b"");
        let d = claims(&eocd(1, 46, 0, &inner));
        assert_eq!((d.entries, d.directory_bytes), (65_000, 0xFFFF_0000));
        // Zip64: 5,000,000 entries behind a locator.
        let mut file = b"junk".to_vec();
        let pos = file.len() as u64;
        file.extend(eocd64(5_000_000, 5_000_000 * 46));
        file.extend(locator(pos));
        file.extend(eocd(0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF, b""));
        let d = claims(&file);
        assert_eq!(d.entries, 5_000_000);
        assert_eq!(d.directory_bytes, 5_000_000 * 46);
    }

    #[test]
    fn truncated_and_pointing_outside_are_harmless() {
        // Nothing, too short, a signature with no room for its record.
        for bytes in [
            &b""[..],
            b"PK",
            b"PK\x05\x06\0\0",
            &eocd(7, 9, 0, b"")[..21],
        ] {
            assert_eq!(claims(bytes).entries, 0, "{bytes:?}");
        }
        // Locators pointing past the end, at the last bytes, at nothing.
        for pos in [u64::MAX, u64::MAX - 3, 1 << 40, 0] {
            let mut file = locator(pos);
            file.extend(eocd(3, 200, 0, b""));
            assert_eq!(claims(&file).entries, 3, "{pos}");
        }
        // A locator whose record would end past the end of the file.
        let mut file = vec![0; 20];
        file.extend(&eocd64(9, 9)[..10]);
        file.extend(locator(20));
        file.extend(eocd(2, 100, 0, b""));
        assert_eq!(claims(&file).entries, 2);
        // A locator before the start of the file (EOCD at offset 0).
        assert_eq!(claims(&eocd(4, 100, 0, b"")).entries, 4);
        // Random bytes with signatures sprinkled in never panic.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            let mut bytes = Vec::new();
            for _ in 0..(seed % 97) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                match seed % 7 {
                    0 => bytes.extend_from_slice(&EOCD_SIGNATURE),
                    1 => bytes.extend_from_slice(&LOCATOR_SIGNATURE),
                    2 => bytes.extend_from_slice(&EOCD64_SIGNATURE),
                    _ => bytes.push(seed as u8),
                }
            }
            let _ = claims(&bytes);
        }
    }
}
