//! virtio-blk requests (virtio 1.2, 5.2.6): parsing a descriptor chain and executing it
//! against a [`Disk`], free of threads and rings.
//!
//! A chain is read as the spec's byte stream (2.6.4, any descriptor layout): the
//! device-readable buffers hold the 16-byte header `{type, reserved, sector}` and, for
//! OUT / DISCARD / WRITE_ZEROES, the data or segment list; the device-writable buffers
//! that follow hold the IN / GET_ID data and, as the very last byte of the last
//! descriptor, the status. A chain whose status byte cannot be written (broken chain,
//! last descriptor read-only or empty or outside guest memory) is returned with used
//! length 0 and nothing written; any other malformed request gets
//! `VIRTIO_BLK_S_IOERR` (or `VIRTIO_BLK_S_UNSUPP` where the spec asks) and touches no
//! data. The used length is the number of bytes written to device-writable buffers:
//! data actually read (IN), id bytes (GET_ID), plus the status byte.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::backend::BlockBackend;
use super::io::{self, Buffers};

/// Sector size of the request protocol, in bytes.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Length of the request header.
const HEADER_SIZE: u64 = 16;
/// Length of one discard / write-zeroes segment.
const SEGMENT_SIZE: u64 = 16;

/// Limits the device advertises and enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most data descriptors in a request (`seg_max`).
    pub seg_max: u32,
    /// Largest data descriptor in bytes (`size_max`).
    pub size_max: u32,
    /// Most sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Most segments in one discard request.
    pub max_discard_seg: u32,
    /// Most sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
}

/// The disk as the queue workers see it during one activation.
#[derive(Clone)]
pub struct Disk {
    /// Where the sectors live.
    pub backend: Arc<dyn BlockBackend>,
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Writes, discards and write-zeroes fail with IOERR.
    pub read_only: bool,
    /// The GET_ID answer (serial, NUL-padded).
    pub id: [u8; ID_BYTES],
    pub limits: Limits,
    /// The negotiated features (VIRTIO_BLK_F_FLUSH, _DISCARD, _WRITE_ZEROES matter).
    pub features: u64,
}

impl Disk {
    fn negotiated(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }
}

/// How a chain was completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Used length for the used ring.
    pub used_len: u32,
    /// The status written, `None` when the chain had no writable status byte.
    pub status: Option<u8>,
}

/// A request the device refuses: the status it gets, and why (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refused {
    status: u32,
    why: &'static str,
}

fn ioerr(why: &'static str) -> Refused {
    Refused {
        status: VIRTIO_BLK_S_IOERR,
        why,
    }
}

fn unsupp(why: &'static str) -> Refused {
    Refused {
        status: VIRTIO_BLK_S_UNSUPP,
        why,
    }
}

/// A chain split into its byte streams.
struct Parsed {
    readable: Buffers,
    /// Device-writable bytes before the status byte.
    writable: Buffers,
    status: GuestAddress,
    /// Descriptor order or guest memory check that failed (reported as IOERR).
    invalid: Option<&'static str>,
}

/// Parses and executes one chain against `disk`, writes its status byte and returns
/// the used length. Never panics on guest data.
pub fn process<M: GuestMemory>(chain: DescriptorChain<&M>, mem: &M, disk: &Disk) -> Completion {
    let head = chain.head_index();
    let Some(parsed) = split(chain, mem) else {
        tracing::debug!("virtio-blk: chain {head} has no writable status byte; returned empty");
        return Completion {
            used_len: 0,
            status: None,
        };
    };
    let (status, data_len) = match parsed.invalid {
        Some(why) => (Err(ioerr(why)), 0),
        None => execute(&parsed, mem, disk),
    };
    let status = status.unwrap_or_else(|refused| {
        tracing::debug!("virtio-blk: chain {head} failed: {}", refused.why);
        refused.status
    });
    // Status values are small (0..=2).
    let status = status as u8;
    if mem.write_obj(status, parsed.status).is_err() {
        tracing::debug!("virtio-blk: chain {head}: cannot write the status byte");
        return Completion {
            used_len: 0,
            status: None,
        };
    }
    // Data lengths are bounded by the chain, which is shorter than 4 GiB.
    let used_len = u32::try_from(data_len).unwrap_or(u32::MAX - 1) + 1;
    Completion {
        used_len,
        status: Some(status),
    }
}

