//! `virtio_ring`: the split-ring chain walker every device uses
//! (`ferrio_devices::virtio::ring`: `pop_chain`, `serve_batch`, `add_used`,
//! `return_chain`, `needs_notification`), descriptor chains with indirect tables, and
//! the guest-buffer streams built from them (`virtio::iov`: `Buffers`, `GuestIovecs`).
//!
//! Input: guest ([`Guest::read`]), queue ([`QueueSpec::read`], up to 256 entries), then
//! ops (`u8` each): 0 walk one chain, 1 publish, 2 poke, 3 a budgeted batch, 4 the
//! interrupt decision, 5 UNMAP, 6 a bounded config read.

use ferrio_devices::virtio::iov::{Buffers, GuestIovecs};
use ferrio_devices::virtio::ring::{self, RingError, Step};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemory, Permissions};

use crate::guest::{self, iommu_guest, plain_guest, Guest, Image, QueueSpec, Ring};
use crate::input::{Input, Seed};
use crate::with_view;

const MAX_OPS: usize = 48;
const QUEUE_MAX: u16 = 256;

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut guest = Guest::read(&mut inp);
    let spec = QueueSpec::read(&mut inp, 8);
    let Some(mut queue) = with_view!(guest, |m| spec.queue(m, QUEUE_MAX)) else {
        crate::note!("ring: queue refused {spec:?}");
        return;
    };
    let mut walked = false;
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 7 {
            0 => {
                walked = true;
                let arg = Walk::read(&mut inp);
                if with_view!(guest, |m| walk(&mut queue, m, &arg)).is_err() {
                    return;
                }
            }
            1 => spec.publish(&guest.phys, u16::from(inp.u8() % 8)),
            2 => guest::poke(&guest.phys, &mut inp),
            3 => {
                walked = true;
                let budget = usize::from(inp.u8() % 16) + 1;
                if with_view!(guest, |m| batch(&mut queue, m, budget)).is_err() {
                    return;
                }
            }
            4 => {
                let _ = with_view!(guest, |m| ring::needs_notification(&mut queue, m));
            }
            5 => guest.unmap(&mut inp),
            _ => {
                let config = inp.blob();
                let offset = inp.u64();
                let mut out = vec![0xa5; usize::from(inp.u8())];
                ring::read_config_bytes(config, offset, &mut out);
                for (i, b) in out.iter().enumerate() {
                    let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
                    let want = at.and_then(|a| config.get(a)).copied().unwrap_or(0);
                    assert_eq!(*b, want, "config byte {i}");
                }
            }
        }
    }
    if !walked {
        let _ = with_view!(guest, |m| batch(&mut queue, m, 64));
    }
}

/// What to do with one chain: where to read and write in its streams and the used
/// length to return it with.
struct Walk {
    read_at: u64,
    read_len: u16,
    write: Vec<u8>,
    used_len: u32,
}

impl Walk {
    fn read(inp: &mut Input<'_>) -> Walk {
        Walk {
            read_at: u64::from(inp.u16()),
            read_len: inp.u16() % 0x2000,
            write: inp.blob().to_vec(),
            used_len: inp.u32(),
        }
    }
}

