//! VFIO passthrough in the VMM: the host-side checks of a `--device` function
//! ([`host`]) and opening it, its DMA and KVM's view of it ([`attach`]).

pub mod attach;
pub mod host;
