//! The virtio-console worker thread: waits on the queue notifications, the host input
//! and a kill eventfd, and runs the [`queue`] functions.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, PoisonError};

use vm_memory::GuestMemory;

use super::queue;
use super::{InputSource, SharedSink, MAX_PENDING_INPUT, RX_QUEUE, TX_QUEUE};
use crate::dma::DmaTracker;
use crate::virtio::worker_util::{pollin, ThreadHook, Wake, WorkerBase, WorkerKind, WorkerThread};
use crate::virtio::{ActiveQueue, VirtioInterrupt};

/// Largest single read from the input.
const READ_CHUNK: usize = 4096;

/// The host side of the input; it outlives activations (pending bytes are kept over a
/// reset).
#[derive(Default)]
pub(super) struct HostInput {
    /// Where input comes from; `None` when there is none, or after EOF or a read error.
    pub source: Option<InputSource>,
    /// Bytes read from the source, not yet delivered to the guest.
    pub pending: VecDeque<u8>,
}

/// Everything the worker needs, moved into its thread.
pub(super) struct WorkerCtx<M> {
    pub mem: M,
    pub rx: ActiveQueue,
    pub tx: ActiveQueue,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub sink: SharedSink,
    pub input: HostInput,
    /// The device's DMA fence (guards are taken by the queue functions).
    pub dma: DmaTracker,
}

/// A running worker thread; stopping it gives back the host input with what is still
/// pending (`None` if the thread panicked).
pub(super) type Worker = WorkerThread<HostInput>;

/// Starts the `virtio-console` thread; `hook` runs first in it.
pub(super) fn spawn<M: GuestMemory + Send + 'static>(
    hook: &ThreadHook,
    ctx: WorkerCtx<M>,
) -> io::Result<Worker> {
    let interrupt = ctx.interrupt.clone();
    let name = "virtio-console".to_owned();
    WorkerThread::spawn(name, WorkerKind::Console, hook, interrupt, move |base| {
        let mut worker = WorkerLoop {
            ctx,
            base,
            sink_failing: false,
        };
        worker.run();
        worker.ctx.input
    })
}

struct WorkerLoop<M> {
    ctx: WorkerCtx<M>,
    base: WorkerBase,
    /// The last transmit batch lost output (logged once until the sink recovers).
    sink_failing: bool,
}

impl<M: GuestMemory> WorkerLoop<M> {
    fn run(&mut self) {
        tracing::debug!("virtio-console: worker started");
        // Buffers and kicks may predate the thread; pending input may predate the
        // activation.
        self.process_tx();
        self.process_rx();
        loop {
            let queues = !self.base.failed();
            let want_input = queues
                && self.ctx.input.source.is_some()
                && self.ctx.input.pending.len() < MAX_PENDING_INPUT;
            let input_fd = self.ctx.input.source.as_ref().map(|s| s.as_raw_fd());
            let mut fds = [
                self.base.kill_pollfd(),
                pollin(queues.then(|| self.ctx.tx.notify.as_raw_fd())),
                pollin(queues.then(|| self.ctx.rx.notify.as_raw_fd())),
                pollin(input_fd.filter(|_| want_input)),
            ];
            match self.base.wait(&mut fds, -1) {
                Wake::Ready => {}
                Wake::Retry => continue,
                Wake::Stop => break,
            }
            if fds[1].revents != 0 {
                self.base.drain(&self.ctx.tx.notify);
                self.process_tx();
            }
            let mut deliver = false;
            if fds[2].revents != 0 {
                self.base.drain(&self.ctx.rx.notify);
                deliver = true;
            }
            if fds[3].revents != 0 {
                self.read_input(fds[3].revents);
                deliver = true;
            }
            if deliver {
                self.process_rx();
            }
        }
        tracing::debug!("virtio-console: worker stopped");
    }

    fn process_tx(&mut self) {
        if self.base.failed() {
            return;
        }
        let result = {
            let mut sink = self.ctx.sink.lock().unwrap_or_else(PoisonError::into_inner);
            queue::process_tx(
                &mut self.ctx.tx.queue,
                &self.ctx.mem,
                &mut **sink,
                &self.ctx.dma,
            )
        };
        match result {
            Ok(stats) => {
                if stats.invalid > 0 {
                    tracing::warn!(
                        "virtio-console: {} malformed transmitq chain(s) refused",
                        stats.invalid
                    );
                }
                if stats.lost > 0 && !self.sink_failing {
                    tracing::warn!("virtio-console: the output sink fails; guest output is lost");
                } else if stats.lost == 0 && stats.bytes > 0 && self.sink_failing {
                    tracing::info!("virtio-console: the output sink works again");
                }
                if stats.lost > 0 || stats.bytes > 0 {
                    self.sink_failing = stats.lost > 0;
                }
                if stats.notify {
                    self.base.signal(TX_QUEUE);
                }
            }
            Err(e) => self.base.fail(&e),
        }
    }

    fn process_rx(&mut self) {
        if self.base.failed() {
            return;
        }
        let result = queue::fill_rx(
            &mut self.ctx.rx.queue,
            &self.ctx.mem,
            &mut self.ctx.input.pending,
            &self.ctx.dma,
        );
        match result {
            Ok(stats) => {
                if stats.invalid > 0 {
                    tracing::warn!(
                        "virtio-console: {} malformed receiveq chain(s) refused",
                        stats.invalid
                    );
                }
                if stats.notify {
                    self.base.signal(RX_QUEUE);
                }
            }
            Err(e) => self.base.fail(&e),
        }
    }

    /// Reads what fits below [`MAX_PENDING_INPUT`]; stops polling the source at EOF or
    /// on an error.
    fn read_input(&mut self, revents: libc::c_short) {
        let input = &mut self.ctx.input;
        let Some(source) = input.source.as_mut() else {
            return;
        };
        if revents & libc::POLLNVAL != 0 {
            tracing::warn!("virtio-console: input fd is not open; input stops");
            input.source = None;
            return;
        }
        let room = MAX_PENDING_INPUT.saturating_sub(input.pending.len());
        let mut buf = [0u8; READ_CHUNK];
        let want = room.min(buf.len());
        match source.read(&mut buf[..want]) {
            Ok(0) => {
                tracing::debug!("virtio-console: input reached EOF");
                input.source = None;
            }
            Ok(n) => input.pending.extend(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => {
                tracing::warn!("virtio-console: cannot read input: {e}; input stops");
                input.source = None;
            }
        }
    }
}
