//! One virtio-net worker thread per queue pair (`virtio-net-qN`): polls a kill eventfd,
//! its wake-up eventfd (queue pairs enabled or disabled), the notify eventfds of its
//! receiveq and transmitq (and of the control queue, on pair 0) and its host queue fd,
//! and runs the ring functions of [`rx`](super::rx), [`tx`](super::tx) and
//! [`ctrl`](super::ctrl).
//!
//! The host fd is polled for POLLIN only while the pair is in use and the guest has
//! receive buffers (after the guest ran out, the next receiveq notification resumes
//! reading), and for POLLOUT only while a transmitted frame waits for room (EAGAIN).
//! When the guest leaves buffers, but too few for a largest frame, and adds none for
//! [`SHORT_RING_WAIT`], frames are read into what is there ([`RxFill::Short`]): a driver
//! may wait for frames before it refills.
//!
//! DMA fences: each pass over a queue (a batch of at most [`BUDGET`] frames or
//! commands, on non-blocking fds) holds a guard of the device's DMA tracker; none is
//! held in poll, so an IOMMU UNMAP never waits for the guest to post buffers, for the
//! host to send frames or for room in a full TAP.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::TapQueue;
use super::ctrl::{self, CtrlCtx};
use super::header::TxOffloads;
use super::pairs::Pairs;
use super::rx::{self, RxFill, RxParams, RxState};
use super::stats::NetStats;
use super::tx;
use crate::dma::DmaTracker;
use crate::virtio::ring::RingError;
use crate::virtio::{ActiveQueue, VirtioInterrupt};

/// Frames one pass serves per direction before looking at the other fds.
const BUDGET: usize = 128;
/// How long the receiveq may hold too few buffers for a largest frame before frames are
/// read into them anyway.
pub(super) const SHORT_RING_WAIT: Duration = Duration::from_millis(10);

/// The control queue, served by the pair-0 worker.
pub(super) struct CtrlQueue {
    pub queue: ActiveQueue,
    /// VIRTIO_NET_F_CTRL_RX negotiated.
    pub ctrl_rx: bool,
    /// VIRTIO_NET_F_MQ negotiated.
    pub mq: bool,
}

/// Everything one worker needs, moved into its thread.
pub(super) struct WorkerCtx<M> {
    pub pair: u16,
    pub mem: M,
    pub rx: ActiveQueue,
    pub tx: ActiveQueue,
    pub ctrl: Option<CtrlQueue>,
    pub tap: Arc<dyn TapQueue>,
    pub pairs: Arc<Pairs>,
    /// Written when the pairs in use change.
    pub wake: EventFd,
    pub rx_params: RxParams,
    pub tx_offloads: TxOffloads,
    pub stats: NetStats,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The device's DMA fence: a guard around each pass over a queue.
    pub dma: DmaTracker,
}

/// A running worker thread.
pub(super) struct Worker {
    pair: u16,
    kill: EventFd,
    handle: JoinHandle<()>,
}

impl Worker {
    /// Starts the `virtio-net-q<pair>` thread.
    pub fn spawn<M: GuestMemory + Send + 'static>(ctx: WorkerCtx<M>) -> io::Result<Worker> {
        let pair = ctx.pair;
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let worker_kill = kill.try_clone()?;
        let handle = std::thread::Builder::new()
            .name(format!("virtio-net-q{pair}"))
            .spawn(move || {
                WorkerLoop {
                    ctx,
                    kill: worker_kill,
                    failed: false,
                    rx_paused: false,
                    rx_short_since: None,
                    rx_more: false,
                    tx_blocked: false,
                    tx_more: false,
                    ctrl_more: false,
                }
                .run()
            })?;
        Ok(Worker { pair, kill, handle })
    }

    /// Stops the thread and waits for it.
    pub fn stop(self) {
        if let Err(e) = self.kill.write(1) {
            tracing::error!(
                "virtio-net: cannot signal worker {} to stop: {e}",
                self.pair
            );
        }
        if self.handle.join().is_err() {
            tracing::error!("virtio-net: worker {} panicked", self.pair);
        }
    }
}

