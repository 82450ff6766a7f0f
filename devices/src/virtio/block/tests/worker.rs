//! The workers end to end: real threads and eventfds, guest memory shared with test
//! drivers.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use virtio_bindings::bindings::virtio_blk::*;
use vmm_sys_util::eventfd::EventFd;

use super::device::{block, dev};
use super::request::both_engines;
use super::{
    get, pattern, put, put_header, status_at, BackendOp, HookedBackend, TempImage, FEATURES,
};
use crate::virtio::block::engine::IoEngine;
use crate::virtio::block::{BlockConfig, VirtioBlock};
use crate::virtio::features::VIRTIO_F_EVENT_IDX;
use crate::virtio::testing::{activation, memory, ro, wait_for, wo, Driver, Mem, TestInterrupt};

const IMAGE: usize = 64 * 1024;
const OK: u8 = VIRTIO_BLK_S_OK as u8;

/// The driver's side of an activated device.
struct Rig<'a> {
    mem: &'a Mem,
    drivers: Vec<Driver<'a>>,
    kicks: Vec<EventFd>,
    irq: Arc<TestInterrupt>,
}

/// Acks `features` and activates `d` with `queues` queues of size 16.
fn activate<'a>(d: &mut VirtioBlock, mem: &'a Mem, queues: u16, features: u64) -> Rig<'a> {
    let drivers: Vec<_> = (0..queues)
        .map(|q| Driver::new(mem, 0x8000 * u64::from(q), 16))
        .collect();
    let irq = Arc::new(TestInterrupt::default());
    let kicks = activate_with(d, mem, &drivers, &irq, features);
    Rig {
        mem,
        drivers,
        kicks,
        irq,
    }
}

/// Acks `features` and activates `d` with `drivers` as queues 0, 1, ...; returns the
/// notify eventfds.
fn activate_with(
    d: &mut VirtioBlock,
    mem: &Mem,
    drivers: &[Driver],
    irq: &Arc<TestInterrupt>,
    features: u64,
) -> Vec<EventFd> {
    dev(d).set_acked_features(features);
    let queues: Vec<(u16, &Driver)> = (0..).zip(drivers).collect();
    let (act, kicks) = activation(mem, &queues, irq);
    dev(d).activate(act).unwrap();
    kicks
}

/// Guest addresses used by queue `q`: (header, data, status).
fn bufs(q: u16) -> (u64, u64, u64) {
    let q = u64::from(q);
    (
        0x4_0000 + q * 0x100,
        0x10_0000 + q * 0x1_0000,
        0x5_0000 + q * 0x10,
    )
}

impl Rig<'_> {
    /// Publishes a request with `len` bytes of data (`write`: OUT) on queue `q` and
    /// kicks (unless `kick` is false); returns the number of used entries to wait for.
    fn submit(&mut self, q: u16, kind: u32, sector: u64, len: u32, kick: bool) -> u16 {
        let (hdr, data, status) = bufs(q);
        put_header(self.mem, hdr, kind, sector);
        put(self.mem, status, &[0xFF]);
        let chain = match kind {
            VIRTIO_BLK_T_OUT => vec![ro(hdr, 16), ro(data, len), wo(status, 1)],
            VIRTIO_BLK_T_FLUSH => vec![ro(hdr, 16), wo(status, 1)],
            _ => vec![ro(hdr, 16), wo(data, len), wo(status, 1)],
        };
        let driver = &mut self.drivers[usize::from(q)];
        driver.add(&chain);
        if kick {
            self.kicks[usize::from(q)].write(1).unwrap();
        }
        driver.avail_idx()
    }

    fn wait_used(&self, q: u16, count: u16) {
        let driver = &self.drivers[usize::from(q)];
        wait_for("the used ring", || driver.used_idx() == count);
    }

    fn status(&self, q: u16) -> u8 {
        status_at(self.mem, bufs(q).2)
    }
}

fn requests_are_served_on_kicks_and_interrupt_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let cfg = BlockConfig {
        serial: Some("disk-0".into()),
        ..Default::default()
    };
    let mut d = block(
        &image,
        BlockConfig {
            io_engine: engine,
            ..cfg
        },
    );
    let mut rig = activate(&mut d, &mem, 1, FEATURES);
    let data: Vec<u8> = (0..1024).map(|i| (i * 3) as u8).collect();
    put(&mem, bufs(0).1, &data);
    let n = rig.submit(0, VIRTIO_BLK_T_OUT, 5, 1024, true);
    rig.wait_used(0, n);
    assert_eq!(rig.drivers[0].used(0), (0, 1));
    assert_eq!(rig.status(0), OK);
    wait_for("the interrupt", || rig.irq.queue_count(0) == 1);
    assert_eq!(image.contents()[5 * 512..7 * 512], data[..]);

    put(&mem, bufs(0).1, &[0; 2048]);
    let n = rig.submit(0, VIRTIO_BLK_T_IN, 4, 2048, true);
    rig.wait_used(0, n);
    assert_eq!(rig.drivers[0].used(1), (3, 2049));
    assert_eq!(rig.status(0), OK);
    let mut want: Vec<u8> = (4 * 512..5 * 512).map(pattern).collect();
    want.extend_from_slice(&data);
    want.extend((7 * 512..8 * 512).map(pattern));
    assert_eq!(get(&mem, bufs(0).1, 2048), want);

    let n = rig.submit(0, VIRTIO_BLK_T_GET_ID, 0, 20, true);
    rig.wait_used(0, n);
    assert_eq!(
        get(&mem, bufs(0).1, 20),
        b"disk-0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
    );
    let n = rig.submit(0, VIRTIO_BLK_T_FLUSH, 0, 0, true);
    rig.wait_used(0, n);
    assert_eq!(rig.status(0), OK);
    wait_for("4 interrupts", || rig.irq.queue_count(0) == 4);
    assert_eq!(rig.irq.errors.load(Ordering::SeqCst), 0);

    dev(&mut d).reset();
    assert!(!d.is_active());
    // After the reset nothing serves the queue.
    let n = rig.submit(0, VIRTIO_BLK_T_FLUSH, 0, 0, true);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.drivers[0].used_idx(), n - 1);
}

