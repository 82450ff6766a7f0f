//! The VMM's top-level error: every way building or running a VM can fail, each with a
//! one-line message for the user.

use std::path::PathBuf;

use crate::acpi::AcpiError;
use crate::boot::BootError;
use crate::config::ConfigError;
use crate::cpu::regs::RegsError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open KVM device {}: {source}", path.display())]
    KvmOpen {
        path: PathBuf,
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM lacks the {0} capability")]
    KvmCap(&'static str),
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {size} bytes of guest memory: {detail}")]
    GuestMemory { size: u64, detail: String },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("building the guest CPUID: {0}")]
    Cpuid(String),
    #[error("vCPU set-up: {0}")]
    Regs(#[from] RegsError),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] AcpiError),
    #[error("MP table: {0}")]
    Mptable(#[from] crate::mptable::MptableError),
    #[error("cannot open serial output file {}: {source}", path.display())]
    SerialFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("console backend {}: {source}", path.display())]
    ConsoleBackend {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {}: {reason}", path.display())]
    Disk { path: PathBuf, reason: String },
    #[error("net: {0}")]
    Tap(#[from] ferrio_devices::virtio::net::tap::TapError),
    #[error("net: fd {fd}: {source}")]
    NetFd {
        fd: std::os::fd::RawFd,
        source: std::io::Error,
    },
    #[error("PCI: {0}")]
    Pci(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("device registration: {0}")]
    Bus(#[from] ferrio_devices::BusError),
    #[error("I/O event loop: {0}")]
    EventManager(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}
