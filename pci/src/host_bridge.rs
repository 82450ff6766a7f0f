//! The host bridge function at 00:00.0: a plain type-0 header with the host-bridge
//! class code, no BARs, no capabilities.

use crate::config::{ConfigSpace, PciIds};
use crate::{BarInfo, BarMapping, PciDevice};

/// Vendor ID of the host bridge (Red Hat, as QEMU's generic PCIe host bridge).
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
/// Device ID of the host bridge (QEMU's "PCIe host bridge").
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;
/// Class code: bridge device, host bridge.
pub const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;

/// The root complex's host bridge function.
#[derive(Debug, Clone)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// A host bridge with the ids above (subsystem ids the same, revision 0).
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(&PciIds {
                vendor: HOST_BRIDGE_VENDOR,
                device: HOST_BRIDGE_DEVICE,
                class: HOST_BRIDGE_CLASS,
                revision: 0,
                subsystem_vendor: HOST_BRIDGE_VENDOR,
                subsystem_device: HOST_BRIDGE_DEVICE,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Vec<BarMapping> {
        self.config.write(offset, data)
    }

    fn bars(&self) -> Vec<BarInfo> {
        Vec::new()
    }

    fn set_bar_address(&mut self, index: u8, _addr: u64) {
        tracing::debug!(index, "host bridge has no BARs");
    }

    fn bar_mapping(&self, _index: u8) -> Option<u64> {
        None
    }

    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_read_only() {
        let mut hb = HostBridge::new();
        let mut b = [0u8; 4];
        hb.read_config(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        hb.read_config(8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0600_0000);
        assert!(hb.write_config(0, &[0xff; 4]).is_empty());
        assert!(hb.write_config(4, &[0xff, 0xff]).is_empty());
        hb.read_config(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        hb.read_config(0x10, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(hb.bars().is_empty());
        hb.set_bar_address(0, 0x1000);
        assert_eq!(hb.bar_mapping(0), None);
    }
}
