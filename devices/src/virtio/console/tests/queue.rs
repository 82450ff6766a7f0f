//! The pure queue functions against mock rings.

use std::collections::VecDeque;
use std::io::{self, Write};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_USED_F_NO_NOTIFY};
use virtio_queue::QueueT;

use super::{get, memory, put, ro, wo, Driver, MEM_SIZE};
use crate::dma::DmaTracker;
use crate::virtio::console::queue::{fill_rx, process_tx, QueueError, RxStats, TxStats};

const BUF: u64 = 0x10_0000;

#[test]
fn tx_chain_of_two_buffers_in_order() {
    let mem = memory();
    let mut drv = Driver::new(&mem, 0, 16);
    put(&mem, BUF, b"hello ");
    put(&mem, BUF + 0x1000, b"world");
    drv.add(&[ro(BUF, 6), ro(BUF + 0x1000, 5)]);
    let mut q = drv.queue();
    let mut sink = Vec::new();
    let stats = process_tx(&mut q, &mem, &mut sink, &DmaTracker::untracked()).unwrap();
    assert_eq!(sink, b"hello world");
    let expected = TxStats {
        chains: 1,
        bytes: 11,
        invalid: 0,
        lost: 0,
        notify: true,
    };
    assert_eq!(stats, expected);
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used(0), (0, 0));
    // Nothing more: no chains, no notification.
    let stats = process_tx(&mut q, &mem, &mut sink, &DmaTracker::untracked()).unwrap();
    assert_eq!(stats, TxStats::default());
    // Notifications are enabled again (no EVENT_IDX: used flags clear).
    assert_eq!(drv.used_flags() & VRING_USED_F_NO_NOTIFY as u16, 0);
}

#[test]
fn tx_many_chains() {
    let mem = memory();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut expected = Vec::new();
    for i in 0..10u64 {
        let text = format!("line {i}\n");
        put(&mem, BUF + i * 0x100, text.as_bytes());
        expected.extend_from_slice(text.as_bytes());
        drv.add(&[ro(BUF + i * 0x100, text.len() as u32)]);
    }
    let mut q = drv.queue();
    let mut sink = Vec::new();
    let stats = process_tx(&mut q, &mem, &mut sink, &DmaTracker::untracked()).unwrap();
    assert_eq!(sink, expected);
    assert_eq!((stats.chains, stats.invalid), (10, 0));
    assert_eq!(drv.used_idx(), 10);
    for n in 0..10 {
        assert_eq!(drv.used(n), (u32::from(n), 0));
    }
}

#[test]
fn tx_refuses_bad_chains_and_goes_on() {
    let mem = memory();
    let mut drv = Driver::new(&mem, 0, 16);
    put(&mem, BUF, b"AAAA");
    put(&mem, BUF + 0x100, b"BBBB");
    drv.add(&[ro(BUF, 4), wo(BUF + 0x100, 4)]); // device-writable on the transmitq
    drv.add(&[ro(BUF, 4)]);
    drv.add(&[ro(MEM_SIZE - 2, 4)]); // runs past the end of memory
    drv.add(&[ro(1 << 40, 16)]); // nowhere
    drv.add(&[ro(BUF, 0)]); // empty buffer
    drv.add(&[ro(BUF + 0x100, 4)]);
    let mut q = drv.queue();
    let mut sink = Vec::new();
    let stats = process_tx(&mut q, &mem, &mut sink, &DmaTracker::untracked()).unwrap();
    assert_eq!(sink, b"AAAABBBB");
    assert_eq!((stats.chains, stats.invalid, stats.bytes), (6, 4, 8));
    for n in 0..6 {
        assert_eq!(drv.used(n).1, 0);
    }
}

