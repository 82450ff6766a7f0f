use super::offset::*;
use super::*;
use ferrio_devices::virtio::features::VIRTIO_F_VERSION_1;
use ferrio_devices::virtio::status::*;

const DEV_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 | (1 << 5);

fn cfg() -> CommonCfg {
    CommonCfg::new(DEV_FEATURES, &[256, 64, 16], 4).unwrap()
}

fn r8(c: &CommonCfg, off: u64) -> u8 {
    let mut b = [0u8; 1];
    c.read(off, &mut b);
    b[0]
}
fn r16(c: &CommonCfg, off: u64) -> u16 {
    let mut b = [0u8; 2];
    c.read(off, &mut b);
    u16::from_le_bytes(b)
}
fn r32(c: &CommonCfg, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.read(off, &mut b);
    u32::from_le_bytes(b)
}
fn w8(c: &mut CommonCfg, off: u64, v: u8) -> CommonCfgAction {
    c.write(off, &[v])
}
fn w16(c: &mut CommonCfg, off: u64, v: u16) -> CommonCfgAction {
    c.write(off, &v.to_le_bytes())
}
fn w32(c: &mut CommonCfg, off: u64, v: u32) -> CommonCfgAction {
    c.write(off, &v.to_le_bytes())
}

fn write_features(c: &mut CommonCfg, f: u64) {
    w32(c, DRIVER_FEATURE_SELECT, 0);
    w32(c, DRIVER_FEATURE, f as u32);
    w32(c, DRIVER_FEATURE_SELECT, 1);
    w32(c, DRIVER_FEATURE, (f >> 32) as u32);
}

