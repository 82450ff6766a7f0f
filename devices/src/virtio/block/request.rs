//! virtio-blk requests (virtio 1.2, 5.2.6): parsing and validating a descriptor chain
//! into a typed [`Request`], free of threads and rings. Every engine shares this step;
//! the synchronous one executes the request right away ([`process`], module `exec`),
//! the io_uring one submits it (module `uring`). Either way the chain is completed by
//! [`finish`], which writes the status byte.
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
use super::exec;
use super::io::Buffers;
use crate::virtio::dma_hold::DmaHold;

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
    pub(super) fn negotiated(&self, bit: u32) -> bool {
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

impl Completion {
    /// A chain returned with used length 0 and nothing written.
    pub(super) const UNANSWERED: Completion = Completion {
        used_len: 0,
        status: None,
    };
}

/// A request the device refuses: the status it gets, and why (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refused {
    pub status: u32,
    pub why: &'static str,
}

/// How a request ended: its status (or why it was refused) and the data bytes written
/// to the guest.
pub(super) type Outcome = (Result<u32, Refused>, u64);

pub(super) fn ioerr(why: &'static str) -> Refused {
    Refused {
        status: VIRTIO_BLK_S_IOERR,
        why,
    }
}

pub(super) fn unsupp(why: &'static str) -> Refused {
    Refused {
        status: VIRTIO_BLK_S_UNSUPP,
        why,
    }
}

/// A validated request, ready to execute: every rule of the protocol and the device
/// limits was checked, so executing it only moves data.
#[derive(Debug)]
pub(super) enum Request {
    /// Read `transfer.len` bytes into the device-writable buffers.
    In(Transfer),
    /// Write the device-readable data.
    Out(Transfer),
    Flush,
    /// Write the id to these device-writable buffers.
    GetId(Buffers),
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
}

/// The data of an IN / OUT request.
#[derive(Debug)]
pub(super) struct Transfer {
    /// First sector (for the log).
    pub sector: u64,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes, a non-zero multiple of 512.
    pub len: u64,
    /// The guest buffers, in order, as (address, length).
    pub parts: Vec<(GuestAddress, usize)>,
}

/// One validated discard / write-zeroes segment, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Range {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// A chain that has a writable status byte, parsed.
#[derive(Debug)]
pub(super) struct Parsed {
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// The request, or why it is refused.
    pub request: Result<Request, Refused>,
}

/// A chain split into its byte streams.
struct Streams {
    readable: Buffers,
    /// Device-writable bytes before the status byte.
    writable: Buffers,
    status: GuestAddress,
    /// Descriptor order or guest memory check that failed (reported as IOERR).
    invalid: Option<&'static str>,
}

/// Parses and executes one chain against `disk` synchronously, writes its status byte
/// and returns the used length. Never panics on guest data. `hold` is held on entry
/// and on return; it is put down while the backend works without guest memory (a
/// flush, say).
pub fn process<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    disk: &Disk,
    hold: &mut DmaHold<'_>,
) -> Completion {
    let head = chain.head_index();
    let Some(parsed) = parse(chain, mem, disk) else {
        return Completion::UNANSWERED;
    };
    let outcome = match parsed.request {
        Ok(request) => exec::execute(request, mem, disk, hold),
        Err(refused) => (Err(refused), 0),
    };
    finish(mem, head, parsed.status, outcome)
}

/// Parses and validates one chain; `None` when it has no writable status byte (it is
/// then returned with used length 0 and nothing written).
pub(super) fn parse<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    disk: &Disk,
) -> Option<Parsed> {
    let head = chain.head_index();
    let Some(streams) = split(chain, mem) else {
        tracing::debug!("virtio-blk: chain {head} has no writable status byte; returned empty");
        return None;
    };
    let request = match streams.invalid {
        Some(why) => Err(ioerr(why)),
        None => validate(&streams, mem, disk),
    };
    Some(Parsed {
        status: streams.status,
        request,
    })
}

/// Writes the status byte of chain `head` at `status` for `outcome`; returns what goes
/// to the used ring.
pub(super) fn finish<M: GuestMemory>(
    mem: &M,
    head: u16,
    status: GuestAddress,
    outcome: Outcome,
) -> Completion {
    let (result, data_len) = outcome;
    let value = result.unwrap_or_else(|refused| {
        tracing::debug!("virtio-blk: chain {head} failed: {}", refused.why);
        refused.status
    });
    // Status values are small (0..=2).
    let value = value as u8;
    if mem.write_obj(value, status).is_err() {
        tracing::debug!("virtio-blk: chain {head}: cannot write the status byte");
        return Completion::UNANSWERED;
    }
    // Data lengths are bounded by the chain, which is shorter than 4 GiB.
    let used_len = u32::try_from(data_len).unwrap_or(u32::MAX - 1) + 1;
    Completion {
        used_len,
        status: Some(value),
    }
}

/// Walks the chain into its readable and writable streams; `None` when the status byte
/// cannot be located or written.
fn split<M: GuestMemory>(chain: DescriptorChain<&M>, mem: &M) -> Option<Streams> {
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
    let mut s = Streams {
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
            s.invalid = Some("device-readable descriptor after a device-writable one");
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(desc.addr(), len as usize, access) {
            s.invalid = Some("buffer outside guest memory");
        }
        if writable {
            s.writable.push(desc.addr(), len);
        } else {
            s.readable.push(desc.addr(), len);
        }
    }
    Some(s)
}

