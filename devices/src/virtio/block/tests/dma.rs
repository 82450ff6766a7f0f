//! DMA guards of virtio-blk end to end (workers, a tracked `DmaTracker`, guest memory
//! behind the test IOMMU): a request holds a guard while it moves data, so an IOMMU
//! UNMAP waits for it; an io_uring request keeps its guard until its completion; no
//! guard is held while the backend syncs or while the device is idle.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self};
use std::time::Duration;

use virtio_bindings::bindings::virtio_blk::*;
use vmm_sys_util::eventfd::EventFd;

use super::{get, pattern, put, put_header, status_at, BackendOp, HookedBackend, TempImage};
use crate::dma::DmaTracker;
use crate::virtio::block::backend::{BlockBackend, IoBuf, IoBufMut};
use crate::virtio::block::{BlockConfig, IoEngine, VirtioBlock};
use crate::virtio::testing::{
    activation, iommu_memory, ro, unmap_wait, wait_for, wo, Driver, IoMem, TestInterrupt,
};
use crate::virtio::VirtioDevice;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IMAGE: usize = 64 * 1024;
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;

/// A backend whose io_uring file is a socket: a read stays in flight until the test
/// sends the data.
struct SocketBackend(UnixStream);

impl BlockBackend for SocketBackend {
    fn read_vectored(&self, _: u64, _: &mut [IoBufMut<'_>]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn write_vectored(&self, _: u64, _: &[IoBuf<'_>]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        IMAGE as u64
    }
    fn raw_file(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

/// An activated device: guest memory behind the test IOMMU (all mapped), one queue of
/// 16 entries at 0, a tracked DMA tracker.
struct Rig<'a> {
    mem: &'a IoMem,
    driver: Driver<'a>,
    kick: EventFd,
    dma: DmaTracker,
    _irq: Arc<TestInterrupt>,
}

impl<'a> Rig<'a> {
    fn activate(d: &mut VirtioBlock, mem: &'a IoMem, features: u64) -> Self {
        mem.iommu().map_all();
        let dma = DmaTracker::new();
        mem.iommu().watch(&dma);
        let driver = Driver::new(mem.get_backend(), 0, 16);
        let irq = Arc::new(TestInterrupt::default());
        let (mut act, mut kicks) = activation(mem, &[(0, &driver)], &irq);
        act.dma = dma.clone();
        let dev: &mut dyn VirtioDevice<IoMem> = d;
        dev.set_acked_features(features);
        dev.activate(act).unwrap();
        let kick = kicks.remove(0);
        Self {
            mem,
            driver,
            kick,
            dma,
            _irq: irq,
        }
    }

    /// Publishes request `kind` at sector 0 (with `len` data bytes) and kicks.
    fn submit(&mut self, kind: u32, len: u32) {
        let phys = self.mem.get_backend();
        put_header(phys, HDR, kind, 0);
        put(phys, STATUS, &[0xFF]);
        let chain = match kind {
            VIRTIO_BLK_T_FLUSH => vec![ro(HDR, 16), wo(STATUS, 1)],
            _ => vec![ro(HDR, 16), wo(DATA, len), wo(STATUS, 1)],
        };
        self.driver.add(&chain);
        self.kick.write(1).unwrap();
    }

    fn wait_complete(&self) {
        wait_for("the used ring", || self.driver.used_idx() == 1);
        assert_eq!(status_at(self.mem.get_backend(), STATUS), OK);
    }

