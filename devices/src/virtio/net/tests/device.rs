//! The `VirtioDevice` surface and the worker threads, end to end with fake TAPs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{fake_backend, frame, read, FakeTap, Peer};
use crate::virtio::features::VIRTIO_F_EVENT_IDX;
use crate::virtio::net::backend::offload::*;
use crate::virtio::net::features::*;
use crate::virtio::net::header::VnetHeader;
use crate::virtio::net::{NetConfig, VirtioNet};
use crate::virtio::testing::{activation, memory, ro, wait_for, wo, Driver, Mem, TestInterrupt};
use crate::virtio::{device_type, ActivateError, VirtioDevice};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const ALL_TUN: u32 = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;

fn dev(d: &mut VirtioNet) -> &mut dyn VirtioDevice<Mem> {
    d
}

fn net(pairs: usize, offloads: u32) -> (VirtioNet, Vec<Arc<FakeTap>>, Vec<Peer>) {
    let (backend, taps, peers) = fake_backend(pairs, offloads);
    let config = NetConfig {
        mac: MAC,
        queue_size: 256,
    };
    (VirtioNet::new(backend, config), taps, peers)
}

fn config(d: &mut VirtioNet, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0xAA; len];
    dev(d).read_config(offset, &mut data);
    data
}

#[test]
fn identity_features_and_config_space() {
    let (mut n, _, _) = net(1, 0);
    assert_eq!(dev(&mut n).device_type(), device_type::NET);
    assert_eq!(dev(&mut n).queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev(&mut n).device_features(), offered(0, 1));
    assert_eq!(dev(&mut n).device_features() & (F_GUEST_CSUM | F_MQ), 0);
    assert_eq!(
        config(&mut n, 0, 10),
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0, 1, 0]
    );
    dev(&mut n).write_config(0, &[1, 2, 3, 4, 5, 6]);
    assert_eq!(config(&mut n, 0, 6), MAC);
    assert_eq!(config(&mut n, 6, 2), [1, 0]);
    assert_eq!(config(&mut n, 9, 4), [0; 4]);
    assert_eq!(config(&mut n, u64::MAX, 2), [0; 2]);

    let (mut multi, _, _) = net(3, ALL_TUN);
    assert_eq!(dev(&mut multi).queue_max_sizes(), &[256; 7]);
    let f = dev(&mut multi).device_features();
    assert_eq!(f, offered(ALL_TUN, 3));
    assert_ne!(f & F_MQ, 0);
    assert_ne!(f & F_GUEST_UFO, 0);
    assert_eq!(config(&mut multi, 8, 2), [3, 0]);
    // An invalid queue size falls back to 256.
    let (backend, _, _) = fake_backend(1, 0);
    let mut odd = VirtioNet::new(
        backend,
        NetConfig {
            mac: MAC,
            queue_size: 100,
        },
    );
    assert_eq!(dev(&mut odd).queue_max_sizes(), &[256; 3]);
}

#[test]
fn offloads_follow_acked_features() {
    let (mut n, taps, _) = net(1, TUN_F_CSUM | TUN_F_TSO4);
    dev(&mut n).set_acked_features(F_GUEST_CSUM | F_GUEST_TSO4 | F_MRG_RXBUF);
    dev(&mut n).set_acked_features(F_GUEST_CSUM);
    // GUEST_TSO4 without GUEST_CSUM is not used.
    dev(&mut n).set_acked_features(F_GUEST_TSO4);
    // Bits outside the offer (GUEST_TSO6) are dropped.
    dev(&mut n).set_acked_features(F_GUEST_CSUM | F_GUEST_TSO6);
    dev(&mut n).reset();
    assert_eq!(
        taps[0].offload_calls(),
        [TUN_F_CSUM | TUN_F_TSO4, TUN_F_CSUM, 0, TUN_F_CSUM, 0]
    );
}

