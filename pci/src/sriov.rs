//! Single Root I/O Virtualization: the SR-IOV extended capability of a Physical
//! Function (PCIe 6.0, 9.3.3) and the layout of its Virtual Functions.
//!
//! [`SriovCap::add`] puts the capability into a PF's [`ConfigSpace`]; the registers live
//! there with write masks, so guest reads and writes need no special path. After each
//! guest write the PF calls [`SriovCap::after_write`], which enforces what masks cannot
//! express (NumVFs frozen while VF Enable is set, at most TotalVFs). What the capability
//! says at any moment is a [`SriovState`] snapshot: how many VFs exist (NumVFs while VF
//! Enable is set), whether their memory space decodes (VF MSE), and where each VF BAR
//! is. The root complex compares the snapshots taken around a PF config write to add
//! and remove VF functions and to move their BARs ([`crate::root`]).
//!
//! The layout is fixed: First VF Offset 1 and VF Stride 1 (constant for every NumVFs,
//! as Linux re-reads them after each NumVFs write), so VF `i` of a PF at devfn `d` is
//! devfn `d + 1 + i` on the same bus (no ARI on a root bus; the last VF must stay at or
//! below devfn 0xFF). InitialVFs = TotalVFs (no VF migration), supported page size
//! 4 KiB only, and each VF BAR is a power of two of at least 4 KiB: VF `i`'s BAR `n` is
//! at VF BAR `n` + `i` * its size.

use crate::bar::{BAR_MEM_PREFETCH, BAR_MEM_TYPE_64, MIN_BAR_SIZE, NUM_BARS};
use crate::capability::CapabilityError;
use crate::config::{ranges_overlap, ConfigSpace};
use crate::root::SharedPciDevice;
use crate::{BarInfo, BarKind, PciAddress};

/// Extended capability ID of SR-IOV.
pub const EXT_CAP_ID_SRIOV: u16 = 0x0010;
/// Offset of the first VF from the PF, in routing IDs.
pub const FIRST_VF_OFFSET: u16 = 1;
/// Distance between consecutive VFs, in routing IDs.
pub const VF_STRIDE: u16 = 1;
/// Supported page sizes: bit 0 = 4 KiB, the only one.
pub const SUPPORTED_PAGE_SIZES: u32 = 0x1;

/// Register offsets inside the SR-IOV capability.
pub mod reg {
    /// SR-IOV Capabilities (32 bits; 0: no VF migration, no ARI hierarchy preserved).
    pub const CAPABILITIES: u16 = 0x04;
    /// SR-IOV Control (16 bits).
    pub const CONTROL: u16 = 0x08;
    /// SR-IOV Status (16 bits).
    pub const STATUS: u16 = 0x0a;
    /// InitialVFs (16 bits).
    pub const INITIAL_VFS: u16 = 0x0c;
    /// TotalVFs (16 bits).
    pub const TOTAL_VFS: u16 = 0x0e;
    /// NumVFs (16 bits, guest-writable while VF Enable is clear).
    pub const NUM_VFS: u16 = 0x10;
    /// Function Dependency Link (8 bits).
    pub const FUNCTION_LINK: u16 = 0x12;
    /// First VF Offset (16 bits).
    pub const FIRST_VF_OFFSET: u16 = 0x14;
    /// VF Stride (16 bits).
    pub const VF_STRIDE: u16 = 0x16;
    /// VF Device ID (16 bits).
    pub const VF_DEVICE_ID: u16 = 0x1a;
    /// Supported Page Sizes (32 bits).
    pub const SUPPORTED_PAGE_SIZES: u16 = 0x1c;
    /// System Page Size (32 bits).
    pub const SYSTEM_PAGE_SIZE: u16 = 0x20;
    /// VF BAR0; VF BAR `n` is at `VF_BAR0 + 4 * n`.
    pub const VF_BAR0: u16 = 0x24;
    /// VF Migration State Array Offset (32 bits, 0: none).
    pub const MIGRATION_STATE: u16 = 0x3c;
    /// Length of the capability.
    pub const LEN: u16 = 0x40;
}