    /// Idle: every guard was dropped, and every translation had one.
    fn assert_idle(&self) {
        wait_for("no DMA guard held while idle", || self.dma.inflight() == 0);
        assert!(self.mem.iommu().translations() > 0);
        assert_eq!(
            self.mem.iommu().unguarded(),
            0,
            "translation without a guard"
        );
    }
}

/// A file backend whose reads and flushes wait for the test: each tells the test it
/// started, then waits for a release.
fn gated(image: &TempImage) -> (HookedBackend, Receiver<BackendOp>, Sender<()>) {
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let (started_tx, release_rx) = (Mutex::new(started_tx), Mutex::new(release_rx));
    let backend = HookedBackend::new(image, move |op| {
        if matches!(op, BackendOp::Read | BackendOp::Flush) {
            let _ = lock(&started_tx).send(op);
            let _ = lock(&release_rx).recv_timeout(Duration::from_secs(10));
        }
    });
    (backend, started, release)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn config(engine: IoEngine) -> BlockConfig {
    BlockConfig {
        queue_size: 16,
        io_engine: engine,
        ..BlockConfig::default()
    }
}

#[test]
fn a_read_holds_a_guard_while_it_moves_data() {
    let image = TempImage::new(IMAGE);
    let (backend, started, release) = gated(&image);
    let mut d = VirtioBlock::new(Box::new(backend), config(IoEngine::Sync)).unwrap();
    let mem = iommu_memory();
    let mut rig = Rig::activate(&mut d, &mem, 0);
    rig.submit(VIRTIO_BLK_T_IN, 1024);
    assert_eq!(
        started.recv_timeout(Duration::from_secs(10)),
        Ok(BackendOp::Read)
    );
    // The backend is writing into guest memory: an UNMAP must wait.
    assert_eq!(rig.dma.inflight(), 1);
    let (done, waiter) = unmap_wait(&rig.dma);
    assert!(
        done.recv_timeout(Duration::from_millis(200)).is_err(),
        "the UNMAP completed while the read was moving data"
    );
    release.send(()).unwrap();
    done.recv_timeout(Duration::from_secs(10))
        .expect("the UNMAP still waits after the read completed");
    waiter.join().unwrap();
    rig.wait_complete();
    let expected: Vec<u8> = (0..1024).map(pattern).collect();
    assert_eq!(get(rig.mem.get_backend(), DATA, 1024), expected);
    rig.assert_idle();
}

#[test]
fn a_flush_holds_no_guard_while_the_backend_syncs() {
    let image = TempImage::new(IMAGE);
    let (backend, started, release) = gated(&image);
    let mut d = VirtioBlock::new(Box::new(backend), config(IoEngine::Sync)).unwrap();
    let mem = iommu_memory();
    let mut rig = Rig::activate(&mut d, &mem, 1 << VIRTIO_BLK_F_FLUSH);
    rig.submit(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        started.recv_timeout(Duration::from_secs(10)),
        Ok(BackendOp::Flush)
    );
    assert_eq!(rig.dma.inflight(), 0);
    let (done, waiter) = unmap_wait(&rig.dma);
    done.recv_timeout(Duration::from_secs(10))
        .expect("an UNMAP waited for a flush");
    waiter.join().unwrap();
    release.send(()).unwrap();
    rig.wait_complete();
    rig.assert_idle();
}

#[test]
fn an_io_uring_read_keeps_its_guard_until_it_completes() {
    let (file, peer) = UnixStream::pair().unwrap();
    let mut d = VirtioBlock::new(Box::new(SocketBackend(file)), config(IoEngine::Uring)).unwrap();
    // Dropped before the device, should the test fail: the read then ends (EOF) and
    // the worker can stop.
    let mut peer = peer;
    let mem = iommu_memory();
    let mut rig = Rig::activate(&mut d, &mem, 0);
    rig.submit(VIRTIO_BLK_T_IN, 512);
    // The worker submits the read and goes back to poll; the read waits for data.
    wait_for("the read to be submitted", || {
        rig.mem.iommu().translations() >= 4 && rig.dma.inflight() == 1
    });
    thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.driver.used_idx(), 0);
    assert_eq!(
        rig.dma.inflight(),
        1,
        "the request in flight holds no guard"
    );
    let (done, waiter) = unmap_wait(&rig.dma);
    assert!(
        done.recv_timeout(Duration::from_millis(200)).is_err(),
        "the UNMAP completed while the kernel held the guest buffers"
    );
    let data: Vec<u8> = (0..512).map(|i| (i % 7) as u8 + 1).collect();
    peer.write_all(&data).unwrap();
    done.recv_timeout(Duration::from_secs(10))
        .expect("the UNMAP still waits after the read completed");
    waiter.join().unwrap();
    rig.wait_complete();
    assert_eq!(get(rig.mem.get_backend(), DATA, 512), data);
    rig.assert_idle();
    drop(peer);
}
