//! The virtio-iommu worker thread: waits on the queue notifications, the fault
//! eventfd (written by endpoints when they record a fault) and a kill eventfd, and runs
//! the [`crate::queue`] functions.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use ferrio_devices::virtio::worker_util::{
    pollin, ThreadHook, Wake, WorkerBase, WorkerKind, WorkerThread,
};
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
    thread: WorkerThread<()>,
    shared: Arc<Shared>,
}

impl Worker {
    /// Starts the `virtio-iommu` thread (`hook` runs first in it); endpoints wake it
    /// from now on when they record a fault.
    pub fn spawn<M: GuestMemory + Send + 'static>(
        hook: &ThreadHook,
        ctx: WorkerCtx<M>,
    ) -> io::Result<Worker> {
        let fault_wake = EventFd::new(EFD_NONBLOCK)?;
        let shared = ctx.shared.clone();
        shared.faults.set_waker(Some(fault_wake.try_clone()?));
        let interrupt = ctx.interrupt.clone();
        let name = "virtio-iommu".to_owned();
        let kind = WorkerKind::Iommu;
        let spawned = WorkerThread::spawn(name, kind, hook, interrupt, move |base| {
            WorkerLoop {
                ctx,
                base,
                fault_wake,
            }
            .run()
        });
        match spawned {
            Ok(thread) => Ok(Worker { thread, shared }),
            Err(e) => {
                shared.faults.set_waker(None);
                Err(e)
            }
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(self) {
        self.shared.faults.set_waker(None);
        self.thread.stop();
    }
}

struct WorkerLoop<M> {
    ctx: WorkerCtx<M>,
    base: WorkerBase,
    fault_wake: EventFd,
}

impl<M: GuestMemory> WorkerLoop<M> {
    fn run(&mut self) {
        tracing::debug!("virtio-iommu: worker started");
        // Requests and faults may predate the thread.
        self.process_requests();
        self.post_faults();
        loop {
            let queues = !self.base.failed();
            let mut fds = [
                self.base.kill_pollfd(),
                pollin(queues.then(|| self.ctx.requests.notify.as_raw_fd())),
                pollin(queues.then(|| self.ctx.events.notify.as_raw_fd())),
                pollin(queues.then(|| self.fault_wake.as_raw_fd())),
            ];
            match self.base.wait(&mut fds, -1) {
                Wake::Ready => {}
                Wake::Retry => continue,
                Wake::Stop => break,
            }
            if fds[1].revents != 0 {
                self.base.drain(&self.ctx.requests.notify);
                self.process_requests();
            }
            if fds[2].revents != 0 || fds[3].revents != 0 {
                self.base.drain(&self.ctx.events.notify);
                self.base.drain(&self.fault_wake);
                self.post_faults();
            }
        }
        tracing::debug!("virtio-iommu: worker stopped");
    }

    fn process_requests(&mut self) {
        if self.base.failed() {
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
                    self.base.signal(REQUEST_QUEUE);
                }
            }
            Err(e) => self.base.fail(&e),
        }
    }

    fn post_faults(&mut self) {
        if self.base.failed() {
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
                    self.base.signal(EVENT_QUEUE);
                }
            }
            Err(e) => self.base.fail(&e),
        }
    }
}
