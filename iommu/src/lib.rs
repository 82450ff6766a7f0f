//! ferrio's virtio-iommu device and the DMA translation its endpoints go through.
//!
//! Not implemented yet: the crate exists so the workspace layout is final.
