//! `virtio_console`: the virtio-console queue functions (`console::queue::process_tx`
//! into a host sink that may fail, `console::queue::fill_rx` from pending host input).
//!
//! Input: guest, transmitq and receiveq (up to 256 entries each), `u8` sink (odd: it
//! fails after `u16` bytes), then ops: 0 serve TX, 1 host input (`blob`) then fill
//! RX, 2/3 publish TX/RX, 4 poke, 5 UNMAP.
//!
//! Oracle: the sink got exactly the bytes counted (sent plus lost when it fails), the
//! input shrank by exactly the bytes written to the guest, one used element per chain.

use std::collections::VecDeque;
use std::io::{self, Write};

use ferrio_devices::virtio::console::queue::{fill_rx, process_tx};
use ferrio_devices::virtio::console::MAX_PENDING_INPUT;
use virtio_queue::QueueT;

use crate::guest::{self, iommu_guest, plain_guest, Guest, Image, QueueSpec, Ring};
use crate::input::{Input, Seed};
use crate::with_view;

const MAX_OPS: usize = 32;
const QUEUE_MAX: u16 = 256;

/// A host sink that takes writes until `limit` bytes, then fails whole writes.
struct Sink {
    got: Vec<u8>,
    limit: Option<usize>,
    refused: usize,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.limit.is_some_and(|l| self.got.len() + buf.len() > l) {
            self.refused += buf.len();
            return Err(io::Error::other("the host end went away"));
        }
        self.got.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut guest = Guest::read(&mut inp);
    let tx_spec = QueueSpec::read(&mut inp, 8);
    let rx_spec = QueueSpec::read(&mut inp, 8);
    let failing = inp.u8() & 1 != 0;
    let limit = inp.u16();
    let mut sink = Sink {
        got: Vec::new(),
        limit: failing.then_some(usize::from(limit)),
        refused: 0,
    };
    let dma = guest.dma();
    let mut tx = with_view!(guest, |m| tx_spec.queue(m, QUEUE_MAX));
    let mut rx = with_view!(guest, |m| rx_spec.queue(m, QUEUE_MAX));
    let mut input = VecDeque::new();
    let (mut sent, mut lost) = (0usize, 0usize);
    let mut served = false;
    let mut serve_tx = |guest: &Guest, tx: &mut Option<virtio_queue::Queue>, sink: &mut Sink| {
        let Some(q) = tx else { return };
        let before = q.next_used();
        match with_view!(guest, |m| process_tx(q, m, sink, &dma)) {
            Ok(stats) => {
                crate::note!("console tx: {stats:?}");
                assert_eq!(q.next_used().wrapping_sub(before), stats.chains as u16);
                sent += stats.bytes;
                lost += stats.lost;
                assert_eq!(sink.got.len(), sent, "bytes in the sink");
                assert_eq!(sink.refused, lost, "bytes lost");
            }
            Err(_) => *tx = None,
        }
    };
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 6 {
            0 => {
                served = true;
                serve_tx(&guest, &mut tx, &mut sink);
            }
            1 => {
                let bytes = inp.blob();
                let room = MAX_PENDING_INPUT.saturating_sub(input.len());
                input.extend(&bytes[..bytes.len().min(room)]);
                if let Some(q) = &mut rx {
                    let (before, pending) = (q.next_used(), input.len());
                    match with_view!(guest, |m| fill_rx(q, m, &mut input, &dma)) {
                        Ok(stats) => {
                            crate::note!("console rx: {stats:?}");
                            assert_eq!(q.next_used().wrapping_sub(before), stats.chains as u16);
                            assert_eq!(pending - input.len(), stats.bytes, "input consumed");
                        }
                        Err(_) => rx = None,
                    }
                }
            }
            2 => tx_spec.publish(&guest.phys, u16::from(inp.u8() % 8)),
            3 => rx_spec.publish(&guest.phys, u16::from(inp.u8() % 8)),
            4 => guest::poke(&guest.phys, &mut inp),
            _ => guest.unmap(&mut inp),
        }
    }
    if !served {
        serve_tx(&guest, &mut tx, &mut sink);
    }
    assert_eq!(dma.inflight(), 0, "no DMA guard left behind");
}

/// Seeds: text over several buffers (direct and indirect), input into split receive
/// buffers, a failing sink, behind the IOMMU.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, indirect, failing, iommu) in [
        ("tx_rx", false, false, false),
        ("indirect", true, false, false),
        ("failing_sink", false, true, false),
        ("iommu", false, false, true),
    ] {
        let mut img = Image::new();
        let mut txr = Ring::new(&mut img, 0, 16);
        let mut rxr = Ring::new(&mut img, 0x400, 16);
        img.put(0x700, b"hello, ");
        img.put(0x780, b"world\n");
        let bufs = [(0x700, 7, false), (0x780, 6, false)];
        if indirect {
            txr.add_indirect(&mut img, 0x600, &bufs);
        } else {
            txr.add(&mut img, &bufs);
        }
        txr.add(&mut img, &bufs[1..]);
        rxr.add(&mut img, &[(0x800, 4, true), (0x900, 64, true)]);
        rxr.add(&mut img, &[(0xa00, 16, true)]);
        let seed = if iommu {
            iommu_guest(Seed::new(), &img)
        } else {
            plain_guest(Seed::new(), &img)
        };
        let seed = txr.spec.write(seed, txr.size_log2(), 0);
        let seed = rxr.spec.write(seed, rxr.size_log2(), 0);
        let seed = seed
            .bool(failing)
            .u16(9)
            .u8(0)
            .u8(1)
            .blob(b"login: root\n")
            .u8(0);
        out.push((name, seed.build()));
    }
    out
}
