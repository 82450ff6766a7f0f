//! Scenario `vfio-in-guest`: the guest's VFIO (vfio-pci, type1v2) on top of the VMM's
//! virtio-iommu. The host attaches a 1 MiB virtio-blk disk (serial `ferrio-vfio`, 2
//! queues) behind the IOMMU, filled with a pattern. The guest hands it to vfio-pci,
//! maps a 64 KiB buffer at an IOVA of its choice, inspects the device through VFIO
//! (config space, virtio structures, MSI-X), and drives it from user space: a 4 KiB
//! write at byte 4096, a read of block 0 and a read-back, each completing with an
//! MSI-X interrupt on a VFIO eventfd. Afterwards the kernel's driver gets the disk
//! back and must read what the user-space driver wrote; the host checks the image.
//!
//! `FERRIO_IOMMU_TEST_VMM=qemu` boots the same machine under QEMU.

#[path = "../agent/src/pattern.rs"]
#[allow(dead_code)]
mod pattern;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use ferrio_guest_tests::{Boot, IommuDevice, IommuMachine, ScratchImage, Vmm};

const DISK_LEN: u64 = 1 << 20;
const QUEUES: u8 = 2;
const SEED: u64 = 0xfe11_0000_0000_f10b;
const BLOCK: usize = 4096;
/// Where the guest's user-space driver writes (sector 8).
const WRITE_OFFSET: u64 = 4096;

fn block_fnv(path: &std::path::Path, offset: u64) -> String {
    let file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; BLOCK];
    file.read_exact_at(&mut buf, offset).unwrap();
    pattern::fnv1a(&buf)
}

#[test]
fn vfio_in_guest_type1_dma_msix_and_user_space_virtio_blk() {
    let vmm = Vmm::from_env();
    let disk = ScratchImage::create("vfio-disk", DISK_LEN).unwrap();
    let data = pattern::bytes(SEED, DISK_LEN as usize);
    std::fs::write(disk.path(), &data).unwrap();
    let block0 = pattern::fnv1a(&data[..BLOCK]);
    let before_write = pattern::fnv1a(&data[WRITE_OFFSET as usize..WRITE_OFFSET as usize + BLOCK]);

    let boot = Boot::new("vfio-in-guest")
        .memory("512M")
        .timeout(Duration::from_secs(600));
    let machine = IommuMachine::new(boot).device(IommuDevice::Disk {
        path: disk.path().to_path_buf(),
        serial: "ferrio-vfio".into(),
        num_queues: QUEUES,
    });
    let outcome = machine.run(vmm).expect("could not boot the guest");
    eprintln!("{} under {}", outcome.table(), vmm.name());
    outcome.assert_all_ok();
    outcome.assert_exit_code(0);

    // VFIO's view of the device matches the kernel driver's and the host's.
    assert_eq!(outcome.value_str("vfio_config_ids"), Some("0x1af4:0x1042"));
    assert_eq!(
        outcome.value_u64("vfio_num_queues"),
        Some(u64::from(QUEUES))
    );
    assert_eq!(outcome.value_u64("vfio_blk_capacity"), Some(DISK_LEN / 512));
    assert_eq!(
        outcome.value("vfio_access_platform"),
        Some(&serde_json::Value::Bool(true))
    );
    // Idle: reset, or ACKNOWLEDGE left by the virtio driver's remove path.
    let status = outcome.value_u64("vfio_device_status");
    assert!(matches!(status, Some(0 | 1)), "device status {status:?}");
    let irqs = outcome.value_str("vfio_msix_irq_info").unwrap_or_default();
    let count: u64 = irqs
        .strip_prefix("count ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(count > u64::from(QUEUES), "MSI-X vectors: {irqs}");
    assert_eq!(outcome.value_u64("vfio_msix_loopback"), Some(1));

    // The IOVA is not guest RAM, and the mapping was undone exactly.
    let map = outcome.value_str("vfio_map_dma").unwrap_or_default();
    assert!(map.contains("at iova 0x800000000"), "{map}");
    assert_eq!(outcome.value_u64("vfio_unmap_dma"), Some(64 << 10));

    // Data: block 0 as the host wrote it, through the kernel driver and through VFIO.
    assert_eq!(
        outcome.value_str("vfio_kernel_read_fnv"),
        Some(block0.as_str())
    );
    assert_eq!(
        outcome.value_str("vfio_dma_read_fnv"),
        Some(block0.as_str())
    );
    // The user-space write reached the image, and the kernel driver read it back.
    let written = outcome
        .value_str("vfio_dma_write_fnv")
        .expect("no write through VFIO");
    assert_ne!(
        written, before_write,
        "the guest wrote the bytes already there"
    );
    assert_ne!(
        written, block0,
        "the guest wrote block 0's bytes: reads prove nothing"
    );
    assert_eq!(block_fnv(disk.path(), WRITE_OFFSET), written, "image file");
    assert_eq!(outcome.value_str("vfio_rebind_read_fnv"), Some(written));
    assert_eq!(outcome.value_str("vfio_rebind"), Some("virtio-pci"));
    // Nothing else in the image changed.
    let after = std::fs::read(disk.path()).unwrap();
    assert!(after[..WRITE_OFFSET as usize] == data[..WRITE_OFFSET as usize]);
    assert!(after[WRITE_OFFSET as usize + BLOCK..] == data[WRITE_OFFSET as usize + BLOCK..]);
}