/// Control: VF Enable.
pub const CONTROL_VF_ENABLE: u16 = 1 << 0;
/// Control: VF Memory Space Enable.
pub const CONTROL_VF_MSE: u16 = 1 << 3;
/// Control: ARI Capable Hierarchy (kept, has no effect on a root bus).
pub const CONTROL_ARI: u16 = 1 << 4;

/// Errors of the capability's construction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SriovError {
    /// TotalVFs of 0: a PF has at least one VF.
    #[error("an SR-IOV PF needs at least one VF")]
    NoVfs,
    /// The VFs would not fit on the bus.
    #[error("{total} VFs do not fit on the bus after devfn {pf_devfn:#04x} (at most {max})")]
    TooManyVfs { total: u16, pf_devfn: u8, max: u16 },
    /// A VF BAR that is not a valid memory BAR (index, size or overlap).
    #[error("VF BAR {index}: {reason}")]
    Bar { index: u8, reason: &'static str },
    /// No room for the capability.
    #[error(transparent)]
    Capability(#[from] CapabilityError),
}

/// What a PF's SR-IOV capability offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SriovConfig {
    /// TotalVFs (and InitialVFs).
    pub total_vfs: u16,
    /// The VFs' Device ID (their config space reads 0xFFFF there; the guest takes it
    /// from the PF's capability).
    pub vf_device_id: u16,
    /// Function number the PF depends on (its own, for an independent PF).
    pub function_link: u8,
    /// Each VF's BARs, sizes per VF.
    pub vf_bars: Vec<BarInfo>,
}

/// Where the VFs of a PF are and what they decode, as the capability says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SriovState {
    /// TotalVFs.
    pub total_vfs: u16,
    /// VFs that exist: NumVFs while VF Enable is set, otherwise 0.
    pub enabled_vfs: u16,
    /// VF Memory Space Enable.
    pub memory_enabled: bool,
    /// Each VF BAR: its per-VF description and the programmed base (VF 0's address).
    pub bars: [Option<(BarInfo, u64)>; NUM_BARS as usize],
}

impl SriovState {
    /// Devfn of VF `index` of a PF at `pf_devfn`, if it fits on the bus.
    pub fn vf_devfn(pf_devfn: u8, index: u16) -> Option<u8> {
        let devfn = u32::from(pf_devfn)
            + u32::from(FIRST_VF_OFFSET)
            + u32::from(VF_STRIDE) * u32::from(index);
        u8::try_from(devfn).ok()
    }

    /// Address of VF `index` of the PF at `pf`, if it fits on the bus.
    pub fn vf_address(pf: PciAddress, index: u16) -> Option<PciAddress> {
        let devfn = Self::vf_devfn(pf.devfn(), index)?;
        Some(PciAddress::in_segment(pf.segment, devfn >> 3, devfn & 7))
    }

    /// Where BAR `bar` of VF `index` decodes now: the VF exists, VF MSE is set and the
    /// VF BAR is assigned (not 0).
    pub fn vf_bar(&self, index: u16, bar: u8) -> Option<u64> {
        let (info, base) = (*self.bars.get(usize::from(bar))?)?;
        if index >= self.enabled_vfs || !self.memory_enabled || base == 0 {
            return None;
        }
        base.checked_add(info.size.checked_mul(u64::from(index))?)
    }
}

/// The SR-IOV capability of one PF (its registers live in the PF's config space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SriovCap {
    offset: u16,
    total_vfs: u16,
    bars: [Option<BarInfo>; NUM_BARS as usize],
}

fn is_64(kind: BarKind) -> bool {
    matches!(kind, BarKind::Mmio64 { .. })
}

