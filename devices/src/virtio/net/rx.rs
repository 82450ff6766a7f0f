//! The receiveq (virtio 1.2, 5.1.6.3-4), apart from any thread: frames go from the host
//! end straight into guest buffers, one `readv` per frame. Only the 12-byte vnet header
//! lands in a local buffer first: the device fills in `num_buffers` (and clears the
//! checksum flags when VIRTIO_NET_F_GUEST_CSUM is not negotiated) and writes it to the
//! start of the first chain.
//!
//! Without VIRTIO_NET_F_MRG_RXBUF a frame takes one chain, whatever its size (a driver
//! not using receive offloads posts small buffers; a frame that does not fit is dropped
//! and the chain returned with length 0). With it, chains are taken
//! until they hold the vnet header plus the largest frame the host may deliver; the
//! chains the frame did not need go back to the available ring (a ring entirely filled
//! with buffers is used as it is). If the ring cannot hold a largest frame, nothing is
//! read: the caller stops polling the host end until the driver adds buffers, which
//! [`process_rx`] asks to be notified of (closing the race by looking at the ring again
//! after arming the notification).
//!
//! A driver may refill its ring only after it got frames (Linux refills once half of a
//! small ring is used), while the device cannot know a frame's size before reading it.
//! So the caller can ask ([`RxFill::Short`]) to read into whatever buffers are there:
//! frames that fit are delivered, larger ones are dropped (counted).
//!
//! A TAP does not fail a read into too small buffers: it truncates the frame and
//! returns the iovecs' total length (so does a datagram socket). Each `readv` therefore
//! ends with one local overflow byte past the guest buffers; a frame reaching it did
//! not fit and is dropped, while a frame filling the buffers exactly is delivered.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::header::{VnetHeader, VNET_HDR_LEN};
use super::io::{self as net_io, ChainError, IOV_MAX};
use super::stats::{DropReason, NetStats};
use crate::virtio::iov::{self, Buffers, GuestIovecs};
use crate::virtio::ring::{self, pop_chain, RingError};

/// How frames are laid out in the guest's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxParams {
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several chains.
    pub mrg_rxbuf: bool,
    /// Largest frame (vnet header excluded) the host end may deliver.
    pub max_frame: usize,
    /// VIRTIO_NET_F_GUEST_CSUM: header flags are passed on.
    pub guest_csum: bool,
}

/// How many buffers a frame needs before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxFill {
    /// Room for a largest frame (with MRG_RXBUF), or one chain.
    Full,
    /// Whatever the ring holds when it runs out (at least one chain).
    Short,
}

/// Why [`process_rx`] stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The host end has no more frames (EAGAIN): poll it.
    #[default]
    Drained,
    /// The guest lacks buffers for a largest frame: nothing was read; do not poll the
    /// host end until the driver notifies the receiveq (the notification is armed).
    NeedBuffers,
    /// The budget ran out: call again.
    More,
    /// The host end failed (a read error that is not about one frame, or EOF): do not
    /// poll it until something changes (a notification or a wake-up).
    HostError,
}

/// What one [`process_rx`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxResult {
    /// Frames delivered to the guest.
    pub frames: usize,
    /// Chains put in the used ring (frames, dropped frames and refused chains).
    pub completed: usize,
    /// The driver must be interrupted for the receiveq.
    pub notify: bool,
    pub state: RxState,
    /// With [`RxState::NeedBuffers`]: the ring holds buffers, only too few for a
    /// largest frame ([`RxFill::Short`] would read into them).
    pub short: bool,
}

/// The outcome of one frame attempt.
enum Step {
    Frame,
    /// A frame was consumed by the host end but not delivered, or only refused chains
    /// were found (counted).
    Dropped,
    Empty,
    /// The ring ran out at avail index `seen`; `short`: after some usable chains.
    NoBuffers {
        seen: u16,
        short: bool,
    },
    HostError,
}

/// A receive chain ready for `readv`.
struct RxChain {
    head: u16,
    buffers: Buffers,
    parts: Vec<(GuestAddress, usize)>,
    iovs: GuestIovecs,
    /// Bytes it takes (vnet header included for the first chain).
    cap: usize,
}

/// A chain popped while gathering the buffers of one frame.
enum Popped {
    Good,
    Bad(u16, ChainError),
}

