//! Ring handling of virtio-blk, apart from any thread: pops request chains, runs them
//! through [`request::process`](super::request::process) and returns them to the used
//! ring.
//!
//! Notification suppression is that of every device ([`ring::serve_batch`]): a batch
//! drains with driver notifications disabled and re-enables them, looping when the
//! driver published more requests meanwhile, so no kick is lost; the interrupt
//! decision is taken once per batch by [`ring::needs_notification`] (EVENT_IDX
//! aware). A batch stops after a budget of chains so that the worker can look at its
//! stop signal in between.
//!
//! DMA fences: every request holds a guard of the device's [`DmaTracker`] from the
//! pop of its chain to its used element (an IOMMU UNMAP waits for it, never for the
//! rest of the batch), put down while the backend syncs or discards without touching
//! guest memory.

use virtio_queue::Queue;
use vm_memory::GuestMemory;

use super::request::{self, Completion, Disk};
use crate::dma::DmaTracker;
use crate::virtio::dma_hold::DmaHold;
use crate::virtio::ring::{self, RingError, Step};

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
    let mut hold = DmaHold::new(dma);
    stats.more = ring::serve_batch(queue, mem, budget, |queue| {
        let Some(chain) = ring::pop_chain(queue, mem)? else {
            return Ok(Step::Empty);
        };
        let head = chain.head_index();
        let done = request::process(chain, mem, disk, &mut hold);
        return_chain(queue, mem, head, done, &mut stats)?;
        // This request is complete: an UNMAP waiting for it may go on.
        hold.renew();
        Ok(Step::Next)
    })?;
    stats.notify = stats.completed > 0 && ring::needs_notification(queue, mem)?;
    Ok(stats)
}

/// Puts a completed chain in the used ring and counts it in `stats`.
pub(super) fn return_chain<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head: u16,
    done: Completion,
    stats: &mut QueueStats,
) -> Result<(), RingError> {
    if done.status != Some(0) {
        stats.failed += 1;
    }
    if ring::return_chain("virtio-blk", queue, mem, head, done.used_len)? {
        stats.completed += 1;
    }
    Ok(())
}
