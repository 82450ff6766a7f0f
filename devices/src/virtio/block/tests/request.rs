//! Requests through `process_queue` on hand-built rings: every request type, the
//! descriptor layouts a driver may use, and malformed chains.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{
    disk, get, pattern, put, put_header, status_at, uring_engine, BackendOp, HookedBackend,
    TempImage, FEATURES,
};
use crate::dma::DmaTracker;
use crate::virtio::block::engine::{IoEngine, QueueEngine};
use crate::virtio::block::queue::{process_queue, QueueError, QueueStats};
use crate::virtio::block::request::Disk;
use crate::virtio::block::uring::UringEngine;
use crate::virtio::testing::{memory, ro, wo, Buf, Driver, Mem, Physical, MEM_SIZE};

/// Guest addresses of the test buffers (the ring sits at 0).
pub(super) const HDR: u64 = 0x1_0000;
pub(super) const STATUS: u64 = 0x2_0000;
pub(super) const DATA: u64 = 0x10_0000;
/// Image size of most tests: 64 KiB = 128 sectors.
pub(super) const IMAGE: usize = 64 * 1024;

/// A queue, its driver, a disk and the engine serving it (`None`: synchronous), over
/// guest memory `M` (plain, or behind the test IOMMU) with the device's DMA tracker.
pub(super) struct Rig<'a, M = Mem> {
    pub mem: &'a M,
    pub driver: Driver<'a>,
    pub queue: Queue,
    pub disk: Disk,
    pub uring: Option<UringEngine>,
    pub dma: DmaTracker,
}

impl<'a> Rig<'a> {
    pub fn new(mem: &'a Mem, disk: Disk) -> Self {
        Self::with_engine(IoEngine::Sync, mem, disk)
    }

    pub fn with_engine(engine: IoEngine, mem: &'a Mem, disk: Disk) -> Self {
        Rig::with_dma(engine, mem, disk, DmaTracker::untracked())
    }
}

impl<'a, M: GuestMemory + Physical> Rig<'a, M> {
    /// A 16-entry queue at 0, served under `dma`.
    pub fn with_dma(engine: IoEngine, mem: &'a M, disk: Disk, dma: DmaTracker) -> Self {
        let driver = Driver::new(mem.physical(), 0, 16);
        let queue = driver.queue();
        let uring = (engine == IoEngine::Uring).then(|| uring_engine(&disk, 16, dma.clone()));
        Self {
            mem,
            driver,
            queue,
            disk,
            uring,
            dma,
        }
    }

    /// Guest-physical memory, as the driver writes it.
    pub fn phys(&self) -> &'a Mem {
        self.mem.physical()
    }

    /// Publishes `bufs` as one chain and serves the queue; returns the used length
    /// (the status byte at [`STATUS`] is preset to 0xFF).
    pub fn submit(&mut self, bufs: &[Buf]) -> u32 {
        put(self.mem, STATUS, &[0xFF]);
        let head = self.driver.add(bufs);
        self.serve_one(head)
    }

    /// Serves the queue, expecting exactly chain `head` back; returns its used length.
    /// No DMA guard is left behind.
    pub fn serve_one(&mut self, head: u16) -> u32 {
        let before = self.driver.used_idx();
        let stats = self.serve();
        assert_eq!(stats.completed, 1);
        assert_eq!(self.driver.used_idx(), before.wrapping_add(1));
        let (id, len) = self.driver.used(before);
        assert_eq!(id, u32::from(head));
        assert_eq!(self.dma.inflight(), 0);
        len
    }

    /// Serves the queue until nothing is in flight.
    pub fn serve(&mut self) -> QueueStats {
        self.try_serve().unwrap()
    }

    /// [`Self::serve`], with its ring error.
    pub fn try_serve(&mut self) -> Result<QueueStats, QueueError> {
        let (q, mem, disk) = (&mut self.queue, self.mem, &self.disk);
        let Some(engine) = &mut self.uring else {
            return process_queue(q, mem, disk, &self.dma, 64);
        };
        let mut stats = engine.serve(q, mem, disk, 64)?;
        while QueueEngine::<M>::in_flight(engine) > 0 {
            let more = engine.reap(q, mem, disk, true)?;
            stats.completed += more.completed;
            stats.failed += more.failed;
            stats.notify |= more.notify;
        }
        Ok(stats)
    }

    pub fn status(&self) -> u8 {
        status_at(self.phys(), STATUS)
    }
}

