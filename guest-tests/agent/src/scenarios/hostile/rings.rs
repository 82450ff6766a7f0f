//! Attacks on the split ring itself, aimed at the victim virtio-blk: descriptor chains
//! that loop (directly and inside indirect tables), indirect tables in indirect tables,
//! chains longer than the queue, 4 GiB lengths, buffers past RAM and in the MMIO hole,
//! rings in the MMIO hole, an avail index that jumps, a used ring over the descriptor
//! table. Each returns what the device did with the chain.

use super::attack::Seen;
use super::blk::{
    status_name, Blk, INDIRECT, MSI_DOORBELL, RING, S_IOERR, S_OK, T_IN, T_OUT, UNTOUCHED,
};
use super::driver::Reaction;
use crate::scenarios::vfio::virtio::{DESC_F_NEXT, DESC_F_WRITE, STATUS_DEVICE_NEEDS_RESET};

/// VIRTQ_DESC_F_INDIRECT.
pub const DESC_F_INDIRECT: u16 = 4;

/// Writes entry `i` of indirect table `table` (0 or 1).
fn indirect(
    b: &Blk,
    table: usize,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), String> {
    let d = crate::scenarios::vfio::virtio::encode_desc(addr, len, flags, next);
    b.d.s.mem.write(INDIRECT[table] + 16 * usize::from(i), &d)
}

/// Publishes chain `head`, waits; returns the reaction and status byte `slot`.
pub fn fire(b: &mut Blk, head: u16, slot: usize) -> Result<(Reaction, u8), String> {
    let since = b.publish(head)?;
    let r = b.watch(since, head)?;
    Ok((r, b.status_of(slot)?))
}

/// A chain without a usable status byte must come back unanswered (used length 0,
/// status untouched), or the device must ask for a reset.
pub fn unanswered(r: &Reaction, st: u8) -> bool {
    (r.returned_empty() && st == UNTOUCHED) || r.needs_reset()
}

pub fn line(what: &str, r: &Reaction, st: u8) -> String {
    format!("{what}: {} status {}", r.describe(), status_name(st))
}

/// A header, a data buffer and a status byte looping back: 0 -> 1 -> 0, and
/// 0 -> 1 -> 2 -> 1.
pub fn loop_direct(b: &mut Blk) -> Result<Seen, String> {
    b.start()?;
    let hdr = b.header(0, T_IN, 0)?;
    b.status_at(0)?;
    b.desc(0, hdr, 16, DESC_F_NEXT, 1)?;
    b.desc(1, b.data(0), 512, DESC_F_WRITE | DESC_F_NEXT, 0)?;
    let (r1, s1) = fire(b, 0, 0)?;
    b.start()?;
    let (hdr, st_at) = (b.header(0, T_IN, 0)?, b.status_at(0)?);
    b.desc(0, hdr, 16, DESC_F_NEXT, 1)?;
    b.desc(1, b.data(0), 512, DESC_F_WRITE | DESC_F_NEXT, 2)?;
    b.desc(2, st_at, 1, DESC_F_WRITE | DESC_F_NEXT, 1)?;
    let (r2, s2) = fire(b, 0, 0)?;
    Ok(Seen::new(
        unanswered(&r1, s1) && unanswered(&r2, s2),
        format!(
            "{}; {}",
            line("0->1->0", &r1, s1),
            line("0->1->2->1", &r2, s2)
        ),
    ))
}

/// Loops inside an indirect table: entry 0 -> 1 -> 2 -> 0, and an entry naming itself.
pub fn loop_indirect(b: &mut Blk) -> Result<Seen, String> {
    b.start()?;
    let (hdr, st_at) = (b.header(0, T_IN, 0)?, b.status_at(0)?);
    indirect(b, 0, 0, hdr, 16, DESC_F_NEXT, 1)?;
    indirect(b, 0, 1, b.data(0), 512, DESC_F_WRITE | DESC_F_NEXT, 2)?;
    indirect(b, 0, 2, st_at, 1, DESC_F_WRITE | DESC_F_NEXT, 0)?;
    b.desc(0, b.d.at(INDIRECT[0]), 3 * 16, DESC_F_INDIRECT, 0)?;
    let (r1, s1) = fire(b, 0, 0)?;
    b.start()?;
    let hdr = b.header(0, T_IN, 0)?;
    b.status_at(0)?;
    indirect(b, 0, 0, hdr, 16, DESC_F_NEXT, 0)?;
    b.desc(0, b.d.at(INDIRECT[0]), 16, DESC_F_INDIRECT, 0)?;
    let (r2, s2) = fire(b, 0, 0)?;
    Ok(Seen::new(
        unanswered(&r1, s1) && unanswered(&r2, s2),
        format!(
            "{}; {}",
            line("table 0->1->2->0", &r1, s1),
            line("entry 0 -> itself", &r2, s2)
        ),
    ))
}

