//! Ring handling of virtio-iommu, apart from any thread: [`process_requests`] serves
//! the requestq, [`post_faults`] reports pending faults on the eventq. The IOMMU's own
//! queues live in guest-physical memory (the device is not behind itself).
//!
//! A request chain is device-readable descriptors followed by device-writable ones;
//! the tail (status) is the last 4 bytes of the writable part. A chain that cannot be
//! parsed that far (broken, readable after writable, outside memory, writable part
//! shorter than the tail or longer than any reply) is returned with used length 0 and
//! nothing written (spec 5.13.6). Otherwise the whole writable part is written
//! (zeroes, PROBE properties, the tail) and its length is the used length. Ring
//! errors are [`RingError`]s: the device must then report DEVICE_NEEDS_RESET.
//!
//! Notification suppression is that of every device ([`ring::serve_batch`]): drain
//! with notifications disabled, re-enable, loop when buffers arrived meanwhile;
//! interrupt once per batch when [`ring::needs_notification`] says so (EVENT_IDX
//! aware).

use ferrio_devices::virtio::ring::{self, RingError, Step};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemory, Permissions};

use crate::domain::Shared;
use crate::fault::{FaultQueue, FAULT_EVENT_SIZE};
use crate::request::{self, Parsed, RequestCtx, Status, MAX_READABLE, TAIL_SIZE};

/// The log prefix.
const DEVICE: &str = "virtio-iommu";

/// What one [`process_requests`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestStats {
    /// Chains returned to the used ring.
    pub chains: usize,
    /// Chains returned unanswered (used length 0).
    pub unparsable: usize,
    /// The driver must be interrupted for this queue.
    pub notify: bool,
}

/// What one [`post_faults`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventStats {
    /// Fault events written.
    pub posted: usize,
    /// Event buffers returned unused (too small, readable, outside memory).
    pub invalid: usize,
    /// The driver must be interrupted for this queue.
    pub notify: bool,
}

/// Serves every available request, in order. A request that removes translations
/// (UNMAP, DETACH, ATTACH moving an endpoint) completes only after the DMA requests
/// that were in flight on the affected endpoints have finished.
pub(crate) fn process_requests<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    shared: &Shared,
    ctx: &RequestCtx,
) -> Result<RequestStats, RingError> {
    let mut stats = RequestStats::default();
    let mut descs = Vec::new();
    ring::serve_batch(queue, mem, usize::MAX, |queue| {
        let Some(chain) = ring::pop_chain(queue, mem)? else {
            return Ok(Step::Empty);
        };
        let head = chain.head_index();
        let used = match serve(chain, mem, shared, ctx, &mut descs) {
            Some(len) => len,
            None => {
                stats.unparsable += 1;
                0
            }
        };
        if ring::return_chain(DEVICE, queue, mem, head, used)? {
            stats.chains += 1;
        }
        Ok(Step::Next)
    })?;
    stats.notify = stats.chains > 0 && ring::needs_notification(queue, mem)?;
    Ok(stats)
}

/// Parses, executes and answers one chain; the used length, `None` when nothing could
/// be written.
fn serve<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    shared: &Shared,
    ctx: &RequestCtx,
    descs: &mut Vec<Descriptor>,
) -> Option<u32> {
    let head = chain.head_index();
    let split = match collect(chain, mem, descs) {
        Ok(split) => split,
        Err(why) => {
            tracing::debug!("virtio-iommu: request chain {head} unparsable: {why}");
            return None;
        }
    };
    let (readable, writable) = descs.split_at(split);
    let writable_len = total_len(writable);
    // Larger than any reply (a PROBE's): not worth zeroing gigabytes for an error.
    let max_writable = u64::from(ctx.probe_size) + TAIL_SIZE as u64;
    if !(TAIL_SIZE as u64..=max_writable).contains(&writable_len) {
        tracing::debug!(
            "virtio-iommu: request chain {head} has {writable_len} writable bytes \
             (no room for the tail, or more than any reply)"
        );
        return None;
    }
    let used = writable_len as u32;
    let readable_len = total_len(readable);
    let parsed = if readable_len > MAX_READABLE as u64 {
        Parsed::Reject(Status::Inval)
    } else {
        let mut bytes = vec![0u8; readable_len as usize];
        if !read_from(mem, readable, &mut bytes) {
            return None;
        }
        request::parse(&bytes, used as usize, ctx)
    };
    let reply = match parsed {
        Parsed::Request(req) => request::execute(req, shared, ctx),
        Parsed::Reject(status) => {
            tracing::debug!("virtio-iommu: request chain {head} refused: {status:?}");
            request::Reply {
                status,
                properties: None,
                fence: Default::default(),
            }
        }
        Parsed::Ignore => return None,
    };
    // Translations the request removed must not be in use when the driver hears back.
    reply.fence.wait();
    let mut out = vec![0u8; used as usize];
    if let Some(props) = &reply.properties {
        let n = props.len().min(out.len() - TAIL_SIZE);
        out[..n].copy_from_slice(&props[..n]);
    }
    let tail = out.len() - TAIL_SIZE;
    out[tail] = reply.status as u8;
    write_to(mem, writable, &out).then_some(used)
}