/// Walks the chain into its readable and writable streams; `None` when the status byte
/// cannot be located or written.
fn split<M: GuestMemory>(chain: DescriptorChain<&M>, mem: &M) -> Option<Parsed> {
    // virtio-queue ends the iteration silently on a loop, an overlong chain, an index
    // out of range, an unreadable descriptor or a bad indirect table: the last
    // descriptor then still says NEXT.
    let descs: Vec<_> = chain.collect();
    let last = descs.last()?;
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let status = last.addr().checked_add(u64::from(last.len()) - 1)?;
    if !mem.check_range(status, 1, Permissions::Write) {
        return None;
    }
    let mut parsed = Parsed {
        readable: Buffers::default(),
        writable: Buffers::default(),
        status,
        invalid: None,
    };
    let mut seen_writable = false;
    for (i, desc) in descs.iter().enumerate() {
        let writable = desc.is_write_only();
        let len = if i + 1 == descs.len() {
            desc.len() - 1
        } else {
            desc.len()
        };
        if writable {
            seen_writable = true;
        } else if seen_writable {
            parsed.invalid = Some("device-readable descriptor after a device-writable one");
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(desc.addr(), len as usize, access) {
            parsed.invalid = Some("buffer outside guest memory");
        }
        if writable {
            parsed.writable.push(desc.addr(), len);
        } else {
            parsed.readable.push(desc.addr(), len);
        }
    }
    Some(parsed)
}

/// Runs a well-formed chain; returns the status and the data bytes written to the
/// guest.
fn execute<M: GuestMemory>(p: &Parsed, mem: &M, disk: &Disk) -> (Result<u32, Refused>, u64) {
    if p.readable.len() < HEADER_SIZE {
        return (Err(ioerr("request header missing or too short")), 0);
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    if p.readable.read_at(mem, 0, &mut header).is_err() {
        return (Err(ioerr("cannot read the request header")), 0);
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector);
    match kind {
        VIRTIO_BLK_T_IN => read(p, mem, disk, sector),
        VIRTIO_BLK_T_OUT => (write(p, mem, disk, sector), 0),
        VIRTIO_BLK_T_FLUSH => (flush(p, disk), 0),
        VIRTIO_BLK_T_GET_ID => get_id(p, mem, disk),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            (discard_or_zero(p, mem, disk, kind), 0)
        }
        _ => (Err(unsupp("unsupported request type")), 0),
    }
}

/// Checks the data of an IN/OUT request: segment count and sizes, length, and that the
/// sectors lie on the disk. Returns the byte offset.
fn check_data(
    parts: &[(GuestAddress, usize)],
    len: u64,
    sector: u64,
    disk: &Disk,
) -> Result<u64, Refused> {
    let limits = &disk.limits;
    if len == 0 {
        return Err(ioerr("no data buffer"));
    }
    if len % SECTOR_SIZE != 0 {
        return Err(ioerr("data length is not a multiple of 512"));
    }
    if parts.len() > limits.seg_max as usize {
        return Err(ioerr("more data descriptors than seg_max"));
    }
    if parts
        .iter()
        .any(|&(_, l)| l as u64 > u64::from(limits.size_max))
    {
        return Err(ioerr("data descriptor larger than size_max"));
    }
    if len > u64::from(limits.seg_max) * u64::from(limits.size_max) {
        return Err(ioerr("request larger than seg_max * size_max"));
    }
    check_range(sector, len >> SECTOR_SHIFT, disk.capacity)
}

/// Whether `count` sectors from `sector` lie on a disk of `capacity` sectors; returns
/// the byte offset.
fn check_range(sector: u64, count: u64, capacity: u64) -> Result<u64, Refused> {
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(sector << SECTOR_SHIFT),
        _ => Err(ioerr("sector range beyond the end of the disk")),
    }
}

fn read<M: GuestMemory>(
    p: &Parsed,
    mem: &M,
    disk: &Disk,
    sector: u64,
) -> (Result<u32, Refused>, u64) {
    if p.readable.len() != HEADER_SIZE {
        return (Err(ioerr("IN request with device-readable data")), 0);
    }
    let len = p.writable.len();
    let parts = p.writable.range(0, len);
    let offset = match check_data(&parts, len, sector, disk) {
        Ok(offset) => offset,
        Err(e) => return (Err(e), 0),
    };
    match io::read_into_guest(mem, &parts, &*disk.backend, offset) {
        Ok(n) if n as u64 == len => (Ok(VIRTIO_BLK_S_OK), len),
        Ok(n) => {
            tracing::warn!("virtio-blk: short read at sector {sector} (image shrunk?)");
            (Err(ioerr("short read")), n as u64)
        }
        Err(e) => {
            tracing::warn!("virtio-blk: read of {len} bytes at sector {sector} failed: {e}");
            (Err(ioerr("read failed")), 0)
        }
    }
}

