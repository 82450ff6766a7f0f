//! Device models of ferrio. They see the guest only through the traits defined here
//! (bus accesses, interrupt lines, guest events), never through KVM, so another VMM can
//! embed them and unit tests can drive them directly.

pub mod bus;
pub mod dma;
pub mod legacy;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, SharedDevice};

/// Something that raises an interrupt line towards the guest (an irqfd in the VMM, a
/// counter in tests).
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt (edge).
    fn trigger(&self) -> std::io::Result<()>;
}

/// A guest-initiated machine event that ends the VM run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEvent {
    /// ACPI S5 (or an equivalent power-off request).
    PowerOff,
    /// Reset through the ACPI reset register or the i8042 controller.
    Reset,
    /// The guest kernel reported a panic.
    Panic,
}

/// Receives guest machine events. The VMM implements it to stop the VM.
pub trait GuestEventSink: Send + Sync {
    /// Called from a vCPU thread when the guest requests `event`.
    fn guest_event(&self, event: GuestEvent);
}
