//! VIOT (Virtual I/O Translation table): names the virtio-iommu PCI function and, for
//! each PCI function behind it, a one-function PCI range whose endpoint id is the
//! function's BDF (`bus << 8 | device << 3 | function`), the id the virtio-iommu
//! device registers for it.

use acpi_tables::viot::{PciDevice, PciRange, VirtIoPciIommu, VIOT};
use ferrio_pci::root::PciAddress;

use super::{to_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// The virtio-iommu and the functions whose DMA it translates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViotConfig {
    pub iommu: PciAddress,
    pub endpoints: Vec<PciAddress>,
}

fn device(a: PciAddress) -> PciDevice {
    PciDevice::new(a.segment, a.bus, a.device, a.function)
}

/// The VIOT table bytes.
pub fn viot(cfg: &ViotConfig) -> Vec<u8> {
    let mut table = VIOT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // The IOMMU node first: the ranges refer to it by its offset.
    let handle = table.add_virtio_pci_iommu(VirtIoPciIommu::new(device(cfg.iommu)));
    for &ep in &cfg.endpoints {
        table.add_pci_range(PciRange::new(device(ep), device(ep), &handle));
    }
    to_bytes(&table)
}

/// The endpoint id of a PCI function in the VIOT (its BDF).
pub fn endpoint_id(a: PciAddress) -> u32 {
    u32::from(a.bus) << 8 | u32::from(a.device) << 3 | u32::from(a.function)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(device: u8) -> PciAddress {
        PciAddress {
            segment: 0,
            bus: 0,
            device,
            function: 0,
        }
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    #[test]
    fn iommu_node_and_one_range_per_endpoint() {
        let cfg = ViotConfig {
            iommu: addr(2),
            endpoints: vec![addr(3), addr(5)],
        };
        let t = viot(&cfg);
        assert_eq!(&t[..4], b"VIOT");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        assert_eq!(u16_at(&t, 36), 3, "node count");
        let first = u16_at(&t, 38) as usize;
        assert_eq!(first, 48);
        // virtio-pci IOMMU node: type 3, length 16, segment 0, BDF 00:02.0.
        assert_eq!((t[first], u16_at(&t, first + 2)), (3, 16));
        assert_eq!(u16_at(&t, first + 6), 2 << 3);
        // PCI range nodes: type 1, length 24, endpoint id = BDF, start = end = BDF,
        // output node = the IOMMU node's offset.
        for (i, dev) in [3u8, 5].into_iter().enumerate() {
            let n = first + 16 + 24 * i;
            assert_eq!((t[n], u16_at(&t, n + 2)), (1, 24));
            let bdf = u16::from(dev) << 3;
            assert_eq!(
                u32::from_le_bytes(t[n + 4..n + 8].try_into().unwrap()),
                u32::from(bdf)
            );
            assert_eq!((u16_at(&t, n + 12), u16_at(&t, n + 14)), (bdf, bdf));
            assert_eq!(u16_at(&t, n + 16) as usize, first);
            assert_eq!(endpoint_id(addr(dev)), u32::from(bdf));
        }
        assert_eq!(t.len(), first + 16 + 2 * 24);
    }
}
