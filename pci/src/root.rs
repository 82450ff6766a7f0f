//! The root complex of one PCI segment: bus 0 with up to 32 devices of 8 functions, the
//! host bridge at 00:00.0, and the two configuration access mechanisms (ECAM over MMIO,
//! and mechanism #1 over ports 0xCF8/0xCFC).
//!
//! A machine may have several segments (PCI domains), one [`PciRoot`] each with its own
//! ECAM window; addresses carry the segment. Mechanism #1 has no segment field: as on
//! real hardware it reaches segment 0 only, so only a segment-0 root answers it.
//!
//! Accesses are validated here (width 1, 2 or 4, naturally aligned, inside 4 KiB)
//! before they reach a [`PciDevice`]: an invalid read returns all-ones, an invalid
//! write is ignored, and an absent function reads all-ones. Config writes return what
//! the VMM must apply, in order, as [`ConfigChange`]s: BAR decoding changes, and the
//! Virtual Functions an SR-IOV PF's write created or removed.
//!
//! ## Virtual Functions
//!
//! A PF is added with [`PciRoot::add_sriov_pf`] together with a [`VfFactory`]; the
//! devfns of all its possible VFs are reserved at once, so no other function can take
//! them. When a guest write to the PF sets VF Enable, the root builds NumVFs functions
//! through the factory and reports each as [`ConfigChange::VfAdded`] followed by its
//! BAR mappings (VF MSE and the VF BARs decide where they decode). When VF Enable is
//! cleared it reports, per VF (last first), the BAR unmaps and then
//! [`ConfigChange::VfRemoved`] with the function, which is already off the bus: the
//! caller unmaps, calls [`PciDevice::quiesce`] and drops what it holds for it, in that
//! order.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::host_bridge::HostBridge;
use crate::sriov::{SriovState, VfFactory};
use crate::{BarMapping, PciDevice};

/// A PCI function shared between the root complex and the VMM.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Devices per bus.
pub const DEVICES_PER_BUS: u8 = 32;
/// Functions per device.
pub const FUNCTIONS_PER_DEVICE: u8 = 8;
/// Size of the ECAM window for bus 0 (the only bus of this root complex).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Port of the configuration address register (mechanism #1).
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports of mechanism #1: 0xCF8..0xD00 (address dword, then data dword).
pub const CONFIG_IO_SIZE: u64 = 8;

/// Errors of device registration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    /// Only bus 0 exists.
    #[error("bus {0} does not exist (only bus 0)")]
    InvalidBus(u8),
    /// The address is on another segment than the root's.
    #[error("{0} is not on segment {1:04x}")]
    WrongSegment(PciAddress, u16),
    /// Device number not in 0..32.
    #[error("invalid PCI slot {0}")]
    InvalidSlot(u8),
    /// Function number not in 0..8.
    #[error("invalid PCI function {0}")]
    InvalidFunction(u8),
    /// The function is already present.
    #[error("PCI function {0} already in use")]
    Occupied(PciAddress),
    /// Every slot of bus 0 is taken.
    #[error("no free PCI slot")]
    NoFreeSlot,
    /// The function added as an SR-IOV PF has no SR-IOV capability.
    #[error("the function has no SR-IOV capability")]
    NotSriov,
    /// The PF's VFs do not fit on the bus from this slot.
    #[error(
        "{total} VFs of a PF in slot {slot} do not fit before devfn 0xff (at most {max} there)"
    )]
    TooManyVfs { slot: u8, total: u16, max: u16 },
    /// No slot has room for the PF and all its VFs.
    #[error("no free PCI slot has room for a PF and its {0} VFs")]
    NoRoomForVfs(u16),
}

/// What a config write changed, for the VMM to apply in order.
pub enum ConfigChange {
    /// A BAR of the function at this address started, stopped or moved decoding.
    Bar(PciAddress, BarMapping),
    /// A VF appeared (its PF set VF Enable); its BAR mappings follow as `Bar`.
    VfAdded(PciAddress, SharedPciDevice),
    /// A VF went away (its PF cleared VF Enable) and is off the bus; its BAR unmaps
    /// came before. Call [`PciDevice::quiesce`] on it, then drop it.
    VfRemoved(PciAddress, SharedPciDevice),
}

