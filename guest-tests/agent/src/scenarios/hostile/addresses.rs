//! Attacks with buffer addresses and lengths the victim virtio-blk must refuse:
//! lengths near 4 GiB, buffers at the end of RAM, past it and wrapping the address
//! space, buffers in the MMIO hole (the MSI doorbell, the ECAM window, device
//! registers).

use super::attack::Seen;
use super::blk::{Blk, MSI_DOORBELL, S_IOERR, T_IN, T_OUT};
use super::driver::Reaction;
use super::rings::{fire, line, unanswered};
use crate::scenarios::vfio::virtio::{DESC_F_NEXT, DESC_F_WRITE};

/// A request whose chain has `parts` `(addr, len, flags)` between a header (at slot 0
/// unless `hdr` overrides it) and a status byte (unless `status` overrides it).
fn shaped(
    b: &mut Blk,
    kind: u32,
    hdr: Option<(u64, u32)>,
    parts: &[(u64, u32, u16)],
    status: Option<u64>,
) -> Result<(Reaction, u8), String> {
    b.start()?;
    let h = b.header(0, kind, 0)?;
    let st_at = b.status_at(0)?;
    let (h, hlen) = hdr.unwrap_or((h, 16));
    b.desc(0, h, hlen, DESC_F_NEXT, 1)?;
    let mut i = 1;
    for &(addr, len, flags) in parts {
        b.desc(i, addr, len, flags | DESC_F_NEXT, i + 1)?;
        i += 1;
    }
    b.desc(i, status.unwrap_or(st_at), 1, DESC_F_WRITE, 0)?;
    fire(b, 0, 0)
}

/// A [`shaped`] request: name, type, header override, data parts, status override,
/// and whether IOERR (`true`) or an unanswered chain (`false`) is expected.
type Shape<'s> = (
    &'s str,
    u32,
    Option<(u64, u32)>,
    Vec<(u64, u32, u16)>,
    Option<u64>,
    bool,
);

/// Runs `cases` of [`shaped`] requests.
fn shaped_cases(b: &mut Blk, cases: Vec<Shape>) -> Result<Seen, String> {
    let mut ok = true;
    let mut seen = Vec::new();
    for (what, kind, hdr, parts, status, ioerr) in cases {
        let (r, st) = shaped(b, kind, hdr, &parts, status)?;
        let good = if ioerr {
            (r.elem.is_some() && st == S_IOERR) || r.needs_reset()
        } else {
            unanswered(&r, st) || (r.elem.is_some() && st == S_IOERR)
        };
        ok &= good;
        seen.push(line(what, &r, st));
    }
    Ok(Seen::new(ok, seen.join("; ")))
}

/// Lengths near 4 GiB: a data buffer of 0xfffff000 bytes (the chain still fits in
/// 32 bits: the device must refuse it), chains whose lengths add up past 2^32 (a
/// buffer of 0xffffffff, two of 2 GiB, a header of 0xfffffff0: virtio-queue cuts such
/// a chain short, so it comes back unanswered, or refused).
pub fn len_4gib(b: &mut Blk) -> Result<Seen, String> {
    let data = b.data(0);
    let hdr = b.d.at(0x5000);
    let w = DESC_F_WRITE;
    shaped_cases(
        b,
        vec![
            (
                "IN 0xfffff000",
                T_IN,
                None,
                vec![(data, 0xffff_f000, w)],
                None,
                true,
            ),
            (
                "OUT 0xfffff000",
                T_OUT,
                None,
                vec![(data, 0xffff_f000, 0)],
                None,
                true,
            ),
            (
                "IN 0xffffffff",
                T_IN,
                None,
                vec![(data, u32::MAX, w)],
                None,
                false,
            ),
            (
                "IN 2x 0x80000000",
                T_IN,
                None,
                vec![(data, 1 << 31, w), (data, 1 << 31, w)],
                None,
                false,
            ),
            (
                "header 0xfffffff0",
                T_IN,
                Some((hdr, 0xffff_fff0)),
                vec![(data, 512, w)],
                None,
                false,
            ),
        ],
    )
}

/// Buffers at the end of RAM, across it, far past it and wrapping the address space;
/// the status byte past RAM.
pub fn addr_beyond_ram(b: &mut Blk) -> Result<Seen, String> {
    let end = b.aim.ram_end;
    let w = DESC_F_WRITE;
    shaped_cases(
        b,
        vec![
            (
                "data at RAM end",
                T_IN,
                None,
                vec![(end, 512, w)],
                None,
                true,
            ),
            (
                "data across RAM end",
                T_IN,
                None,
                vec![(end - 256, 512, w)],
                None,
                true,
            ),
            (
                "data at 64 GiB",
                T_IN,
                None,
                vec![(64 << 30, 512, w)],
                None,
                true,
            ),
            (
                "data wrapping 2^64",
                T_IN,
                None,
                vec![(u64::MAX - 255, 512, w)],
                None,
                true,
            ),
            (
                "OUT from RAM end",
                T_OUT,
                None,
                vec![(end, 512, 0)],
                None,
                true,
            ),
            (
                "header at RAM end",
                T_IN,
                Some((end, 16)),
                vec![(b.data(0), 512, w)],
                None,
                true,
            ),
            (
                "status at RAM end",
                T_IN,
                None,
                vec![(b.data(0), 512, w)],
                Some(end),
                false,
            ),
        ],
    )
}

/// Buffers in the MMIO hole: the MSI doorbell (a DMA write there must not become an
/// interrupt), the ECAM window, the victim's own doorbells, another disk's registers.
pub fn addr_mmio_hole(b: &mut Blk) -> Result<Seen, String> {
    let a = b.aim;
    let w = DESC_F_WRITE;
    shaped_cases(
        b,
        vec![
            (
                "IN to the MSI doorbell",
                T_IN,
                None,
                vec![(MSI_DOORBELL, 512, w)],
                None,
                true,
            ),
            (
                "IN to the ECAM window",
                T_IN,
                None,
                vec![(a.ecam, 512, w)],
                None,
                true,
            ),
            (
                "IN to its own doorbells",
                T_IN,
                None,
                vec![(a.own_bar + 0x3000, 512, w)],
                None,
                true,
            ),
            (
                "OUT from the bystander's BAR",
                T_OUT,
                None,
                vec![(a.bystander_bar, 512, 0)],
                None,
                true,
            ),
            (
                "status at the MSI doorbell",
                T_IN,
                None,
                vec![(b.data(0), 512, w)],
                Some(MSI_DOORBELL),
                false,
            ),
        ],
    )
}
