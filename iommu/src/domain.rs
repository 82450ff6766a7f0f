//! The IOMMU state behind the requests: endpoints (registered by the VMM), domains
//! (created by ATTACH, freed when their last endpoint leaves) and their mappings.
//!
//! Lock order: [`Shared::state`] before an endpoint's IOTLB. Every change that removes
//! or restricts translations (UNMAP, DETACH, re-ATTACH, reset) invalidates the IOTLBs
//! of the affected endpoints while it holds the state lock, and an IOTLB refill reads
//! the mappings and fills the IOTLB under that same lock, so a refill never brings a
//! removed mapping back. The returned [`Fence`] is waited on after the lock is
//! released: in-flight requests may need the lock to finish (an IOTLB refill).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use ferrio_devices::dma::DmaTracker;
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::fault::{Fault, FaultQueue, FaultReason};
use crate::mapping::{Access, AddressSpace, MapError, Mapping};
use crate::mirror::{self, DmaMirror};
use crate::request::Status;

/// What every [`crate::Endpoint`] and the device share.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub faults: FaultQueue,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An endpoint's translation cache and DMA tracker; the state keeps one per endpoint.
#[derive(Debug)]
pub(crate) struct EndpointCore {
    pub id: u32,
    pub iotlb: RwLock<Iotlb>,
    pub dma: DmaTracker,
}

impl EndpointCore {
    fn invalidate_all(&self) {
        self.iotlb
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .invalidate_all();
    }
}

/// DMA trackers to wait on before a request completes.
#[derive(Default)]
#[must_use = "wait on the fence before completing the request"]
pub(crate) struct Fence(Vec<DmaTracker>);

impl Fence {
    /// Waits until the requests that were in flight on these endpoints have finished.
    pub fn wait(self) {
        for tracker in self.0 {
            tracker.wait_for_inflight();
        }
    }

    fn add(&mut self, core: &EndpointCore) {
        self.0.push(core.dma.clone());
    }
}

struct EndpointSlot {
    core: Arc<EndpointCore>,
    domain: Option<u32>,
    /// A hardware endpoint's host IOMMU context (see [`crate::mirror`]).
    mirror: Option<Arc<dyn DmaMirror>>,
}

struct Domain {
    space: AddressSpace,
    endpoints: BTreeSet<u32>,
}

/// Domains, endpoints and mappings.
pub(crate) struct State {
    endpoints: BTreeMap<u32, EndpointSlot>,
    domains: BTreeMap<u32, Domain>,
    /// Valid domain ids (inclusive), as in `domain_range`.
    domain_range: (u32, u32),
    max_mappings: usize,
}

impl State {
    pub fn new(domain_range: (u32, u32), max_mappings: usize) -> Self {
        Self {
            endpoints: BTreeMap::new(),
            domains: BTreeMap::new(),
            domain_range,
            max_mappings,
        }
    }

    /// Registers endpoint `id`; `None` if it exists already.
    pub fn add_endpoint(&mut self, id: u32) -> Option<Arc<EndpointCore>> {
        self.add_endpoint_with(id, None)
    }

    /// Registers endpoint `id` whose mappings are mirrored into `mirror` (if any);
    /// `None` if it exists already.
    pub fn add_endpoint_with(
        &mut self,
        id: u32,
        mirror: Option<Arc<dyn DmaMirror>>,
    ) -> Option<Arc<EndpointCore>> {
        if self.endpoints.contains_key(&id) {
            return None;
        }
        let core = Arc::new(EndpointCore {
            id,
            iotlb: RwLock::new(Iotlb::new()),
            dma: DmaTracker::new(),
        });
        self.endpoints.insert(
            id,
            EndpointSlot {
                core: core.clone(),
                domain: None,
                mirror,
            },
        );
        Some(core)
    }

    pub fn has_endpoint(&self, id: u32) -> bool {
        self.endpoints.contains_key(&id)
    }

