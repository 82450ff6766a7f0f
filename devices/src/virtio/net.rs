//! virtio-net (virtio 1.2, 5.1) on a TAP (or any message-oriented fd per queue pair,
//! see [`backend`]).
//!
//! Queues: receiveq`i` = 2i, transmitq`i` = 2i+1 for each queue pair `i` (one per host
//! queue), then the control queue (at 2 when VIRTIO_NET_F_MQ is not negotiated: only
//! pair 0 exists then). Every frame carries the 12-byte `virtio_net_hdr_v1`, which is
//! also the TAP's vnet header, so frames move between the TAP and guest memory with one
//! `readv`/`writev` each and no copy of the payload (modules `rx`, `tx`). Receive
//! offloads (GUEST_*) are offered where the TAP supports them and set on the TAP with
//! TUNSETOFFLOAD as negotiated; transmit offloads (CSUM, HOST_*) are validated per
//! frame and left to the host kernel. The control queue (module `ctrl`) takes RX mode
//! and MAC filter commands (accepted: the TAP delivers everything) and the number of
//! queue pairs in use.
//!
//! One worker thread per queue pair serves its two queues (module `worker`); pair 0's
//! also serves the control queue. Counters are in [`NetStats`]. Behind an IOMMU, each
//! pass over a queue holds a guard of the device's DMA tracker, and none is held while
//! a worker waits (for buffers, for the TAP).

pub mod backend;
mod ctrl;
mod features;
mod header;
mod io;
mod pairs;
mod rx;
mod stats;
pub mod tap;
mod tx;
mod worker;

#[cfg(test)]
mod tests;

/// The queue logic apart from any thread (transmitq, receiveq, control queue, and what
/// the acked features mean for them), for other crates' tests and the fuzz targets in
/// `fuzz/` (the `test-utils` feature). Re-exports only.
#[cfg(feature = "test-utils")]
pub mod testing {
    pub use super::ctrl::{process_ctrl, CtrlCtx, CtrlResult};
    pub use super::features::{offered, Negotiated};
    pub use super::header::{
        validate_tx, HeaderError, TxOffloads, VnetHeader, MAX_GSO_FRAME, MAX_PLAIN_FRAME, TX_FLAGS,
    };
    pub use super::pairs::Pairs;
    pub use super::rx::{process_rx, RxFill, RxParams, RxResult, RxState};
    pub use super::tx::{process_tx, TxResult};
}

use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_net::VIRTIO_NET_S_LINK_UP;
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::backend::NetBackend;
use self::features::Negotiated;
pub use self::header::VNET_HDR_LEN;
use self::pairs::{AttachState, Pairs};
use self::rx::RxParams;
pub use self::stats::{NetCounters, NetStats};
use self::worker::{CtrlQueue, Worker, WorkerCtx};
use super::worker_util::{stop_all, ThreadHook};
use super::{
    device_type, queue_slots, required_queue, ActivateError, Activation, ActiveQueue, VirtioDevice,
};

/// Largest queue size the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Queue size used when the configured one is invalid.
const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Size of `struct virtio_net_config` up to `max_virtqueue_pairs`.
const CONFIG_SIZE: usize = 10;

/// Device settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address (VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    /// Maximum size of every queue (a power of two, at most 32768).
    pub queue_size: u16,
}

/// A virtio-net device.
pub struct VirtioNet {
    backend: NetBackend,
    config: NetConfig,
    /// Queue pairs of the host end (at least 1 in the queue layout).
    max_pairs: u16,
    queue_sizes: Vec<u16>,
    offered: u64,
    acked: u64,
    stats: NetStats,
    attached: AttachState,
    workers: Vec<Worker>,
    /// Runs first in every worker thread.
    thread_hook: ThreadHook,
}

