//! Type-0 PCI configuration space (4 KiB, PCIe extended space included).
//!
//! [`ConfigSpace`] stores the 4096 bytes together with two per-byte masks:
//!
//! - the **write mask**: the bits the guest may change (everything else is read-only);
//! - the **RW1C mask**: bits the guest clears by writing 1 (status registers).
//!
//! Device code writes its own registers with the `set_*` helpers, which bypass both
//! masks. Capabilities are added with the builders in [`crate::capability`]
//! ([`ConfigSpace::add_capability`], [`ConfigSpace::add_pcie_capability`], ...) and
//! BARs with [`ConfigSpace::add_bar`] (see [`crate::bar`]); guest writes through
//! [`ConfigSpace::write`] report the BAR decoding changes they cause.
//!
//! A typical `PciDevice` implementation:
//!
//! ```
//! use ferrio_pci::config::{ConfigSpace, PciIds};
//! use ferrio_pci::{BarInfo, BarKind};
//!
//! let mut cfg = ConfigSpace::new(&PciIds {
//!     vendor: 0x1af4,
//!     device: 0x1041,
//!     class: 0x020000,
//!     revision: 1,
//!     subsystem_vendor: 0x1af4,
//!     subsystem_device: 0x0040,
//! });
//! cfg.add_bar(BarInfo { index: 0, kind: BarKind::Mmio64 { prefetchable: false }, size: 0x4000 })
//!     .unwrap();
//! cfg.add_pcie_capability(ferrio_pci::capability::PciePortType::Endpoint).unwrap();
//! // write_config(offset, data) => cfg.write(offset, data) returns the BarMapping list.
//! assert_eq!(cfg.read_u16(0), 0x1af4);
//! ```

use crate::bar::Bars;
use crate::BarMapping;

/// Size of a PCIe function's configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional PCI part (where standard capabilities live).
pub const PCI_CONFIG_SPACE_SIZE: usize = 256;

/// Vendor ID register (16 bits).
pub const VENDOR_ID: u16 = 0x00;
/// Device ID register (16 bits).
pub const DEVICE_ID: u16 = 0x02;
/// Command register (16 bits).
pub const COMMAND: u16 = 0x04;
/// Status register (16 bits).
pub const STATUS: u16 = 0x06;
/// Revision ID (8 bits).
pub const REVISION_ID: u16 = 0x08;
/// Class code: programming interface (0x09), sub-class (0x0a), base class (0x0b).
pub const CLASS_CODE: u16 = 0x09;
/// Cache line size (8 bits, a guest scratch register).
pub const CACHE_LINE_SIZE: u16 = 0x0c;
/// Header type (8 bits; bit 7 = multi-function).
pub const HEADER_TYPE: u16 = 0x0e;
/// BIST (8 bits, read-only 0: not supported).
pub const BIST: u16 = 0x0f;
/// First BAR register; BAR `n` is at `BAR0 + 4 * n`.
pub const BAR0: u16 = 0x10;
/// Subsystem vendor ID (16 bits).
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID (16 bits).
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Expansion ROM base address (read-only 0: no ROM).
pub const ROM_ADDRESS: u16 = 0x30;
/// Capabilities pointer (8 bits).
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Interrupt line (8 bits, a guest scratch register).
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt pin (8 bits; 0 = no INTx).
pub const INTERRUPT_PIN: u16 = 0x3d;

/// Command: memory space enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: INTx emulation disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: the function has a capabilities list.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status bits that are RW1C (master data parity error, signalled/received target
/// abort, received master abort, signalled system error, detected parity error).
pub const STATUS_RW1C: u16 = 0xf900;

/// Identity of a function, written into the read-only header fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code: base class << 16 | sub-class << 8 | programming interface.
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem_device: u16,
}

/// Whether `[offset, offset + len)` overlaps `[start, end)` (no overflow on any input).
pub fn ranges_overlap(offset: u16, len: usize, start: u16, end: u16) -> bool {
    let (o, s, e) = (offset as usize, start as usize, end as usize);
    len > 0 && o < e && o.saturating_add(len) > s
}