/// An indirect descriptor inside an indirect table (forbidden), an indirect table
/// whose length is not a multiple of 16, and an empty one.
pub fn indirect_in_indirect(b: &mut Blk) -> Result<Seen, String> {
    b.start()?;
    let (hdr, st_at) = (b.header(0, T_IN, 0)?, b.status_at(0)?);
    // Table 1 holds a good request; table 0 points to it.
    indirect(b, 1, 0, hdr, 16, DESC_F_NEXT, 1)?;
    indirect(b, 1, 1, b.data(0), 512, DESC_F_WRITE | DESC_F_NEXT, 2)?;
    indirect(b, 1, 2, st_at, 1, DESC_F_WRITE, 0)?;
    indirect(b, 0, 0, b.d.at(INDIRECT[1]), 3 * 16, DESC_F_INDIRECT, 0)?;
    b.desc(0, b.d.at(INDIRECT[0]), 16, DESC_F_INDIRECT, 0)?;
    let (r1, s1) = fire(b, 0, 0)?;
    let mut seen = vec![line("nested table", &r1, s1)];
    let mut ok = unanswered(&r1, s1);
    for (what, len) in [("table of 17 bytes", 17u32), ("table of 0 bytes", 0)] {
        b.start()?;
        b.header(0, T_IN, 0)?;
        b.status_at(0)?;
        b.desc(0, b.d.at(INDIRECT[1]), len, DESC_F_INDIRECT, 0)?;
        let (r, s) = fire(b, 0, 0)?;
        ok &= unanswered(&r, s);
        seen.push(line(what, &r, s));
    }
    Ok(Seen::new(ok, seen.join("; ")))
}

/// Every descriptor of the queue chained, the last pointing past the table; and an
/// indirect table four times the queue size holding one request.
pub fn chain_longer_than_queue(b: &mut Blk) -> Result<Seen, String> {
    b.start()?;
    let size = b.size()?;
    let hdr = b.header(0, T_IN, 0)?;
    b.status_at(0)?;
    b.desc(0, hdr, 16, DESC_F_NEXT, 1)?;
    for i in 1..size {
        b.desc(
            i,
            b.data(0) + 512 * u64::from(i),
            512,
            DESC_F_WRITE | DESC_F_NEXT,
            i + 1,
        )?;
    }
    let (r1, s1) = fire(b, 0, 0)?;
    b.start()?;
    let n = 4 * size;
    let (hdr, st_at) = (b.header(0, T_IN, 0)?, b.status_at(0)?);
    indirect(b, 0, 0, hdr, 16, DESC_F_NEXT, 1)?;
    for i in 1..n - 1 {
        indirect(
            b,
            0,
            i,
            b.data(0) + 512 * u64::from(i),
            512,
            DESC_F_WRITE | DESC_F_NEXT,
            i + 1,
        )?;
    }
    indirect(b, 0, n - 1, st_at, 1, DESC_F_WRITE, 0)?;
    b.desc(
        0,
        b.d.at(INDIRECT[0]),
        16 * u32::from(n),
        DESC_F_INDIRECT,
        0,
    )?;
    let (r2, s2) = fire(b, 0, 0)?;
    // Served or refused, but answered.
    let ok2 = r2.elem.is_some() && (s2 == S_OK || s2 == S_IOERR) || r2.needs_reset();
    Ok(Seen::new(
        unanswered(&r1, s1) && ok2,
        format!(
            "{}; {}",
            line(&format!("{size} descriptors, last -> {size}"), &r1, s1),
            line(&format!("indirect table of {n} ({} data)", n - 2), &r2, s2)
        ),
    ))
}

/// Queues whose rings are in the MMIO hole or past RAM: DRIVER_OK must end in
/// DEVICE_NEEDS_RESET (and a configuration interrupt), never in a running queue.
pub fn ring_in_mmio_hole(b: &mut Blk) -> Result<Seen, String> {
    let a = b.aim;
    let (desc, avail, used) = (b.d.at(RING.desc), b.d.at(RING.avail), b.d.at(RING.used));
    let cases = [
        (
            "descriptors at the MSI doorbell",
            [MSI_DOORBELL, avail, used],
        ),
        ("avail ring past RAM", [desc, a.ram_end, used]),
        ("used ring in the ECAM window", [desc, avail, a.ecam]),
        ("used ring in its own BAR", [desc, avail, a.own_bar]),
    ];
    let mut ok = true;
    let mut seen = Vec::new();
    for (what, iovas) in cases {
        b.q = None;
        let size = b.queue_size()?;
        b.d.setup(
            super::blk::F_INDIRECT_DESC | crate::scenarios::vfio::virtio::F_VERSION_1,
            &[],
        )?;
        b.d.t.setup_queue(0, size, 0, iovas)?;
        let status = b.d.t.driver_ok()?;
        let (_, cfg_irqs) = b.d.s.irqs.poll(200)?;
        let needs_reset = status & STATUS_DEVICE_NEEDS_RESET != 0;
        ok &= needs_reset;
        seen.push(format!(
            "{what}: status {status:#04x}, config irqs {cfg_irqs}"
        ));
    }
    Ok(Seen::new(ok, seen.join("; ")))
}

