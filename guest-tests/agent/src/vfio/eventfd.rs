//! An eventfd with counter semantics: what VFIO signals an interrupt vector on.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An eventfd (counter semantics).
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> Result<EventFd, String> {
        // SAFETY: eventfd has no pointer arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(format!("eventfd: {}", io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor that nothing else owns.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Waits up to `timeout_ms` for the counter to become non-zero and reads (resets)
    /// it; `Ok(0)` on timeout.
    pub fn wait(&self, timeout_ms: i32) -> Result<u64, String> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            return Err(format!("poll eventfd: {}", io::Error::last_os_error()));
        }
        if rc == 0 {
            return Ok(0);
        }
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into `count`, which is 8 bytes long.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        if n != 8 {
            return Err(format!("read eventfd: {}", io::Error::last_os_error()));
        }
        Ok(u64::from_ne_bytes(count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_reads_and_resets_the_counter_or_times_out() {
        let fd = EventFd::new().unwrap();
        assert_eq!(fd.wait(0), Ok(0));
        let add = 3u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from `add` to our own eventfd.
        assert_eq!(unsafe { libc::write(fd.raw(), add.as_ptr().cast(), 8) }, 8);
        assert_eq!(fd.wait(1000), Ok(3));
        assert_eq!(fd.wait(10), Ok(0));
    }
}