fn requests_published_before_activation_are_served_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut d = block(
        &image,
        BlockConfig {
            io_engine: engine,
            ..BlockConfig::default()
        },
    );
    let mut driver = Driver::new(&mem, 0, 16);
    let (hdr, data, status) = bufs(0);
    put_header(&mem, hdr, VIRTIO_BLK_T_IN, 0);
    driver.add(&[ro(hdr, 16), wo(data, 512), wo(status, 1)]);
    let irq = Arc::new(TestInterrupt::default());
    activate_with(&mut d, &mem, std::slice::from_ref(&driver), &irq, 0);
    wait_for("the used ring", || driver.used_idx() == 1);
    assert_eq!(status_at(&mem, status), OK);
    let want: Vec<u8> = (0..512).map(pattern).collect();
    assert_eq!(get(&mem, data, 512), want);
    wait_for("the interrupt", || irq.queue_count(0) == 1);
}

fn event_idx_suppresses_interrupts_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut d = block(
        &image,
        BlockConfig {
            io_engine: engine,
            ..BlockConfig::default()
        },
    );
    let mut rig = activate(&mut d, &mem, 1, FEATURES | VIRTIO_F_EVENT_IDX);
    rig.drivers[0].set_used_event(0);
    let n = rig.submit(0, VIRTIO_BLK_T_FLUSH, 0, 0, true);
    rig.wait_used(0, n);
    wait_for("the interrupt", || rig.irq.queue_count(0) == 1);
    // The device asks to be kicked for the next request.
    assert_eq!(rig.drivers[0].avail_event(), 1);
    // The driver wants an interrupt only after used entry 5.
    rig.drivers[0].set_used_event(5);
    let n = rig.submit(0, VIRTIO_BLK_T_FLUSH, 0, 0, true);
    rig.wait_used(0, n);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.irq.queue_count(0), 1);
}

fn a_broken_ring_needs_a_reset_on(engine: IoEngine) {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let mut d = block(
        &image,
        BlockConfig {
            io_engine: engine,
            ..BlockConfig::default()
        },
    );
    let rig = activate(&mut d, &mem, 1, FEATURES);
    // The available index runs more than a queue size ahead.
    rig.drivers[0].set_avail_idx(40);
    rig.kicks[0].write(1).unwrap();
    wait_for("the device error", || {
        rig.irq.errors.load(Ordering::SeqCst) == 1
    });
    dev(&mut d).reset();
}

#[test]
fn two_queues_are_served_by_two_workers() {
    let mem = memory();
    let image = TempImage::new(IMAGE);
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let held = gate.clone();
    // Reads wait until the gate opens.
    let backend = HookedBackend::new(&image, move |op| {
        if op == BackendOp::Read {
            let (open, cond) = &*held;
            drop(
                cond.wait_while(open.lock().unwrap(), |open| !*open)
                    .unwrap(),
            );
        }
    });
    let cfg = BlockConfig {
        num_queues: 2,
        ..Default::default()
    };
    let mut d = VirtioBlock::new(Box::new(backend), cfg).unwrap();
    let mut rig = activate(&mut d, &mem, 2, FEATURES);
    // Queue 0's worker blocks in a read...
    let n0 = rig.submit(0, VIRTIO_BLK_T_IN, 0, 512, true);
    std::thread::sleep(Duration::from_millis(20));
    // ... while queue 1's worker writes.
    put(&mem, bufs(1).1, &[0x77; 512]);
    let n1 = rig.submit(1, VIRTIO_BLK_T_OUT, 9, 512, true);
    rig.wait_used(1, n1);
    wait_for("queue 1's interrupt", || rig.irq.queue_count(1) == 1);
    assert_eq!(rig.status(1), OK);
    assert_eq!(image.contents()[9 * 512..10 * 512], [0x77; 512]);
    assert_eq!(rig.drivers[0].used_idx(), 0);
    assert_eq!(rig.irq.queue_count(0), 0);
    let names = worker_names();
    assert!(names.iter().any(|n| n == "virtio-blk-q0"), "{names:?}");
    assert!(names.iter().any(|n| n == "virtio-blk-q1"), "{names:?}");
    // Open the gate: queue 0 completes.
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    rig.wait_used(0, n0);
    wait_for("queue 0's interrupt", || rig.irq.queue_count(0) == 1);
    assert_eq!(rig.status(0), OK);
    dev(&mut d).reset();
}

/// Names of this process's threads.
fn worker_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

both_engines! {
    requests_are_served_on_kicks_and_interrupt_on => requests_are_served_on_kicks_and_interrupt,
    requests_published_before_activation_are_served_on => requests_published_before_activation_are_served,
    event_idx_suppresses_interrupts_on => event_idx_suppresses_interrupts,
    a_broken_ring_needs_a_reset_on => a_broken_ring_needs_a_reset,
}
