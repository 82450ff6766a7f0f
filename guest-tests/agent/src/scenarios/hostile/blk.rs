//! The victim virtio-blk, driven raw from user space ([`Blk`]), and the attacks on its
//! request protocol: sector ranges that overflow or end past the disk, DISCARD and
//! WRITE_ZEROES segment lists past the end (a list with one bad segment must touch
//! nothing), a storm of FLUSHes, and request types the device does not know.

use std::time::{Duration, Instant};

use super::attack::{Seen, Victim};
use super::driver::{Driver, Queue, Reaction};
use super::session::Session;
use super::spec;
use crate::pattern;
use crate::scenarios::vfio::virtio::{
    find_block, RingLayout, DESC_F_NEXT, DESC_F_WRITE, F_VERSION_1,
};
use crate::vfio::pci::VIRTIO_PCI_CAP_DEVICE_CFG;

/// Request types and status values (virtio 1.2, 5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Status bytes are set to this before a request: a device that writes none leaves it.
pub const UNTOUCHED: u8 = 0xff;
pub const WRITE_ZEROES_UNMAP: u32 = 1;

/// Feature bits the driver accepts when offered.
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
pub const F_INDIRECT_DESC: u64 = 1 << 28;
const WANTED: u64 =
    F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_FLUSH | F_DISCARD | F_WRITE_ZEROES | F_INDIRECT_DESC;

/// Layout of the DMA page (offsets from its physical address).
pub const RING: RingLayout = RingLayout {
    desc: 0x0000,
    avail: 0x1000,
    used: 0x2000,
};
/// Two indirect tables of 256 entries.
pub const INDIRECT: [usize; 2] = [0x3000, 0x4000];
/// Request headers (16 bytes per slot) and status bytes (one per slot).
const HEADERS: usize = 0x5000;
const STATUS: usize = 0x6000;
const SLOTS: usize = 256;
/// Discard / write-zeroes segment lists.
pub const SEGMENTS: usize = 0x7000;
/// Data slots of 64 KiB.
pub const DATA: usize = 0x10000;
pub const SLOT: usize = 0x10000;
/// Largest queue the driver sets up.
pub const QUEUE_SIZE: u16 = 64;
/// How long the device gets to react to a chain.
pub const REACT: Duration = Duration::from_secs(5);

/// Addresses the attacks aim at.
#[derive(Debug, Clone, Copy)]
pub struct Aim {
    pub ram_end: u64,
    pub ecam: u64,
    pub bystander_bar: u64,
    pub own_bar: u64,
}

/// The x86 MSI doorbell: a device write there must not become an interrupt.
pub const MSI_DOORBELL: u64 = 0xfee0_0000;

/// The victim disk's raw driver.
pub struct Blk<'a> {
    pub d: Driver<'a>,
    pub q: Option<Queue<'a>>,
    pub features: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub aim: Aim,
    /// FNV of the block the last good request wrote at [`spec::GOOD_SECTOR`].
    pub last_good: Option<String>,
}

impl<'a> Blk<'a> {
    pub fn new(s: &'a Session, aim: Aim) -> Result<Blk<'a>, String> {
        let d = Driver::new(s)?;
        let cfg = find_block(
            &s.dev,
            &s.cfg,
            VIRTIO_PCI_CAP_DEVICE_CFG,
            "device-configuration",
        )?;
        let lo = s.dev.read_u32(&cfg.region, cfg.base)?;
        let hi = s.dev.read_u32(&cfg.region, cfg.base + 4)?;
        Ok(Blk {
            d,
            q: None,
            features: 0,
            capacity: u64::from(hi) << 32 | u64::from(lo),
            aim,
            last_good: None,
        })
    }

    /// The queue size: the device's maximum, at most [`QUEUE_SIZE`].
    pub fn queue_size(&self) -> Result<u16, String> {
        let max = self.d.t.queue_max(0)?;
        if max == 0 {
            return Err("queue 0 does not exist".into());
        }
        Ok(1 << (15 - max.min(QUEUE_SIZE).leading_zeros()))
    }

    /// Reset, features, queue 0 at [`RING`], DRIVER_OK.
    pub fn start(&mut self) -> Result<(), String> {
        self.q = None;
        let size = self.queue_size()?;
        let (features, mut queues) = self.d.start(WANTED, &[(0, size, RING)])?;
        self.features = features;
        self.q = queues.pop();
        Ok(())
    }

    pub fn queue(&self) -> Result<&Queue<'a>, String> {
        self.q.as_ref().ok_or_else(|| "queue not set up".into())
    }

    pub fn size(&self) -> Result<u16, String> {
        Ok(self.queue()?.ring.size())
    }

