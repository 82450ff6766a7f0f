//! An endpoint: one device behind the IOMMU, as its DMA sees it.
//!
//! [`Endpoint`] implements [`vm_memory::Iommu`], so the VMM gives a device
//! `IommuMemory::new(guest_memory, endpoint, true, bitmap)` as its memory and every
//! access of the device is translated by the domain the guest attached the endpoint
//! to. Translations are cached in a per-endpoint [`Iotlb`] (whole mappings, refilled
//! from the domain on a miss, invalidated by UNMAP, DETACH, re-ATTACH and reset), so a
//! request is translated with one cache lookup.
//!
//! Each translation returns its own small [`Iotlb`] holding only the translated range:
//! no lock is held while the device uses the result, so a long transfer never blocks
//! an UNMAP and nested translations cannot deadlock. What keeps a transfer from using
//! a mapping the guest removed is the endpoint's [`DmaTracker`]: the device holds a
//! guard from [`Endpoint::dma_tracker`] across each request (its translations and
//! accesses), and UNMAP/DETACH wait for the guards that predate them.
//!
//! A translation that fails (unattached endpoint, unmapped address, missing
//! permission, address past the 48-bit input range) is refused as a whole, before any
//! byte moves, and recorded as a fault for the eventq.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, PoisonError};

use ferrio_devices::dma::DmaTracker;
use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iommu, Iotlb, Permissions};

use crate::domain::{EndpointCore, Shared};
use crate::fault::{Fault, FaultReason};
use crate::mapping::INPUT_END;

/// A device behind the IOMMU (cheap to clone; clones are the same endpoint). Its id is
/// the one the guest uses in ATTACH/DETACH/PROBE: for PCI, `bus << 8 | devfn`.
#[derive(Clone)]
pub struct Endpoint {
    core: Arc<EndpointCore>,
    shared: Arc<Shared>,
}

/// The result of one translation: an IOTLB holding just the translated range.
#[derive(Debug)]
pub struct Translation(Iotlb);

impl Deref for Translation {
    type Target = Iotlb;

    fn deref(&self) -> &Iotlb {
        &self.0
    }
}

impl Endpoint {
    pub(crate) fn new(core: Arc<EndpointCore>, shared: Arc<Shared>) -> Self {
        Self { core, shared }
    }

    /// The endpoint id.
    pub fn id(&self) -> u32 {
        self.core.id
    }

    /// The tracker the device must take a guard from around each request (its
    /// translations and memory accesses); UNMAP and DETACH wait for it.
    pub fn dma_tracker(&self) -> DmaTracker {
        self.core.dma.clone()
    }

    /// The domain the guest attached this endpoint to, if any.
    pub fn domain(&self) -> Option<u32> {
        self.shared.lock().endpoint_domain(self.core.id)
    }

    /// Translates `[iova, iova + len)` for `access` into an IOTLB holding just that
    /// range, or records a fault.
    fn resolve(&self, iova: u64, len: usize, access: Permissions) -> Result<Iotlb, IommuError> {
        let mut out = Iotlb::new();
        if len == 0 {
            return Ok(out);
        }
        let len64 = len as u64;
        match iova.checked_add(len64 - 1) {
            Some(last) if last <= INPUT_END => {}
            _ => {
                let address = if iova > INPUT_END {
                    iova
                } else {
                    INPUT_END + 1
                };
                return Err(self.fault(FaultReason::Mapping, address, iova, len, access));
            }
        }
        {
            let cache = self
                .core
                .iotlb
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Ok(hit) = Iotlb::lookup(&*cache, GuestAddress(iova), len, access) {
                copy_translation(&mut out, iova, hit, access)?;
                return Ok(out);
            }
        }
        // Miss or permission failure in the cache: ask the domain (which refills the
        // cache) and look again, under the state lock so no UNMAP slips in between.
        let state = self.shared.lock();
        if let Err(fault) = state.refill(&self.core, iova, len64, access) {
            drop(state);
            self.shared.faults.record(fault);
            return Err(cannot_resolve(iova, len, "unmapped or not permitted"));
        }
        let cache = self
            .core
            .iotlb
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match Iotlb::lookup(&*cache, GuestAddress(iova), len, access) {
            Ok(hit) => copy_translation(&mut out, iova, hit, access)?,
            Err(_) => return Err(cannot_resolve(iova, len, "IOTLB refill failed")),
        }
        Ok(out)
    }

    fn fault(
        &self,
        reason: FaultReason,
        address: u64,
        iova: u64,
        len: usize,
        access: Permissions,
    ) -> IommuError {
        self.shared.faults.record(Fault {
            endpoint: self.core.id,
            reason,
            address,
            access,
        });
        cannot_resolve(iova, len, "outside the input range")
    }
}

/// Copies the pieces of a cache hit into `out`, starting at `iova`.
fn copy_translation<D: Deref<Target = Iotlb>>(
    out: &mut Iotlb,
    iova: u64,
    hit: IotlbIterator<D>,
    access: Permissions,
) -> Result<(), IommuError> {
    let mut at = iova;
    for piece in hit {
        out.set_mapping(GuestAddress(at), piece.base, piece.length, access)?;
        at += piece.length as u64;
    }
    Ok(())
}

fn cannot_resolve(iova: u64, len: usize, reason: &str) -> IommuError {
    IommuError::CannotResolve {
        iova_range: IovaRange {
            base: GuestAddress(iova),
            length: len,
        },
        reason: reason.into(),
    }
}

impl Iommu for Endpoint {
    type IotlbGuard<'a> = Translation;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Translation>, IommuError> {
        let tlb = self.resolve(iova.0, length, access)?;
        Iotlb::lookup(Translation(tlb), iova, length, access)
            .map_err(|_| cannot_resolve(iova.0, length, "inconsistent translation"))
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.core.id)
            .finish()
    }
}

#[cfg(test)]
#[path = "endpoint_tests.rs"]
mod tests;
