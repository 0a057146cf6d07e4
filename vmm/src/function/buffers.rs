//! A waiting runtime's hot-path buffers in guest-physical memory: each is a
//! list of 4 KiB pages (not contiguous in guest-physical memory), which the
//! host writes to and reads from piecewise.

use ember_protocol::hotpath::{
    decode_response, Response, ResponseHeader, MAX_BUFFER_BYTES, REQUEST_HEADER_LEN,
    RESPONSE_HEADER_LEN,
};
use ember_protocol::protocol::{GuestBuffer, HotPathPages};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::FunctionError;
use crate::snapshot::GuestWrite;

const PAGE: u64 = 4096;

/// Checks buffers a template's agent reported (or a manifest file holds)
/// against `mem_bytes` of guest RAM.
pub fn validate(pages: &HotPathPages, mem_bytes: u64) -> Result<(), FunctionError> {
    check_buffer("request", &pages.request, REQUEST_HEADER_LEN, mem_bytes)?;
    check_buffer("response", &pages.response, RESPONSE_HEADER_LEN, mem_bytes)
}

fn check_buffer(
    what: &str,
    buffer: &GuestBuffer,
    header: usize,
    mem_bytes: u64,
) -> Result<(), FunctionError> {
    let bad = |why: String| FunctionError::Manifest(format!("hot-path {what} buffer: {why}"));
    if buffer.len < header as u64 || buffer.len > MAX_BUFFER_BYTES as u64 {
        return Err(bad(format!("length {} out of range", buffer.len)));
    }
    if buffer.first_page_offset >= PAGE {
        return Err(bad(format!("page offset {}", buffer.first_page_offset)));
    }
    let needed = (buffer.first_page_offset + buffer.len).div_ceil(PAGE);
    if buffer.pages.len() as u64 != needed {
        return Err(bad(format!(
            "{} pages for {} bytes",
            buffer.pages.len(),
            buffer.len
        )));
    }
    for &page in &buffer.pages {
        // A loose bound (RAM may continue above the 3-4 GiB gap): the
        // memory accesses themselves refuse addresses in no region.
        if page % PAGE != 0 || page.saturating_add(PAGE) > (4u64 << 30) + mem_bytes {
            return Err(bad(format!("page address {page:#x}")));
        }
    }
    Ok(())
}

/// The guest-physical pieces of `len` bytes at `offset` in `buffer`.
fn pieces(
    buffer: &GuestBuffer,
    offset: u64,
    len: u64,
) -> Result<Vec<(GuestAddress, usize)>, FunctionError> {
    let end = offset
        .checked_add(len)
        .filter(|end| *end <= buffer.len)
        .ok_or_else(|| {
            FunctionError::Manifest(format!(
                "{len} bytes at {offset} do not fit a {}-byte buffer",
                buffer.len
            ))
        })?;
    let mut out = Vec::new();
    let mut at = buffer.first_page_offset + offset;
    let stop = buffer.first_page_offset + end;
    while at < stop {
        let page = buffer
            .pages
            .get(usize::try_from(at / PAGE).unwrap_or(usize::MAX))
            .ok_or_else(|| FunctionError::Manifest("buffer page list too short".into()))?;
        let in_page = at % PAGE;
        let n = (PAGE - in_page).min(stop - at);
        out.push((GuestAddress(page + in_page), n as usize));
        at += n;
    }
    Ok(out)
}

/// The writes that put `bytes` at `offset` in `buffer` (applied to a clone
/// before it runs).
pub fn writes(
    buffer: &GuestBuffer,
    offset: u64,
    bytes: &[u8],
) -> Result<Vec<GuestWrite>, FunctionError> {
    let mut rest = bytes;
    pieces(buffer, offset, bytes.len() as u64)?
        .into_iter()
        .map(|(addr, n)| {
            let (now, later) = rest.split_at(n.min(rest.len()));
            rest = later;
            Ok(GuestWrite {
                addr: addr.0,
                bytes: now.to_vec(),
            })
        })
        .collect()
}

/// Writes `bytes` at `offset` in `buffer` in a running guest's memory.
pub fn write(
    memory: &GuestMemoryMmap,
    buffer: &GuestBuffer,
    offset: u64,
    bytes: &[u8],
) -> Result<(), FunctionError> {
    for write in writes(buffer, offset, bytes)? {
        memory
            .write_slice(&write.bytes, GuestAddress(write.addr))
            .map_err(|e| FunctionError::GuestMemory(e.to_string()))?;
    }
    Ok(())
}

/// Reads the response to request `seq` from a runtime's response buffer:
/// the header first, then only as many bytes as it announces (checked
/// against the buffer), not the whole buffer.
pub fn read_response(
    memory: &GuestMemoryMmap,
    buffer: &GuestBuffer,
    seq: u64,
) -> Result<Response, FunctionError> {
    let header = read(memory, buffer, 0, RESPONSE_HEADER_LEN as u64)?;
    let buffer_len = usize::try_from(buffer.len).unwrap_or(usize::MAX);
    let total = ResponseHeader::decode(&header, buffer_len)?.total_len();
    let raw = read(memory, buffer, 0, total)?;
    Ok(decode_response(&raw, seq)?)
}

/// Reads `len` bytes at `offset` in `buffer` from guest memory.
pub fn read(
    memory: &GuestMemoryMmap,
    buffer: &GuestBuffer,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, FunctionError> {
    let mut out = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    let mut at = 0;
    for (addr, n) in pieces(buffer, offset, len)? {
        memory
            .read_slice(&mut out[at..at + n], addr)
            .map_err(|e| FunctionError::GuestMemory(e.to_string()))?;
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer() -> GuestBuffer {
        // 8 KiB starting 100 bytes into a page: three pages, scattered.
        GuestBuffer {
            len: 8192,
            first_page_offset: 100,
            pages: vec![0x5000, 0x2000, 0x9000],
        }
    }

    #[test]
    fn scatter_and_gather_across_pages() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
        let buffer = buffer();
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        write(&memory, &buffer, 0, &data).unwrap();
        assert_eq!(read(&memory, &buffer, 0, 8192).unwrap(), data);
        // The first page holds 3996 bytes from offset 100.
        let mut first = [0u8; 4];
        memory
            .read_slice(&mut first, GuestAddress(0x5000 + 100))
            .unwrap();
        assert_eq!(first, [0, 1, 2, 3]);
        let mut second = [0u8; 1];
        memory
            .read_slice(&mut second, GuestAddress(0x2000))
            .unwrap();
        assert_eq!(second[0], (3996 % 256) as u8);
        assert_eq!(read(&memory, &buffer, 8000, 192).unwrap(), data[8000..]);
    }

    #[test]
    fn out_of_range_is_an_error() {
        let buffer = buffer();
        assert!(writes(&buffer, 8000, &[0; 200]).is_err());
        assert!(pieces(&buffer, u64::MAX, 2).is_err());
        assert!(validate(
            &HotPathPages {
                request: buffer.clone(),
                response: GuestBuffer {
                    pages: vec![0x1000],
                    ..buffer.clone()
                }
            },
            1 << 20
        )
        .is_err());
        assert!(validate(
            &HotPathPages {
                request: buffer.clone(),
                response: buffer.clone()
            },
            1 << 20
        )
        .is_ok());
        let unaligned = GuestBuffer {
            pages: vec![0x5001, 0x2000, 0x9000],
            ..buffer.clone()
        };
        assert!(check_buffer("request", &unaligned, 64, 1 << 20).is_err());
    }
}