    /// The domain endpoint `id` is attached to.
    pub fn endpoint_domain(&self, id: u32) -> Option<u32> {
        self.endpoints.get(&id).and_then(|slot| slot.domain)
    }

    /// Number of existing domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// ATTACH: moves `endpoint` to `domain` (created if needed), detaching it from its
    /// previous domain first.
    pub fn attach(&mut self, domain: u32, endpoint: u32) -> Result<Fence, Status> {
        if !self.endpoints.contains_key(&endpoint) {
            return Err(Status::NoEnt);
        }
        if domain < self.domain_range.0 || domain > self.domain_range.1 {
            return Err(Status::Range);
        }
        let mut fence = Fence::default();
        match self.endpoint_domain(endpoint) {
            Some(current) if current == domain => return Ok(fence),
            Some(current) => fence = self.detach(current, endpoint)?,
            None => {}
        }
        // A hardware endpoint gets the domain's existing mappings in its host IOMMU.
        if let Some(mirror) = self.endpoints.get(&endpoint).and_then(|s| s.mirror.clone()) {
            let existing = self
                .domains
                .get(&domain)
                .map(|d| d.space.all())
                .unwrap_or_default();
            if let Err(e) = mirror::map_all(&[mirror], &existing) {
                tracing::warn!(endpoint, domain, "ATTACH: host IOMMU map failed: {e}");
                return Err(Status::DevErr);
            }
        }
        let max_mappings = self.max_mappings;
        self.domains
            .entry(domain)
            .or_insert_with(|| Domain {
                space: AddressSpace::new(max_mappings),
                endpoints: BTreeSet::new(),
            })
            .endpoints
            .insert(endpoint);
        let slot = self.endpoints.get_mut(&endpoint).ok_or(Status::DevErr)?;
        slot.domain = Some(domain);
        // Nothing can be cached for an unattached endpoint, but be safe.
        slot.core.invalidate_all();
        Ok(fence)
    }

    /// DETACH: `endpoint` leaves `domain`; the domain is freed with its mappings when
    /// it was the last one.
    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Result<Fence, Status> {
        let slot = self.endpoints.get_mut(&endpoint).ok_or(Status::NoEnt)?;
        let dom = self.domains.get_mut(&domain).ok_or(Status::NoEnt)?;
        if slot.domain != Some(domain) {
            return Err(Status::Inval);
        }
        if let Some(mirror) = &slot.mirror {
            mirror::unmap_all(std::slice::from_ref(mirror), &dom.space.all());
        }
        dom.endpoints.remove(&endpoint);
        if dom.endpoints.is_empty() {
            self.domains.remove(&domain);
        }
        slot.domain = None;
        slot.core.invalidate_all();
        let mut fence = Fence::default();
        fence.add(&slot.core);
        Ok(fence)
    }