impl VirtioNet {
    /// A device on `backend`. `config.queue_size`: max size of every queue (power of
    /// two, <= 32768; anything else is replaced by 256 with a warning).
    pub fn new(backend: NetBackend, config: NetConfig) -> Self {
        let mut config = config;
        if !config.queue_size.is_power_of_two() || config.queue_size > MAX_QUEUE_SIZE {
            tracing::warn!(
                "virtio-net: invalid queue size {}; using {DEFAULT_QUEUE_SIZE}",
                config.queue_size
            );
            config.queue_size = DEFAULT_QUEUE_SIZE;
        }
        let max_pairs = backend.queue_pairs().max(1);
        let queue_sizes = vec![config.queue_size; 2 * usize::from(max_pairs) + 1];
        let offered = features::offered(backend.offloads, max_pairs);
        // Opening a TAP queue attaches it.
        let attached = Arc::new(Mutex::new(vec![true; backend.queues.len()]));
        Self {
            backend,
            config,
            max_pairs,
            queue_sizes,
            offered,
            acked: 0,
            stats: NetStats::default(),
            attached,
            workers: Vec::new(),
            thread_hook: ThreadHook::default(),
        }
    }

    /// Runs `hook` first thing in every worker thread (see [`ThreadHook`]).
    pub fn with_thread_hook(mut self, hook: ThreadHook) -> Self {
        self.thread_hook = hook;
        self
    }

    /// Counters (frames, bytes, drops by reason), shared with the workers.
    pub fn stats(&self) -> NetStats {
        self.stats.clone()
    }

    /// Whether workers are running (between activation and reset).
    pub fn is_active(&self) -> bool {
        !self.workers.is_empty()
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[..6].copy_from_slice(&self.config.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&self.max_pairs.to_le_bytes());
        c
    }

    /// Sets the host's receive offloads to `flags` (`TUN_F_*`).
    fn set_offloads(&self, flags: u32) {
        if let Some(q) = self.backend.queues.first() {
            if let Err(e) = q.set_offload(flags) {
                tracing::warn!(
                    "virtio-net: {}: cannot set offloads {flags:#x}: {e}",
                    self.backend.name
                );
            }
        }
    }

    fn stop(&mut self) {
        stop_all(self.workers.drain(..));
    }

    fn start<M: GuestMemory + Clone + Send + 'static>(
        &mut self,
        activation: Activation<M>,
    ) -> Result<(), ActivateError> {
        if self.is_active() {
            return Err(ActivateError::Invalid(
                "virtio-net is already active".into(),
            ));
        }
        if self.backend.queues.is_empty() {
            return Err(ActivateError::Invalid(format!(
                "virtio-net: {} has no host queue",
                self.backend.name
            )));
        }
        let neg = Negotiated::new(self.acked);
        let Activation {
            mem,
            queues,
            interrupt,
            dma,
        } = activation;
        let layout = Layout::new(neg, self.max_pairs);
        let slots = queue_slots("virtio-net", queues, self.queue_sizes.len(), neg.event_idx)?;
        let (mut data, ctrl) = layout.sort(slots)?;

        let present: Vec<bool> = data.iter().map(Option::is_some).collect();
        let mut wakes = Vec::with_capacity(data.len());
        for p in &present {
            wakes.push(if *p {
                Some(EventFd::new(EFD_NONBLOCK)?)
            } else {
                None
            });
        }
        let worker_wakes = wakes
            .iter()
            .map(|w| w.as_ref().map(EventFd::try_clone).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let pairs = Arc::new(Pairs::new(
            self.backend.queues.clone(),
            present,
            self.attached.clone(),
            wakes,
        ));
        // Only pair 0 until the driver asks for more (5.1.6.5.5).
        if let Err(e) = pairs.set_active(1) {
            tracing::warn!(
                "virtio-net: {}: cannot detach queues: {e}",
                self.backend.name
            );
        }
        self.set_offloads(neg.tun_offloads);

        let rx_params = RxParams {
            mrg_rxbuf: neg.mrg_rxbuf,
            max_frame: neg.max_rx_frame(),
            guest_csum: neg.guest_csum,
        };
        let mut ctrl = ctrl.map(|queue| CtrlQueue {
            queue,
            ctrl_rx: neg.ctrl_rx,
            mq: neg.mq,
        });
        for (pair, (queues, wake)) in data.iter_mut().zip(worker_wakes).enumerate() {
            let (Some((rx, tx)), Some(wake)) = (queues.take(), wake) else {
                continue;
            };
            let ctx = WorkerCtx {
                pair: pair as u16,
                mem: mem.clone(),
                rx,
                tx,
                ctrl: if pair == 0 { ctrl.take() } else { None },
                tap: self.backend.queues[pair].clone(),
                pairs: pairs.clone(),
                wake,
                rx_params,
                tx_offloads: neg.tx,
                stats: self.stats.clone(),
                interrupt: interrupt.clone(),
                dma: dma.clone(),
            };
            match worker::spawn(&self.thread_hook, ctx) {
                Ok(w) => self.workers.push(w),
                Err(e) => {
                    self.stop();
                    return Err(e.into());
                }
            }
        }
        tracing::debug!(
            "virtio-net: {} activated ({} pair(s), {neg:?})",
            self.backend.name,
            self.workers.len()
        );
        Ok(())
    }
}

