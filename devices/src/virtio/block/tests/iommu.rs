//! virtio-blk behind a test IOMMU, on both engines: a data buffer the mapping does not
//! allow fails its request alone (IOERR, nothing written where the mapping forbids
//! it), a status byte that cannot be written leaves the chain unanswered, and only a
//! ring that cannot be accessed is a device error. Every translation happens under a
//! DMA guard.

use virtio_bindings::bindings::virtio_blk::*;
use vm_memory::Permissions;

use super::request::{both_engines, Rig};
use super::{disk, get, pattern, put, put_header, status_at, TempImage, FEATURES};
use crate::dma::DmaTracker;
use crate::virtio::block::engine::IoEngine;
use crate::virtio::block::queue::QueueError;
use crate::virtio::block::request::Disk;
use crate::virtio::ring::RingError;
use crate::virtio::testing::{iommu_memory, ro, wo, IoMem};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const IMAGE: usize = 64 * 1024;
/// The rings of the 16-entry queue at 0: descriptors, then avail, then used.
const DESC: (u64, u64) = (0, 0x100);
const AVAIL: (u64, u64) = (0x100, 0x28);
const USED: (u64, u64) = (0x128, 0x88);
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
const PAGE: u64 = 0x1000;
/// What the guest's data buffers hold before a request.
const UNTOUCHED: u8 = 0xEE;

/// One queue served by an engine, with guest memory behind the test IOMMU: the header
/// and status pages mapped, the rings too unless `rings` is false; every translation
/// watched by the rig's DMA tracker.
fn io_rig(engine: IoEngine, mem: &IoMem, disk: Disk, rings: bool) -> Rig<'_, IoMem> {
    let iommu = mem.iommu();
    if rings {
        iommu.map(0, PAGE, Permissions::ReadWrite);
    }
    iommu.map(HDR, PAGE, Permissions::Read);
    iommu.map(STATUS, PAGE, Permissions::Write);
    let dma = DmaTracker::new();
    iommu.watch(&dma);
    Rig::with_dma(engine, mem, disk, dma)
}

impl Rig<'_, IoMem> {
    /// A request `kind` at sector 2 with `len` data bytes at `data`.
    fn request(&mut self, kind: u32, data: u64, len: u32) -> u32 {
        put_header(self.phys(), HDR, kind, 2);
        let data = if kind == VIRTIO_BLK_T_OUT {
            ro(data, len)
        } else {
            wo(data, len)
        };
        self.submit(&[ro(HDR, 16), data, wo(STATUS, 1)])
    }

    /// Fills `len` bytes of guest memory at `addr` with [`UNTOUCHED`].
    fn preset(&self, addr: u64, len: usize) {
        put(self.phys(), addr, &vec![UNTOUCHED; len]);
    }

    fn untouched(&self, addr: u64, len: usize) -> bool {
        get(self.phys(), addr, len).iter().all(|&b| b == UNTOUCHED)
    }
}

