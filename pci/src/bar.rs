//! Memory BARs of a type-0 function and their decoding state.
//!
//! A BAR is declared with [`ConfigSpace::add_bar`]; its registers then live in the
//! configuration space with a write mask of `!(size - 1)` on the address bits, so the
//! sizing protocol needs no special case: the guest writes all-ones and reads back
//! `!(size - 1)` with the read-only type bits (a 64-bit BAR's upper register likewise).
//!
//! The **decoded mapping** of a BAR is `Some(address)` while the command register's
//! memory space bit is set and the address is not 0 (0 = not assigned), `None`
//! otherwise. Every guest write through [`ConfigSpace::write`] that changes it (an
//! address write while decoding, including the intermediate address after the first
//! half of a 64-bit BAR is written, or a memory space enable/disable) yields one
//! [`BarMapping`] with the old and new decoded addresses.

use crate::config::{ConfigSpace, BAR0};
use crate::{BarInfo, BarKind, BarMapping};

/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: u8 = 6;
/// Smallest BAR size this crate accepts (one page).
pub const MIN_BAR_SIZE: u64 = 0x1000;
/// BAR type bits: 64-bit memory BAR.
pub const BAR_MEM_TYPE_64: u32 = 0b10 << 1;
/// BAR type bits: prefetchable.
pub const BAR_MEM_PREFETCH: u32 = 1 << 3;

/// Errors of BAR declaration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarError {
    /// The index is not 0..6 (0..5 for a 64-bit BAR).
    #[error("BAR index {0} out of range")]
    InvalidIndex(u8),
    /// The size is not a power of two of at least 4 KiB (at most 2 GiB for 32-bit).
    #[error("invalid BAR size {0:#x}")]
    InvalidSize(u64),
    /// A register the BAR needs is used by another BAR.
    #[error("BAR register {0} already in use")]
    InUse(u8),
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    info: BarInfo,
    /// The decoded mapping last reported.
    mapped: Option<u64>,
}

/// The BARs of one function (kept inside [`ConfigSpace`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Bars {
    bars: [Option<Bar>; NUM_BARS as usize],
}

impl Bars {
    /// Whether register `reg` is used by a declared BAR (either half of a 64-bit one).
    fn register_used(&self, reg: u8) -> bool {
        self.bars.iter().flatten().any(|b| {
            b.info.index == reg
                || (matches!(b.info.kind, BarKind::Mmio64 { .. }) && b.info.index + 1 == reg)
        })
    }

    fn get(&self, index: u8) -> Option<&Bar> {
        self.bars.get(index as usize).and_then(|b| b.as_ref())
    }
}

fn is_64(kind: BarKind) -> bool {
    matches!(kind, BarKind::Mmio64 { .. })
}

fn bar_reg(index: u8) -> u16 {
    BAR0 + 4 * u16::from(index)
}

