//! Attacks on the victim virtio-blk's MSI-X table and PBA, written directly through the
//! mapped BAR (vfio-pci lets the whole BAR be mapped; its own MSI-X set-up through
//! VFIO_DEVICE_SET_IRQS is bypassed): garbage addresses and data in every entry,
//! unmasking entries nobody programmed, writes to the read-only PBA, and accesses of
//! the wrong width or past the table. The garbage messages name a destination no vCPU
//! has (APIC id 0x5a / 0xdf, physical mode): delivered or not, they reach no CPU.
//! Entries nobody programmed (address 0, data 0) would name vCPU 0 with vector 0, so
//! no queue is ever pointed at them.

use super::attack::Seen;
use super::blk::{Blk, S_OK};
use super::spec;
use crate::vfio::pci::{msix, u32_at};

/// Garbage messages: (address low, address high, data).
const GARBAGE: [(u32, u32, u32); 2] = [
    (0xdea5_a000, 0xffff_ffff, 0xdead_beef),
    (0x0bad_f000, 0x1234_5678, 0x1234_5678),
];
const VECTOR_MASKED: u32 = 1;

/// Where the table and the PBA are in BAR 0, and the vector count.
struct Table {
    table: u64,
    pba: u64,
    count: u16,
}

fn table(b: &Blk) -> Result<Table, String> {
    let m = msix(&b.d.s.cfg).ok_or("no MSI-X capability")?;
    let pba = u32_at(&b.d.s.cfg, m.offset + 8).ok_or("short MSI-X capability")?;
    if m.table_bar != 0 || pba & 7 != 0 {
        return Err(format!(
            "table in BAR {}, PBA in BAR {}",
            m.table_bar,
            pba & 7
        ));
    }
    Ok(Table {
        table: u64::from(m.table_offset),
        pba: u64::from(pba & !7),
        count: m.table_size,
    })
}

impl Table {
    fn at(&self, v: u16, word: u64) -> u64 {
        self.table + 16 * u64::from(v) + 4 * word
    }
}

fn entry(b: &Blk, t: &Table, v: u16) -> Result<[u32; 4], String> {
    let mut e = [0u32; 4];
    for (w, slot) in e.iter_mut().enumerate() {
        *slot = b.d.s.bar0.read32(t.at(v, w as u64))?;
    }
    Ok(e)
}

fn set_ctrl(b: &Blk, t: &Table, v: u16, ctrl: u32) -> Result<(), String> {
    b.d.s.bar0.write32(t.at(v, 3), ctrl)
}

/// The PBA words (one bit per vector).
fn pba(b: &Blk, t: &Table) -> Result<Vec<u64>, String> {
    let words = u64::from(t.count).div_ceil(64);
    (0..words)
        .map(|i| {
            let lo = b.d.s.bar0.read32(t.pba + 8 * i)?;
            let hi = b.d.s.bar0.read32(t.pba + 8 * i + 4)?;
            Ok(u64::from(hi) << 32 | u64::from(lo))
        })
        .collect()
}

/// Writes a block at a scratch sector; returns the interrupts its completion raised.
fn request(b: &mut Blk, n: u64) -> Result<u64, String> {
    let block = crate::pattern::bytes(
        crate::pattern::chunk_seed(0xfe11_0000_4057_3150, n),
        spec::BLOCK,
    );
    b.d.s.mem.write(super::blk::DATA, &block)?;
    let (r, st) = b.request(
        0,
        0,
        super::blk::T_OUT,
        spec::GOOD_SECTOR + 24,
        spec::BLOCK as u32,
    )?;
    if r.elem.is_none() || st != S_OK {
        return Err(format!("request: status {st:#x}, {}", r.describe()));
    }
    Ok(r.irqs)
}

/// Garbage address and data in every entry (masked, then unmasked for the queue's
/// vector, then rewritten while unmasked): the queue's interrupt must follow the table
/// to nowhere; after VFIO rewrites the table it must come back.
pub fn garbage_entries(b: &mut Blk) -> Result<Seen, String> {
    b.d.s.rearm_msix()?;
    b.start()?;
    let t = table(b)?;
    for v in 0..t.count {
        let (lo, hi, data) = GARBAGE[0];
        set_ctrl(b, &t, v, VECTOR_MASKED)?;
        b.d.s.bar0.write32(t.at(v, 0), lo)?;
        b.d.s.bar0.write32(t.at(v, 1), hi)?;
        b.d.s.bar0.write32(t.at(v, 2), data ^ u32::from(v))?;
    }
    set_ctrl(b, &t, 0, 0)?;
    let first = request(b, 0)?;
    let (lo, hi, data) = GARBAGE[1];
    b.d.s.bar0.write32(t.at(0, 0), lo)?;
    b.d.s.bar0.write32(t.at(0, 1), hi)?;
    b.d.s.bar0.write32(t.at(0, 2), data)?;
    let second = request(b, 1)?;
    let e = entry(b, &t, 0)?;
    b.d.s.rearm_msix()?;
    let restored = request(b, 2)?;
    let ok = first == 0 && second == 0 && restored > 0 && e == [lo & !3, hi, data, 0];
    Ok(Seen::new(
        ok,
        format!(
            "{} entries garbled; queue vector unmasked with {:#x}/{:#x}: {first} interrupts; \
             rewritten live to {:#x}: {second} interrupts (entry reads {:x?}); table rewritten \
             by VFIO: {restored} interrupts",
            t.count, GARBAGE[0].0, GARBAGE[0].2, lo, e
        ),
    ))
}

