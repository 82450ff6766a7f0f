//! ferrio's virtio-iommu device (virtio 1.2, 5.13) and the DMA translation its
//! endpoints go through.
//!
//! The VMM creates a [`VirtioIommu`], registers one [`Endpoint`] per device behind it
//! ([`VirtioIommu::add_endpoint`], before the guest runs) and gives each such device
//! `vm_memory::IommuMemory::new(guest_memory, endpoint, true, bitmap)` as its memory
//! and [`Endpoint::dma_tracker`] as its DMA fence. The guest's driver then attaches
//! endpoints to domains and maps I/O virtual addresses through the requestq; the
//! endpoints translate with a per-endpoint IOTLB and report faults, which the device
//! posts on the eventq.
//!
//! | module | role |
//! |---|---|
//! | [`mapping`] | one domain's address space: MAP/UNMAP rules, translation into pieces |
//! | `domain` | endpoints, domains, ATTACH/DETACH, IOTLB invalidation, DMA fences |
//! | [`endpoint`] | [`Endpoint`]: `vm_memory::Iommu` with an IOTLB cache, fault recording |
//! | [`fault`] | fault events and the bounded queue of pending ones |
//! | [`request`] | requestq wire format, parsing with exact lengths, execution |
//! | `queue` | requestq and eventq ring handling |
//! | [`device`] | [`VirtioIommu`]: features, config space, activation, reset |
//! | `worker` | the worker thread |

pub mod device;
mod domain;
pub mod endpoint;
pub mod fault;
pub mod mapping;
pub mod mirror;
mod queue;
pub mod request;
#[cfg(test)]
mod testing;
mod worker;

pub use device::{Error, IommuConfig, VirtioIommu};
pub use endpoint::Endpoint;
pub use mirror::DmaMirror;
