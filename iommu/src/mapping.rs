//! One domain's I/O virtual address space: the mappings created by MAP requests
//! (virtio 1.2, 5.13.6.6 and 5.13.6.7).
//!
//! A mapping is kept whole, as the driver created it: UNMAP removes mappings, never
//! parts of them. Addresses are checked against the device's input range (48 bits)
//! and page granularity (4 KiB) and the reserved MSI doorbell range.

use std::collections::BTreeMap;

use vm_memory::Permissions;

/// Page granularity of mappings: `page_size_mask` in the configuration space.
pub const PAGE_SIZE: u64 = 0x1000;
/// Lowest I/O virtual address the device translates.
pub const INPUT_START: u64 = 0;
/// Highest I/O virtual address the device translates (48-bit input range).
pub const INPUT_END: u64 = (1 << 48) - 1;
/// The x86 MSI doorbell range, reserved in every address space (RESV_MEM, MSI subtype):
/// MSI writes never reach guest memory through the IOMMU.
pub const MSI_START: u64 = 0xfee0_0000;
/// Last address of the MSI doorbell range.
pub const MSI_END: u64 = 0xfeef_ffff;

/// Access a mapping allows (the READ and WRITE flags of a MAP request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub write: bool,
}

impl Access {
    pub const READ_ONLY: Access = Access {
        read: true,
        write: false,
    };
    pub const READ_WRITE: Access = Access {
        read: true,
        write: true,
    };

    /// As `vm_memory` permissions.
    pub fn permissions(self) -> Permissions {
        match (self.read, self.write) {
            (false, false) => Permissions::No,
            (true, false) => Permissions::Read,
            (false, true) => Permissions::Write,
            (true, true) => Permissions::ReadWrite,
        }
    }
}

/// One mapping: `[virt_start, virt_end]` (inclusive) to `phys_start..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub virt_start: u64,
    pub virt_end: u64,
    pub phys_start: u64,
    pub access: Access,
}

impl Mapping {
    /// Size in bytes (at least one page; at most 2^48).
    pub fn size(&self) -> u64 {
        self.virt_end - self.virt_start + 1
    }

    /// Guest-physical address of `iova` (which must lie in the mapping).
    pub fn translate(&self, iova: u64) -> u64 {
        self.phys_start + (iova - self.virt_start)
    }
}

/// Why a MAP or UNMAP failed; each maps onto a request status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Bad parameters: `virt_end < virt_start`, an overlap with an existing mapping or
    /// with a reserved region (VIRTIO_IOMMU_S_INVAL).
    #[error("invalid range or overlapping mapping")]
    Invalid,
    /// Outside the input range, unaligned, or an UNMAP that would split a mapping
    /// (VIRTIO_IOMMU_S_RANGE).
    #[error("range outside the input range, unaligned, or splitting a mapping")]
    Range,
    /// The domain holds the maximum number of mappings (VIRTIO_IOMMU_S_NOMEM).
    #[error("too many mappings")]
    NoMemory,
}

/// Where a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupFault {
    /// First address that is unmapped or does not allow the access.
    pub address: u64,
    /// `true`: mapped, but without the needed permission; `false`: not mapped.
    pub permission: bool,
}

/// A contiguous piece of a translated range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub iova: u64,
    pub gpa: u64,
    pub len: u64,
}

/// The mappings of one domain, keyed by `virt_start`; they never overlap.
#[derive(Debug)]
pub struct AddressSpace {
    mappings: BTreeMap<u64, Mapping>,
    max_mappings: usize,
}

