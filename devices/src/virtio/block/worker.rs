//! One virtio-blk worker thread per queue: waits on the queue's notify eventfd, a kill
//! eventfd and, with the io_uring engine, the ring's completion eventfd, and drives its
//! [`QueueEngine`]. The engine takes the device's DMA guards itself; the worker holds
//! none while it polls.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::QueueT;
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::engine::{QueueEngine, SyncEngine};
use super::queue::{QueueError, QueueStats};
use super::request::Disk;
use super::uring::{UringEngine, UringRing};
use crate::dma::DmaTracker;
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
pub(super) struct Worker {
    index: u16,
    kill: EventFd,
    handle: JoinHandle<()>,
}

impl Worker {
    /// Starts the `virtio-blk-q<index>` thread.
    pub fn spawn<M: GuestMemory + Send + 'static>(ctx: WorkerCtx<M>) -> io::Result<Worker> {
        let index = ctx.queue.index;
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let worker_kill = kill.try_clone()?;
        let handle = std::thread::Builder::new()
            .name(format!("virtio-blk-q{index}"))
            .spawn(move || {
                let mut ctx = ctx;
                let setup = std::mem::replace(&mut ctx.engine, EngineSetup::Sync);
                let dma = ctx.dma.clone();
                let engine: Box<dyn QueueEngine<M>> = match setup {
                    EngineSetup::Sync => Box::new(SyncEngine { dma }),
                    EngineSetup::Uring(ring) => Box::new(UringEngine::new(*ring, dma)),
                };
                WorkerLoop {
                    engine,
                    ctx,
                    kill: worker_kill,
                    failed: false,
                }
                .run()
            })?;
        Ok(Worker {
            index,
            kill,
            handle,
        })
    }

    /// Stops the thread and waits for it (the requests in flight complete first).
    pub fn stop(self) {
        if let Err(e) = self.kill.write(1) {
            tracing::error!(
                "virtio-blk: cannot signal worker {} to stop: {e}",
                self.index
            );
        }
        if self.handle.join().is_err() {
            tracing::error!("virtio-blk: worker {} panicked", self.index);
        }
    }
}

struct WorkerLoop<M> {
    ctx: WorkerCtx<M>,
    engine: Box<dyn QueueEngine<M>>,
    kill: EventFd,
    /// A ring error was reported (DEVICE_NEEDS_RESET): the queue is left alone until
    /// the reset.
    failed: bool,
}

impl<M: GuestMemory> WorkerLoop<M> {
    fn run(&mut self) {
        let index = self.ctx.queue.index;
        tracing::debug!("virtio-blk: worker {index} started");
        // Requests and kicks may predate the thread.
        if self.serve() {
            loop {
                let completions = self.engine.completion_fd().unwrap_or(-1);
                let mut fds = [
                    pollfd(self.kill.as_raw_fd()),
                    pollfd(if self.failed {
                        -1
                    } else {
                        self.ctx.queue.notify.as_raw_fd()
                    }),
                    pollfd(completions),
                ];
                match poll(&mut fds, -1) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("virtio-blk: worker {index}: poll failed: {e}");
                        self.ctx.interrupt.device_error();
                        break;
                    }
                }
                if fds[0].revents != 0 {
                    break;
                }
                if fds[2].revents != 0 {
                    // Completions free slots: serve what waited for one, too.
                    self.reap(false);
                    if !self.serve() {
                        break;
                    }
                }
                if fds[1].revents != 0 {
                    drain(&self.ctx.queue.notify);
                    if !self.serve() {
                        break;
                    }
                }
            }
        }
        // The kernel may still be using guest buffers: wait for them all.
        let pending = self.engine.in_flight();
        if pending > 0 {
            tracing::debug!("virtio-blk: worker {index}: waiting for {pending} request(s)");
        }
        while self.engine.in_flight() > 0 {
            if !self.reap(true) {
                tracing::error!("virtio-blk: worker {index}: requests lost in the I/O engine");
                break;
            }
        }
        tracing::debug!("virtio-blk: worker {index} stopped");
    }

    /// Serves the queue until it is empty; `false` when the kill eventfd fired
    /// meanwhile.
    fn serve(&mut self) -> bool {
        let queue_size = usize::from(self.ctx.queue.queue.size());
        while !self.failed {
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
                    self.fail(e);
                    break;
                }
            };
            if !more {
                break;
            }
            let mut fds = [pollfd(self.kill.as_raw_fd())];
            if matches!(poll(&mut fds, 0), Ok(n) if n > 0) {
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
                if !self.failed {
                    self.fail(e);
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
            if let Err(e) = self.ctx.interrupt.signal_queue(self.ctx.queue.index) {
                tracing::warn!(
                    "virtio-blk: cannot signal queue {}: {e}",
                    self.ctx.queue.index
                );
            }
        }
    }

    fn fail(&mut self, e: QueueError) {
        tracing::error!(
            "virtio-blk: queue {}: {e}; the device needs a reset",
            self.ctx.queue.index
        );
        self.failed = true;
        self.ctx.interrupt.device_error();
    }
}

/// A pollfd waiting for input on `fd` (ignored by poll when negative).
fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, writable slice of `fds.len()` pollfd structs that lives
    // across the call; poll only writes their `revents` fields.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Consumes a notification eventfd's counter (nothing to do if it is already zero).
fn drain(fd: &EventFd) {
    if let Err(e) = fd.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::warn!("virtio-blk: cannot read a notification eventfd: {e}");
        }
    }
}
