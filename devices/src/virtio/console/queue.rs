//! Queue logic of virtio-console, apart from any thread or event loop.
//!
//! [`process_tx`] drains the transmitq into a host sink and [`fill_rx`] copies pending
//! host input into the receiveq. Both only touch guest memory through `vm-memory`
//! (`GuestMemory` / `Bytes`), refuse malformed descriptor chains one by one (they go
//! back to the used ring with length 0, or are skipped when their head index cannot
//! be returned) and report an unrecoverable ring error as a [`QueueError`], upon which
//! the device must set DEVICE_NEEDS_RESET. Nothing here panics on guest data.
//!
//! Notification suppression: both functions serve their queue in a
//! [`ring::serve_batch`] (drained with driver notifications disabled, re-enabled with a
//! second look when the driver published more meanwhile, so no kick is lost). Whether
//! the driver must be interrupted is decided once per batch by
//! [`ring::needs_notification`] (the `used_event` comparison when VIRTIO_F_EVENT_IDX is
//! negotiated).
//!
//! DMA fences: guest memory (rings and buffers) is touched only under a guard of the
//! device's [`DmaTracker`], renewed after each chain so that an IOMMU UNMAP waits for
//! at most one chain; the transmit side puts it down while the sink writes (a socket
//! or a terminal may block), which needs no guest memory: each chunk is copied out
//! first.

use std::collections::VecDeque;
use std::io::Write;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::dma::DmaTracker;
use crate::virtio::dma_hold::DmaHold;
use crate::virtio::ring::{self, Step};

/// The log prefix.
const DEVICE: &str = "virtio-console";

/// Largest piece copied from guest memory to the sink at once.
const COPY_CHUNK: usize = 4096;

/// A ring error the device cannot recover from (shared by every device).
pub use crate::virtio::ring::RingError as QueueError;

/// Why one descriptor chain was refused (the chain is returned with length 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain does not end properly: a loop, more descriptors than the queue size,
    /// a `next` index out of range, an unreadable descriptor or a bad indirect table.
    #[error("broken descriptor chain (loop, too long, index out of range or unreadable)")]
    Broken,
    /// A descriptor is device-writable on the transmitq or device-readable on the
    /// receiveq.
    #[error("descriptor {index} of the chain has the wrong direction")]
    WrongDirection {
        /// Position of the descriptor in the chain.
        index: usize,
    },
    /// A descriptor has length 0.
    #[error("descriptor {index} of the chain is empty")]
    ZeroLength {
        /// Position of the descriptor in the chain.
        index: usize,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} (descriptor {index}) is outside guest memory")]
    OutOfMemory {
        /// Position of the descriptor in the chain.
        index: usize,
        /// Guest address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// Guest memory failed while the buffer was being copied.
    #[error("guest memory access failed while copying descriptor {index}")]
    Memory {
        /// Position of the descriptor in the chain.
        index: usize,
    },
}

/// What one [`process_tx`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxStats {
    /// Chains added to the used ring (valid and refused ones).
    pub chains: usize,
    /// Bytes written to the sink.
    pub bytes: usize,
    /// Chains refused (returned with length 0, or skipped when their head index was out
    /// of range).
    pub invalid: usize,
    /// Bytes the sink failed to take (a host I/O error); their chains are completed
    /// anyway so the guest does not stall.
    pub lost: usize,
    /// The driver must be interrupted for this queue.
    pub notify: bool,
}

/// What one [`fill_rx`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxStats {
    /// Chains added to the used ring (valid and refused ones).
    pub chains: usize,
    /// Input bytes written into guest buffers (and removed from the input queue).
    pub bytes: usize,
    /// Chains refused (returned with length 0, or skipped when their head index was out
    /// of range).
    pub invalid: usize,
    /// The driver must be interrupted for this queue.
    pub notify: bool,
}

/// Drains the transmitq: writes every device-readable buffer of each available chain,
/// in order, to `sink` (`write_all`, one flush per batch) and returns the chain with
/// used length 0. Refused chains write nothing (a chain whose memory fails while it is
/// copied, behind an IOMMU, is cut short there and refused).
pub fn process_tx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    sink: &mut dyn Write,
    dma: &DmaTracker,
) -> Result<TxStats, QueueError> {
    let mut stats = TxStats::default();
    let mut descs = Vec::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut sink_failed = false;
    let mut hold = DmaHold::new(dma);
    ring::serve_batch(queue, mem, usize::MAX, |queue| {
        let Some(chain) = ring::pop_chain(queue, mem)? else {
            return Ok(Step::Empty);
        };
        let head = chain.head_index();
        let checked = collect_chain(chain, mem, false, &mut descs);
        let mut out = TxOut {
            sink: &mut *sink,
            buf: &mut buf,
            stats: &mut stats,
            sink_failed: &mut sink_failed,
        };
        let result = checked.and_then(|()| copy_to_sink(mem, &descs, &mut out, &mut hold));
        if let Err(e) = result {
            tracing::debug!("virtio-console: transmitq chain {head} refused: {e}");
            stats.invalid += 1;
        }
        if ring::return_chain(DEVICE, queue, mem, head, 0)? {
            stats.chains += 1;
        }
        hold.renew();
        Ok(Step::Next)
    })?;
    stats.notify = stats.chains > 0 && ring::needs_notification(queue, mem)?;
    drop(hold);
    if stats.bytes > 0 && !sink_failed {
        if let Err(e) = sink.flush() {
            tracing::warn!("virtio-console: cannot flush the output: {e}");
        }
    }
    Ok(stats)
}

