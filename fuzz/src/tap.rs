//! A fake TAP queue for the net targets, as the device's own tests build it: one end of
//! a `socketpair(AF_UNIX, SOCK_SEQPACKET)` (message boundaries like a TAP queue, non
//! blocking) that records attach/detach calls; the harness holds the other end (the
//! host network).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use ferrio_devices::virtio::net::backend::TapQueue;

/// The device end.
pub struct FakeTap {
    fd: OwnedFd,
    /// Every `set_enabled` call, in order.
    pub enabled: Mutex<Vec<bool>>,
}

impl FakeTap {
    pub fn enable_calls(&self) -> Vec<bool> {
        self.enabled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl TapQueue for FakeTap {
    fn set_offload(&self, _flags: u32) -> io::Result<()> {
        Ok(())
    }

    fn set_enabled(&self, enabled: bool) -> io::Result<()> {
        self.enabled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(enabled);
        Ok(())
    }
}

/// The harness end: the host network.
pub struct Peer(OwnedFd);

impl Peer {
    /// Sends one frame (vnet header included) towards the device; `false` when the
    /// socket is full.
    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: `frame` is a valid readable buffer of `frame.len()` bytes for the call.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        n >= 0
    }

    /// The next frame the device sent, if any.
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes for the call.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some(buf)
    }
}

/// A fake TAP queue and the host's end of it. With `small`, the device's send buffer
/// is as small as the kernel allows, so large frames meet a full socket (EAGAIN).
pub fn fake_tap(small: bool) -> (Arc<FakeTap>, Peer) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: socketpair succeeded: both fds are open and owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if small {
        let size: libc::c_int = 1;
        // SAFETY: `size` is a valid c_int for the duration of the call, its length is
        // passed along.
        unsafe {
            libc::setsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    let tap = FakeTap {
        fd: a,
        enabled: Mutex::default(),
    };
    (Arc::new(tap), Peer(b))
}
