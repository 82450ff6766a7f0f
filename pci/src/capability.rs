//! Capability lists: standard capabilities in 0x40..0x100 (chained from the pointer at
//! 0x34) and PCIe extended capabilities in 0x100..0x1000 (chained from 0x100), plus the
//! PCI Express capability every PCIe function carries.
//!
//! Capabilities are appended in order; each builder returns the capability's offset,
//! which device code keeps to locate its registers (e.g. `offset + 2`).

use crate::config::{ConfigSpace, CAPABILITIES_POINTER, STATUS, STATUS_CAP_LIST};

/// Capability ID: MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability ID: vendor specific (virtio-pci structures).
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability ID: PCI Express.
pub const CAP_ID_PCIE: u8 = 0x10;
/// Capability ID: MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// First offset of the standard capability area.
pub const CAP_START: u16 = 0x40;
/// End (exclusive) of the standard capability area.
pub const CAP_END: u16 = 0x100;
/// First offset of the extended capability area.
pub const EXT_CAP_START: u16 = 0x100;
/// End (exclusive) of the extended capability area.
pub const EXT_CAP_END: u16 = 0x1000;

/// Errors of the capability builders.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// The capability does not fit in the remaining space of its area.
    #[error("no room for a {len}-byte capability (id {id:#x})")]
    NoSpace { id: u16, len: usize },
    /// An extended capability version does not fit in 4 bits.
    #[error("extended capability version {0} does not fit in 4 bits")]
    InvalidVersion(u8),
}

/// Offsets of the registers inside the PCI Express capability.
pub mod pcie {
    /// PCI Express capabilities register (16 bits).
    pub const FLAGS: u16 = 0x02;
    /// Device capabilities (32 bits).
    pub const DEVCAP: u16 = 0x04;
    /// Device control (16 bits).
    pub const DEVCTL: u16 = 0x08;
    /// Device status (16 bits).
    pub const DEVSTA: u16 = 0x0a;
    /// Link capabilities (32 bits).
    pub const LNKCAP: u16 = 0x0c;
    /// Link control (16 bits).
    pub const LNKCTL: u16 = 0x10;
    /// Link status (16 bits).
    pub const LNKSTA: u16 = 0x12;
    /// Device capabilities 2 (32 bits).
    pub const DEVCAP2: u16 = 0x24;
    /// Device control 2 (16 bits).
    pub const DEVCTL2: u16 = 0x28;
    /// Link capabilities 2 (32 bits).
    pub const LNKCAP2: u16 = 0x2c;
    /// Link control 2 (16 bits).
    pub const LNKCTL2: u16 = 0x30;
    /// Length of a version 2 capability.
    pub const LEN: usize = 0x3c;
    /// Device control: the guest-writable bits (error reporting enables, relaxed
    /// ordering, max payload size, extended tag, no snoop, max read request size).
    pub const DEVCTL_WMASK: u16 = 0x79ff;
    /// Device control reset value: relaxed ordering, no snoop, 512-byte reads.
    pub const DEVCTL_DEFAULT: u16 = 0x2810;
    /// Device status RW1C bits (correctable/non-fatal/fatal/unsupported request
    /// detected).
    pub const DEVSTA_RW1C: u16 = 0x000f;
    /// Device capabilities: role-based error reporting (128-byte max payload).
    pub const DEVCAP_DEFAULT: u32 = 1 << 15;
    /// Link capabilities of an endpoint: 2.5 GT/s, x1, no ASPM, port 0.
    pub const LNKCAP_X1_2_5GT: u32 = 0x1 | (1 << 4);
    /// Link control: the guest-writable bits (ASPM control, common clock, extended
    /// synch).
    pub const LNKCTL_WMASK: u16 = 0x00c3;
    /// Link status of an endpoint: trained at 2.5 GT/s x1, common slot clock.
    pub const LNKSTA_X1_2_5GT: u16 = 0x1 | (1 << 4) | (1 << 12);
    /// Device capabilities 2: completion timeout disable supported.
    pub const DEVCAP2_DEFAULT: u32 = 1 << 4;
    /// Device control 2: the guest-writable bits (completion timeout disable).
    pub const DEVCTL2_WMASK: u16 = 1 << 4;
    /// Link capabilities 2: supported speeds vector = 2.5 GT/s.
    pub const LNKCAP2_2_5GT: u32 = 1 << 1;
    /// Link control 2: target link speed 2.5 GT/s.
    pub const LNKCTL2_2_5GT: u16 = 0x1;
}

