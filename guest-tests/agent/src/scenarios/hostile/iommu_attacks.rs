//! Attacks on the virtio-iommu's requestq ([`Iommu`]): ATTACH, DETACH and PROBE of
//! endpoints that do not exist, MAPs that overlap or wrap, requests of every length
//! from 0 to 64 bytes, broken chains, an avail index that jumps.

use super::attack::Seen;
use super::iommu::*;
use crate::scenarios::vfio::virtio::{
    encode_desc, DESC_F_NEXT, DESC_F_WRITE, STATUS_DEVICE_NEEDS_RESET,
};

/// Runs `(name, request, expected status)` cases; `None` expects any refusal.
fn cases(io: &mut Iommu, list: Vec<(&str, Vec<u8>, Option<u8>)>) -> Result<Seen, String> {
    io.start()?;
    let mut ok = true;
    let mut seen = Vec::new();
    for (what, req, want) in list {
        let st = io.ask(&req)?;
        ok &= match want {
            Some(w) => st == Some(w),
            None => st.is_some_and(|s| s != S_OK),
        };
        seen.push(format!("{what}: {}", status_name(st)));
    }
    ok &= io.d.status()? & STATUS_DEVICE_NEEDS_RESET == 0;
    Ok(Seen::new(ok, seen.join(", ")))
}

/// ATTACH (and DETACH, PROBE) of endpoints that do not exist; bad domains and flags
/// for the real one.
pub fn attach_unknown(io: &mut Iommu) -> Result<Seen, String> {
    let ep = io.endpoint;
    let dom = io.domains.0.max(1);
    let mut list: Vec<(&str, Vec<u8>, Option<u8>)> = Vec::new();
    for (what, unknown) in [
        ("ATTACH ep 0", 0u32),
        ("ATTACH ep+1", ep + 1),
        ("ATTACH ep^0x100", ep ^ 0x100),
        ("ATTACH ep 0xffff", 0xffff),
        ("ATTACH ep 0x10000", 0x1_0000),
        ("ATTACH ep 2^32-1", u32::MAX),
    ] {
        if unknown != ep {
            list.push((what, attach(dom, unknown, 0), Some(S_NOENT)));
        }
    }
    list.push(("DETACH unknown ep", detach(dom, ep + 1), Some(S_NOENT)));
    list.push(("PROBE unknown ep", probe(ep + 1), Some(S_NOENT)));
    if io.domains.0 > 0 {
        list.push(("ATTACH to domain 0", attach(0, ep, 0), Some(S_RANGE)));
    }
    list.push((
        "ATTACH with BYPASS",
        attach(dom, ep, ATTACH_F_BYPASS),
        Some(S_INVAL),
    ));
    let mut reserved = attach(dom, ep, 0);
    reserved[16] = 1;
    list.push(("ATTACH reserved set", reserved, Some(S_INVAL)));
    list.push(("DETACH never attached", detach(dom, ep), None));
    cases(io, list)
}

/// MAPs that overlap a mapping, sit inside it, cover it, or cover the MSI window;
/// an UNMAP that would split a mapping. The first mapping must survive them all.
pub fn map_overlap(io: &mut Iommu) -> Result<Seen, String> {
    let (ep, dom) = (io.endpoint, io.domains.0.max(1) + 6);
    let m = |s: u64, e: u64| map(dom, s, e, 0x20_0000, MAP_RW);
    cases(
        io,
        vec![
            ("ATTACH", attach(dom, ep, 0), Some(S_OK)),
            ("MAP 1M-2M", m(0x10_0000, 0x1f_ffff), Some(S_OK)),
            ("MAP 1.5M-2.5M", m(0x18_0000, 0x27_ffff), None),
            ("MAP 1M-2M again", m(0x10_0000, 0x1f_ffff), None),
            ("MAP inside", m(0x1f_f000, 0x1f_ffff), None),
            ("MAP around", m(0, 0xff_ffff), None),
            ("MAP the MSI window", m(0xfee0_0000, 0xfeef_ffff), None),
            (
                "MAP across the MSI window",
                m(0xfe00_0000, 0xffff_ffff),
                None,
            ),
            ("UNMAP splitting", unmap(dom, 0x18_0000, 0x18_ffff), None),
            ("UNMAP 1M-2M", unmap(dom, 0x10_0000, 0x1f_ffff), Some(S_OK)),
            (
                "UNMAP it again",
                unmap(dom, 0x10_0000, 0x1f_ffff),
                Some(S_OK),
            ),
            ("DETACH", detach(dom, ep), Some(S_OK)),
        ],
    )
}

