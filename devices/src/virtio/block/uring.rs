//! The io_uring engine ([`IoEngine::Uring`](super::IoEngine::Uring)): a worker pops every
//! available chain, parses and validates it exactly as the synchronous engine does
//! ([`request::parse`]), and queues one SQE per read (READV), write (WRITEV) or flush
//! (FSYNC with DATASYNC); the whole batch goes to the kernel with one `io_uring_enter`.
//! Each chain completes when its CQE arrives, in whatever order the kernel finishes
//! them. GET_ID, DISCARD and WRITE_ZEROES (and refused requests) complete at once,
//! synchronously, as in the other engine.
//!
//! Ordering: a FLUSH is held back until every write accepted before it has completed
//! (its final CQE, after any resubmission of a short transfer), so `fdatasync` covers
//! them; later requests are not held behind the flush. Without VIRTIO_BLK_F_FLUSH each
//! write is synced when its CQE arrives, before it completes (write-through).
//!
//! Buffers: the iovecs point straight into guest memory ([`GuestIovecs`]); they and
//! their pointer guards belong to the in-flight request until its last CQE.
//!
//! DMA fences: a read or write keeps the guard of the device's DMA tracker it took
//! when its chain was popped (its buffers were translated under it) until its used
//! element is written, so an IOMMU UNMAP waits for the kernel to be done with the
//! buffers. A flush in flight holds none (it touches no guest memory until its status
//! byte, written under a new guard). The worker holds none while it waits for CQEs.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_OK;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use super::engine::QueueEngine;
use super::exec;
use super::io::{self as guest_io, GuestIovecs};
use super::queue::{return_chain, QueueError, QueueStats};
use super::request::{self, ioerr, Completion, Disk, Request, Transfer};
use crate::dma::{DmaGuard, DmaTracker};
use crate::virtio::dma_hold::DmaHold;
use crate::virtio::ring::{self, RingError, Step};

mod pending;
mod setup;

use self::pending::{advance, Pending};
pub(super) use self::setup::UringRing;
pub use self::setup::{probe, UringError};

/// Most iovecs in one READV/WRITEV (the kernel's UIO_MAXIOV); longer requests are
/// submitted in pieces, like a short transfer.
const IOV_MAX: usize = libc::UIO_MAXIOV as usize;

/// A request whose I/O is in the kernel's hands.
struct InFlight {
    head: u16,
    status: GuestAddress,
    op: Op,
    /// The request's DMA guard (reads and writes only), dropped once its used element
    /// is written.
    dma: Option<DmaGuard>,
}

enum Op {
    Io(Pending),
    Flush,
}

/// The engine of one queue. Lives on its worker thread (the pointer guards are not
/// `Send`).
pub(super) struct UringEngine {
    ring: IoUring,
    eventfd: EventFd,
    /// The image; owned by the disk's backend, which the worker keeps alive.
    fd: RawFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    next_seq: u64,
    /// Sequence numbers of the writes in flight.
    writes: BTreeSet<u64>,
    /// Flushes waiting for earlier writes: (slot, sequence number), in order.
    held_flushes: VecDeque<(usize, u64)>,
    /// Completions made up by the engine (an SQE that could not be queued).
    synthetic: Vec<(u64, i32)>,
    /// The device's DMA fence.
    dma: DmaTracker,
    /// Tests: process each batch of CQEs in reverse order.
    #[cfg(test)]
    pub reverse_completions: bool,
}

impl UringEngine {
    pub fn new(ring: UringRing, dma: DmaTracker) -> Self {
        let UringRing {
            ring,
            eventfd,
            fd,
            capacity,
        } = ring;
        Self {
            ring,
            eventfd,
            fd,
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            in_flight: 0,
            next_seq: 0,
            writes: BTreeSet::new(),
            held_flushes: VecDeque::new(),
            synthetic: Vec::new(),
            dma,
            #[cfg(test)]
            reverse_completions: false,
        }
    }

