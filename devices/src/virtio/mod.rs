//! Transport-independent virtio device model (virtio 1.2).
//!
//! A device implements [`VirtioDevice`]; a transport (virtio-pci in the `ferrio-pci`
//! crate) owns feature negotiation, the status state machine and the queue
//! configuration, and hands the device an [`Activation`] when the driver sets
//! DRIVER_OK. The device then runs its queues (usually on its own worker thread) until
//! [`VirtioDevice::reset`]. Guest memory is any `vm_memory::GuestMemory`, so an IOMMU
//! translation layer (`vm_memory::IommuMemory`) can stand between device and RAM.

pub mod block;
pub mod console;
pub mod dma_hold;
pub mod iov;
pub mod net;
pub mod ring;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod worker_util;

use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use crate::dma::DmaTracker;
use worker_util::ThreadHook;

/// Feature bits of the transport/ring layer (virtio 1.2, section 6).
pub mod features {
    pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
    pub const VIRTIO_F_EVENT_IDX: u64 = 1 << 29;
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
    pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Device type ids (virtio 1.2, 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const IOMMU: u32 = 23;
}

/// How a device tells the driver about used buffers, configuration changes and fatal
/// errors. The transport implements it (MSI-X vectors on virtio-pci).
pub trait VirtioInterrupt: Send + Sync {
    /// Queue `queue` has new used buffers.
    fn signal_queue(&self, queue: u16) -> std::io::Result<()>;
    /// The device configuration space changed.
    fn signal_config(&self) -> std::io::Result<()>;
    /// The device hit a guest error it cannot recover from (a malformed ring, say):
    /// sets DEVICE_NEEDS_RESET and signals a configuration change (virtio 1.2, 2.1.2).
    fn device_error(&self);
}

/// One queue handed to the device at activation.
pub struct ActiveQueue {
    /// Its index in the device's queue list.
    pub index: u16,
    /// The queue, configured and validated by the transport (sizes, ring addresses,
    /// `ready`; event-idx negotiated or not).
    pub queue: virtio_queue::Queue,
    /// Written (by KVM, through an ioeventfd) when the driver notifies this queue.
    pub notify: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation<M> {
    /// Guest memory as the device may see it.
    pub mem: M,
    /// The queues the driver enabled, in index order.
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Marks guest-memory accesses in flight. A device behind an IOMMU holds a
    /// [`DmaGuard`](crate::dma::DmaGuard) from it across every access to `mem` (ring
    /// and buffers) of a request or batch, so that an IOMMU UNMAP completes only after
    /// the accesses that started before it; never while waiting for the guest.
    /// Untracked (free) for devices that see guest-physical memory.
    pub dma: DmaTracker,
}

/// Why a device refused activation (the transport then sets DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is required but was not enabled by the driver")]
    MissingQueue(u16),
    #[error("cannot start the device worker: {0}")]
    Worker(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// An activation's queues by index: `slots[i]` holds queue `i` if the driver enabled
/// it, with VIRTIO_F_EVENT_IDX set as negotiated. A queue index past `n` or given twice
/// is refused.
pub fn queue_slots(
    device: &str,
    queues: Vec<ActiveQueue>,
    n: usize,
    event_idx: bool,
) -> Result<Vec<Option<ActiveQueue>>, ActivateError> {
    let mut slots: Vec<Option<ActiveQueue>> = (0..n).map(|_| None).collect();
    for mut queue in queues {
        let index = queue.index;
        match slots.get_mut(usize::from(index)) {
            Some(slot @ None) => {
                queue.queue.set_event_idx(event_idx);
                *slot = Some(queue);
            }
            _ => {
                return Err(ActivateError::Invalid(format!(
                    "{device} has no queue {index}, or got it twice"
                )))
            }
        }
    }
    Ok(slots)
}

/// Takes queue `index` out of [`queue_slots`]' answer; the device needs it.
pub fn required_queue(
    slots: &mut [Option<ActiveQueue>],
    index: u16,
) -> Result<ActiveQueue, ActivateError> {
    slots
        .get_mut(usize::from(index))
        .and_then(Option::take)
        .ok_or(ActivateError::MissingQueue(index))
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice<M>: Send {
    /// Device type id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (device-specific bits and ring bits; the transport
    /// adds VIRTIO_F_VERSION_1 and, when the device sits behind an IOMMU,
    /// VIRTIO_F_ACCESS_PLATFORM).
    fn device_features(&self) -> u64;
    /// The features the driver accepted (a subset of the offer), at FEATURES_OK.
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space. Out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space. Invalid writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError>;
    /// Stops the device: when it returns, no worker touches guest memory or the queues
    /// any more, and the device can be activated again.
    fn reset(&mut self);
    /// Sets the hook to run first in every worker thread the device starts from now on
    /// ([`ThreadHook`]: the embedder's seccomp filter, say). A device that starts
    /// threads must run it there; the default is for devices that start none.
    fn set_thread_hook(&mut self, hook: ThreadHook) {
        let _ = hook;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{activation, memory, Driver, TestInterrupt};

    #[test]
    fn queue_slots_sort_by_index_and_refuse_strays() {
        let mem = memory();
        let irq = Arc::new(TestInterrupt::default());
        let (a, b) = (Driver::new(&mem, 0, 16), Driver::new(&mem, 0x1000, 16));
        let queues = |list: &[(u16, &Driver)]| activation(&mem, list, &irq).0.queues;

        let mut slots = queue_slots("test", queues(&[(2, &a), (0, &b)]), 3, true).unwrap();
        assert_eq!(slots.len(), 3);
        assert!(slots[1].is_none());
        let q2 = required_queue(&mut slots, 2).unwrap();
        assert_eq!(q2.index, 2);
        assert!(q2.queue.event_idx_enabled());
        assert!(matches!(
            required_queue(&mut slots, 2),
            Err(ActivateError::MissingQueue(2))
        ));
        assert!(matches!(
            required_queue(&mut slots, 7),
            Err(ActivateError::MissingQueue(7))
        ));

        for list in [&[(3, &a)][..], &[(1, &a), (1, &b)][..]] {
            let result = queue_slots("test", queues(list), 3, false);
            assert!(matches!(result, Err(ActivateError::Invalid(_))));
        }
    }
}
