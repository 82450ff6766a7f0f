//! Endpoints whose DMA ferrio does not perform: a VFIO function reaches guest memory
//! through the host's IOMMU, so its domain's mappings must exist there too. The VMM
//! gives such an endpoint a [`DmaMirror`]; the domain code keeps it equal to the
//! domain's mappings: ATTACH replays them, MAP adds to it (a failure fails the MAP and
//! leaves nothing behind), UNMAP, DETACH and reset remove from it before the guest
//! sees the request complete.

use std::sync::Arc;

use crate::mapping::Mapping;

/// The host IOMMU context of a hardware endpoint (VFIO_IOMMU_MAP_DMA / UNMAP_DMA).
pub trait DmaMirror: Send + Sync {
    /// Maps `[iova, iova + size)` to guest-physical `gpa` (the VMM translates it to its
    /// own address), writable if `write`.
    fn map(&self, iova: u64, size: u64, gpa: u64, write: bool) -> Result<(), String>;
    /// Unmaps `[iova, iova + size)` (exactly a range that was mapped).
    fn unmap(&self, iova: u64, size: u64) -> Result<(), String>;
}

/// Maps `mappings` into every mirror, all or nothing: on a failure, what was mapped is
/// unmapped again and the error returned.
pub(crate) fn map_all(mirrors: &[Arc<dyn DmaMirror>], mappings: &[Mapping]) -> Result<(), String> {
    let mut done: Vec<(&Arc<dyn DmaMirror>, &Mapping)> = Vec::new();
    for mirror in mirrors {
        for m in mappings {
            if let Err(e) = mirror.map(m.virt_start, m.size(), m.phys_start, m.access.write) {
                for (mirror, m) in done.into_iter().rev() {
                    let _ = mirror.unmap(m.virt_start, m.size());
                }
                return Err(e);
            }
            done.push((mirror, m));
        }
    }
    Ok(())
}

/// Unmaps `mappings` from every mirror (errors are logged: the guest's view wins).
pub(crate) fn unmap_all(mirrors: &[Arc<dyn DmaMirror>], mappings: &[Mapping]) {
    for mirror in mirrors {
        for m in mappings {
            if let Err(e) = mirror.unmap(m.virt_start, m.size()) {
                tracing::warn!(
                    iova = m.virt_start,
                    size = m.size(),
                    "host IOMMU unmap: {e}"
                );
            }
        }
    }
}