/// Reads up to `budget` frames from the host end `fd` into `queue`.
pub fn process_rx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    fd: RawFd,
    params: &RxParams,
    stats: &NetStats,
    budget: usize,
    fill: RxFill,
) -> Result<RxResult, RingError> {
    let mut out = RxResult::default();
    queue
        .disable_notification(mem)
        .map_err(RingError::Notification)?;
    let mut attempts = 0;
    loop {
        if attempts >= budget {
            out.state = RxState::More;
            break;
        }
        attempts += 1;
        match receive_one(queue, mem, fd, params, stats, fill, &mut out.completed)? {
            Step::Frame => out.frames += 1,
            Step::Dropped => {}
            Step::Empty => {
                out.state = RxState::Drained;
                break;
            }
            Step::NoBuffers { seen, short } => {
                if arm_notification(queue, mem, seen)? {
                    continue;
                }
                out.state = RxState::NeedBuffers;
                out.short = short;
                break;
            }
            Step::HostError => {
                out.state = RxState::HostError;
                break;
            }
        }
    }
    out.notify = out.completed > 0 && ring::needs_notification(queue, mem)?;
    Ok(out)
}

/// Gathers buffers for one frame and reads it.
fn receive_one<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    fd: RawFd,
    params: &RxParams,
    stats: &NetStats,
    fill: RxFill,
    completed: &mut usize,
) -> Result<Step, RingError> {
    let need = VNET_HDR_LEN + params.max_frame;
    let mut chains: Vec<RxChain> = Vec::new();
    // Every chain popped since the first good one, in ring order.
    let mut order: Vec<Popped> = Vec::new();
    // Two iovecs are local: the vnet header and the overflow byte.
    let (mut cap, mut iov_count, mut pops) = (0usize, 2usize, 0usize);
    loop {
        let enough = if params.mrg_rxbuf {
            cap >= need
        } else {
            !chains.is_empty()
        };
        // At most one ring's worth of chains per frame (so that `rewind` stays exact
        // and a flood of refused chains still ends).
        if enough || iov_count >= IOV_MAX || pops >= usize::from(queue.size()) {
            break;
        }
        let Some(chain) = pop_chain(queue, mem)? else {
            if fill == RxFill::Short && !chains.is_empty() {
                break;
            }
            let seen = queue.next_avail();
            rewind(queue, order.len());
            return Ok(Step::NoBuffers {
                seen,
                short: !chains.is_empty(),
            });
        };
        pops += 1;
        let head = chain.head_index();
        match prepare(chain, mem, chains.is_empty(), IOV_MAX - iov_count) {
            Ok(c) => {
                cap += c.cap;
                iov_count += c.iovs.iovs.len();
                chains.push(c);
                order.push(Popped::Good);
            }
            Err(e) if chains.is_empty() => {
                refuse(queue, mem, stats, head, e)?;
                *completed += 1;
            }
            // Completed once the frame's own chains are known (they must be consecutive
            // in the used ring), or given back with them.
            Err(e) => order.push(Popped::Bad(head, e)),
        }
    }

    if chains.is_empty() {
        if pops > 0 {
            // A ring's worth of refused chains: the caller's budget decides.
            return Ok(Step::Dropped);
        }
        // Only with an empty queue (size 0), which the transport does not activate.
        return Ok(Step::NoBuffers {
            seen: queue.next_avail(),
            short: false,
        });
    }
    let mut header = [0u8; VNET_HDR_LEN];
    let mut overflow = [0u8; 1];
    let mut iovs = Vec::with_capacity(iov_count);
    iovs.push(net_io::local_iovec_mut(&mut header));
    for c in &chains {
        iovs.extend_from_slice(&c.iovs.iovs);
    }
    iovs.push(net_io::local_iovec_mut(&mut overflow));
    let result = net_io::readv(fd, &iovs);
    drop(iovs);
    let n = match result {
        // The host truncated the frame to the iovecs (see the module comment).
        Ok(n) if n > cap => {
            stats.dropped(
                DropReason::RxTooBig,
                &format_args!("frame longer than the {cap}-byte buffers"),
            );
            return drop_frame(queue, mem, &chains, order.len(), completed);
        }
        Ok(0) => {
            rewind(queue, order.len());
            stats.dropped(DropReason::RxError, &"the host end was closed");
            return Ok(Step::HostError);
        }
        Ok(n) if n < VNET_HDR_LEN => {
            stats.dropped(DropReason::RxError, &format_args!("{n}-byte frame"));
            return drop_frame(queue, mem, &chains, order.len(), completed);
        }
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            rewind(queue, order.len());
            return Ok(Step::Empty);
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EINVAL)) => {
            // The host consumed a frame but could not copy it into the buffers.
            stats.dropped(
                DropReason::RxTooBig,
                &format_args!("{cap}-byte buffers: {e}"),
            );
            return drop_frame(queue, mem, &chains, order.len(), completed);
        }
        Err(e) => {
            rewind(queue, order.len());
            stats.dropped(DropReason::RxError, &e);
            return Ok(Step::HostError);
        }
    };

    // Which chains the frame filled, and how much of each.
    let mut used = Vec::new();
    let mut left = n;
    for c in &chains {
        if left == 0 {
            break;
        }
        let take = left.min(c.cap);
        used.push((c.head, take));
        left -= take;
    }
    let mut hdr = VnetHeader::from_bytes(&header);
    // At most the queue size (<= 32768) chains.
    hdr.num_buffers = used.len() as u16;
    if !params.guest_csum {
        hdr.flags = 0;
    }
    if chains[0].buffers.write_start(mem, &hdr.to_bytes()).is_err() {
        stats.dropped(DropReason::RxMalformed, &"cannot write the vnet header");
        return drop_frame(queue, mem, &chains, order.len(), completed);
    }
    for c in &chains[..used.len()] {
        iov::mark_dirty(mem, &c.parts);
    }
    // Position in `order` of the last chain used.
    let last = order
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p, Popped::Good))
        .nth(used.len() - 1)
        .map_or(0, |(i, _)| i);
    for p in &order[..last] {
        if let Popped::Bad(head, e) = p {
            refuse(queue, mem, stats, *head, *e)?;
            *completed += 1;
        }
    }
    for &(head, len) in &used {
        // Bounded by the chain length, itself below 4 GiB.
        ring::add_used(queue, mem, head, len as u32)?;
        *completed += 1;
    }
    rewind(queue, order.len() - last - 1);
    stats.received(n - VNET_HDR_LEN);
    Ok(Step::Frame)
}