/// Runs each `body(engine)` as a test `name` on the synchronous engine and as
/// `uring::name` on the io_uring one.
macro_rules! both_engines {
    ($($body:ident => $name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $body(IoEngine::Sync)
            }
        )*
        mod uring {
            use super::*;
            $(
                #[test]
                fn $name() {
                    $body(IoEngine::Uring)
                }
            )*
        }
    };
}
pub(super) use both_engines;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn filled(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

fn out_then_in_with_several_data_descriptors_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    let data = filled(2048, 0x5A);
    // Scattered guest buffers: 512 + 1024 + 512 bytes.
    let addrs = [DATA + 0x3000, DATA, DATA + 0x8000];
    put(&mem, addrs[0], &data[..512]);
    put(&mem, addrs[1], &data[512..1536]);
    put(&mem, addrs[2], &data[1536..]);
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
    let len = rig.submit(&[
        ro(HDR, 16),
        ro(addrs[0], 512),
        ro(addrs[1], 1024),
        ro(addrs[2], 512),
        wo(STATUS, 1),
    ]);
    assert_eq!((len, rig.status()), (1, OK));
    let mut expected: Vec<u8> = (0..IMAGE).map(pattern).collect();
    expected[3 * 512..3 * 512 + 2048].copy_from_slice(&data);
    assert_eq!(image.contents(), expected);

    // Read it back in two other pieces.
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    let len = rig.submit(&[
        ro(HDR, 16),
        wo(DATA + 0x20000, 1536),
        wo(DATA + 0x30000, 512),
        wo(STATUS, 1),
    ]);
    assert_eq!((len, rig.status()), (2049, OK));
    assert_eq!(get(&mem, DATA + 0x20000, 1536), data[..1536]);
    assert_eq!(get(&mem, DATA + 0x30000, 512), data[1536..]);
}

fn in_reads_the_image_up_to_the_last_sector_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 127);
    let len = rig.submit(&[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
    assert_eq!((len, rig.status()), (513, OK));
    let expected: Vec<u8> = (127 * 512..IMAGE).map(pattern).collect();
    assert_eq!(get(&mem, DATA, 512), expected);
}

fn any_descriptor_layout_is_accepted_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    // OUT: header and data in one descriptor.
    let data = filled(512, 1);
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
    put(&mem, HDR + 16, &data);
    let len = rig.submit(&[ro(HDR, 16 + 512), wo(STATUS, 1)]);
    assert_eq!((len, rig.status()), (1, OK));
    assert_eq!(image.contents()[512..1024], data[..]);
    // IN: data and status in one descriptor; the status is its last byte.
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    put(&mem, DATA + 512, &[0xFF]);
    let head = rig.driver.add(&[ro(HDR, 8), ro(HDR + 8, 8), wo(DATA, 513)]);
    assert_eq!(rig.serve_one(head), 513);
    assert_eq!(get(&mem, DATA, 512), data);
    assert_eq!(status_at(&mem, DATA + 512), OK);
}

fn indirect_descriptors_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let table = 0x8000u64;
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let descs = [
        Descriptor::new(HDR, 16, next, 1),
        Descriptor::new(DATA, 1024, next | write, 2),
        Descriptor::new(STATUS, 1, write, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    rig.driver
        .set_desc(0, table, 48, VRING_DESC_F_INDIRECT as u16, 0);
    rig.driver.publish(0);
    assert_eq!(rig.serve_one(0), 1025);
    assert_eq!(rig.status(), OK);
    let expected: Vec<u8> = (0..1024).map(pattern).collect();
    assert_eq!(get(&mem, DATA, 1024), expected);
}

fn counting_disk(image: &TempImage, features: u64) -> (Disk, Arc<AtomicUsize>) {
    let flushes = Arc::new(AtomicUsize::new(0));
    let mut disk = disk(image, false, features);
    let count = flushes.clone();
    disk.backend = Arc::new(HookedBackend::new(image, move |op| {
        if op == BackendOp::Flush {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }));
    (disk, flushes)
}

#[test]
fn flush_syncs_and_writes_are_write_through_without_flush_feature() {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let (disk, flushes) = counting_disk(&image, FEATURES);
    let mut rig = Rig::new(&mem, disk);
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(rig.submit(&[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]), 1);
    assert_eq!(flushes.load(Ordering::SeqCst), 0, "writeback with FLUSH");
    put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.submit(&[ro(HDR, 16), wo(STATUS, 1)]), 1);
    assert_eq!(rig.status(), OK);
    assert_eq!(flushes.load(Ordering::SeqCst), 1);
    // FLUSH with a data buffer is malformed.
    assert_eq!(rig.submit(&[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]), 1);
    assert_eq!(rig.status(), IOERR);
    assert_eq!(flushes.load(Ordering::SeqCst), 1);

    // The driver did not negotiate FLUSH: every write is synced before completing.
    let (disk, flushes) = counting_disk(&image, 0);
    let mut rig = Rig::new(&mem, disk);
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(rig.submit(&[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]), 1);
    assert_eq!(rig.status(), OK);
    assert_eq!(flushes.load(Ordering::SeqCst), 1);
}

fn get_id_writes_the_serial_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    put(&mem, DATA, &[0xFF; 32]);
    put_header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(rig.submit(&[ro(HDR, 16), wo(DATA, 20), wo(STATUS, 1)]), 21);
    assert_eq!(rig.status(), OK);
    let mut expected = [0u8; 20];
    expected[..9].copy_from_slice(b"ferrio-42");
    assert_eq!(get(&mem, DATA, 21), [&expected[..], &[0xFF]].concat());
    // A short buffer gets what fits, nothing beyond it.
    put(&mem, DATA, &[0xFF; 32]);
    assert_eq!(rig.submit(&[ro(HDR, 16), wo(DATA, 4), wo(STATUS, 1)]), 5);
    assert_eq!(get(&mem, DATA, 5), b"ferr\xFF");
    // Without a buffer it fails.
    assert_eq!(rig.submit(&[ro(HDR, 16), wo(STATUS, 1)]), 1);
    assert_eq!(rig.status(), IOERR);
}