#[test]
fn tx_broken_chains() {
    let mem = memory();
    let drv = Driver::new(&mem, 0, 16);
    put(&mem, BUF, b"ok");
    // A loop: 0 -> 1 -> 0.
    drv.set_desc(0, BUF, 2, VRING_DESC_F_NEXT as u16, 1);
    drv.set_desc(1, BUF, 2, VRING_DESC_F_NEXT as u16, 0);
    drv.publish(0);
    // A next index out of range.
    drv.set_desc(2, BUF, 2, VRING_DESC_F_NEXT as u16, 99);
    drv.publish(2);
    // A head index out of range: cannot be returned, skipped.
    drv.publish(1000);
    // A good one after them.
    drv.set_desc(3, BUF, 2, 0, 0);
    drv.publish(3);
    let mut q = drv.queue();
    let mut sink = Vec::new();
    let stats = process_tx(&mut q, &mem, &mut sink, &DmaTracker::untracked()).unwrap();
    assert_eq!(sink, b"ok");
    assert_eq!((stats.chains, stats.invalid), (3, 3));
    assert_eq!(drv.used_idx(), 3);
    assert_eq!(drv.used(0), (0, 0));
    assert_eq!(drv.used(1), (2, 0));
    assert_eq!(drv.used(2), (3, 0));
}

#[test]
fn tx_avail_index_jump_is_a_ring_error() {
    let mem = memory();
    let drv = Driver::new(&mem, 0, 16);
    drv.set_avail_idx(17);
    let mut q = drv.queue();
    let err = process_tx(&mut q, &mem, &mut Vec::new(), &DmaTracker::untracked()).unwrap_err();
    assert!(matches!(err, QueueError::AvailRing(_)), "{err}");
    assert_eq!(drv.used_idx(), 0);
}

struct FailingSink;

impl Write for FailingSink {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::BrokenPipe))
    }
    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

#[test]
fn tx_sink_error_still_completes_chains() {
    let mem = memory();
    let mut drv = Driver::new(&mem, 0, 16);
    drv.add(&[ro(BUF, 5)]);
    drv.add(&[ro(BUF, 7)]);
    let mut q = drv.queue();
    let stats = process_tx(&mut q, &mem, &mut FailingSink, &DmaTracker::untracked()).unwrap();
    assert_eq!((stats.chains, stats.invalid, stats.lost), (2, 0, 12));
    assert_eq!(drv.used_idx(), 2);
}

#[test]
fn rx_input_larger_than_buffers_stays_pending() {
    let mem = memory();
    let mut drv = Driver::new(&mem, 0, 16);
    drv.add(&[wo(BUF, 8)]);
    drv.add(&[wo(BUF + 0x100, 4), wo(BUF + 0x200, 4)]);
    let mut q = drv.queue();
    let mut input: VecDeque<u8> = (b'a'..=b't').collect(); // 20 bytes
    let stats = fill_rx(&mut q, &mem, &mut input, &DmaTracker::untracked()).unwrap();
    let expected = RxStats {
        chains: 2,
        bytes: 16,
        invalid: 0,
        notify: true,
    };
    assert_eq!(stats, expected);
    assert_eq!(get(&mem, BUF, 8), b"abcdefgh");
    assert_eq!(get(&mem, BUF + 0x100, 4), b"ijkl");
    assert_eq!(get(&mem, BUF + 0x200, 4), b"mnop");
    assert_eq!((drv.used(0), drv.used(1)), ((0, 8), (1, 8)));
    assert_eq!(input.iter().copied().collect::<Vec<_>>(), b"qrst");
    // A new buffer larger than the rest: partial use, input empty.
    drv.add(&[wo(BUF + 0x300, 64)]);
    let stats = fill_rx(&mut q, &mem, &mut input, &DmaTracker::untracked()).unwrap();
    assert_eq!((stats.chains, stats.bytes), (1, 4));
    assert_eq!(drv.used(2), (3, 4));
    assert_eq!(get(&mem, BUF + 0x300, 4), b"qrst");
    assert!(input.is_empty());
}

#[test]
fn rx_without_buffers_consumes_nothing() {
    let mem = memory();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    q.set_event_idx(true);
    let mut input: VecDeque<u8> = b"pending".iter().copied().collect();
    let stats = fill_rx(&mut q, &mem, &mut input, &DmaTracker::untracked()).unwrap();
    assert_eq!(stats, RxStats::default());
    assert_eq!(input.len(), 7);
    assert_eq!(drv.used_idx(), 0);
    // The device asked to be kicked on the next buffer.
    assert_eq!(drv.avail_event(), 0);
    // Empty input leaves the buffers alone.
    drv.add(&[wo(BUF, 8)]);
    let stats = fill_rx(&mut q, &mem, &mut VecDeque::new(), &DmaTracker::untracked()).unwrap();
    assert_eq!(stats, RxStats::default());
    assert_eq!(drv.used_idx(), 0);
}

