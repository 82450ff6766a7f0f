//! The worker end to end: real threads and eventfds, guest memory shared with a test
//! driver.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{activation, memory, ro, wait_for, wo, Driver, Mem, SharedBuf, TestInterrupt};
use crate::virtio::console::{InputSource, VirtioConsole, MAX_PENDING_INPUT, RX_QUEUE, TX_QUEUE};
use crate::virtio::features::VIRTIO_F_EVENT_IDX;
use crate::virtio::VirtioDevice;

/// Guest data buffers live from here on (the rings sit below 1 MiB).
const BUF: u64 = 0x10_0000;

/// The driver's side of an activated console.
struct Rig<'a> {
    mem: &'a Mem,
    rx: Driver<'a>,
    tx: Driver<'a>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: Arc<TestInterrupt>,
}

/// Acks `features` and activates `dev` with queues of `size` laid out from `base`.
fn activate<'a>(
    dev: &mut VirtioConsole,
    mem: &'a Mem,
    base: u64,
    size: u16,
    features: u64,
) -> Rig<'a> {
    let rx = Driver::new(mem, base, size);
    let tx = Driver::new(mem, base + 0x8000, size);
    let irq = Arc::new(TestInterrupt::default());
    let (act, kicks) = activation(mem, &[(RX_QUEUE, &rx), (TX_QUEUE, &tx)], &irq);
    let [rx_kick, tx_kick] = <[EventFd; 2]>::try_from(kicks).unwrap();
    let d: &mut dyn VirtioDevice<Mem> = dev;
    d.set_acked_features(features);
    d.activate(act).unwrap();
    Rig {
        mem,
        rx,
        tx,
        rx_kick,
        tx_kick,
        irq,
    }
}

fn reset(dev: &mut VirtioConsole) {
    VirtioDevice::<Mem>::reset(dev);
}

impl Rig<'_> {
    /// Publishes `data` as a transmit chain (split in two buffers when it can be) at
    /// `addr` and kicks.
    fn send(&mut self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        let len = data.len() as u32;
        if len > 1 {
            let half = len / 2;
            self.tx
                .add(&[ro(addr, half), ro(addr + u64::from(half), len - half)]);
        } else {
            self.tx.add(&[ro(addr, len)]);
        }
        self.tx_kick.write(1).unwrap();
    }

    /// Offers one receive buffer and kicks.
    fn offer(&mut self, addr: u64, len: u32) {
        self.rx.add(&[wo(addr, len)]);
        self.rx_kick.write(1).unwrap();
    }

    /// The bytes of receive buffer `n` (as used by the device) at `addr`.
    fn received(&self, n: u16, addr: u64) -> Vec<u8> {
        let (_, len) = self.rx.used(n);
        let mut data = vec![0; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        data
    }
}

/// Bytes queued for reading on a socket.
fn unread(fd: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which points to `n`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

#[test]
fn tx_rx_reset_and_second_activation() {
    let mem = memory();
    let sink = SharedBuf::default();
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let input = InputSource::new(guest_side);
    let mut dev = VirtioConsole::new(Box::new(sink.clone()), Some(input));

    let mut rig = activate(&mut dev, &mem, 0, 256, 0);
    rig.send(BUF, b"hello world");
    wait_for("guest output", || sink.contents() == b"hello world");
    wait_for("tx interrupt", || rig.irq.queue_count(TX_QUEUE) >= 1);
    assert_eq!(rig.tx.used_idx(), 1);

    rig.offer(BUF + 0x1000, 16);
    host.write_all(b"ping").unwrap();
    wait_for("input delivered", || rig.rx.used_idx() == 1);
    assert_eq!(rig.received(0, BUF + 0x1000), b"ping");
    wait_for("rx interrupt", || rig.irq.queue_count(RX_QUEUE) >= 1);
    assert_eq!(rig.irq.errors.load(std::sync::atomic::Ordering::SeqCst), 0);

    reset(&mut dev);
    assert!(!dev.is_active());
    // The worker is gone: a kick is not served.
    rig.send(BUF + 0x2000, b"late");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.tx.used_idx(), 1);
    assert_eq!(sink.contents(), b"hello world");
    drop(rig);

    // The driver sets up fresh rings after the reset.
    let mut rig = activate(&mut dev, &mem, 0x20000, 256, VIRTIO_F_EVENT_IDX);
    rig.send(BUF + 0x3000, b"again");
    wait_for("output after reset", || {
        sink.contents() == b"hello worldagain"
    });
    rig.offer(BUF + 0x4000, 16);
    host.write_all(b"pong").unwrap();
    wait_for("input after reset", || rig.rx.used_idx() == 1);
    assert_eq!(rig.received(0, BUF + 0x4000), b"pong");
    // Dropping an active device stops its worker.
    drop(dev);
}

