//! DISCARD and WRITE_ZEROES on a real image file, their validation, and a read-only
//! disk.

use std::os::fd::AsRawFd;

use virtio_bindings::bindings::virtio_blk::*;

use super::request::{both_engines, Rig, DATA, HDR, IMAGE, STATUS};
use super::{disk, get, pattern, put, put_header, put_segments, TempImage, FEATURES};
use crate::virtio::block::engine::IoEngine;
use crate::virtio::testing::{memory, ro, wo};

/// 1 MiB: 2048 sectors, big enough for the allocation to show.
const BIG: usize = 1 << 20;
const UNMAP: u32 = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// A segment: (sector, num_sectors, flags).
type Seg = (u64, u32, u32);

/// Submits a discard / write-zeroes request with `segs`; returns (used len, status).
fn submit(rig: &mut Rig, kind: u32, segs: &[Seg]) -> (u32, u8) {
    put_header(rig.mem, HDR, kind, 0);
    let len = put_segments(rig.mem, DATA, segs);
    let used = rig.submit(&[ro(HDR, 16), ro(DATA, len), wo(STATUS, 1)]);
    (used, rig.status())
}

/// The original image with `ranges` (in sectors) zeroed.
fn expected(size: usize, ranges: &[(usize, usize)]) -> Vec<u8> {
    let mut out: Vec<u8> = (0..size).map(pattern).collect();
    for &(sector, count) in ranges {
        out[sector * 512..(sector + count) * 512].fill(0);
    }
    out
}

fn seek(image: &TempImage, offset: i64, whence: i32) -> i64 {
    let file = std::fs::File::open(&image.path).unwrap();
    // SAFETY: plain lseek on a file this function owns.
    unsafe { libc::lseek(file.as_raw_fd(), offset, whence) }
}

fn discard_punches_holes_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(BIG);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    let before = image.allocated();
    let result = submit(
        &mut rig,
        VIRTIO_BLK_T_DISCARD,
        &[(0, 256, 0), (1024, 512, 0), (100, 0, 0)],
    );
    assert_eq!(result, (1, VIRTIO_BLK_S_OK as u8));
    assert!(image.contents() == expected(BIG, &[(0, 256), (1024, 512)]));
    assert_eq!(before - image.allocated(), 768 * 512);
    assert_eq!(seek(&image, 0, libc::SEEK_HOLE), 0);
    assert_eq!(seek(&image, 0, libc::SEEK_DATA), 256 * 512);
    assert_eq!(seek(&image, 256 * 512, libc::SEEK_HOLE), 1024 * 512);
}

fn write_zeroes_with_and_without_unmap_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(BIG);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    let before = image.allocated();
    // Without UNMAP: zeroed in place, still allocated.
    let result = submit(&mut rig, VIRTIO_BLK_T_WRITE_ZEROES, &[(8, 16, 0)]);
    assert_eq!(result, (1, VIRTIO_BLK_S_OK as u8));
    assert!(image.contents() == expected(BIG, &[(8, 16)]));
    assert_eq!(image.allocated(), before);
    // With UNMAP: zeroed and deallocated.
    let result = submit(
        &mut rig,
        VIRTIO_BLK_T_WRITE_ZEROES,
        &[(512, 512, UNMAP), (1536, 8, 0)],
    );
    assert_eq!(result, (1, VIRTIO_BLK_S_OK as u8));
    assert!(image.contents() == expected(BIG, &[(8, 16), (512, 512), (1536, 8)]));
    assert_eq!(before - image.allocated(), 512 * 512);
    assert_eq!(seek(&image, 0, libc::SEEK_HOLE), 512 * 512);
}

