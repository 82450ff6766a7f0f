//! virtio-net counters, shared (lock-free) between the device, its workers and whoever
//! reads them. Each kind of drop logs a warning the first time it happens, then only
//! counts.

use std::fmt::Display;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Why a frame or a control command was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A transmitq chain or header the device refuses (guest error).
    TxMalformed,
    /// The host end refused a frame (a write error other than EAGAIN).
    TxError,
    /// A received frame did not fit the guest's buffers.
    RxTooBig,
    /// The host end failed a read (or handed a frame shorter than the vnet header).
    RxError,
    /// A receiveq chain the device refuses (read-only, broken, too short for the header,
    /// outside guest memory).
    RxMalformed,
    /// A control command answered VIRTIO_NET_ERR, or a control chain without an ack
    /// byte.
    CtrlError,
}

impl DropReason {
    fn name(self) -> &'static str {
        match self {
            DropReason::TxMalformed => "malformed transmit chain",
            DropReason::TxError => "host write error",
            DropReason::RxTooBig => "received frame too big for the guest buffers",
            DropReason::RxError => "host read error",
            DropReason::RxMalformed => "malformed receive chain",
            DropReason::CtrlError => "control command refused",
        }
    }
}

/// A snapshot of the counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub tx_frames: u64,
    /// Frame bytes sent to the host (vnet headers not counted).
    pub tx_bytes: u64,
    pub rx_frames: u64,
    /// Frame bytes delivered to the guest (vnet headers not counted).
    pub rx_bytes: u64,
    pub tx_malformed: u64,
    pub tx_error: u64,
    pub rx_too_big: u64,
    pub rx_error: u64,
    pub rx_malformed: u64,
    pub ctrl_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    drops: [AtomicU64; 6],
    /// One bit per [`DropReason`] already logged.
    warned: AtomicU32,
}

/// Counters of one virtio-net device (frames, bytes, drops by reason). Cloning shares
/// them.
#[derive(Debug, Default, Clone)]
pub struct NetStats(Arc<Counters>);

impl NetStats {
    /// The current values.
    pub fn snapshot(&self) -> NetCounters {
        let c = &*self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let drop = |r: DropReason| get(&c.drops[r as usize]);
        NetCounters {
            tx_frames: get(&c.tx_frames),
            tx_bytes: get(&c.tx_bytes),
            rx_frames: get(&c.rx_frames),
            rx_bytes: get(&c.rx_bytes),
            tx_malformed: drop(DropReason::TxMalformed),
            tx_error: drop(DropReason::TxError),
            rx_too_big: drop(DropReason::RxTooBig),
            rx_error: drop(DropReason::RxError),
            rx_malformed: drop(DropReason::RxMalformed),
            ctrl_errors: drop(DropReason::CtrlError),
        }
    }

    pub(super) fn sent(&self, bytes: usize) {
        self.0.tx_frames.fetch_add(1, Ordering::Relaxed);
        self.0.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn received(&self, bytes: usize) {
        self.0.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.0.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a drop; the first one of each kind is logged as a warning with `detail`.
    pub(super) fn dropped(&self, reason: DropReason, detail: &dyn Display) {
        self.0.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
        let bit = 1u32 << reason as u32;
        if self.0.warned.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(
                "virtio-net: {}: {detail} (further ones are only counted)",
                reason.name()
            );
        } else {
            tracing::debug!("virtio-net: {}: {detail}", reason.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_shared_by_clones() {
        let s = NetStats::default();
        let t = s.clone();
        t.sent(100);
        t.received(60);
        t.received(40);
        for r in [
            DropReason::TxMalformed,
            DropReason::TxError,
            DropReason::TxError,
            DropReason::RxTooBig,
            DropReason::RxError,
            DropReason::RxMalformed,
            DropReason::CtrlError,
        ] {
            t.dropped(r, &"test");
        }
        let c = s.snapshot();
        assert_eq!((c.tx_frames, c.tx_bytes), (1, 100));
        assert_eq!((c.rx_frames, c.rx_bytes), (2, 100));
        assert_eq!(
            [
                c.tx_malformed,
                c.tx_error,
                c.rx_too_big,
                c.rx_error,
                c.rx_malformed,
                c.ctrl_errors
            ],
            [1, 2, 1, 1, 1, 1]
        );
    }
}
