//! Test support of the virtio-iommu tests: request bytes as the Linux driver builds
//! them. The split ring driver, test memory and interrupt counter are
//! `ferrio_devices::virtio::testing` (its `test-utils` feature).

/// Request bytes (device-readable part) as the Linux driver builds them.
pub(crate) mod req {
    use crate::request::{T_ATTACH, T_DETACH, T_MAP, T_PROBE, T_UNMAP};

    fn head(kind: u8, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[0] = kind;
        v
    }

    pub fn attach(domain: u32, endpoint: u32) -> Vec<u8> {
        let mut v = head(T_ATTACH, 20);
        v[4..8].copy_from_slice(&domain.to_le_bytes());
        v[8..12].copy_from_slice(&endpoint.to_le_bytes());
        v
    }

    pub fn detach(domain: u32, endpoint: u32) -> Vec<u8> {
        let mut v = attach(domain, endpoint);
        v[0] = T_DETACH;
        v
    }

    pub fn map(domain: u32, virt_start: u64, virt_end: u64, phys: u64, flags: u32) -> Vec<u8> {
        let mut v = head(T_MAP, 36);
        v[4..8].copy_from_slice(&domain.to_le_bytes());
        v[8..16].copy_from_slice(&virt_start.to_le_bytes());
        v[16..24].copy_from_slice(&virt_end.to_le_bytes());
        v[24..32].copy_from_slice(&phys.to_le_bytes());
        v[32..36].copy_from_slice(&flags.to_le_bytes());
        v
    }

    pub fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> Vec<u8> {
        let mut v = head(T_UNMAP, 28);
        v[4..8].copy_from_slice(&domain.to_le_bytes());
        v[8..16].copy_from_slice(&virt_start.to_le_bytes());
        v[16..24].copy_from_slice(&virt_end.to_le_bytes());
        v
    }

    pub fn probe(endpoint: u32) -> Vec<u8> {
        let mut v = head(T_PROBE, 72);
        v[4..8].copy_from_slice(&endpoint.to_le_bytes());
        v
    }
}
