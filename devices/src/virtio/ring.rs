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

/// What one step of [`serve_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It served a chain: call again.
    Next,
    /// The ring is empty: notifications are re-enabled, and serving goes on if the
    /// driver published more meanwhile.
    Empty,
    /// Nothing more to serve (no input left for the ring): notifications are
    /// re-enabled and the batch ends.
    Done,
    /// The batch ends now with notifications still disabled (budget spent, no room on
    /// the host side): the caller comes back.
    Pause,
}

/// Serves `queue` in one batch: `step` runs (and pops its chain itself) with driver
/// notifications disabled until it answers anything but [`Step::Next`]. After
/// [`Step::Empty`] and [`Step::Done`] notifications are re-enabled, and after
/// [`Step::Empty`] the batch goes on if the driver published buffers meanwhile, so no
/// kick is lost. After `budget` [`Step::Next`]s the batch ends as after [`Step::Pause`];
/// `true` then says so (chains may be left).
///
/// A driver only moves its avail index forward, so a pass started because the index
/// moved finds at least one chain. One that finds the ring empty right away means the
/// index moves with the device's own writes (rings that overlap, or alias through an
/// IOMMU): a malformed ring, reported as such, since serving on would never end.
pub fn serve_batch<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    budget: usize,
    mut step: impl FnMut(&mut Queue) -> Result<Step, RingError>,
) -> Result<bool, RingError> {
    let mut served = 0;
    let mut again = false;
    loop {
        queue
            .disable_notification(mem)
            .map_err(RingError::Notification)?;
        let pass_start = served;
        let last = loop {
            match step(queue)? {
                Step::Next => {
                    served += 1;
                    if served >= budget {
                        return Ok(true);
                    }
                }
                Step::Pause => return Ok(false),
                last => break last,
            }
        };
        if again && last == Step::Empty && served == pass_start {
            return Err(RingError::AvailRing(
                virtio_queue::Error::InvalidAvailRingIndex,
            ));
        }
        let more = queue
            .enable_notification(mem)
            .map_err(RingError::Notification)?;
        if !more || last == Step::Done {
            return Ok(false);
        }
        again = true;
    }
}

/// Puts chain `head` in the used ring with `len` bytes written.
pub fn add_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head: u16,
    len: u32,
) -> Result<(), RingError> {
    queue.add_used(mem, head, len).map_err(RingError::UsedRing)
}

/// [`add_used`] for a chain [`pop_chain`] left to the device: `false` when the head
/// index is out of range (such a chain cannot be returned; it is skipped and logged for
/// `device`).
pub fn return_chain<M: GuestMemory>(
    device: &str,
    queue: &mut Queue,
    mem: &M,
    head: u16,
    len: u32,
) -> Result<bool, RingError> {
    if head >= queue.size() {
        tracing::debug!("{device}: skipping chain with head index {head} out of range");
        return Ok(false);
    }
    add_used(queue, mem, head, len)?;
    Ok(true)
}