#[test]
fn activation_requires_pair_0_and_the_control_queue() {
    let mem = memory();
    let irq = Arc::new(TestInterrupt::default());
    let d: Vec<Driver> = (0..5).map(|i| Driver::new(&mem, 0x1000 * i, 16)).collect();
    let (mut n, taps, _) = net(2, 0);
    let try_activate = |n: &mut VirtioNet, idx: &[u16]| {
        let drivers: Vec<(u16, &Driver)> = idx.iter().map(|&i| (i, &d[usize::from(i)])).collect();
        dev(n).activate(activation(&mem, &drivers, &irq).0)
    };

    let err = try_activate(&mut n, &[1]).unwrap_err();
    assert!(matches!(err, ActivateError::MissingQueue(0)), "{err}");
    let err = try_activate(&mut n, &[0, 2, 3]).unwrap_err();
    assert!(matches!(err, ActivateError::MissingQueue(1)), "{err}");
    // CTRL_VQ without MQ: the control queue is queue 2.
    dev(&mut n).set_acked_features(F_CTRL_VQ);
    let err = try_activate(&mut n, &[0, 1, 4]).unwrap_err();
    assert!(matches!(err, ActivateError::MissingQueue(2)), "{err}");
    // With MQ it follows the pairs.
    dev(&mut n).set_acked_features(F_CTRL_VQ | F_MQ);
    let err = try_activate(&mut n, &[0, 1, 2]).unwrap_err();
    assert!(matches!(err, ActivateError::MissingQueue(4)), "{err}");
    assert!(!n.is_active());
    // Pair 1 half enabled is fine (not used).
    try_activate(&mut n, &[0, 1, 2, 4]).unwrap();
    assert!(n.is_active());
    let err = try_activate(&mut n, &[0, 1, 2, 3, 4]).unwrap_err();
    assert!(matches!(err, ActivateError::Invalid(_)), "{err}");
    // Queue 1 of the host is detached once (only pair 0 is in use); never queue 0.
    assert_eq!(taps[1].enable_calls(), [false]);
    assert_eq!(taps[0].enable_calls(), [false; 0]);
    dev(&mut n).reset();
    dev(&mut n).reset();
    assert!(!n.is_active());
}

/// Sends one frame through the transmitq at `base` and checks the host gets it.
fn tx_one(mem: &Mem, tx: &mut Driver, kick: &EventFd, peer: &Peer, base: u64, seed: u8) {
    let f = frame(VnetHeader::default(), 200, seed);
    mem.write_slice(&f, GuestAddress(base)).unwrap();
    let head = tx.add(&[ro(base, 12), ro(base + 12, 200)]);
    let before = tx.used_idx();
    kick.write(1).unwrap();
    assert_eq!(peer.recv(), f);
    wait_for("tx used", || tx.used_idx() == before.wrapping_add(1));
    assert_eq!(tx.used(before), (u32::from(head), 0));
}

