mod harness;
mod misuse;

use ferrio_devices::virtio::features::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use ferrio_devices::virtio::status::*;
use harness::*;

use super::*;
use crate::capability::{CAP_ID_MSIX, CAP_ID_PCIE};
use crate::config::{CLASS_CODE, INTERRUPT_PIN, SUBSYSTEM_ID, SUBSYSTEM_VENDOR_ID};
use crate::virtio_pci::common_cfg::offset::*;
use crate::virtio_pci::common_cfg::NO_VECTOR;
use crate::virtio_pci::layout::{cfg_type, BAR_SIZE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET};

#[test]
fn identity_and_bar() {
    let (mut d, _, _) = setup(&[64, 64]);
    assert_eq!(d.cfg_read(0, 2), 0x1af4);
    assert_eq!(d.cfg_read(2, 2), 0x1040 + 3);
    assert_eq!(d.cfg_read(8, 1), 1, "revision");
    assert_eq!(
        d.cfg_read(CLASS_CODE, 1) | d.cfg_read(CLASS_CODE + 1, 2) << 8,
        0x078000
    );
    assert_eq!(d.cfg_read(SUBSYSTEM_VENDOR_ID, 2), 0x1af4);
    assert_eq!(d.cfg_read(SUBSYSTEM_ID, 2), 0x1100);
    assert_eq!(d.cfg_read(INTERRUPT_PIN, 1), 0, "MSI-X only");
    let bars = d.dev.bars();
    assert_eq!(bars.len(), 1);
    assert_eq!(bars[0].index, 0);
    assert_eq!(bars[0].size, BAR_SIZE);
    assert_eq!(
        bars[0].kind,
        crate::BarKind::Mmio64 {
            prefetchable: false
        }
    );
    assert_eq!(d.dev.bar_mapping(0), Some(BAR_ADDR));
}

#[test]
fn class_codes_per_type() {
    use ferrio_devices::virtio::device_type::*;
    for (t, class) in [
        (NET, 0x020000),
        (BLOCK, 0x018000),
        (CONSOLE, 0x078000),
        (42, 0xff0000),
    ] {
        let (mut dev, _) = FakeDevice::new(&[16]);
        dev.kind = t;
        let pci =
            VirtioPciDevice::new(Box::new(dev), guest_memory(), FakeMsi::new(2), false).unwrap();
        let cfg = pci.config_space();
        assert_eq!(cfg.read_u16(2), 0x1040 + t as u16);
        assert_eq!(cfg.read_u32(8) >> 8, class, "type {t}");
    }
}

#[test]
fn capabilities_describe_bar0() {
    let (d, _, _) = setup(&[64, 64, 16]);
    let cfg = d.dev.config_space();
    let ids: Vec<u8> = cfg.capabilities().iter().map(|&(id, _)| id).collect();
    assert!(ids.contains(&CAP_ID_PCIE));
    assert!(ids.contains(&CAP_ID_MSIX));
    assert_eq!(ids.iter().filter(|&&id| id == 0x09).count(), 5);
    assert_eq!(d.caps[&cfg_type::COMMON].3, 0x1000);
    assert_eq!(d.caps[&cfg_type::COMMON].2, 0x0000);
    assert_eq!(d.caps[&cfg_type::ISR].2, 0x1000);
    assert_eq!(d.caps[&cfg_type::DEVICE].2, 0x2000);
    assert_eq!(d.caps[&cfg_type::NOTIFY].2, 0x3000);
    assert_eq!(d.caps[&cfg_type::NOTIFY].3, 12, "4 bytes per queue");
    assert!(d.caps.contains_key(&cfg_type::PCI_CFG));
    for (_, bar, _, _) in d.caps.values() {
        assert_eq!(*bar, 0);
    }
    assert_eq!(d.notify_multiplier, 4);
    // MSI-X: 4 vectors, table and PBA in BAR 0.
    let m = u16::from(cfg.find_capability(CAP_ID_MSIX).unwrap());
    assert_eq!(cfg.read_u16(m + 2) & 0x7ff, 3);
    assert_eq!(u64::from(cfg.read_u32(m + 4)), MSIX_TABLE_OFFSET);
    assert_eq!(u64::from(cfg.read_u32(m + 8)), MSIX_PBA_OFFSET);
}