/// Where the queues are for the negotiated features.
struct Layout {
    /// Data queue pairs the driver may use.
    pairs: u16,
    /// Index of the control queue, when negotiated.
    ctrl: Option<u16>,
}

/// The receiveq and transmitq of each pair (`None`: not both enabled).
type PairQueues = Vec<Option<(ActiveQueue, ActiveQueue)>>;

impl Layout {
    fn new(neg: Negotiated, max_pairs: u16) -> Self {
        let pairs = if neg.mq { max_pairs } else { 1 };
        Self {
            pairs,
            ctrl: neg.ctrl_vq.then_some(2 * pairs),
        }
    }

    /// Sorts the enabled queues (by index, from [`queue_slots`]) into pairs and the
    /// control queue; pair 0 (and the control queue, when negotiated) must be there.
    /// Queues outside the layout are ignored.
    fn sort(
        &self,
        mut slots: Vec<Option<ActiveQueue>>,
    ) -> Result<(PairQueues, Option<ActiveQueue>), ActivateError> {
        let n = usize::from(self.pairs);
        for required in [0, 1] {
            if slots.get(required).is_none_or(Option::is_none) {
                return Err(ActivateError::MissingQueue(required as u16));
            }
        }
        let ctrl = self
            .ctrl
            .map(|index| required_queue(&mut slots, index))
            .transpose()?;
        for q in slots.drain((2 * n).min(slots.len())..).flatten() {
            tracing::debug!(
                "virtio-net: queue {} is not used with these features",
                q.index
            );
        }
        let mut pairs = Vec::with_capacity(n);
        let mut it = slots.into_iter();
        while let (Some(rx), Some(tx)) = (it.next(), it.next()) {
            pairs.push(match (rx, tx) {
                (Some(rx), Some(tx)) => Some((rx, tx)),
                (None, None) => None,
                (rx, _) => {
                    let i = pairs.len();
                    tracing::debug!(
                        "virtio-net: only the {} of pair {i} is enabled; pair {i} is not used",
                        if rx.is_some() {
                            "receiveq"
                        } else {
                            "transmitq"
                        }
                    );
                    None
                }
            });
        }
        Ok((pairs, ctrl))
    }
}

impl<M: GuestMemory + Clone + Send + 'static> VirtioDevice<M> for VirtioNet {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.offered
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.offered;
        self.set_offloads(Negotiated::new(self.acked).tun_offloads);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::ring::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The legacy MAC write is not supported (no VIRTIO_NET_F_CTRL_MAC_ADDR either).
        tracing::debug!(
            "virtio-net: ignored config write of {} byte(s) at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
        self.start(activation)
    }

    fn reset(&mut self) {
        self.stop();
        self.acked = 0;
        self.set_offloads(0);
    }

    fn set_thread_hook(&mut self, hook: ThreadHook) {
        self.thread_hook = hook;
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.stop();
    }
}
