//! The host end of a virtio-net device: one message-oriented file descriptor per queue
//! pair. A TAP queue (`tap::Tap`) is the real one; unit tests use a datagram socketpair.
//!
//! Framing on every fd: each `readv` returns exactly one frame preceded by a 12-byte
//! `virtio_net_hdr_v1` (the TAP's vnet header size is set to 12), each `writev` sends
//! exactly one. The fds are non-blocking.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

/// TAP offload flags (`TUN_F_*` of `<linux/if_tun.h>`), given to [`TapQueue::set_offload`].
pub mod offload {
    /// The TAP may hand us frames with a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM).
    pub const TUN_F_CSUM: u32 = 0x01;
    pub const TUN_F_TSO4: u32 = 0x02;
    pub const TUN_F_TSO6: u32 = 0x04;
    pub const TUN_F_TSO_ECN: u32 = 0x08;
    pub const TUN_F_UFO: u32 = 0x10;
}

/// One queue of the host end (a TAP queue fd, or a test double).
pub trait TapQueue: AsRawFd + Send + Sync {
    /// Sets which offloaded frames the host may pass to the guest (`TUN_F_*`). Applies
    /// to the whole device; calling it on any queue is enough.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
    /// Attaches (`true`) or detaches this queue (TUNSETQUEUE): the host steers frames
    /// only to attached queues. Queue 0 is never detached.
    fn set_enabled(&self, enabled: bool) -> io::Result<()>;
}

/// The host end of one virtio-net device.
pub struct NetBackend {
    /// One queue per queue pair (at least one). Queue `i` serves receiveq`i` and
    /// transmitq`i`.
    pub queues: Vec<Arc<dyn TapQueue>>,
    /// The `TUN_F_*` flags the host accepts in [`TapQueue::set_offload`] (probed at
    /// open). Guest offload features are offered only where the host supports them.
    pub offloads: u32,
    /// A name for logs (the TAP interface name, or `fd=N`).
    pub name: String,
}

impl NetBackend {
    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.queues.len() as u16
    }
}

impl std::fmt::Debug for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fds: Vec<RawFd> = self.queues.iter().map(|q| q.as_raw_fd()).collect();
        f.debug_struct("NetBackend")
            .field("name", &self.name)
            .field("fds", &fds)
            .field("offloads", &self.offloads)
            .finish()
    }
}