/// A type-0 configuration space with write/RW1C masks, capabilities and BARs.
#[derive(Clone)]
pub struct ConfigSpace {
    pub(crate) data: Box<[u8; CONFIG_SPACE_SIZE]>,
    pub(crate) wmask: Box<[u8; CONFIG_SPACE_SIZE]>,
    pub(crate) w1c: Box<[u8; CONFIG_SPACE_SIZE]>,
    /// Offset of the last standard capability (0: none).
    pub(crate) last_cap: u8,
    /// First free offset for the next standard capability.
    pub(crate) next_cap: u16,
    /// Offset of the last extended capability (0: none).
    pub(crate) last_ext_cap: u16,
    /// First free offset for the next extended capability.
    pub(crate) next_ext_cap: u16,
    pub(crate) bars: Bars,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor", &format_args!("{:#06x}", self.read_u16(VENDOR_ID)))
            .field("device", &format_args!("{:#06x}", self.read_u16(DEVICE_ID)))
            .field("command", &format_args!("{:#06x}", self.command()))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// A header-type-0, single-function configuration space with the given identity,
    /// no capabilities, no BARs and no interrupt pin. Guest-writable: command bits
    /// memory space, bus master and INTx disable, the cache line size and interrupt
    /// line scratch registers; RW1C: status bits 15..11 and 8.
    pub fn new(ids: &PciIds) -> Self {
        let mut cfg = ConfigSpace {
            data: Box::new([0; CONFIG_SPACE_SIZE]),
            wmask: Box::new([0; CONFIG_SPACE_SIZE]),
            w1c: Box::new([0; CONFIG_SPACE_SIZE]),
            last_cap: 0,
            next_cap: 0x40,
            last_ext_cap: 0,
            next_ext_cap: PCI_CONFIG_SPACE_SIZE as u16,
            bars: Bars::default(),
        };
        cfg.set_u16(VENDOR_ID, ids.vendor);
        cfg.set_u16(DEVICE_ID, ids.device);
        cfg.set_u8(REVISION_ID, ids.revision);
        let class = (ids.class & 0x00ff_ffff).to_le_bytes();
        cfg.set_bytes(CLASS_CODE, &class[..3]);
        cfg.set_u8(HEADER_TYPE, 0);
        cfg.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        cfg.set_u16(SUBSYSTEM_ID, ids.subsystem_device);
        cfg.set_u8(INTERRUPT_PIN, 0);
        cfg.set_write_mask(
            COMMAND,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE).to_le_bytes(),
        );
        cfg.set_w1c_mask(STATUS, &STATUS_RW1C.to_le_bytes());
        cfg.set_write_mask(CACHE_LINE_SIZE, &[0xff]);
        cfg.set_write_mask(INTERRUPT_LINE, &[0xff]);
        cfg
    }

    /// Guest read: fills `data` from `offset`; bytes beyond 4 KiB read as 0xff.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.data.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    /// Guest write of `data` at `offset`, applying the write and RW1C masks; bytes
    /// beyond 4 KiB are ignored. Returns the BAR decoding changes the write caused
    /// (what [`crate::PciDevice::write_config`] returns).
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Vec<BarMapping> {
        for (i, &val) in data.iter().enumerate() {
            let off = offset as usize + i;
            let (Some(byte), Some(&wm), Some(&w1c)) = (
                self.data.get_mut(off),
                self.wmask.get(off),
                self.w1c.get(off),
            ) else {
                break;
            };
            *byte = ((*byte & !wm) | (val & wm)) & !(val & w1c);
        }
        if ranges_overlap(offset, data.len(), COMMAND, COMMAND + 2)
            || ranges_overlap(offset, data.len(), BAR0, BAR0 + 24)
        {
            self.update_bar_mappings()
        } else {
            Vec::new()
        }
    }