    /// Physical address of data slot `slot`.
    pub fn data(&self, slot: usize) -> u64 {
        self.d.at(DATA + slot * SLOT)
    }

    /// Writes request header `slot`; returns its physical address.
    pub fn header(&self, slot: usize, kind: u32, sector: u64) -> Result<u64, String> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        let off = HEADERS + 16 * (slot % SLOTS);
        self.d.s.mem.write(off, &h)?;
        Ok(self.d.at(off))
    }

    /// Marks status byte `slot` [`UNTOUCHED`]; returns its physical address.
    pub fn status_at(&self, slot: usize) -> Result<u64, String> {
        let off = STATUS + slot % SLOTS;
        self.d.s.mem.write(off, &[UNTOUCHED])?;
        Ok(self.d.at(off))
    }

    pub fn status_of(&self, slot: usize) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.d.s.mem.read(STATUS + slot % SLOTS, &mut b)?;
        Ok(b[0])
    }

    /// Writes descriptor `index` of the queue.
    pub fn desc(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), String> {
        self.queue()?.ring.desc(index, addr, len, flags, next)
    }

    /// Publishes chain `head` and rings the doorbell; returns the used index before.
    pub fn publish(&mut self, head: u16) -> Result<u16, String> {
        let q = self.q.as_mut().ok_or("queue not set up")?;
        let since = q.ring.used_idx()?;
        q.ring.publish(head)?;
        self.d.kick(&q.info)?;
        Ok(since)
    }

    /// Waits for chain `head` (see [`Driver::watch`]).
    pub fn watch(&self, since: u16, head: u16) -> Result<Reaction, String> {
        Ok(self.d.watch(&self.queue()?.ring, since, head, REACT))
    }

    /// A well-formed request on descriptors `base..base + 3` (2 without data): header
    /// slot `slot`, `len` bytes of data slot `slot`, status byte `slot`. Returns what
    /// the device did and the status byte.
    pub fn request(
        &mut self,
        base: u16,
        slot: usize,
        kind: u32,
        sector: u64,
        len: u32,
    ) -> Result<(Reaction, u8), String> {
        let hdr = self.header(slot, kind, sector)?;
        let status = self.status_at(slot)?;
        let data_flags = if kind == T_IN || kind == T_GET_ID {
            DESC_F_WRITE
        } else {
            0
        };
        if len > 0 {
            self.desc(base, hdr, 16, DESC_F_NEXT, base + 1)?;
            self.desc(
                base + 1,
                self.data(slot),
                len,
                data_flags | DESC_F_NEXT,
                base + 2,
            )?;
            self.desc(base + 2, status, 1, DESC_F_WRITE, 0)?;
        } else {
            self.desc(base, hdr, 16, DESC_F_NEXT, base + 1)?;
            self.desc(base + 1, status, 1, DESC_F_WRITE, 0)?;
        }
        let since = self.publish(base)?;
        let r = self.watch(since, base)?;
        Ok((r, self.status_of(slot)?))
    }

    /// Writes `data` through the device at `sector` (from slot `slot`); an error
    /// unless it completes with S_OK.
    pub fn write_ok(&mut self, slot: usize, sector: u64, data: &[u8]) -> Result<(), String> {
        self.d.s.mem.write(DATA + slot * SLOT, data)?;
        let (r, st) = self.request(0, slot, T_OUT, sector, data.len() as u32)?;
        if st != S_OK || r.elem.is_none() {
            return Err(format!(
                "write at sector {sector}: status {st:#x}, {}",
                r.describe()
            ));
        }
        Ok(())
    }

    /// Reads `len` bytes at `sector` through the device (into slot `slot`).
    pub fn read_ok(
        &mut self,
        slot: usize,
        sector: u64,
        len: usize,
    ) -> Result<(Vec<u8>, Reaction), String> {
        self.d.s.mem.write(DATA + slot * SLOT, &vec![0u8; len])?;
        let (r, st) = self.request(3, slot, T_IN, sector, len as u32)?;
        if st != S_OK || r.elem.is_none() {
            return Err(format!(
                "read at sector {sector}: status {st:#x}, {}",
                r.describe()
            ));
        }
        let mut out = vec![0u8; len];
        self.d.s.mem.read(DATA + slot * SLOT, &mut out)?;
        Ok((out, r))
    }
}