fn invalid_segment_lists_change_nothing_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, FEATURES));
    let (ok, ioerr, unsupp) = (
        VIRTIO_BLK_S_OK as u8,
        VIRTIO_BLK_S_IOERR as u8,
        VIRTIO_BLK_S_UNSUPP as u8,
    );
    let good = (0, 8, 0);
    let cases: &[(u32, &[Seg], u8)] = &[
        // The unmap flag on a discard.
        (VIRTIO_BLK_T_DISCARD, &[good, (8, 8, UNMAP)], unsupp),
        // Unknown flags.
        (VIRTIO_BLK_T_DISCARD, &[good, (8, 8, 2)], unsupp),
        (VIRTIO_BLK_T_WRITE_ZEROES, &[good, (8, 8, 1 << 31)], unsupp),
        // More segments than max_*_seg (4).
        (VIRTIO_BLK_T_DISCARD, &[good; 5], ioerr),
        (VIRTIO_BLK_T_WRITE_ZEROES, &[good; 5], ioerr),
        // More sectors than max_*_sectors (1024).
        (VIRTIO_BLK_T_DISCARD, &[good, (0, 1025, 0)], ioerr),
        (VIRTIO_BLK_T_WRITE_ZEROES, &[good, (0, 1025, 0)], ioerr),
        // Past the end of the disk (128 sectors), with and without overflow.
        (VIRTIO_BLK_T_DISCARD, &[good, (120, 9, 0)], ioerr),
        (VIRTIO_BLK_T_WRITE_ZEROES, &[good, (128, 1, 0)], ioerr),
        (VIRTIO_BLK_T_DISCARD, &[good, (u64::MAX, 1, 0)], ioerr),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[good, (u64::MAX - 1, 2, UNMAP)],
            ioerr,
        ),
        // Boundary: the last sectors are fine.
        (VIRTIO_BLK_T_DISCARD, &[(120, 8, 0)], ok),
    ];
    for &(kind, segs, status) in cases {
        assert_eq!(
            submit(&mut rig, kind, segs),
            (1, status),
            "{kind}: {segs:?}"
        );
    }
    let unchanged = expected(IMAGE, &[(120, 8)]);
    assert!(image.contents() == unchanged);

    // Malformed lists: empty, not a multiple of 16, a writable data buffer.
    put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    put_segments(&mem, DATA, &[good, good]);
    for bufs in [
        &[ro(HDR, 16), wo(STATUS, 1)][..],
        &[ro(HDR, 16), ro(DATA, 24), wo(STATUS, 1)],
        &[ro(HDR, 16), ro(DATA, 16), wo(DATA + 512, 16), wo(STATUS, 1)],
    ] {
        assert_eq!(rig.submit(bufs), 1);
        assert_eq!(rig.status(), ioerr, "{bufs:?}");
    }
    assert!(image.contents() == unchanged);
}

fn discard_and_write_zeroes_need_their_features_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, false, 1 << VIRTIO_BLK_F_FLUSH));
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let result = submit(&mut rig, kind, &[(0, 8, 0)]);
        assert_eq!(result, (1, VIRTIO_BLK_S_UNSUPP as u8));
    }
    assert!(image.contents() == expected(IMAGE, &[]));
}

fn read_only_disk_refuses_every_write_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut rig = Rig::with_engine(engine, &mem, disk(&image, true, FEATURES));
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    put(&mem, DATA, &[0xAB; 512]);
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(rig.submit(&[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]), 1);
    assert_eq!(rig.status(), ioerr);
    assert_eq!(
        submit(&mut rig, VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]),
        (1, ioerr)
    );
    let result = submit(&mut rig, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, UNMAP)]);
    assert_eq!(result, (1, ioerr));
    assert!(image.contents() == expected(IMAGE, &[]));
    // Reads, flushes and GET_ID work.
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    assert_eq!(
        rig.submit(&[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]),
        513
    );
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(get(&mem, DATA, 512), expected(IMAGE, &[])[1024..1536]);
    put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.submit(&[ro(HDR, 16), wo(STATUS, 1)]), 1);
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
}

both_engines! {
    discard_punches_holes_on => discard_punches_holes,
    write_zeroes_with_and_without_unmap_on => write_zeroes_with_and_without_unmap,
    invalid_segment_lists_change_nothing_on => invalid_segment_lists_change_nothing,
    discard_and_write_zeroes_need_their_features_on => discard_and_write_zeroes_need_their_features,
    read_only_disk_refuses_every_write_on => read_only_disk_refuses_every_write,
}