/// Walks `chain` into `out`; returns the index of the first device-writable
/// descriptor. Refuses broken chains, readable descriptors after writable ones and
/// buffers outside guest memory.
fn collect<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    out: &mut Vec<Descriptor>,
) -> Result<usize, &'static str> {
    out.clear();
    // virtio-queue ends the iteration silently on a loop, an overlong chain, an index
    // out of range or an unreadable descriptor: the last descriptor then says NEXT.
    let mut ends = false;
    for desc in chain {
        ends = !desc.has_next();
        out.push(desc);
    }
    if !ends {
        return Err("broken descriptor chain");
    }
    let split = out
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(out.len());
    if out[split..].iter().any(|d| !d.is_write_only()) {
        return Err("device-readable descriptor after a device-writable one");
    }
    for (i, d) in out.iter().enumerate() {
        let access = if i < split {
            Permissions::Read
        } else {
            Permissions::Write
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err("buffer outside guest memory");
        }
    }
    Ok(split)
}

fn total_len(descs: &[Descriptor]) -> u64 {
    descs.iter().map(|d| u64::from(d.len())).sum()
}

/// Fills `buf` from the buffers `descs`, in order (they hold exactly `buf.len()`
/// bytes or more).
fn read_from<M: GuestMemory>(mem: &M, descs: &[Descriptor], buf: &mut [u8]) -> bool {
    let mut done = 0;
    for d in descs {
        if done == buf.len() {
            break;
        }
        let n = (d.len() as usize).min(buf.len() - done);
        if mem.read_slice(&mut buf[done..done + n], d.addr()).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Writes `data` across the buffers `descs`, in order.
fn write_to<M: GuestMemory>(mem: &M, descs: &[Descriptor], data: &[u8]) -> bool {
    let mut done = 0;
    for d in descs {
        if done == data.len() {
            break;
        }
        let n = (d.len() as usize).min(data.len() - done);
        if mem.write_slice(&data[done..done + n], d.addr()).is_err() {
            return false;
        }
        done += n;
    }
    done == data.len()
}

/// Writes pending faults into eventq buffers, oldest first, until either runs out. A
/// buffer that cannot hold an event is returned with used length 0 and the fault
/// waits for the next one.
pub(crate) fn post_faults<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    faults: &FaultQueue,
) -> Result<EventStats, RingError> {
    let mut stats = EventStats::default();
    let mut descs = Vec::new();
    let mut used = 0;
    if faults.peek().is_none() {
        return Ok(stats);
    }
    // Kicks stay enabled while faults wait for buffers.
    ring::serve_batch(queue, mem, usize::MAX, |queue| {
        let Some(fault) = faults.peek() else {
            return Ok(Step::Done);
        };
        let Some(chain) = ring::pop_chain(queue, mem)? else {
            return Ok(Step::Empty);
        };
        let head = chain.head_index();
        let written = match collect(chain, mem, &mut descs) {
            Ok(0) if total_len(&descs) >= FAULT_EVENT_SIZE as u64 => {
                write_to(mem, &descs, &fault.to_bytes())
            }
            _ => false,
        };
        let len = if written {
            faults.pop();
            stats.posted += 1;
            FAULT_EVENT_SIZE as u32
        } else {
            tracing::debug!("virtio-iommu: eventq buffer {head} unusable");
            stats.invalid += 1;
            0
        };
        if ring::return_chain(DEVICE, queue, mem, head, len)? {
            used += 1;
        }
        Ok(Step::Next)
    })?;
    stats.notify = used > 0 && ring::needs_notification(queue, mem)?;
    Ok(stats)
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
