//! The device model: construction checks, features, configuration space layout and
//! activation.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::*;

use super::TempImage;
use crate::virtio::block::{BlockConfig, BlockError, VirtioBlock, CONFIG_SIZE};
use crate::virtio::features::{VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};
use crate::virtio::testing::{activation, memory, Driver, Mem, TestInterrupt};
use crate::virtio::{device_type, ActivateError, VirtioDevice};

pub(super) fn dev(d: &mut VirtioBlock) -> &mut dyn VirtioDevice<Mem> {
    d
}

pub(super) fn block(image: &TempImage, config: BlockConfig) -> VirtioBlock {
    let backend = image.open(config.read_only);
    VirtioBlock::new(Box::new(backend), config).unwrap()
}

fn config(d: &mut VirtioBlock, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0xAA; len];
    dev(d).read_config(offset, &mut out);
    out
}

fn le(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0, |acc, &b| (acc << 8) | u64::from(b))
}

#[test]
fn features_follow_the_configuration() {
    let image = TempImage::new(4096);
    let base = [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ]
    .iter()
    .fold(VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC, |acc, b| {
        acc | 1 << b
    });
    let mut d = block(&image, BlockConfig::default());
    assert_eq!(dev(&mut d).device_type(), device_type::BLOCK);
    assert_eq!(dev(&mut d).device_features(), base);
    assert_eq!(dev(&mut d).queue_max_sizes(), [256]);
    let ro = BlockConfig {
        read_only: true,
        num_queues: 3,
        queue_size: 64,
        ..Default::default()
    };
    let mut d = block(&image, ro);
    let want = base | 1 << VIRTIO_BLK_F_RO | 1 << VIRTIO_BLK_F_MQ;
    assert_eq!(dev(&mut d).device_features(), want);
    assert_eq!(dev(&mut d).queue_max_sizes(), [64, 64, 64]);
}

#[test]
fn configuration_space_layout() {
    // 1 MiB + 100 bytes: the partial sector is not exposed.
    let image = TempImage::new((1 << 20) + 100);
    let cfg = BlockConfig {
        num_queues: 2,
        queue_size: 128,
        size_max: 1 << 16,
        max_discard_sectors: 1000,
        max_discard_seg: 7,
        discard_sector_alignment: 16,
        max_write_zeroes_sectors: 2000,
        max_write_zeroes_seg: 9,
        ..Default::default()
    };
    let mut d = block(&image, cfg);
    assert_eq!(d.capacity(), 2048);
    let c = config(&mut d, 0, 64);
    assert_eq!(CONFIG_SIZE, 60);
    let field = |offset: usize, len: usize| le(&c[offset..offset + len]);
    assert_eq!(field(0, 8), 2048, "capacity");
    assert_eq!(field(8, 4), 1 << 16, "size_max");
    assert_eq!(field(12, 4), 126, "seg_max");
    assert_eq!(field(16, 4), 0, "geometry");
    assert_eq!(field(20, 4), 512, "blk_size");
    assert_eq!(field(24, 1), 0, "physical_block_exp");
    assert_eq!(field(25, 1), 0, "alignment_offset");
    assert_eq!(field(26, 2), 1, "min_io_size");
    assert_eq!(field(28, 4), 0, "opt_io_size");
    assert_eq!(field(32, 1), 0, "wce");
    assert_eq!(field(33, 1), 0, "unused");
    assert_eq!(field(34, 2), 2, "num_queues");
    assert_eq!(field(36, 4), 1000, "max_discard_sectors");
    assert_eq!(field(40, 4), 7, "max_discard_seg");
    assert_eq!(field(44, 4), 16, "discard_sector_alignment");
    assert_eq!(field(48, 4), 2000, "max_write_zeroes_sectors");
    assert_eq!(field(52, 4), 9, "max_write_zeroes_seg");
    assert_eq!(field(56, 1), 1, "write_zeroes_may_unmap");
    assert_eq!(field(57, 7), 0, "padding and beyond the end");
    // Partial and out-of-range reads; writes are ignored.
    assert_eq!(config(&mut d, 34, 2), [2, 0]);
    assert_eq!(config(&mut d, 59, 4), [0; 4]);
    assert_eq!(config(&mut d, u64::MAX, 2), [0; 2]);
    dev(&mut d).write_config(0, &[1, 2, 3, 4]);
    assert_eq!(config(&mut d, 0, 8), 2048u64.to_le_bytes());
}

#[test]
fn invalid_configurations_are_refused() {
    let image = TempImage::new(4096);
    let try_new = |cfg: BlockConfig| VirtioBlock::new(Box::new(image.open(false)), cfg);
    let serial = |s: &str| BlockConfig {
        serial: Some(s.into()),
        ..Default::default()
    };
    assert!(try_new(serial("12345678901234567890")).is_ok());
    assert!(matches!(
        try_new(serial("123456789012345678901")),
        Err(BlockError::SerialTooLong(21))
    ));
    for n in [0, 65] {
        let cfg = BlockConfig {
            num_queues: n,
            ..Default::default()
        };
        assert!(matches!(try_new(cfg), Err(BlockError::QueueCount(q)) if q == n));
    }
    for size in [0, 2, 3, 100, 65535] {
        let cfg = BlockConfig {
            queue_size: size,
            ..Default::default()
        };
        assert!(matches!(try_new(cfg), Err(BlockError::QueueSize(s)) if s == size));
    }
    let limits = [
        BlockConfig {
            size_max: 512,
            ..Default::default()
        },
        BlockConfig {
            max_discard_seg: 0,
            ..Default::default()
        },
        BlockConfig {
            max_write_zeroes_sectors: 0,
            ..Default::default()
        },
    ];
    for cfg in limits {
        assert!(matches!(try_new(cfg), Err(BlockError::Limit(_))));
    }
}

#[test]
fn activation_checks_the_queues() {
    let mem = memory();
    let image = TempImage::new(4096);
    let cfg = BlockConfig {
        num_queues: 2,
        ..Default::default()
    };
    let mut d = block(&image, cfg);
    let irq = Arc::new(TestInterrupt::default());
    let (q0, q1) = (Driver::new(&mem, 0, 16), Driver::new(&mem, 0x8000, 16));
    let err = dev(&mut d).activate(activation(&mem, &[], &irq).0);
    assert!(matches!(err, Err(ActivateError::MissingQueue(0))));
    let err = dev(&mut d).activate(activation(&mem, &[(0, &q0), (2, &q1)], &irq).0);
    assert!(matches!(err, Err(ActivateError::Invalid(_))));
    let err = dev(&mut d).activate(activation(&mem, &[(1, &q0), (1, &q1)], &irq).0);
    assert!(matches!(err, Err(ActivateError::Invalid(_))));
    assert!(!d.is_active());
    // The driver may enable a subset of the queues (fewer vCPUs than queues).
    dev(&mut d)
        .activate(activation(&mem, &[(1, &q1)], &irq).0)
        .unwrap();
    assert!(d.is_active());
    let err = dev(&mut d).activate(activation(&mem, &[(0, &q0)], &irq).0);
    assert!(matches!(err, Err(ActivateError::Invalid(_))));
    dev(&mut d).reset();
    assert!(!d.is_active());
    dev(&mut d)
        .activate(activation(&mem, &[(0, &q0), (1, &q1)], &irq).0)
        .unwrap();
    assert!(d.is_active());
}
