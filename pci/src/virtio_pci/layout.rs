//! BAR 0 of a virtio-pci function and the virtio vendor-specific capabilities that
//! describe it (virtio 1.2, 4.1.4).
//!
//! BAR 0 is a 64 KiB, 64-bit, non-prefetchable memory BAR:
//!
//! | offset | size | contents | capability |
//! |---|---|---|---|
//! | 0x0000 | 0x1000 | common configuration (0x3c bytes used) | cfg_type 1 (COMMON) |
//! | 0x1000 | 0x1000 | ISR status (1 byte used, read-to-clear) | cfg_type 3 (ISR) |
//! | 0x2000 | 0x1000 | device-specific configuration | cfg_type 4 (DEVICE) |
//! | 0x3000 | 0x1000 | queue notifications: queue `i` at `0x3000 + 4 * i` | cfg_type 2 (NOTIFY), multiplier 4 |
//! | 0x8000 | 0x4000 | MSI-X table (16 bytes per vector, at most 1024 vectors) | MSI-X |
//! | 0xc000 | 0x1000 | MSI-X PBA | MSI-X |
//!
//! The ISR, device and common capabilities advertise their whole 4 KiB region (as
//! QEMU does; unused bytes read 0), the notify capability `4 * num_queues` bytes. A
//! fifth capability, cfg_type 5 (PCI_CFG), is the configuration-space window into
//! BAR 0 for firmware that cannot map it.

use crate::capability::CAP_ID_VENDOR;
use crate::config::ConfigSpace;

use super::VirtioPciError;

/// The BAR register index of the virtio structures and the MSI-X table.
pub const BAR_INDEX: u8 = 0;
/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x1_0000;
/// Common configuration region.
pub const COMMON_OFFSET: u64 = 0x0000;
/// ISR status region.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device-specific configuration region.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Queue notification region.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Size of each of the four virtio regions.
pub const REGION_SIZE: u64 = 0x1000;
/// Distance between two queues' notification addresses (notify_off_multiplier).
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x8000;
/// Size reserved for the MSI-X table.
pub const MSIX_TABLE_SIZE: u64 = 0x4000;
/// MSI-X pending bit array.
pub const MSIX_PBA_OFFSET: u64 = 0xc000;
/// Size reserved for the PBA.
pub const MSIX_PBA_SIZE: u64 = 0x1000;

/// virtio_pci_cap.cfg_type values (virtio 1.2, 4.1.4): common configuration,
/// notifications, ISR status, device-specific configuration, PCI configuration access.
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

/// Offsets inside a virtio capability (from the capability start).
pub mod cap {
    /// cap_len (8 bits).
    pub const LEN: u16 = 2;
    /// cfg_type (8 bits).
    pub const CFG_TYPE: u16 = 3;
    /// bar (8 bits).
    pub const BAR: u16 = 4;
    /// offset (32 bits).
    pub const OFFSET: u16 = 8;
    /// length (32 bits).
    pub const LENGTH: u16 = 12;
    /// notify_off_multiplier of the NOTIFY capability, pci_cfg_data of the PCI_CFG
    /// capability (32 bits).
    pub const EXTRA: u16 = 16;
    /// Size of a plain virtio capability.
    pub const SIZE: u8 = 16;
    /// Size of the NOTIFY and PCI_CFG capabilities.
    pub const SIZE_EXTRA: u8 = 20;
}

/// Configuration-space offsets of the virtio capabilities of one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCaps {
    /// The COMMON capability.
    pub common: u8,
    /// The NOTIFY capability.
    pub notify: u8,
    /// The ISR capability.
    pub isr: u8,
    /// The DEVICE capability.
    pub device: u8,
    /// The PCI_CFG capability (its pci_cfg_data is at `pci_cfg + 16`).
    pub pci_cfg: u8,
}

/// Appends one virtio capability; `extra` is the 4-byte field after `length`.
fn add_cap(
    cfg: &mut ConfigSpace,
    cfg_type: u8,
    offset: u32,
    length: u32,
    extra: Option<[u8; 4]>,
    write_mask: &[u8],
) -> Result<u8, VirtioPciError> {
    let size = if extra.is_some() {
        cap::SIZE_EXTRA
    } else {
        cap::SIZE
    };
    // Body = the capability after its 2-byte id/next header.
    let mut body = vec![size, cfg_type, BAR_INDEX, 0, 0, 0];
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    if let Some(extra) = extra {
        body.extend_from_slice(&extra);
    }
    Ok(cfg.add_capability(CAP_ID_VENDOR, &body, write_mask)?)
}

/// Adds the five virtio capabilities for a function with `num_queues` queues.
pub fn add_virtio_caps(
    cfg: &mut ConfigSpace,
    num_queues: u16,
) -> Result<VirtioCaps, VirtioPciError> {
    let region = REGION_SIZE as u32;
    let common = add_cap(
        cfg,
        cfg_type::COMMON,
        COMMON_OFFSET as u32,
        region,
        None,
        &[],
    )?;
    let notify_len = (u32::from(num_queues) * NOTIFY_OFF_MULTIPLIER).max(NOTIFY_OFF_MULTIPLIER);
    let notify = add_cap(
        cfg,
        cfg_type::NOTIFY,
        NOTIFY_OFFSET as u32,
        notify_len,
        Some(NOTIFY_OFF_MULTIPLIER.to_le_bytes()),
        &[],
    )?;
    let isr = add_cap(cfg, cfg_type::ISR, ISR_OFFSET as u32, region, None, &[])?;
    let device = add_cap(
        cfg,
        cfg_type::DEVICE,
        DEVICE_OFFSET as u32,
        region,
        None,
        &[],
    )?;
    // PCI_CFG: the driver writes bar, offset and length, then accesses pci_cfg_data
    // (its 4 data bytes are writable so a write lands there before the transport
    // forwards it to the BAR).
    let mut wmask = [0u8; 18];
    wmask[usize::from(cap::BAR - 2)] = 0xff;
    for field in [cap::OFFSET, cap::LENGTH, cap::EXTRA] {
        let at = usize::from(field - 2);
        wmask[at..at + 4].fill(0xff);
    }
    let pci_cfg = add_cap(cfg, cfg_type::PCI_CFG, 0, 0, Some([0; 4]), &wmask)?;
    Ok(VirtioCaps {
        common,
        notify,
        isr,
        device,
        pci_cfg,
    })
}