/// Whether the driver must be interrupted for the used buffers added since the last
/// interrupt (EVENT_IDX aware).
pub fn needs_notification<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<bool, RingError> {
    queue
        .needs_notification(mem)
        .map_err(RingError::Notification)
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
    use crate::virtio::testing::{memory, ro, Driver};

    /// VRING_USED_F_NO_NOTIFY: the device asks not to be notified.
    const NO_NOTIFY: u16 = 1;

    #[test]
    fn a_batch_serves_what_the_driver_publishes_meanwhile() {
        let mem = memory();
        let mut d = Driver::new(&mem, 0x1000, 8);
        let mut q = d.queue();
        d.add(&[ro(0x10_0000, 16)]);
        let mut served = Vec::new();
        let mut late = true;
        serve_batch(&mut q, &mem, usize::MAX, |q| {
            assert_eq!(
                d.used_flags(),
                NO_NOTIFY,
                "notifications disabled while serving"
            );
            let Some(chain) = pop_chain(q, &mem)? else {
                if std::mem::take(&mut late) {
                    // Published after the ring ran dry, before notifications are back.
                    d.add(&[ro(0x10_0000, 16)]);
                }
                return Ok(Step::Empty);
            };
            served.push(chain.head_index());
            add_used(q, &mem, chain.head_index(), 0)?;
            Ok(Step::Next)
        })
        .unwrap();
        assert_eq!(served, [0, 1]);
        assert_eq!(d.used_idx(), 2);
        assert_eq!(d.used_flags(), 0, "notifications enabled after the batch");
    }

    #[test]
    fn pause_keeps_notifications_off_and_done_ends_the_batch() {
        let mem = memory();
        let mut d = Driver::new(&mem, 0x1000, 8);
        let mut q = d.queue();
        d.add(&[ro(0x10_0000, 16)]);
        d.add(&[ro(0x10_0000, 16)]);
        let mut calls = 0;
        serve_batch(&mut q, &mem, usize::MAX, |q| {
            calls += 1;
            pop_chain(q, &mem)?.unwrap();
            Ok(Step::Pause)
        })
        .unwrap();
        assert_eq!((calls, q.next_avail()), (1, 1));
        assert_eq!(d.used_flags(), NO_NOTIFY);
        // A published chain is left alone after Done, with notifications back on.
        assert!(!serve_batch(&mut q, &mem, usize::MAX, |_| Ok(Step::Done)).unwrap());
        assert_eq!((q.next_avail(), d.used_flags()), (1, 0));
    }

    #[test]
    fn a_batch_stops_at_its_budget() {
        let mem = memory();
        let mut d = Driver::new(&mem, 0x1000, 8);
        let mut q = d.queue();
        for _ in 0..3 {
            d.add(&[ro(0x10_0000, 16)]);
        }
        let mut pop = |q: &mut Queue| {
            Ok(match pop_chain(q, &mem)? {
                Some(_) => Step::Next,
                None => Step::Empty,
            })
        };
        assert!(serve_batch(&mut q, &mem, 2, &mut pop).unwrap());
        assert_eq!((q.next_avail(), d.used_flags()), (2, NO_NOTIFY));
        assert!(!serve_batch(&mut q, &mem, 2, &mut pop).unwrap());
        assert_eq!((q.next_avail(), d.used_flags()), (3, 0));
    }

    /// Found by fuzzing (`fuzz/`, virtio_blk and virtio_iommu): with the used ring 2
    /// bytes after the avail ring, the used flags are the avail index, so disabling
    /// notifications publishes a chain and enabling them takes it back. The batch spun
    /// forever (a worker that never looks at its stop signal); it is a ring error now.
    #[test]
    fn a_ring_whose_index_moves_with_the_device_writes_is_an_error() {
        let mem = memory();
        let mut q = Queue::new(8).unwrap();
        q.try_set_desc_table_address(GuestAddress(0)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(0x1002)).unwrap();
        q.try_set_used_ring_address(GuestAddress(0x1004)).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(&mem));
        let mut calls = 0;
        let result = serve_batch(&mut q, &mem, usize::MAX, |q| {
            calls += 1;
            assert!(calls < 1000, "the batch does not end");
            let Some(chain) = pop_chain(q, &mem)? else {
                return Ok(Step::Empty);
            };
            add_used(q, &mem, chain.head_index(), 0)?;
            Ok(Step::Next)
        });
        assert!(matches!(result, Err(RingError::AvailRing(_))), "{result:?}");
        assert_eq!(calls, 3, "one chain, the empty ring, the empty ring again");
    }

    #[test]
    fn chains_with_a_head_out_of_range_are_skipped() {
        let mem = memory();
        let d = Driver::new(&mem, 0x1000, 8);
        let mut q = d.queue();
        assert!(!return_chain("test", &mut q, &mem, 8, 5).unwrap());
        assert_eq!(d.used_idx(), 0);
        assert!(add_used(&mut q, &mem, 8, 5).is_err());
        assert!(return_chain("test", &mut q, &mem, 7, 5).unwrap());
        assert_eq!((d.used_idx(), d.used(0)), (1, (7, 5)));
    }

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
