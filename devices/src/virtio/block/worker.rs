//! One virtio-blk worker thread per queue: waits on the queue's notify eventfd and a
//! kill eventfd, and runs [`queue::process_queue`].

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::QueueT;
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{self, QueueError};
use super::request::Disk;
use crate::virtio::{ActiveQueue, VirtioInterrupt};

/// Everything one worker needs, moved into its thread.
pub(super) struct WorkerCtx<M> {
    pub mem: M,
    pub queue: ActiveQueue,
    pub disk: Arc<Disk>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
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
                WorkerLoop {
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

    /// Stops the thread and waits for it (an in-flight request completes first).
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
                let mut fds = [
                    pollfd(self.kill.as_raw_fd()),
                    pollfd(if self.failed {
                        -1
                    } else {
                        self.ctx.queue.notify.as_raw_fd()
                    }),
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
                if fds[1].revents != 0 {
                    drain(&self.ctx.queue.notify);
                    if !self.serve() {
                        break;
                    }
                }
            }
        }
        tracing::debug!("virtio-blk: worker {index} stopped");
    }

    /// Serves the queue until it is empty; `false` when the kill eventfd fired
    /// meanwhile.
    fn serve(&mut self) -> bool {
        let queue_size = usize::from(self.ctx.queue.queue.size());
        while !self.failed {
            let result = queue::process_queue(
                &mut self.ctx.queue.queue,
                &self.ctx.mem,
                &self.ctx.disk,
                queue_size.max(1),
            );
            let stats = match result {
                Ok(stats) => stats,
                Err(e) => {
                    self.fail(e);
                    break;
                }
            };
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
            if !stats.more {
                break;
            }
            let mut fds = [pollfd(self.kill.as_raw_fd())];
            if matches!(poll(&mut fds, 0), Ok(n) if n > 0) {
                return false;
            }
        }
        true
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