/// Device/port type of a function's PCI Express capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciePortType {
    /// A PCI Express endpoint (has a link: reported as x1 at 2.5 GT/s, trained).
    Endpoint,
    /// A root complex integrated endpoint (no link registers).
    RootComplexIntegratedEndpoint,
}

impl PciePortType {
    fn code(self) -> u16 {
        match self {
            PciePortType::Endpoint => 0x0,
            PciePortType::RootComplexIntegratedEndpoint => 0x9,
        }
    }
}

impl ConfigSpace {
    /// Appends a standard capability: `id`, the `next` pointer, then `body` (the bytes
    /// after the 2-byte header). `write_mask[i]` gives the guest-writable bits of
    /// `body[i]` (missing entries are read-only). The capability starts 4-byte aligned
    /// in 0x40..0x100; returns its offset. Sets the capabilities-list status bit.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        write_mask: &[u8],
    ) -> Result<u8, CapabilityError> {
        let len = body.len() + 2;
        let start = self.next_cap;
        let end = usize::from(start) + len;
        let no_space = CapabilityError::NoSpace { id: id.into(), len };
        if end > usize::from(CAP_END) {
            return Err(no_space);
        }
        let Ok(off) = u8::try_from(start) else {
            return Err(no_space);
        };
        self.set_u8(start, id);
        self.set_u8(start + 1, 0);
        self.set_bytes(start + 2, body);
        let n = write_mask.len().min(body.len());
        self.set_write_mask(start + 2, &write_mask[..n]);
        if self.last_cap == 0 {
            self.set_u8(CAPABILITIES_POINTER, off);
        } else {
            self.set_u8(u16::from(self.last_cap) + 1, off);
        }
        self.last_cap = off;
        self.next_cap = (end as u16 + 3) & !3;
        let status = self.read_u16(STATUS);
        self.set_u16(STATUS, status | STATUS_CAP_LIST);
        tracing::trace!(id, offset = off, len, "capability added");
        Ok(off)
    }

    /// Appends a PCIe extended capability (header: `id` in bits 15:0, `version` in
    /// 19:16, next offset in 31:20) followed by `body`, 4-byte aligned in
    /// 0x100..0x1000; the first one is at 0x100. `write_mask` as for
    /// [`Self::add_capability`]. Returns its offset.
    pub fn add_extended_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
        write_mask: &[u8],
    ) -> Result<u16, CapabilityError> {
        if version > 0xf {
            return Err(CapabilityError::InvalidVersion(version));
        }
        let len = body.len() + 4;
        let start = self.next_ext_cap;
        let end = usize::from(start) + len;
        if end > usize::from(EXT_CAP_END) {
            return Err(CapabilityError::NoSpace { id, len });
        }
        self.set_u32(start, u32::from(id) | u32::from(version) << 16);
        self.set_bytes(start + 4, body);
        let n = write_mask.len().min(body.len());
        self.set_write_mask(start + 4, &write_mask[..n]);
        if self.last_ext_cap != 0 {
            let prev = self.read_u32(self.last_ext_cap);
            self.set_u32(
                self.last_ext_cap,
                (prev & 0x000f_ffff) | u32::from(start) << 20,
            );
        }
        self.last_ext_cap = start;
        self.next_ext_cap = (end as u16 + 3) & !3;
        tracing::trace!(id, offset = start, len, "extended capability added");
        Ok(start)
    }

    /// Adds a version 2 PCI Express capability of `port_type`: device capabilities
    /// (128-byte payload, role-based error reporting, no FLR), a writable device
    /// control, RW1C device status, link registers for an endpoint (x1 at 2.5 GT/s,
    /// trained), minimal device capabilities/control 2. Returns its offset.
    pub fn add_pcie_capability(&mut self, port_type: PciePortType) -> Result<u8, CapabilityError> {
        use pcie::*;
        let mut body = [0u8; LEN - 2];
        let mut wmask = [0u8; LEN - 2];
        // Registers at fixed offsets inside a fixed-size body: cannot go out of range.
        fn put(buf: &mut [u8], reg: u16, bytes: &[u8]) {
            let at = usize::from(reg) - 2;
            buf[at..at + bytes.len()].copy_from_slice(bytes);
        }
        put(
            &mut body,
            FLAGS,
            &(0x2 | port_type.code() << 4).to_le_bytes(),
        );
        put(&mut body, DEVCAP, &DEVCAP_DEFAULT.to_le_bytes());
        put(&mut body, DEVCTL, &DEVCTL_DEFAULT.to_le_bytes());
        put(&mut wmask, DEVCTL, &DEVCTL_WMASK.to_le_bytes());
        if port_type == PciePortType::Endpoint {
            put(&mut body, LNKCAP, &LNKCAP_X1_2_5GT.to_le_bytes());
            put(&mut wmask, LNKCTL, &LNKCTL_WMASK.to_le_bytes());
            put(&mut body, LNKSTA, &LNKSTA_X1_2_5GT.to_le_bytes());
            put(&mut body, LNKCAP2, &LNKCAP2_2_5GT.to_le_bytes());
            put(&mut body, LNKCTL2, &LNKCTL2_2_5GT.to_le_bytes());
        }
        put(&mut body, DEVCAP2, &DEVCAP2_DEFAULT.to_le_bytes());
        put(&mut wmask, DEVCTL2, &DEVCTL2_WMASK.to_le_bytes());
        let off = self.add_capability(CAP_ID_PCIE, &body, &wmask)?;
        self.set_w1c_mask(u16::from(off) + DEVSTA, &DEVSTA_RW1C.to_le_bytes());
        Ok(off)
    }

    /// The standard capabilities as `(id, offset)`, walking the list from 0x34 the
    /// way a guest does (bounded, so a corrupt list cannot loop).
    pub fn capabilities(&self) -> Vec<(u8, u8)> {
        let mut caps = Vec::new();
        let mut ptr = self.read_u8(CAPABILITIES_POINTER) & !3;
        while ptr >= CAP_START as u8 && caps.len() < 48 {
            caps.push((self.read_u8(ptr.into()), ptr));
            ptr = self.read_u8(u16::from(ptr) + 1) & !3;
        }
        caps
    }

    /// Offset of the first standard capability with `id`.
    pub fn find_capability(&self, id: u8) -> Option<u8> {
        self.capabilities()
            .into_iter()
            .find(|&(cid, _)| cid == id)
            .map(|(_, off)| off)
    }

    /// The extended capabilities as `(id, version, offset)`, walking from 0x100.
    pub fn extended_capabilities(&self) -> Vec<(u16, u8, u16)> {
        let mut caps = Vec::new();
        let mut ptr = EXT_CAP_START;
        while ptr >= EXT_CAP_START && caps.len() < 960 {
            let header = self.read_u32(ptr);
            if header == 0 || header == u32::MAX {
                break;
            }
            caps.push((header as u16, (header >> 16 & 0xf) as u8, ptr));
            ptr = (header >> 20) as u16 & !3;
        }
        caps
    }

    /// Offset of the first extended capability with `id`.
    pub fn find_extended_capability(&self, id: u16) -> Option<u16> {
        self.extended_capabilities()
            .into_iter()
            .find(|&(cid, _, _)| cid == id)
            .map(|(_, _, off)| off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PciIds;

    fn cfg() -> ConfigSpace {
        ConfigSpace::new(&PciIds::default())
    }

    #[test]
    fn chain_and_find() {
        let mut c = cfg();
        let pcie = c.add_pcie_capability(PciePortType::Endpoint).expect("pcie");
        let vendor = c
            .add_capability(
                CAP_ID_VENDOR,
                &[14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                &[],
            )
            .expect("vendor");
        assert_eq!(pcie, 0x40);
        assert_eq!(vendor, 0x7c);
        let odd = c.add_capability(0x42, &[0xaa], &[0xff]).expect("odd");
        assert_eq!(odd, 0x8c);
        assert_eq!(c.read_u8(0x34), 0x40);
        assert_eq!(c.read_u16(0x40), 0x7c10);
        assert_eq!(c.read_u16(0x7c), 0x8c09);
        assert_eq!(c.read_u16(0x8c), 0x0042);
        assert_ne!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        assert_eq!(
            c.capabilities(),
            vec![(CAP_ID_PCIE, 0x40), (CAP_ID_VENDOR, 0x7c), (0x42, 0x8c)]
        );
        assert_eq!(c.find_capability(CAP_ID_VENDOR), Some(0x7c));
        assert_eq!(c.find_capability(CAP_ID_MSIX), None);
        // Header bytes are read-only, writable body bytes follow the mask.
        c.write(0x8c, &[0xff, 0xff, 0x55]);
        assert_eq!(c.read_u32(0x8c), 0x0055_0042);
    }

    #[test]
    fn area_exhaustion() {
        let mut c = cfg();
        assert!(c.add_capability(1, &[0; 0xb0], &[]).is_ok());
        assert_eq!(
            c.add_capability(2, &[0; 14], &[]),
            Err(CapabilityError::NoSpace { id: 2, len: 16 })
        );
        assert_eq!(c.add_capability(2, &[0; 10], &[]), Ok(0xf4));
        assert!(c.add_capability(3, &[], &[]).is_err());
        assert_eq!(c.capabilities().len(), 2);
        assert!(c.add_extended_capability(1, 16, &[], &[]).is_err());
        assert!(c.add_extended_capability(1, 1, &[0; 0xf00], &[]).is_err());
    }

    #[test]
    fn extended_chain() {
        let mut c = cfg();
        assert!(c.extended_capabilities().is_empty());
        let a = c
            .add_extended_capability(0x0b, 1, &[1, 2, 3], &[0xff])
            .unwrap();
        let b = c.add_extended_capability(0x23, 2, &[0; 8], &[]).unwrap();
        assert_eq!((a, b), (0x100, 0x108));
        assert_eq!(c.read_u32(0x100), 0x1081_000b);
        assert_eq!(c.read_u32(0x108), 0x0002_0023);
        assert_eq!(
            c.extended_capabilities(),
            vec![(0x0b, 1, 0x100), (0x23, 2, 0x108)]
        );
        assert_eq!(c.find_extended_capability(0x23), Some(0x108));
        c.write(0x100, &[0xff; 8]);
        assert_eq!(c.read_u32(0x104), 0x0003_02ff);
    }

    #[test]
    fn pcie_capability_registers() {
        use pcie::*;
        let mut c = cfg();
        let off = u16::from(c.add_pcie_capability(PciePortType::Endpoint).unwrap());
        assert_eq!(c.read_u16(off + FLAGS), 0x0002);
        assert_eq!(c.read_u32(off + DEVCAP), DEVCAP_DEFAULT);
        assert_eq!(c.read_u16(off + DEVCTL), DEVCTL_DEFAULT);
        c.write(off + DEVCTL, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(off + DEVCTL), DEVCTL_WMASK);
        c.raise_status_bits(off + DEVSTA, &0x003fu16.to_le_bytes());
        c.write(off + DEVSTA, &0x0005u16.to_le_bytes());
        assert_eq!(c.read_u16(off + DEVSTA), 0x003a);
        assert_eq!(c.read_u32(off + LNKCAP) & 0x3ff, 0x11);
        assert_eq!(c.read_u16(off + LNKSTA) & 0x3ff, 0x11);
        c.write(off + LNKSTA, &[0, 0]);
        assert_eq!(c.read_u16(off + LNKSTA), LNKSTA_X1_2_5GT);
        c.write(off + DEVCAP, &[0; 4]);
        assert_eq!(c.read_u32(off + DEVCAP), DEVCAP_DEFAULT);

        let mut r = cfg();
        let off = u16::from(
            r.add_pcie_capability(PciePortType::RootComplexIntegratedEndpoint)
                .unwrap(),
        );
        assert_eq!(r.read_u16(off + FLAGS), 0x0092);
        assert_eq!(r.read_u32(off + LNKCAP), 0);
        assert_eq!(r.read_u16(off + LNKSTA), 0);
        r.write(off + LNKCTL, &[0xff, 0xff]);
        assert_eq!(r.read_u16(off + LNKCTL), 0);
    }
}
