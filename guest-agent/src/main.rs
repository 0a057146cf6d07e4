//! `ember-agent`: the guest's `/init`. All the work is in the library.

// A C `main` instead of Rust's: std's runtime setup would otherwise run
// first and cost system calls the guest pays dearly for (a poll of the
// standard fds, signal and stack-guard setup reading /proc/self/maps), and
// it aborts, panicking the guest kernel, when fds 0-2 are closed and there
// is no /dev/null yet, which is exactly PID 1's situation without a console.
#![no_main]

/// Entry point called by the C runtime.
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    ember_agent::run()
}
