//! Root complex routing: ECAM and 0xCF8/0xCFC, absent functions, odd widths, BAR
//! sizing and decoding changes, and the capability walks a guest does.

mod common;

use std::sync::{Arc, Mutex};

use common::{RecordingVectors, TestDevice, BAR0_SIZE, BAR2_SIZE, DEVICE, VENDOR};
use ferrio_pci::{BarMapping, ConfigChange, PciAddress, PciRoot, SharedPciDevice};

fn root() -> (PciRoot, Arc<Mutex<TestDevice>>) {
    let mut root = PciRoot::new();
    let dev = TestDevice::shared(RecordingVectors::new(8), 8);
    let shared: SharedPciDevice = dev.clone();
    assert_eq!(root.add_device(None, shared), Ok(PciAddress::new(1, 0)));
    (root, dev)
}

fn ecam(dev: u64, func: u64, reg: u64) -> u64 {
    dev << 15 | func << 12 | reg
}

fn er(root: &PciRoot, offset: u64, len: usize) -> u64 {
    let mut b = vec![0u8; len];
    root.ecam_read(offset, &mut b);
    b.iter().rev().fold(0, |acc, &x| acc << 8 | u64::from(x))
}

fn ew32(root: &mut PciRoot, offset: u64, v: u32) -> Vec<(PciAddress, BarMapping)> {
    bars(root.ecam_write(offset, &v.to_le_bytes()))
}

fn bars(changes: Vec<ConfigChange>) -> Vec<(PciAddress, BarMapping)> {
    changes.iter().filter_map(ConfigChange::as_bar).collect()
}

#[test]
fn ecam_routing_and_absent_functions() {
    let (mut root, _) = root();
    assert_eq!(er(&root, 0, 4), 0x0008_1b36);
    assert_eq!(er(&root, ecam(0, 0, 0x0a), 2), 0x0600);
    assert_eq!(
        er(&root, ecam(1, 0, 0), 4),
        u64::from(DEVICE) << 16 | u64::from(VENDOR)
    );
    assert_eq!(er(&root, ecam(1, 0, 2), 2), u64::from(DEVICE));
    assert_eq!(er(&root, ecam(1, 0, 3), 1), u64::from(DEVICE >> 8));
    // Absent device, absent function, other buses, past the ECAM window.
    assert_eq!(er(&root, ecam(2, 0, 0), 4), 0xffff_ffff);
    assert_eq!(er(&root, ecam(1, 1, 0), 2), 0xffff);
    assert_eq!(er(&root, 1 << 20, 4), 0xffff_ffff);
    assert_eq!(er(&root, 256 << 20, 4), 0xffff_ffff);
    assert_eq!(er(&root, u64::MAX, 1), 0xff);
    assert!(ew32(&mut root, ecam(2, 0, 4), 0xffff).is_empty());
    assert!(ew32(&mut root, u64::MAX - 1, 0xffff).is_empty());
}

#[test]
fn ecam_odd_widths_are_all_ones_and_ignored() {
    let (mut root, dev) = root();
    for (reg, len) in [
        (0u64, 3usize),
        (0, 8),
        (1, 2),
        (2, 4),
        (1, 4),
        (0xffe, 4),
        (0, 0),
    ] {
        let mut b = vec![0u8; len];
        root.ecam_read(ecam(1, 0, reg), &mut b);
        assert!(b.iter().all(|&x| x == 0xff), "{reg:#x}+{len}");
    }
    // A misaligned command write must not enable memory decoding.
    assert!(root.ecam_write(ecam(1, 0, 3), &[0xff, 0xff]).is_empty());
    assert!(root.ecam_write(ecam(1, 0, 4), &[0xff; 3]).is_empty());
    assert_eq!(dev.lock().unwrap().cfg.command(), 0);
}

