//! virtio-net behind a test IOMMU: frames whose buffers the mapping refuses are
//! dropped and counted while the device goes on; every translation happens under a
//! DMA guard, and no guard is held while a worker waits (for room in a full TAP, for
//! receive buffers) or idles.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vm_memory::Permissions;

use super::{fake_backend, frame, Host};
use crate::dma::DmaTracker;
use crate::virtio::net::header::{TxOffloads, VnetHeader, MAX_PLAIN_FRAME};
use crate::virtio::net::rx::{RxFill, RxParams};
use crate::virtio::net::{NetConfig, VirtioNet};
use crate::virtio::testing::{
    activation, get, iommu_memory, put, ro, unmap_wait, wait_for, wo, Driver, IoMem, TestInterrupt,
};
use crate::virtio::VirtioDevice;

const PAGE: u64 = 0x1000;
const BUF: u64 = 0x10_0000;
const NO_OFFLOADS: TxOffloads = TxOffloads {
    csum: false,
    tso4: false,
    tso6: false,
    ecn: false,
    ufo: false,
};
const PLAIN: RxParams = RxParams {
    mrg_rxbuf: false,
    max_frame: MAX_PLAIN_FRAME,
    guest_csum: false,
};

/// Memory behind the test IOMMU with only the rings (first page) mapped.
fn rings_mapped() -> IoMem {
    let mem = iommu_memory();
    mem.iommu().map(0, PAGE, Permissions::ReadWrite);
    mem
}