/// Pops one chain, walks it into its two streams, copies in and out of them, pins the
/// buffers as iovecs and returns the chain.
fn walk<M: GuestMemory>(queue: &mut Queue, mem: &M, arg: &Walk) -> Result<(), RingError> {
    let Some(chain) = ring::pop_chain(queue, mem)? else {
        return Ok(());
    };
    let head = chain.head_index();
    if head < queue.size() {
        // pop_chain's promise: the head's descriptor-table entry was readable.
        let entry = GuestAddress(queue.desc_table()).checked_add(16 * u64::from(head));
        assert!(entry.is_some_and(|e| mem.check_range(e, 16, Permissions::Read)));
    }
    let (mut readable, mut writable) = (Buffers::default(), Buffers::default());
    let mut count = 0usize;
    let mut bytes = 0u64;
    let mut in_memory = true;
    for desc in chain {
        count += 1;
        bytes += u64::from(desc.len());
        // As every device does before it uses a buffer.
        let access = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        in_memory &= mem.check_range(desc.addr(), desc.len() as usize, access);
        if desc.is_write_only() {
            writable.push(desc.addr(), desc.len());
        } else {
            readable.push(desc.addr(), desc.len());
        }
    }
    // virtio-queue bounds a chain: the ring's size plus one indirect table (at most
    // 65535 entries), and at most 4 GiB in all.
    crate::note!("ring: chain {head}: {count} descriptors, {bytes} bytes");
    assert!(
        count <= usize::from(queue.size()) + 0xffff,
        "{count} descriptors"
    );
    assert!(bytes <= u64::from(u32::MAX), "{bytes} bytes in one chain");
    assert_eq!(readable.len() + writable.len(), bytes);
    if !in_memory {
        // Refused by a device: returned with length 0.
        ring::return_chain("fuzz", queue, mem, head, 0)?;
        return Ok(());
    }
    for (stream, to_guest) in [(&readable, false), (&writable, true)] {
        check_range(stream, arg.read_at, u64::from(arg.read_len));
        let mut buf = vec![0u8; usize::from(arg.read_len)];
        let _ = stream.read_at(mem, arg.read_at, &mut buf);
        let parts = stream.range(0, stream.len());
        if let Ok(iovs) = GuestIovecs::new(mem, &parts, to_guest) {
            let pinned: usize = iovs.iovs.iter().map(|v| v.iov_len).sum();
            assert_eq!(pinned as u64, stream.len(), "iovecs cover the stream");
        }
    }
    if let Ok(n) = writable.write_start(mem, &arg.write) {
        assert!(n as u64 <= writable.len().min(arg.write.len() as u64));
    }
    let returned = ring::return_chain("fuzz", queue, mem, head, arg.used_len)?;
    assert_eq!(returned, head < queue.size());
    Ok(())
}

/// `Buffers::range` covers exactly the part of `start..start + len` inside the stream,
/// in order, with no empty piece.
fn check_range(stream: &Buffers, start: u64, len: u64) {
    let pieces = stream.range(start, len);
    let total: u64 = pieces.iter().map(|&(_, l)| l as u64).sum();
    let want = stream.len().saturating_sub(start).min(len);
    assert_eq!(
        total,
        want,
        "range({start}, {len}) of a {}-byte stream",
        stream.len()
    );
    assert!(pieces.iter().all(|&(_, l)| l > 0));
    assert!(pieces
        .iter()
        .all(|&(a, l)| a.checked_add(l as u64 - 1).is_some()));
}

/// A budgeted batch that returns every chain with length 0; the used index moves by
/// the chains returned.
fn batch<M: GuestMemory>(queue: &mut Queue, mem: &M, budget: usize) -> Result<(), RingError> {
    let before = queue.next_used();
    let mut returned = 0u16;
    ring::serve_batch(queue, mem, budget, |q| {
        let Some(chain) = ring::pop_chain(q, mem)? else {
            return Ok(Step::Empty);
        };
        let head = chain.head_index();
        let n = chain.count();
        if ring::return_chain("fuzz", q, mem, head, n as u32)? {
            returned = returned.wrapping_add(1);
        }
        Ok(Step::Next)
    })?;
    assert_eq!(queue.next_used(), before.wrapping_add(returned));
    Ok(())
}

/// Seeds: direct and indirect chains, mixed directions, a wrapped ring, EVENT_IDX,
/// behind the IOMMU.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let walk = |s: Seed| s.u8(0).u16(0).u16(64).blob(b"device").u32(6);
    for (name, indirect, iommu, event_idx, start) in [
        ("direct", false, false, false, 0u16),
        ("indirect", true, false, false, 0),
        ("iommu", true, true, false, 0),
        ("event_idx_wrapped", false, false, true, 0xfffe),
    ] {
        let mut img = Image::new();
        let mut ring = Ring::new(&mut img, 0, 16);
        // A wrapped ring: device and driver indexes continue from `start`.
        ring.start_at(&mut img, start);
        img.put(0x300, b"0123456789abcdef");
        let bufs = [(0x300, 16, false), (0x310, 8, false), (0x400, 32, true)];
        if indirect {
            ring.add(&mut img, &bufs[..1]);
            ring.add_indirect(&mut img, 0x200, &bufs);
        } else {
            ring.add(&mut img, &bufs);
            ring.add(&mut img, &bufs[2..]);
        }
        let seed = if iommu {
            iommu_guest(Seed::new(), &img)
        } else {
            plain_guest(Seed::new(), &img)
        };
        let flags = u8::from(event_idx);
        let seed = ring.spec.write(seed, ring.size_log2(), flags);
        let seed = walk(walk(seed)).u8(3).u8(15).u8(4);
        out.push((name, seed.build()));
    }
    out
}