/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK: the Linux order.
fn negotiate(c: &mut CommonCfg, f: u64) -> CommonCfgAction {
    w8(c, DEVICE_STATUS, ACKNOWLEDGE);
    w8(c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER);
    write_features(c, f);
    w8(c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
}

#[test]
fn constructor_validates_queue_sizes() {
    assert!(CommonCfg::new(0, &[0], 1).is_err());
    assert!(CommonCfg::new(0, &[100], 1).is_err());
    assert!(CommonCfg::new(0, &[65535], 1).is_err());
    assert!(CommonCfg::new(0, &vec![2; MAX_QUEUES + 1], 1).is_err());
    assert!(CommonCfg::new(0, &[32768, 1], 1).is_ok());
    assert!(CommonCfg::new(0, &[], 1).is_ok());
}

#[test]
fn initial_state() {
    let c = cfg();
    assert_eq!(r16(&c, NUM_QUEUES), 3);
    assert_eq!(r8(&c, DEVICE_STATUS), 0);
    assert_eq!(r16(&c, CONFIG_MSIX_VECTOR), NO_VECTOR);
    assert_eq!(r16(&c, QUEUE_SELECT), 0);
    assert_eq!(r16(&c, QUEUE_SIZE), 256);
    assert_eq!(r16(&c, QUEUE_MSIX_VECTOR), NO_VECTOR);
    assert_eq!(r16(&c, QUEUE_ENABLE), 0);
    assert_eq!(r16(&c, QUEUE_NOTIFY_OFF), 0);
    assert_eq!(r32(&c, QUEUE_DESC), 0);
    assert_eq!(r16(&c, QUEUE_RESET), 0);
}

#[test]
fn device_feature_words() {
    let mut c = cfg();
    assert_eq!(r32(&c, DEVICE_FEATURE), DEV_FEATURES as u32);
    w32(&mut c, DEVICE_FEATURE_SELECT, 1);
    assert_eq!(r32(&c, DEVICE_FEATURE_SELECT), 1);
    assert_eq!(r32(&c, DEVICE_FEATURE), (DEV_FEATURES >> 32) as u32);
    w32(&mut c, DEVICE_FEATURE_SELECT, 2);
    assert_eq!(r32(&c, DEVICE_FEATURE), 0);
    w32(&mut c, DEVICE_FEATURE_SELECT, u32::MAX);
    assert_eq!(r32(&c, DEVICE_FEATURE), 0);
    // device_feature is read-only.
    w32(&mut c, DEVICE_FEATURE_SELECT, 0);
    w32(&mut c, DEVICE_FEATURE, 0xdead_beef);
    assert_eq!(r32(&c, DEVICE_FEATURE), DEV_FEATURES as u32);
}

#[test]
fn driver_feature_words_read_back() {
    let mut c = cfg();
    write_features(&mut c, 0x1234_5678_9abc_def0);
    assert_eq!(c.driver_features(), 0x1234_5678_9abc_def0);
    w32(&mut c, DRIVER_FEATURE_SELECT, 0);
    assert_eq!(r32(&c, DRIVER_FEATURE), 0x9abc_def0);
    w32(&mut c, DRIVER_FEATURE_SELECT, 1);
    assert_eq!(r32(&c, DRIVER_FEATURE), 0x1234_5678);
    w32(&mut c, DRIVER_FEATURE_SELECT, 7);
    assert_eq!(r32(&c, DRIVER_FEATURE), 0);
}

#[test]
fn features_ok_accepted_with_subset_including_version_1() {
    let mut c = cfg();
    let f = VIRTIO_F_VERSION_1 | 1;
    assert_eq!(
        negotiate(&mut c, f),
        CommonCfgAction::FeaturesOk {
            features: f,
            driver_ok: false
        }
    );
    assert_eq!(r8(&c, DEVICE_STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

#[test]
fn features_ok_refused_without_version_1() {
    let mut c = cfg();
    assert_eq!(negotiate(&mut c, 1), CommonCfgAction::None);
    assert_eq!(r8(&c, DEVICE_STATUS), ACKNOWLEDGE | DRIVER);
}

#[test]
fn features_ok_refused_with_unoffered_bits() {
    let mut c = cfg();
    assert_eq!(
        negotiate(&mut c, VIRTIO_F_VERSION_1 | (1 << 7)),
        CommonCfgAction::None
    );
    assert_eq!(r8(&c, DEVICE_STATUS) & FEATURES_OK, 0);
}

#[test]
fn features_ok_refused_with_bits_beyond_64() {
    let mut c = cfg();
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE);
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER);
    write_features(&mut c, VIRTIO_F_VERSION_1);
    w32(&mut c, DRIVER_FEATURE_SELECT, 2);
    w32(&mut c, DRIVER_FEATURE, 1);
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(r8(&c, DEVICE_STATUS) & FEATURES_OK, 0);
}

#[test]
fn features_frozen_after_features_ok() {
    let mut c = cfg();
    negotiate(&mut c, VIRTIO_F_VERSION_1);
    write_features(&mut c, DEV_FEATURES);
    assert_eq!(c.driver_features(), VIRTIO_F_VERSION_1);
}

#[test]
fn status_bits_only_in_order() {
    let mut c = cfg();
    // DRIVER without ACKNOWLEDGE
    w8(&mut c, DEVICE_STATUS, DRIVER);
    assert_eq!(c.status(), 0);
    // FEATURES_OK without DRIVER
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE);
    write_features(&mut c, VIRTIO_F_VERSION_1);
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | FEATURES_OK);
    assert_eq!(c.status(), ACKNOWLEDGE);
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER);
    // DRIVER_OK without FEATURES_OK
    assert_eq!(
        w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK),
        CommonCfgAction::None
    );
    assert_eq!(c.status(), ACKNOWLEDGE | DRIVER);
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(
        w8(
            &mut c,
            DEVICE_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        ),
        CommonCfgAction::DriverOk
    );
    assert_eq!(c.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    // Rewriting the same value does nothing.
    assert_eq!(
        w8(
            &mut c,
            DEVICE_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        ),
        CommonCfgAction::None
    );
}

#[test]
fn status_bits_cannot_be_cleared_except_by_reset() {
    let mut c = cfg();
    negotiate(&mut c, VIRTIO_F_VERSION_1);
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE);
    assert_eq!(c.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

#[test]
fn several_stages_in_one_write() {
    let mut c = cfg();
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER);
    assert_eq!(c.status(), ACKNOWLEDGE | DRIVER);
    write_features(&mut c, VIRTIO_F_VERSION_1);
    assert_eq!(
        w8(
            &mut c,
            DEVICE_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        ),
        CommonCfgAction::FeaturesOk {
            features: VIRTIO_F_VERSION_1,
            driver_ok: true
        }
    );
}

