//! virtio-net feature bits (virtio 1.2, 5.1.3): what the device offers for a given
//! host end, and what a set of acked bits means once the dependencies of 5.1.3.1 are
//! applied (a bit whose prerequisite is missing counts as not negotiated).

use virtio_bindings::bindings::virtio_net::*;

use super::backend::offload::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};
use super::header::{TxOffloads, MAX_GSO_FRAME, MAX_PLAIN_FRAME};
use crate::virtio::features::VIRTIO_F_EVENT_IDX;

const fn bit(b: u32) -> u64 {
    1 << b
}

pub const F_CSUM: u64 = bit(VIRTIO_NET_F_CSUM);
pub const F_GUEST_CSUM: u64 = bit(VIRTIO_NET_F_GUEST_CSUM);
pub const F_MAC: u64 = bit(VIRTIO_NET_F_MAC);
pub const F_GUEST_TSO4: u64 = bit(VIRTIO_NET_F_GUEST_TSO4);
pub const F_GUEST_TSO6: u64 = bit(VIRTIO_NET_F_GUEST_TSO6);
pub const F_GUEST_ECN: u64 = bit(VIRTIO_NET_F_GUEST_ECN);
pub const F_GUEST_UFO: u64 = bit(VIRTIO_NET_F_GUEST_UFO);
pub const F_HOST_TSO4: u64 = bit(VIRTIO_NET_F_HOST_TSO4);
pub const F_HOST_TSO6: u64 = bit(VIRTIO_NET_F_HOST_TSO6);
pub const F_HOST_ECN: u64 = bit(VIRTIO_NET_F_HOST_ECN);
pub const F_HOST_UFO: u64 = bit(VIRTIO_NET_F_HOST_UFO);
pub const F_MRG_RXBUF: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);
pub const F_STATUS: u64 = bit(VIRTIO_NET_F_STATUS);
pub const F_CTRL_VQ: u64 = bit(VIRTIO_NET_F_CTRL_VQ);
pub const F_CTRL_RX: u64 = bit(VIRTIO_NET_F_CTRL_RX);
pub const F_MQ: u64 = bit(VIRTIO_NET_F_MQ);

/// The features offered for a host end accepting the `TUN_F_*` flags `offloads`, with
/// `max_pairs` queue pairs.
pub fn offered(offloads: u32, max_pairs: u16) -> u64 {
    let mut f = F_CSUM
        | F_MAC
        | F_HOST_TSO4
        | F_HOST_TSO6
        | F_HOST_ECN
        | F_MRG_RXBUF
        | F_STATUS
        | F_CTRL_VQ
        | F_CTRL_RX
        | VIRTIO_F_EVENT_IDX;
    for (tun, feature) in [
        (TUN_F_CSUM, F_GUEST_CSUM),
        (TUN_F_TSO4, F_GUEST_TSO4),
        (TUN_F_TSO6, F_GUEST_TSO6),
        (TUN_F_TSO_ECN, F_GUEST_ECN),
        (TUN_F_UFO, F_GUEST_UFO | F_HOST_UFO),
    ] {
        if offloads & tun != 0 {
            f |= feature;
        }
    }
    if max_pairs > 1 {
        f |= F_MQ;
    }
    f
}

/// What the acked features mean for the data path.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub event_idx: bool,
    pub mrg_rxbuf: bool,
    pub ctrl_vq: bool,
    pub ctrl_rx: bool,
    pub mq: bool,
    /// GUEST_CSUM: received frames may carry NEEDS_CSUM / DATA_VALID.
    pub guest_csum: bool,
    /// The `TUN_F_*` flags for the host end (receive offloads).
    pub tun_offloads: u32,
    /// What transmitted headers may ask for.
    pub tx: TxOffloads,
}