    fn alloc(&mut self, entry: InFlight) -> Option<usize> {
        let slot = self.free.pop()?;
        self.slots[slot] = Some(entry);
        self.in_flight += 1;
        Some(slot)
    }

    fn release(&mut self, slot: usize) {
        self.free.push(slot);
        self.in_flight -= 1;
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Parses `chain` and submits its I/O, or completes it at once (`Some`). A read or
    /// write in flight takes the guard of `hold` with it.
    fn start<M: GuestMemory>(
        &mut self,
        chain: DescriptorChain<&M>,
        mem: &M,
        disk: &Disk,
        hold: &mut DmaHold<'_>,
    ) -> Option<Completion> {
        let head = chain.head_index();
        let Some(parsed) = request::parse(chain, mem, disk) else {
            return Some(Completion::UNANSWERED);
        };
        let status = parsed.status;
        let outcome = match parsed.request {
            Err(refused) => (Err(refused), 0),
            Ok(Request::In(t)) => return self.start_io(head, status, t, false, mem, hold),
            Ok(Request::Out(t)) => return self.start_io(head, status, t, true, mem, hold),
            Ok(Request::Flush) => {
                let seq = self.seq();
                let flush = InFlight {
                    head,
                    status,
                    op: Op::Flush,
                    dma: None,
                };
                let Some(slot) = self.alloc(flush) else {
                    return Some(busy(mem, head, status));
                };
                self.held_flushes.push_back((slot, seq));
                self.release_flushes();
                return None;
            }
            Ok(other) => exec::execute(other, mem, disk, hold),
        };
        Some(request::finish(mem, head, status, outcome))
    }

    fn start_io<M: GuestMemory>(
        &mut self,
        head: u16,
        status: GuestAddress,
        t: Transfer,
        write: bool,
        mem: &M,
        hold: &mut DmaHold<'_>,
    ) -> Option<Completion> {
        let bufs = match GuestIovecs::new(mem, &t.parts, !write) {
            Ok(bufs) => bufs,
            Err(e) => {
                tracing::warn!("virtio-blk: chain {head}: {e}");
                let why = if write { "write failed" } else { "read failed" };
                return Some(request::finish(mem, head, status, (Err(ioerr(why)), 0)));
            }
        };
        let seq = self.seq();
        let io = Pending {
            write,
            seq,
            t,
            bufs,
            first: 0,
            done: 0,
        };
        let op = Op::Io(io);
        let Some(slot) = self.alloc(InFlight {
            head,
            status,
            op,
            dma: None,
        }) else {
            return Some(busy(mem, head, status));
        };
        if let Some(entry) = &mut self.slots[slot] {
            entry.dma = hold.take();
        }
        if write {
            self.writes.insert(seq);
        }
        self.push_io(slot);
        None
    }

    /// Queues the (rest of the) transfer of `slot`.
    fn push_io(&mut self, slot: usize) {
        let Some(InFlight { op: Op::Io(io), .. }) = &self.slots[slot] else {
            return;
        };
        let iovs = &io.bufs.iovs[io.first..];
        // At most IOV_MAX (1024), so it fits a u32.
        let count = iovs.len().min(IOV_MAX) as u32;
        let (fd, ptr, offset) = (types::Fd(self.fd), iovs.as_ptr(), io.t.offset + io.done);
        let entry = if io.write {
            opcode::Writev::new(fd, ptr, count).offset(offset).build()
        } else {
            opcode::Readv::new(fd, ptr, count).offset(offset).build()
        };
        self.push(entry.user_data(slot as u64));
    }

    /// Submits the flushes whose earlier writes all completed.
    fn release_flushes(&mut self) {
        while let Some(&(slot, seq)) = self.held_flushes.front() {
            if self.writes.first().is_some_and(|&write| write < seq) {
                break;
            }
            self.held_flushes.pop_front();
            let entry = opcode::Fsync::new(types::Fd(self.fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(slot as u64);
            self.push(entry);
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: the entry refers to the image fd, which the disk's backend keeps open
        // while the worker (and so this ring) lives, and, for READV/WRITEV, to the
        // iovec array of an in-flight request: that array, the guest buffers it points
        // to and their pointer guards are owned by `self.slots[slot]` and neither
        // changed nor dropped before the request's CQE was reaped (a short transfer is
        // resubmitted only after its CQE). The guest memory behind them stays mapped:
        // guest RAM is never unmapped while the device is active, the worker holds its
        // `GuestMemory` for its whole life, and it does not exit before every request
        // in flight has completed (`QueueEngine::reap` with `wait` until none is left).
        let queued = unsafe { self.ring.submission().push(&entry) };
        if queued.is_err() {
            // Cannot happen: at most `capacity` (the SQ size) requests are in flight,
            // each with at most one unsubmitted SQE. Fail the request anyway.
            tracing::error!("virtio-blk: io_uring submission queue full");
            self.synthetic.push((entry.get_user_data(), -libc::EBUSY));
            if let Err(e) = self.eventfd.write(1) {
                tracing::error!("virtio-blk: cannot signal a completion: {e}");
            }
        }
    }

    /// Hands the queued SQEs to the kernel.
    fn submit(&mut self, wait: usize) -> Result<(), QueueError> {
        loop {
            match self.ring.submit_and_wait(wait) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The completion queue is busy: the entries stay queued and go with
                // the next submission, after the reap that follows.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(()),
                Err(e) => return Err(QueueError::Engine(e)),
            }
        }
    }

    /// Handles the CQE `res` of `slot`; returns the chain to complete, if done, with
    /// the request's DMA guard (to drop once the used element is written). `hold` is
    /// put down while a write-through sync runs.
    fn complete<M: GuestMemory>(
        &mut self,
        slot: usize,
        res: i32,
        mem: &M,
        disk: &Disk,
        hold: &mut DmaHold<'_>,
    ) -> Option<(u16, Completion, Option<DmaGuard>)> {
        let Some(entry) = self.slots.get_mut(slot).and_then(Option::take) else {
            tracing::error!("virtio-blk: io_uring completion for unknown slot {slot}");
            return None;
        };
        let InFlight {
            head,
            status,
            op,
            mut dma,
        } = entry;
        let outcome = match op {
            Op::Flush if res < 0 => {
                let e = io::Error::from_raw_os_error(-res);
                tracing::warn!("virtio-blk: flush failed: {e}");
                (Err(ioerr("flush failed")), 0)
            }
            Op::Flush => (Ok(VIRTIO_BLK_S_OK), 0),
            Op::Io(mut io) => match advance(&mut io, res) {
                None => {
                    let op = Op::Io(io);
                    self.slots[slot] = Some(InFlight {
                        head,
                        status,
                        op,
                        dma,
                    });
                    self.push_io(slot);
                    return None;
                }
                Some(outcome) => {
                    if io.write {
                        self.writes.remove(&io.seq);
                    } else {
                        guest_io::mark_dirty(mem, &io.t.parts);
                    }
                    match outcome {
                        (Ok(_), _) if io.write => {
                            // The data is in the image: the sync needs no guest memory.
                            dma = None;
                            (hold.paused(|| exec::write_through(disk)), 0)
                        }
                        other => other,
                    }
                }
            },
        };
        self.release(slot);
        Some((head, request::finish(mem, head, status, outcome), dma))
    }
}

/// Completes a chain for which no slot is free. Cannot happen: `serve` stops popping
/// chains while every slot is taken, and a chain takes at most one.
fn busy<M: GuestMemory>(mem: &M, head: u16, status: GuestAddress) -> Completion {
    tracing::error!("virtio-blk: chain {head}: no io_uring slot free");
    request::finish(mem, head, status, (Err(ioerr("too many requests")), 0))
}

impl<M: GuestMemory> QueueEngine<M> for UringEngine {
    fn serve(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        disk: &Disk,
        budget: usize,
    ) -> Result<QueueStats, QueueError> {
        let mut stats = QueueStats::default();
        // A handle of our own: the hold borrows it while `self` changes.
        let dma = self.dma.clone();
        let mut hold = DmaHold::new(&dma);
        stats.more = ring::serve_batch(queue, mem, budget, |queue| {
            if self.free.is_empty() {
                // Every slot is taken: the rest waits for completions (`reap` is
                // followed by `serve`), with notifications still disabled.
                return Ok(Step::Pause);
            }
            let Some(chain) = ring::pop_chain(queue, mem)? else {
                return Ok(Step::Empty);
            };
            let head = chain.head_index();
            if let Some(done) = self.start(chain, mem, disk, &mut hold) {
                return_chain(queue, mem, head, done, &mut stats)?;
            }
            // This request completed or took its guard along: the next one gets its
            // own.
            hold.renew();
            Ok(Step::Next)
        })?;
        stats.notify = stats.completed > 0 && ring::needs_notification(queue, mem)?;
        drop(hold);
        self.submit(0)?;
        Ok(stats)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn reap(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        disk: &Disk,
        wait: bool,
    ) -> Result<QueueStats, QueueError> {
        let waiting = usize::from(wait && self.in_flight > 0 && self.synthetic.is_empty());
        let submitted = self.submit(waiting);
        if let Err(e) = self.eventfd.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!("virtio-blk: cannot read the io_uring eventfd: {e}");
            }
        }
        let mut cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        cqes.append(&mut self.synthetic);
        #[cfg(test)]
        if self.reverse_completions {
            cqes.reverse();
        }
        let mut stats = QueueStats::default();
        let mut failure = submitted.err();
        // Only now, after the wait: status bytes and used elements.
        let dma = self.dma.clone();
        let mut hold = DmaHold::new(&dma);
        for (slot, res) in cqes {
            // User data is always a slot index.
            let completed = self.complete(slot as usize, res, mem, disk, &mut hold);
            if let Some((head, done, guard)) = completed {
                if let Err(e) = return_chain(queue, mem, head, done, &mut stats) {
                    failure.get_or_insert(e.into());
                }
                drop(guard);
            }
        }
        let notify = if failure.is_none() && stats.completed > 0 {
            queue.needs_notification(mem)
        } else {
            Ok(false)
        };
        drop(hold);
        self.release_flushes();
        if let Err(e) = self.submit(0) {
            failure.get_or_insert(e);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        stats.notify = notify.map_err(RingError::Notification)?;
        Ok(stats)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// The io_uring engine of one queue driven on the calling thread, for the fuzz targets
/// in `fuzz/` (the `test-utils` feature): the worker's calls, without the worker.
#[cfg(feature = "test-utils")]
pub struct TestUringQueue(UringEngine);

#[cfg(feature = "test-utils")]
impl TestUringQueue {
    /// An engine on `disk`'s file for a queue of `size` entries, marking its guest
    /// memory accesses in `dma`.
    pub fn new(disk: &Disk, size: u16, dma: DmaTracker) -> Result<Self, UringError> {
        let fd = disk.backend.raw_file().ok_or(UringError::NoFile)?;
        Ok(Self(UringEngine::new(UringRing::new(fd, size)?, dma)))
    }

    /// Pops up to `budget` chains and submits them (a worker's kick).
    pub fn serve<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        disk: &Disk,
        budget: usize,
    ) -> Result<QueueStats, QueueError> {
        QueueEngine::serve(&mut self.0, queue, mem, disk, budget)
    }

    /// Completes what finished; `wait`: at least one request, if any is in flight.
    pub fn reap<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        disk: &Disk,
        wait: bool,
    ) -> Result<QueueStats, QueueError> {
        QueueEngine::reap(&mut self.0, queue, mem, disk, wait)
    }

    /// Requests submitted and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight
    }
}