/// Copies pending host `input` into the device-writable buffers of the receiveq, chain
/// after chain (used length = bytes written), until the input is empty or there are no
/// buffers left. Bytes that do not fit stay at the front of `input`; so do the bytes of
/// a chain whose memory fails during the copy (it is returned with length 0).
pub fn fill_rx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    input: &mut VecDeque<u8>,
    dma: &DmaTracker,
) -> Result<RxStats, QueueError> {
    let mut stats = RxStats::default();
    if input.is_empty() {
        return Ok(stats);
    }
    let mut descs = Vec::new();
    let mut hold = DmaHold::new(dma);
    // Kicks stay enabled while input waits: the driver must tell us about new buffers.
    ring::serve_batch(queue, mem, usize::MAX, |queue| {
        if input.is_empty() {
            return Ok(Step::Done);
        }
        let Some(chain) = ring::pop_chain(queue, mem)? else {
            return Ok(Step::Empty);
        };
        let head = chain.head_index();
        let copied = collect_chain(chain, mem, true, &mut descs)
            .and_then(|()| copy_from_input(mem, &descs, input));
        let written = match copied {
            Ok(written) => written,
            Err(e) => {
                tracing::debug!("virtio-console: receiveq chain {head} refused: {e}");
                stats.invalid += 1;
                0
            }
        };
        stats.bytes += written;
        // A chain holds less than 4 GiB (virtio-queue stops iterating otherwise).
        let len = u32::try_from(written).unwrap_or(u32::MAX);
        if ring::return_chain(DEVICE, queue, mem, head, len)? {
            stats.chains += 1;
        }
        hold.renew();
        Ok(Step::Next)
    })?;
    stats.notify = stats.chains > 0 && ring::needs_notification(queue, mem)?;
    Ok(stats)
}

/// Walks `chain` into `out` and checks every descriptor: direction (`writable` for the
/// receiveq), non-zero length, inside guest memory with the needed access.
fn collect_chain<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    writable: bool,
    out: &mut Vec<Descriptor>,
) -> Result<(), ChainError> {
    out.clear();
    // virtio-queue ends the iteration silently on a loop, an overlong chain, an index
    // out of range or an unreadable descriptor: the last descriptor then still says
    // NEXT. A chain whose head cannot be read yields nothing.
    let mut ends = false;
    for desc in chain {
        ends = !desc.has_next();
        out.push(desc);
    }
    if !ends {
        return Err(ChainError::Broken);
    }
    let access = if writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    for (index, desc) in out.iter().enumerate() {
        if desc.is_write_only() != writable {
            return Err(ChainError::WrongDirection { index });
        }
        if desc.len() == 0 {
            return Err(ChainError::ZeroLength { index });
        }
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(ChainError::OutOfMemory {
                index,
                addr: desc.addr().raw_value(),
                len: desc.len(),
            });
        }
    }
    Ok(())
}

/// Where the transmitted bytes go, and what is counted on the way.
struct TxOut<'a> {
    sink: &'a mut dyn Write,
    /// The copy buffer ([`COPY_CHUNK`] bytes).
    buf: &'a mut [u8],
    stats: &'a mut TxStats,
    /// A sink error was logged in this batch.
    sink_failed: &'a mut bool,
}

/// Copies the (checked) buffers of one transmit chain to the sink, chunk by chunk; the
/// DMA guard is put down while the sink writes. A sink error is counted as lost bytes
/// (the caller reports it), not as a guest error. `hold` is held on return.
fn copy_to_sink<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    out: &mut TxOut<'_>,
    hold: &mut DmaHold<'_>,
) -> Result<(), ChainError> {
    for (index, desc) in descs.iter().enumerate() {
        let len = desc.len() as usize;
        let mut done = 0;
        while done < len {
            let n = out.buf.len().min(len - done);
            let addr = offset(desc.addr(), done).ok_or(ChainError::Memory { index })?;
            hold.resume();
            mem.read_slice(&mut out.buf[..n], addr)
                .map_err(|_| ChainError::Memory { index })?;
            hold.pause();
            match out.sink.write_all(&out.buf[..n]) {
                Ok(()) => out.stats.bytes += n,
                Err(e) => {
                    if !*out.sink_failed {
                        tracing::debug!("virtio-console: output lost: {e}");
                        *out.sink_failed = true;
                    }
                    out.stats.lost += n;
                }
            }
            done += n;
        }
    }
    hold.resume();
    Ok(())
}

/// Copies input into the (checked) buffers of one receive chain and removes what it
/// copied from `input`; returns the bytes written. When guest memory fails midway
/// nothing is removed (the chain is refused and the input goes to the next one).
fn copy_from_input<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    input: &mut VecDeque<u8>,
) -> Result<usize, ChainError> {
    let mut written = 0;
    for (index, desc) in descs.iter().enumerate() {
        let len = desc.len() as usize;
        let mut done = 0;
        while done < len && written < input.len() {
            let (front, back) = input.as_slices();
            let rest = match front.get(written..) {
                Some(rest) if !rest.is_empty() => rest,
                _ => &back[written - front.len()..],
            };
            let n = rest.len().min(len - done);
            let addr = offset(desc.addr(), done).ok_or(ChainError::Memory { index })?;
            mem.write_slice(&rest[..n], addr)
                .map_err(|_| ChainError::Memory { index })?;
            done += n;
            written += n;
        }
        if written == input.len() {
            break;
        }
    }
    input.drain(..written);
    Ok(written)
}

fn offset(addr: GuestAddress, by: usize) -> Option<GuestAddress> {
    addr.checked_add(u64::try_from(by).ok()?)
}