#[test]
fn tx_from_inaccessible_buffers_is_dropped_and_counted() {
    let mem = rings_mapped();
    let iommu = mem.iommu();
    let mut d = Driver::new(mem.get_backend(), 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let f = frame(VnetHeader::default(), 100, 3);
    // Header and payload in two buffers of their own page each, for three frames.
    for i in 0..3 {
        let at = BUF + 0x1_0000 * i;
        put(&mem, at, &f[..12]);
        put(&mem, at + PAGE, &f[12..]);
        iommu.map(at, PAGE, Permissions::Read);
        d.add(&[ro(at, 12), ro(at + PAGE, 100)]);
    }
    // Frame 0: payload unmapped. Frame 1: payload unmapped after the device checked
    // it (an UNMAP racing with the send). Frame 2: fine.
    iommu.map(BUF + 0x1_0000 + PAGE, PAGE, Permissions::Read);
    iommu.revoke_after(BUF + 0x1_0000 + PAGE, 100, 1);
    iommu.map(BUF + 0x2_0000 + PAGE, PAGE, Permissions::Read);
    let r = h.tx(&mut q, &mem, &NO_OFFLOADS, 64).unwrap();
    assert_eq!(r.completed, 3);
    assert_eq!(h.peer.recv(), f);
    assert_eq!(h.peer.try_recv(), None);
    assert_eq!((d.used(0).1, d.used(1).1, d.used(2).1), (0, 0, 0));
    let s = h.stats.snapshot();
    assert_eq!((s.tx_frames, s.tx_malformed), (1, 2));
    assert!(iommu.faults() >= 2);
}

#[test]
fn rx_into_inaccessible_buffers_is_refused_and_counted() {
    let mem = rings_mapped();
    let iommu = mem.iommu();
    let mut d = Driver::new(mem.get_backend(), 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    // Chain 0 unmapped, chain 1 read-only for the device, chain 2 fine.
    d.add(&[wo(BUF, 1526)]);
    iommu.map(BUF + 0x1_0000, PAGE, Permissions::Read);
    d.add(&[wo(BUF + 0x1_0000, 1526)]);
    iommu.map(BUF + 0x2_0000, PAGE, Permissions::Write);
    let good = d.add(&[wo(BUF + 0x2_0000, 1526)]);
    let f = frame(VnetHeader::default(), 200, 5);
    h.peer.send(&f);
    let r = h.rx(&mut q, &mem, &PLAIN, RxFill::Full);
    assert_eq!((r.frames, r.completed), (1, 3));
    assert_eq!((d.used(0).1, d.used(1).1), (0, 0));
    assert_eq!(d.used(2), (u32::from(good), f.len() as u32));
    let got = get(&mem, BUF + 0x2_0000, f.len());
    assert_eq!(got[12..], f[12..]);
    let s = h.stats.snapshot();
    assert_eq!((s.rx_frames, s.rx_malformed), (1, 2));
}

#[test]
fn workers_hold_no_guard_while_waiting_for_the_tap_or_buffers() {
    let mem = iommu_memory();
    mem.iommu().map_all();
    let dma = DmaTracker::new();
    mem.iommu().watch(&dma);
    let (backend, taps, peers) = fake_backend(1, 0);
    let config = NetConfig {
        mac: [0x52, 0x54, 0, 0, 0, 1],
        queue_size: 16,
    };
    let mut n = VirtioNet::new(backend, config);
    let mut rx = Driver::new(mem.get_backend(), 0, 16);
    let mut tx = Driver::new(mem.get_backend(), 0x1000, 16);
    let irq = Arc::new(TestInterrupt::default());
    let (mut act, kicks) = activation(&mem, &[(0, &rx), (1, &tx)], &irq);
    act.dma = dma.clone();
    let dev: &mut dyn VirtioDevice<IoMem> = &mut n;
    dev.activate(act).unwrap();

    // Let the workers finish their first pass before counting.
    wait_for("the first pass", || {
        mem.iommu().translations() > 0 && dma.inflight() == 0
    });
    thread::sleep(Duration::from_millis(50));

    // The TAP is full: the frame waits in the transmitq, with no guard held.
    let filler = taps[0].fill();
    assert!(filler > 0);
    let f = frame(VnetHeader::default(), 300, 9);
    put(&mem, BUF, &f);
    let before = mem.iommu().translations();
    tx.add(&[ro(BUF, 12), ro(BUF + 12, 300)]);
    kicks[1].write(1).unwrap();
    // Avail index and entry, the descriptor-table check, two descriptors, their
    // checks, the header, the payload.
    wait_for("the device to try the frame", || {
        mem.iommu().translations() >= before + 8
    });
    wait_for("no guard while the TAP is full", || dma.inflight() == 0);
    let (done, waiter) = unmap_wait(&dma);
    done.recv_timeout(Duration::from_secs(10))
        .expect("an UNMAP waited for room in the TAP");
    waiter.join().unwrap();
    thread::sleep(Duration::from_millis(20));
    assert_eq!(tx.used_idx(), 0, "the frame was not waiting");
    for _ in 0..filler {
        assert!(peers[0].try_recv().is_some());
    }
    assert_eq!(peers[0].recv(), f);
    wait_for("the transmit chain", || tx.used_idx() == 1);

    // A frame from the host with no receive buffer: it waits, with no guard held.
    let g = frame(VnetHeader::default(), 400, 4);
    peers[0].send(&g);
    thread::sleep(Duration::from_millis(20));
    wait_for("no guard while waiting for buffers", || dma.inflight() == 0);
    rx.add(&[wo(BUF + 0x1_0000, 1526)]);
    kicks[0].write(1).unwrap();
    wait_for("the frame delivered", || rx.used_idx() == 1);
    assert_eq!(get(&mem, BUF + 0x1_0000 + 12, 400), g[12..]);

    wait_for("no guard held while idle", || dma.inflight() == 0);
    assert_eq!(
        mem.iommu().unguarded(),
        0,
        "translation without a DMA guard"
    );
    assert_eq!(irq.errors.load(Ordering::SeqCst), 0);
    let s = n.stats().snapshot();
    assert_eq!((s.tx_frames, s.rx_frames), (1, 1));
    VirtioDevice::<IoMem>::reset(&mut n);
}
