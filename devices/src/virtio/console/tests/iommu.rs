//! virtio-console behind a test IOMMU: buffers the mapping refuses fail their chain
//! (returned with length 0, nothing lost from the input), every translation happens
//! under a DMA guard, and no guard is held while the sink blocks or the device idles.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::Permissions;
use vmm_sys_util::eventfd::EventFd;

use super::{activation, get, put, ro, wait_for, wo, Driver, TestInterrupt};
use crate::dma::DmaTracker;
use crate::virtio::console::queue::{fill_rx, process_tx};
use crate::virtio::console::{InputSource, VirtioConsole, RX_QUEUE, TX_QUEUE};
use crate::virtio::testing::{iommu_memory, unmap_wait, IoMem};
use crate::virtio::VirtioDevice;

const PAGE: u64 = 0x1000;
const BUF: u64 = 0x10_0000;

/// Memory behind the IOMMU with the rings (first page) mapped, watched by a tracker.
fn guarded_memory() -> (IoMem, DmaTracker) {
    let mem = iommu_memory();
    mem.iommu().map(0, PAGE, Permissions::ReadWrite);
    let dma = DmaTracker::new();
    mem.iommu().watch(&dma);
    (mem, dma)
}

#[test]
fn tx_from_inaccessible_buffers_is_refused() {
    let (mem, dma) = guarded_memory();
    let iommu = mem.iommu();
    let mut drv = Driver::new(mem.get_backend(), 0, 16);
    let mut q = drv.queue();
    put(&mem, BUF, b"secret");
    put(&mem, BUF + PAGE, b"fine");
    iommu.map(BUF + PAGE, PAGE, Permissions::Read);
    // Unmapped, then mapped but device-writable only.
    drv.add(&[ro(BUF, 6)]);
    iommu.map(BUF + 2 * PAGE, PAGE, Permissions::Write);
    drv.add(&[ro(BUF + 2 * PAGE, 6)]);
    drv.add(&[ro(BUF + PAGE, 4)]);
    let mut sink = Vec::new();
    let stats = process_tx(&mut q, &mem, &mut sink, &dma).unwrap();
    assert_eq!((stats.chains, stats.invalid, stats.bytes), (3, 2, 4));
    assert_eq!(sink, b"fine");
    assert_eq!((drv.used(0).1, drv.used(1).1, drv.used(2).1), (0, 0, 0));
    assert!(iommu.faults() >= 2);
    assert_eq!(dma.inflight(), 0);
    assert_eq!(iommu.unguarded(), 0, "translation without a DMA guard");
}

#[test]
fn rx_chain_that_fails_midway_returns_empty_and_keeps_the_input() {
    let (mem, dma) = guarded_memory();
    let iommu = mem.iommu();
    let mut drv = Driver::new(mem.get_backend(), 0, 16);
    let mut q = drv.queue();
    // Chain 0: two buffers; the second is unmapped after the device checked it (an
    // UNMAP racing with the copy).
    iommu.map(BUF, 2 * PAGE, Permissions::Write);
    iommu.revoke_after(BUF + PAGE, 4, 1);
    drv.add(&[wo(BUF, 4), wo(BUF + PAGE, 4)]);
    // Chain 1: not mapped at all.
    drv.add(&[wo(BUF + 4 * PAGE, 16)]);
    // Chain 2: fine.
    iommu.map(BUF + 8 * PAGE, PAGE, Permissions::Write);
    drv.add(&[wo(BUF + 8 * PAGE, 16)]);
    let mut input: VecDeque<u8> = b"abcdefgh".iter().copied().collect();
    let stats = fill_rx(&mut q, &mem, &mut input, &dma).unwrap();
    assert_eq!((stats.chains, stats.invalid, stats.bytes), (3, 2, 8));
    assert_eq!((drv.used(0).1, drv.used(1).1, drv.used(2).1), (0, 0, 8));
    assert!(input.is_empty());
    assert_eq!(get(&mem, BUF + 8 * PAGE, 8), b"abcdefgh");
    assert_eq!(dma.inflight(), 0);
    assert_eq!(iommu.unguarded(), 0, "translation without a DMA guard");
}

/// A sink whose writes wait for the test: each tells the test it started, then waits
/// for a release.
struct GatedSink {
    started: Sender<Vec<u8>>,
    release: Receiver<()>,
}

impl Write for GatedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.started.send(buf.to_vec());
        let _ = self.release.recv_timeout(Duration::from_secs(10));
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn worker_holds_no_guard_while_the_sink_blocks_or_when_idle() {
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let sink = GatedSink {
        started: started_tx,
        release: release_rx,
    };
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let mut dev = VirtioConsole::new(Box::new(sink), Some(InputSource::new(guest_side)));
    let mem = iommu_memory();
    mem.iommu().map_all();
    let dma = DmaTracker::new();
    mem.iommu().watch(&dma);
    let mut rx = Driver::new(mem.get_backend(), 0, 16);
    let mut tx = Driver::new(mem.get_backend(), 0x8000, 16);
    let irq = Arc::new(TestInterrupt::default());
    let (mut act, kicks) = activation(&mem, &[(RX_QUEUE, &rx), (TX_QUEUE, &tx)], &irq);
    act.dma = dma.clone();
    let [rx_kick, tx_kick] = <[EventFd; 2]>::try_from(kicks).unwrap();
    let d: &mut dyn VirtioDevice<IoMem> = &mut dev;
    d.activate(act).unwrap();

    put(&mem, BUF, b"hello");
    tx.add(&[ro(BUF, 5)]);
    tx_kick.write(1).unwrap();
    let written = started.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(written, b"hello");
    // The sink blocks with the bytes copied out of guest memory: no guard, so an
    // UNMAP goes through.
    assert_eq!(dma.inflight(), 0, "a guard is held while the sink blocks");
    let (done, waiter) = unmap_wait(&dma);
    done.recv_timeout(Duration::from_secs(10))
        .expect("an UNMAP waited for the sink");
    waiter.join().unwrap();
    release.send(()).unwrap();
    wait_for("the transmit chain", || tx.used_idx() == 1);

    // Input goes the other way under guards too.
    rx.add(&[wo(BUF + PAGE, 16)]);
    rx_kick.write(1).unwrap();
    host.write_all(b"ping").unwrap();
    wait_for("input delivered", || rx.used_idx() == 1);
    assert_eq!(get(&mem, BUF + PAGE, 4), b"ping");

    wait_for("no guard held while idle", || dma.inflight() == 0);
    assert!(mem.iommu().translations() > 0);
    assert_eq!(
        mem.iommu().unguarded(),
        0,
        "translation without a DMA guard"
    );
    assert_eq!(irq.errors.load(std::sync::atomic::Ordering::SeqCst), 0);
    VirtioDevice::<IoMem>::reset(&mut dev);
}
