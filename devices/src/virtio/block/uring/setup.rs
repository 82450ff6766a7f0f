//! Setting up io_uring: the availability probe and one ring per queue.
//!
//! Every ring is restricted (IORING_REGISTER_RESTRICTIONS) to the operations the
//! engine submits, READV, WRITEV and FSYNC, without SQE flags, and to no
//! `io_uring_register` operation once enabled: io_uring operations do not go through
//! seccomp, so an unrestricted ring would let a worker open files or sockets that its
//! seccomp filter forbids.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::register::Restriction;
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

/// The operations a ring may run: those of the engine.
const OPS: [(u8, &str); 3] = [
    (opcode::Readv::CODE, "READV"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::Fsync::CODE, "FSYNC"),
];

/// A ring of `entries`, created disabled, then restricted to [`OPS`] and enabled;
/// `before_enable` runs on it while registering is still allowed.
fn restricted_ring(
    entries: u32,
    before_enable: impl FnOnce(&IoUring) -> io::Result<()>,
) -> Result<IoUring, UringError> {
    let ring = IoUring::builder()
        .setup_r_disabled()
        .build(entries)
        .map_err(UringError::Setup)?;
    before_enable(&ring).map_err(UringError::Setup)?;
    let mut allowed = OPS.map(|(code, _)| Restriction::sqe_op(code));
    let submitter = ring.submitter();
    submitter
        .register_restrictions(&mut allowed)
        .and_then(|()| submitter.register_enable_rings())
        .map_err(|_| UringError::Unsupported("ring restrictions (Linux 5.10)"))?;
    Ok(ring)
}

/// Checks that io_uring works here (kernel support, not blocked by seccomp or
/// `kernel.io_uring_disabled`) with every operation the engine uses, on a restricted
/// ring.
pub fn probe() -> Result<(), UringError> {
    let mut probe = Probe::new();
    restricted_ring(4, |ring| ring.submitter().register_probe(&mut probe))?;
    match OPS.iter().find(|(code, _)| !probe.is_supported(*code)) {
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
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(UringError::Setup)?;
        let ring = restricted_ring(entries, |ring| {
            ring.submitter().register_eventfd(eventfd.as_raw_fd())
        })?;
        let capacity = ring.params().sq_entries() as usize;
        Ok(Self {
            ring,
            eventfd,
            fd,
            capacity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_runs_only_the_engine_operations() {
        probe().expect("io_uring with restrictions");
        let file = tempfile_fd();
        let mut ring = UringRing::new(file.as_raw_fd(), 8).expect("ring").ring;
        let nop = opcode::Nop::new().build().user_data(1);
        let fsync = opcode::Fsync::new(io_uring::types::Fd(file.as_raw_fd()))
            .build()
            .user_data(2);
        // A refused entry ends its batch: one at a time.
        for (entry, expected) in [(nop, -libc::EACCES), (fsync, 0)] {
            // SAFETY: neither entry refers to memory; the file outlives the ring.
            unsafe { ring.submission().push(&entry) }.expect("room");
            ring.submit_and_wait(1).expect("submit");
            let cqe = ring.completion().next().expect("a completion");
            assert_eq!(
                (cqe.user_data(), cqe.result()),
                (entry.get_user_data(), expected)
            );
        }
        // No registering once enabled.
        let refused = ring.submitter().register_eventfd(file.as_raw_fd());
        assert_eq!(refused.unwrap_err().raw_os_error(), Some(libc::EACCES));
    }

    fn tempfile_fd() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("ferrio-uring-{}", std::process::id()));
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temp file");
        let _ = std::fs::remove_file(&path);
        file
    }
}