fn unknown_request_types_are_unsupported_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    for kind in [
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_SECURE_ERASE,
        99,
        1 << 31,
    ] {
        put_header(&mem, HDR, kind, 0);
        assert_eq!(rig.submit(&[ro(HDR, 16), wo(STATUS, 1)]), 1);
        assert_eq!(rig.status(), UNSUPP, "type {kind}");
    }
}

/// Submits `bufs` (header `kind` at `sector`) and checks that it fails with IOERR and
/// used length 1, leaving the data buffer (preset to 0xEE) and the image untouched.
fn assert_ioerr(kind: u32, sector: u64, bufs: &[Buf]) {
    for engine in [IoEngine::Sync, IoEngine::Uring] {
        assert_ioerr_on(engine, kind, sector, bufs);
    }
}

fn assert_ioerr_on(engine: IoEngine, kind: u32, sector: u64, bufs: &[Buf]) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    put_header(&mem, HDR, kind, sector);
    put(&mem, DATA, &[0xEE; 4096]);
    assert_eq!(rig.submit(bufs), 1, "used length of {bufs:?}");
    assert_eq!(rig.status(), IOERR, "status of {bufs:?}");
    assert_eq!(get(&mem, DATA, 4096), [0xEE; 4096]);
    let expected: Vec<u8> = (0..IMAGE).map(pattern).collect();
    assert!(image.contents() == expected, "image changed by {bufs:?}");
}

#[test]
fn malformed_headers_fail() {
    // Header too short.
    assert_ioerr(
        VIRTIO_BLK_T_IN,
        0,
        &[ro(HDR, 12), wo(DATA, 512), wo(STATUS, 1)],
    );
    // Header in a device-writable buffer.
    assert_ioerr(
        VIRTIO_BLK_T_IN,
        0,
        &[wo(HDR, 16), wo(DATA, 512), wo(STATUS, 1)],
    );
    // No header at all.
    assert_ioerr(VIRTIO_BLK_T_IN, 0, &[wo(STATUS, 1)]);
    // A device-readable buffer after a device-writable one.
    assert_ioerr(
        VIRTIO_BLK_T_OUT,
        0,
        &[ro(HDR, 16), wo(DATA + 512, 8), ro(DATA, 512), wo(STATUS, 1)],
    );
}

#[test]
fn wrong_data_direction_fails() {
    assert_ioerr(
        VIRTIO_BLK_T_IN,
        0,
        &[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)],
    );
    assert_ioerr(
        VIRTIO_BLK_T_OUT,
        0,
        &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)],
    );
}

#[test]
fn bad_data_lengths_fail() {
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let dir = if kind == VIRTIO_BLK_T_IN { wo } else { ro };
        // No data.
        assert_ioerr(kind, 0, &[ro(HDR, 16), wo(STATUS, 1)]);
        // Not a multiple of 512.
        assert_ioerr(kind, 0, &[ro(HDR, 16), dir(DATA, 100), wo(STATUS, 1)]);
        assert_ioerr(kind, 0, &[ro(HDR, 16), dir(DATA, 1000), wo(STATUS, 1)]);
        // More segments than seg_max (8).
        let mut bufs = vec![ro(HDR, 16)];
        bufs.extend((0..9).map(|i| dir(DATA + 512 * i, 512)));
        bufs.push(wo(STATUS, 1));
        assert_ioerr(kind, 0, &bufs);
        // A segment above size_max (64 KiB).
        assert_ioerr(kind, 0, &[ro(HDR, 16), dir(DATA, 65 * 1024), wo(STATUS, 1)]);
        // A buffer outside guest memory.
        let outside = dir(MEM_SIZE - 256, 512);
        assert_ioerr(kind, 0, &[ro(HDR, 16), outside, wo(STATUS, 1)]);
    }
}

