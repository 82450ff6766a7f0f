//! VFIO passthrough in the VMM: the host-side checks of a `--device` function
//! ([`host`]).

pub mod host;