#[test]
fn rx_refuses_read_only_and_bad_buffers() {
    let mem = memory();
    let mut drv = Driver::new(&mem, 0, 16);
    put(&mem, BUF, b"untouched");
    drv.add(&[ro(BUF, 9)]); // device-readable on the receiveq
    drv.add(&[wo(BUF + 0x100, 4), ro(BUF, 9)]);
    drv.add(&[wo(MEM_SIZE - 1, 2)]);
    drv.add(&[wo(BUF + 0x200, 0)]);
    drv.add(&[wo(BUF + 0x300, 16)]);
    let mut q = drv.queue();
    let mut input: VecDeque<u8> = b"data".iter().copied().collect();
    let stats = fill_rx(&mut q, &mem, &mut input, &DmaTracker::untracked()).unwrap();
    assert_eq!((stats.chains, stats.invalid, stats.bytes), (5, 4, 4));
    assert_eq!(get(&mem, BUF, 9), b"untouched");
    assert_eq!(get(&mem, BUF + 0x100, 4), [0; 4]);
    for n in 0..4 {
        assert_eq!(drv.used(n).1, 0);
    }
    assert_eq!(drv.used(4), (5, 4));
    assert_eq!(get(&mem, BUF + 0x300, 4), b"data");
}

#[test]
fn event_idx_suppresses_and_requires_notifications() {
    let mem = memory();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    q.set_event_idx(true);
    let mut sink = Vec::new();
    put(&mem, BUF, b"x");

    // used_event 0: the first used buffer (idx 0 -> 1) must interrupt.
    drv.set_used_event(0);
    drv.add(&[ro(BUF, 1)]);
    assert!(
        process_tx(&mut q, &mem, &mut sink, &DmaTracker::untracked())
            .unwrap()
            .notify
    );
    // The device asks for a kick at the next avail entry.
    assert_eq!(drv.avail_event(), 1);

    // used_event 3: idx 1 -> 2 needs none, 2 -> 4 crosses it.
    drv.set_used_event(3);
    drv.add(&[ro(BUF, 1)]);
    let stats = process_tx(&mut q, &mem, &mut sink, &DmaTracker::untracked()).unwrap();
    assert_eq!((stats.chains, stats.notify), (1, false));
    drv.add(&[ro(BUF, 1)]);
    drv.add(&[ro(BUF, 1)]);
    let stats = process_tx(&mut q, &mem, &mut sink, &DmaTracker::untracked()).unwrap();
    assert_eq!((stats.chains, stats.notify), (2, true));
    assert_eq!(drv.avail_event(), 4);

    // A used_event far behind (the driver does not want interrupts now).
    drv.set_used_event(1);
    drv.add(&[ro(BUF, 1)]);
    assert!(
        !process_tx(&mut q, &mem, &mut sink, &DmaTracker::untracked())
            .unwrap()
            .notify
    );
    assert_eq!(sink, b"xxxxx");

    // The receiveq follows the same rule.
    let mut rdrv = Driver::new(&mem, 0x8000, 16);
    let mut rq = rdrv.queue();
    rq.set_event_idx(true);
    rdrv.set_used_event(1);
    rdrv.add(&[wo(BUF + 0x100, 1)]);
    rdrv.add(&[wo(BUF + 0x200, 1)]);
    let mut input: VecDeque<u8> = b"a".iter().copied().collect();
    assert!(
        !fill_rx(&mut rq, &mem, &mut input, &DmaTracker::untracked())
            .unwrap()
            .notify
    );
    input.push_back(b'b');
    assert!(
        fill_rx(&mut rq, &mem, &mut input, &DmaTracker::untracked())
            .unwrap()
            .notify
    );
}

#[test]
fn ring_indices_wrap() {
    let mem = memory();
    let mut drv = Driver::new(&mem, 0, 4);
    let mut q = drv.queue();
    let mut sink = Vec::new();
    let mut expected = Vec::new();
    for round in 0..10u8 {
        let byte = b'0' + round;
        put(&mem, BUF + u64::from(round), &[byte]);
        expected.push(byte);
        drv.add(&[ro(BUF + u64::from(round), 1)]);
        assert_eq!(
            process_tx(&mut q, &mem, &mut sink, &DmaTracker::untracked())
                .unwrap()
                .chains,
            1
        );
    }
    assert_eq!(sink, expected);
    assert_eq!(drv.used_idx(), 10);
}
