//! Bad guest accesses: ignored without panic, DEVICE_NEEDS_RESET where the spec says.

use ferrio_devices::virtio::status::*;

use super::harness::*;
use crate::virtio_pci::common_cfg::offset::*;
use crate::virtio_pci::layout::BAR_SIZE;
use crate::PciDevice;

#[test]
fn out_of_range_and_odd_bar_accesses_are_ignored() {
    let (mut d, log, _) = setup(&[16]);
    let mut buf = [0xaau8; 8];
    for (bar, off, len) in [
        (0u8, BAR_SIZE, 4usize),
        (0, BAR_SIZE - 2, 4),
        (0, u64::MAX, 4),
        (0, u64::MAX - 1, 8),
        (1, 0, 4),
        (5, 0x14, 1),
        (0, 0x0fff, 2),
        (0, 0x4000, 4),
        (0, 0x7ffc, 8),
    ] {
        d.dev.read_bar(bar, off, &mut buf[..len]);
        assert!(buf[..len].iter().all(|&b| b == 0), "{bar} {off:#x} {len}");
        d.dev.write_bar(bar, off, &[0xff; 8][..len]);
    }
    d.dev.read_bar(0, 0, &mut []);
    d.dev.write_bar(0, 0, &[]);
    // Odd widths on the common config.
    d.bar_write(DEVICE_STATUS, 2, 0x0101);
    d.bar_write(QUEUE_SELECT, 3, 0x01_0001);
    assert_eq!(d.status(), 0);
    assert_eq!(d.common_read(QUEUE_SELECT, 2), 0);
    // ISR is read-only; writing it does not set bits.
    d.bar_write(0x1000, 1, 3);
    assert_eq!(d.isr(), 0);
    assert!(log.lock().unwrap().config_writes.is_empty());
}

#[test]
fn bad_notify_writes_are_ignored() {
    let (mut d, _, _) = setup(&[16, 16]);
    let events = d.dev.ioevents();
    for (off, len) in [
        (0x3000u64, 1usize),
        (0x3002, 2),
        (0x3008, 2),
        (0x3ffc, 4),
        (0x3000, 8),
    ] {
        d.bar_write(off, len, 0);
    }
    for e in &events {
        assert!(e.fd.read().is_err());
    }
    assert_eq!(d.bar_read(0x3000, 2), 0, "notify area reads 0");
}

#[test]
fn queue_select_out_of_range_reads_zero() {
    let (mut d, _, _) = setup(&[16]);
    assert!(d.negotiate(WANTED));
    d.common_write(QUEUE_SELECT, 2, 1);
    assert_eq!(
        d.common_read(QUEUE_SIZE, 2),
        0,
        "Linux: queue not available"
    );
    d.common_write(QUEUE_ENABLE, 2, 1);
    d.common_write(QUEUE_DESC, 4, 0x1000);
    assert_eq!(d.common_read(QUEUE_ENABLE, 2), 0);
    assert_eq!(d.common_read(QUEUE_DESC, 4), 0);
    d.common_write(QUEUE_SELECT, 2, 0);
    assert_eq!(d.common_read(QUEUE_ENABLE, 2), 0);
}

#[test]
fn invalid_queue_size_is_kept_at_the_previous_value() {
    let (mut d, log, _) = setup(&[64]);
    assert!(d.negotiate(WANTED));
    d.setup_queue(0, 32, 0x1_0000, NO_VECTOR_U16);
    for bad in [0u64, 48, 128] {
        d.common_write(QUEUE_SIZE, 2, bad);
        assert_eq!(d.common_read(QUEUE_SIZE, 2), 32);
    }
    d.add_status(DRIVER_OK);
    assert_eq!(log.lock().unwrap().activations[0][0].size, 32);
}

const NO_VECTOR_U16: u16 = crate::virtio_pci::common_cfg::NO_VECTOR;