#[test]
fn bar_sizing_and_moves_through_ecam() {
    let (mut root, _) = root();
    let addr = PciAddress::new(1, 0);
    // Linux: decoding off, write all-ones, read back, restore.
    for (reg, expect) in [
        (0x10u64, !(BAR0_SIZE as u32 - 1)),
        (0x18, !(BAR2_SIZE as u32 - 1) | 0xc),
        (0x1c, 0xffff_ffff),
        (0x14, 0),
        (0x20, 0),
    ] {
        assert!(ew32(&mut root, ecam(1, 0, reg), 0xffff_ffff).is_empty());
        assert_eq!(er(&root, ecam(1, 0, reg), 4), u64::from(expect), "{reg:#x}");
    }
    assert!(ew32(&mut root, ecam(1, 0, 0x10), 0xc000_0000).is_empty());
    assert!(ew32(&mut root, ecam(1, 0, 0x18), 0x0010_0000).is_empty());
    assert!(ew32(&mut root, ecam(1, 0, 0x1c), 0x1).is_empty());
    let m = bars(root.ecam_write(ecam(1, 0, 4), &0x0006u16.to_le_bytes()));
    assert_eq!(
        m,
        vec![
            (
                addr,
                BarMapping {
                    index: 0,
                    old: None,
                    new: Some(0xc000_0000),
                    size: BAR0_SIZE
                }
            ),
            (
                addr,
                BarMapping {
                    index: 2,
                    old: None,
                    new: Some(0x1_0010_0000),
                    size: BAR2_SIZE
                }
            ),
        ]
    );
    // Moving the 64-bit BAR with decoding on: two halves, two reports.
    let m = ew32(&mut root, ecam(1, 0, 0x18), 0x0020_0000);
    assert_eq!(
        (m[0].1.old, m[0].1.new),
        (Some(0x1_0010_0000), Some(0x1_0020_0000))
    );
    let m = ew32(&mut root, ecam(1, 0, 0x1c), 0x2);
    assert_eq!(
        (m[0].1.old, m[0].1.new),
        (Some(0x1_0020_0000), Some(0x2_0020_0000))
    );
    let dev = root.device(addr).unwrap();
    assert_eq!(dev.lock().unwrap().bar_mapping(2), Some(0x2_0020_0000));
    // Disabling memory via a byte write unmaps both.
    let m = bars(root.ecam_write(ecam(1, 0, 4), &[0x04]));
    assert_eq!(m.len(), 2);
    assert!(m.iter().all(|(_, b)| b.new.is_none()));
}

#[test]
fn capability_walk_like_linux() {
    let (root, _) = root();
    let f = |reg| ecam(1, 0, reg);
    assert_ne!(er(&root, f(0x06), 2) & 0x10, 0, "capabilities list bit");
    let mut ptr = er(&root, f(0x34), 1) & !3;
    let mut found = Vec::new();
    let mut ttl = 48;
    while ptr >= 0x40 && ttl > 0 {
        let id = er(&root, f(ptr), 1);
        found.push((id, ptr));
        ptr = er(&root, f(ptr + 1), 1) & !3;
        ttl -= 1;
    }
    let ids: Vec<u64> = found.iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, vec![0x10, 0x11]);
    let pcie = found[0].1;
    assert_eq!(er(&root, f(pcie + 2), 2) & 0xf0, 0, "endpoint");
    assert_eq!(er(&root, f(pcie + 2), 2) & 0xf, 2, "version 2");
    let lnksta = er(&root, f(pcie + 0x12), 2);
    assert_eq!((lnksta & 0xf, lnksta >> 4 & 0x3f), (1, 1), "2.5 GT/s x1");
    // Extended list from 0x100.
    let header = er(&root, f(0x100), 4);
    assert_eq!(header & 0xffff, 0x000b);
    assert_eq!(header >> 16 & 0xf, 1);
    assert_eq!(header >> 20, 0);
    // The host bridge has neither list.
    assert_eq!(er(&root, 0x06, 2) & 0x10, 0);
    assert_eq!(er(&root, 0x100, 4), 0);
}

#[test]
fn port_io_mechanism_one() {
    let (mut root, dev) = root();
    let cfg_addr = |d: u32, reg: u32| 0x8000_0000u32 | d << 11 | reg;
    let pr = |root: &PciRoot, off: u64, len: usize| {
        let mut b = vec![0u8; len];
        root.pio_read(off, &mut b);
        b.iter().rev().fold(0u64, |acc, &x| acc << 8 | u64::from(x))
    };
    // Linux's pci_check_type1 probe.
    root.pio_write(3, &[0x01]);
    root.pio_write(0, &0x8000_0000u32.to_le_bytes());
    assert_eq!(pr(&root, 0, 4), 0x8000_0000);
    assert_eq!(pr(&root, 4, 4), 0x0008_1b36);
    root.pio_write(0, &cfg_addr(1, 0).to_le_bytes());
    assert_eq!(pr(&root, 4, 4), u64::from(DEVICE) << 16 | u64::from(VENDOR));
    assert_eq!(pr(&root, 6, 2), u64::from(DEVICE));
    assert_eq!(pr(&root, 5, 1), u64::from(VENDOR >> 8));
    assert_eq!(pr(&root, 7, 1), u64::from(DEVICE >> 8));
    // Misaligned / oversized data accesses, non-dword address accesses.
    assert_eq!(pr(&root, 5, 2), 0xffff);
    assert_eq!(pr(&root, 6, 4), 0xffff_ffff);
    assert_eq!(pr(&root, 4, 3), 0xff_ffff);
    assert_eq!(pr(&root, 0, 2), 0xffff);
    assert_eq!(pr(&root, 8, 4), 0xffff_ffff);
    root.pio_write(0, &[0, 0]);
    assert_eq!(root.config_address().value(), cfg_addr(1, 0));
    root.pio_write(0, &cfg_addr(1, 0x10).to_le_bytes());
    assert!(root.pio_write(4, &0xd000_0000u32.to_le_bytes()).is_empty());
    // Register bits 1:0 of the address are ignored; the byte offset comes from the
    // data port. BAR 2 is unassigned (0), so only BAR 0 gets decoded.
    root.pio_write(0, &(cfg_addr(1, 0x04) | 3).to_le_bytes());
    let m = bars(root.pio_write(4, &[0x06]));
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].1.index, m[0].1.new), (0, Some(0xd000_0000)));
    root.pio_write(0, &cfg_addr(1, 0x10).to_le_bytes());
    let m = bars(root.pio_write(6, &0xd100u16.to_le_bytes()));
    assert_eq!(
        (m[0].1.old, m[0].1.new),
        (Some(0xd000_0000), Some(0xd100_0000))
    );
    root.pio_write(4, &0xd000_0000u32.to_le_bytes());
    assert_eq!(dev.lock().unwrap().cfg.bar_address(0), Some(0xd000_0000));
    // Disabled address register: all-ones, writes ignored.
    root.pio_write(0, &(cfg_addr(1, 0x10) & 0x7fff_ffff).to_le_bytes());
    assert_eq!(pr(&root, 4, 4), 0xffff_ffff);
    root.pio_write(4, &0u32.to_le_bytes());
    assert_eq!(dev.lock().unwrap().cfg.bar_address(0), Some(0xd000_0000));
    // Absent device and other bus.
    root.pio_write(0, &cfg_addr(9, 0).to_le_bytes());
    assert_eq!(pr(&root, 4, 4), 0xffff_ffff);
    root.pio_write(0, &(0x8001_0000u32).to_le_bytes());
    assert_eq!(pr(&root, 4, 4), 0xffff_ffff);
    // AMD extended register bits reach the extended space.
    root.pio_write(0, &(cfg_addr(1, 0) | 1 << 24).to_le_bytes());
    assert_eq!(pr(&root, 4, 2), 0x000b);
}

