//! Attacks on the virtio-pci transport of the victim virtio-blk: queue sizes that are
//! not powers of two, enabling a queue twice (and disabling it, which drivers must not),
//! doorbell storms, configuration writes while the device runs, and a reset while
//! requests are in flight.

use std::time::{Duration, Instant};

use super::attack::Seen;
use super::blk::{Blk, DATA, RING, SLOT, S_OK, T_OUT};
use super::spec;
use crate::scenarios::vfio::virtio::{
    find_block, DESC_F_NEXT, DESC_F_WRITE, DEVICE_FEATURE, DEVICE_FEATURE_SELECT, DRIVER_FEATURE,
    DRIVER_FEATURE_SELECT, F_VERSION_1, NUM_QUEUES, QUEUE_DESC, QUEUE_DEVICE, QUEUE_DRIVER,
    QUEUE_ENABLE, QUEUE_MSIX_VECTOR, QUEUE_SELECT, QUEUE_SIZE, STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
};
use crate::vfio::pci::VIRTIO_PCI_CAP_DEVICE_CFG;

fn w16(b: &Blk, off: u64, v: u16) -> Result<(), String> {
    b.d.t.write_common(off, &v.to_le_bytes())
}

fn r16(b: &Blk, off: u64) -> Result<u16, String> {
    let mut v = [0u8; 2];
    b.d.t.read_common(off, &mut v)?;
    Ok(u16::from_le_bytes(v))
}

fn w32(b: &Blk, off: u64, v: u32) -> Result<(), String> {
    b.d.t.write_common(off, &v.to_le_bytes())
}

fn r32(b: &Blk, off: u64) -> Result<u32, String> {
    let mut v = [0u8; 4];
    b.d.t.read_common(off, &mut v)?;
    Ok(u32::from_le_bytes(v))
}

/// One good block written and read back without a reset (the device kept running).
fn still_serves(b: &mut Blk, seed: u64) -> Result<(), String> {
    let block = crate::pattern::bytes(seed, spec::BLOCK);
    b.write_ok(0, spec::GOOD_SECTOR + 8, &block)?;
    let (back, _) = b.read_ok(1, spec::GOOD_SECTOR + 8, spec::BLOCK)?;
    if back != block {
        return Err("read back different data".into());
    }
    Ok(())
}

/// Queue sizes 3, 100, 0, 0xffff, max + 1, 6 and max - 1: none may stick.
pub fn queue_size_not_pow2(b: &mut Blk) -> Result<Seen, String> {
    b.q = None;
    b.d.setup(F_VERSION_1, &[])?;
    w16(b, QUEUE_SELECT, 0)?;
    let max = r16(b, QUEUE_SIZE)?;
    let mut ok = true;
    let mut seen = Vec::new();
    for v in [
        3u16,
        100,
        0,
        0xffff,
        max.wrapping_add(1),
        6,
        max.wrapping_sub(1),
    ] {
        let before = r16(b, QUEUE_SIZE)?;
        w16(b, QUEUE_SIZE, v)?;
        let got = r16(b, QUEUE_SIZE)?;
        let valid = v != 0 && v <= max && v.is_power_of_two();
        ok &= valid || got == before;
        seen.push(format!("{v} -> reads {got}"));
    }
    Ok(Seen::new(ok, format!("max {max}: {}", seen.join(", "))))
}

/// queue_enable written 1 twice, then 0 (forbidden to drivers), before and after
/// DRIVER_OK: the queue stays enabled and serves without a reset.
pub fn queue_enable_twice(b: &mut Blk) -> Result<Seen, String> {
    b.q = None;
    let size = b.queue_size()?;
    let wanted = F_VERSION_1 | super::blk::F_INDIRECT_DESC;
    let (_, mut queues) = b.d.setup(wanted, &[(0, size, RING)])?;
    let mut reads = Vec::new();
    for v in [1u16, 0] {
        w16(b, QUEUE_ENABLE, v)?;
        reads.push(r16(b, QUEUE_ENABLE)?);
    }
    let status = b.d.t.driver_ok()?;
    for v in [1u16, 0, 1] {
        w16(b, QUEUE_ENABLE, v)?;
        reads.push(r16(b, QUEUE_ENABLE)?);
    }
    b.q = queues.pop();
    let serves = still_serves(b, 0xfe11_0000_4057_e2ab);
    let status_after = b.d.status()?;
    let ok = reads.iter().all(|&r| r == 1)
        && status & STATUS_DRIVER_OK != 0
        && status_after & STATUS_DEVICE_NEEDS_RESET == 0
        && serves.is_ok();
    Ok(Seen::new(
        ok,
        format!(
            "enable 1,0 before and 1,0,1 after DRIVER_OK read {reads:?}; status {status:#04x} -> \
             {status_after:#04x}; serves without reset: {}",
            serves.err().unwrap_or_else(|| "yes".into())
        ),
    ))
}