impl ConfigSpace {
    /// Declares a memory BAR: writes its type bits and makes its address bits
    /// guest-writable. The BAR starts unassigned (address 0).
    pub fn add_bar(&mut self, info: BarInfo) -> Result<(), BarError> {
        let wide = is_64(info.kind);
        if info.index >= NUM_BARS || (wide && info.index + 1 >= NUM_BARS) {
            return Err(BarError::InvalidIndex(info.index));
        }
        let max = if wide { 1u64 << 63 } else { 1u64 << 31 };
        if !info.size.is_power_of_two() || info.size < MIN_BAR_SIZE || info.size > max {
            return Err(BarError::InvalidSize(info.size));
        }
        for reg in info.index..info.index + if wide { 2 } else { 1 } {
            if self.bars.register_used(reg) {
                return Err(BarError::InUse(reg));
            }
        }
        let mask = !(info.size - 1);
        let type_bits = match info.kind {
            BarKind::Mmio32 => 0,
            BarKind::Mmio64 { prefetchable } => {
                BAR_MEM_TYPE_64 | if prefetchable { BAR_MEM_PREFETCH } else { 0 }
            }
        };
        let reg = bar_reg(info.index);
        self.set_u32(reg, type_bits);
        self.set_write_mask(reg, &((mask as u32) & !0xf).to_le_bytes());
        if wide {
            self.set_u32(reg + 4, 0);
            self.set_write_mask(reg + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        self.bars.bars[info.index as usize] = Some(Bar { info, mapped: None });
        Ok(())
    }

    /// Makes every BAR register read-only 0 (a Virtual Function's, PCIe 6.0 9.3.4.1.11:
    /// the PF's VF BARs place it). The BARs stay declared, so capabilities can still
    /// point into them, but they never decode through this config space.
    pub fn hide_bar_registers(&mut self) {
        for reg in 0..NUM_BARS {
            self.set_u32(bar_reg(reg), 0);
            self.set_write_mask(bar_reg(reg), &[0; 4]);
        }
    }

    /// The declared BARs, by index.
    pub fn bars(&self) -> Vec<BarInfo> {
        self.bars.bars.iter().flatten().map(|b| b.info).collect()
    }

    /// The address programmed in BAR `index` (decoded or not), if it is a BAR.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let bar = self.bars.get(index)?;
        let reg = bar_reg(index);
        let lo = u64::from(self.read_u32(reg) & !0xf);
        let hi = if is_64(bar.info.kind) {
            u64::from(self.read_u32(reg + 4))
        } else {
            0
        };
        Some(hi << 32 | lo)
    }

    /// Where BAR `index` is decoded now: `Some(address)` while memory space is
    /// enabled and the address is not 0.
    pub fn bar_mapping(&self, index: u8) -> Option<u64> {
        self.bars.get(index)?;
        self.decoded(index)
    }

    /// Firmware-style placement of BAR `index` at `addr` (low bits below the size are
    /// dropped; the upper half is dropped for a 32-bit BAR). The decoding state is
    /// refreshed without reporting a change: the caller reads [`Self::bar_mapping`].
    /// Unknown indexes are ignored (logged).
    pub fn set_bar_address(&mut self, index: u8, addr: u64) {
        let Some(bar) = self.bars.get(index).copied() else {
            tracing::debug!(index, "set_bar_address on a register that is not a BAR");
            return;
        };
        let addr = addr & !(bar.info.size - 1);
        let reg = bar_reg(index);
        let type_bits = self.read_u32(reg) & 0xf;
        self.set_u32(reg, (addr as u32 & !0xf) | type_bits);
        if is_64(bar.info.kind) {
            self.set_u32(reg + 4, (addr >> 32) as u32);
        } else if addr >> 32 != 0 {
            tracing::warn!(index, addr, "32-bit BAR placed above 4 GiB: truncated");
        }
        let decoded = self.decoded(index);
        if let Some(Some(b)) = self.bars.bars.get_mut(index as usize) {
            b.mapped = decoded;
        }
    }

    fn decoded(&self, index: u8) -> Option<u64> {
        let addr = self.bar_address(index)?;
        (self.memory_enabled() && addr != 0).then_some(addr)
    }

    /// Recomputes every BAR's decoded mapping and returns the changes (called after
    /// guest writes that touch the command register or the BAR registers).
    pub(crate) fn update_bar_mappings(&mut self) -> Vec<BarMapping> {
        let mut changes = Vec::new();
        for index in 0..NUM_BARS {
            let Some(bar) = self.bars.get(index).copied() else {
                continue;
            };
            let new = self.decoded(index);
            if new != bar.mapped {
                changes.push(BarMapping {
                    index,
                    old: bar.mapped,
                    new,
                    size: bar.info.size,
                });
                if let Some(Some(b)) = self.bars.bars.get_mut(index as usize) {
                    b.mapped = new;
                }
            }
        }
        if !changes.is_empty() {
            tracing::debug!(?changes, "BAR decoding changed");
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PciIds, COMMAND, COMMAND_MEMORY};

    fn cfg() -> ConfigSpace {
        let mut c = ConfigSpace::new(&PciIds::default());
        c.add_bar(BarInfo {
            index: 0,
            kind: BarKind::Mmio32,
            size: 0x2000,
        })
        .unwrap();
        c.add_bar(BarInfo {
            index: 2,
            kind: BarKind::Mmio64 { prefetchable: true },
            size: 0x1_0000_0000,
        })
        .unwrap();
        c
    }

    fn w32(c: &mut ConfigSpace, off: u16, v: u32) -> Vec<BarMapping> {
        c.write(off, &v.to_le_bytes())
    }

    #[test]
    fn declaration_errors() {
        let mut c = cfg();
        let b = |index, kind, size| BarInfo { index, kind, size };
        let k64 = BarKind::Mmio64 {
            prefetchable: false,
        };
        assert_eq!(
            c.add_bar(b(6, BarKind::Mmio32, 0x1000)),
            Err(BarError::InvalidIndex(6))
        );
        assert_eq!(c.add_bar(b(5, k64, 0x1000)), Err(BarError::InvalidIndex(5)));
        assert_eq!(
            c.add_bar(b(1, BarKind::Mmio32, 0x800)),
            Err(BarError::InvalidSize(0x800))
        );
        assert_eq!(
            c.add_bar(b(1, BarKind::Mmio32, 0x3000)),
            Err(BarError::InvalidSize(0x3000))
        );
        assert_eq!(
            c.add_bar(b(1, BarKind::Mmio32, 1 << 32)),
            Err(BarError::InvalidSize(1 << 32))
        );
        assert_eq!(
            c.add_bar(b(3, BarKind::Mmio32, 0x1000)),
            Err(BarError::InUse(3))
        );
        assert_eq!(c.add_bar(b(1, k64, 0x1000)), Err(BarError::InUse(2)));
        assert!(c.add_bar(b(4, k64, 0x1000)).is_ok());
        assert_eq!(c.bars().len(), 3);
    }

    #[test]
    fn sizing_32_and_64() {
        let mut c = cfg();
        assert_eq!(c.read_u32(BAR0), 0);
        assert_eq!(c.read_u32(BAR0 + 8), 0b1100);
        assert!(w32(&mut c, BAR0, !0).is_empty());
        assert_eq!(c.read_u32(BAR0), 0xffff_e000);
        w32(&mut c, BAR0 + 8, !0);
        w32(&mut c, BAR0 + 12, !0);
        assert_eq!(c.read_u32(BAR0 + 8), 0b1100);
        assert_eq!(c.read_u32(BAR0 + 12), 0xffff_ffff);
        // Unused registers and the ROM BAR size as 0 (absent).
        w32(&mut c, BAR0 + 4, !0);
        w32(&mut c, 0x30, !0);
        assert_eq!(c.read_u32(BAR0 + 4), 0);
        assert_eq!(c.read_u32(0x30), 0);
        // Restore: low bits below the size are dropped, type bits kept.
        w32(&mut c, BAR0, 0xc000_1fff);
        assert_eq!(c.read_u32(BAR0), 0xc000_0000);
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
    }

    #[test]
    fn move_while_disabled_reports_on_enable() {
        let mut c = cfg();
        assert!(w32(&mut c, BAR0, 0xc000_0000).is_empty());
        assert!(w32(&mut c, BAR0 + 8, 0).is_empty());
        assert!(w32(&mut c, BAR0 + 12, 0x10).is_empty());
        assert_eq!(c.bar_mapping(0), None);
        let m = c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(
            m,
            vec![
                BarMapping {
                    index: 0,
                    old: None,
                    new: Some(0xc000_0000),
                    size: 0x2000
                },
                BarMapping {
                    index: 2,
                    old: None,
                    new: Some(0x10_0000_0000),
                    size: 0x1_0000_0000
                },
            ]
        );
        assert_eq!(c.bar_mapping(2), Some(0x10_0000_0000));
        // Rewriting the same command value changes nothing.
        assert!(c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes()).is_empty());
        let m = c.write(COMMAND, &[0, 0]);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].old, m[0].new), (Some(0xc000_0000), None));
        assert_eq!((m[1].old, m[1].new), (Some(0x10_0000_0000), None));
    }

    #[test]
    fn move_while_enabled_reports_each_half() {
        let mut c = cfg();
        c.set_bar_address(2, 0x10_0000_0000);
        c.set_bar_address(0, 0xc000_0000);
        assert!(c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes()).len() == 2);
        let m = w32(&mut c, BAR0, 0xd000_0000);
        assert_eq!(
            m,
            vec![BarMapping {
                index: 0,
                old: Some(0xc000_0000),
                new: Some(0xd000_0000),
                size: 0x2000
            }]
        );
        // 64-bit BAR: the upper half first gives an intermediate address.
        let m = w32(&mut c, BAR0 + 12, 0x20);
        assert_eq!(
            (m[0].old, m[0].new),
            (Some(0x10_0000_0000), Some(0x20_0000_0000))
        );
        // Low half of a 4 GiB BAR is all read-only: no change.
        assert!(w32(&mut c, BAR0 + 8, 0x8000_0000).is_empty());
        // Byte write into the upper half.
        let m = c.write(BAR0 + 13, &[0x01]);
        assert_eq!(m[0].new, Some(0x0120_0000_0000));
        // Moving to 0 means unassigned: no longer decoded.
        let m = w32(&mut c, BAR0, 0);
        assert_eq!((m[0].old, m[0].new), (Some(0xd000_0000), None));
    }

    #[test]
    fn set_bar_address_and_unknown_indexes() {
        let mut c = cfg();
        c.set_bar_address(0, 0xc000_1234);
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        assert_eq!(c.bar_mapping(0), None);
        c.set_bar_address(1, 0x1000);
        c.set_bar_address(3, 0x1000);
        c.set_bar_address(200, 0x1000);
        assert_eq!(c.bar_address(3), None);
        assert_eq!(c.bar_mapping(200), None);
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        // Placement while decoding is not reported but is the new baseline.
        c.set_bar_address(0, 0xe000_0000);
        assert_eq!(c.bar_mapping(0), Some(0xe000_0000));
        let m = w32(&mut c, BAR0, 0xf000_0000);
        assert_eq!(m[0].old, Some(0xe000_0000));
    }
}
