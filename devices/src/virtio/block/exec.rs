//! The synchronous engine's execution of a validated [`Request`]: one system call (or a
//! few) on the backend, in the worker thread, before the next request is looked at.

use virtio_bindings::bindings::virtio_blk::*;
use vm_memory::GuestMemory;

use super::io;
use super::request::{ioerr, Disk, Outcome, Range, Refused, Request, Transfer};
use crate::virtio::dma_hold::DmaHold;

/// Executes `request` against `disk`; returns its status and the data bytes written to
/// the guest. `hold` (held on entry and on return) is put down while the backend works
/// without guest memory (flush, discard, write zeroes): an IOMMU UNMAP need not wait
/// for an `fdatasync`.
pub(super) fn execute<M: GuestMemory>(
    request: Request,
    mem: &M,
    disk: &Disk,
    hold: &mut DmaHold<'_>,
) -> Outcome {
    match request {
        Request::In(t) => read(&t, mem, disk),
        Request::Out(t) => (write(&t, mem, disk, hold), 0),
        Request::Flush => (hold.paused(|| sync(disk)), 0),
        Request::GetId(writable) => match writable.write_start(mem, &disk.id) {
            Ok(n) => (Ok(VIRTIO_BLK_S_OK), n as u64),
            Err(_) => (Err(ioerr("cannot write the id")), 0),
        },
        Request::Discard(ranges) => (hold.paused(|| discard_or_zero(&ranges, disk, true)), 0),
        Request::WriteZeroes(ranges) => (hold.paused(|| discard_or_zero(&ranges, disk, false)), 0),
    }
}

fn read<M: GuestMemory>(t: &Transfer, mem: &M, disk: &Disk) -> Outcome {
    let sector = t.sector;
    match io::read_into_guest(mem, &t.parts, &*disk.backend, t.offset) {
        Ok(n) if n as u64 == t.len => (Ok(VIRTIO_BLK_S_OK), t.len),
        Ok(n) => {
            tracing::warn!("virtio-blk: short read at sector {sector} (image shrunk?)");
            (Err(ioerr("short read")), n as u64)
        }
        Err(e) => {
            let len = t.len;
            tracing::warn!("virtio-blk: read of {len} bytes at sector {sector} failed: {e}");
            (Err(ioerr("read failed")), 0)
        }
    }
}

fn write<M: GuestMemory>(
    t: &Transfer,
    mem: &M,
    disk: &Disk,
    hold: &mut DmaHold<'_>,
) -> Result<u32, Refused> {
    match io::write_from_guest(mem, &t.parts, &*disk.backend, t.offset) {
        Ok(n) if n as u64 == t.len => {}
        Ok(_) => return Err(ioerr("short write")),
        Err(e) => {
            let (len, sector) = (t.len, t.sector);
            tracing::warn!("virtio-blk: write of {len} bytes at sector {sector} failed: {e}");
            return Err(ioerr("write failed"));
        }
    }
    // The data is in the backend: a write-through sync needs no guest memory.
    hold.paused(|| write_through(disk))
}

/// Without a negotiated VIRTIO_BLK_F_FLUSH the driver cannot flush, so completed writes
/// must already be stable (virtio 1.2, 5.2.6.3).
pub(super) fn write_through(disk: &Disk) -> Result<u32, Refused> {
    if disk.negotiated(VIRTIO_BLK_F_FLUSH) {
        return Ok(VIRTIO_BLK_S_OK);
    }
    sync(disk)
}

fn sync(disk: &Disk) -> Result<u32, Refused> {
    match disk.backend.flush() {
        Ok(()) => Ok(VIRTIO_BLK_S_OK),
        Err(e) => {
            tracing::warn!("virtio-blk: flush failed: {e}");
            Err(ioerr("flush failed"))
        }
    }
}

/// Discards (`discard`) or zeroes the validated ranges, then honours write-through.
pub(super) fn discard_or_zero(
    ranges: &[Range],
    disk: &Disk,
    discard: bool,
) -> Result<u32, Refused> {
    for r in ranges.iter().filter(|r| r.len > 0) {
        let result = if discard {
            disk.backend.discard(r.offset, r.len)
        } else {
            disk.backend.write_zeroes(r.offset, r.len, r.unmap)
        };
        if let Err(e) = result {
            let (offset, bytes) = (r.offset, r.len);
            tracing::warn!("virtio-blk: discard / write zeroes at {offset:#x}+{bytes:#x}: {e}");
            return Err(ioerr("discard / write zeroes failed"));
        }
    }
    write_through(disk)
}