impl AddressSpace {
    /// An empty address space holding at most `max_mappings` mappings.
    pub fn new(max_mappings: usize) -> Self {
        Self {
            mappings: BTreeMap::new(),
            max_mappings,
        }
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.mappings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// Adds a mapping (MAP). `virt_end` is inclusive.
    pub fn map(
        &mut self,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        access: Access,
    ) -> Result<(), MapError> {
        if virt_end < virt_start {
            return Err(MapError::Invalid);
        }
        // INPUT_START is 0: only the end can be out of range.
        if virt_end > INPUT_END {
            return Err(MapError::Range);
        }
        // virt_end < 2^48, so virt_end + 1 cannot overflow.
        let unaligned = |addr: u64| addr % PAGE_SIZE != 0;
        if unaligned(virt_start) || unaligned(virt_end + 1) || unaligned(phys_start) {
            return Err(MapError::Range);
        }
        if phys_start.checked_add(virt_end - virt_start).is_none() {
            return Err(MapError::Range);
        }
        if virt_start <= MSI_END && virt_end >= MSI_START {
            return Err(MapError::Invalid);
        }
        if self.overlapping(virt_start, virt_end).next().is_some() {
            return Err(MapError::Invalid);
        }
        if self.mappings.len() >= self.max_mappings {
            return Err(MapError::NoMemory);
        }
        self.mappings.insert(
            virt_start,
            Mapping {
                virt_start,
                virt_end,
                phys_start,
                access,
            },
        );
        Ok(())
    }

    /// Removes every mapping inside `[virt_start, virt_end]` (UNMAP) and returns them.
    /// If a mapping sticks out of the range (the UNMAP would split it), nothing is
    /// removed. Parts of the range that map nothing are fine (spec examples 1, 6, 7).
    pub fn unmap(&mut self, virt_start: u64, virt_end: u64) -> Result<Vec<Mapping>, MapError> {
        if virt_end < virt_start {
            return Err(MapError::Invalid);
        }
        let hit: Vec<Mapping> = self.overlapping(virt_start, virt_end).copied().collect();
        if hit
            .iter()
            .any(|m| m.virt_start < virt_start || m.virt_end > virt_end)
        {
            return Err(MapError::Range);
        }
        for m in &hit {
            self.mappings.remove(&m.virt_start);
        }
        Ok(hit)
    }

    /// Every mapping, by address.
    pub fn all(&self) -> Vec<Mapping> {
        self.mappings.values().copied().collect()
    }

    /// The mapping holding `iova`, if any.
    pub fn find(&self, iova: u64) -> Option<&Mapping> {
        self.mappings
            .range(..=iova)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.virt_end >= iova)
    }

    /// The whole mappings covering `[iova, iova + len)` in address order, each allowing
    /// `access`. Fails at the first address that is unmapped or lacks the permission
    /// (an empty or wrapping range fails at `iova`).
    pub fn walk(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<Vec<Mapping>, LookupFault> {
        let Some(last) = len.checked_sub(1).and_then(|l| iova.checked_add(l)) else {
            return Err(LookupFault {
                address: iova,
                permission: false,
            });
        };
        let mut out = Vec::new();
        let mut at = iova;
        loop {
            let Some(m) = self.find(at) else {
                return Err(LookupFault {
                    address: at,
                    permission: false,
                });
            };
            if !m.access.permissions().allow(access) {
                return Err(LookupFault {
                    address: at,
                    permission: true,
                });
            }
            out.push(*m);
            if m.virt_end >= last {
                return Ok(out);
            }
            at = m.virt_end + 1;
        }
    }

    /// Translates `[iova, iova + len)` into contiguous guest-physical pieces (one per
    /// mapping crossed), checking `access` on each.
    pub fn resolve(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<Vec<Piece>, LookupFault> {
        let mappings = self.walk(iova, len, access)?;
        // `walk` checked that the range does not wrap.
        let end = iova + len;
        Ok(mappings
            .into_iter()
            .map(|m| {
                let start = m.virt_start.max(iova);
                // `m.virt_end + 1` may be 2^48 at most: no overflow.
                let stop = (m.virt_end + 1).min(end);
                Piece {
                    iova: start,
                    gpa: m.translate(start),
                    len: stop - start,
                }
            })
            .collect())
    }

    /// Mappings that intersect `[start, end]`, in address order.
    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Mapping> {
        // The mapping holding `start` begins before it; the others begin inside.
        let first = self.find(start).map(|m| m.virt_start).unwrap_or(start);
        self.mappings.range(first..=end).map(|(_, m)| m)
    }
}

#[cfg(test)]
#[path = "mapping_tests.rs"]
mod tests;