impl ConfigChange {
    /// The BAR change, if this is one.
    pub fn as_bar(&self) -> Option<(PciAddress, BarMapping)> {
        match self {
            ConfigChange::Bar(a, m) => Some((*a, *m)),
            _ => None,
        }
    }
}

impl fmt::Debug for ConfigChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigChange::Bar(a, m) => write!(f, "Bar({a}, {m:?})"),
            ConfigChange::VfAdded(a, _) => write!(f, "VfAdded({a})"),
            ConfigChange::VfRemoved(a, _) => write!(f, "VfRemoved({a})"),
        }
    }
}

/// A function's address: segment (PCI domain), bus, device, function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// Segment (PCI domain) number.
    pub segment: u16,
    /// Bus number (always 0 here).
    pub bus: u8,
    /// Device number, 0..32.
    pub device: u8,
    /// Function number, 0..8.
    pub function: u8,
}

impl PciAddress {
    /// Segment 0, bus 0, `device`, `function` (not validated).
    pub const fn new(device: u8, function: u8) -> Self {
        Self::in_segment(0, device, function)
    }

    /// `segment`, bus 0, `device`, `function` (not validated).
    pub const fn in_segment(segment: u16, device: u8, function: u8) -> Self {
        PciAddress {
            segment,
            bus: 0,
            device,
            function,
        }
    }

    /// Device and function packed as `device << 3 | function`.
    pub fn devfn(&self) -> u8 {
        (self.device & 0x1f) << 3 | (self.function & 7)
    }

