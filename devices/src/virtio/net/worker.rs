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
use std::time::{Duration, Instant};

use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::backend::TapQueue;
use super::ctrl::{self, CtrlCtx};
use super::header::TxOffloads;
use super::pairs::Pairs;
use super::rx::{self, RxFill, RxParams, RxState};
use super::stats::NetStats;
use super::tx;
use crate::dma::DmaTracker;
use crate::virtio::worker_util::{
    pollfd, pollin, ThreadHook, Wake, WorkerBase, WorkerKind, WorkerThread,
};
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
pub(super) type Worker = WorkerThread<()>;

/// Starts the `virtio-net-q<pair>` thread; `hook` runs first in it.
pub(super) fn spawn<M: GuestMemory + Send + 'static>(
    hook: &ThreadHook,
    ctx: WorkerCtx<M>,
) -> io::Result<Worker> {
    let name = format!("virtio-net-q{}", ctx.pair);
    let interrupt = ctx.interrupt.clone();
    WorkerThread::spawn(name, WorkerKind::Net, hook, interrupt, move |base| {
        WorkerLoop {
            ctx,
            base,
            rx_paused: false,
            rx_short_since: None,
            rx_more: false,
            tx_blocked: false,
            tx_more: false,
            ctrl_more: false,
        }
        .run()
    })
}

struct WorkerLoop<M> {
    ctx: WorkerCtx<M>,
    base: WorkerBase,
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
        tracing::debug!("{}: worker started", self.base.name());
        // Buffers and kicks may predate the thread.
        self.serve_ctrl();
        self.serve_tx();
        self.serve_rx(RxFill::Full);
        loop {
            let live = !self.base.failed();
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
                self.base.kill_pollfd(),
                pollin(Some(self.ctx.wake.as_raw_fd())),
                pollin(live.then(|| self.ctx.rx.notify.as_raw_fd())),
                pollin((live && !self.tx_blocked).then(|| self.ctx.tx.notify.as_raw_fd())),
                pollfd(
                    (tap_events != 0).then(|| self.ctx.tap.as_raw_fd()),
                    tap_events,
                ),
                pollin(ctrl_fd.filter(|_| live)),
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
            match self.base.wait(&mut fds, timeout) {
                Wake::Ready => {}
                Wake::Retry => continue,
                Wake::Stop => break,
            }
            let mut rx = self.rx_more;
            if fds[1].revents != 0 {
                self.base.drain(&self.ctx.wake);
                self.rx_paused = false;
                rx = true;
            }
            if fds[5].revents != 0 || self.ctrl_more {
                if let Some(c) = &self.ctx.ctrl {
                    self.base.drain(&c.queue.notify);
                }
                self.serve_ctrl();
            }
            let tap = fds[4].revents;
            let tap_error = tap & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
            let mut tx = self.tx_more;
            if fds[3].revents != 0 {
                self.base.drain(&self.ctx.tx.notify);
                tx = true;
            }
            if self.tx_blocked && (tap & libc::POLLOUT != 0 || tap_error) {
                tx = true;
            }
            if tx {
                self.serve_tx();
            }
            if fds[2].revents != 0 {
                self.base.drain(&self.ctx.rx.notify);
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
        tracing::debug!("{}: worker stopped", self.base.name());
    }

    fn serve_rx(&mut self, fill: RxFill) {
        self.rx_more = false;
        if self.base.failed() || !self.ctx.pairs.is_enabled(self.ctx.pair) {
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
                    self.base.signal(self.ctx.rx.index);
                }
                self.rx_more = r.state == RxState::More;
                self.rx_paused = matches!(r.state, RxState::NeedBuffers | RxState::HostError);
                if r.state == RxState::NeedBuffers && r.short {
                    self.rx_short_since.get_or_insert_with(Instant::now);
                } else {
                    self.rx_short_since = None;
                }
            }
            Err(e) => self.base.fail(&e),
        }
    }

    fn serve_tx(&mut self) {
        self.tx_more = false;
        if self.base.failed() {
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
                    self.base.signal(self.ctx.tx.index);
                }
                self.tx_blocked = r.blocked;
                self.tx_more = r.more;
            }
            Err(e) => self.base.fail(&e),
        }
    }

    fn serve_ctrl(&mut self) {
        self.ctrl_more = false;
        if self.base.failed() {
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
                    self.base.signal(index);
                }
                self.ctrl_more = r.more;
            }
            Err(e) => self.base.fail(&e),
        }
    }
}