/// A chain published with the avail index moved by more than the queue size.
pub fn avail_idx_jump(b: &mut Blk) -> Result<Seen, String> {
    let mut seen = Vec::new();
    let mut ok = true;
    for jump in [0u16, 0x8000] {
        b.start()?;
        let size = b.size()?;
        let idx = if jump == 0 { size + 5 } else { jump };
        let hdr = b.header(0, T_IN, 0)?;
        let st_at = b.status_at(0)?;
        b.desc(0, hdr, 16, DESC_F_NEXT, 1)?;
        b.desc(1, b.data(0), 512, DESC_F_WRITE | DESC_F_NEXT, 2)?;
        b.desc(2, st_at, 1, DESC_F_WRITE, 0)?;
        b.d.s.mem.write(RING.avail + 4, &0u16.to_le_bytes())?;
        b.d.s.mem.write(RING.avail + 2, &idx.to_le_bytes())?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        b.d.kick(&b.queue()?.info)?;
        let r = b.watch(0, 0)?;
        ok &= r.needs_reset();
        seen.push(format!(
            "avail idx 0 -> {idx} (queue {size}): {}",
            r.describe()
        ));
    }
    Ok(Seen::new(ok, seen.join("; ")))
}

/// The used ring at the descriptor table's address: the device's used-ring writes
/// land on the descriptors it reads (the first request's own descriptors, then the
/// ones after them). It must answer somehow (or ask for a reset), not hang or crash.
pub fn used_over_desc(b: &mut Blk) -> Result<Seen, String> {
    b.q = None;
    let size = b.queue_size()?;
    let desc = b.d.at(RING.desc);
    let mem = &b.d.s.mem;
    // Nothing left from earlier attacks: an empty ring before DRIVER_OK.
    mem.write(RING.desc, &vec![0; 16 * usize::from(size)])?;
    mem.write(RING.avail, &[0; 4])?;
    b.d.setup(
        super::blk::F_INDIRECT_DESC | crate::scenarios::vfio::virtio::F_VERSION_1,
        &[],
    )?;
    let info =
        b.d.t
            .setup_queue(0, size, 0, [desc, b.d.at(RING.avail), desc])?;
    let status = b.d.t.driver_ok()?;
    let mut seen = Vec::new();
    let mut answered = 0;
    for (n, kind) in [T_OUT, T_IN].into_iter().enumerate() {
        let head = 4 * n as u16;
        let hdr = b.header(n, kind, 8)?;
        let st_at = b.status_at(n)?;
        let d = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let e = crate::scenarios::vfio::virtio::encode_desc(addr, len, flags, next);
            mem.write(RING.desc + 16 * usize::from(i), &e)
        };
        let flags = if kind == T_IN { DESC_F_WRITE } else { 0 };
        d(head, hdr, 16, DESC_F_NEXT, head + 1)?;
        d(head + 1, b.data(n), 512, flags | DESC_F_NEXT, head + 2)?;
        d(head + 2, st_at, 1, DESC_F_WRITE, 0)?;
        mem.write(RING.avail + 4 + 2 * n, &head.to_le_bytes())?;
        let before = mem.read_u16(RING.desc + 2)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write(RING.avail + 2, &(n as u16 + 1).to_le_bytes())?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        b.d.kick(&info)?;
        let deadline = std::time::Instant::now() + super::blk::REACT;
        let mut st = b.d.status()?;
        let mut used = before;
        while std::time::Instant::now() < deadline {
            used = mem.read_u16(RING.desc + 2)?;
            st = b.d.status()?;
            if used != before || st & STATUS_DEVICE_NEEDS_RESET != 0 {
                break;
            }
            b.d.s.irqs.poll(10)?;
        }
        let moved = used != before || st & STATUS_DEVICE_NEEDS_RESET != 0;
        answered += u32::from(moved);
        seen.push(format!(
            "{} at descriptor {head}: used idx (over descriptor 0) {before} -> {used}, \
             status byte {}, device status {st:#04x}",
            if kind == T_IN { "IN" } else { "OUT" },
            status_name(b.status_of(n)?)
        ));
        if st & STATUS_DEVICE_NEEDS_RESET != 0 {
            break;
        }
    }
    Ok(Seen::new(
        answered > 0,
        format!("DRIVER_OK status {status:#04x}; {}", seen.join("; ")),
    ))
}
