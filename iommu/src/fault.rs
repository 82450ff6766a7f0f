//! Translation faults: recorded by endpoints (any thread), reported by the device
//! worker as `struct virtio_iommu_fault` events on the eventq (virtio 1.2, 5.13.6.10).
//!
//! Pending faults are bounded: a device hammering an unmapped address must not grow
//! host memory. Faults beyond [`crate::IommuConfig::max_pending_faults`] are counted
//! and dropped (the spec allows dropping events when no buffer is available).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use vm_memory::Permissions;
use vmm_sys_util::eventfd::EventFd;

/// Size of `struct virtio_iommu_fault`.
pub const FAULT_EVENT_SIZE: usize = 24;

/// VIRTIO_IOMMU_FAULT_F_READ.
pub const FAULT_F_READ: u32 = 1 << 0;
/// VIRTIO_IOMMU_FAULT_F_WRITE.
pub const FAULT_F_WRITE: u32 = 1 << 1;
/// VIRTIO_IOMMU_FAULT_F_ADDRESS: `address` is valid.
pub const FAULT_F_ADDRESS: u32 = 1 << 8;

/// Why an access faulted (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FaultReason {
    /// VIRTIO_IOMMU_FAULT_R_UNKNOWN.
    Unknown = 0,
    /// VIRTIO_IOMMU_FAULT_R_DOMAIN: the endpoint is not attached to a domain.
    Domain = 1,
    /// VIRTIO_IOMMU_FAULT_R_MAPPING: the address is not mapped, or the mapping lacks
    /// the permission.
    Mapping = 2,
}

/// One translation fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub endpoint: u32,
    pub reason: FaultReason,
    /// First faulting I/O virtual address.
    pub address: u64,
    /// The access that faulted.
    pub access: Permissions,
}

impl Fault {
    /// The event as the driver reads it (little endian, reserved fields zero).
    pub fn to_bytes(&self) -> [u8; FAULT_EVENT_SIZE] {
        let mut flags = FAULT_F_ADDRESS;
        if self.access.allow(Permissions::Read) {
            flags |= FAULT_F_READ;
        }
        if self.access.allow(Permissions::Write) {
            flags |= FAULT_F_WRITE;
        }
        let mut out = [0u8; FAULT_EVENT_SIZE];
        out[0] = self.reason as u8;
        out[4..8].copy_from_slice(&flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        out[16..24].copy_from_slice(&self.address.to_le_bytes());
        out
    }
}

#[derive(Default)]
struct Pending {
    faults: VecDeque<Fault>,
    /// Written when a fault is queued: wakes the device worker (set while active).
    waker: Option<EventFd>,
}

/// Faults waiting for eventq buffers.
pub(crate) struct FaultQueue {
    pending: Mutex<Pending>,
    capacity: usize,
    dropped: AtomicU64,
}

impl FaultQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            pending: Mutex::new(Pending::default()),
            capacity,
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `fault` for the guest and wakes the worker; drops it when the queue is
    /// full.
    pub fn record(&self, fault: Fault) {
        tracing::debug!(
            "virtio-iommu: fault: endpoint {:#x} {:?} at {:#x} ({:?})",
            fault.endpoint,
            fault.reason,
            fault.address,
            fault.access
        );
        let mut pending = self.lock();
        if pending.faults.len() >= self.capacity {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!("virtio-iommu: {dropped} fault report(s) dropped (queue full)");
            }
            return;
        }
        pending.faults.push_back(fault);
        if let Some(waker) = &pending.waker {
            if let Err(e) = waker.write(1) {
                tracing::warn!("virtio-iommu: cannot wake the worker for a fault: {e}");
            }
        }
    }

    /// The oldest pending fault, left in the queue.
    pub fn peek(&self) -> Option<Fault> {
        self.lock().faults.front().copied()
    }

    /// Removes the oldest pending fault (after it was reported).
    pub fn pop(&self) -> Option<Fault> {
        self.lock().faults.pop_front()
    }

    pub fn len(&self) -> usize {
        self.lock().faults.len()
    }

    /// Drops every pending fault (device reset).
    pub fn clear(&self) {
        self.lock().faults.clear();
    }

    /// Sets (activation) or removes (reset) the eventfd that wakes the worker.
    pub fn set_waker(&self, waker: Option<EventFd>) {
        self.lock().waker = waker;
    }

    /// Faults dropped because the queue was full, since creation.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(address: u64) -> Fault {
        Fault {
            endpoint: 0x10,
            reason: FaultReason::Mapping,
            address,
            access: Permissions::Write,
        }
    }

    #[test]
    fn event_bytes() {
        let f = Fault {
            endpoint: 0x0102_0304,
            reason: FaultReason::Domain,
            address: 0x1122_3344_5566_7788,
            access: Permissions::ReadWrite,
        };
        let b = f.to_bytes();
        assert_eq!(b[0], 1);
        assert_eq!(&b[1..4], &[0, 0, 0]);
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
            FAULT_F_READ | FAULT_F_WRITE | FAULT_F_ADDRESS
        );
        assert_eq!(
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
            0x0102_0304
        );
        assert_eq!(&b[12..16], &[0; 4]);
        assert_eq!(
            u64::from_le_bytes(b[16..24].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
        let read = Fault {
            access: Permissions::Read,
            ..f
        };
        assert_eq!(
            u32::from_le_bytes(read.to_bytes()[4..8].try_into().unwrap()),
            FAULT_F_READ | FAULT_F_ADDRESS
        );
    }

    #[test]
    fn queue_is_bounded_and_wakes() {
        let q = FaultQueue::new(2);
        let waker = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        q.set_waker(Some(waker.try_clone().unwrap()));
        q.record(fault(1));
        q.record(fault(2));
        q.record(fault(3));
        assert_eq!(q.len(), 2);
        assert_eq!(q.dropped(), 1);
        assert_eq!(waker.read().unwrap(), 2);
        assert_eq!(q.peek().unwrap().address, 1);
        assert_eq!(q.pop().unwrap().address, 1);
        assert_eq!(q.pop().unwrap().address, 2);
        assert!(q.pop().is_none());
        q.record(fault(4));
        q.clear();
        assert_eq!(q.len(), 0);
    }
}
