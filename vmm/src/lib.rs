//! ferrio's VMM: KVM set-up, boot, vCPU threads, the I/O event loop and the glue that
//! connects the device crates to KVM. Nothing KVM-specific leaves this crate.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod config;
pub mod console;
pub mod cpu;
pub mod error;
pub mod exit;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod pci;
pub mod seccomp;
pub mod vfio;
pub mod vm;