struct WorkerLoop<M> {
    ctx: WorkerCtx<M>,
    kill: EventFd,
    /// A ring error was reported (DEVICE_NEEDS_RESET): the queues are left alone.
    failed: bool,
    /// The guest has no buffers for a largest frame, or the host end failed: the host
    /// fd is not read until a receiveq notification or a wake-up.
    rx_paused: bool,
    /// Since when the receiveq has buffers, but too few for a largest frame.
    rx_short_since: Option<Instant>,
    /// The receive budget ran out with frames possibly left.
    rx_more: bool,
    /// A transmitted frame waits for room in the host queue.
    tx_blocked: bool,
    /// The transmit budget ran out with frames possibly left.
    tx_more: bool,
    /// The control budget ran out with commands possibly left.
    ctrl_more: bool,
}

impl<M: GuestMemory> WorkerLoop<M> {
    fn run(&mut self) {
        let pair = self.ctx.pair;
        tracing::debug!("virtio-net: worker {pair} started");
        // Buffers and kicks may predate the thread.
        self.serve_ctrl();
        self.serve_tx();
        self.serve_rx(RxFill::Full);
        loop {
            let live = !self.failed;
            let enabled = self.ctx.pairs.is_enabled(pair);
            let mut tap_events = 0;
            if live && enabled && !self.rx_paused {
                tap_events |= libc::POLLIN;
            }
            if live && self.tx_blocked {
                tap_events |= libc::POLLOUT;
            }
            let ctrl_fd = self.ctx.ctrl.as_ref().map(|c| c.queue.notify.as_raw_fd());
            let mut fds = [
                pollfd(self.kill.as_raw_fd(), libc::POLLIN),
                pollfd(self.ctx.wake.as_raw_fd(), libc::POLLIN),
                pollfd(live_fd(live, self.ctx.rx.notify.as_raw_fd()), libc::POLLIN),
                pollfd(
                    live_fd(live && !self.tx_blocked, self.ctx.tx.notify.as_raw_fd()),
                    libc::POLLIN,
                ),
                pollfd(
                    live_fd(tap_events != 0, self.ctx.tap.as_raw_fd()),
                    tap_events,
                ),
                pollfd(live_fd(live, ctrl_fd.unwrap_or(-1)), libc::POLLIN),
            ];
            let busy = live && ((self.rx_more && enabled) || self.tx_more || self.ctrl_more);
            let short_deadline = self
                .rx_short_since
                .filter(|_| live && enabled)
                .map(|since| since + SHORT_RING_WAIT);
            let timeout = match short_deadline {
                _ if busy => 0,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Rounded up, so the deadline has passed when poll times out.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
                None => -1,
            };
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net: worker {pair}: poll failed: {e}");
                    self.ctx.interrupt.device_error();
                    break;
                }
            }
            if fds[0].revents != 0 {
                break;
            }
            let mut rx = self.rx_more;
            if fds[1].revents != 0 {
                drain(&self.ctx.wake);
                self.rx_paused = false;
                rx = true;
            }
            if fds[5].revents != 0 || self.ctrl_more {
                if let Some(c) = &self.ctx.ctrl {
                    drain(&c.queue.notify);
                }
                self.serve_ctrl();
            }
            let tap = fds[4].revents;
            let tap_error = tap & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
            let mut tx = self.tx_more;
            if fds[3].revents != 0 {
                drain(&self.ctx.tx.notify);
                tx = true;
            }
            if self.tx_blocked && (tap & libc::POLLOUT != 0 || tap_error) {
                tx = true;
            }
            if tx {
                self.serve_tx();
            }
            if fds[2].revents != 0 {
                drain(&self.ctx.rx.notify);
                self.rx_paused = false;
                rx = true;
            }
            if tap_events & libc::POLLIN != 0 && (tap & libc::POLLIN != 0 || tap_error) {
                rx = true;
            }
            if short_deadline.is_some_and(|d| Instant::now() >= d) {
                self.serve_rx(RxFill::Short);
            } else if rx {
                self.serve_rx(RxFill::Full);
            }
        }
        tracing::debug!("virtio-net: worker {pair} stopped");
    }

    fn serve_rx(&mut self, fill: RxFill) {
        self.rx_more = false;
        if self.failed || !self.ctx.pairs.is_enabled(self.ctx.pair) {
            return;
        }
        if fill == RxFill::Short {
            self.rx_short_since = None;
        }
        let c = &mut self.ctx;
        let dma = c.dma.begin();
        let result = rx::process_rx(
            &mut c.rx.queue,
            &c.mem,
            c.tap.as_raw_fd(),
            &c.rx_params,
            &c.stats,
            BUDGET,
            fill,
        );
        drop(dma);
        match result {
            Ok(r) => {
                if r.notify {
                    self.signal(self.ctx.rx.index);
                }
                self.rx_more = r.state == RxState::More;
                self.rx_paused = matches!(r.state, RxState::NeedBuffers | RxState::HostError);
                if r.state == RxState::NeedBuffers && r.short {
                    self.rx_short_since.get_or_insert_with(Instant::now);
                } else {
                    self.rx_short_since = None;
                }
            }
            Err(e) => self.fail(e),
        }
    }

    fn serve_tx(&mut self) {
        self.tx_more = false;
        if self.failed {
            return;
        }
        let c = &mut self.ctx;
        let dma = c.dma.begin();
        let result = tx::process_tx(
            &mut c.tx.queue,
            &c.mem,
            c.tap.as_raw_fd(),
            &c.tx_offloads,
            &c.stats,
            BUDGET,
        );
        drop(dma);
        match result {
            Ok(r) => {
                if r.notify {
                    self.signal(self.ctx.tx.index);
                }
                self.tx_blocked = r.blocked;
                self.tx_more = r.more;
            }
            Err(e) => self.fail(e),
        }
    }

    fn serve_ctrl(&mut self) {
        self.ctrl_more = false;
        if self.failed {
            return;
        }
        let c = &mut self.ctx;
        let Some(ctrl) = c.ctrl.as_mut() else {
            return;
        };
        let ctx = CtrlCtx {
            ctrl_rx: ctrl.ctrl_rx,
            mq: ctrl.mq,
            pairs: &c.pairs,
        };
        let index = ctrl.queue.index;
        let dma = c.dma.begin();
        let result = ctrl::process_ctrl(&mut ctrl.queue.queue, &c.mem, &ctx, &c.stats, BUDGET);
        drop(dma);
        match result {
            Ok(r) => {
                if r.notify {
                    self.signal(index);
                }
                self.ctrl_more = r.more;
            }
            Err(e) => self.fail(e),
        }
    }

    fn signal(&self, queue: u16) {
        if let Err(e) = self.ctx.interrupt.signal_queue(queue) {
            tracing::warn!("virtio-net: cannot signal queue {queue}: {e}");
        }
    }

    fn fail(&mut self, e: RingError) {
        tracing::error!(
            "virtio-net: queue pair {}: {e}; the device needs a reset",
            self.ctx.pair
        );
        self.failed = true;
        self.ctx.interrupt.device_error();
    }
}

/// `fd` when `on`, else -1 (ignored by poll).
fn live_fd(on: bool, fd: i32) -> i32 {
    if on {
        fd
    } else {
        -1
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
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

/// Consumes an eventfd's counter (nothing to do if it is already zero).
fn drain(fd: &EventFd) {
    if let Err(e) = fd.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::warn!("virtio-net: cannot read an eventfd: {e}");
        }
    }
}
