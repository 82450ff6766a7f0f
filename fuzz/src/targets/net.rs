//! `virtio_net`: the virtio-net data path on a fake TAP (a SOCK_SEQPACKET socketpair):
//! the transmitq (`net::tx::process_tx`: chain walk, the 12-byte vnet header checks
//! against the negotiated offloads, one `writev` per frame straight from guest
//! memory, EAGAIN handling with a tiny socket buffer) and the receiveq
//! (`net::rx::process_rx`: guest buffer gathering with and without MRG_RXBUF, one
//! `readv` per frame, `num_buffers`, buffers given back).
//!
//! Input: guest, transmitq and receiveq (up to 256 entries each), `u64` acked features
//! (masked by the offer with every TAP offload), `u8` host flags (bit 0: tiny send
//! buffer), then ops: 0 serve TX, 1 a host frame (`blob`) then serve RX (`u8`: bit 0
//! short fill), 2/3 publish TX/RX, 4 poke, 5 UNMAP, 6 the host reads what was sent.
//!
//! Oracle: every frame the host receives passes the header checks (`validate_tx`
//! under the negotiated offloads, only NEEDS_CSUM among the flags): the guest cannot
//! make the TAP see a header the device refuses.

use ferrio_devices::virtio::net::backend::offload::*;
use ferrio_devices::virtio::net::testing::{
    offered, process_rx, process_tx, validate_tx, Negotiated, RxFill, RxParams, VnetHeader,
    MAX_GSO_FRAME, TX_FLAGS,
};
use ferrio_devices::virtio::net::{NetStats, VNET_HDR_LEN};
use std::os::fd::AsRawFd;
use virtio_bindings::bindings::virtio_net::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::guest::{self, iommu_guest, plain_guest, Guest, Image, QueueSpec, Ring};
use crate::input::{Input, Seed};
use crate::tap::{fake_tap, Peer};
use crate::with_view;

const MAX_OPS: usize = 32;
const QUEUE_MAX: u16 = 256;
const ALL_TUN: u32 = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;
const BUDGET: usize = 64;

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut guest = Guest::read(&mut inp);
    let tx_spec = QueueSpec::read(&mut inp, 8);
    let rx_spec = QueueSpec::read(&mut inp, 8);
    let neg = Negotiated::new(inp.u64() & offered(ALL_TUN, 1));
    let (tap, peer) = fake_tap(inp.u8() & 1 != 0);
    let fd = tap.as_raw_fd();
    let stats = NetStats::default();
    let rx_params = RxParams {
        mrg_rxbuf: neg.mrg_rxbuf,
        max_frame: neg.max_rx_frame(),
        guest_csum: neg.guest_csum,
    };
    let mut tx = with_view!(guest, |m| tx_spec.queue(m, QUEUE_MAX));
    let mut rx = with_view!(guest, |m| rx_spec.queue(m, QUEUE_MAX));
    let mut sent = false;
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 7 {
            0 => {
                sent = true;
                if let Some(q) = &mut tx {
                    let r = with_view!(guest, |m| serve_tx(q, m, fd, &neg, &stats));
                    if !r {
                        tx = None;
                    }
                }
            }
            1 => {
                let frame = inp.blob();
                let fill = if inp.u8() & 1 != 0 {
                    RxFill::Short
                } else {
                    RxFill::Full
                };
                peer.send(frame);
                if let Some(q) = &mut rx {
                    let before = q.next_used();
                    let r = with_view!(guest, |m| process_rx(
                        q, m, fd, &rx_params, &stats, BUDGET, fill
                    ));
                    match r {
                        Ok(r) => {
                            crate::note!("net rx: {r:?}");
                            assert!(r.frames <= r.completed);
                            let moved = q.next_used().wrapping_sub(before);
                            assert_eq!(usize::from(moved), r.completed, "used elements");
                        }
                        Err(_) => rx = None,
                    }
                }
            }
            2 => tx_spec.publish(&guest.phys, u16::from(inp.u8() % 8)),
            3 => rx_spec.publish(&guest.phys, u16::from(inp.u8() % 8)),
            4 => guest::poke(&guest.phys, &mut inp),
            5 => guest.unmap(&mut inp),
            _ => check_sent(&peer, &neg),
        }
    }
    if !sent {
        if let Some(q) = &mut tx {
            with_view!(guest, |m| serve_tx(q, m, fd, &neg, &stats));
        }
    }
    check_sent(&peer, &neg);
}