    fn validate(&self) -> Result<(), PciError> {
        if self.bus != 0 {
            Err(PciError::InvalidBus(self.bus))
        } else if self.device >= DEVICES_PER_BUS {
            Err(PciError::InvalidSlot(self.device))
        } else if self.function >= FUNCTIONS_PER_DEVICE {
            Err(PciError::InvalidFunction(self.function))
        } else {
            Ok(())
        }
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

/// Whether a config access of `len` bytes at register `reg` is one the bus carries.
fn valid_access(reg: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && usize::from(reg) % len == 0 && usize::from(reg) + len <= 4096
}

/// The configuration address register of mechanism #1 (port 0xCF8).
#[derive(Debug, Default)]
pub struct ConfigAddressPort {
    value: AtomicU32,
}

impl ConfigAddressPort {
    /// Bits the register keeps: enable, AMD extended register (27:24), bus, device,
    /// function, register (7:2).
    pub const MASK: u32 = 0x8fff_fffc;
    /// Enable bit.
    pub const ENABLE: u32 = 1 << 31;

    /// The register value.
    pub fn value(&self) -> u32 {
        self.value.load(Ordering::SeqCst)
    }

    /// Stores a 32-bit guest write.
    pub fn set(&self, value: u32) {
        self.value.store(value & Self::MASK, Ordering::SeqCst);
    }

    /// The function and dword-aligned register selected, if enabled (register bits
    /// 11:8 come from bits 27:24, the AMD extension). Always on segment 0: mechanism
    /// #1 cannot name another.
    pub fn target(&self) -> Option<(PciAddress, u16)> {
        let v = self.value();
        if v & Self::ENABLE == 0 {
            return None;
        }
        let addr = PciAddress {
            segment: 0,
            bus: (v >> 16) as u8,
            device: (v >> 11) as u8 & 0x1f,
            function: (v >> 8) as u8 & 7,
        };
        let reg = (v & 0xfc) as u16 | ((v >> 24) as u16 & 0xf) << 8;
        Some((addr, reg))
    }
}

/// The root complex of one segment's bus 0.
pub struct PciRoot {
    segment: u16,
    functions: BTreeMap<u8, SharedPciDevice>,
    config_address: ConfigAddressPort,
    /// The VF factory of each SR-IOV PF, by the PF's devfn.
    vf_factories: BTreeMap<u8, Box<dyn VfFactory>>,
    /// Devfns kept for VFs (present or not).
    vf_devfns: BTreeSet<u8>,
}

impl fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let present: Vec<String> = self.addresses().iter().map(|a| a.to_string()).collect();
        f.debug_struct("PciRoot")
            .field("segment", &self.segment)
            .field("functions", &present)
            .field("config_address", &self.config_address.value())
            .finish()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// The root bus of segment 0 with the [`HostBridge`] at 00:00.0.
    pub fn new() -> Self {
        Self::with_segment(0)
    }

    /// The root bus of `segment` with the [`HostBridge`] at 00:00.0.
    pub fn with_segment(segment: u16) -> Self {
        let mut functions: BTreeMap<u8, SharedPciDevice> = BTreeMap::new();
        functions.insert(0, Arc::new(Mutex::new(HostBridge::new())));
        PciRoot {
            segment,
            functions,
            config_address: ConfigAddressPort::default(),
            vf_factories: BTreeMap::new(),
            vf_devfns: BTreeSet::new(),
        }
    }

    /// The segment this root serves.
    pub fn segment(&self) -> u16 {
        self.segment
    }

    /// `device`.`function` on this root's segment and bus 0.
    fn address(&self, devfn: u8) -> PciAddress {
        PciAddress::in_segment(self.segment, devfn >> 3, devfn & 7)
    }

    fn validate(&self, address: PciAddress) -> Result<(), PciError> {
        if address.segment != self.segment {
            return Err(PciError::WrongSegment(address, self.segment));
        }
        address.validate()
    }

    /// Adds `dev` as function 0 of `slot`, or of the first free slot from 1 when
    /// `slot` is `None`.
    pub fn add_device(
        &mut self,
        slot: Option<u8>,
        dev: SharedPciDevice,
    ) -> Result<PciAddress, PciError> {
        let address = self.next_address(slot)?;
        self.functions.insert(address.devfn(), dev);
        tracing::debug!(%address, "PCI device added");
        Ok(address)
    }

    /// The address [`Self::add_device`] would give a device for `slot` now (to know a
    /// function's address before building it, e.g. its IOMMU endpoint id).
    pub fn next_address(&self, slot: Option<u8>) -> Result<PciAddress, PciError> {
        let device = match slot {
            Some(s) => s,
            None => (1..DEVICES_PER_BUS)
                .find(|&d| !self.slot_used(d))
                .ok_or(PciError::NoFreeSlot)?,
        };
        let address = PciAddress::in_segment(self.segment, device, 0);
        address.validate()?;
        if self.slot_used(device) {
            return Err(PciError::Occupied(address));
        }
        Ok(address)
    }

    /// Adds `dev` at an explicit address (for multi-function devices: the guest scans
    /// functions 1..8 only if function 0 sets the multi-function header bit).
    pub fn add_function(
        &mut self,
        address: PciAddress,
        dev: SharedPciDevice,
    ) -> Result<(), PciError> {
        self.validate(address)?;
        if !self.devfn_free(address.devfn()) {
            return Err(PciError::Occupied(address));
        }
        self.functions.insert(address.devfn(), dev);
        tracing::debug!(%address, "PCI function added");
        Ok(())
    }

    fn slot_used(&self, device: u8) -> bool {
        let first = (device & 0x1f) << 3;
        self.functions.range(first..=first | 7).next().is_some()
            || self.vf_devfns.range(first..=first | 7).next().is_some()
    }

    fn devfn_free(&self, devfn: u8) -> bool {
        !self.functions.contains_key(&devfn) && !self.vf_devfns.contains(&devfn)
    }

    /// The address [`Self::add_sriov_pf`] would give a PF with `total_vfs` VFs for
    /// `slot` now: function 0 of `slot` (or of the first slot from 1 where the PF and
    /// all its VFs find free devfns).
    pub fn next_pf_address(
        &self,
        slot: Option<u8>,
        total_vfs: u16,
    ) -> Result<PciAddress, PciError> {
        let fits = |device: u8| -> Result<PciAddress, PciError> {
            let address = PciAddress::in_segment(self.segment, device, 0);
            address.validate()?;
            let devfn = address.devfn();
            let last = total_vfs
                .checked_sub(1)
                .and_then(|i| SriovState::vf_devfn(devfn, i))
                .ok_or(PciError::TooManyVfs {
                    slot: device,
                    total: total_vfs,
                    max: 0xff - u16::from(devfn),
                })?;
            match (devfn..=last).find(|&d| !self.devfn_free(d)) {
                None => Ok(address),
                Some(d) => Err(PciError::Occupied(self.address(d))),
            }
        };
        match slot {
            Some(s) => fits(s),
            None => (1..DEVICES_PER_BUS)
                .find_map(|d| fits(d).ok())
                .ok_or(PciError::NoRoomForVfs(total_vfs)),
        }
    }

    /// Adds an SR-IOV PF (`dev.sriov()` must say what it offers) as function 0 of
    /// `slot` or of the first slot with room for it and all its VFs, and keeps the VFs'
    /// devfns for them; `vfs` builds each VF when the guest enables them.
    pub fn add_sriov_pf(
        &mut self,
        slot: Option<u8>,
        dev: SharedPciDevice,
        vfs: Box<dyn VfFactory>,
    ) -> Result<PciAddress, PciError> {
        let total = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sriov()
            .ok_or(PciError::NotSriov)?
            .total_vfs;
        let address = self.next_pf_address(slot, total)?;
        let devfn = address.devfn();
        self.functions.insert(devfn, dev);
        self.vf_devfns
            .extend((0..total).filter_map(|i| SriovState::vf_devfn(devfn, i)));
        self.vf_factories.insert(devfn, vfs);
        tracing::debug!(%address, total_vfs = total, "SR-IOV PF added");
        Ok(address)
    }

    /// The function at `address`, if present (on this root's segment).
    pub fn device(&self, address: PciAddress) -> Option<SharedPciDevice> {
        if self.validate(address).is_err() {
            return None;
        }
        self.functions.get(&address.devfn()).cloned()
    }

    /// Addresses of the present functions, in order.
    pub fn addresses(&self) -> Vec<PciAddress> {
        self.functions.keys().map(|&df| self.address(df)).collect()
    }

    /// The present functions (host bridge included), in address order: the VMM
    /// places and maps their BARs at start.
    pub fn devices(&self) -> Vec<(PciAddress, SharedPciDevice)> {
        self.functions
            .iter()
            .map(|(&df, d)| (self.address(df), d.clone()))
            .collect()
    }

    /// Reads register `reg` of `address` (all-ones if absent or the access is
    /// invalid).
    pub fn config_read(&self, address: PciAddress, reg: u16, data: &mut [u8]) {
        data.fill(0xff);
        if !valid_access(reg, data.len()) {
            tracing::debug!(%address, reg, len = data.len(), "invalid config read");
            return;
        }
        if let Some(dev) = self.device(address) {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_config(reg, data);
        }
    }

    /// Writes register `reg` of `address` (ignored if absent or invalid); returns what
    /// changed (see [`ConfigChange`]).
    pub fn config_write(
        &mut self,
        address: PciAddress,
        reg: u16,
        data: &[u8],
    ) -> Vec<ConfigChange> {
        if !valid_access(reg, data.len()) {
            tracing::debug!(%address, reg, len = data.len(), "invalid config write");
            return Vec::new();
        }
        let Some(dev) = self.device(address) else {
            return Vec::new();
        };
        let (before, mappings, after) = {
            let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
            let before = d.sriov();
            let mappings = d.write_config(reg, data);
            (before, mappings, d.sriov())
        };
        let mut changes: Vec<ConfigChange> = mappings
            .into_iter()
            .map(|m| ConfigChange::Bar(address, m))
            .collect();
        if let (Some(before), Some(after)) = (before, after) {
            if before != after {
                self.update_vfs(address, &before, &after, &mut changes);
            }
        }
        changes
    }

    /// Brings the VFs of the PF at `pf` from what `before` said to what `after` says.
    fn update_vfs(
        &mut self,
        pf: PciAddress,
        before: &SriovState,
        after: &SriovState,
        out: &mut Vec<ConfigChange>,
    ) {
        let vf_bar_change = |index: u16, bar: u8, present_before: bool| {
            let (info, _) = after.bars.get(usize::from(bar)).copied().flatten()?;
            let old = present_before.then(|| before.vf_bar(index, bar)).flatten();
            let new = after.vf_bar(index, bar);
            (old != new).then_some(BarMapping {
                index: bar,
                old,
                new,
                size: info.size,
            })
        };
        for index in (after.enabled_vfs..before.enabled_vfs).rev() {
            let Some(vf) = SriovState::vf_address(pf, index) else {
                continue;
            };
            let Some(dev) = self.functions.remove(&vf.devfn()) else {
                continue;
            };
            for bar in 0..crate::bar::NUM_BARS {
                if let Some((info, _)) = before.bars[usize::from(bar)] {
                    if let Some(old) = before.vf_bar(index, bar) {
                        out.push(ConfigChange::Bar(
                            vf,
                            BarMapping {
                                index: bar,
                                old: Some(old),
                                new: None,
                                size: info.size,
                            },
                        ));
                    }
                }
            }
            tracing::info!(%pf, %vf, index, "VF removed");
            out.push(ConfigChange::VfRemoved(vf, dev));
        }
        for index in before.enabled_vfs..after.enabled_vfs {
            let (Some(vf), Some(factory)) = (
                SriovState::vf_address(pf, index),
                self.vf_factories.get_mut(&pf.devfn()),
            ) else {
                continue;
            };
            if !self.vf_devfns.contains(&vf.devfn()) || self.functions.contains_key(&vf.devfn()) {
                tracing::warn!(%pf, %vf, "VF devfn not reserved or taken: VF left out");
                continue;
            }
            match factory.create(index, vf) {
                Ok(dev) => {
                    self.functions.insert(vf.devfn(), dev.clone());
                    tracing::info!(%pf, %vf, index, "VF added");
                    out.push(ConfigChange::VfAdded(vf, dev));
                }
                Err(e) => tracing::warn!(%pf, %vf, index, "VF could not be built, left out: {e}"),
            }
        }
        for index in 0..after.enabled_vfs {
            let Some(vf) = SriovState::vf_address(pf, index) else {
                continue;
            };
            if !self.functions.contains_key(&vf.devfn()) {
                continue;
            }
            for bar in 0..crate::bar::NUM_BARS {
                if let Some(m) = vf_bar_change(index, bar, index < before.enabled_vfs) {
                    out.push(ConfigChange::Bar(vf, m));
                }
            }
        }
    }

    fn ecam_decode(&self, offset: u64) -> Option<(PciAddress, u16)> {
        if offset >= 256 * ECAM_BUS_SIZE {
            return None;
        }
        let address = PciAddress {
            segment: self.segment,
            bus: (offset >> 20) as u8,
            device: (offset >> 15) as u8 & 0x1f,
            function: (offset >> 12) as u8 & 7,
        };
        Some((address, (offset & 0xfff) as u16))
    }

    /// ECAM read at `offset` from this segment's ECAM base (`bus << 20 | dev << 15 |
    /// fn << 12 | reg`).
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        match self.ecam_decode(offset) {
            Some((address, reg)) => self.config_read(address, reg, data),
            None => data.fill(0xff),
        }
    }