#[test]
fn out_of_range_sectors_fail() {
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let dir = if kind == VIRTIO_BLK_T_IN { wo } else { ro };
        let bufs = |len| [ro(HDR, 16), dir(DATA, len), wo(STATUS, 1)];
        assert_ioerr(kind, 128, &bufs(512));
        assert_ioerr(kind, 127, &bufs(1024));
        assert_ioerr(kind, u64::MAX, &bufs(512));
        assert_ioerr(kind, u64::MAX >> 9, &bufs(512));
        assert_ioerr(kind, 1 << 55, &bufs(512));
    }
}

/// Submits `bufs` and checks the chain comes back with used length 0 and that neither
/// the data buffer nor the status byte was written.
fn assert_unanswered(rig: &mut Rig, bufs: &[Buf]) {
    put(rig.mem, DATA, &[0xEE; 1024]);
    assert_eq!(rig.submit(bufs), 0, "used length of {bufs:?}");
    assert_eq!(rig.status(), 0xFF, "status written for {bufs:?}");
    assert_eq!(get(rig.mem, DATA, 1024), [0xEE; 1024]);
}

fn chains_without_a_writable_status_byte_are_returned_empty_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // Status read-only.
    assert_unanswered(&mut rig, &[ro(HDR, 16), wo(DATA, 512), ro(STATUS, 1)]);
    // Status missing.
    assert_unanswered(&mut rig, &[ro(HDR, 16)]);
    // Status descriptor empty.
    assert_unanswered(&mut rig, &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 0)]);
    // Status outside guest memory.
    assert_unanswered(&mut rig, &[ro(HDR, 16), wo(DATA, 512), wo(MEM_SIZE, 1)]);
    let expected: Vec<u8> = (0..IMAGE).map(pattern).collect();
    assert!(image.contents() == expected);
}

fn broken_chains_are_returned_empty_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    put(&mem, DATA, &[0xEE; 1024]);
    put(&mem, STATUS, &[0xFF]);
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    // A loop: 0 -> 1 -> 2 -> 1.
    rig.driver.set_desc(0, HDR, 16, next, 1);
    rig.driver.set_desc(1, DATA, 512, next | write, 2);
    rig.driver.set_desc(2, STATUS, 1, next | write, 1);
    rig.driver.publish(0);
    assert_eq!(rig.serve_one(0), 0);
    // A next index out of range.
    rig.driver.set_desc(3, HDR, 16, next, 4);
    rig.driver.set_desc(4, STATUS, 1, next | write, 200);
    rig.driver.publish(3);
    assert_eq!(rig.serve_one(3), 0);
    assert_eq!(rig.status(), 0xFF);
    assert_eq!(get(&mem, DATA, 1024), [0xEE; 1024]);
    // A head index out of range cannot be returned: it is skipped, and the ring goes
    // on with the next chain.
    rig.driver.publish(100);
    rig.driver.set_desc(5, HDR, 16, next, 6);
    rig.driver.set_desc(6, DATA, 512, next | write, 7);
    rig.driver.set_desc(7, STATUS, 1, write, 0);
    rig.driver.publish(5);
    let before = rig.driver.used_idx();
    let stats = rig.serve();
    assert_eq!((stats.completed, stats.failed), (1, 1));
    assert_eq!(rig.driver.used_idx(), before.wrapping_add(1));
    assert_eq!(rig.driver.used(before), (5, 513));
    assert_eq!(rig.status(), OK);
}

both_engines! {
    out_then_in_with_several_data_descriptors_on => out_then_in_with_several_data_descriptors,
    in_reads_the_image_up_to_the_last_sector_on => in_reads_the_image_up_to_the_last_sector,
    any_descriptor_layout_is_accepted_on => any_descriptor_layout_is_accepted,
    indirect_descriptors_on => indirect_descriptors,
    get_id_writes_the_serial_on => get_id_writes_the_serial,
    unknown_request_types_are_unsupported_on => unknown_request_types_are_unsupported,
    chains_without_a_writable_status_byte_are_returned_empty_on => chains_without_a_writable_status_byte_are_returned_empty,
    broken_chains_are_returned_empty_on => broken_chains_are_returned_empty,
}