impl SriovCap {
    /// Appends the SR-IOV capability to `cfg` with VFs disabled, NumVFs 0, System Page
    /// Size 4 KiB and the VF BARs unassigned.
    pub fn add(cfg: &mut ConfigSpace, config: &SriovConfig) -> Result<Self, SriovError> {
        if config.total_vfs == 0 {
            return Err(SriovError::NoVfs);
        }
        let mut bars = [None; NUM_BARS as usize];
        for b in &config.vf_bars {
            let bad = |reason| SriovError::Bar {
                index: b.index,
                reason,
            };
            let wide = is_64(b.kind);
            if b.index >= NUM_BARS || (wide && b.index + 1 >= NUM_BARS) {
                return Err(bad("index out of range"));
            }
            if !b.size.is_power_of_two() || b.size < MIN_BAR_SIZE || (!wide && b.size > 1 << 31) {
                return Err(bad("size must be a power of two of at least 4 KiB"));
            }
            let regs = b.index..b.index + if wide { 2 } else { 1 };
            let used = |r: u8| {
                bars.iter()
                    .flatten()
                    .any(|o: &BarInfo| o.index == r || (is_64(o.kind) && o.index + 1 == r))
            };
            if regs.clone().any(used) {
                return Err(bad("register already used"));
            }
            bars[usize::from(b.index)] = Some(*b);
        }
        let mut body = [0u8; reg::LEN as usize - 4];
        let mut wmask = [0u8; reg::LEN as usize - 4];
        let put = |buf: &mut [u8], r: u16, bytes: &[u8]| {
            let at = usize::from(r) - 4;
            buf[at..at + bytes.len()].copy_from_slice(bytes);
        };
        let control_wmask = CONTROL_VF_ENABLE | CONTROL_VF_MSE | CONTROL_ARI;
        put(&mut wmask, reg::CONTROL, &control_wmask.to_le_bytes());
        put(&mut body, reg::INITIAL_VFS, &config.total_vfs.to_le_bytes());
        put(&mut body, reg::TOTAL_VFS, &config.total_vfs.to_le_bytes());
        put(&mut wmask, reg::NUM_VFS, &u16::MAX.to_le_bytes());
        put(&mut body, reg::FUNCTION_LINK, &[config.function_link]);
        put(
            &mut body,
            reg::FIRST_VF_OFFSET,
            &FIRST_VF_OFFSET.to_le_bytes(),
        );
        put(&mut body, reg::VF_STRIDE, &VF_STRIDE.to_le_bytes());
        put(
            &mut body,
            reg::VF_DEVICE_ID,
            &config.vf_device_id.to_le_bytes(),
        );
        put(
            &mut body,
            reg::SUPPORTED_PAGE_SIZES,
            &SUPPORTED_PAGE_SIZES.to_le_bytes(),
        );
        put(&mut body, reg::SYSTEM_PAGE_SIZE, &1u32.to_le_bytes());
        put(
            &mut wmask,
            reg::SYSTEM_PAGE_SIZE,
            &SUPPORTED_PAGE_SIZES.to_le_bytes(),
        );
        for b in bars.iter().flatten() {
            let r = reg::VF_BAR0 + 4 * u16::from(b.index);
            let mask = !(b.size - 1);
            let type_bits = match b.kind {
                BarKind::Mmio32 => 0,
                BarKind::Mmio64 { prefetchable } => {
                    BAR_MEM_TYPE_64 | if prefetchable { BAR_MEM_PREFETCH } else { 0 }
                }
            };
            put(&mut body, r, &type_bits.to_le_bytes());
            put(&mut wmask, r, &((mask as u32) & !0xf).to_le_bytes());
            if is_64(b.kind) {
                put(&mut wmask, r + 4, &((mask >> 32) as u32).to_le_bytes());
            }
        }
        let offset = cfg.add_extended_capability(EXT_CAP_ID_SRIOV, 1, &body, &wmask)?;
        Ok(Self {
            offset,
            total_vfs: config.total_vfs,
            bars,
        })
    }

    /// Offset of the capability in config space.
    pub fn offset(&self) -> u16 {
        self.offset
    }

    /// TotalVFs.
    pub fn total_vfs(&self) -> u16 {
        self.total_vfs
    }

    /// Checks that all `total_vfs` VFs of a PF at `pf_devfn` fit on the bus.
    pub fn check_fits(&self, pf_devfn: u8) -> Result<(), SriovError> {
        let max = 0xffu16 - u16::from(pf_devfn);
        match SriovState::vf_devfn(pf_devfn, self.total_vfs - 1) {
            Some(_) => Ok(()),
            None => Err(SriovError::TooManyVfs {
                total: self.total_vfs,
                pf_devfn,
                max,
            }),
        }
    }

