//! The virtio-iommu worker thread: waits on the queue notifications, the fault
//! eventfd (written by endpoints when they record a fault) and a kill eventfd, and runs
//! the [`crate::queue`] functions.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use ferrio_devices::virtio::ring::RingError;
use ferrio_devices::virtio::{ActiveQueue, VirtioInterrupt};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{EVENT_QUEUE, REQUEST_QUEUE};
use crate::domain::Shared;
use crate::queue;
use crate::request::RequestCtx;

/// Everything the worker needs, moved into its thread.
pub(crate) struct WorkerCtx<M> {
    pub mem: M,
    pub requests: ActiveQueue,
    pub events: ActiveQueue,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub shared: Arc<Shared>,
    pub request_ctx: RequestCtx,
}

/// A running worker thread.
pub(crate) struct Worker {
    kill: EventFd,
    handle: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Worker {
    /// Starts the `virtio-iommu` thread; endpoints wake it from now on when they
    /// record a fault.
    pub fn spawn<M: GuestMemory + Send + 'static>(ctx: WorkerCtx<M>) -> io::Result<Worker> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let worker_kill = kill.try_clone()?;
        let fault_wake = EventFd::new(EFD_NONBLOCK)?;
        let shared = ctx.shared.clone();
        shared.faults.set_waker(Some(fault_wake.try_clone()?));
        let spawned = std::thread::Builder::new()
            .name("virtio-iommu".into())
            .spawn(move || {
                WorkerLoop {
                    ctx,
                    kill: worker_kill,
                    fault_wake,
                    failed: false,
                }
                .run()
            });
        match spawned {
            Ok(handle) => Ok(Worker {
                kill,
                handle,
                shared,
            }),
            Err(e) => {
                shared.faults.set_waker(None);
                Err(e)
            }
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(self) {
        self.shared.faults.set_waker(None);
        if let Err(e) = self.kill.write(1) {
            tracing::error!("virtio-iommu: cannot signal the worker to stop: {e}");
        }
        if self.handle.join().is_err() {
            tracing::error!("virtio-iommu: worker thread panicked");
        }
    }
}

struct WorkerLoop<M> {
    ctx: WorkerCtx<M>,
    kill: EventFd,
    fault_wake: EventFd,
    /// A ring error was reported (DEVICE_NEEDS_RESET): the queues are left alone until
    /// the reset.
    failed: bool,
}

impl<M: GuestMemory> WorkerLoop<M> {
    fn run(&mut self) {
        tracing::debug!("virtio-iommu: worker started");
        // Requests and faults may predate the thread.
        self.process_requests();
        self.post_faults();
        loop {
            let queues = !self.failed;
            let mut fds = [
                pollfd(Some(self.kill.as_raw_fd())),
                pollfd(queues.then(|| self.ctx.requests.notify.as_raw_fd())),
                pollfd(queues.then(|| self.ctx.events.notify.as_raw_fd())),
                pollfd(queues.then(|| self.fault_wake.as_raw_fd())),
            ];
            // SAFETY: `fds` is a valid, writable array of `fds.len()` pollfd structs that
            // lives across the call; poll only writes their `revents` fields.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("virtio-iommu: poll failed: {e}; worker stops");
                self.ctx.interrupt.device_error();
                break;
            }
            if fds[0].revents != 0 {
                break;
            }
            if fds[1].revents != 0 {
                drain(&self.ctx.requests.notify);
                self.process_requests();
            }
            if fds[2].revents != 0 || fds[3].revents != 0 {
                drain(&self.ctx.events.notify);
                drain(&self.fault_wake);
                self.post_faults();
            }
        }
        tracing::debug!("virtio-iommu: worker stopped");
    }

    fn process_requests(&mut self) {
        if self.failed {
            return;
        }
        let ctx = &mut self.ctx;
        match queue::process_requests(
            &mut ctx.requests.queue,
            &ctx.mem,
            &ctx.shared,
            &ctx.request_ctx,
        ) {
            Ok(stats) => {
                if stats.unparsable > 0 {
                    tracing::warn!(
                        "virtio-iommu: {} request chain(s) returned unanswered",
                        stats.unparsable
                    );
                }
                if stats.notify {
                    self.signal(REQUEST_QUEUE);
                }
            }
            Err(e) => self.fail(e),
        }
    }

    fn post_faults(&mut self) {
        if self.failed {
            return;
        }
        let ctx = &mut self.ctx;
        match queue::post_faults(&mut ctx.events.queue, &ctx.mem, &ctx.shared.faults) {
            Ok(stats) => {
                if stats.invalid > 0 {
                    tracing::warn!(
                        "virtio-iommu: {} unusable eventq buffer(s) returned",
                        stats.invalid
                    );
                }
                if stats.notify {
                    self.signal(EVENT_QUEUE);
                }
            }
            Err(e) => self.fail(e),
        }
    }

    fn signal(&self, queue: u16) {
        if let Err(e) = self.ctx.interrupt.signal_queue(queue) {
            tracing::warn!("virtio-iommu: cannot signal queue {queue}: {e}");
        }
    }

    fn fail(&mut self, e: RingError) {
        tracing::error!("virtio-iommu: {e}; the device needs a reset");
        self.failed = true;
        self.ctx.interrupt.device_error();
    }
}

/// A pollfd waiting for input on `fd`; a negative fd (ignored by poll) for `None`.
fn pollfd(fd: Option<RawFd>) -> libc::pollfd {
    libc::pollfd {
        fd: fd.unwrap_or(-1),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Consumes an eventfd's counter (nothing to do if it is already zero).
fn drain(fd: &EventFd) {
    if let Err(e) = fd.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::warn!("virtio-iommu: cannot read an eventfd: {e}");
        }
    }
}