/// [`spec::STORM_KICKS`] doorbell stores on queue 0 with one request published, then
/// [`spec::STORM_BAD_KICKS`] on doorbells no queue has. The request must complete
/// exactly once; the device must serve on without a reset.
pub fn notify_storm(b: &mut Blk) -> Result<Seen, String> {
    b.start()?;
    let block = crate::pattern::bytes(0xfe11_0000_4057_5707, spec::BLOCK);
    b.d.s.mem.write(DATA, &block)?;
    let hdr = b.header(0, T_OUT, spec::GOOD_SECTOR + 16)?;
    let st = b.status_at(0)?;
    b.desc(0, hdr, 16, DESC_F_NEXT, 1)?;
    b.desc(1, b.data(0), spec::BLOCK as u32, DESC_F_NEXT, 2)?;
    b.desc(2, st, 1, DESC_F_WRITE, 0)?;
    let q = b.q.as_mut().ok_or("queue not set up")?;
    let since = q.ring.used_idx()?;
    q.ring.publish(0)?;
    let (region, doorbell) = b.d.t.notify_location(&b.queue()?.info);
    if region != 0 {
        return Err(format!("doorbells in BAR {region}"));
    }
    let start = Instant::now();
    b.d.s.bar0.write16_repeat(doorbell, 0, spec::STORM_KICKS)?;
    let good_secs = start.elapsed().as_secs_f64();
    let r = b.watch(since, 0)?;
    std::thread::sleep(Duration::from_millis(200));
    let used = b.queue()?.ring.used_idx()?.wrapping_sub(since);
    // Doorbells of queues that do not exist, and the last bytes of the notify area:
    // each store is an exit to the VMM.
    let queues = r16(b, NUM_QUEUES)?;
    let bad = [
        doorbell + 4 * u64::from(queues),
        doorbell + 4 * 1023,
        doorbell + 0xffe,
    ];
    let per = spec::STORM_BAD_KICKS / bad.len() as u64;
    let start = Instant::now();
    for at in bad {
        b.d.s.bar0.write16_repeat(at, 0xffff, per)?;
    }
    let bad_secs = start.elapsed().as_secs_f64();
    let status = b.d.status()?;
    let serves = still_serves(b, 0xfe11_0000_4057_5708);
    let ok = r.elem.is_some()
        && b.status_of(0)? == S_OK
        && used == 1
        && status & STATUS_DEVICE_NEEDS_RESET == 0
        && serves.is_ok();
    Ok(Seen::new(
        ok,
        format!(
            "{} kicks on queue 0 in {good_secs:.1} s ({:.0}/s): the one request {}, {used} used \
             element(s); {} kicks on doorbells of no queue in {bad_secs:.1} s ({:.0}/s); status \
             {status:#04x}; serves without reset: {}",
            spec::STORM_KICKS,
            spec::STORM_KICKS as f64 / good_secs,
            r.describe(),
            per * bad.len() as u64,
            (per * bad.len() as u64) as f64 / bad_secs,
            serves.err().unwrap_or_else(|| "yes".into())
        ),
    ))
}