    /// Reads a byte (0xff beyond 4 KiB).
    pub fn read_u8(&self, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    /// Reads a little-endian u16 (0xff bytes beyond 4 KiB).
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads a little-endian u32 (0xff bytes beyond 4 KiB).
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Device-side write of raw bytes, ignoring both masks (bytes beyond 4 KiB are
    /// dropped). Does not report BAR changes: device code does not move BARs this way.
    pub fn set_bytes(&mut self, offset: u16, bytes: &[u8]) {
        Self::store(&mut self.data[..], offset, bytes);
    }

    /// Device-side write of a byte (ignores the masks).
    pub fn set_u8(&mut self, offset: u16, value: u8) {
        self.set_bytes(offset, &[value]);
    }

    /// Device-side write of a little-endian u16 (ignores the masks).
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Device-side write of a little-endian u32 (ignores the masks).
    pub fn set_u32(&mut self, offset: u16, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets which bits of the bytes at `offset` the guest may write (1 = writable).
    pub fn set_write_mask(&mut self, offset: u16, mask: &[u8]) {
        Self::store(&mut self.wmask[..], offset, mask);
    }

    /// Sets which bits of the bytes at `offset` are RW1C (guest writes 1 to clear).
    pub fn set_w1c_mask(&mut self, offset: u16, mask: &[u8]) {
        Self::store(&mut self.w1c[..], offset, mask);
    }

    /// The guest write mask of the byte at `offset` (0 beyond 4 KiB).
    pub fn write_mask(&self, offset: u16) -> u8 {
        self.wmask.get(offset as usize).copied().unwrap_or(0)
    }

    /// The RW1C mask of the byte at `offset` (0 beyond 4 KiB).
    pub fn w1c_mask(&self, offset: u16) -> u8 {
        self.w1c.get(offset as usize).copied().unwrap_or(0)
    }

    /// Device-side: sets RW1C status bits (e.g. an error the device detected) at
    /// `offset`, the bits the guest later clears by writing 1.
    pub fn raise_status_bits(&mut self, offset: u16, bits: &[u8]) {
        for (i, &b) in bits.iter().enumerate() {
            if let Some(d) = self.data.get_mut(offset as usize + i) {
                *d |= b;
            }
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// Whether memory space decoding is enabled (command bit 1).
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Whether the function may master the bus, i.e. do DMA and send MSIs (bit 2).
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Sets or clears the multi-function bit of the header type (function 0 of a
    /// multi-function device sets it so the guest scans functions 1..8).
    pub fn set_multifunction(&mut self, multi: bool) {
        let ht = self.read_u8(HEADER_TYPE);
        self.set_u8(HEADER_TYPE, if multi { ht | 0x80 } else { ht & 0x7f });
    }

    fn store(buf: &mut [u8], offset: u16, bytes: &[u8]) {
        let start = (offset as usize).min(buf.len());
        let end = start.saturating_add(bytes.len()).min(buf.len());
        if let Some(dst) = buf.get_mut(start..end) {
            dst.copy_from_slice(&bytes[..end - start]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1041,
            class: 0x020000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem_device: 0x40,
        }
    }

    #[test]
    fn header_fields() {
        let cfg = ConfigSpace::new(&ids());
        assert_eq!(cfg.read_u32(0), 0x1041_1af4);
        assert_eq!(cfg.read_u32(0x08), 0x0200_0001);
        assert_eq!(cfg.read_u8(HEADER_TYPE), 0);
        assert_eq!(cfg.read_u32(0x2c), 0x0040_1af4);
        assert_eq!(cfg.read_u8(INTERRUPT_PIN), 0);
        assert_eq!(cfg.read_u8(CAPABILITIES_POINTER), 0);
        assert_eq!(cfg.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        assert_eq!(cfg.command(), 0);
    }

    #[test]
    fn read_only_fields_stay() {
        let mut cfg = ConfigSpace::new(&ids());
        let before: Vec<u8> = (0..0x40).map(|o| cfg.read_u8(o)).collect();
        for off in (0..0x40).step_by(4) {
            if (0x10..0x28).contains(&off) || off == COMMAND || off == 0x0c || off == 0x3c {
                continue;
            }
            cfg.write(off, &[0xff; 4]);
            cfg.write(off, &[0x00; 4]);
        }
        let after: Vec<u8> = (0..0x40).map(|o| cfg.read_u8(o)).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn command_write_mask() {
        let mut cfg = ConfigSpace::new(&ids());
        cfg.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(
            cfg.command(),
            COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
        );
        assert!(cfg.memory_enabled() && cfg.bus_master());
        cfg.write(COMMAND, &[0]);
        assert_eq!(cfg.command(), COMMAND_INTX_DISABLE);
        cfg.write(CACHE_LINE_SIZE, &[0x10]);
        cfg.write(INTERRUPT_LINE, &[0x0b]);
        assert_eq!(cfg.read_u8(CACHE_LINE_SIZE), 0x10);
        assert_eq!(cfg.read_u8(INTERRUPT_LINE), 0x0b);
    }

    #[test]
    fn status_rw1c() {
        let mut cfg = ConfigSpace::new(&ids());
        cfg.raise_status_bits(STATUS, &0xffffu16.to_le_bytes());
        // Device-side raise sets every bit asked; only the RW1C ones can be cleared.
        cfg.write(STATUS, &0x2000u16.to_le_bytes());
        assert_eq!(cfg.read_u16(STATUS), 0xdfff);
        cfg.write(STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(cfg.read_u16(STATUS), !STATUS_RW1C);
        // Writing 0 clears nothing and sets nothing.
        cfg.set_u16(STATUS, 0x0010);
        cfg.write(STATUS, &[0, 0]);
        assert_eq!(cfg.read_u16(STATUS), 0x0010);
    }

    #[test]
    fn out_of_range_accesses() {
        let mut cfg = ConfigSpace::new(&ids());
        let mut b = [0u8; 4];
        cfg.read(0xffe, &mut b);
        assert_eq!(b, [0, 0, 0xff, 0xff]);
        cfg.read(u16::MAX, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert!(cfg.write(u16::MAX, &[0xff; 8]).is_empty());
        cfg.set_bytes(0xfff, &[1, 2, 3]);
        assert_eq!(cfg.read_u8(0xfff), 1);
        cfg.set_write_mask(u16::MAX, &[0xff]);
        assert_eq!(cfg.write_mask(u16::MAX), 0);
        let mut big = vec![0u8; 9000];
        cfg.read(0, &mut big);
        assert_eq!(big[5000], 0xff);
    }

    #[test]
    fn overlap_helper() {
        assert!(ranges_overlap(4, 2, 4, 6));
        assert!(ranges_overlap(2, 4, 4, 6));
        assert!(!ranges_overlap(0, 4, 4, 6));
        assert!(!ranges_overlap(6, 4, 4, 6));
        assert!(!ranges_overlap(4, 0, 4, 6));
        assert!(!ranges_overlap(u16::MAX, usize::MAX, 0, 6));
    }
}