impl Victim for Blk<'_> {
    fn recover(&mut self, n: u64) -> Result<String, String> {
        let before = self.d.status()?;
        self.start()?;
        let block = pattern::bytes(pattern::chunk_seed(spec::GOOD_SEED, n), spec::BLOCK);
        self.write_ok(0, spec::GOOD_SECTOR, &block)?;
        let (back, r) = self.read_ok(1, spec::GOOD_SECTOR, spec::BLOCK)?;
        if back != block {
            return Err(format!(
                "read back {} after writing {}",
                pattern::fnv1a(&back),
                pattern::fnv1a(&block)
            ));
        }
        if r.irqs == 0 {
            return Err(format!(
                "the read completed without an interrupt: {}",
                r.describe()
            ));
        }
        let fnv = pattern::fnv1a(&block);
        self.last_good = Some(fnv.clone());
        Ok(format!(
            "status was {before:#04x}; reset; good write+read {fnv}"
        ))
    }
}

/// Names a status byte.
pub fn status_name(s: u8) -> String {
    match s {
        S_OK => "OK".into(),
        S_IOERR => "IOERR".into(),
        S_UNSUPP => "UNSUPP".into(),
        UNTOUCHED => "untouched".into(),
        other => format!("{other:#04x}"),
    }
}

/// Requests past the end of the disk and with sector numbers that overflow.
pub fn sector_overflow(b: &mut Blk) -> Result<Seen, String> {
    b.start()?;
    let cap = b.capacity;
    let cases: [(u32, u64, u32); 8] = [
        (T_IN, u64::MAX, 4096),
        (T_IN, u64::MAX - 7, 4096),
        (T_IN, cap, 512),
        (T_IN, cap - 1, 4096),
        (T_IN, 1 << 55, 512),
        (T_IN, 1 << 63, 512),
        (T_OUT, cap, 4096),
        (T_IN, 0, 0),
    ];
    let mut seen = Vec::new();
    let mut ok = true;
    for (kind, sector, len) in cases {
        let (r, st) = b.request(0, 2, kind, sector, len)?;
        ok &= st == S_IOERR && r.elem.is_some();
        let what = if kind == T_IN { "IN" } else { "OUT" };
        seen.push(format!("{what} {len}B@{sector:#x}: {}", status_name(st)));
    }
    Ok(Seen::new(
        ok,
        format!("capacity {cap}; {}", seen.join(", ")),
    ))
}

/// Segments `(sector, sectors, flags)`.
type Segments = Vec<(u64, u32, u32)>;

/// One DISCARD / WRITE_ZEROES request with segments `(sector, sectors, flags)`, or a
/// raw segment list of `raw_len` bytes; returns the status byte.
fn segments(
    b: &mut Blk,
    kind: u32,
    segs: &[(u64, u32, u32)],
    raw_len: Option<u32>,
) -> Result<u8, String> {
    let mut list = Vec::new();
    for &(sector, n, flags) in segs {
        list.extend_from_slice(&sector.to_le_bytes());
        list.extend_from_slice(&n.to_le_bytes());
        list.extend_from_slice(&flags.to_le_bytes());
    }
    b.d.s.mem.write(SEGMENTS, &list)?;
    let hdr = b.header(4, kind, 0)?;
    let status = b.status_at(4)?;
    let len = raw_len.unwrap_or(list.len() as u32);
    b.desc(0, hdr, 16, DESC_F_NEXT, 1)?;
    b.desc(1, b.d.at(SEGMENTS), len, DESC_F_NEXT, 2)?;
    b.desc(2, status, 1, DESC_F_WRITE, 0)?;
    let since = b.publish(0)?;
    let r = b.watch(since, 0)?;
    if r.elem.is_none() {
        return Err(format!("no completion: {}", r.describe()));
    }
    b.status_of(4)
}

/// Bad DISCARD (`kind` = T_DISCARD) or WRITE_ZEROES segment lists; the first and last
/// 8 sectors hold known data that must survive every one of them.
pub fn segments_past_end(b: &mut Blk, kind: u32) -> Result<Seen, String> {
    b.start()?;
    let feature = if kind == T_DISCARD {
        F_DISCARD
    } else {
        F_WRITE_ZEROES
    };
    if b.features & feature == 0 {
        return Ok(Seen::new(
            false,
            format!("feature {feature:#x} not negotiated"),
        ));
    }
    let cap = b.capacity;
    let head = pattern::bytes(0xfe11_0000_4057_4ead ^ u64::from(kind), 4096);
    let tail = pattern::bytes(0xfe11_0000_4057_7a11 ^ u64::from(kind), 4096);
    b.write_ok(0, 0, &head)?;
    b.write_ok(1, cap - 8, &tail)?;
    let flags = if kind == T_DISCARD {
        0
    } else {
        WRITE_ZEROES_UNMAP
    };
    let many: Segments = (0..1000).map(|i| (i, 1, flags)).collect();
    let cases: Vec<(&str, Segments, Option<u32>)> = vec![
        ("past end", vec![(cap - 8, 16, flags)], None),
        ("at end", vec![(cap, 1, flags)], None),
        ("sector overflow", vec![(u64::MAX, 1, flags)], None),
        ("huge", vec![(0, u32::MAX, flags)], None),
        ("good+bad", vec![(0, 8, flags), (cap - 4, 8, flags)], None),
        ("bad flags", vec![(0, 8, 0xfffe)], None),
        ("1000 segments", many, None),
        ("15-byte list", vec![(0, 8, flags)], Some(15)),
        ("empty list", vec![], Some(0)),
    ];
    let mut seen = Vec::new();
    let mut ok = true;
    for (what, segs, raw) in cases {
        let st = segments(b, kind, &segs, raw)?;
        ok &= st == S_IOERR || st == S_UNSUPP;
        seen.push(format!("{what}: {}", status_name(st)));
    }
    let (got_head, _) = b.read_ok(2, 0, 4096)?;
    let (got_tail, _) = b.read_ok(3, cap - 8, 4096)?;
    let intact = got_head == head && got_tail == tail;
    ok &= intact;
    Ok(Seen::new(
        ok,
        format!(
            "{}; first and last 8 sectors {}",
            seen.join(", "),
            if intact { "intact" } else { "CHANGED" }
        ),
    ))
}

