//! One virtio-blk worker thread per queue: waits on the queue's notify eventfd, a kill
//! eventfd and, with the io_uring engine, the ring's completion eventfd, and drives its
//! [`QueueEngine`]. The engine takes the device's DMA guards itself; the worker holds
//! none while it polls.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemory;

use super::engine::{QueueEngine, SyncEngine};
use super::queue::{QueueError, QueueStats};
use super::request::Disk;
use super::uring::{UringEngine, UringRing};
use crate::dma::DmaTracker;
use crate::virtio::worker_util::{pollin, ThreadHook, Wake, WorkerBase, WorkerKind, WorkerThread};
use crate::virtio::{ActiveQueue, VirtioInterrupt};

/// Everything one worker needs, moved into its thread.
pub(super) struct WorkerCtx<M> {
    pub mem: M,
    pub queue: ActiveQueue,
    pub disk: Arc<Disk>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub engine: EngineSetup,
    /// The device's DMA fence, handed to the engine.
    pub dma: DmaTracker,
}

/// The engine a worker builds on its thread.
pub(super) enum EngineSetup {
    Sync,
    Uring(Box<UringRing>),
}

/// A running worker thread.
pub(super) type Worker = WorkerThread<()>;

/// Starts the `virtio-blk-q<index>` thread; `hook` runs first in it.
pub(super) fn spawn<M: GuestMemory + Send + 'static>(
    hook: &ThreadHook,
    ctx: WorkerCtx<M>,
) -> io::Result<Worker> {
    let name = format!("virtio-blk-q{}", ctx.queue.index);
    let interrupt = ctx.interrupt.clone();
    let kind = match ctx.engine {
        EngineSetup::Sync => WorkerKind::Blk,
        EngineSetup::Uring(_) => WorkerKind::BlkUring,
    };
    WorkerThread::spawn(name, kind, hook, interrupt, move |base| {
        let mut ctx = ctx;
        let setup = std::mem::replace(&mut ctx.engine, EngineSetup::Sync);
        let dma = ctx.dma.clone();
        let engine: Box<dyn QueueEngine<M>> = match setup {
            EngineSetup::Sync => Box::new(SyncEngine { dma }),
            EngineSetup::Uring(ring) => Box::new(UringEngine::new(*ring, dma)),
        };
        WorkerLoop { engine, ctx, base }.run()
    })
}

struct WorkerLoop<M> {
    ctx: WorkerCtx<M>,
    engine: Box<dyn QueueEngine<M>>,
    base: WorkerBase,
}

impl<M: GuestMemory> WorkerLoop<M> {
    fn run(&mut self) {
        let name = self.base.name().to_owned();
        tracing::debug!("{name}: worker started");
        // Requests and kicks may predate the thread.
        if self.serve() {
            loop {
                let mut fds = [
                    self.base.kill_pollfd(),
                    pollin((!self.base.failed()).then(|| self.ctx.queue.notify.as_raw_fd())),
                    pollin(self.engine.completion_fd()),
                ];
                match self.base.wait(&mut fds, -1) {
                    Wake::Ready => {}
                    Wake::Retry => continue,
                    Wake::Stop => break,
                }
                if fds[2].revents != 0 {
                    // Completions free slots: serve what waited for one, too.
                    self.reap(false);
                    if !self.serve() {
                        break;
                    }
                }
                if fds[1].revents != 0 {
                    self.base.drain(&self.ctx.queue.notify);
                    if !self.serve() {
                        break;
                    }
                }
            }
        }
        // The kernel may still be using guest buffers: wait for them all.
        let pending = self.engine.in_flight();
        if pending > 0 {
            tracing::debug!("{name}: waiting for {pending} request(s)");
        }
        while self.engine.in_flight() > 0 {
            if !self.reap(true) {
                tracing::error!("{name}: requests lost in the I/O engine");
                break;
            }
        }
        tracing::debug!("{name}: worker stopped");
    }

    /// Serves the queue until it is empty; `false` when the kill eventfd fired
    /// meanwhile.
    fn serve(&mut self) -> bool {
        let queue_size = usize::from(self.ctx.queue.queue.size());
        while !self.base.failed() {
            let result = self.engine.serve(
                &mut self.ctx.queue.queue,
                &self.ctx.mem,
                &self.ctx.disk,
                queue_size.max(1),
            );
            let more = match result {
                Ok(stats) => {
                    self.report(stats);
                    stats.more
                }
                Err(e) => {
                    self.base.fail(&e);
                    break;
                }
            };
            if !more {
                break;
            }
            if self.base.stop_requested() {
                return false;
            }
        }
        true
    }

    /// Completes what the engine finished (`wait`: blocking for at least one); `false`
    /// when the engine itself failed.
    fn reap(&mut self, wait: bool) -> bool {
        let result = self.engine.reap(
            &mut self.ctx.queue.queue,
            &self.ctx.mem,
            &self.ctx.disk,
            wait,
        );
        match result {
            Ok(stats) => self.report(stats),
            Err(e) => {
                let engine = matches!(e, QueueError::Engine(_));
                if !self.base.failed() {
                    self.base.fail(&e);
                }
                return !engine;
            }
        }
        true
    }

    fn report(&self, stats: QueueStats) {
        if stats.failed > 0 {
            tracing::debug!(
                "virtio-blk: queue {}: {} request(s) failed",
                self.ctx.queue.index,
                stats.failed
            );
        }
        if stats.notify {
            self.base.signal(self.ctx.queue.index);
        }
    }
}