#[test]
fn pending_input_is_bounded_and_survives_reset() {
    let mem = memory();
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let probe = guest_side.try_clone().unwrap();
    let mut dev = VirtioConsole::new(Box::new(SharedBuf::default()), Some(guest_side.into()));
    let input: Vec<u8> = (0..MAX_PENDING_INPUT + 100)
        .map(|i| (i % 251) as u8)
        .collect();

    let rig = activate(&mut dev, &mem, 0, 256, VIRTIO_F_EVENT_IDX);
    // No receive buffers: the worker reads up to the bound, then leaves the rest.
    host.write_all(&input).unwrap();
    wait_for("input read up to the bound", || unread(&probe) == 100);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(unread(&probe), 100);
    drop(rig);
    reset(&mut dev);
    assert_eq!(dev.pending_input(), Some(MAX_PENDING_INPUT));

    // Next activation: everything arrives, in order.
    let mut rig = activate(&mut dev, &mem, 0x20000, 256, VIRTIO_F_EVENT_IDX);
    let mut got = Vec::new();
    let mut n = 0u16;
    while got.len() < input.len() {
        let addr = BUF + u64::from(n % 64) * 0x1000;
        rig.offer(addr, 4096);
        wait_for("a receive buffer used", || rig.rx.used_idx() == n + 1);
        got.extend(rig.received(n, addr));
        n += 1;
    }
    assert_eq!(got, input);
    reset(&mut dev);
    assert_eq!(dev.pending_input(), Some(0));
}

#[test]
fn input_eof_keeps_pending_bytes() {
    let mem = memory();
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let mut dev = VirtioConsole::new(Box::new(SharedBuf::default()), Some(guest_side.into()));
    let mut rig = activate(&mut dev, &mem, 0, 256, 0);
    host.write_all(b"bye").unwrap();
    drop(host);
    std::thread::sleep(Duration::from_millis(20));
    rig.offer(BUF, 64);
    wait_for("input before EOF", || rig.rx.used_idx() == 1);
    assert_eq!(rig.received(0, BUF), b"bye");
    // The worker still serves the transmitq after EOF.
    rig.send(BUF + 0x1000, b"x");
    wait_for("output after EOF", || rig.tx.used_idx() == 1);
}

/// FNV-1a, as the guest test checks the stream.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn tx_64k_arrives_intact() {
    let mem = memory();
    let sink = SharedBuf::default();
    let mut dev = VirtioConsole::new(Box::new(sink.clone()), None);
    // A small ring, so indices wrap many times; EVENT_IDX on.
    let mut rig = activate(&mut dev, &mem, 0, 16, VIRTIO_F_EVENT_IDX);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let payload: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let (mut sent, mut chains) = (0, 0u16);
    while sent < payload.len() {
        // At most 8 chains (16 descriptors) in flight.
        wait_for("a free slot", || chains.wrapping_sub(rig.tx.used_idx()) < 8);
        let len = (1 + (usize::from(chains) * 37) % 1500).min(payload.len() - sent);
        let addr = BUF + u64::from(chains % 8) * 0x1000;
        rig.send(addr, &payload[sent..sent + len]);
        sent += len;
        chains += 1;
    }
    wait_for("all output", || sink.contents().len() == payload.len());
    let out = sink.contents();
    assert_eq!(checksum(&out), checksum(&payload));
    assert_eq!(out, payload);
    wait_for("all chains used", || rig.tx.used_idx() == chains);
}

#[test]
fn ring_error_reports_device_error() {
    let mem = memory();
    let sink = SharedBuf::default();
    let mut dev = VirtioConsole::new(Box::new(sink.clone()), None);
    let rig = activate(&mut dev, &mem, 0, 16, 0);
    // The driver moves avail idx more than the queue size ahead.
    rig.tx.set_avail_idx(20);
    rig.tx_kick.write(1).unwrap();
    wait_for("device error", || {
        rig.irq.errors.load(std::sync::atomic::Ordering::SeqCst) == 1
    });
    // The queues are left alone until reset: another kick does nothing.
    rig.tx_kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.irq.errors.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(rig.tx.used_idx(), 0);
    reset(&mut dev);
    let mut rig = activate(&mut dev, &mem, 0x20000, 16, 0);
    rig.send(BUF, b"ok");
    wait_for("output after the error", || sink.contents() == b"ok");
}