/// Checks one receive chain and builds its iovecs (at most `iov_room`); the first chain
/// of a frame must hold the vnet header, whose bytes are left out of its iovecs.
fn prepare<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    first: bool,
    iov_room: usize,
) -> Result<RxChain, ChainError> {
    let head = chain.head_index();
    let buffers = net_io::collect(chain, mem, true)?;
    let skip = if first { VNET_HDR_LEN as u64 } else { 0 };
    if buffers.len() < skip.max(1) {
        return Err(ChainError::TooShort(buffers.len()));
    }
    let parts = buffers.range(skip, buffers.len() - skip);
    let mut iovs = GuestIovecs::new(mem, &parts, true).map_err(|_| ChainError::Memory)?;
    iovs.iovs.truncate(iov_room);
    let cap = skip as usize + iovs.iovs.iter().map(|v| v.iov_len).sum::<usize>();
    Ok(RxChain {
        head,
        buffers,
        parts,
        iovs,
        cap,
    })
}

/// A frame the host consumed but the guest does not get: the first chain goes back
/// with length 0, the others to the available ring.
fn drop_frame<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    chains: &[RxChain],
    popped: usize,
    completed: &mut usize,
) -> Result<Step, RingError> {
    rewind(queue, popped - 1);
    ring::add_used(queue, mem, chains[0].head, 0)?;
    *completed += 1;
    Ok(Step::Dropped)
}

/// Returns a refused chain with length 0, counted.
fn refuse<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    stats: &NetStats,
    head: u16,
    e: ChainError,
) -> Result<(), RingError> {
    stats.dropped(DropReason::RxMalformed, &format_args!("chain {head}: {e}"));
    ring::add_used(queue, mem, head, 0)
}

/// Puts the last `n` popped chains back in the available ring.
fn rewind(queue: &mut Queue, n: usize) {
    // `n` is at most the queue size (<= 32768).
    queue.set_next_avail(queue.next_avail().wrapping_sub(n as u16));
}

/// Asks the driver to notify the next buffer it publishes after avail index `seen`
/// (where the ring ran out); `true` when it already did meanwhile (look again).
///
/// `QueueT::enable_notification` compares the avail index with `next_avail`, which
/// chains given back keep behind it; with VIRTIO_F_EVENT_IDX it would also set
/// `avail_event` to `next_avail` and the driver would not notify the next buffer.
fn arm_notification<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    seen: u16,
) -> Result<bool, RingError> {
    if queue.event_idx_enabled() {
        // avail_event follows the used ring's `size` elements (virtio 1.2, 2.7.8).
        let offset = 4 + 8 * u64::from(queue.size());
        let addr =
            GuestAddress(queue.used_ring())
                .checked_add(offset)
                .ok_or(RingError::Notification(
                    virtio_queue::Error::AddressOverflow,
                ))?;
        mem.store(seen.to_le(), addr, Ordering::Relaxed)
            .map_err(|e| RingError::Notification(virtio_queue::Error::GuestMemory(e)))?;
    } else {
        queue
            .enable_notification(mem)
            .map_err(RingError::Notification)?;
    }
    // The driver publishes, then reads the notification fields; the device writes them,
    // then reads the avail index.
    fence(Ordering::SeqCst);
    let now = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(RingError::Notification)?;
    Ok(now.0 != seen)
}