#[test]
fn tx_and_rx_through_the_workers_then_reset_and_reactivate() {
    let mem = memory();
    let irq = Arc::new(TestInterrupt::default());
    let (mut n, taps, peers) = net(1, ALL_TUN);
    let features = dev(&mut n).device_features();
    dev(&mut n).set_acked_features(features);
    let mut rx = Driver::new(&mem, 0, 16);
    let mut tx = Driver::new(&mem, 0x1000, 16);
    let ctrl = Driver::new(&mem, 0x2000, 16);
    let (act, kicks) = activation(&mem, &[(0, &rx), (1, &tx), (2, &ctrl)], &irq);
    dev(&mut n).activate(act).unwrap();

    tx_one(&mem, &mut tx, &kicks[1], &peers[0], 0x10_0000, 1);
    wait_for("tx interrupt", || irq.queue_count(1) >= 1);

    // Mergeable buffers for a 64 KiB frame: five chains of 16 KiB.
    let heads: Vec<u16> = (0..5)
        .map(|i| rx.add(&[wo(0x20_0000 + 0x1_0000 * i, 16384)]))
        .collect();
    kicks[0].write(1).unwrap();
    let f = frame(VnetHeader::default(), 1000, 7);
    peers[0].send(&f);
    wait_for("rx used", || rx.used_idx() == 1);
    assert_eq!(rx.used(0), (u32::from(heads[0]), f.len() as u32));
    let got = read(&mem, 0x20_0000, f.len());
    assert_eq!(got[12..], f[12..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    wait_for("rx interrupt", || irq.queue_count(0) >= 1);
    let s = n.stats().snapshot();
    assert_eq!((s.tx_frames, s.rx_frames, s.rx_bytes), (1, 1, 1000));

    dev(&mut n).reset();
    assert!(!n.is_active());
    assert_eq!(taps[0].offload_calls(), [ALL_TUN, ALL_TUN, 0]);
    // Nothing reads the host queue after the reset.
    peers[0].send(&f);
    std::thread::sleep(Duration::from_millis(20));
    assert!(taps[0].has_frame());

    // Again, with fresh rings and no offloads, control queue or mergeable buffers.
    dev(&mut n).set_acked_features(VIRTIO_F_EVENT_IDX);
    let mut rx = Driver::new(&mem, 0x4000, 16);
    let mut tx = Driver::new(&mem, 0x5000, 16);
    let (act, kicks) = activation(&mem, &[(0, &rx), (1, &tx)], &irq);
    dev(&mut n).activate(act).unwrap();
    tx_one(&mem, &mut tx, &kicks[1], &peers[0], 0x30_0000, 2);
    let head = rx.add(&[wo(0x40_0000, 1530)]);
    kicks[0].write(1).unwrap();
    // The frame sent while the device was reset arrives now.
    wait_for("rx used", || rx.used_idx() == 1);
    assert_eq!(rx.used(0), (u32::from(head), f.len() as u32));
    assert_eq!(read(&mem, 0x40_0000 + 12, 1000), f[12..]);
    assert_eq!(taps[0].offload_calls().last(), Some(&0));
    assert_eq!(irq.errors.load(Ordering::SeqCst), 0);
    dev(&mut n).reset();
}

#[test]
fn vq_pairs_set_starts_the_second_pair() {
    let mem = memory();
    let irq = Arc::new(TestInterrupt::default());
    let (mut n, taps, peers) = net(2, 0);
    dev(&mut n).set_acked_features(F_CTRL_VQ | F_MQ | F_MRG_RXBUF);
    let drivers: Vec<Driver> = (0..5).map(|i| Driver::new(&mem, 0x1000 * i, 16)).collect();
    let refs: Vec<(u16, &Driver)> = drivers
        .iter()
        .enumerate()
        .map(|(i, d)| (i as u16, d))
        .collect();
    let (act, kicks) = activation(&mem, &refs, &irq);
    dev(&mut n).activate(act).unwrap();
    let mut drivers = drivers;

    // Pair 1 is not in use: its host queue is detached and not read.
    let rx1_head = drivers[2].add(&[wo(0x20_0000, 4096)]);
    kicks[2].write(1).unwrap();
    let f = frame(VnetHeader::default(), 300, 3);
    peers[1].send(&f);
    std::thread::sleep(Duration::from_millis(20));
    assert!(taps[1].has_frame());
    assert_eq!(taps[1].enable_calls(), [false]);

    // VQ_PAIRS_SET 2 on the control queue.
    mem.write_slice(&[4, 0, 2, 0], GuestAddress(0x10_0000))
        .unwrap();
    mem.write_obj(0xAAu8, GuestAddress(0x10_0100)).unwrap();
    drivers[4].add(&[ro(0x10_0000, 2), ro(0x10_0002, 2), wo(0x10_0100, 1)]);
    kicks[4].write(1).unwrap();
    wait_for("ctrl used", || drivers[4].used_idx() == 1);
    assert_eq!(drivers[4].used(0).1, 1);
    assert_eq!(read(&mem, 0x10_0100, 1), [0]);
    assert_eq!(taps[1].enable_calls(), [false, true]);
    wait_for("ctrl interrupt", || irq.queue_count(4) >= 1);

    // Pair 1's worker now reads its host queue.
    wait_for("rx1 used", || drivers[2].used_idx() == 1);
    assert_eq!(drivers[2].used(0), (u32::from(rx1_head), f.len() as u32));
    assert_eq!(read(&mem, 0x20_0000 + 12, 300), f[12..]);
    wait_for("rx1 interrupt", || irq.queue_count(2) >= 1);
    dev(&mut n).reset();
}

#[test]
fn ring_error_sets_device_needs_reset() {
    let mem = memory();
    let irq = Arc::new(TestInterrupt::default());
    let (mut n, _taps, peers) = net(1, 0);
    let rx = Driver::new(&mem, 0, 16);
    let mut tx = Driver::new(&mem, 0x1000, 16);
    let (act, kicks) = activation(&mem, &[(0, &rx), (1, &tx)], &irq);
    dev(&mut n).activate(act).unwrap();
    tx.set_avail_idx(100);
    kicks[1].write(1).unwrap();
    wait_for("device error", || irq.errors.load(Ordering::SeqCst) == 1);
    // The worker leaves the queues alone until the reset.
    tx.set_avail_idx(0);
    tx_add_and_kick(&mem, &mut tx, &kicks[1]);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(peers[0].try_recv(), None);
    assert_eq!(tx.used_idx(), 0);
    dev(&mut n).reset();
    assert!(!n.is_active());
}

fn tx_add_and_kick(mem: &Mem, tx: &mut Driver, kick: &EventFd) {
    let f = frame(VnetHeader::default(), 60, 0);
    mem.write_slice(&f, GuestAddress(0x30_0000)).unwrap();
    tx.add(&[ro(0x30_0000, 72)]);
    kick.write(1).unwrap();
}

#[test]
fn a_short_receive_ring_is_used_after_a_while() {
    let mem = memory();
    let irq = Arc::new(TestInterrupt::default());
    let (mut n, _taps, peers) = net(1, ALL_TUN);
    // Mergeable buffers and GSO: a largest frame needs 64 KiB of buffers.
    dev(&mut n).set_acked_features(F_MRG_RXBUF | F_GUEST_CSUM | F_GUEST_TSO4);
    let mut rx = Driver::new(&mem, 0, 16);
    let tx = Driver::new(&mem, 0x1000, 16);
    let (act, kicks) = activation(&mem, &[(0, &rx), (1, &tx)], &irq);
    dev(&mut n).activate(act).unwrap();
    let head = rx.add(&[wo(0x20_0000, 4096)]);
    rx.add(&[wo(0x21_0000, 4096)]);
    kicks[0].write(1).unwrap();
    let f = frame(VnetHeader::default(), 1000, 4);
    let sent = std::time::Instant::now();
    peers[0].send(&f);
    wait_for("rx used", || rx.used_idx() == 1);
    assert!(sent.elapsed() >= crate::virtio::net::worker::SHORT_RING_WAIT);
    assert_eq!(rx.used(0), (u32::from(head), f.len() as u32));
    assert_eq!(read(&mem, 0x20_0000 + 12, 1000), f[12..]);
    dev(&mut n).reset();
}

#[test]
fn a_full_host_queue_delays_transmission_without_loss() {
    let mem = memory();
    let irq = Arc::new(TestInterrupt::default());
    let (mut n, taps, peers) = net(1, 0);
    let rx = Driver::new(&mem, 0, 16);
    let mut tx = Driver::new(&mem, 0x1000, 16);
    let (act, kicks) = activation(&mem, &[(0, &rx), (1, &tx)], &irq);
    dev(&mut n).activate(act).unwrap();
    let filler = taps[0].fill();
    let f = frame(VnetHeader::default(), 700, 5);
    mem.write_slice(&f, GuestAddress(0x30_0000)).unwrap();
    let head = tx.add(&[ro(0x30_0000, f.len() as u32)]);
    kicks[1].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(tx.used_idx(), 0);
    // Room again: the worker sends on POLLOUT, with no new kick.
    for _ in 0..filler {
        assert!(peers[0].try_recv().is_some());
    }
    assert_eq!(peers[0].recv(), f);
    wait_for("tx used", || tx.used_idx() == 1);
    assert_eq!(tx.used(0), (u32::from(head), 0));
    let s = n.stats().snapshot();
    assert_eq!((s.tx_frames, s.tx_error, s.tx_malformed), (1, 0, 0));
    dev(&mut n).reset();
}
