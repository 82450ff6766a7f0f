//! The virtio-console worker thread: waits on the queue notifications, the host input
//! and a kill eventfd, and runs the [`queue`] functions.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;

use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{self, QueueError};
use super::{InputSource, SharedSink, MAX_PENDING_INPUT, RX_QUEUE, TX_QUEUE};
use crate::dma::DmaTracker;
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

/// A running worker thread.
pub(super) struct Worker {
    kill: EventFd,
    handle: JoinHandle<HostInput>,
}

impl Worker {
    /// Starts the `virtio-console` thread.
    pub fn spawn<M: GuestMemory + Send + 'static>(ctx: WorkerCtx<M>) -> io::Result<Worker> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let worker_kill = kill.try_clone()?;
        let handle = std::thread::Builder::new()
            .name("virtio-console".into())
            .spawn(move || {
                let mut worker = WorkerLoop {
                    ctx,
                    kill: worker_kill,
                    failed: false,
                    sink_failing: false,
                };
                worker.run();
                worker.ctx.input
            })?;
        Ok(Worker { kill, handle })
    }

    /// Stops the thread and waits for it; returns the host input with what is still
    /// pending (empty if the thread panicked).
    pub fn stop(self) -> HostInput {
        if let Err(e) = self.kill.write(1) {
            tracing::error!("virtio-console: cannot signal the worker to stop: {e}");
        }
        match self.handle.join() {
            Ok(input) => input,
            Err(_) => {
                tracing::error!("virtio-console: worker thread panicked; host input lost");
                HostInput::default()
            }
        }
    }
}

struct WorkerLoop<M> {
    ctx: WorkerCtx<M>,
    kill: EventFd,
    /// A ring error was reported (DEVICE_NEEDS_RESET): the queues are left alone until
    /// the reset.
    failed: bool,
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
            let queues = !self.failed;
            let want_input = queues
                && self.ctx.input.source.is_some()
                && self.ctx.input.pending.len() < MAX_PENDING_INPUT;
            let input_fd = self.ctx.input.source.as_ref().map(|s| s.as_raw_fd());
            let mut fds = [
                pollfd(Some(self.kill.as_raw_fd())),
                pollfd(queues.then(|| self.ctx.tx.notify.as_raw_fd())),
                pollfd(queues.then(|| self.ctx.rx.notify.as_raw_fd())),
                pollfd(input_fd.filter(|_| want_input)),
            ];
            // SAFETY: `fds` is a valid, writable array of `fds.len()` pollfd structs that
            // lives across the call; poll only writes their `revents` fields.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("virtio-console: poll failed: {e}; worker stops");
                self.ctx.interrupt.device_error();
                break;
            }
            if fds[0].revents != 0 {
                break;
            }
            if fds[1].revents != 0 {
                drain(&self.ctx.tx.notify);
                self.process_tx();
            }
            let mut deliver = false;
            if fds[2].revents != 0 {
                drain(&self.ctx.rx.notify);
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
        if self.failed {
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
                    self.signal(TX_QUEUE);
                }
            }
            Err(e) => self.fail(e),
        }
    }

    fn process_rx(&mut self) {
        if self.failed {
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
                    self.signal(RX_QUEUE);
                }
            }
            Err(e) => self.fail(e),
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

    fn signal(&self, queue: u16) {
        if let Err(e) = self.ctx.interrupt.signal_queue(queue) {
            tracing::warn!("virtio-console: cannot signal queue {queue}: {e}");
        }
    }

    fn fail(&mut self, e: QueueError) {
        tracing::error!("virtio-console: {e}; the device needs a reset");
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

/// Consumes a notification eventfd's counter (nothing to do if it is already zero).
fn drain(fd: &EventFd) {
    if let Err(e) = fd.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::warn!("virtio-console: cannot read a notification eventfd: {e}");
        }
    }
}
