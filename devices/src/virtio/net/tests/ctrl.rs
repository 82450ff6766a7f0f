//! The control queue logic on a hand-built ring.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{fake_backend, read};
use crate::virtio::net::ctrl::{process_ctrl, CtrlCtx};
use crate::virtio::net::pairs::Pairs;
use crate::virtio::net::stats::NetStats;
use crate::virtio::testing::{memory, ro, wo, Buf, Driver, Mem};
use vm_memory::{Bytes, GuestAddress};

const OK: u8 = 0;
const ERR: u8 = 1;

/// Queues a command (`class`, `cmd`, `data`) with an ack byte (if `ack`), data split
/// after its first byte when it has more than one; returns the head and the ack
/// address.
fn command(mem: &Mem, d: &mut Driver, slot: u64, bytes: &[u8], ack: bool) -> (u16, u64) {
    let base = 0x10_0000 + 0x1000 * slot;
    mem.write_slice(bytes, GuestAddress(base)).unwrap();
    let ack_at = base + 0x800;
    mem.write_obj(0xAAu8, GuestAddress(ack_at)).unwrap();
    let mut bufs: Vec<Buf> = if bytes.len() > 3 {
        vec![ro(base, 2), ro(base + 2, bytes.len() as u32 - 2)]
    } else {
        vec![ro(base, bytes.len() as u32)]
    };
    if ack {
        bufs.push(wo(ack_at, 1));
    }
    (d.add(&bufs), ack_at)
}

fn pairs(n: usize) -> (Pairs, Vec<Arc<super::FakeTap>>, Vec<EventFd>) {
    let (backend, taps, _peers) = fake_backend(n, 0);
    let wakes: Vec<EventFd> = (0..n)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let p = Pairs::new(
        backend.queues,
        vec![true; n],
        Arc::new(Mutex::new(vec![true; n])),
        wakes.iter().map(|w| Some(w.try_clone().unwrap())).collect(),
    );
    (p, taps, wakes)
}

/// The control queue's view of the device: `pairs`, CTRL_RX and MQ negotiated or not.
fn ctx(pairs: &Pairs, ctrl_rx: bool, mq: bool) -> CtrlCtx<'_> {
    CtrlCtx { ctrl_rx, mq, pairs }
}

/// Runs `cmds` (bytes, with ack) one by one; returns each (used length, ack byte).
fn run(ctx: &CtrlCtx<'_>, stats: &NetStats, cmds: &[(&[u8], bool)]) -> Vec<(u32, u8)> {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 64);
    let mut q = d.queue();
    let mut out = Vec::new();
    for (i, (bytes, ack)) in cmds.iter().enumerate() {
        let (head, ack_at) = command(&mem, &mut d, i as u64, bytes, *ack);
        let r = process_ctrl(&mut q, &mem, ctx, stats, 64).unwrap();
        assert_eq!((r.completed, r.notify), (1, true));
        let (id, len) = d.used(i as u16);
        assert_eq!(id, u32::from(head));
        out.push((len, read(&mem, ack_at, 1)[0]));
    }
    out
}

#[test]
fn ctrl_mq_vq_pairs_set() {
    let (p, taps, wakes) = pairs(4);
    // As at activation: only pair 0.
    p.set_active(1).unwrap();
    for t in &taps[1..] {
        assert_eq!(t.enable_calls(), [false]);
    }
    let stats = NetStats::default();
    let ctx = ctx(&p, true, true);
    let set = |n: u16| {
        let mut v = vec![4u8, 0];
        v.extend(n.to_le_bytes());
        v
    };
    let (three, zero, five, one) = (set(3), set(0), set(5), set(1));
    let answers = run(&ctx, &stats, &[(&three, true)]);
    assert_eq!(answers, [(1, OK)]);
    assert_eq!(p.active(), 3);
    assert!(p.is_enabled(2) && !p.is_enabled(3));
    assert_eq!(taps[0].enable_calls(), [false; 0]);
    assert_eq!(taps[1].enable_calls(), [false, true]);
    assert_eq!(taps[2].enable_calls(), [false, true]);
    assert_eq!(taps[3].enable_calls(), [false]);
    for w in &wakes {
        assert!(w.read().unwrap() >= 1);
    }

    let bad_len: &[u8] = &[4, 0, 2];
    let answers = run(
        &ctx,
        &stats,
        &[(&zero, true), (&five, true), (bad_len, true)],
    );
    assert_eq!(answers, [(1, ERR); 3]);
    assert_eq!(p.active(), 3);
    assert_eq!(stats.snapshot().ctrl_errors, 3);

    let answers = run(&ctx, &stats, &[(&one, true)]);
    assert_eq!(answers, [(1, OK)]);
    assert_eq!(p.active(), 1);
    assert_eq!(taps[1].enable_calls(), [false, true, false]);
    assert_eq!(taps[2].enable_calls(), [false, true, false]);
    assert_eq!(taps[3].enable_calls(), [false]);

    // Without VIRTIO_NET_F_MQ the class is refused.
    let no_mq = CtrlCtx { mq: false, ..ctx };
    assert_eq!(run(&no_mq, &stats, &[(&three, true)]), [(1, ERR)]);
    assert_eq!(p.active(), 1);
}