    /// MAP.
    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        access: Access,
    ) -> Result<(), Status> {
        let dom = self.domains.get(&domain).ok_or(Status::NoEnt)?;
        let mirrors = Self::mirrors(&self.endpoints, &dom.endpoints);
        let dom = self.domains.get_mut(&domain).ok_or(Status::NoEnt)?;
        dom.space
            .map(virt_start, virt_end, phys_start, access)
            .map_err(status_of)?;
        let added = Mapping {
            virt_start,
            virt_end,
            phys_start,
            access,
        };
        if let Err(e) = mirror::map_all(&mirrors, &[added]) {
            tracing::warn!(domain, virt_start, "MAP: host IOMMU map failed: {e}");
            // Leave nothing behind: the mapping goes again, the guest sees the failure.
            let _ = dom.space.unmap(virt_start, virt_end);
            return Err(Status::DevErr);
        }
        Ok(())
    }

    /// The mirrors of the hardware endpoints among `members`.
    fn mirrors(
        endpoints: &BTreeMap<u32, EndpointSlot>,
        members: &BTreeSet<u32>,
    ) -> Vec<Arc<dyn DmaMirror>> {
        members
            .iter()
            .filter_map(|id| endpoints.get(id)?.mirror.clone())
            .collect()
    }

    /// UNMAP: removes the mappings and invalidates them in the IOTLB of every endpoint
    /// of the domain.
    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<Fence, Status> {
        let dom = self.domains.get_mut(&domain).ok_or(Status::NoEnt)?;
        let removed = dom.space.unmap(virt_start, virt_end).map_err(status_of)?;
        let mut fence = Fence::default();
        if removed.is_empty() {
            return Ok(fence);
        }
        mirror::unmap_all(&Self::mirrors(&self.endpoints, &dom.endpoints), &removed);
        for id in &dom.endpoints {
            let Some(slot) = self.endpoints.get(id) else {
                continue;
            };
            {
                let mut iotlb = slot
                    .core
                    .iotlb
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                for m in &removed {
                    // A mapping is at most 2^48 bytes: it fits a 64-bit usize.
                    let len = usize::try_from(m.size()).unwrap_or(usize::MAX);
                    iotlb.invalidate_mapping(GuestAddress(m.virt_start), len);
                }
            }
            fence.add(&slot.core);
        }
        Ok(fence)
    }

    /// Translates for `core`'s IOTLB refill: the whole mappings covering
    /// `[iova, iova + len)` go into its IOTLB (under the state lock, see the module
    /// comment). `len` is at least 1 and the range does not wrap.
    pub fn refill(
        &self,
        core: &EndpointCore,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<(), Fault> {
        let fault = |reason, address| Fault {
            endpoint: core.id,
            reason,
            address,
            access,
        };
        let domain = self
            .endpoints
            .get(&core.id)
            .and_then(|slot| slot.domain)
            .and_then(|d| self.domains.get(&d))
            .ok_or_else(|| fault(FaultReason::Domain, iova))?;
        let mappings = domain
            .space
            .walk(iova, len, access)
            .map_err(|f| fault(FaultReason::Mapping, f.address))?;
        let mut iotlb = core.iotlb.write().unwrap_or_else(PoisonError::into_inner);
        for m in mappings {
            let len = usize::try_from(m.size()).unwrap_or(usize::MAX);
            iotlb
                .set_mapping(
                    GuestAddress(m.virt_start),
                    GuestAddress(m.phys_start),
                    len,
                    m.access.permissions(),
                )
                .map_err(|_| fault(FaultReason::Unknown, m.virt_start))?;
        }
        Ok(())
    }

    /// The DMA tracker of endpoint `id`.
    #[cfg(test)]
    pub fn tracker(&self, id: u32) -> Option<DmaTracker> {
        self.endpoints.get(&id).map(|slot| slot.core.dma.clone())
    }

    /// The mapping of `domain` holding `iova`.
    #[cfg(test)]
    pub fn find_mapping(&self, domain: u32, iova: u64) -> Option<crate::mapping::Mapping> {
        self.domains.get(&domain)?.space.find(iova).copied()
    }

    /// Device reset: no domain, no mapping, every endpoint detached.
    pub fn reset(&mut self) -> Fence {
        for dom in self.domains.values() {
            let mirrors = Self::mirrors(&self.endpoints, &dom.endpoints);
            mirror::unmap_all(&mirrors, &dom.space.all());
        }
        self.domains.clear();
        let mut fence = Fence::default();
        for slot in self.endpoints.values_mut() {
            slot.domain = None;
            slot.core.invalidate_all();
            fence.add(&slot.core);
        }
        fence
    }
}

fn status_of(e: MapError) -> Status {
    match e {
        MapError::Invalid => Status::Inval,
        MapError::Range => Status::Range,
        MapError::NoMemory => Status::NoMem,
    }
}

#[cfg(test)]
#[path = "domain_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "mirror_tests.rs"]
mod mirror_tests;