fn write<M: GuestMemory>(p: &Parsed, mem: &M, disk: &Disk, sector: u64) -> Result<u32, Refused> {
    if !p.writable.is_empty() {
        return Err(ioerr("OUT request with device-writable data"));
    }
    let len = p.readable.len() - HEADER_SIZE;
    let parts = p.readable.range(HEADER_SIZE, len);
    let offset = check_data(&parts, len, sector, disk)?;
    if disk.read_only {
        return Err(ioerr("write to a read-only disk"));
    }
    match io::write_from_guest(mem, &parts, &*disk.backend, offset) {
        Ok(n) if n as u64 == len => {}
        Ok(_) => return Err(ioerr("short write")),
        Err(e) => {
            tracing::warn!("virtio-blk: write of {len} bytes at sector {sector} failed: {e}");
            return Err(ioerr("write failed"));
        }
    }
    write_through(disk)
}

/// Without a negotiated VIRTIO_BLK_F_FLUSH the driver cannot flush, so completed writes
/// must already be stable (virtio 1.2, 5.2.6.3).
fn write_through(disk: &Disk) -> Result<u32, Refused> {
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

fn flush(p: &Parsed, disk: &Disk) -> Result<u32, Refused> {
    if p.readable.len() != HEADER_SIZE || !p.writable.is_empty() {
        return Err(ioerr("FLUSH request with data"));
    }
    sync(disk)
}

fn get_id<M: GuestMemory>(p: &Parsed, mem: &M, disk: &Disk) -> (Result<u32, Refused>, u64) {
    if p.readable.len() != HEADER_SIZE {
        return (Err(ioerr("GET_ID request with device-readable data")), 0);
    }
    if p.writable.is_empty() {
        return (Err(ioerr("GET_ID request without a buffer")), 0);
    }
    match p.writable.write_start(mem, &disk.id) {
        Ok(n) => (Ok(VIRTIO_BLK_S_OK), n as u64),
        Err(_) => (Err(ioerr("cannot write the id")), 0),
    }
}

/// One `virtio_blk_discard_write_zeroes` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

fn discard_or_zero<M: GuestMemory>(
    p: &Parsed,
    mem: &M,
    disk: &Disk,
    kind: u32,
) -> Result<u32, Refused> {
    let discard = kind == VIRTIO_BLK_T_DISCARD;
    let (feature, max_seg, max_sectors) = if discard {
        let l = &disk.limits;
        (
            VIRTIO_BLK_F_DISCARD,
            l.max_discard_seg,
            l.max_discard_sectors,
        )
    } else {
        let l = &disk.limits;
        (
            VIRTIO_BLK_F_WRITE_ZEROES,
            l.max_write_zeroes_seg,
            l.max_write_zeroes_sectors,
        )
    };
    if !disk.negotiated(feature) {
        return Err(unsupp("discard / write zeroes not negotiated"));
    }
    if !p.writable.is_empty() {
        return Err(ioerr("discard / write zeroes with device-writable data"));
    }
    if disk.read_only {
        return Err(ioerr("discard / write zeroes on a read-only disk"));
    }
    let len = p.readable.len() - HEADER_SIZE;
    if len == 0 || len % SEGMENT_SIZE != 0 {
        return Err(ioerr("segment list is empty or not a multiple of 16 bytes"));
    }
    let count = len / SEGMENT_SIZE;
    if count > u64::from(max_seg) {
        return Err(ioerr("more segments than the device allows"));
    }
    let mut raw = vec![0u8; len as usize];
    p.readable
        .read_at(mem, HEADER_SIZE, &mut raw)
        .map_err(|_| ioerr("cannot read the segment list"))?;
    let segments: Vec<Segment> = raw
        .chunks_exact(SEGMENT_SIZE as usize)
        .map(segment)
        .collect();
    // Validate every segment before touching the disk.
    let mut ranges = Vec::with_capacity(segments.len());
    for s in &segments {
        if s.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err(unsupp("unknown segment flags"));
        }
        if discard && s.flags != 0 {
            return Err(unsupp("discard segment with the unmap flag"));
        }
        if s.num_sectors > max_sectors {
            return Err(ioerr("segment larger than the device allows"));
        }
        let offset = check_range(s.sector, u64::from(s.num_sectors), disk.capacity)?;
        let unmap = s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        ranges.push((offset, u64::from(s.num_sectors) << SECTOR_SHIFT, unmap));
    }
    for (offset, bytes, unmap) in ranges.into_iter().filter(|r| r.1 > 0) {
        let result = if discard {
            disk.backend.discard(offset, bytes)
        } else {
            disk.backend.write_zeroes(offset, bytes, unmap)
        };
        if let Err(e) = result {
            tracing::warn!("virtio-blk: discard / write zeroes at {offset:#x}+{bytes:#x}: {e}");
            return Err(ioerr("discard / write zeroes failed"));
        }
    }
    write_through(disk)
}

fn segment(raw: &[u8]) -> Segment {
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[0..8]);
    let word = |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    Segment {
        sector: u64::from_le_bytes(sector),
        num_sectors: word(8),
        flags: word(12),
    }
}