    /// ECAM write at `offset` from this segment's ECAM base; returns what changed.
    pub fn ecam_write(&mut self, offset: u64, data: &[u8]) -> Vec<ConfigChange> {
        match self.ecam_decode(offset) {
            Some((address, reg)) => self.config_write(address, reg, data),
            None => Vec::new(),
        }
    }

    /// The mechanism #1 address register.
    pub fn config_address(&self) -> &ConfigAddressPort {
        &self.config_address
    }

    /// Port read at `offset` from 0xCF8 (0..4: the address register, dword reads
    /// only; 4..8: data at `0xCFC + n`). Mechanism #1 reaches segment 0 only: on a
    /// root of another segment, data reads are all-ones (the VMM wires the ports to
    /// segment 0's root alone).
    pub fn pio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0 if data.len() == 4 => {
                data.copy_from_slice(&self.config_address.value().to_le_bytes());
            }
            4..=7 => {
                let Some((address, reg)) = self.pio_target(offset, data.len()) else {
                    return;
                };
                self.config_read(address, reg, data);
            }
            _ => tracing::debug!(offset, len = data.len(), "ignored 0xcf8 port read"),
        }
    }

    /// Port write at `offset` from 0xCF8 (dword writes of the address register, any
    /// naturally aligned data access); returns the BAR decoding changes. Data writes
    /// reach segment 0 only (ignored on a root of another segment).
    pub fn pio_write(&mut self, offset: u64, data: &[u8]) -> Vec<ConfigChange> {
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.config_address.set(u32::from_le_bytes(b));
                Vec::new()
            }
            4..=7 => match self.pio_target(offset, data.len()) {
                Some((address, reg)) => self.config_write(address, reg, data),
                None => Vec::new(),
            },
            _ => {
                tracing::debug!(offset, len = data.len(), "ignored 0xcf8 port write");
                Vec::new()
            }
        }
    }

    fn pio_target(&self, offset: u64, len: usize) -> Option<(PciAddress, u16)> {
        let (address, reg) = self.config_address.target()?;
        let byte = (offset - 4) as u16;
        (len <= 4 && usize::from(byte) + len <= 4).then_some((address, reg + byte))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_bridge::HostBridge;

    fn dev() -> SharedPciDevice {
        Arc::new(Mutex::new(HostBridge::new()))
    }

    #[test]
    fn slots() {
        let mut root = PciRoot::new();
        assert_eq!(root.add_device(None, dev()), Ok(PciAddress::new(1, 0)));
        assert_eq!(root.add_device(Some(3), dev()), Ok(PciAddress::new(3, 0)));
        assert_eq!(root.add_device(None, dev()), Ok(PciAddress::new(2, 0)));
        assert_eq!(root.add_device(None, dev()), Ok(PciAddress::new(4, 0)));
        assert_eq!(
            root.add_device(Some(3), dev()),
            Err(PciError::Occupied(PciAddress::new(3, 0)))
        );
        assert_eq!(
            root.add_device(Some(0), dev()),
            Err(PciError::Occupied(PciAddress::new(0, 0)))
        );
        assert_eq!(
            root.add_device(Some(32), dev()),
            Err(PciError::InvalidSlot(32))
        );
        assert_eq!(
            root.add_function(PciAddress::new(3, 8), dev()),
            Err(PciError::InvalidFunction(8))
        );
        let mut bad = PciAddress::new(5, 0);
        bad.bus = 1;
        assert_eq!(root.add_function(bad, dev()), Err(PciError::InvalidBus(1)));
        assert!(root.add_function(PciAddress::new(5, 1), dev()).is_ok());
        // A slot with any function present is not free for add_device.
        assert_eq!(root.add_device(None, dev()), Ok(PciAddress::new(6, 0)));
        for _ in 7..32 {
            assert!(root.add_device(None, dev()).is_ok());
        }
        assert_eq!(root.add_device(None, dev()), Err(PciError::NoFreeSlot));
        assert_eq!(root.devices().len(), 32);
        assert_eq!(PciAddress::new(0x1f, 7).to_string(), "0000:00:1f.7");
        assert_eq!(PciAddress::new(0x1f, 7).devfn(), 0xff);
    }

    #[test]
    fn segments() {
        assert_eq!(PciRoot::new().segment(), 0);
        let a = PciAddress::in_segment(0xabcd, 0x1f, 7);
        assert_eq!(a.to_string(), "abcd:00:1f.7");
        assert_eq!(a.devfn(), 0xff);
        assert!(PciAddress::new(3, 0) < PciAddress::in_segment(1, 0, 0));

        let mut root = PciRoot::with_segment(1);
        assert_eq!(
            root.add_device(None, dev()),
            Ok(PciAddress::in_segment(1, 1, 0))
        );
        assert_eq!(
            root.add_device(Some(1), dev()),
            Err(PciError::Occupied(PciAddress::in_segment(1, 1, 0)))
        );
        let other = PciAddress::new(5, 0);
        assert_eq!(
            root.add_function(other, dev()),
            Err(PciError::WrongSegment(other, 1))
        );
        assert_eq!(
            PciError::WrongSegment(other, 1).to_string(),
            "0000:00:05.0 is not on segment 0001"
        );
        assert!(root
            .add_function(PciAddress::in_segment(1, 1, 1), dev())
            .is_ok());
        assert_eq!(
            root.addresses(),
            [(0, 0), (1, 0), (1, 1)].map(|(d, f)| PciAddress::in_segment(1, d, f))
        );
        assert!(root.device(PciAddress::new(0, 0)).is_none());
        assert!(root.device(PciAddress::in_segment(1, 0, 0)).is_some());
        assert!(format!("{root:?}").contains("segment: 1"));
    }

    #[test]
    fn config_address_register() {
        let port = ConfigAddressPort::default();
        assert_eq!(port.target(), None);
        port.set(0x8000_0000 | 2 << 16 | 3 << 11 | 5 << 8 | 0x47);
        assert_eq!(port.value(), 0x8002_1d44);
        assert_eq!(
            port.target(),
            Some((
                PciAddress {
                    segment: 0,
                    bus: 2,
                    device: 3,
                    function: 5
                },
                0x44
            ))
        );
        port.set(0x8f00_0010);
        assert_eq!(port.target(), Some((PciAddress::new(0, 0), 0xf10)));
        port.set(0x7fff_ffff);
        assert_eq!(port.target(), None);
    }
}
