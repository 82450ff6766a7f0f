//! Ring and config-space helpers shared by every virtio device.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemory, Permissions};

/// A ring error the device cannot recover from: it must report DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The available ring cannot be read or its index is inconsistent (it moved more
    /// than the queue size ahead of the device, say).
    #[error("malformed available ring: {0}")]
    AvailRing(#[source] virtio_queue::Error),
    /// The descriptor-table entry of an available head cannot be read (behind an
    /// IOMMU: the table is not mapped).
    #[error("cannot read entry {0} of the descriptor table")]
    DescTable(u16),
    /// A used element or the used index cannot be written.
    #[error("cannot write the used ring: {0}")]
    UsedRing(#[source] virtio_queue::Error),
    /// The notification suppression fields (used flags, avail_event) cannot be
    /// accessed.
    #[error("cannot update notification suppression: {0}")]
    Notification(#[source] virtio_queue::Error),
}

/// The next available chain, `None` when the ring is empty. `AvailIter::next` also
/// answers `None` when the head entry cannot be read; that is told apart from an empty
/// ring (or a driver publishing right now) by retrying once, and reported as an
/// invalid avail ring.
pub fn next_chain<'m, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'m M,
) -> Result<Option<DescriptorChain<&'m M>>, virtio_queue::Error> {
    for _ in 0..2 {
        if let Some(chain) = queue.iter(mem)?.next() {
            return Ok(Some(chain));
        }
        if queue.avail_idx(mem, Ordering::Acquire)? == Wrapping(queue.next_avail()) {
            return Ok(None);
        }
    }
    Err(virtio_queue::Error::InvalidAvailRingIndex)
}

/// [`next_chain`] for a device: its errors as [`RingError`]s, and a head whose
/// descriptor-table entry cannot be read is a ring error too, not a broken chain (the
/// descriptor table is part of the ring). A head index out of range is left to the
/// device (it skips the chain).
pub fn pop_chain<'m, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'m M,
) -> Result<Option<DescriptorChain<&'m M>>, RingError> {
    let Some(chain) = next_chain(queue, mem).map_err(RingError::AvailRing)? else {
        return Ok(None);
    };
    let head = chain.head_index();
    if head < queue.size() {
        let size = std::mem::size_of::<Descriptor>();
        let readable = GuestAddress(queue.desc_table())
            .checked_add(size as u64 * u64::from(head))
            .is_some_and(|entry| mem.check_range(entry, size, Permissions::Read));
        if !readable {
            return Err(RingError::DescTable(head));
        }
    }
    Ok(Some(chain))
}

/// Copies `data.len()` bytes of a device config space starting at `offset`; bytes past
/// its end read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at).copied())
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3];
        let mut out = [9u8; 4];
        read_config_bytes(&cfg, 1, &mut out);
        assert_eq!(out, [2, 3, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