#[test]
fn offered_features_add_version_and_access_platform() {
    assert_eq!(offered_features(0, false), VIRTIO_F_VERSION_1);
    assert_eq!(
        offered_features(1, true),
        1 | VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM
    );
    assert_eq!(
        offered_features(1 << 40 | 1 << 34, false),
        VIRTIO_F_VERSION_1
    );
    let (mut dev, _) = FakeDevice::new(&[16]);
    dev.features = DEV_FEATURE;
    let pci = VirtioPciDevice::new(Box::new(dev), guest_memory(), FakeMsi::new(2), true).unwrap();
    let mut d = Driver::new(pci);
    d.map_bar();
    d.common_write(DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(d.common_read(DEVICE_FEATURE, 4), 0b11);
    d.common_write(DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(d.common_read(DEVICE_FEATURE, 4), DEV_FEATURE);
}

#[test]
fn construction_errors() {
    let (mut dev, _) = FakeDevice::new(&[16]);
    dev.kind = 0x40;
    let err = VirtioPciDevice::new(Box::new(dev), guest_memory(), FakeMsi::new(2), false);
    assert!(matches!(
        err,
        Err(VirtioPciError::UnsupportedDeviceType(0x40))
    ));
    let (dev, _) = FakeDevice::new(&[16, 16]);
    let err = VirtioPciDevice::new(Box::new(dev), guest_memory(), FakeMsi::new(2), false);
    assert!(
        matches!(err, Err(VirtioPciError::Msix(_))),
        "3 vectors needed"
    );
    let (dev, _) = FakeDevice::new(&[12]);
    let err = VirtioPciDevice::new(Box::new(dev), guest_memory(), FakeMsi::new(2), false);
    assert!(matches!(
        err,
        Err(VirtioPciError::InvalidQueueMaxSize { .. })
    ));
}

#[test]
fn linux_bring_up_activates_with_the_queues() {
    let (mut d, log, _) = setup(&[256, 128]);
    d.bring_up(WANTED, 64);
    assert_eq!(d.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(d.dev.is_active());
    let log = log.lock().unwrap();
    assert_eq!(log.acked, vec![WANTED]);
    assert_eq!(log.activations.len(), 1);
    let queues = &log.activations[0];
    assert_eq!(queues.len(), 2);
    for (i, q) in queues.iter().enumerate() {
        let (desc, avail, used) = ring_addrs(0x1_0000 + 0x4000 * i as u64, 64);
        assert_eq!(
            *q,
            QueueRecord {
                index: i as u16,
                size: 64,
                desc,
                avail,
                used,
                ready: true,
                event_idx: false,
            }
        );
    }
    assert_eq!(log.notify.len(), 2);
}

#[test]
fn event_idx_follows_negotiation_and_disabled_queues_are_skipped() {
    let (mut d, log, _) = setup(&[16, 16, 16]);
    assert!(d.negotiate(WANTED | VIRTIO_F_EVENT_IDX));
    d.setup_queue(2, 8, 0x2_0000, NO_VECTOR);
    d.add_status(DRIVER_OK);
    let log = log.lock().unwrap();
    let queues = &log.activations[0];
    assert_eq!(queues.len(), 1);
    assert_eq!(queues[0].index, 2);
    assert_eq!(queues[0].size, 8);
    assert!(queues[0].event_idx);
}

#[test]
fn notify_reaches_the_queue_eventfd() {
    let (mut d, log, _) = setup(&[16, 16]);
    let events = d.dev.ioevents();
    assert_eq!(events.len(), 2);
    assert_eq!((events[0].bar, events[0].offset), (0, 0x3000));
    assert_eq!((events[1].bar, events[1].offset), (0, 0x3004));
    d.bring_up(WANTED, 16);
    let off = d.notify_offset(1);
    assert_eq!(off, events[1].offset);
    d.bar_write(off, 2, 1);
    assert_eq!(events[1].fd.read().unwrap(), 1);
    assert!(events[0].fd.read().is_err(), "queue 0 not notified");
    // The device's copy is the same eventfd.
    d.bar_write(events[0].offset, 4, 0);
    assert_eq!(log.lock().unwrap().notify[0].read().unwrap(), 1);
}

#[test]
fn queue_interrupt_needs_msix_enabled_and_unmasked() {
    let (mut d, log, msi) = setup(&[16]);
    assert!(d.negotiate(WANTED));
    d.common_write(CONFIG_MSIX_VECTOR, 2, 0);
    d.setup_queue(0, 16, 0x1_0000, 1);
    d.add_status(DRIVER_OK);
    let irq = log.lock().unwrap().interrupt.clone().unwrap();
    irq.signal_queue(0).unwrap();
    assert!(msi.take_fired().is_empty(), "MSI-X disabled: pending only");
    assert!(d.dev.msix().trigger_handle().is_pending(1));
    d.enable_msix(2);
    assert_eq!(
        msi.take_fired(),
        vec![1],
        "pending vector delivered on unmask"
    );
    irq.signal_queue(0).unwrap();
    assert_eq!(msi.take_fired(), vec![1]);
    assert_eq!(d.isr() & 1, 1);
    // Mask vector 1 in the table: signals become pending again.
    d.bar_write(MSIX_TABLE_OFFSET + 16 + 12, 4, 1);
    irq.signal_queue(0).unwrap();
    assert!(msi.take_fired().is_empty());
    d.bar_write(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
    assert_eq!(msi.take_fired(), vec![1]);
}

#[test]
fn no_vector_means_no_interrupt() {
    let (mut d, log, msi) = setup(&[16]);
    assert!(d.negotiate(WANTED));
    d.enable_msix(2);
    d.setup_queue(0, 16, 0x1_0000, NO_VECTOR);
    d.add_status(DRIVER_OK);
    let irq = log.lock().unwrap().interrupt.clone().unwrap();
    irq.signal_queue(0).unwrap();
    irq.signal_config().unwrap();
    assert!(msi.take_fired().is_empty());
    assert_eq!(d.isr(), 3, "ISR stays coherent");
    assert_eq!(d.isr(), 0, "ISR read clears");
}

#[test]
fn config_change_bumps_generation_and_fires_config_vector() {
    let (mut d, log, msi) = setup(&[16]);
    d.bring_up(WANTED, 16);
    msi.take_fired();
    let gen = d.common_read(CONFIG_GENERATION, 1);
    let irq = log.lock().unwrap().interrupt.clone().unwrap();
    irq.signal_config().unwrap();
    assert_eq!(msi.take_fired(), vec![0]);
    assert_eq!(d.common_read(CONFIG_GENERATION, 1), (gen + 1) & 0xff);
    assert_eq!(d.isr(), 2);
    assert_eq!(d.isr(), 0);
}

#[test]
fn device_config_is_forwarded_with_bounds() {
    let (mut d, log, _) = setup(&[16]);
    let base = u64::from(d.caps[&cfg_type::DEVICE].2);
    assert_eq!(d.bar_read(base, 4), 0x1312_1110);
    assert_eq!(d.bar_read(base + 6, 2), 0x1716);
    assert_eq!(d.bar_read(base + 8, 4), 0, "beyond the device's config");
    assert_eq!(d.bar_read(base + 0xffe, 4), 0, "crosses the region end");
    d.bar_write(base + 2, 2, 0xabcd);
    d.bar_write(base + 0xfff, 2, 0xabcd);
    assert_eq!(
        log.lock().unwrap().config_writes,
        vec![(2, vec![0xcd, 0xab])]
    );
}

#[test]
fn pci_cfg_window_accesses_bar0() {
    let (mut d, _, _) = setup(&[16, 16]);
    let (cap, ..) = d.caps[&cfg_type::PCI_CFG];
    let data = cap + 16;
    // Read num_queues (2 bytes at common + 0x12).
    d.cfg_write(cap + 4, 1, 0);
    d.cfg_write(cap + 8, 4, NUM_QUEUES as u32);
    d.cfg_write(cap + 12, 4, 2);
    assert_eq!(d.cfg_read(data, 2), 2);
    // Write device_status = ACKNOWLEDGE through the window.
    d.cfg_write(cap + 8, 4, DEVICE_STATUS as u32);
    d.cfg_write(cap + 12, 4, 1);
    d.cfg_write(data, 1, u32::from(ACKNOWLEDGE));
    assert_eq!(d.status(), ACKNOWLEDGE);
    assert_eq!(d.cfg_read(data, 1), u32::from(ACKNOWLEDGE));
    // Fields read back.
    assert_eq!(d.cfg_read(cap + 8, 4), DEVICE_STATUS as u32);
    assert_eq!(d.cfg_read(cap + 12, 4), 1);
    // Notify through the window signals the eventfd.
    let events = d.dev.ioevents();
    d.cfg_write(cap + 8, 4, 0x3004);
    d.cfg_write(cap + 12, 4, 2);
    d.cfg_write(data, 2, 1);
    assert_eq!(events[1].fd.read().unwrap(), 1);
    // Invalid windows are ignored: misaligned, bad length, other BAR, out of the BAR.
    for (bar, off, len) in [
        (0, 0x15, 2),
        (0, 0x14, 3),
        (1, 0x14, 1),
        (0, 0xfffc, 8),
        (0, u32::MAX, 4),
    ] {
        d.cfg_write(cap + 4, 1, bar);
        d.cfg_write(cap + 8, 4, off);
        d.cfg_write(cap + 12, 4, len);
        d.cfg_write(data, 4, 0);
        d.cfg_read(data, 4);
    }
    assert_eq!(d.status(), ACKNOWLEDGE);
}

#[test]
fn unreachable_ring_sets_needs_reset() {
    let (mut d, log, msi) = setup(&[16]);
    assert!(d.negotiate(WANTED));
    d.enable_msix(2);
    d.common_write(CONFIG_MSIX_VECTOR, 2, 0);
    d.setup_queue(0, 16, MEM_SIZE as u64 - 0x100, 1);
    d.add_status(DRIVER_OK);
    assert!(!d.dev.is_active());
    assert!(log.lock().unwrap().activations.is_empty());
    assert_ne!(d.status() & DEVICE_NEEDS_RESET, 0);
    assert_eq!(msi.take_fired(), vec![0], "config change signalled");
    assert_eq!(d.isr(), 2);
    // Reset recovers.
    d.bring_up(WANTED, 16);
    assert!(d.dev.is_active());
    assert_eq!(d.status() & DEVICE_NEEDS_RESET, 0);
}

#[test]
fn misaligned_ring_sets_needs_reset() {
    let (mut d, log, _) = setup(&[16]);
    assert!(d.negotiate(WANTED));
    d.setup_queue(0, 16, 0x1_0008, NO_VECTOR);
    d.add_status(DRIVER_OK);
    assert!(log.lock().unwrap().activations.is_empty());
    assert_ne!(d.status() & DEVICE_NEEDS_RESET, 0);
}

#[test]
fn device_refusing_activation_sets_needs_reset() {
    let (mut dev, log) = FakeDevice::new(&[16]);
    dev.fail_activate = true;
    let pci = VirtioPciDevice::new(Box::new(dev), guest_memory(), FakeMsi::new(2), false).unwrap();
    let mut d = Driver::new(pci);
    d.map_bar();
    d.bring_up(WANTED, 16);
    assert!(!d.dev.is_active());
    assert_ne!(d.status() & DEVICE_NEEDS_RESET, 0);
    assert!(log.lock().unwrap().activations.is_empty());
}

#[test]
fn device_error_from_a_worker_sets_needs_reset() {
    let (mut d, log, msi) = setup(&[16]);
    d.bring_up(WANTED, 16);
    msi.take_fired();
    let irq = log.lock().unwrap().interrupt.clone().unwrap();
    irq.device_error();
    assert_eq!(msi.take_fired(), vec![0]);
    assert_ne!(d.status() & DEVICE_NEEDS_RESET, 0);
    assert_ne!(d.dev.status() & DEVICE_NEEDS_RESET, 0);
    // The driver cannot clear it, only reset.
    d.common_write(DEVICE_STATUS, 1, 0x0f);
    assert_ne!(d.status() & DEVICE_NEEDS_RESET, 0);
    d.common_write(DEVICE_STATUS, 1, 0);
    assert_eq!(d.status(), 0);
}

#[test]
fn features_ok_refused_is_not_passed_to_the_device() {
    let (mut d, log, _) = setup(&[16]);
    assert!(!d.negotiate(DEV_FEATURE), "no VERSION_1");
    assert!(log.lock().unwrap().acked.is_empty());
    d.add_status(DRIVER_OK);
    assert!(log.lock().unwrap().activations.is_empty());
}

#[test]
fn reset_stops_the_device_and_clears_transport_state() {
    let (mut d, log, msi) = setup(&[16, 16]);
    d.bring_up(WANTED, 16);
    let events = d.dev.ioevents();
    d.bar_write(events[0].offset, 2, 0);
    d.common_write(DEVICE_STATUS, 1, 0);
    {
        let log = log.lock().unwrap();
        assert!(log.resets >= 1);
        assert!(log.reset_while_active);
        assert!(log.interrupt.is_none());
    }
    assert!(!d.dev.is_active());
    assert_eq!(d.status(), 0);
    assert_eq!(d.common_read(CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    assert_eq!(d.common_read(DEVICE_FEATURE_SELECT, 4), 0);
    for q in 0..2 {
        d.common_write(QUEUE_SELECT, 2, q);
        assert_eq!(d.common_read(QUEUE_SIZE, 2), 16);
        assert_eq!(d.common_read(QUEUE_ENABLE, 2), 0);
        assert_eq!(d.common_read(QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        assert_eq!(d.common_read(QUEUE_DESC, 4), 0);
    }
    assert!(events[0].fd.read().is_err(), "stale notification dropped");
    // MSI-X is PCI state: still enabled, entries kept.
    let trigger = d.dev.msix().trigger_handle();
    assert!(trigger.is_active());
    assert!(!trigger.is_masked(1));
    // The driver can start again.
    msi.take_fired();
    d.bring_up(WANTED, 8);
    let log = log.lock().unwrap();
    assert_eq!(log.activations.len(), 2);
    assert_eq!(log.activations[1][0].size, 8);
    assert_eq!(log.acked, vec![WANTED, WANTED]);
}