/// MAPs whose ranges wrap or leave the input range or the physical address space.
pub fn map_wrap(io: &mut Iommu) -> Result<Seen, String> {
    let (ep, dom) = (io.endpoint, io.domains.0.max(1) + 7);
    cases(
        io,
        vec![
            ("ATTACH", attach(dom, ep, 0), Some(S_OK)),
            (
                "MAP end < start",
                map(dom, 0xffff_ffff_ffff_f000, 0xfff, 0, MAP_RW),
                None,
            ),
            ("MAP to 2^64-1", map(dom, 0x1000, u64::MAX, 0, MAP_RW), None),
            ("MAP all of 2^64", map(dom, 0, u64::MAX, 0, MAP_RW), None),
            (
                "MAP phys wrapping",
                map(
                    dom,
                    0x10_0000,
                    0x1f_ffff,
                    0xffff_ffff_fff0_0000 + 0x1000,
                    MAP_RW,
                ),
                None,
            ),
            (
                "MAP past 2^48",
                map(dom, 0xffff_ffff_f000, 0x1_0000_0000_0fff, 0, MAP_RW),
                None,
            ),
            ("MAP unaligned", map(dom, 0x1001, 0x2000, 0, MAP_RW), None),
            ("MAP 1 byte", map(dom, 0x1000, 0x1000, 0, MAP_RW), None),
            ("MAP flags 0xff", map(dom, 0x1000, 0x1fff, 0, 0xff), None),
            (
                "MAP unknown domain",
                map(dom + 1000, 0x1000, 0x1fff, 0, MAP_RW),
                Some(S_NOENT),
            ),
            ("UNMAP end < start", unmap(dom, 0x2000, 0x1000), None),
            ("DETACH", detach(dom, ep), Some(S_OK)),
        ],
    )
}

