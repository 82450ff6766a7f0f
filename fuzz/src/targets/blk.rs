//! `virtio_blk`: virtio-blk request parsing and execution (`block::request`) against a
//! real image file (`FileBackend` on a 64 KiB file in /dev/shm or the temporary
//! directory, shared by all runs of the process), with either engine: synchronous
//! (`block::queue::process_queue`: preadv/pwritev straight into guest memory, FLUSH,
//! GET_ID, DISCARD and WRITE_ZEROES with fallocate) or io_uring (`block::uring`:
//! requests in flight across kicks, held flushes, completions reaped later).
//!
//! Input: guest, queue (up to 256 entries), disk (`u8 flags`: bit 0 read-only, bits 1-3
//! FLUSH / DISCARD / WRITE_ZEROES negotiated, bit 4 io_uring; `u8 seg_max, u8
//! size_max_log2, u32 max_discard_sectors, u8 max_discard_seg, u32
//! max_write_zeroes_sectors, u8 max_write_zeroes_seg`), then ops: 0 serve (`u8`
//! budget), 1 publish, 2 poke, 3 UNMAP (after the requests in flight completed, as the
//! IOMMU's fence makes it), 4 reap completions (`u8`: odd waits for one).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use ferrio_devices::dma::DmaTracker;
use ferrio_devices::virtio::block::queue::{process_queue, QueueStats};
use ferrio_devices::virtio::block::uring::TestUringQueue;
use ferrio_devices::virtio::block::{BlockBackend, Disk, FileBackend, Limits, ID_BYTES};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::QueueT;

use crate::guest::{self, iommu_guest, plain_guest, Guest, Image, QueueSpec, Ring};
use crate::input::{Input, Seed};
use crate::with_view;

const MAX_OPS: usize = 32;
const QUEUE_MAX: u16 = 256;
/// Size of the image: 128 sectors.
pub const IMAGE_SIZE: u64 = 64 * 1024;

/// The image, opened read-write and read-only (the file itself is already unlinked).
fn backends() -> &'static (Arc<dyn BlockBackend>, Arc<dyn BlockBackend>) {
    static BACKENDS: OnceLock<(Arc<dyn BlockBackend>, Arc<dyn BlockBackend>)> = OnceLock::new();
    BACKENDS.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("ferrio-fuzz-blk-{}.img", std::process::id()));
        let data: Vec<u8> = (0..IMAGE_SIZE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, data).expect("image");
        let rw = FileBackend::open(&path, false).expect("image read-write");
        let ro = FileBackend::open(&path, true).expect("image read-only");
        let _ = std::fs::remove_file(&path);
        (Arc::new(rw), Arc::new(ro))
    })
}

/// The disk from the input, and whether the io_uring engine serves it.
fn disk(inp: &mut Input<'_>) -> (Disk, bool) {
    let flags = inp.u8();
    let read_only = flags & 1 != 0;
    let (rw, ro) = backends();
    let mut features = 0u64;
    for (bit, feature) in [
        (2, VIRTIO_BLK_F_FLUSH),
        (4, VIRTIO_BLK_F_DISCARD),
        (8, VIRTIO_BLK_F_WRITE_ZEROES),
    ] {
        if flags & bit != 0 {
            features |= 1 << feature;
        }
    }
    let mut id = [0u8; ID_BYTES];
    id[..11].copy_from_slice(b"ferrio-fuzz");
    let limits = Limits {
        seg_max: u32::from(inp.u8()) + 1,
        size_max: 4096 << (inp.u8() % 9),
        max_discard_sectors: inp.u32().max(1),
        max_discard_seg: u32::from(inp.u8() % 32) + 1,
        max_write_zeroes_sectors: inp.u32().max(1),
        max_write_zeroes_seg: u32::from(inp.u8() % 32) + 1,
    };
    let disk = Disk {
        backend: if read_only { ro.clone() } else { rw.clone() },
        capacity: IMAGE_SIZE / 512,
        read_only,
        id,
        limits,
        features,
    };
    (disk, flags & 0x10 != 0)
}