    /// The VF BARs, sizes per VF (the VMM reserves `size * total_vfs` for each).
    pub fn vf_bars(&self) -> Vec<BarInfo> {
        self.bars.iter().flatten().copied().collect()
    }

    fn reg(&self, r: u16) -> u16 {
        self.offset + r
    }

    fn vf_bar_address(&self, cfg: &ConfigSpace, b: &BarInfo) -> u64 {
        let r = self.reg(reg::VF_BAR0 + 4 * u16::from(b.index));
        let lo = u64::from(cfg.read_u32(r) & !0xf);
        let hi = if is_64(b.kind) {
            u64::from(cfg.read_u32(r + 4))
        } else {
            0
        };
        hi << 32 | lo
    }

    /// What the capability in `cfg` says now.
    pub fn state(&self, cfg: &ConfigSpace) -> SriovState {
        let control = cfg.read_u16(self.reg(reg::CONTROL));
        let enabled_vfs = if control & CONTROL_VF_ENABLE != 0 {
            cfg.read_u16(self.reg(reg::NUM_VFS)).min(self.total_vfs)
        } else {
            0
        };
        let mut bars = [None; NUM_BARS as usize];
        for (slot, b) in bars.iter_mut().zip(&self.bars) {
            *slot = b.map(|b| (b, self.vf_bar_address(cfg, &b)));
        }
        SriovState {
            total_vfs: self.total_vfs,
            enabled_vfs,
            memory_enabled: control & CONTROL_VF_MSE != 0,
            bars,
        }
    }

    /// Called by the PF after a guest write of `len` bytes at `offset` of `cfg`, with
    /// the state from before the write: NumVFs cannot change while VF Enable is set (the
    /// old value is put back) and never exceeds TotalVFs. (A config access is at most 4
    /// aligned bytes, so one write never touches both NumVFs and the control register.)
    pub fn after_write(&self, cfg: &mut ConfigSpace, before: &SriovState, offset: u16, len: usize) {
        let num = self.reg(reg::NUM_VFS);
        if !ranges_overlap(offset, len, num, num + 2) {
            return;
        }
        if cfg.read_u16(self.reg(reg::CONTROL)) & CONTROL_VF_ENABLE != 0 {
            tracing::debug!("NumVFs write while VF Enable is set ignored");
            cfg.set_u16(num, before.enabled_vfs);
        } else if cfg.read_u16(num) > self.total_vfs {
            tracing::debug!(total = self.total_vfs, "NumVFs above TotalVFs clamped");
            cfg.set_u16(num, self.total_vfs);
        }
    }

    /// Firmware-style placement of VF BAR `index` (VF 0's address; VF `i` follows at
    /// `addr + i * size`). Unknown indexes are ignored.
    pub fn set_vf_bar_address(&self, cfg: &mut ConfigSpace, index: u8, addr: u64) {
        let Some(Some(b)) = self.bars.get(usize::from(index)) else {
            tracing::debug!(
                index,
                "set_vf_bar_address on a register that is not a VF BAR"
            );
            return;
        };
        let addr = addr & !(b.size - 1);
        let r = self.reg(reg::VF_BAR0 + 4 * u16::from(index));
        let type_bits = cfg.read_u32(r) & 0xf;
        cfg.set_u32(r, (addr as u32 & !0xf) | type_bits);
        if is_64(b.kind) {
            cfg.set_u32(r + 4, (addr >> 32) as u32);
        }
    }
}

/// Builds the VFs of one PF when the guest sets VF Enable (the host side of a VF:
/// its interrupt routes, its view of guest memory, its backend). The root complex
/// calls it on the vCPU thread that wrote the PF's control register.
pub trait VfFactory: Send {
    /// Builds VF `index` (0-based), which will sit at `address`. A VF that cannot be
    /// built is left out (the guest then finds no function there).
    fn create(&mut self, index: u16, address: PciAddress) -> Result<SharedPciDevice, String>;
}

#[cfg(test)]
mod tests;