#[test]
fn failed_is_always_accepted_and_stops_progress() {
    let mut c = cfg();
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE);
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | FAILED | DRIVER_OK);
    assert_eq!(c.status(), ACKNOWLEDGE | FAILED);
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | FAILED | DRIVER);
    assert_eq!(c.status(), ACKNOWLEDGE | FAILED);
    assert_eq!(w8(&mut c, DEVICE_STATUS, 0), CommonCfgAction::Reset);
}

#[test]
fn needs_reset_is_device_only() {
    let mut c = cfg();
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | DEVICE_NEEDS_RESET);
    assert_eq!(c.status(), ACKNOWLEDGE);
    c.set_needs_reset();
    assert_eq!(r8(&c, DEVICE_STATUS), ACKNOWLEDGE | DEVICE_NEEDS_RESET);
    // No progress once the device needs a reset.
    w8(&mut c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER);
    assert_eq!(c.status(), ACKNOWLEDGE | DEVICE_NEEDS_RESET);
}

#[test]
fn reset_clears_everything_but_generation() {
    let mut c = cfg();
    negotiate(&mut c, VIRTIO_F_VERSION_1);
    w16(&mut c, CONFIG_MSIX_VECTOR, 0);
    w16(&mut c, QUEUE_SELECT, 1);
    w16(&mut c, QUEUE_SIZE, 32);
    w16(&mut c, QUEUE_MSIX_VECTOR, 2);
    w32(&mut c, QUEUE_DESC, 0x1000);
    w32(&mut c, QUEUE_DRIVER + 4, 1);
    w16(&mut c, QUEUE_ENABLE, 1);
    w32(&mut c, DEVICE_FEATURE_SELECT, 1);
    c.bump_config_generation();
    assert_eq!(w8(&mut c, DEVICE_STATUS, 0), CommonCfgAction::Reset);
    // Nothing cleared until the transport calls reset().
    assert_eq!(c.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    c.reset();
    assert_eq!(c.status(), 0);
    assert_eq!(c.driver_features(), 0);
    assert_eq!(r32(&c, DEVICE_FEATURE_SELECT), 0);
    assert_eq!(r16(&c, CONFIG_MSIX_VECTOR), NO_VECTOR);
    assert_eq!(r16(&c, QUEUE_SELECT), 0);
    for (i, max) in [256u16, 64, 16].into_iter().enumerate() {
        let q = c.queue(i as u16).unwrap();
        assert_eq!(*q, QueueConfig::reset(max));
        assert_eq!(q.msix_vector, NO_VECTOR);
    }
    assert_eq!(r8(&c, CONFIG_GENERATION), 1);
}

#[test]
fn queue_select_out_of_range() {
    let mut c = cfg();
    w16(&mut c, QUEUE_SELECT, 3);
    assert_eq!(r16(&c, QUEUE_SELECT), 3);
    for off in [
        QUEUE_SIZE,
        QUEUE_MSIX_VECTOR,
        QUEUE_ENABLE,
        QUEUE_NOTIFY_OFF,
    ] {
        w16(&mut c, off, 1);
        assert_eq!(r16(&c, off), 0, "offset {off:#x}");
    }
    w32(&mut c, QUEUE_DESC, 0x1000);
    assert_eq!(r32(&c, QUEUE_DESC), 0);
    w16(&mut c, QUEUE_SELECT, 0xffff);
    assert_eq!(r16(&c, QUEUE_SIZE), 0);
    for q in c.queues() {
        assert!(!q.enabled);
        assert_eq!(q.desc, 0);
        assert_eq!(q.msix_vector, NO_VECTOR);
    }
}

#[test]
fn queue_size_must_be_power_of_two_within_max() {
    let mut c = cfg();
    w16(&mut c, QUEUE_SELECT, 1); // max 64
    for bad in [0u16, 3, 48, 128, 0xffff] {
        w16(&mut c, QUEUE_SIZE, bad);
        assert_eq!(r16(&c, QUEUE_SIZE), 64, "size {bad}");
    }
    for good in [1u16, 2, 32, 64] {
        w16(&mut c, QUEUE_SIZE, good);
        assert_eq!(r16(&c, QUEUE_SIZE), good);
    }
}

#[test]
fn queue_fields_per_queue_and_notify_off() {
    let mut c = cfg();
    for q in 0..3u16 {
        w16(&mut c, QUEUE_SELECT, q);
        assert_eq!(r16(&c, QUEUE_NOTIFY_OFF), q);
        assert_eq!(r16(&c, QUEUE_NOTIFY_DATA), q);
        w32(&mut c, QUEUE_DESC, 0x1000 * (u32::from(q) + 1));
        w32(&mut c, QUEUE_DESC + 4, u32::from(q));
        w32(&mut c, QUEUE_DRIVER, 0x2000);
        w32(&mut c, QUEUE_DEVICE, 0x3000);
        w16(&mut c, QUEUE_MSIX_VECTOR, q);
    }
    for q in 0..3u16 {
        w16(&mut c, QUEUE_SELECT, q);
        assert_eq!(r32(&c, QUEUE_DESC), 0x1000 * (u32::from(q) + 1));
        assert_eq!(r32(&c, QUEUE_DESC + 4), u32::from(q));
        assert_eq!(r16(&c, QUEUE_MSIX_VECTOR), q);
        let cfg = c.queue(q).unwrap();
        assert_eq!(
            cfg.desc,
            (u64::from(q) << 32) | (0x1000 * (u64::from(q) + 1))
        );
        assert_eq!(cfg.driver, 0x2000);
        assert_eq!(cfg.device, 0x3000);
    }
}

#[test]
fn sixty_four_bit_fields_as_one_access() {
    let mut c = cfg();
    c.write(QUEUE_DEVICE, &0x1122_3344_5566_7788u64.to_le_bytes());
    let mut b = [0u8; 8];
    c.read(QUEUE_DEVICE, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
    assert_eq!(r32(&c, QUEUE_DEVICE + 4), 0x1122_3344);
    // An 8-byte access to the high half is not a field.
    c.write(QUEUE_DEVICE + 4, &[0xff; 8]);
    c.read(QUEUE_DEVICE + 4, &mut b);
    assert_eq!(b, [0; 8]);
    assert_eq!(c.queue(0).unwrap().device, 0x1122_3344_5566_7788);
}

#[test]
fn msix_vectors_out_of_range_read_no_vector() {
    let mut c = cfg();
    w16(&mut c, CONFIG_MSIX_VECTOR, 3);
    assert_eq!(r16(&c, CONFIG_MSIX_VECTOR), 3);
    w16(&mut c, CONFIG_MSIX_VECTOR, 4);
    assert_eq!(r16(&c, CONFIG_MSIX_VECTOR), NO_VECTOR);
    w16(&mut c, QUEUE_MSIX_VECTOR, 0);
    assert_eq!(r16(&c, QUEUE_MSIX_VECTOR), 0);
    w16(&mut c, QUEUE_MSIX_VECTOR, 100);
    assert_eq!(r16(&c, QUEUE_MSIX_VECTOR), NO_VECTOR);
}

#[test]
fn queue_enable_ignores_zero() {
    let mut c = cfg();
    w16(&mut c, QUEUE_ENABLE, 2);
    assert_eq!(r16(&c, QUEUE_ENABLE), 0);
    w16(&mut c, QUEUE_ENABLE, 1);
    assert_eq!(r16(&c, QUEUE_ENABLE), 1);
    w16(&mut c, QUEUE_ENABLE, 0);
    assert_eq!(r16(&c, QUEUE_ENABLE), 1);
}

#[test]
fn queue_config_frozen_after_driver_ok() {
    let mut c = cfg();
    negotiate(&mut c, VIRTIO_F_VERSION_1);
    w16(&mut c, QUEUE_SIZE, 128);
    w16(&mut c, QUEUE_ENABLE, 1);
    w8(
        &mut c,
        DEVICE_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    let before = c.queues().to_vec();
    w16(&mut c, QUEUE_SIZE, 64);
    w16(&mut c, QUEUE_MSIX_VECTOR, 1);
    w32(&mut c, QUEUE_DESC, 0x5000);
    c.write(QUEUE_DRIVER, &[1; 8]);
    w16(&mut c, QUEUE_SELECT, 1);
    w16(&mut c, QUEUE_ENABLE, 1);
    assert_eq!(c.queues(), &before[..]);
    // queue_select and config_msix_vector stay writable.
    assert_eq!(r16(&c, QUEUE_SELECT), 1);
    w16(&mut c, CONFIG_MSIX_VECTOR, 0);
    assert_eq!(c.config_msix_vector(), 0);
}

#[test]
fn read_only_fields_ignore_writes() {
    let mut c = cfg();
    w16(&mut c, NUM_QUEUES, 9);
    w8(&mut c, CONFIG_GENERATION, 9);
    w16(&mut c, QUEUE_NOTIFY_OFF, 9);
    w16(&mut c, QUEUE_NOTIFY_DATA, 9);
    w16(&mut c, QUEUE_RESET, 1);
    assert_eq!(r16(&c, NUM_QUEUES), 3);
    assert_eq!(r8(&c, CONFIG_GENERATION), 0);
    assert_eq!(r16(&c, QUEUE_NOTIFY_OFF), 0);
    assert_eq!(r16(&c, QUEUE_RESET), 0);
}

#[test]
fn wrong_widths_and_offsets_are_ignored() {
    let mut c = cfg();
    // 1-byte write to a 16-bit field, 2-byte write to the status byte, 4-byte write
    // straddling queue_select/queue_size.
    w8(&mut c, QUEUE_SIZE, 1);
    c.write(DEVICE_STATUS, &[1, 0]);
    w32(&mut c, QUEUE_SELECT, 0x0001_0001);
    c.write(QUEUE_SIZE, &[1, 0, 0]);
    c.write(QUEUE_DESC + 2, &[1, 0, 0, 0]);
    c.write(COMMON_CFG_SIZE, &[1, 0, 0, 0]);
    c.write(u64::MAX, &[1]);
    c.write(0, &[]);
    c.write(0, &[0; 16]);
    assert_eq!(r16(&c, QUEUE_SIZE), 256);
    assert_eq!(c.status(), 0);
    assert_eq!(r16(&c, QUEUE_SELECT), 0);
    assert_eq!(c.queue(0).unwrap().desc, 0);
    let mut b = [0xaau8; 3];
    c.read(NUM_QUEUES, &mut b);
    assert_eq!(b, [0; 3]);
    let mut b = [0xaau8; 1];
    c.read(NUM_QUEUES, &mut b);
    assert_eq!(b, [0]);
    let mut b = [0xaau8; 16];
    c.read(0, &mut b);
    assert_eq!(b, [0; 16]);
    c.read(u64::MAX, &mut b[..4]);
}

#[test]
fn config_generation_moves_forward() {
    let mut c = cfg();
    c.bump_config_generation();
    assert_eq!(r8(&c, CONFIG_GENERATION), 1);
    c.set_config_generation(255);
    c.bump_config_generation();
    assert_eq!(r8(&c, CONFIG_GENERATION), 0);
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
fn random_accesses_never_panic_and_keep_invariants() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut c = cfg();
    for _ in 0..200_000 {
        let r = rng.next();
        let offset = if r & 1 == 0 { (r >> 8) % 0x48 } else { r >> 8 };
        let len = [0usize, 1, 2, 3, 4, 8, 9][((r >> 1) % 7) as usize];
        let value = rng.next().to_le_bytes();
        let mut buf = [0u8; 9];
        buf[..len.min(8)].copy_from_slice(&value[..len.min(8)]);
        if r & 0x10 != 0 {
            c.read(offset, &mut buf[..len]);
        } else {
            match c.write(offset, &buf[..len]) {
                CommonCfgAction::Reset => c.reset(),
                CommonCfgAction::FeaturesOk { features, .. } => {
                    assert_eq!(features & !DEV_FEATURES, 0);
                    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
                }
                _ => {}
            }
        }
        for (q, max) in c.queues().iter().zip([256u16, 64, 16]) {
            assert!(q.size.is_power_of_two() && q.size <= max);
            assert!(q.msix_vector == NO_VECTOR || q.msix_vector < 4);
        }
        let s = c.status();
        if s & DRIVER_OK != 0 {
            assert_ne!(s & FEATURES_OK, 0);
        }
    }
}
