//! Parsing for the `vfio-in-guest` scenario, pure functions over bytes (unit-tested on
//! the host): a PCI function's capability list, its virtio-pci vendor capabilities
//! and MSI-X capability, and the IOVA-range capability of `VFIO_IOMMU_GET_INFO`.
//! Everything read from the device is bounds-checked: a bad pointer ends the walk.

use super::uapi::{CAP_HEADER_LEN, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE};

pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_MSIX: u8 = 0x11;
/// Status register bit: the function has a capability list.
const STATUS_CAP_LIST: u16 = 1 << 4;
const CAP_POINTER: usize = 0x34;
/// At most this many capabilities (48 fit in 192 bytes): a loop ends the walk.
const MAX_CAPS: usize = 48;

/// The command register and its memory-decoding and bus-master bits.
pub const PCI_COMMAND: u64 = 0x04;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_MASTER: u16 = 1 << 2;

/// virtio-pci `cfg_type`s (virtio 1.2, 4.1.4).
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

pub fn u16_at(b: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(offset..offset + 2)?.try_into().ok()?,
    ))
}

pub fn u32_at(b: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

pub fn u64_at(b: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(offset..offset + 8)?.try_into().ok()?,
    ))
}

/// `(offset, id)` of every standard capability, in list order.
pub fn capabilities(cfg: &[u8]) -> Vec<(usize, u8)> {
    let mut caps = Vec::new();
    if u16_at(cfg, 0x06).is_none_or(|status| status & STATUS_CAP_LIST == 0) {
        return caps;
    }
    let mut next = cfg.get(CAP_POINTER).copied().unwrap_or(0) as usize & !3;
    while (0x40..0x100).contains(&next) && caps.len() < MAX_CAPS {
        let (Some(&id), Some(&ptr)) = (cfg.get(next), cfg.get(next + 1)) else {
            break;
        };
        caps.push((next, id));
        next = ptr as usize & !3;
    }
    caps
}

/// A virtio-pci vendor capability: where one structure lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCap {
    pub cfg_type: u8,
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
    /// Notify capability only (0 otherwise).
    pub notify_off_multiplier: u32,
}

/// Every well-formed virtio-pci capability (`cap_len` >= 16, 20 for notify).
pub fn virtio_caps(cfg: &[u8]) -> Vec<VirtioCap> {
    capabilities(cfg)
        .into_iter()
        .filter(|&(_, id)| id == CAP_ID_VENDOR)
        .filter_map(|(at, _)| {
            let len = *cfg.get(at + 2)? as usize;
            let cfg_type = *cfg.get(at + 3)?;
            if len < 16 || (cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG && len < 20) {
                return None;
            }
            Some(VirtioCap {
                cfg_type,
                bar: *cfg.get(at + 4)?,
                offset: u32_at(cfg, at + 8)?,
                length: u32_at(cfg, at + 12)?,
                notify_off_multiplier: if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG {
                    u32_at(cfg, at + 16)?
                } else {
                    0
                },
            })
        })
        .collect()
}

/// The first virtio capability of `cfg_type` that names a BAR (0-5), as a driver
/// picks it.
pub fn virtio_cap(cfg: &[u8], cfg_type: u8) -> Option<VirtioCap> {
    virtio_caps(cfg)
        .into_iter()
        .find(|c| c.cfg_type == cfg_type && c.bar < 6)
}

/// The MSI-X capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msix {
    pub offset: usize,
    /// Number of table entries.
    pub table_size: u16,
    pub enabled: bool,
    pub table_bar: u8,
    pub table_offset: u32,
}

pub fn msix(cfg: &[u8]) -> Option<Msix> {
    let (at, _) = capabilities(cfg)
        .into_iter()
        .find(|&(_, id)| id == CAP_ID_MSIX)?;
    let control = u16_at(cfg, at + 2)?;
    let table = u32_at(cfg, at + 4)?;
    Some(Msix {
        offset: at,
        table_size: (control & 0x7ff) + 1,
        enabled: control & 0x8000 != 0,
        table_bar: (table & 7) as u8,
        table_offset: table & !7,
    })
}

/// The IOVA ranges (inclusive ends) in the capability chain of a
/// `vfio_iommu_type1_info` buffer, whose first capability is at `cap_offset`.
pub fn parse_iova_ranges(buf: &[u8], cap_offset: usize) -> Result<Vec<(u64, u64)>, String> {
    let mut at = cap_offset;
    let mut seen = 0;
    while at != 0 {
        seen += 1;
        if seen > 16 {
            return Err("capability chain loops".into());
        }
        let bad = || format!("capability at {at} outside the {}-byte info", buf.len());
        let id = u16_at(buf, at).ok_or_else(bad)?;
        let next = u32_at(buf, at + 4).ok_or_else(bad)? as usize;
        if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let body = at + CAP_HEADER_LEN;
            let count = u32_at(buf, body).ok_or_else(bad)? as usize;
            let mut ranges = Vec::new();
            for i in 0..count.min(64) {
                let r = body + 8 + 16 * i;
                let start = u64_at(buf, r).ok_or_else(bad)?;
                let end = u64_at(buf, r + 8).ok_or_else(bad)?;
                ranges.push((start, end));
            }
            return Ok(ranges);
        }
        if next != 0 && next <= at {
            return Err(format!("capability at {at} points back to {next}"));
        }
        at = next;
    }
    Err("no IOVA-range capability".into())
}

