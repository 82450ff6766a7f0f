//! virtio-net tests. The host end is a fake TAP: one end of a
//! `socketpair(AF_UNIX, SOCK_SEQPACKET)` (message boundaries like a TAP queue) that
//! records the `set_offload` / `set_enabled` calls; the test holds the other end.

mod ctrl;
mod device;
mod iommu;
mod rx;
mod tx;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::backend::{NetBackend, TapQueue};
use super::header::{TxOffloads, VnetHeader};
use super::rx::{process_rx, RxFill, RxParams, RxResult};
use super::stats::NetStats;
use super::tx::{process_tx, TxResult};
use crate::virtio::ring::RingError;
use crate::virtio::testing::Mem;

/// The device end of a fake TAP queue.
pub(super) struct FakeTap {
    fd: OwnedFd,
    pub offloads: Mutex<Vec<u32>>,
    pub enabled: Mutex<Vec<bool>>,
}

impl FakeTap {
    pub fn offload_calls(&self) -> Vec<u32> {
        self.offloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn enable_calls(&self) -> Vec<bool> {
        self.enabled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a frame waits to be read by the device.
    pub fn has_frame(&self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: `b` is a valid writable buffer of 1 byte for the call.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n > 0
    }

    /// Sends from the device end until the socket is full (EAGAIN); returns how many
    /// messages went.
    pub fn fill(&self) -> usize {
        let chunk = vec![0u8; 16 * 1024];
        let mut n = 0;
        while send(self.fd.as_raw_fd(), &chunk).is_ok() {
            n += 1;
        }
        n
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl TapQueue for FakeTap {
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        self.offloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(flags);
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

/// The test's end of a fake TAP queue (the "host network").
pub(super) struct Peer(OwnedFd);

impl Peer {
    pub fn send(&self, frame: &[u8]) {
        send(self.0.as_raw_fd(), frame).unwrap();
    }

    /// The next message, if one is there.
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 128 * 1024];
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes for the call.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    /// The next message, waiting up to 10 s.
    pub fn recv(&self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = self.try_recv() {
                return m;
            }
            assert!(Instant::now() < deadline, "no frame from the device");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn send(fd: RawFd, data: &[u8]) -> io::Result<()> {
    // SAFETY: `data` is a valid readable buffer of `data.len()` bytes for the call.
    let n = unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    assert_eq!(n as usize, data.len());
    Ok(())
}

/// A fake TAP queue and the test's end of it.
pub(super) fn fake_tap() -> (Arc<FakeTap>, Peer) {
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
    assert_eq!(r, 0, "{}", io::Error::last_os_error());
    // SAFETY: socketpair succeeded: both fds are open and owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let tap = FakeTap {
        fd: a,
        offloads: Mutex::default(),
        enabled: Mutex::default(),
    };
    (Arc::new(tap), Peer(b))
}

/// The host side of a ring-level test: a fake TAP queue, the test's end of it and the
/// device's counters.
pub(super) struct Host {
    pub tap: Arc<FakeTap>,
    pub peer: Peer,
    pub stats: NetStats,
}

impl Host {
    pub fn new() -> Self {
        let (tap, peer) = fake_tap();
        Self {
            tap,
            peer,
            stats: NetStats::default(),
        }
    }

    /// One `process_rx` pass (budget 64) from this host queue into `q`.
    pub fn rx<M: GuestMemory>(
        &self,
        q: &mut Queue,
        mem: &M,
        params: &RxParams,
        fill: RxFill,
    ) -> RxResult {
        let fd = self.tap.as_raw_fd();
        process_rx(q, mem, fd, params, &self.stats, 64, fill).unwrap()
    }

    /// One `process_tx` pass from `q` to this host queue.
    pub fn tx<M: GuestMemory>(
        &self,
        q: &mut Queue,
        mem: &M,
        offloads: &TxOffloads,
        budget: usize,
    ) -> Result<TxResult, RingError> {
        process_tx(q, mem, self.tap.as_raw_fd(), offloads, &self.stats, budget)
    }
}

/// A backend of `pairs` fake TAP queues accepting the `TUN_F_*` flags `offloads`.
pub(super) fn fake_backend(
    pairs: usize,
    offloads: u32,
) -> (NetBackend, Vec<Arc<FakeTap>>, Vec<Peer>) {
    let (taps, peers): (Vec<_>, Vec<_>) = (0..pairs).map(|_| fake_tap()).unzip();
    let backend = NetBackend {
        queues: taps
            .iter()
            .map(|t| t.clone() as Arc<dyn TapQueue>)
            .collect(),
        offloads,
        name: "fake".into(),
    };
    (backend, taps, peers)
}

/// A frame as it travels on the TAP: vnet header, then `len` payload bytes numbered
/// from `seed`.
pub(super) fn frame(hdr: VnetHeader, len: usize, seed: u8) -> Vec<u8> {
    let mut f = hdr.to_bytes().to_vec();
    f.extend((0..len).map(|i| seed.wrapping_add(i as u8)));
    f
}

/// Writes `bytes` to guest memory split into pieces of the given lengths, each at its
/// own address from `base` (0x1000 apart); returns (address, length) per piece.
pub(super) fn scatter(mem: &Mem, base: u64, bytes: &[u8], pieces: &[usize]) -> Vec<(u64, u32)> {
    assert_eq!(pieces.iter().sum::<usize>(), bytes.len());
    let mut out = Vec::new();
    let mut at = 0;
    for (i, &len) in pieces.iter().enumerate() {
        let addr = base + 0x1_0000 * i as u64;
        mem.write_slice(&bytes[at..at + len], GuestAddress(addr))
            .unwrap();
        out.push((addr, len as u32));
        at += len;
    }
    out
}

/// Reads `len` bytes of guest memory at `addr`.
pub(super) fn read(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}
