//! Finding the (guest-)physical pages behind a runtime's hot-path buffers,
//! with `/proc/<pid>/pagemap`: 8 bytes per virtual page, bit 63 "present",
//! bits 0-54 the page frame number (visible to root only). In a guest the
//! frame number times 4096 is the guest-physical address the host writes.
//!
//! Every page must be present, in memory (not swapped) and mapped only by
//! the runtime (bit 56, "exclusively mapped"). The last check keeps the host
//! from writing into a page that other mappings share: above all the
//! kernel's zero page, which backs a page that was only ever read (and
//! which pagemap reports as present, without that bit).

use std::ffi::CString;
use std::os::fd::AsRawFd;

use crate::function::runtime_pipe::BufferInfo;
use crate::protocol::{GuestBuffer, MAX_LIST_LEN};
use crate::sys;
use ember_protocol::pagemap::{self, PagemapEntry};

/// The guest's page size.
pub(crate) const PAGE_SIZE: u64 = 4096;

/// Why a page cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageProblem {
    NotPresent,
    Swapped,
    Shared,
    /// Present, but the frame number reads as 0 (not root).
    Hidden,
}

impl PageProblem {
    fn describe(self) -> &'static str {
        match self {
            PageProblem::NotPresent => "not present (touch and mlock every page)",
            PageProblem::Swapped => "swapped out",
            PageProblem::Shared => {
                "not mapped by the runtime alone (a page only read maps the shared zero page: write it)"
            }
            PageProblem::Hidden => "without a visible frame number",
        }
    }
}

/// The frame number in one pagemap entry, if the page is usable.
pub(crate) fn decode_entry(entry: PagemapEntry) -> Result<u64, PageProblem> {
    if entry.swapped() {
        return Err(PageProblem::Swapped);
    }
    if !entry.present() {
        return Err(PageProblem::NotPresent);
    }
    if !entry.exclusive() {
        return Err(PageProblem::Shared);
    }
    match entry.pfn() {
        0 => Err(PageProblem::Hidden),
        pfn => Ok(pfn),
    }
}

/// The pages `buffer` covers: (index of the first, how many).
fn page_span(buffer: BufferInfo) -> Option<(u64, u64)> {
    let end = buffer.addr.checked_add(buffer.len)?;
    let first = buffer.addr / PAGE_SIZE;
    let last = end.div_ceil(PAGE_SIZE);
    Some((first, last - first))
}

