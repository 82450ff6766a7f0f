//! DMA map bookkeeping over a [`DmaMapper`].
//!
//! Without a virtual IOMMU the VMM maps all guest RAM once, IOVA = GPA, before the
//! guest runs ([`DmaMappings::map_all`]). Behind the virtio-iommu each guest MAP /
//! UNMAP of the device's domain becomes [`DmaMappings::map`] / [`DmaMappings::unmap`].
//! Either way [`DmaMappings`] remembers what is mapped, refuses overlaps, and unmaps
//! everything at teardown ([`DmaMappings::unmap_all`], also on drop). Translating
//! guest physical addresses to host addresses is the caller's job: this crate stays
//! free of KVM and of the guest memory layout.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::ops::DmaMapper;

/// Errors of DMA bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// Size 0, or the range wraps around the address space.
    #[error("invalid DMA range {iova:#x}+{size:#x}")]
    InvalidRange { iova: u64, size: u64 },
    /// The range overlaps a mapping already in place.
    #[error("DMA range {iova:#x}+{size:#x} overlaps the mapping at {existing:#x}")]
    Overlap { iova: u64, size: u64, existing: u64 },
    /// No mapping lies inside the range.
    #[error("nothing is mapped in {iova:#x}+{size:#x}")]
    NotMapped { iova: u64, size: u64 },
    /// The range would split a mapping (only whole mappings are unmapped).
    #[error("unmapping {iova:#x}+{size:#x} would split the mapping at {existing:#x}")]
    Split { iova: u64, size: u64, existing: u64 },
    /// The IOMMU refused the map.
    #[error("DMA map of {iova:#x}+{size:#x} failed: {source}")]
    Map {
        iova: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    /// The IOMMU refused the unmap.
    #[error("DMA unmap of {iova:#x}+{size:#x} failed: {source}")]
    Unmap {
        iova: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
}

/// One mapping in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMapping {
    pub iova: u64,
    pub size: u64,
    pub host_addr: u64,
}

/// The mappings of one IOMMU context.
pub struct DmaMappings {
    mapper: Arc<dyn DmaMapper>,
    /// By IOVA: (size, host address).
    maps: BTreeMap<u64, (u64, u64)>,
}

impl std::fmt::Debug for DmaMappings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMappings")
            .field("mappings", &self.maps.len())
            .finish_non_exhaustive()
    }
}

fn end_of(iova: u64, size: u64) -> Result<u64, DmaError> {
    iova.checked_add(size)
        .filter(|_| size > 0)
        .ok_or(DmaError::InvalidRange { iova, size })
}

impl DmaMappings {
    /// No mappings yet.
    pub fn new(mapper: Arc<dyn DmaMapper>) -> Self {
        DmaMappings {
            mapper,
            maps: BTreeMap::new(),
        }
    }

    /// The mappings in place, by IOVA.
    pub fn mappings(&self) -> Vec<DmaMapping> {
        self.maps
            .iter()
            .map(|(&iova, &(size, host_addr))| DmaMapping {
                iova,
                size,
                host_addr,
            })
            .collect()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// The no-IOMMU case: maps each `(gpa, size, host_addr)` at IOVA = GPA. On a
    /// failure the regions this call mapped are unmapped again and the error returned.
    pub fn map_all(&mut self, regions: &[(u64, u64, u64)]) -> Result<(), DmaError> {
        for (i, &(gpa, size, host)) in regions.iter().enumerate() {
            if let Err(e) = self.map(gpa, size, host) {
                for &(gpa, size, _) in regions[..i].iter().rev() {
                    if let Err(undo) = self.unmap(gpa, size) {
                        tracing::warn!(error = %undo, "DMA unmap while undoing map_all failed");
                    }
                }
                return Err(e);
            }
        }
        tracing::debug!(
            regions = regions.len(),
            "guest RAM mapped for DMA (IOVA = GPA)"
        );
        Ok(())
    }

    /// Maps `size` bytes at `host_addr` for DMA at `iova`; refuses a range that
    /// overlaps a mapping in place. `host_addr` must satisfy [`DmaMapper::map`].
    pub fn map(&mut self, iova: u64, size: u64, host_addr: u64) -> Result<(), DmaError> {
        let end = end_of(iova, size)?;
        end_of(host_addr, size)?;
        if let Some(existing) = self.first_overlap(iova, end) {
            return Err(DmaError::Overlap {
                iova,
                size,
                existing,
            });
        }
        self.mapper
            .map(iova, size, host_addr)
            .map_err(|source| DmaError::Map { iova, size, source })?;
        self.maps.insert(iova, (size, host_addr));
        tracing::trace!(iova, size, "DMA mapped");
        Ok(())
    }

    /// Unmaps every mapping inside `iova..iova + size`, each as it was mapped.
    /// [`DmaError::Split`] (nothing unmapped) when a mapping straddles a boundary of
    /// the range, [`DmaError::NotMapped`] when the range holds none (callers serving a
    /// guest UNMAP may take that as success).
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<(), DmaError> {
        let end = end_of(iova, size)?;
        let inside: Vec<(u64, u64)> = self
            .overlapping(iova, end)
            .map(|(&start, &(len, _))| (start, len))
            .collect();
        if inside.is_empty() {
            return Err(DmaError::NotMapped { iova, size });
        }
        if let Some(&(existing, _)) = inside
            .iter()
            .find(|&&(start, len)| start < iova || start + len > end)
        {
            return Err(DmaError::Split {
                iova,
                size,
                existing,
            });
        }
        for (start, len) in inside {
            self.mapper
                .unmap(start, len)
                .map_err(|source| DmaError::Unmap {
                    iova: start,
                    size: len,
                    source,
                })?;
            self.maps.remove(&start);
            tracing::trace!(iova = start, size = len, "DMA unmapped");
        }
        Ok(())
    }

    /// Unmaps everything, by ascending IOVA. Mappings the IOMMU refuses to unmap are
    /// logged and forgotten (the context goes away with the device); returns how many.
    pub fn unmap_all(&mut self) -> usize {
        let mut failed = 0;
        for (iova, (size, _)) in std::mem::take(&mut self.maps) {
            if let Err(e) = self.mapper.unmap(iova, size) {
                tracing::warn!(iova, size, error = %e, "DMA unmap at teardown failed");
                failed += 1;
            }
        }
        failed
    }

    fn overlapping(&self, iova: u64, end: u64) -> impl Iterator<Item = (&u64, &(u64, u64))> {
        // A mapping starting before `iova` may still reach into the range.
        let before = self
            .maps
            .range(..iova)
            .next_back()
            .filter(|(&s, &(l, _))| s + l > iova);
        before.into_iter().chain(self.maps.range(iova..end))
    }

    fn first_overlap(&self, iova: u64, end: u64) -> Option<u64> {
        self.overlapping(iova, end).next().map(|(&s, _)| s)
    }
}

impl Drop for DmaMappings {
    fn drop(&mut self) {
        if !self.maps.is_empty() {
            self.unmap_all();
        }
    }
}
