//! The io_uring engine on its own: a batch in flight completed out of order, FLUSH
//! ordering, a bad buffer failing one request only, and configuration checks.

use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::Queue;

use super::{disk, get, pattern, put, put_header, status_at, uring_engine, TempImage, FEATURES};
use crate::dma::DmaTracker;
use crate::virtio::block::engine::QueueEngine;
use crate::virtio::block::queue::QueueStats;
use crate::virtio::block::request::Disk;
use crate::virtio::block::uring::{self, UringEngine};
use crate::virtio::block::{BlockConfig, BlockError, IoEngine, UringError, VirtioBlock};
use crate::virtio::testing::{memory, ro, wo, Driver, Mem, MEM_SIZE};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const IMAGE: usize = 256 * 1024;

/// Request `i` uses header `HDR + 16 i`, status `STATUS + i`, data `DATA + 64 KiB i`.
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;

struct Rig<'a> {
    mem: &'a Mem,
    driver: Driver<'a>,
    queue: Queue,
    disk: Disk,
    engine: UringEngine,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a Mem, disk: Disk) -> Self {
        let driver = Driver::new(mem, 0, 64);
        let queue = driver.queue();
        let mut engine = uring_engine(&disk, 64, DmaTracker::untracked());
        engine.reverse_completions = true;
        Self {
            mem,
            driver,
            queue,
            disk,
            engine,
        }
    }

    /// Publishes request `i`: `kind` at `sector` with `len` data bytes at `data`.
    fn publish(&mut self, i: u64, kind: u32, sector: u64, data: u64, len: u32) -> u16 {
        put_header(self.mem, HDR + 16 * i, kind, sector);
        put(self.mem, STATUS + i, &[0xFF]);
        let (hdr, status) = (ro(HDR + 16 * i, 16), wo(STATUS + i, 1));
        match kind {
            VIRTIO_BLK_T_FLUSH => self.driver.add(&[hdr, status]),
            VIRTIO_BLK_T_OUT => self.driver.add(&[hdr, ro(data, len), status]),
            _ => self.driver.add(&[hdr, wo(data, len), status]),
        }
    }

    fn serve(&mut self) -> QueueStats {
        let (q, mem, disk) = (&mut self.queue, self.mem, &self.disk);
        self.engine.serve(q, mem, disk, 64).unwrap()
    }

    fn reap(&mut self) -> QueueStats {
        let (q, mem, disk) = (&mut self.queue, self.mem, &self.disk);
        self.engine.reap(q, mem, disk, true).unwrap()
    }

    fn in_flight(&self) -> usize {
        QueueEngine::<Mem>::in_flight(&self.engine)
    }

    /// Reaps until nothing is in flight; returns the used entries in ring order.
    fn drain(&mut self) -> Vec<(u32, u32)> {
        let start = self.driver.used_idx();
        while self.in_flight() > 0 {
            self.reap();
        }
        let end = self.driver.used_idx();
        (start..end).map(|n| self.driver.used(n)).collect()
    }
}

#[test]
fn a_batch_in_flight_completes_out_of_order() {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::new(&mem, disk(&image, false, FEATURES));
    // 16 reads of 1 to 16 sectors from different places, all in one batch.
    let mut expect = Vec::new();
    for i in 0..16u64 {
        let (sector, len) = (i * 29, 512 * (i as u32 + 1));
        put(&mem, DATA + 0x1_0000 * i, &vec![0; len as usize]);
        let head = rig.publish(i, VIRTIO_BLK_T_IN, sector, DATA + 0x1_0000 * i, len);
        expect.push((u32::from(head), len + 1, sector, len));
    }
    let stats = rig.serve();
    assert_eq!(stats.completed, 0);
    assert_eq!(rig.in_flight(), 16, "the whole batch is in flight");
    let used = rig.drain();
    assert_eq!(used.len(), 16);
    // Every chain came back exactly once with its own length, whatever the order.
    let mut sorted = used.clone();
    sorted.sort();
    let mut want: Vec<_> = expect.iter().map(|e| (e.0, e.1)).collect();
    want.sort();
    assert_eq!(sorted, want);
    assert_ne!(used, want, "completions were processed in submission order");
    for (i, &(_, _, sector, len)) in expect.iter().enumerate() {
        let i = i as u64;
        assert_eq!(status_at(&mem, STATUS + i), OK);
        let from = sector as usize * 512;
        let want: Vec<u8> = (from..from + len as usize).map(pattern).collect();
        assert_eq!(get(&mem, DATA + 0x1_0000 * i, len as usize), want);
    }
}

