//! The transmitq (virtio 1.2, 5.1.6.2), apart from any thread: each chain is one frame
//! (vnet header + Ethernet frame) that goes to the host end with a single `writev`
//! straight from guest memory. Only the 12-byte header is copied (and validated on the
//! copy, which is what the host gets, so the guest cannot change it after the check).
//!
//! A refused chain (wrong direction, broken, too short or too long, outside guest
//! memory, bad header; unknown header flag bits are ignored, not refused) or a frame the host refuses is dropped and counted; its chain
//! still goes to the used ring. When the host end is full (EAGAIN) the chain is put back
//! in the available ring and the caller waits for the fd to become writable.
//! Notifications: the batch runs with driver notifications disabled and re-enables them
//! (looping when the driver published more), except when it stops early (budget, host
//! full), since the caller comes back anyway.

use std::io;
use std::os::fd::RawFd;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;

use super::header::{
    validate_tx, HeaderError, TxOffloads, VnetHeader, MAX_GSO_FRAME, TX_FLAGS, VNET_HDR_LEN,
};
use super::io::{self as net_io, ChainError, IOV_MAX};
use super::stats::{DropReason, NetStats};
use crate::virtio::iov::GuestIovecs;
use crate::virtio::ring::{self, RingError, Step};

/// What one [`process_tx`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxResult {
    /// Chains returned to the used ring (sent and dropped frames).
    pub completed: usize,
    /// The driver must be interrupted for the transmitq.
    pub notify: bool,
    /// The host end is full: a frame waits in the available ring for POLLOUT.
    pub blocked: bool,
    /// The budget ran out with frames possibly left: call again.
    pub more: bool,
}

/// Why a transmitted frame is refused.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Header(#[from] HeaderError),
}

/// How one chain ended.
enum Sent {
    /// On its way, with this many frame bytes.
    Frame(usize),
    /// Dropped and counted.
    Dropped,
    /// The host end is full.
    WouldBlock,
}

/// Sends up to `budget` frames of `queue` to the host end `fd`.
pub fn process_tx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    fd: RawFd,
    offloads: &TxOffloads,
    stats: &NetStats,
    budget: usize,
) -> Result<TxResult, RingError> {
    let mut out = TxResult::default();
    out.more = ring::serve_batch(queue, mem, budget, |queue| {
        let Some(chain) = ring::pop_chain(queue, mem)? else {
            return Ok(Step::Empty);
        };
        let head = chain.head_index();
        match send_chain(chain, mem, fd, offloads, stats) {
            Sent::Frame(bytes) => stats.sent(bytes),
            Sent::Dropped => {}
            Sent::WouldBlock => {
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                out.blocked = true;
                return Ok(Step::Pause);
            }
        }
        ring::add_used(queue, mem, head, 0)?;
        out.completed += 1;
        Ok(Step::Next)
    })?;
    out.notify = out.completed > 0 && ring::needs_notification(queue, mem)?;
    Ok(out)
}

fn send_chain<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    fd: RawFd,
    offloads: &TxOffloads,
    stats: &NetStats,
) -> Sent {
    let head = chain.head_index();
    let (header, iovs, frame_len) = match prepare(chain, mem, offloads) {
        Ok(p) => p,
        Err(e) => {
            stats.dropped(DropReason::TxMalformed, &format_args!("chain {head}: {e}"));
            return Sent::Dropped;
        }
    };
    let mut all = Vec::with_capacity(iovs.iovs.len() + 1);
    all.push(net_io::local_iovec(&header));
    all.extend_from_slice(&iovs.iovs);
    let result = net_io::writev(fd, &all);
    // The guest buffers are not needed past the call.
    drop(iovs);
    match result {
        Ok(n) => {
            if n != VNET_HDR_LEN + frame_len {
                tracing::debug!("virtio-net: short TAP write ({n} of {frame_len} + header)");
            }
            Sent::Frame(frame_len)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::WouldBlock,
        Err(e) => {
            stats.dropped(DropReason::TxError, &format_args!("chain {head}: {e}"));
            Sent::Dropped
        }
    }
}

/// Checks a chain; returns the header copy, the frame's guest buffers and its length.
fn prepare<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    offloads: &TxOffloads,
) -> Result<([u8; VNET_HDR_LEN], GuestIovecs, usize), Refused> {
    let buffers = net_io::collect(chain, mem, false)?;
    let len = buffers.len();
    let hdr_len = VNET_HDR_LEN as u64;
    if len < hdr_len {
        return Err(ChainError::TooShort(len).into());
    }
    if len > hdr_len + MAX_GSO_FRAME as u64 {
        return Err(ChainError::TooLong(len - hdr_len).into());
    }
    // Bounded by MAX_GSO_FRAME above.
    let frame_len = (len - hdr_len) as usize;
    let mut header = [0u8; VNET_HDR_LEN];
    buffers
        .read_at(mem, 0, &mut header)
        .map_err(|_| ChainError::Memory)?;
    // Flag bits the device does not use are ignored, so the host never sees them.
    header[0] &= TX_FLAGS;
    validate_tx(&VnetHeader::from_bytes(&header), frame_len, offloads)?;
    let parts = buffers.range(hdr_len, frame_len as u64);
    let iovs = GuestIovecs::new(mem, &parts, false).map_err(|_| ChainError::Memory)?;
    if iovs.iovs.len() >= IOV_MAX {
        return Err(ChainError::TooManyPieces(iovs.iovs.len()).into());
    }
    Ok((header, iovs, frame_len))
}