fn inaccessible_data_fails_the_request_only_on(engine: IoEngine) {
    let mem = iommu_memory();
    let image = TempImage::new(IMAGE);
    let mut rig = io_rig(engine, &mem, disk(&image, false, FEATURES), true);
    let iommu = mem.iommu();

    // A read into two pages of which only the first is mapped: refused as a whole,
    // before any byte moves (not even into the mapped page).
    iommu.map(DATA, PAGE, Permissions::Write);
    rig.preset(DATA, 2 * PAGE as usize);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, DATA, 2 * PAGE as u32), 1);
    assert_eq!(rig.status(), IOERR);
    assert!(rig.untouched(DATA, 2 * PAGE as usize));
    assert!(iommu.faults() > 0);

    // A read into a page the device may only read.
    let read_only = DATA + 0x1_0000;
    iommu.map(read_only, PAGE, Permissions::Read);
    rig.preset(read_only, 512);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, read_only, 512), 1);
    assert_eq!(rig.status(), IOERR);
    assert!(rig.untouched(read_only, 512));

    // A write from an unmapped page: the image is not changed.
    let unmapped = DATA + 0x2_0000;
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, unmapped, 512), 1);
    assert_eq!(rig.status(), IOERR);
    assert_eq!(
        image.contents()[1024..1536],
        (1024..1536).map(pattern).collect::<Vec<_>>()
    );

    // The mapping goes away between the check and the transfer (an UNMAP racing
    // with the request): the transfer fails, nothing is written.
    let racing = DATA + 0x3_0000;
    iommu.map(racing, PAGE, Permissions::Write);
    iommu.revoke_after(racing, PAGE, 1);
    rig.preset(racing, 1024);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, racing, 1024), 1);
    assert_eq!(rig.status(), IOERR);
    assert!(rig.untouched(racing, 1024));

    // The device goes on: a read into mapped memory works.
    let good = DATA + 0x4_0000;
    iommu.map(good, PAGE, Permissions::Write);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, good, 1024), 1025);
    assert_eq!(rig.status(), OK);
    let expected: Vec<u8> = (1024..2048).map(pattern).collect();
    assert_eq!(get(rig.phys(), good, 1024), expected);
    assert_eq!(
        iommu.unguarded(),
        0,
        "guest memory translated without a DMA guard"
    );
}

fn unwritable_status_leaves_the_chain_unanswered_on(engine: IoEngine) {
    let mem = iommu_memory();
    let image = TempImage::new(IMAGE);
    let mut rig = io_rig(engine, &mem, disk(&image, false, FEATURES), true);
    let iommu = mem.iommu();
    iommu.map(DATA, PAGE, Permissions::Write);
    let status = STATUS + 0x1_0000;
    iommu.map(status, PAGE, Permissions::Read);
    put(rig.phys(), status, &[0xFF]);
    rig.preset(DATA, 512);
    put_header(rig.phys(), HDR, VIRTIO_BLK_T_IN, 0);
    let len = rig.submit(&[ro(HDR, 16), wo(DATA, 512), wo(status, 1)]);
    assert_eq!(len, 0);
    assert_eq!(status_at(rig.phys(), status), 0xFF);
    assert!(rig.untouched(DATA, 512));
    assert_eq!(iommu.unguarded(), 0);
}

fn unmapped_rings_are_device_errors_on(engine: IoEngine) {
    for (name, (start, len)) in [("descriptors", DESC), ("avail", AVAIL), ("used", USED)] {
        let mem = iommu_memory();
        let image = TempImage::new(IMAGE);
        let mut rig = io_rig(engine, &mem, disk(&image, false, FEATURES), false);
        // Everything around the rings but this one.
        let iommu = mem.iommu();
        iommu.map(0, PAGE, Permissions::ReadWrite);
        iommu.unmap(start, len);
        iommu.map(DATA, PAGE, Permissions::Write);
        put_header(rig.phys(), HDR, VIRTIO_BLK_T_IN, 0);
        rig.driver.add(&[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
        let err = rig.try_serve().unwrap_err();
        let ring = match err {
            QueueError::Ring(ring) => ring,
            other => panic!("{name}: not a ring error: {other}"),
        };
        match name {
            "descriptors" => assert!(matches!(ring, RingError::DescTable(0)), "{ring}"),
            "avail" => assert!(matches!(ring, RingError::AvailRing(_)), "{ring}"),
            _ => assert!(
                matches!(ring, RingError::Notification(_) | RingError::UsedRing(_)),
                "{ring}"
            ),
        }
        assert_eq!(rig.dma.inflight(), 0);
        assert_eq!(iommu.unguarded(), 0);
    }
}

both_engines! {
    inaccessible_data_fails_the_request_only_on => inaccessible_data_fails_the_request_only,
    unwritable_status_leaves_the_chain_unanswered_on => unwritable_status_leaves_the_chain_unanswered,
    unmapped_rings_are_device_errors_on => unmapped_rings_are_device_errors,
}