#[test]
fn ctrl_rx_mode_and_mac_tables() {
    let (p, _taps, _wakes) = pairs(1);
    let stats = NetStats::default();
    let ctx = ctx(&p, true, false);
    let promisc: &[u8] = &[0, 0, 1];
    let allmulti: &[u8] = &[0, 1, 0];
    let promisc_long: &[u8] = &[0, 0, 1, 1];
    let alluni: &[u8] = &[0, 2, 1];
    let mut table = vec![1, 0];
    table.extend(1u32.to_le_bytes());
    table.extend([0x52, 0x54, 0, 1, 2, 3]);
    table.extend(2u32.to_le_bytes());
    table.extend([1, 0, 0x5e, 0, 0, 1, 0x33, 0x33, 0, 0, 0, 1]);
    let mut table_long = table.clone();
    table_long.push(0);
    let table_short = &table[..table.len() - 1];
    let mut table_huge = vec![1, 0];
    table_huge.extend(u32::MAX.to_le_bytes());
    table_huge.extend([0; 12]);
    let empty_tables: &[u8] = &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let addr_set: &[u8] = &[1, 1, 0x52, 0x54, 0, 1, 2, 3];
    let unknown: &[u8] = &[99, 0, 1];
    let header_only: &[u8] = &[0];
    let answers = run(
        &ctx,
        &stats,
        &[
            (promisc, true),
            (allmulti, true),
            (&table, true),
            (empty_tables, true),
            (promisc_long, true),
            (alluni, true),
            (&table_long, true),
            (table_short, true),
            (&table_huge, true),
            (addr_set, true),
            (unknown, true),
            (header_only, true),
        ],
    );
    let oks = 4;
    for (i, a) in answers.iter().enumerate() {
        let want = if i < oks { OK } else { ERR };
        assert_eq!(*a, (1, want), "command {i}");
    }
    assert_eq!(stats.snapshot().ctrl_errors, (answers.len() - oks) as u64);

    // Without VIRTIO_NET_F_CTRL_RX the RX class and the MAC table are refused.
    let no_rx = CtrlCtx {
        ctrl_rx: false,
        ..ctx
    };
    let answers = run(&no_rx, &stats, &[(promisc, true), (&table, true)]);
    assert_eq!(answers, [(1, ERR), (1, ERR)]);
}

#[test]
fn ctrl_chain_without_ack_byte_is_dropped() {
    let (p, _taps, _wakes) = pairs(1);
    let stats = NetStats::default();
    let ctx = ctx(&p, true, false);
    let promisc: &[u8] = &[0, 0, 1];
    let answers = run(&ctx, &stats, &[(promisc, false), (promisc, true)]);
    // No ack: used length 0, nothing written; the next command is answered.
    assert_eq!(answers, [(0, 0xAA), (1, OK)]);
    assert_eq!(stats.snapshot().ctrl_errors, 1);

    // A device-readable descriptor after the ack is refused as a whole.
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    mem.write_slice(promisc, GuestAddress(0x10_0000)).unwrap();
    let head = d.add(&[ro(0x10_0000, 3), wo(0x10_0800, 1), ro(0x10_0900, 4)]);
    let r = process_ctrl(&mut q, &mem, &ctx, &stats, 64).unwrap();
    assert_eq!(r.completed, 1);
    assert_eq!(d.used(0), (u32::from(head), 0));
    assert_eq!(stats.snapshot().ctrl_errors, 2);
}