/// Checks a well-formed chain against the protocol and the device limits.
fn validate<M: GuestMemory>(s: &Streams, mem: &M, disk: &Disk) -> Result<Request, Refused> {
    if s.readable.len() < HEADER_SIZE {
        return Err(ioerr("request header missing or too short"));
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    if s.readable.read_at(mem, 0, &mut header).is_err() {
        return Err(ioerr("cannot read the request header"));
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector);
    match kind {
        VIRTIO_BLK_T_IN => read(s, disk, sector),
        VIRTIO_BLK_T_OUT => write(s, disk, sector),
        VIRTIO_BLK_T_FLUSH => {
            if s.readable.len() != HEADER_SIZE || !s.writable.is_empty() {
                return Err(ioerr("FLUSH request with data"));
            }
            Ok(Request::Flush)
        }
        VIRTIO_BLK_T_GET_ID => {
            if s.readable.len() != HEADER_SIZE {
                return Err(ioerr("GET_ID request with device-readable data"));
            }
            if s.writable.is_empty() {
                return Err(ioerr("GET_ID request without a buffer"));
            }
            Ok(Request::GetId(s.writable.clone()))
        }
        VIRTIO_BLK_T_DISCARD => Ok(Request::Discard(segments(s, mem, disk, true)?)),
        VIRTIO_BLK_T_WRITE_ZEROES => Ok(Request::WriteZeroes(segments(s, mem, disk, false)?)),
        _ => Err(unsupp("unsupported request type")),
    }
}

/// Checks the data of an IN/OUT request: segment count and sizes, length, and that the
/// sectors lie on the disk.
fn check_data(
    parts: Vec<(GuestAddress, usize)>,
    len: u64,
    sector: u64,
    disk: &Disk,
) -> Result<Transfer, Refused> {
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
    let offset = check_range(sector, len >> SECTOR_SHIFT, disk.capacity)?;
    Ok(Transfer {
        sector,
        offset,
        len,
        parts,
    })
}

/// Whether `count` sectors from `sector` lie on a disk of `capacity` sectors; returns
/// the byte offset.
fn check_range(sector: u64, count: u64, capacity: u64) -> Result<u64, Refused> {
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(sector << SECTOR_SHIFT),
        _ => Err(ioerr("sector range beyond the end of the disk")),
    }
}

fn read(s: &Streams, disk: &Disk, sector: u64) -> Result<Request, Refused> {
    if s.readable.len() != HEADER_SIZE {
        return Err(ioerr("IN request with device-readable data"));
    }
    let len = s.writable.len();
    let parts = s.writable.range(0, len);
    Ok(Request::In(check_data(parts, len, sector, disk)?))
}

fn write(s: &Streams, disk: &Disk, sector: u64) -> Result<Request, Refused> {
    if !s.writable.is_empty() {
        return Err(ioerr("OUT request with device-writable data"));
    }
    let len = s.readable.len() - HEADER_SIZE;
    let parts = s.readable.range(HEADER_SIZE, len);
    let transfer = check_data(parts, len, sector, disk)?;
    if disk.read_only {
        return Err(ioerr("write to a read-only disk"));
    }
    Ok(Request::Out(transfer))
}

/// One `virtio_blk_discard_write_zeroes` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

/// Reads and validates the segment list of a DISCARD (`discard`) or WRITE_ZEROES
/// request; nothing is touched unless every segment is valid.
fn segments<M: GuestMemory>(
    s: &Streams,
    mem: &M,
    disk: &Disk,
    discard: bool,
) -> Result<Vec<Range>, Refused> {
    let l = &disk.limits;
    let (feature, max_seg, max_sectors) = if discard {
        (
            VIRTIO_BLK_F_DISCARD,
            l.max_discard_seg,
            l.max_discard_sectors,
        )
    } else {
        (
            VIRTIO_BLK_F_WRITE_ZEROES,
            l.max_write_zeroes_seg,
            l.max_write_zeroes_sectors,
        )
    };
    if !disk.negotiated(feature) {
        return Err(unsupp("discard / write zeroes not negotiated"));
    }
    if !s.writable.is_empty() {
        return Err(ioerr("discard / write zeroes with device-writable data"));
    }
    if disk.read_only {
        return Err(ioerr("discard / write zeroes on a read-only disk"));
    }
    let len = s.readable.len() - HEADER_SIZE;
    if len == 0 || len % SEGMENT_SIZE != 0 {
        return Err(ioerr("segment list is empty or not a multiple of 16 bytes"));
    }
    let count = len / SEGMENT_SIZE;
    if count > u64::from(max_seg) {
        return Err(ioerr("more segments than the device allows"));
    }
    let mut raw = vec![0u8; len as usize];
    s.readable
        .read_at(mem, HEADER_SIZE, &mut raw)
        .map_err(|_| ioerr("cannot read the segment list"))?;
    let mut ranges = Vec::with_capacity(count as usize);
    for seg in raw.chunks_exact(SEGMENT_SIZE as usize).map(segment) {
        if seg.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err(unsupp("unknown segment flags"));
        }
        if discard && seg.flags != 0 {
            return Err(unsupp("discard segment with the unmap flag"));
        }
        if seg.num_sectors > max_sectors {
            return Err(ioerr("segment larger than the device allows"));
        }
        let offset = check_range(seg.sector, u64::from(seg.num_sectors), disk.capacity)?;
        ranges.push(Range {
            offset,
            len: u64::from(seg.num_sectors) << SECTOR_SHIFT,
            unmap: seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(ranges)
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
