//! Queue logic of virtio-console, apart from any thread or event loop.
//!
//! [`process_tx`] drains the transmitq into a host sink and [`fill_rx`] copies pending
//! host input into the receiveq. Both only touch guest memory through `vm-memory`
//! (`GuestMemory` / `Bytes`), refuse malformed descriptor chains one by one (they go
//! back to the used ring with length 0, or are skipped when their head index cannot
//! be returned) and report an unrecoverable ring error as a [`QueueError`], upon which
//! the device must set DEVICE_NEEDS_RESET. Nothing here panics on guest data.
//!
//! Notification suppression: both functions drain with driver notifications disabled
//! and re-enable them with [`QueueT::enable_notification`], looping when the driver
//! published more buffers meanwhile, so no kick is lost. Whether the driver must be
//! interrupted is decided once per batch by [`QueueT::needs_notification`] (the
//! `used_event` comparison when VIRTIO_F_EVENT_IDX is negotiated).

use std::collections::VecDeque;
use std::io::Write;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

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
/// used length 0. Refused chains write nothing.
pub fn process_tx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    sink: &mut dyn Write,
) -> Result<TxStats, QueueError> {
    let mut stats = TxStats::default();
    let mut descs = Vec::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut sink_failed = false;
    loop {
        queue
            .disable_notification(mem)
            .map_err(QueueError::Notification)?;
        while let Some(chain) = next_chain(queue, mem)? {
            let head = chain.head_index();
            let checked = collect_chain(chain, mem, false, &mut descs);
            let result = checked.and_then(|()| {
                copy_to_sink(mem, &descs, sink, &mut buf, &mut stats, &mut sink_failed)
            });
            if let Err(e) = result {
                tracing::debug!("virtio-console: transmitq chain {head} refused: {e}");
                stats.invalid += 1;
            }
            if complete(queue, mem, head, 0)? {
                stats.chains += 1;
            }
        }
        if !queue
            .enable_notification(mem)
            .map_err(QueueError::Notification)?
        {
            break;
        }
    }
    if stats.bytes > 0 && !sink_failed {
        if let Err(e) = sink.flush() {
            tracing::warn!("virtio-console: cannot flush the output: {e}");
        }
    }
    stats.notify = stats.chains > 0 && notify(queue, mem)?;
    Ok(stats)
}

/// Copies pending host `input` into the device-writable buffers of the receiveq, chain
/// after chain (used length = bytes written), until the input is empty or there are no
/// buffers left. Bytes that do not fit stay at the front of `input`.
pub fn fill_rx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    input: &mut VecDeque<u8>,
) -> Result<RxStats, QueueError> {
    let mut stats = RxStats::default();
    if input.is_empty() {
        return Ok(stats);
    }
    let mut descs = Vec::new();
    loop {
        queue
            .disable_notification(mem)
            .map_err(QueueError::Notification)?;
        while !input.is_empty() {
            let Some(chain) = next_chain(queue, mem)? else {
                break;
            };
            let head = chain.head_index();
            let written = match collect_chain(chain, mem, true, &mut descs) {
                Ok(()) => {
                    let (written, result) = copy_from_input(mem, &descs, input);
                    if let Err(e) = result {
                        tracing::debug!("virtio-console: receiveq chain {head}: {e}");
                        stats.invalid += 1;
                    }
                    written
                }
                Err(e) => {
                    tracing::debug!("virtio-console: receiveq chain {head} refused: {e}");
                    stats.invalid += 1;
                    0
                }
            };
            stats.bytes += written;
            // A chain holds less than 4 GiB (virtio-queue stops iterating otherwise).
            let len = u32::try_from(written).unwrap_or(u32::MAX);
            if complete(queue, mem, head, len)? {
                stats.chains += 1;
            }
        }
        // Re-enable kicks (the driver must tell us about new buffers while input
        // waits); go on if buffers arrived meanwhile and input is left.
        let more = queue
            .enable_notification(mem)
            .map_err(QueueError::Notification)?;
        if !more || input.is_empty() {
            break;
        }
    }
    stats.notify = stats.chains > 0 && notify(queue, mem)?;
    Ok(stats)
}

/// The next available chain, `None` when the ring is empty.
fn next_chain<'m, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'m M,
) -> Result<Option<DescriptorChain<&'m M>>, QueueError> {
    crate::virtio::ring::next_chain(queue, mem).map_err(QueueError::AvailRing)
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

/// Copies the (checked) buffers of one transmit chain to the sink. A sink error is
/// counted as lost bytes (the caller reports it), not as a guest error.
fn copy_to_sink<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    sink: &mut dyn Write,
    buf: &mut [u8],
    stats: &mut TxStats,
    sink_failed: &mut bool,
) -> Result<(), ChainError> {
    for (index, desc) in descs.iter().enumerate() {
        let len = desc.len() as usize;
        let mut done = 0;
        while done < len {
            let n = buf.len().min(len - done);
            let addr = offset(desc.addr(), done).ok_or(ChainError::Memory { index })?;
            mem.read_slice(&mut buf[..n], addr)
                .map_err(|_| ChainError::Memory { index })?;
            match sink.write_all(&buf[..n]) {
                Ok(()) => stats.bytes += n,
                Err(e) => {
                    if !*sink_failed {
                        tracing::debug!("virtio-console: output lost: {e}");
                        *sink_failed = true;
                    }
                    stats.lost += n;
                }
            }
            done += n;
        }
    }
    Ok(())
}

/// Copies input into the (checked) buffers of one receive chain; returns the bytes
/// written, and an error if guest memory failed (the unwritten input stays queued).
fn copy_from_input<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    input: &mut VecDeque<u8>,
) -> (usize, Result<(), ChainError>) {
    let mut written = 0;
    for (index, desc) in descs.iter().enumerate() {
        let len = desc.len() as usize;
        let mut done = 0;
        while done < len && !input.is_empty() {
            let (front, _) = input.as_slices();
            let n = front.len().min(len - done);
            let Some(addr) = offset(desc.addr(), done) else {
                return (written, Err(ChainError::Memory { index }));
            };
            if mem.write_slice(&front[..n], addr).is_err() {
                return (written, Err(ChainError::Memory { index }));
            }
            input.drain(..n);
            done += n;
            written += n;
        }
        if input.is_empty() {
            break;
        }
    }
    (written, Ok(()))
}

fn offset(addr: GuestAddress, by: usize) -> Option<GuestAddress> {
    addr.checked_add(u64::try_from(by).ok()?)
}

/// Returns chain `head` to the used ring; `false` when the head index is out of range
/// (such a chain cannot be returned and is skipped).
fn complete<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head: u16,
    len: u32,
) -> Result<bool, QueueError> {
    if head >= queue.size() {
        tracing::debug!("virtio-console: skipping chain with head index {head} out of range");
        return Ok(false);
    }
    queue
        .add_used(mem, head, len)
        .map_err(QueueError::UsedRing)?;
    Ok(true)
}

fn notify<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<bool, QueueError> {
    queue
        .needs_notification(mem)
        .map_err(QueueError::Notification)
}