/// Unmasks every entry nobody programmed (vectors 2 and up), with nothing pointed at
/// them: no interrupt may appear from nowhere and the queue's vector keeps working.
pub fn unprogrammed_unmask(b: &mut Blk) -> Result<Seen, String> {
    b.d.s.rearm_msix()?;
    b.start()?;
    let t = table(b)?;
    let mut blank = 0;
    let mut unmasked = 0;
    for v in 2..t.count {
        let e = entry(b, &t, v)?;
        blank += u32::from(e[0] == 0 && e[1] == 0 && e[2] == 0);
        set_ctrl(b, &t, v, 0)?;
        unmasked += u32::from(entry(b, &t, v)?[3] & VECTOR_MASKED == 0);
    }
    let irqs = request(b, 3)?;
    let pending = pba(b, &t)?;
    let (_, cfg_irqs) = b.d.s.irqs.poll(100)?;
    for v in 2..t.count {
        set_ctrl(b, &t, v, VECTOR_MASKED)?;
    }
    let others = t.count.saturating_sub(2);
    let ok = irqs > 0
        && pending.iter().all(|&w| w == 0)
        && cfg_irqs == 0
        && unmasked == u32::from(others);
    Ok(Seen::new(
        ok,
        format!(
            "{others} entries never programmed ({blank} blank), {unmasked} unmasked; a request \
             then raised {irqs} interrupts on its own vector, {cfg_irqs} elsewhere; PBA \
             {pending:x?}"
        ),
    ))
}

/// With the queue's vector masked, a completion sets its pending bit; writes of every
/// width to the PBA must not clear (or set) anything; unmasking delivers it once.
pub fn pba_writes(b: &mut Blk) -> Result<Seen, String> {
    b.d.s.rearm_msix()?;
    b.start()?;
    let t = table(b)?;
    set_ctrl(b, &t, 0, VECTOR_MASKED)?;
    let masked_irqs = request(b, 4)?;
    let before = pba(b, &t)?;
    let bar = &b.d.s.bar0;
    bar.write64(t.pba, 0)?;
    bar.write32(t.pba, 0)?;
    bar.write32(t.pba + 4, 0xffff_ffff)?;
    bar.write64(t.pba, u64::MAX)?;
    bar.write16(t.pba + 2, 0xffff)?;
    bar.write8(t.pba, 0)?;
    bar.write32(t.pba + 0xffc, 0xffff_ffff)?;
    let after = pba(b, &t)?;
    set_ctrl(b, &t, 0, 0)?;
    let (delivered, _) = b.d.s.irqs.poll(1000)?;
    let (late, _) = b.d.s.irqs.poll(100)?;
    let cleared = pba(b, &t)?;
    let ok = masked_irqs == 0
        && before.first().is_some_and(|w| w & 1 == 1)
        && after == before
        && delivered + late == 1
        && cleared.first().is_some_and(|w| w & 1 == 0);
    Ok(Seen::new(
        ok,
        format!(
            "queue vector masked: {masked_irqs} interrupts, PBA {before:x?}; after 7 PBA writes \
             {after:x?}; unmasked: {} interrupt(s), PBA {cleared:x?}",
            delivered + late
        ),
    ))
}

/// Byte and half-word writes into live entries, quad-word writes, writes past the last
/// entry: the live entries must read back unchanged and keep working.
pub fn odd_accesses(b: &mut Blk) -> Result<Seen, String> {
    b.d.s.rearm_msix()?;
    b.start()?;
    let t = table(b)?;
    let live = [entry(b, &t, 0)?, entry(b, &t, 1)?];
    let bar = &b.d.s.bar0;
    for v in 0..2u16 {
        for byte in 0..16 {
            bar.write8(t.at(v, 0) + byte, 0xa5)?;
        }
        for half in 0..8 {
            bar.write16(t.at(v, 0) + 2 * half, 0x5a5a)?;
        }
    }
    let mut reads = 0u32;
    for off in 0..16 {
        reads += u32::from(bar.read8(t.at(0, 0) + off)?);
    }
    // A quad-word write to an unused entry (address low + high) is a valid access.
    let spare = t.count.saturating_sub(1).max(2);
    bar.write64(t.at(spare, 0), 0xffff_ffff_dea5_a000)?;
    let past = t.table + 16 * u64::from(t.count);
    let mut writes_past = 0;
    let mut at = past;
    while at + 4 <= t.table + 0x4000 && writes_past < 256 {
        bar.write32(at, 0xffff_ffff)?;
        at += 52;
        at &= !3;
        writes_past += 1;
    }
    let after = [entry(b, &t, 0)?, entry(b, &t, 1)?];
    let spare_entry = entry(b, &t, spare)?;
    let irqs = request(b, 5)?;
    let ok = after == live && irqs > 0;
    Ok(Seen::new(
        ok,
        format!(
            "32 byte and 16 half-word writes into the 2 live entries: {}; byte reads summed \
             {reads:#x}; quad-word write to entry {spare}: {spare_entry:x?}; {writes_past} writes \
             past the {}-entry table; queue vector then raised {irqs} interrupts",
            if after == live {
                "unchanged"
            } else {
                "CHANGED"
            },
            t.count
        ),
    ))
}