/// The lowest `align`-aligned IOVA at or above one of `candidates` (tried in order)
/// where `len` bytes fit inside one of `ranges`.
pub fn pick_iova(ranges: &[(u64, u64)], candidates: &[u64], len: u64, align: u64) -> Option<u64> {
    candidates.iter().find_map(|&want| {
        ranges.iter().find_map(|&(start, end)| {
            let base = want.max(start).checked_next_multiple_of(align)?;
            let last = base.checked_add(len - 1)?;
            (base >= want && last <= end).then_some(base)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config space with: status cap-list bit, MSI-X at 0x40 (8 entries, BAR 0 at
    /// 0x8000), virtio common cfg at 0x50 (BAR 4, 0x0), notify at 0x60 (BAR 4,
    /// 0x3000, multiplier 4), a short vendor cap at 0x78.
    fn sample() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0x06] = 0x10;
        c[0x34] = 0x40;
        c[0x40..0x4c].copy_from_slice(&[0x11, 0x50, 7, 0x80, 0x00, 0x80, 0, 0, 0, 0x90, 0, 0]);
        c[0x50..0x60].copy_from_slice(&[9, 0x60, 16, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]);
        c[0x60..0x74].copy_from_slice(&[
            9, 0x78, 20, 2, 4, 0, 0, 0, 0, 0x30, 0, 0, 0, 0x10, 0, 0, 4, 0, 0, 0,
        ]);
        c[0x78..0x7c].copy_from_slice(&[9, 0x00, 8, 3]);
        c
    }

    #[test]
    fn walks_capabilities_and_finds_virtio_structures() {
        let cfg = sample();
        assert_eq!(
            capabilities(&cfg),
            vec![(0x40, 0x11), (0x50, 9), (0x60, 9), (0x78, 9)]
        );
        let common = virtio_cap(&cfg, VIRTIO_PCI_CAP_COMMON_CFG).unwrap();
        assert_eq!((common.bar, common.offset, common.length), (4, 0, 0x1000));
        let notify = virtio_cap(&cfg, VIRTIO_PCI_CAP_NOTIFY_CFG).unwrap();
        assert_eq!((notify.offset, notify.notify_off_multiplier), (0x3000, 4));
        assert_eq!(virtio_caps(&cfg).len(), 2, "the short cap is skipped");
        assert!(virtio_cap(&cfg, VIRTIO_PCI_CAP_DEVICE_CFG).is_none());
        let m = msix(&cfg).unwrap();
        assert_eq!(
            m,
            Msix {
                offset: 0x40,
                table_size: 8,
                enabled: true,
                table_bar: 0,
                table_offset: 0x8000
            }
        );
    }

    #[test]
    fn hostile_lists_end_the_walk() {
        let mut cfg = sample();
        cfg[0x79] = 0x40; // loops back to the first capability
        assert_eq!(capabilities(&cfg).len(), MAX_CAPS);
        cfg[0x34] = 0x20; // points into the header
        assert!(capabilities(&cfg).is_empty());
        let mut short = sample();
        short.truncate(0x64);
        assert_eq!(capabilities(&short).len(), 3);
        assert!(virtio_cap(&short, VIRTIO_PCI_CAP_NOTIFY_CFG).is_none());
        let mut no_list = sample();
        no_list[0x06] = 0;
        assert!(capabilities(&no_list).is_empty());
    }

    fn info_with_caps(caps: &[Vec<u8>]) -> (Vec<u8>, usize) {
        let mut buf = vec![0u8; 24];
        let first = buf.len();
        for (i, cap) in caps.iter().enumerate() {
            let at = buf.len();
            let mut cap = cap.clone();
            let next = if i + 1 < caps.len() {
                at + cap.len()
            } else {
                0
            };
            cap[4..8].copy_from_slice(&(next as u32).to_le_bytes());
            buf.extend_from_slice(&cap);
        }
        (buf, first)
    }

    #[test]
    fn iova_ranges_from_the_capability_chain() {
        let dma_avail = vec![3, 0, 1, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
        let mut ranges = vec![1, 0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        for v in [0u64, 0xfedf_ffff, 0xfef0_0000, 0xffff_ffff_ffff] {
            ranges.extend_from_slice(&v.to_le_bytes());
        }
        let (buf, first) = info_with_caps(&[dma_avail, ranges]);
        let got = parse_iova_ranges(&buf, first).unwrap();
        assert_eq!(got, vec![(0, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff_ffff)]);
        assert!(parse_iova_ranges(&buf[..buf.len() - 4], first).is_err());
        assert!(parse_iova_ranges(&buf[..24], 0).is_err());
        assert_eq!(
            pick_iova(&got, &[8 << 30, 1 << 20], 0x10000, 0x10000),
            Some(8 << 30)
        );
        let low = [(0x1000u64, 0xfedf_ffffu64)];
        assert_eq!(
            pick_iova(&low, &[8 << 30, 1 << 20], 0x10000, 0x10000),
            Some(1 << 20)
        );
        assert_eq!(pick_iova(&low, &[8 << 30], 0x10000, 0x10000), None);
    }
}