/// The queue's engine.
enum Engine {
    Sync,
    Uring(Box<TestUringQueue>),
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut guest = Guest::read(&mut inp);
    let spec = QueueSpec::read(&mut inp, 8);
    let (disk, uring) = disk(&mut inp);
    let dma = guest.dma();
    let Some(mut queue) = with_view!(guest, |m| spec.queue(m, QUEUE_MAX)) else {
        crate::note!("blk: queue refused {spec:?}");
        return;
    };
    // Declared after the guest: dropped first, once nothing is in flight.
    let mut engine = if uring {
        match TestUringQueue::new(&disk, spec.size, dma.clone()) {
            Ok(e) => Engine::Uring(Box::new(e)),
            Err(e) => panic!("io_uring: {e}"),
        }
    } else {
        Engine::Sync
    };
    let mut rig = Rig {
        queue: &mut queue,
        disk: &disk,
        dma: &dma,
        broken: false,
    };
    let mut served = false;
    for _ in 0..MAX_OPS {
        if inp.is_empty() || rig.broken {
            break;
        }
        match inp.u8() % 5 {
            0 => {
                served = true;
                let budget = usize::from(inp.u8() % 64) + 1;
                rig.serve(&guest, &mut engine, budget);
            }
            1 => spec.publish(&guest.phys, u16::from(inp.u8() % 8)),
            2 => guest::poke(&guest.phys, &mut inp),
            3 => {
                rig.drain(&guest, &mut engine);
                guest.unmap(&mut inp);
            }
            _ => {
                let wait = inp.u8() & 1 != 0;
                rig.reap(&guest, &mut engine, wait);
            }
        }
    }
    if !served && !rig.broken {
        rig.serve(&guest, &mut engine, 64);
    }
    rig.drain(&guest, &mut engine);
    assert_eq!(dma.inflight(), 0, "no DMA guard left behind");
}

/// The device side of one queue.
struct Rig<'a> {
    queue: &'a mut virtio_queue::Queue,
    disk: &'a Disk,
    dma: &'a DmaTracker,
    /// A ring error: the device needs a reset, nothing more is served.
    broken: bool,
}

impl Rig<'_> {
    /// One kick.
    fn serve(&mut self, guest: &Guest, engine: &mut Engine, budget: usize) {
        let before = self.queue.next_used();
        let (queue, disk, dma) = (&mut *self.queue, self.disk, self.dma);
        let result = match engine {
            Engine::Sync => with_view!(guest, |m| process_queue(queue, m, disk, dma, budget)),
            Engine::Uring(e) => with_view!(guest, |m| e.serve(queue, m, disk, budget)),
        };
        self.check(result, before, budget);
    }

    /// Completions of the io_uring engine.
    fn reap(&mut self, guest: &Guest, engine: &mut Engine, wait: bool) {
        let Engine::Uring(e) = engine else {
            return;
        };
        let before = self.queue.next_used();
        let result = with_view!(guest, |m| e.reap(self.queue, m, self.disk, wait));
        self.check(result, before, usize::MAX);
    }

    /// Waits for every request in flight (before an UNMAP and at the end: the guest
    /// memory goes away).
    fn drain(&mut self, guest: &Guest, engine: &mut Engine) {
        while let Engine::Uring(e) = engine {
            if e.in_flight() == 0 {
                break;
            }
            let pending = e.in_flight();
            if self.broken {
                // As the worker on its way out after an error: the kernel may still
                // use guest buffers, wait for them all.
                let _ = with_view!(guest, |m| e.reap(self.queue, m, self.disk, true));
            } else {
                self.reap(guest, engine, true);
            }
            let Engine::Uring(e) = engine else {
                unreachable!()
            };
            assert!(e.in_flight() < pending, "requests lost in the I/O engine");
        }
    }

    fn check(
        &mut self,
        result: Result<QueueStats, ferrio_devices::virtio::block::queue::QueueError>,
        before: u16,
        budget: usize,
    ) {
        match result {
            Ok(stats) => {
                crate::note!("blk: {stats:?}");
                assert!(stats.completed <= budget);
                assert!(stats.failed <= budget);
                assert_eq!(
                    self.queue.next_used(),
                    before.wrapping_add(stats.completed as u16),
                    "one used element per completed chain"
                );
            }
            Err(e) => {
                crate::note!("blk: ring error {e}");
                self.broken = true;
            }
        }
    }
}

/// A request header.
fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A discard / write-zeroes segment.
fn segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = header(0, sector);
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    s
}

/// The disk part of a seed: every feature, read-write or read-only, either engine,
/// generous limits.
fn seed_disk(seed: Seed, read_only: bool, uring: bool) -> Seed {
    seed.u8(0b1110 | u8::from(read_only) | u8::from(uring) << 4)
        .u8(253)
        .u8(8)
        .u32(1 << 20)
        .u8(31)
        .u32(1 << 20)
        .u8(31)
}