impl Negotiated {
    pub fn new(acked: u64) -> Self {
        let has = |f: u64| acked & f != 0;
        let guest_csum = has(F_GUEST_CSUM);
        let guest_tso4 = guest_csum && has(F_GUEST_TSO4);
        let guest_tso6 = guest_csum && has(F_GUEST_TSO6);
        let guest_ecn = (guest_tso4 || guest_tso6) && has(F_GUEST_ECN);
        let guest_ufo = guest_csum && has(F_GUEST_UFO);
        let mut tun_offloads = 0;
        for (on, tun) in [
            (guest_csum, TUN_F_CSUM),
            (guest_tso4, TUN_F_TSO4),
            (guest_tso6, TUN_F_TSO6),
            (guest_ecn, TUN_F_TSO_ECN),
            (guest_ufo, TUN_F_UFO),
        ] {
            if on {
                tun_offloads |= tun;
            }
        }
        let csum = has(F_CSUM);
        let tso4 = csum && has(F_HOST_TSO4);
        let tso6 = csum && has(F_HOST_TSO6);
        let ctrl_vq = has(F_CTRL_VQ);
        Self {
            event_idx: has(VIRTIO_F_EVENT_IDX),
            mrg_rxbuf: has(F_MRG_RXBUF),
            ctrl_vq,
            ctrl_rx: ctrl_vq && has(F_CTRL_RX),
            mq: ctrl_vq && has(F_MQ),
            guest_csum,
            tun_offloads,
            tx: TxOffloads {
                csum,
                tso4,
                tso6,
                ecn: (tso4 || tso6) && has(F_HOST_ECN),
                ufo: csum && has(F_HOST_UFO),
            },
        }
    }

    /// The largest frame (vnet header excluded) the host end may deliver.
    pub fn max_rx_frame(&self) -> usize {
        if self.tun_offloads & (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO) != 0 {
            MAX_GSO_FRAME
        } else {
            MAX_PLAIN_FRAME
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_TUN: u32 = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;
    const GUEST: u64 = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_GUEST_UFO;

    #[test]
    fn offer_follows_the_host_offloads() {
        let base = offered(0, 1);
        assert_eq!(base & (GUEST | F_HOST_UFO | F_MQ), 0);
        for f in [F_CSUM, F_MAC, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN] {
            assert_ne!(base & f, 0);
        }
        for f in [
            F_MRG_RXBUF,
            F_STATUS,
            F_CTRL_VQ,
            F_CTRL_RX,
            VIRTIO_F_EVENT_IDX,
        ] {
            assert_ne!(base & f, 0);
        }
        assert_eq!(offered(ALL_TUN, 1), base | GUEST | F_HOST_UFO);
        assert_eq!(offered(TUN_F_CSUM, 1), base | F_GUEST_CSUM);
        assert_eq!(
            offered(TUN_F_CSUM | TUN_F_TSO6, 1),
            base | F_GUEST_CSUM | F_GUEST_TSO6
        );
        assert_eq!(offered(TUN_F_UFO, 1), base | F_GUEST_UFO | F_HOST_UFO);
        assert_eq!(offered(0, 4), base | F_MQ);
        // Nothing outside the known bits (no CTRL_RX_EXTRA, CTRL_MAC_ADDR, GUEST_ANNOUNCE).
        let extra = bit(VIRTIO_NET_F_CTRL_RX_EXTRA) | bit(VIRTIO_NET_F_CTRL_MAC_ADDR);
        assert_eq!(offered(ALL_TUN, 4) & extra, 0);
    }

    #[test]
    fn dependencies_are_applied() {
        let all = Negotiated::new(offered(ALL_TUN, 2));
        assert_eq!(all.tun_offloads, ALL_TUN);
        assert!(all.mq && all.ctrl_rx && all.mrg_rxbuf && all.event_idx);
        assert_eq!(all.max_rx_frame(), MAX_GSO_FRAME);
        // GUEST_TSO* without GUEST_CSUM are not used.
        let n = Negotiated::new(F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_GUEST_UFO);
        assert_eq!(n.tun_offloads, 0);
        assert_eq!(n.max_rx_frame(), MAX_PLAIN_FRAME);
        let n = Negotiated::new(F_GUEST_CSUM | F_GUEST_ECN);
        assert_eq!(n.tun_offloads, TUN_F_CSUM);
        let n = Negotiated::new(F_GUEST_CSUM | F_GUEST_TSO6 | F_GUEST_ECN);
        assert_eq!(n.tun_offloads, TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN);
        // HOST_* without CSUM are not honoured.
        let n = Negotiated::new(F_HOST_TSO4 | F_HOST_UFO | F_HOST_ECN);
        assert_eq!(n.tx, TxOffloads::default());
        let n = Negotiated::new(F_CSUM | F_HOST_TSO4 | F_HOST_ECN);
        assert!(n.tx.csum && n.tx.tso4 && n.tx.ecn && !n.tx.tso6 && !n.tx.ufo);
        // MQ and CTRL_RX need the control queue.
        let n = Negotiated::new(F_MQ | F_CTRL_RX);
        assert!(!n.mq && !n.ctrl_rx && !n.ctrl_vq);
    }
}
