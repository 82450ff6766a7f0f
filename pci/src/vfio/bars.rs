//! The BARs of a passed-through function: what the guest sees (sizes from the VFIO
//! regions, type bits from the device), which parts are mmap-ed for direct guest
//! access (the host's mmap areas minus the pages of the MSI-X table and PBA), and the
//! bounded trapped accesses to the rest.

use tracing::{debug, warn};

use super::interrupts::MsixLayout;
use super::ops::{MmapArea, RegionInfo, VfioOps};
use super::{PAGE_SIZE, REGION_WRITE};
use crate::bar::{BAR_MEM_PREFETCH, NUM_BARS};
use crate::config::BAR0;
use crate::{BarInfo, BarKind, DirectArea};

/// One memory BAR of the device.
#[derive(Debug)]
pub(crate) struct PassBar {
    pub info: BarInfo,
    /// A 32-bit BAR the device marks prefetchable (`BarKind::Mmio32` cannot say it).
    pub prefetch32: bool,
    pub region: RegionInfo,
    /// The mmap-ed parts, kept alive while the BAR exists.
    direct: Vec<(DirectArea, MmapArea)>,
}

/// The memory BARs of the device from its BAR registers and VFIO regions. I/O-port
/// BARs are left out (the guest sees them as absent).
pub(crate) fn discover(ops: &dyn VfioOps, device_cfg: &[u8]) -> Vec<PassBar> {
    let reg = |i: u8| {
        let at = usize::from(BAR0) + 4 * usize::from(i);
        device_cfg
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut bars = Vec::new();
    let mut i = 0u8;
    while i < NUM_BARS {
        let value = reg(i);
        let Some(region) = ops.region(u32::from(i)).filter(|r| r.size > 0) else {
            i += 1;
            continue;
        };
        if value & 1 != 0 {
            debug!(
                bar = i,
                size = region.size,
                "I/O-port BAR hidden from the guest (not supported)"
            );
            i += 1;
            continue;
        }
        let wide = value & 0b110 == 0b100;
        if wide && i + 1 >= NUM_BARS {
            warn!(bar = i, "64-bit BAR in the last register: hidden");
            break;
        }
        let prefetch = value & BAR_MEM_PREFETCH != 0;
        let size = region
            .size
            .checked_next_power_of_two()
            .unwrap_or(0)
            .max(crate::bar::MIN_BAR_SIZE);
        let kind = if wide {
            BarKind::Mmio64 {
                prefetchable: prefetch,
            }
        } else {
            BarKind::Mmio32
        };
        bars.push(PassBar {
            info: BarInfo {
                index: i,
                kind,
                size,
            },
            prefetch32: !wide && prefetch,
            region,
            direct: Vec::new(),
        });
        i += if wide { 2 } else { 1 };
    }
    bars
}

/// `[start, end)` minus `[cut_start, cut_end)`.
fn subtract(pieces: Vec<(u64, u64)>, cut_start: u64, cut_end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (s, e) in pieces {
        if cut_end <= s || cut_start >= e {
            out.push((s, e));
            continue;
        }
        if s < cut_start {
            out.push((s, cut_start));
        }
        if cut_end < e {
            out.push((cut_end, e));
        }
    }
    out
}

/// The page-aligned parts of BAR `index` that can be mapped straight into the guest:
/// the host's mmap areas (clipped to the region) minus the pages holding the device's
/// MSI-X table and PBA, as `(offset, size)`.
pub(crate) fn direct_layout(
    region: &RegionInfo,
    index: u8,
    msix: Option<&MsixLayout>,
) -> Vec<(u64, u64)> {
    let mut pieces: Vec<(u64, u64)> = region
        .mmap_areas
        .iter()
        .filter_map(|&(off, size)| {
            let end = off.checked_add(size)?.min(region.size);
            (off < end).then_some((off, end))
        })
        .collect();
    if let Some(m) = msix {
        for (bar, off, size) in [
            (m.table_bar, m.table_offset, m.table_size),
            (m.pba_bar, m.pba_offset, m.pba_size),
        ] {
            if bar != index || size == 0 {
                continue;
            }
            let start = off & !(PAGE_SIZE - 1);
            let end = off.saturating_add(size).saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
            pieces = subtract(pieces, start, end);
        }
    }
    pieces
        .into_iter()
        .filter_map(|(s, e)| {
            let s = s.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
            let e = e & !(PAGE_SIZE - 1);
            (s < e).then_some((s, e - s))
        })
        .collect()
}

impl PassBar {
    /// Maps the direct parts of this BAR (a part that fails to map stays trapped).
    pub(crate) fn map_direct(&mut self, ops: &dyn VfioOps, msix: Option<&MsixLayout>) {
        for (offset, size) in direct_layout(&self.region, self.info.index, msix) {
            match ops.mmap(self.region.index, offset, size) {
                Ok(area) => {
                    let direct = DirectArea {
                        offset,
                        size,
                        host_addr: area.as_ptr() as u64,
                    };
                    self.direct.push((direct, area));
                }
                Err(e) => warn!(
                    bar = self.info.index,
                    offset,
                    size,
                    error = %e,
                    "mmap of a BAR area failed: its accesses are trapped"
                ),
            }
        }
        debug!(
            bar = self.info.index,
            areas = self.direct.len(),
            "BAR direct areas mapped"
        );
    }

    pub(crate) fn direct_areas(&self) -> Vec<DirectArea> {
        self.direct.iter().map(|(d, _)| *d).collect()
    }

    /// Drops the mappings (the VMM removed its memory slots first).
    pub(crate) fn unmap_direct(&mut self) {
        self.direct.clear();
    }

    /// Whether `len` bytes at `offset` lie inside the VFIO region.
    fn in_region(&self, offset: u64, len: usize) -> bool {
        len > 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.region.size)
    }

    /// Trapped read: the region's bytes; all-ones past the end of the region (no call
    /// to VFIO).
    pub(crate) fn read(&self, ops: &dyn VfioOps, offset: u64, data: &mut [u8]) {
        if self.in_region(offset, data.len()) {
            ops.read(self.region.index, offset, data);
        } else {
            debug!(
                bar = self.info.index,
                offset,
                len = data.len(),
                "BAR read past the region: all-ones"
            );
            data.fill(0xff);
        }
    }

    /// Trapped write: to the region; dropped past its end or if it is read-only.
    pub(crate) fn write(&self, ops: &dyn VfioOps, offset: u64, data: &[u8]) {
        if self.in_region(offset, data.len()) && self.region.flags & REGION_WRITE != 0 {
            ops.write(self.region.index, offset, data);
        } else {
            debug!(
                bar = self.info.index,
                offset,
                len = data.len(),
                "BAR write past the region ignored"
            );
        }
    }
}