/// Every device-readable length 0..=64 (with a 4-byte tail; the bytes are an ATTACH
/// of the real endpoint padded with zeros: only 20 is a request) and every
/// device-writable length 0..=64 after a well-formed ATTACH.
pub fn request_lengths(io: &mut Iommu) -> Result<Seen, String> {
    io.start()?;
    let (ep, dom) = (io.endpoint, io.domains.0.max(1) + 8);
    let mut full = attach(dom, ep, 0);
    full.resize(64, 0);
    let mut readable = Vec::new();
    let mut ok = true;
    for len in 0..=64usize {
        let (r, st) = io.request(&full[..len], 4)?;
        let want = if len == 20 { S_OK } else { S_INVAL };
        ok &= r.elem.is_some() && st == Some(want);
        readable.push(st);
    }
    let mut writable = Vec::new();
    for len in 0..=64u32 {
        let (r, st) = io.request(&attach(dom, ep, 0), len)?;
        ok &= match len {
            0..=3 => r.returned_empty(),
            4 => st == Some(S_OK),
            _ => st == Some(S_INVAL),
        };
        writable.push((r.elem.map(|e| e.len), st));
    }
    ok &= io.ask(&detach(dom, ep))? == Some(S_OK);
    // Statuses grouped: `NAME at LEN` for a single length, `NAME xCOUNT` otherwise.
    let summary = |v: &[Option<u8>], first: usize| {
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, s) in (first..).zip(v) {
            let name = status_name(*s);
            match groups.iter_mut().find(|(n, _)| *n == name) {
                Some((_, at)) => at.push(i),
                None => groups.push((name, vec![i])),
            }
        }
        groups
            .iter()
            .map(|(n, at)| {
                if at.len() == 1 {
                    format!("{n} at {}", at[0])
                } else {
                    format!("{n} x{}", at.len())
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let empty = writable.iter().filter(|(len, _)| *len == Some(0)).count();
    let w_status: Vec<Option<u8>> = writable.iter().map(|(_, s)| *s).collect();
    Ok(Seen::new(
        ok,
        format!(
            "readable 0..=64 bytes: {}; writable 0..=64 bytes: {empty} (0..=3) returned \
             empty, {}",
            summary(&readable, 0),
            summary(&w_status[4..], 4)
        ),
    ))
}

/// A descriptor: address, length, flags, next.
type Desc = (u64, u32, u16, u16);

/// Broken request chains: a loop, a device-readable descriptor after a writable one,
/// a loop inside an indirect table.
pub fn loop_chain(io: &mut Iommu) -> Result<Seen, String> {
    io.start()?;
    let req = attach(io.domains.0.max(1), io.endpoint, 0);
    io.d.s.mem.write(REQUEST, &req)?;
    let (rq, rp) = (io.d.at(REQUEST), io.d.at(REPLY));
    let mut seen = Vec::new();
    let mut ok = true;
    let shapes: [(&str, [Desc; 2]); 2] = [
        (
            "0->1->0",
            [
                (rq, 20, DESC_F_NEXT, 1),
                (rp, 4, DESC_F_WRITE | DESC_F_NEXT, 0),
            ],
        ),
        (
            "writable then readable",
            [(rp, 4, DESC_F_WRITE | DESC_F_NEXT, 1), (rq, 20, 0, 0)],
        ),
    ];
    for (what, descs) in shapes {
        for (i, &(addr, len, flags, next)) in (0u16..).zip(&descs) {
            io.queue()?.ring.desc(i, addr, len, flags, next)?;
        }
        let r = io.fire(0)?;
        ok &= r.returned_empty() || r.needs_reset();
        seen.push(format!("{what}: {}", r.describe()));
    }
    for (i, (addr, len, flags, next)) in [
        (rq, 20u32, DESC_F_NEXT, 1u16),
        (rp, 4, DESC_F_WRITE | DESC_F_NEXT, 0),
    ]
    .into_iter()
    .enumerate()
    {
        io.d.s
            .mem
            .write(INDIRECT + 16 * i, &encode_desc(addr, len, flags, next))?;
    }
    io.queue()?
        .ring
        .desc(0, io.d.at(INDIRECT), 32, super::rings::DESC_F_INDIRECT, 0)?;
    let r = io.fire(0)?;
    ok &= r.returned_empty() || r.needs_reset();
    seen.push(format!("indirect 0->1->0: {}", r.describe()));
    Ok(Seen::new(ok, seen.join("; ")))
}

/// The requestq's avail index moved by more than the queue size.
pub fn avail_idx_jump(io: &mut Iommu) -> Result<Seen, String> {
    io.start()?;
    let q = io.queue()?;
    let size = q.ring.size();
    io.d.s
        .mem
        .write(REQUEST, &attach(io.domains.0.max(1), io.endpoint, 0))?;
    q.ring.desc(0, io.d.at(REQUEST), 20, DESC_F_NEXT, 1)?;
    q.ring.desc(1, io.d.at(REPLY), 4, DESC_F_WRITE, 0)?;
    io.d.s.mem.write(REQ.avail + 4, &0u16.to_le_bytes())?;
    io.d.s.mem.write(REQ.avail + 2, &(size + 1).to_le_bytes())?;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    io.d.kick(&q.info)?;
    let r = io.d.watch(&q.ring, 0, 0, REACT);
    Ok(Seen::new(
        r.needs_reset(),
        format!(
            "requestq avail idx 0 -> {} (queue {size}): {}",
            size + 1,
            r.describe()
        ),
    ))
}