#[test]
fn queue_writes_after_driver_ok_are_ignored() {
    let (mut d, log, _) = setup(&[16, 16]);
    d.bring_up(WANTED, 16);
    d.common_write(QUEUE_SELECT, 2, 0);
    d.common_write(QUEUE_SIZE, 2, 8);
    d.common_write(QUEUE_DESC, 4, 0x8000);
    d.common_write(QUEUE_MSIX_VECTOR, 2, 2);
    assert_eq!(d.common_read(QUEUE_SIZE, 2), 16);
    assert_eq!(d.common_read(QUEUE_DESC, 4), 0x1_0000);
    assert_eq!(d.common_read(QUEUE_MSIX_VECTOR, 2), 1);
    // Rewriting DRIVER_OK does not activate twice; features stay frozen.
    d.add_status(DRIVER_OK);
    d.common_write(DRIVER_FEATURE_SELECT, 4, 0);
    d.common_write(DRIVER_FEATURE, 4, 0);
    assert_eq!(d.common_read(DRIVER_FEATURE, 4), DEV_FEATURE);
    let log = log.lock().unwrap();
    assert_eq!(log.activations.len(), 1);
    assert_eq!(log.acked.len(), 1);
}

#[test]
fn msix_vector_beyond_the_table_reads_no_vector() {
    let (mut d, _, _) = setup(&[16]);
    assert!(d.negotiate(WANTED));
    assert!(
        !d.setup_queue(0, 16, 0x1_0000, 2),
        "only vectors 0 and 1 exist"
    );
    d.common_write(CONFIG_MSIX_VECTOR, 2, 5);
    assert_eq!(
        d.common_read(CONFIG_MSIX_VECTOR, 2),
        u64::from(NO_VECTOR_U16)
    );
}

#[test]
fn status_out_of_order_is_ignored() {
    let (mut d, log, _) = setup(&[16]);
    d.common_write(DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE | DRIVER_OK));
    assert_eq!(d.status(), 0);
    d.common_write(DEVICE_STATUS, 1, u64::from(DEVICE_NEEDS_RESET));
    assert_eq!(d.status(), 0);
    d.add_status(FAILED);
    assert_eq!(d.status(), FAILED);
    assert!(log.lock().unwrap().activations.is_empty());
}

/// A small xorshift generator: deterministic, no extra dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_accesses_never_panic() {
    let (mut d, _, _) = setup(&[16, 8]);
    d.bring_up(WANTED, 8);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut buf = [0u8; 8];
    for i in 0..100_000u32 {
        let r = rng.next();
        let v = rng.next().to_le_bytes();
        let kind = r % 4;
        match kind {
            // Config space within the root complex's guarantees (below 0x100 mostly,
            // to hit the capabilities), but never the command/BAR registers so BAR 0
            // stays where it is.
            0 | 1 => {
                let len = [1usize, 2, 4][(r >> 8) as usize % 3];
                let range = if r & 0x100 != 0 { 0x100 } else { 0x1000 };
                let off = ((r >> 16) as u16 % range) & !(len as u16 - 1);
                if (0x04..0x28).contains(&off) {
                    continue;
                }
                if kind == 0 {
                    d.dev.read_config(off, &mut buf[..len]);
                } else {
                    d.dev.write_config(off, &v[..len]);
                }
            }
            _ => {
                let len = [1usize, 2, 3, 4, 8][(r >> 8) as usize % 5];
                let off = if r & 0x100 != 0 {
                    (r >> 16) % 0x3010
                } else {
                    (r >> 16) % (BAR_SIZE + 16)
                };
                // Keep the status writes rare so the device cycles through states.
                if off == DEVICE_STATUS && i % 7 != 0 {
                    continue;
                }
                if kind == 2 {
                    d.dev.read_bar((r >> 40) as u8 % 2, off, &mut buf[..len]);
                } else {
                    d.dev.write_bar(0, off, &v[..len]);
                }
            }
        }
    }
}
