//! A read or write of the io_uring engine in flight, possibly submitted in several
//! pieces (a short transfer, or more iovecs than one READV/WRITEV takes), and the
//! accounting of each of its CQEs.

use std::io;

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_OK;

use crate::virtio::block::io::GuestIovecs;
use crate::virtio::block::request::{ioerr, Outcome, Transfer};

/// A read or write, possibly submitted in several pieces.
pub(super) struct Pending {
    pub write: bool,
    /// Order among the writes and flushes of the queue.
    pub seq: u64,
    pub t: Transfer,
    pub bufs: GuestIovecs,
    /// First iovec not completely transferred yet (the one at `first` is advanced
    /// past what was transferred of it).
    pub first: usize,
    pub done: u64,
}

/// Accounts for a READV/WRITEV result; `None` when the rest must be resubmitted.
pub(super) fn advance(io: &mut Pending, res: i32) -> Option<Outcome> {
    let (len, sector) = (io.t.len, io.t.sector);
    let what = if io.write { "write" } else { "read" };
    if res < 0 {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return None;
        }
        let e = io::Error::from_raw_os_error(-res);
        tracing::warn!("virtio-blk: {what} of {len} bytes at sector {sector} failed: {e}");
        let why = if io.write {
            "write failed"
        } else {
            "read failed"
        };
        return Some((Err(ioerr(why)), 0));
    }
    // Non-negative, and at most what was asked.
    let mut n = res as usize;
    if n == 0 {
        if io.write {
            return Some((Err(ioerr("short write")), 0));
        }
        tracing::warn!("virtio-blk: short read at sector {sector} (image shrunk?)");
        return Some((Err(ioerr("short read")), io.done));
    }
    io.done += n as u64;
    let iovs = &mut io.bufs.iovs;
    while n > 0 && io.first < iovs.len() {
        let iov = &mut iovs[io.first];
        if n >= iov.iov_len {
            n -= iov.iov_len;
            io.first += 1;
        } else {
            iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
            iov.iov_len -= n;
            n = 0;
        }
    }
    if io.done < len {
        return None;
    }
    Some((Ok(VIRTIO_BLK_S_OK), if io.write { 0 } else { len }))
}