/// The registers a running device must not let change (queue 0 selected).
fn snapshot(b: &Blk) -> Result<Vec<u32>, String> {
    w16(b, QUEUE_SELECT, 0)?;
    let mut v = vec![
        u32::from(r16(b, QUEUE_SIZE)?),
        u32::from(r16(b, QUEUE_ENABLE)?),
        u32::from(r16(b, QUEUE_MSIX_VECTOR)?),
        r32(b, QUEUE_DESC)?,
        r32(b, QUEUE_DESC + 4)?,
        r32(b, QUEUE_DRIVER)?,
        r32(b, QUEUE_DEVICE)?,
        u32::from(b.d.t.status()?),
        u32::from(r16(b, NUM_QUEUES)?),
    ];
    for select in 0..2 {
        w32(b, DRIVER_FEATURE_SELECT, select)?;
        v.push(r32(b, DRIVER_FEATURE)?);
        w32(b, DEVICE_FEATURE_SELECT, select)?;
        v.push(r32(b, DEVICE_FEATURE)?);
    }
    let cfg = find_block(
        &b.d.s.dev,
        &b.d.s.cfg,
        VIRTIO_PCI_CAP_DEVICE_CFG,
        "device-configuration",
    )?;
    let mut dev_cfg = [0u8; 64];
    b.d.s.dev.read(&cfg.region, cfg.base, &mut dev_cfg)?;
    v.extend(
        dev_cfg
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok(v)
}

/// Writes to every device-configuration byte and to the queue, feature and status
/// registers while DRIVER_OK is set: nothing may change, and the device must serve on.
pub fn config_write_driver_ok(b: &mut Blk) -> Result<Seen, String> {
    b.start()?;
    let before = snapshot(b)?;
    let cfg = find_block(
        &b.d.s.dev,
        &b.d.s.cfg,
        VIRTIO_PCI_CAP_DEVICE_CFG,
        "device-configuration",
    )?;
    b.d.s.dev.write(&cfg.region, cfg.base, &[0xff; 64])?;
    for at in 0..64 {
        b.d.s.dev.write(&cfg.region, cfg.base + at, &[0x5a])?;
    }
    w16(b, QUEUE_SELECT, 0)?;
    w16(b, QUEUE_SIZE, 8)?;
    w16(b, QUEUE_MSIX_VECTOR, 0xffff)?;
    w16(b, QUEUE_ENABLE, 0)?;
    for (off, v) in [
        (QUEUE_DESC, 0u32),
        (QUEUE_DESC + 4, 1),
        (QUEUE_DRIVER, 0xdead_0000),
        (QUEUE_DEVICE, 0),
    ] {
        w32(b, off, v)?;
    }
    for select in 0..2 {
        w32(b, DRIVER_FEATURE_SELECT, select)?;
        w32(b, DRIVER_FEATURE, 0xffff_ffff)?;
    }
    w16(b, NUM_QUEUES, 0x7fff)?;
    // Status writes that try to take bits back, or set bits only the device sets.
    for v in [0x07u8, 0x01, 0x4f, 0x0f] {
        b.d.write_status(v)?;
    }
    let after = snapshot(b)?;
    let changed: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    let serves = still_serves(b, 0xfe11_0000_4057_c0f1);
    Ok(Seen::new(
        changed.is_empty() && serves.is_ok(),
        format!(
            "{} registers compared, changed: {changed:?}; status {:#04x}; serves without reset: {}",
            before.len(),
            b.d.status()?,
            serves.err().unwrap_or_else(|| "yes".into())
        ),
    ))
}

/// Requests in flight when the driver resets the device: the reset must complete,
/// and the device must not touch the rings afterwards.
pub fn reset_in_flight(b: &mut Blk) -> Result<Seen, String> {
    b.start()?;
    let n = (b.size()? / 3).min(16);
    const LEN: u32 = 32 << 10;
    let q = b.q.as_ref().ok_or("queue not set up")?;
    let since = q.ring.used_idx()?;
    for i in 0..n {
        let slot = usize::from(i);
        let base = 3 * i;
        let sector = 256 + 64 * u64::from(i);
        let hdr = b.header(slot, T_OUT, sector)?;
        let st = b.status_at(slot)?;
        b.desc(base, hdr, 16, DESC_F_NEXT, base + 1)?;
        b.desc(
            base + 1,
            b.d.at(DATA + slot * SLOT),
            LEN,
            DESC_F_NEXT,
            base + 2,
        )?;
        b.desc(base + 2, st, 1, DESC_F_WRITE, 0)?;
        b.q.as_mut().ok_or("queue not set up")?.ring.publish(base)?;
    }
    b.d.kick(&b.queue()?.info)?;
    let start = Instant::now();
    b.d.write_status(0)?;
    let mut status = b.d.status()?;
    while status != 0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
        status = b.d.status()?;
    }
    let took = start.elapsed();
    let used = b.queue()?.ring.used_idx()?.wrapping_sub(since);
    let answered = (0..usize::from(n))
        .filter(|&s| b.status_of(s).is_ok_and(|v| v != 0xff))
        .count();
    // Nothing may land in the rings after the reset.
    const MARK: u16 = 0xbeef;
    b.d.s.mem.write(RING.used + 2, &MARK.to_le_bytes())?;
    std::thread::sleep(Duration::from_millis(300));
    let mark = b.d.s.mem.read_u16(RING.used + 2)?;
    b.q = None;
    Ok(Seen::new(
        status == 0 && mark == MARK,
        format!(
            "{n} writes of {} KiB in flight; reset read 0 after {:.1} ms (status {status:#04x}); \
             {used} completed before it, {answered} status bytes written; used ring {} after",
            LEN >> 10,
            took.as_secs_f64() * 1000.0,
            if mark == MARK { "untouched" } else { "WRITTEN" }
        ),
    ))
}