#[test]
fn flush_completes_after_the_writes_before_it() {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::new(&mem, disk(&image, false, FEATURES));
    let mut writes = Vec::new();
    for i in 0..8u64 {
        put(&mem, DATA + 0x1_0000 * i, &[i as u8 + 0x40; 0x8000]);
        writes.push(u32::from(rig.publish(
            i,
            VIRTIO_BLK_T_OUT,
            i * 64,
            DATA + 0x1_0000 * i,
            0x8000,
        )));
    }
    let flush = u32::from(rig.publish(8, VIRTIO_BLK_T_FLUSH, 0, 0, 0));
    // A read after the flush is not held behind it.
    let read = u32::from(rig.publish(9, VIRTIO_BLK_T_IN, 500, DATA + 0xA_0000, 512));
    rig.serve();
    assert_eq!(rig.in_flight(), 10);
    let used = rig.drain();
    assert_eq!(used.len(), 10);
    let position = |head: u32| used.iter().position(|u| u.0 == head).unwrap();
    for &w in &writes {
        assert!(position(w) < position(flush), "{used:?}");
    }
    assert!(position(read) < position(flush), "{used:?}");
    for i in 0..10 {
        assert_eq!(status_at(&mem, STATUS + i), OK);
    }
    let contents = image.contents();
    for i in 0..8usize {
        assert_eq!(contents[i * 64 * 512..][..0x8000], [i as u8 + 0x40; 0x8000]);
    }
}

#[test]
fn a_read_into_unmapped_memory_fails_alone() {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::new(&mem, disk(&image, false, FEATURES));
    let good0 = rig.publish(0, VIRTIO_BLK_T_IN, 0, DATA, 4096);
    // The buffer runs past the end of guest memory.
    let bad = rig.publish(1, VIRTIO_BLK_T_IN, 8, MEM_SIZE - 2048, 4096);
    let good2 = rig.publish(2, VIRTIO_BLK_T_IN, 16, DATA + 0x1_0000, 4096);
    // The bad request is refused at once; the others complete later.
    assert_eq!(rig.serve().completed, 1);
    rig.drain();
    let mut used: Vec<_> = (0..3).map(|n| rig.driver.used(n)).collect();
    assert_eq!(rig.driver.used_idx(), 3);
    used.sort();
    let mut want = vec![
        (u32::from(good0), 4097),
        (u32::from(bad), 1),
        (u32::from(good2), 4097),
    ];
    want.sort();
    assert_eq!(used, want);
    assert_eq!(
        [0, 1, 2].map(|i| status_at(&mem, STATUS + i)),
        [OK, IOERR, OK]
    );
    let want: Vec<u8> = (16 * 512..16 * 512 + 4096).map(pattern).collect();
    assert_eq!(get(&mem, DATA + 0x1_0000, 4096), want);
}

#[test]
fn writes_are_synced_without_the_flush_feature() {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::new(&mem, disk(&image, false, 0));
    put(&mem, DATA, &[0x5A; 1024]);
    rig.publish(0, VIRTIO_BLK_T_OUT, 3, DATA, 1024);
    rig.serve();
    assert_eq!(rig.drain().len(), 1);
    assert_eq!(status_at(&mem, STATUS), OK);
    assert_eq!(image.contents()[3 * 512..5 * 512], [0x5A; 1024]);
}

#[test]
fn the_uring_engine_needs_io_uring_and_a_file() {
    uring::probe().expect("io_uring is available on the test host");
    let image = TempImage::new(IMAGE);
    let config = BlockConfig {
        io_engine: IoEngine::Uring,
        ..BlockConfig::default()
    };
    assert!(VirtioBlock::new(Box::new(image.open(false)), config.clone()).is_ok());
    /// A backend without a file.
    struct NoFile(crate::virtio::block::FileBackend);
    impl crate::virtio::block::BlockBackend for NoFile {
        fn read_vectored(
            &self,
            offset: u64,
            bufs: &mut [crate::virtio::block::IoBufMut<'_>],
        ) -> std::io::Result<usize> {
            self.0.read_vectored(offset, bufs)
        }
        fn write_vectored(
            &self,
            offset: u64,
            bufs: &[crate::virtio::block::IoBuf<'_>],
        ) -> std::io::Result<usize> {
            self.0.write_vectored(offset, bufs)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.0.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.0.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
            self.0.write_zeroes(offset, len, unmap)
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
    }
    let err = VirtioBlock::new(Box::new(NoFile(image.open(false))), config)
        .err()
        .unwrap();
    assert!(
        matches!(err, BlockError::Uring(UringError::NoFile)),
        "{err}"
    );
    assert_eq!("sync".parse::<IoEngine>().unwrap(), IoEngine::Sync,);
    assert_eq!("uring".parse::<IoEngine>().unwrap(), IoEngine::Uring);
    assert!("aio".parse::<IoEngine>().is_err());
}
