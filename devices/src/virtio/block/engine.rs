//! I/O engines: how a queue worker executes the requests it pops. Both share the ring
//! handling and the parsing and validation of [`request`](super::request); they differ
//! in when the data moves.
//!
//! - [`IoEngine::Sync`]: each request is executed with blocking system calls before the
//!   next one is popped ([`queue::process_queue`]).
//! - [`IoEngine::Uring`]: the reads, writes and flushes of a whole batch are submitted
//!   to an io_uring at once and each chain completes when its CQE arrives (module
//!   `uring`); the worker also waits on the ring's completion eventfd.

use std::os::fd::RawFd;
use std::str::FromStr;

use virtio_queue::Queue;
use vm_memory::GuestMemory;

use super::queue::{self, QueueError, QueueStats};
use super::request::Disk;
use crate::dma::DmaTracker;

/// Which engine executes a disk's requests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    /// Blocking `preadv`/`pwritev`/`fdatasync` in the worker thread, one request at a
    /// time per queue.
    #[default]
    Sync,
    /// io_uring: a batch of requests in flight per queue.
    Uring,
}

impl FromStr for IoEngine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Self::Sync),
            "uring" | "io_uring" => Ok(Self::Uring),
            _ => Err(format!("unknown I/O engine `{s}` (sync or uring)")),
        }
    }
}

/// One queue's engine, driven by its worker thread. An engine holds a guard of the
/// device's DMA tracker while it touches guest memory for a request (an asynchronous
/// one keeps it with the request until its completion) and none while it waits.
pub(super) trait QueueEngine<M: GuestMemory> {
    /// Pops up to `budget` available chains and executes or submits them.
    fn serve(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        disk: &Disk,
        budget: usize,
    ) -> Result<QueueStats, QueueError>;

    /// A descriptor that becomes readable when submitted requests completed (`None`:
    /// every request completes inside [`serve`](Self::serve)).
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    /// Completes the requests whose I/O finished; `wait` blocks until at least one
    /// did (if any is in flight).
    fn reap(
        &mut self,
        _queue: &mut Queue,
        _mem: &M,
        _disk: &Disk,
        _wait: bool,
    ) -> Result<QueueStats, QueueError> {
        Ok(QueueStats::default())
    }

    /// Requests submitted and not completed yet.
    fn in_flight(&self) -> usize {
        0
    }
}

/// The synchronous engine.
pub(super) struct SyncEngine {
    /// The device's DMA fence: a guard per request.
    pub dma: DmaTracker,
}

impl<M: GuestMemory> QueueEngine<M> for SyncEngine {
    fn serve(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        disk: &Disk,
        budget: usize,
    ) -> Result<QueueStats, QueueError> {
        queue::process_queue(queue, mem, disk, &self.dma, budget)
    }
}