pub fn discard_past_end(b: &mut Blk) -> Result<Seen, String> {
    segments_past_end(b, T_DISCARD)
}

pub fn write_zeroes_past_end(b: &mut Blk) -> Result<Seen, String> {
    segments_past_end(b, T_WRITE_ZEROES)
}

/// [`spec::FLUSH_STORM`] FLUSH requests, a queue's worth at a time.
pub fn flush_storm(b: &mut Blk) -> Result<Seen, String> {
    b.start()?;
    let size = b.size()?;
    let per_batch = (size / 2).max(1);
    let start = Instant::now();
    let (mut done, mut good) = (0u64, 0u64);
    let mut irqs = 0;
    while done < spec::FLUSH_STORM {
        let batch = per_batch.min((spec::FLUSH_STORM - done) as u16);
        let q = b.q.as_mut().ok_or("queue not set up")?;
        let since = q.ring.used_idx()?;
        for i in 0..batch {
            let slot = usize::from(i);
            let base = 2 * i;
            let hdr = b.header(slot, T_FLUSH, 0)?;
            let status = b.status_at(slot)?;
            b.desc(base, hdr, 16, DESC_F_NEXT, base + 1)?;
            b.desc(base + 1, status, 1, DESC_F_WRITE, 0)?;
            b.q.as_mut().ok_or("queue not set up")?.ring.publish(base)?;
        }
        b.d.kick(&b.queue()?.info)?;
        let (came, n) =
            b.d.wait_used(&b.queue()?.ring, since, batch, Duration::from_secs(30))?;
        irqs += n;
        if came < batch {
            return Ok(Seen::new(
                false,
                format!("{done} flushes done, then only {came} of {batch} came back"),
            ));
        }
        for i in 0..batch {
            good += u64::from(b.status_of(usize::from(i))? == S_OK);
        }
        done += u64::from(batch);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Seen::new(
        good == done,
        format!(
            "{done} FLUSHes in batches of {per_batch}: {good} OK in {secs:.1} s ({:.0}/s, \
             {irqs} interrupts)",
            done as f64 / secs
        ),
    ))
}

/// Request types the device does not know, and known ones with the wrong shape.
pub fn bad_request_types(b: &mut Blk) -> Result<Seen, String> {
    b.start()?;
    let mut seen = Vec::new();
    let mut ok = true;
    for kind in [2u32, 3, 0xff, 0x7fff_ffff, 0xffff_ffff] {
        let (r, st) = b.request(0, 5, kind, 0, 512)?;
        ok &= r.elem.is_some() && (st == S_UNSUPP || st == S_IOERR);
        seen.push(format!("type {kind:#x}: {}", status_name(st)));
    }
    // FLUSH with data, GET_ID with a 1-byte buffer, DISCARD without a segment list.
    let (_, st) = b.request(0, 5, T_FLUSH, 0, 512)?;
    ok &= st == S_IOERR;
    seen.push(format!("FLUSH with data: {}", status_name(st)));
    let (r, st) = b.request(0, 5, T_GET_ID, 0, 1)?;
    ok &= r.elem.is_some() && st != UNTOUCHED;
    seen.push(format!(
        "GET_ID into 1 byte: {} used len {}",
        status_name(st),
        r.elem.map_or(0, |e| e.len)
    ));
    let (_, st) = b.request(0, 5, T_DISCARD, 0, 0)?;
    ok &= st == S_IOERR || st == S_UNSUPP;
    seen.push(format!("DISCARD without segments: {}", status_name(st)));
    Ok(Seen::new(ok, seen.join(", ")))
}
