//! `virtio_net_ctrl`: the virtio-net control queue (`net::ctrl::process_ctrl`): RX
//! mode, MAC TABLE_SET (two length-prefixed tables), MQ VQ_PAIRS_SET with its
//! attach/detach of the host queues (`net::pairs::Pairs` over fake TAP queues).
//!
//! Input: guest, control queue (up to 64 entries), `u64` acked features (masked by
//! the offer for 4 pairs), `u8` pairs with a worker (bit `i`: pair `i`), then ops: 0
//! serve (`u8` budget), 1 publish, 2 poke, 3 UNMAP.
//!
//! Oracle: the pair count stays in 1..=4, queue 0 is never detached, and after each
//! pass queue `i` is attached exactly when pair `i` has a worker and is in use.

use std::sync::{Arc, Mutex};

use ferrio_devices::virtio::net::backend::TapQueue;
use ferrio_devices::virtio::net::testing::{offered, process_ctrl, CtrlCtx, Negotiated, Pairs};
use ferrio_devices::virtio::net::NetStats;
use virtio_bindings::bindings::virtio_net::*;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{self, iommu_guest, plain_guest, Guest, Image, QueueSpec, Ring};
use crate::input::{Input, Seed};
use crate::tap::{fake_tap, FakeTap};
use crate::with_view;

const MAX_OPS: usize = 32;
const QUEUE_MAX: u16 = 64;
const PAIRS: usize = 4;

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut guest = Guest::read(&mut inp);
    let spec = QueueSpec::read(&mut inp, 6);
    let neg = Negotiated::new(inp.u64() & offered(0, PAIRS as u16));
    let workers = inp.u8();
    let present: Vec<bool> = (0..PAIRS)
        .map(|i| i == 0 || workers & (1 << i) != 0)
        .collect();
    let (taps, _peers): (Vec<Arc<FakeTap>>, Vec<_>) = (0..PAIRS).map(|_| fake_tap(false)).unzip();
    let wakes: Vec<Option<EventFd>> = present
        .iter()
        .map(|&p| p.then(|| EventFd::new(EFD_NONBLOCK).expect("eventfd")))
        .collect();
    let queues: Vec<Arc<dyn TapQueue>> = taps.iter().map(|t| t.clone() as _).collect();
    let pairs = Pairs::new(
        queues,
        present.clone(),
        Arc::new(Mutex::new(vec![true; PAIRS])),
        wakes,
    );
    // As at activation: pair 0 only.
    pairs.set_active(1).expect("fake TAP queues never fail");
    let ctx = CtrlCtx {
        ctrl_rx: neg.ctrl_rx,
        mq: neg.mq,
        pairs: &pairs,
    };
    let stats = NetStats::default();
    let Some(mut queue) = with_view!(guest, |m| spec.queue(m, QUEUE_MAX)) else {
        return;
    };
    let mut served = false;
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 4 {
            0 => {
                served = true;
                let budget = usize::from(inp.u8() % 32) + 1;
                if !serve(&guest, &mut queue, &ctx, &stats, budget, &taps, &present) {
                    return;
                }
            }
            1 => spec.publish(&guest.phys, u16::from(inp.u8() % 8)),
            2 => guest::poke(&guest.phys, &mut inp),
            _ => guest.unmap(&mut inp),
        }
    }
    if !served {
        serve(&guest, &mut queue, &ctx, &stats, 32, &taps, &present);
    }
}

fn serve(
    guest: &Guest,
    queue: &mut virtio_queue::Queue,
    ctx: &CtrlCtx<'_>,
    stats: &NetStats,
    budget: usize,
    taps: &[Arc<FakeTap>],
    present: &[bool],
) -> bool {
    let before = queue.next_used();
    let Ok(r) = with_view!(guest, |m| process_ctrl(queue, m, ctx, stats, budget)) else {
        return false;
    };
    crate::note!("net ctrl: {r:?}, {} pair(s)", ctx.pairs.active());
    assert!(r.completed <= budget);
    let moved = queue.next_used().wrapping_sub(before);
    assert_eq!(usize::from(moved), r.completed, "used elements");
    let active = ctx.pairs.active();
    assert!((1..=PAIRS as u16).contains(&active), "{active} pairs");
    assert!(
        taps[0].enable_calls().is_empty(),
        "queue 0 attached/detached"
    );
    for (i, tap) in taps.iter().enumerate().skip(1) {
        let want = present[i] && i < usize::from(active);
        // Every queue starts attached; the last call says where it is now.
        let now = tap.enable_calls().last().copied().unwrap_or(true);
        assert_eq!(now, want, "queue {i} with {active} pair(s) in use");
    }
    true
}

/// A command: class, command, data.
fn command(class: u32, cmd: u32, data: &[u8]) -> Vec<u8> {
    [&[class as u8, cmd as u8][..], data].concat()
}

fn mac_table(entries: &[[u8; 6]]) -> Vec<u8> {
    let mut t = (entries.len() as u32).to_le_bytes().to_vec();
    for e in entries {
        t.extend_from_slice(e);
    }
    t
}

/// Seeds: every supported command (data split over descriptors), unsupported and
/// malformed ones, with and without CTRL_RX / MQ, behind the IOMMU.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let cmds = [
        command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[1]),
        command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, &[0]),
        command(
            VIRTIO_NET_CTRL_MAC,
            VIRTIO_NET_CTRL_MAC_TABLE_SET,
            &[mac_table(&[mac]), mac_table(&[mac, mac])].concat(),
        ),
        command(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &4u16.to_le_bytes(),
        ),
        command(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &9u16.to_le_bytes(),
        ),
        command(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &3u16.to_le_bytes(),
        ),
        command(VIRTIO_NET_CTRL_VLAN, 0, &[0, 1]),
        command(
            VIRTIO_NET_CTRL_MAC,
            VIRTIO_NET_CTRL_MAC_TABLE_SET,
            &[7, 0, 0, 0],
        ),
    ];
    let mut img = Image::new();
    let mut ring = Ring::new(&mut img, 0, 32);
    for (i, c) in cmds.iter().enumerate() {
        let at = 0x400 + 0x40 * i as u64;
        img.put(at, c);
        let ack = at + 0x30;
        let bufs = [
            (at, 2, false),
            (at + 2, c.len() as u32 - 2, false),
            (ack, 1, true),
        ];
        ring.add(&mut img, &bufs);
    }
    let all = (1u64 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_CTRL_RX) | (1 << VIRTIO_NET_F_MQ);
    let mut out = Vec::new();
    for (name, features, workers, iommu) in [
        ("all", all, 0b1110, false),
        ("pairs_without_workers", all, 0b0100, false),
        ("nothing_negotiated", 0, 0b1110, false),
        ("iommu", all, 0b1110, true),
    ] {
        let seed = if iommu {
            iommu_guest(Seed::new(), &img)
        } else {
            plain_guest(Seed::new(), &img)
        };
        let seed = ring.spec.write(seed, ring.size_log2(), 0);
        let seed = seed.u64(features).u8(workers).u8(0).u8(2).u8(0).u8(31);
        out.push((name, seed.build()));
    }
    out
}
