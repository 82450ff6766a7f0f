//! The PCIe root complex as a guest reaches it, with the tiny hand-assembled guest:
//! vendor/device ids through ECAM (MMIO) and through 0xCF8/0xCFC, for the host bridge,
//! a virtio-console at a chosen slot, and an empty slot.

mod common;

use common::{ferrio, Code};

const ECAM: u32 = 0xe000_0000;

fn dword(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("4 bytes"))
}

#[test]
fn config_space_through_ecam_and_port_cf8() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k.elf");
    Code::default()
        .print_mmio32(ECAM) // 00:00.0 host bridge
        .print_mmio32(ECAM | 3 << 15) // 00:03.0 console
        .print_mmio32(ECAM | 4 << 15) // 00:04.0 nothing
        .print_cf8(0x8000_0000 | 3 << 11) // 00:03.0 via CF8
        .print_cf8(0x8000_0000 | 3 << 11 | 0x08) // class/revision
        .power_off()
        .write_elf(&k);
    let out = dir.path().join("console.out");
    let o = ferrio(
        &k,
        &["--console", &format!("file={},slot=3", out.display())],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let b = &o.stdout;
    assert_eq!(b.len(), 20, "five dwords: {b:x?}");
    let host_bridge = dword(&b[0..4]);
    assert_ne!(host_bridge & 0xffff, 0xffff, "host bridge present");
    assert_eq!(
        dword(&b[4..8]),
        0x1043_1af4,
        "virtio-console 1af4:1043 at 00:03.0"
    );
    assert_eq!(dword(&b[8..12]), 0xffff_ffff, "empty slot reads all ones");
    assert_eq!(
        dword(&b[12..16]),
        0x1043_1af4,
        "same function through 0xCF8/0xCFC"
    );
    assert_eq!(
        dword(&b[16..20]) >> 8,
        0x07_8000,
        "class code: simple communication controller"
    );
}