/// Seeds: every request type (plain, split, indirect), behind the IOMMU, read-only.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // (name, requests as buffer lists): the ring at 0 (32 entries), indirect tables at
    // 0x380 + 0x40 * i, headers at 0x600 + 0x40 * i, statuses at 0x7e0 + i, data at
    // 0x800.
    type Req = (u32, u64, Vec<u8>, Vec<(u32, bool)>);
    let all: Vec<(&str, Vec<Req>)> = vec![
        (
            "in",
            vec![(VIRTIO_BLK_T_IN, 2, vec![], vec![(512, true), (512, true)])],
        ),
        (
            "out",
            vec![(VIRTIO_BLK_T_OUT, 4, vec![], vec![(1024, false)])],
        ),
        ("flush", vec![(VIRTIO_BLK_T_FLUSH, 0, vec![], vec![])]),
        (
            "get_id",
            vec![(VIRTIO_BLK_T_GET_ID, 0, vec![], vec![(20, true)])],
        ),
        (
            "discard",
            vec![(VIRTIO_BLK_T_DISCARD, 0, segment(8, 8, 0), vec![])],
        ),
        (
            "write_zeroes",
            vec![(
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                [segment(16, 8, 1), segment(32, 1, 0)].concat(),
                vec![],
            )],
        ),
        ("unsupported", vec![(99, 0, vec![], vec![(16, true)])]),
    ];
    let build = |reqs: &[Req], indirect: bool| {
        let mut img = Image::new();
        let mut ring = Ring::new(&mut img, 0, 32);
        img.put(0x800, &[0x5a; 1024]);
        for (i, (kind, sector, extra, data)) in reqs.iter().enumerate() {
            let hdr = 0x600 + 0x40 * i as u64;
            img.put(hdr, &[header(*kind, *sector), extra.clone()].concat());
            let mut bufs = vec![(hdr, 16 + extra.len() as u32, false)];
            let mut at = 0x800;
            for &(len, write) in data {
                bufs.push((at, len, write));
                at += u64::from(len);
            }
            bufs.push((0x7e0 + i as u64, 1, true));
            if indirect {
                ring.add_indirect(&mut img, 0x380 + 0x40 * i as u64, &bufs);
            } else {
                ring.add(&mut img, &bufs);
            }
        }
        (img, ring)
    };
    for (name, reqs) in &all {
        let (img, ring) = build(reqs, false);
        let seed = ring
            .spec
            .write(plain_guest(Seed::new(), &img), ring.size_log2(), 0);
        out.push((*name, seed_disk(seed, false, false).u8(0).u8(63).build()));
    }
    let mixed: Vec<Req> = all.iter().flat_map(|(_, r)| r.clone()).collect();
    let (img, ring) = build(&mixed, true);
    let seed = ring
        .spec
        .write(plain_guest(Seed::new(), &img), ring.size_log2(), 1);
    out.push((
        "mixed_indirect_event_idx",
        seed_disk(seed, false, false).build(),
    ));
    let (img, ring) = build(&mixed, false);
    let seed = ring
        .spec
        .write(iommu_guest(Seed::new(), &img), ring.size_log2(), 0);
    out.push(("mixed_iommu", seed_disk(seed, false, false).build()));
    let seed = ring
        .spec
        .write(plain_guest(Seed::new(), &img), ring.size_log2(), 0);
    out.push(("mixed_read_only", seed_disk(seed, true, false).build()));
    // io_uring: submit everything, reap without waiting, then waiting.
    let (img, ring) = build(&mixed, true);
    let seed = ring
        .spec
        .write(plain_guest(Seed::new(), &img), ring.size_log2(), 1);
    let seed = seed_disk(seed, false, true)
        .u8(0)
        .u8(63)
        .u8(4)
        .u8(0)
        .u8(4)
        .u8(1);
    out.push(("uring_mixed_indirect", seed.build()));
    // io_uring behind the IOMMU: a read in flight, then an UNMAP (after it completed).
    let (img, ring) = build(&all[0].1, false);
    let seed = ring
        .spec
        .write(iommu_guest(Seed::new(), &img), ring.size_log2(), 0);
    let seed = seed_disk(seed, false, true)
        .u8(0)
        .u8(63)
        .u8(3)
        .u32(0)
        .u16(0);
    out.push(("uring_in_iommu", seed.build()));
    out
}