/// One transmit pass; `false` after a ring error.
fn serve_tx<M: GuestMemory>(
    q: &mut Queue,
    mem: &M,
    fd: i32,
    neg: &Negotiated,
    stats: &NetStats,
) -> bool {
    let before = q.next_used();
    match process_tx(q, mem, fd, &neg.tx, stats, BUDGET) {
        Ok(r) => {
            crate::note!("net tx: {r:?}");
            assert!(r.completed <= BUDGET);
            let moved = q.next_used().wrapping_sub(before);
            assert_eq!(usize::from(moved), r.completed, "used elements");
            true
        }
        Err(_) => false,
    }
}

/// Everything the host got is a frame the device may send.
fn check_sent(peer: &Peer, neg: &Negotiated) {
    while let Some(frame) = peer.try_recv() {
        assert!(frame.len() >= VNET_HDR_LEN, "{}-byte frame", frame.len());
        let len = frame.len() - VNET_HDR_LEN;
        assert!(len <= MAX_GSO_FRAME, "{len}-byte frame");
        let mut h = [0u8; VNET_HDR_LEN];
        h.copy_from_slice(&frame[..VNET_HDR_LEN]);
        let hdr = VnetHeader::from_bytes(&h);
        crate::note!("net: host got {len} bytes, {hdr:?}");
        assert_eq!(hdr.flags & !TX_FLAGS, 0, "flags passed on: {hdr:?}");
        if let Err(e) = validate_tx(&hdr, len, &neg.tx) {
            panic!("the host got a header the device refuses: {hdr:?}: {e}");
        }
    }
}

fn frame(hdr: VnetHeader, len: usize) -> Vec<u8> {
    let mut f = hdr.to_bytes().to_vec();
    f.extend((0..len).map(|i| i as u8));
    f
}

/// Seeds: plain and offloaded frames (split header, indirect), RX with and without
/// mergeable buffers, a full host socket, behind the IOMMU.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let csum = VnetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    let tso = VnetHeader {
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        gso_size: 1448,
        hdr_len: 54,
        ..csum
    };
    let all = (1u64 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_ECN)
        | (1 << VIRTIO_NET_F_HOST_UFO)
        | (1 << VIRTIO_NET_F_GUEST_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_TSO4)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << 29);
    let build = |mrg: bool, indirect: bool| {
        let mut img = Image::new();
        let mut txr = Ring::new(&mut img, 0, 16);
        let mut rxr = Ring::new(&mut img, 0x400, 16);
        let plain = frame(VnetHeader::default(), 60);
        let off = frame(tso, 200);
        img.put(0x600, &plain);
        img.put(0x700, &off);
        txr.add(&mut img, &[(0x600, plain.len() as u32, false)]);
        let split = [
            (0x700, 5, false),
            (0x705, 40, false),
            (0x72d, 200 - 33, false),
        ];
        if indirect {
            txr.add_indirect(&mut img, 0x5c0, &split);
        } else {
            txr.add(&mut img, &split);
        }
        let rx_bufs: &[(u64, u32, bool)] = if mrg {
            &[(0x1000, 1526, true)]
        } else {
            &[(0x1000, 12, true), (0x1100, 1518, true)]
        };
        for _ in 0..4 {
            rxr.add(&mut img, rx_bufs);
        }
        (img, txr, rxr)
    };
    let mut out = Vec::new();
    for (name, mrg, indirect, iommu, small) in [
        ("tx_rx", false, false, false, false),
        ("tx_indirect_rx_mrg", true, true, false, false),
        ("iommu", true, false, true, false),
        ("host_full", false, false, false, true),
    ] {
        let (img, txr, rxr) = build(mrg, indirect);
        let seed = if iommu {
            iommu_guest(Seed::new(), &img)
        } else {
            plain_guest(Seed::new(), &img)
        };
        let seed = txr.spec.write(seed, txr.size_log2(), 0);
        let seed = rxr.spec.write(seed, rxr.size_log2(), 0);
        let features = if mrg {
            all
        } else {
            all & !(1 << VIRTIO_NET_F_MRG_RXBUF)
        };
        let rx_frame = frame(csum, 100);
        let seed = seed
            .u64(features)
            .bool(small)
            .u8(0)
            .u8(1)
            .blob(&rx_frame)
            .u8(0)
            .u8(1)
            .blob(&frame(VnetHeader::default(), 1600))
            .u8(1)
            .u8(6);
        out.push((name, seed.build()));
    }
    out
}