/// Looks up every page of each buffer of process `pid` (one `open`, one
/// `pread` per buffer, one `close`).
pub(crate) fn translate(
    pid: libc::pid_t,
    buffers: &[(&str, BufferInfo)],
) -> Result<Vec<GuestBuffer>, String> {
    let path = CString::new(format!("/proc/{pid}/pagemap")).map_err(|e| e.to_string())?;
    let fd = sys::open(&path, libc::O_RDONLY, 0)
        .map_err(|err| format!("open /proc/{pid}/pagemap: {err}"))?;
    let mut out = Vec::with_capacity(buffers.len());
    for &(name, buffer) in buffers {
        let (first, count) =
            page_span(buffer).ok_or_else(|| format!("the {name} buffer wraps around"))?;
        if count > MAX_LIST_LEN as u64 {
            return Err(format!(
                "the {name} buffer spans {count} pages, over {MAX_LIST_LEN} (start it on a page boundary)"
            ));
        }
        // At most MAX_LIST_LEN entries of 8 bytes.
        let mut raw = vec![0u8; count as usize * 8];
        let offset = libc::off_t::try_from(first * 8)
            .map_err(|_| format!("the {name} buffer's address is out of range"))?;
        let mut done = 0;
        while let Some(rest) = raw.get_mut(done..).filter(|rest| !rest.is_empty()) {
            // SAFETY: `rest` is writable for its length.
            let n = unsafe {
                libc::pread(
                    fd.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    offset + done as libc::off_t,
                )
            };
            if n < 0 {
                if sys::errno() == libc::EINTR {
                    continue;
                }
                return Err(format!("read /proc/{pid}/pagemap: {}", sys::last_error()));
            }
            if n == 0 {
                return Err(format!("/proc/{pid}/pagemap ended early"));
            }
            done += n.unsigned_abs();
        }
        let mut pages = Vec::with_capacity(count as usize);
        for (i, entry) in pagemap::entries(&raw).enumerate() {
            let pfn = decode_entry(entry).map_err(|problem| {
                format!(
                    "page {i} of the {name} buffer (address {:#x}) is {}",
                    (first + i as u64) * PAGE_SIZE,
                    problem.describe()
                )
            })?;
            pages.push(pfn * PAGE_SIZE);
        }
        out.push(GuestBuffer {
            len: buffer.len,
            first_page_offset: buffer.addr % PAGE_SIZE,
            pages,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_protocol::pagemap::{EXCLUSIVE, PFN_MASK, PRESENT, SWAPPED};

    #[test]
    fn entries() {
        let decode = |entry| decode_entry(PagemapEntry(entry));
        let good = PRESENT | EXCLUSIVE | 0x1234;
        assert_eq!(decode(good), Ok(0x1234));
        // Soft-dirty (55) and file (61) bits do not matter.
        assert_eq!(decode(good | 1 << 55 | 1 << 61), Ok(0x1234));
        assert_eq!(decode(PFN_MASK | PRESENT | EXCLUSIVE), Ok(PFN_MASK));
        assert_eq!(decode(0), Err(PageProblem::NotPresent));
        assert_eq!(decode(EXCLUSIVE | 5), Err(PageProblem::NotPresent));
        assert_eq!(decode(SWAPPED | 5), Err(PageProblem::Swapped));
        assert_eq!(decode(PRESENT | 5), Err(PageProblem::Shared));
        assert_eq!(decode(PRESENT | EXCLUSIVE), Err(PageProblem::Hidden));
    }

    #[test]
    fn spans() {
        let buf = |addr, len| BufferInfo { addr, len };
        assert_eq!(page_span(buf(8192, 4096)), Some((2, 1)));
        assert_eq!(page_span(buf(8192, 4097)), Some((2, 2)));
        assert_eq!(page_span(buf(8191, 2)), Some((1, 2)));
        assert_eq!(page_span(buf(100, 64)), Some((0, 1)));
        assert_eq!(page_span(buf(u64::MAX, 2)), None);
    }

    #[test]
    fn own_pages() {
        // Frame numbers are only shown to root (CAP_SYS_ADMIN).
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "this test reads frame numbers from /proc/<pid>/pagemap, which needs root: run the tests as root"
        );
        let len = 3 * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let addr = ptr as u64;
        let pid = std::process::id() as libc::pid_t;
        let buffer = |offset: u64, len: u64| BufferInfo {
            addr: addr + offset,
            len,
        };
        // Untouched: not present.
        let err = translate(pid, &[("request", buffer(0, 64))]).unwrap_err();
        assert!(err.contains("not present"), "{err}");
        // Only read: the zero page, refused.
        // SAFETY: inside the mapping.
        let _ = unsafe { std::ptr::read_volatile(ptr.cast::<u8>()) };
        let err = translate(pid, &[("request", buffer(0, 64))]).unwrap_err();
        assert!(
            err.contains("not mapped by the runtime alone") || err.contains("not present"),
            "{err}"
        );
        // Written: usable.
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 1, len) };
        let got = translate(
            pid,
            &[
                ("request", buffer(100, 4096)),
                ("response", buffer(8192, 64)),
            ],
        );
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(ptr, len) };
        let got = match got {
            Ok(got) => got,
            Err(err) if err.contains("without a visible frame number") => panic!(
                "this test needs the frame numbers in /proc/<pid>/pagemap, which this host \
                 hides from this process (it needs CAP_SYS_ADMIN in the initial user \
                 namespace): {err}"
            ),
            Err(err) => panic!("{err}"),
        };
        assert_eq!(got[0].first_page_offset, 100);
        assert_eq!(got[0].len, 4096);
        assert_eq!(got[0].pages.len(), 2);
        assert_eq!(got[1].pages.len(), 1);
        let mut all: Vec<u64> = got.iter().flat_map(|b| b.pages.clone()).collect();
        assert!(all.iter().all(|&gpa| gpa != 0 && gpa % PAGE_SIZE == 0));
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 3, "pages must be distinct");
    }
}
