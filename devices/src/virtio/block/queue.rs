//! Ring handling of virtio-blk, apart from any thread: pops request chains, runs them
//! through [`request::process`](super::request::process) and returns them to the used
//! ring.
//!
//! Notification suppression works as in virtio-console: a batch drains with driver
//! notifications disabled and re-enables them with [`QueueT::enable_notification`],
//! looping when the driver published more requests meanwhile, so no kick is lost; the
//! interrupt decision is taken once per batch by [`QueueT::needs_notification`]
//! (EVENT_IDX aware). A batch stops after a budget of chains so that the worker can
//! look at its stop signal in between.
//!
//! DMA fences: every request holds a guard of the device's [`DmaTracker`] from the
//! pop of its chain to its used element (an IOMMU UNMAP waits for it, never for the
//! rest of the batch), put down while the backend syncs or discards without touching
//! guest memory.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;

use super::request::{self, Completion, Disk};
use crate::dma::DmaTracker;
use crate::virtio::dma_hold::DmaHold;
use crate::virtio::ring::RingError;

/// A ring error the device cannot recover from: it must report DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The ring itself is malformed or cannot be written.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The I/O engine cannot submit or reap requests any more.
    #[error("the I/O engine failed: {0}")]
    Engine(#[source] std::io::Error),
}

/// What one [`process_queue`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains returned to the used ring.
    pub completed: usize,
    /// Of those, chains that did not complete with VIRTIO_BLK_S_OK (error status, or
    /// no status byte at all), plus chains skipped because their head index was out
    /// of range.
    pub failed: usize,
    /// The budget ran out with requests possibly left: call again.
    pub more: bool,
    /// The driver must be interrupted for this queue.
    pub notify: bool,
}

/// Serves up to `budget` available requests of `queue` against `disk`. Each request,
/// from popping its chain to its used element, runs under its own guard of `dma`
/// (put down while the backend works without guest memory).
pub fn process_queue<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    disk: &Disk,
    dma: &DmaTracker,
    budget: usize,
) -> Result<QueueStats, QueueError> {
    let mut stats = QueueStats::default();
    let mut seen = 0usize;
    let mut hold = DmaHold::new(dma);
    'batch: loop {
        queue
            .disable_notification(mem)
            .map_err(RingError::Notification)?;
        while let Some(chain) = next_chain(queue, mem)? {
            let head = chain.head_index();
            let done = request::process(chain, mem, disk, &mut hold);
            return_chain(queue, mem, head, done, &mut stats)?;
            // This request is complete: an UNMAP waiting for it may go on.
            hold.renew();
            seen += 1;
            if seen >= budget {
                stats.more = true;
                break 'batch;
            }
        }
        if !queue
            .enable_notification(mem)
            .map_err(RingError::Notification)?
        {
            break;
        }
    }
    stats.notify = stats.completed > 0
        && queue
            .needs_notification(mem)
            .map_err(RingError::Notification)?;
    Ok(stats)
}

/// Puts a completed chain in the used ring and counts it in `stats`.
pub(super) fn return_chain<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head: u16,
    done: Completion,
    stats: &mut QueueStats,
) -> Result<(), QueueError> {
    if done.status != Some(0) {
        stats.failed += 1;
    }
    if head >= queue.size() {
        tracing::debug!("virtio-blk: skipping chain with head index {head} out of range");
    } else {
        queue
            .add_used(mem, head, done.used_len)
            .map_err(RingError::UsedRing)?;
        stats.completed += 1;
    }
    Ok(())
}

/// The next available chain, `None` when the ring is empty.
pub(super) fn next_chain<'m, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'m M,
) -> Result<Option<DescriptorChain<&'m M>>, QueueError> {
    Ok(crate::virtio::ring::pop_chain(queue, mem)?)
}
