//! virtio-net behind a test IOMMU: frames whose buffers the mapping refuses are
//! dropped and counted while the device goes on; every translation happens under a
//! DMA guard, and no guard is held while a worker waits (for room in a full TAP, for
//! receive buffers) or idles.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{fake_backend, fake_tap, frame};
use crate::dma::DmaTracker;
use crate::virtio::net::header::{TxOffloads, VnetHeader, MAX_PLAIN_FRAME};
use crate::virtio::net::rx::{process_rx, RxFill, RxParams};
use crate::virtio::net::stats::NetStats;
use crate::virtio::net::tx::process_tx;
use crate::virtio::net::{NetConfig, VirtioNet};
use crate::virtio::testing::{iommu_memory, ro, wait_for, wo, Driver, IoMem, TestInterrupt};
use crate::virtio::{Activation, ActiveQueue, VirtioDevice};

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

fn put(mem: &IoMem, addr: u64, bytes: &[u8]) {
    mem.get_backend()
        .write_slice(bytes, GuestAddress(addr))
        .unwrap();
}

fn get(mem: &IoMem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.get_backend()
        .read_slice(&mut v, GuestAddress(addr))
        .unwrap();
    v
}

#[test]
fn tx_from_inaccessible_buffers_is_dropped_and_counted() {
    let mem = iommu_memory();
    let iommu = mem.iommu();
    iommu.map(0, PAGE, Permissions::ReadWrite);
    let mut d = Driver::new(mem.get_backend(), 0, 16);
    let mut q = d.queue();
    let (tap, peer) = fake_tap();
    let stats = NetStats::default();
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
    let r = process_tx(&mut q, &mem, tap.as_raw_fd(), &NO_OFFLOADS, &stats, 64).unwrap();
    assert_eq!(r.completed, 3);
    assert_eq!(peer.recv(), f);
    assert_eq!(peer.try_recv(), None);
    assert_eq!((d.used(0).1, d.used(1).1, d.used(2).1), (0, 0, 0));
    let s = stats.snapshot();
    assert_eq!((s.tx_frames, s.tx_malformed), (1, 2));
    assert!(iommu.faults() >= 2);
}

#[test]
fn rx_into_inaccessible_buffers_is_refused_and_counted() {
    let mem = iommu_memory();
    let iommu = mem.iommu();
    iommu.map(0, PAGE, Permissions::ReadWrite);
    let mut d = Driver::new(mem.get_backend(), 0, 16);
    let mut q = d.queue();
    let (tap, peer) = fake_tap();
    let stats = NetStats::default();
    // Chain 0 unmapped, chain 1 read-only for the device, chain 2 fine.
    d.add(&[wo(BUF, 1526)]);
    iommu.map(BUF + 0x1_0000, PAGE, Permissions::Read);
    d.add(&[wo(BUF + 0x1_0000, 1526)]);
    iommu.map(BUF + 0x2_0000, PAGE, Permissions::Write);
    let good = d.add(&[wo(BUF + 0x2_0000, 1526)]);
    let f = frame(VnetHeader::default(), 200, 5);
    peer.send(&f);
    let fd = tap.as_raw_fd();
    let r = process_rx(&mut q, &mem, fd, &PLAIN, &stats, 64, RxFill::Full).unwrap();
    assert_eq!((r.frames, r.completed), (1, 3));
    assert_eq!((d.used(0).1, d.used(1).1), (0, 0));
    assert_eq!(d.used(2), (u32::from(good), f.len() as u32));
    let got = get(&mem, BUF + 0x2_0000, f.len());
    assert_eq!(got[12..], f[12..]);
    let s = stats.snapshot();
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
    let kicks: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let irq = Arc::new(TestInterrupt::default());
    let dev: &mut dyn VirtioDevice<IoMem> = &mut n;
    dev.activate(Activation {
        mem: mem.clone(),
        queues: vec![
            ActiveQueue {
                index: 0,
                queue: rx.queue(),
                notify: kicks[0].try_clone().unwrap(),
            },
            ActiveQueue {
                index: 1,
                queue: tx.queue(),
                notify: kicks[1].try_clone().unwrap(),
            },
        ],
        interrupt: irq.clone(),
        dma: dma.clone(),
    })
    .unwrap();

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
    let (done_tx, done) = mpsc::channel();
    let waiter = {
        let dma = dma.clone();
        thread::spawn(move || {
            dma.wait_for_inflight();
            let _ = done_tx.send(());
        })
    };
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
