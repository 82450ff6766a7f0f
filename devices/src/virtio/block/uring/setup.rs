//! Setting up io_uring: the availability probe and one ring per queue.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the io_uring engine cannot serve a disk.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("io_uring is not available on this host: {0}")]
    Setup(#[source] io::Error),
    #[error("io_uring on this kernel does not support {0}")]
    Unsupported(&'static str),
    #[error("the disk backend has no file io_uring can use")]
    NoFile,
}

/// Checks that io_uring works here (kernel support, not blocked by seccomp or
/// `kernel.io_uring_disabled`) with every operation the engine uses.
pub fn probe() -> Result<(), UringError> {
    let ring = IoUring::new(4).map_err(UringError::Setup)?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(UringError::Setup)?;
    let ops = [
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
    ];
    match ops.iter().find(|(code, _)| !probe.is_supported(*code)) {
        Some((_, name)) => Err(UringError::Unsupported(name)),
        None => Ok(()),
    }
}

/// A ring and its completion eventfd, set up at activation (before the worker thread
/// starts, so that a failure fails the activation).
pub(crate) struct UringRing {
    pub(super) ring: IoUring,
    pub(super) eventfd: EventFd,
    pub(super) fd: RawFd,
    pub(super) capacity: usize,
}

impl UringRing {
    /// A ring for one queue of `queue_size` entries serving the file `fd`.
    pub fn new(fd: RawFd, queue_size: u16) -> Result<Self, UringError> {
        let entries = u32::from(queue_size.max(4));
        // The completion queue is twice the submission queue by default, and at most
        // `entries` requests are ever in flight: it cannot overflow.
        let ring = IoUring::new(entries).map_err(UringError::Setup)?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(UringError::Setup)?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(UringError::Setup)?;
        let capacity = ring.params().sq_entries() as usize;
        Ok(Self {
            ring,
            eventfd,
            fd,
            capacity,
        })
    }
}