#[test]
fn enumeration() {
    let (mut root, _) = root();
    let extra: SharedPciDevice = TestDevice::shared(RecordingVectors::new(1), 1);
    assert_eq!(root.add_device(Some(4), extra), Ok(PciAddress::new(4, 0)));
    let addrs: Vec<String> = root.devices().iter().map(|(a, _)| a.to_string()).collect();
    assert_eq!(addrs, vec!["0000:00:00.0", "0000:00:01.0", "0000:00:04.0"]);
    for (_, d) in root.devices() {
        let d = d.lock().unwrap();
        for bar in d.bars() {
            assert!(bar.size.is_power_of_two() && bar.size >= 0x1000);
        }
    }
}

#[test]
fn non_zero_segment() {
    let mut root = PciRoot::with_segment(2);
    assert_eq!(root.segment(), 2);
    let dev = TestDevice::shared(RecordingVectors::new(8), 8);
    let shared: SharedPciDevice = dev.clone();
    let addr = PciAddress::in_segment(2, 1, 0);
    assert_eq!(root.add_device(None, shared), Ok(addr));
    assert_eq!(addr.to_string(), "0002:00:01.0");
    let addrs: Vec<String> = root.devices().iter().map(|(a, _)| a.to_string()).collect();
    assert_eq!(addrs, vec!["0002:00:00.0", "0002:00:01.0"]);
    assert!(root.device(addr).is_some());
    assert!(root.device(PciAddress::new(1, 0)).is_none(), "segment 0");

    // ECAM decodes bus/device/function as on segment 0 (offsets are relative to this
    // segment's window); BAR reports carry the segment.
    assert_eq!(er(&root, 0, 4), 0x0008_1b36);
    assert_eq!(
        er(&root, ecam(1, 0, 0), 4),
        u64::from(DEVICE) << 16 | u64::from(VENDOR)
    );
    assert_eq!(er(&root, ecam(2, 0, 0), 4), 0xffff_ffff);
    assert_eq!(er(&root, 1 << 20, 4), 0xffff_ffff);
    assert!(ew32(&mut root, ecam(1, 0, 0x10), 0xc000_0000).is_empty());
    let m = bars(root.ecam_write(ecam(1, 0, 4), &0x0002u16.to_le_bytes()));
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].0, m[0].1.new), (addr, Some(0xc000_0000)));

    // Mechanism #1 has no segment field and reaches segment 0 only: the address
    // register decodes as usual (to segment 0), data accesses miss this root.
    let cfg = 0x8000_0000u32 | 1 << 11 | 0x04;
    root.pio_write(0, &cfg.to_le_bytes());
    assert_eq!(
        root.config_address().target(),
        Some((PciAddress::new(1, 0), 0x04))
    );
    let mut b = [0u8; 4];
    root.pio_read(4, &mut b);
    assert_eq!(b, [0xff; 4]);
    assert!(root.pio_write(4, &0u32.to_le_bytes()).is_empty());
    assert_eq!(dev.lock().unwrap().cfg.command(), 0x0002, "write ignored");
}
