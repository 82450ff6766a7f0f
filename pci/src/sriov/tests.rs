use super::*;
use crate::config::PciIds;

const K64: BarKind = BarKind::Mmio64 {
    prefetchable: false,
};

fn bar(index: u8, kind: BarKind, size: u64) -> BarInfo {
    BarInfo { index, kind, size }
}

fn config(total_vfs: u16) -> SriovConfig {
    SriovConfig {
        total_vfs,
        vf_device_id: 0x1041,
        function_link: 0,
        vf_bars: vec![bar(0, K64, 0x1_0000), bar(2, BarKind::Mmio32, 0x2000)],
    }
}

fn pf(total_vfs: u16) -> (ConfigSpace, SriovCap) {
    let mut cfg = ConfigSpace::new(&PciIds::default());
    let cap = SriovCap::add(&mut cfg, &config(total_vfs)).unwrap();
    (cfg, cap)
}

/// A guest write followed by the PF's fix-up, as a PF's `write_config` does.
fn write(cfg: &mut ConfigSpace, cap: &SriovCap, r: u16, data: &[u8]) {
    let before = cap.state(cfg);
    cfg.write(cap.offset() + r, data);
    cap.after_write(cfg, &before, cap.offset() + r, data.len());
}

fn w16(cfg: &mut ConfigSpace, cap: &SriovCap, r: u16, v: u16) {
    write(cfg, cap, r, &v.to_le_bytes());
}

fn w32(cfg: &mut ConfigSpace, cap: &SriovCap, r: u16, v: u32) {
    write(cfg, cap, r, &v.to_le_bytes());
}

#[test]
fn every_field_at_reset() {
    let (cfg, cap) = pf(3);
    let o = cap.offset();
    assert_eq!(o, 0x100);
    assert_eq!(cfg.find_extended_capability(EXT_CAP_ID_SRIOV), Some(0x100));
    assert_eq!(cfg.read_u32(o), 0x0001_0010, "id 0x10, version 1, last");
    assert_eq!(cfg.read_u32(o + reg::CAPABILITIES), 0);
    assert_eq!(cfg.read_u16(o + reg::CONTROL), 0);
    assert_eq!(cfg.read_u16(o + reg::STATUS), 0);
    assert_eq!(cfg.read_u16(o + reg::INITIAL_VFS), 3);
    assert_eq!(cfg.read_u16(o + reg::TOTAL_VFS), 3);
    assert_eq!(cfg.read_u16(o + reg::NUM_VFS), 0);
    assert_eq!(cfg.read_u8(o + reg::FUNCTION_LINK), 0);
    assert_eq!(cfg.read_u16(o + reg::FIRST_VF_OFFSET), 1);
    assert_eq!(cfg.read_u16(o + reg::VF_STRIDE), 1);
    assert_eq!(cfg.read_u16(o + reg::VF_DEVICE_ID), 0x1041);
    assert_eq!(cfg.read_u32(o + reg::SUPPORTED_PAGE_SIZES), 1);
    assert_eq!(cfg.read_u32(o + reg::SYSTEM_PAGE_SIZE), 1);
    assert_eq!(cfg.read_u32(o + reg::VF_BAR0), 0b0100, "64-bit memory");
    assert_eq!(cfg.read_u32(o + reg::VF_BAR0 + 8), 0, "32-bit memory");
    assert_eq!(cfg.read_u32(o + reg::MIGRATION_STATE), 0);
    let s = cap.state(&cfg);
    assert_eq!(
        (s.total_vfs, s.enabled_vfs, s.memory_enabled),
        (3, 0, false)
    );
    assert_eq!(cap.vf_bars().len(), 2);
    assert_eq!(cap.total_vfs(), 3);
}

#[test]
fn read_only_registers_stay() {
    let (mut cfg, cap) = pf(2);
    let o = cap.offset();
    let before: Vec<u8> = (0..reg::LEN).map(|r| cfg.read_u8(o + r)).collect();
    for r in [
        0,
        reg::CAPABILITIES,
        reg::INITIAL_VFS,
        reg::FIRST_VF_OFFSET,
        reg::VF_DEVICE_ID,
        reg::SUPPORTED_PAGE_SIZES,
        reg::MIGRATION_STATE,
    ] {
        let aligned = r & !3;
        w32(&mut cfg, &cap, aligned, u32::MAX);
    }
    w16(&mut cfg, &cap, reg::STATUS, u16::MAX);
    write(&mut cfg, &cap, reg::FUNCTION_LINK, &[0xff]);
    write(&mut cfg, &cap, reg::FUNCTION_LINK + 1, &[0xff]);
    // 0x0c..0x10 holds InitialVFs and TotalVFs, 0x14 offset and stride, 0x18 VF
    // device id in its upper half.
    w32(&mut cfg, &cap, 0x0c, u32::MAX);
    w32(&mut cfg, &cap, 0x14, u32::MAX);
    w32(&mut cfg, &cap, 0x18, u32::MAX);
    let after: Vec<u8> = (0..reg::LEN).map(|r| cfg.read_u8(o + r)).collect();
    assert_eq!(before, after);
}

#[test]
fn control_write_mask() {
    let (mut cfg, cap) = pf(2);
    w16(&mut cfg, &cap, reg::CONTROL, u16::MAX);
    assert_eq!(
        cfg.read_u16(cap.offset() + reg::CONTROL),
        CONTROL_VF_ENABLE | CONTROL_VF_MSE | CONTROL_ARI
    );
    // System page size takes only a supported size.
    w32(&mut cfg, &cap, reg::SYSTEM_PAGE_SIZE, 0x10);
    assert_eq!(cfg.read_u32(cap.offset() + reg::SYSTEM_PAGE_SIZE), 0);
    w32(&mut cfg, &cap, reg::SYSTEM_PAGE_SIZE, 1);
    assert_eq!(cfg.read_u32(cap.offset() + reg::SYSTEM_PAGE_SIZE), 1);
}

#[test]
fn num_vfs_bounded_and_frozen_while_enabled() {
    let (mut cfg, cap) = pf(4);
    let num = cap.offset() + reg::NUM_VFS;
    w16(&mut cfg, &cap, reg::NUM_VFS, 9);
    assert_eq!(cfg.read_u16(num), 4, "clamped to TotalVFs");
    w16(&mut cfg, &cap, reg::NUM_VFS, 2);
    assert_eq!(cfg.read_u16(num), 2);
    assert_eq!(cap.state(&cfg).enabled_vfs, 0, "not enabled yet");
    w16(&mut cfg, &cap, reg::CONTROL, CONTROL_VF_ENABLE);
    assert_eq!(cap.state(&cfg).enabled_vfs, 2);
    // Changing NumVFs while enabled is ignored, byte writes included.
    w16(&mut cfg, &cap, reg::NUM_VFS, 3);
    write(&mut cfg, &cap, reg::NUM_VFS + 1, &[1]);
    w32(&mut cfg, &cap, reg::NUM_VFS, 0);
    assert_eq!(cfg.read_u16(num), 2);
    assert_eq!(cap.state(&cfg).enabled_vfs, 2);
    w16(&mut cfg, &cap, reg::CONTROL, 0);
    assert_eq!(cap.state(&cfg).enabled_vfs, 0);
    w16(&mut cfg, &cap, reg::NUM_VFS, 0);
    assert_eq!(cfg.read_u16(num), 0);
    // VF Enable with NumVFs 0 gives no VFs, and NumVFs stays 0 while enabled.
    w16(&mut cfg, &cap, reg::CONTROL, CONTROL_VF_ENABLE);
    w16(&mut cfg, &cap, reg::NUM_VFS, 1);
    assert_eq!((cfg.read_u16(num), cap.state(&cfg).enabled_vfs), (0, 0));
}

#[test]
fn vf_bar_sizing_and_placement() {
    let (mut cfg, cap) = pf(3);
    let b0 = cap.offset() + reg::VF_BAR0;
    w32(&mut cfg, &cap, reg::VF_BAR0, u32::MAX);
    w32(&mut cfg, &cap, reg::VF_BAR0 + 4, u32::MAX);
    w32(&mut cfg, &cap, reg::VF_BAR0 + 8, u32::MAX);
    w32(&mut cfg, &cap, reg::VF_BAR0 + 12, u32::MAX);
    assert_eq!(cfg.read_u32(b0), 0xffff_0004, "64 KiB per VF, 64-bit");
    assert_eq!(cfg.read_u32(b0 + 4), u32::MAX);
    assert_eq!(cfg.read_u32(b0 + 8), 0xffff_e000, "8 KiB per VF, 32-bit");
    assert_eq!(cfg.read_u32(b0 + 12), 0, "unused VF BAR register");
    cap.set_vf_bar_address(&mut cfg, 0, 0x12_3456_7000);
    assert_eq!(
        cfg.read_u32(b0),
        0x3456_0004,
        "low bits below the size dropped"
    );
    assert_eq!(cfg.read_u32(b0 + 4), 0x12);
    cap.set_vf_bar_address(&mut cfg, 2, 0xc000_0000);
    cap.set_vf_bar_address(&mut cfg, 1, 0x1000);
    cap.set_vf_bar_address(&mut cfg, 9, 0x1000);
    assert_eq!(cfg.read_u32(b0 + 4), 0x12, "index 1 is BAR 0's upper half");
    let s = cap.state(&cfg);
    assert_eq!(s.bars[0].map(|(_, a)| a), Some(0x12_3456_0000));
    assert_eq!(s.bars[2].map(|(_, a)| a), Some(0xc000_0000));
    assert!(s.bars[1].is_none());
}

#[test]
fn decode_gating() {
    let (mut cfg, cap) = pf(3);
    cap.set_vf_bar_address(&mut cfg, 0, 0x10_0000_0000);
    cap.set_vf_bar_address(&mut cfg, 2, 0xc000_0000);
    w16(&mut cfg, &cap, reg::NUM_VFS, 2);
    let s = cap.state(&cfg);
    assert_eq!(s.vf_bar(0, 0), None, "VF Enable clear");
    w16(&mut cfg, &cap, reg::CONTROL, CONTROL_VF_ENABLE);
    assert_eq!(cap.state(&cfg).vf_bar(0, 0), None, "VF MSE clear");
    w16(&mut cfg, &cap, reg::CONTROL, CONTROL_VF_MSE);
    assert_eq!(cap.state(&cfg).vf_bar(0, 0), None, "VF Enable clear");
    w16(
        &mut cfg,
        &cap,
        reg::CONTROL,
        CONTROL_VF_ENABLE | CONTROL_VF_MSE,
    );
    let s = cap.state(&cfg);
    assert_eq!(s.vf_bar(0, 0), Some(0x10_0000_0000));
    assert_eq!(s.vf_bar(1, 0), Some(0x10_0001_0000));
    assert_eq!(s.vf_bar(1, 2), Some(0xc000_2000));
    assert_eq!(s.vf_bar(2, 0), None, "only NumVFs VFs exist");
    assert_eq!(s.vf_bar(0, 1), None, "not a VF BAR");
    assert_eq!(s.vf_bar(0, 200), None);
    // An unassigned VF BAR does not decode.
    w32(&mut cfg, &cap, reg::VF_BAR0 + 8, 0);
    assert_eq!(cap.state(&cfg).vf_bar(0, 2), None);
    assert_eq!(cap.state(&cfg).vf_bar(0, 0), Some(0x10_0000_0000));
}

#[test]
fn layout_and_limits() {
    assert_eq!(SriovState::vf_devfn(0x20, 0), Some(0x21));
    assert_eq!(SriovState::vf_devfn(0x20, 6), Some(0x27));
    assert_eq!(SriovState::vf_devfn(0xf8, 6), Some(0xff));
    assert_eq!(SriovState::vf_devfn(0xf8, 7), None);
    assert_eq!(
        SriovState::vf_address(PciAddress::in_segment(2, 4, 0), 8),
        Some(PciAddress::in_segment(2, 5, 1))
    );
    let (_, cap) = pf(7);
    assert!(cap.check_fits(0xf8).is_ok());
    let (_, cap) = pf(8);
    assert_eq!(
        cap.check_fits(0xf8),
        Err(SriovError::TooManyVfs {
            total: 8,
            pf_devfn: 0xf8,
            max: 7
        })
    );
}

#[test]
fn construction_errors() {
    let mut cfg = ConfigSpace::new(&PciIds::default());
    let mut c = config(0);
    assert_eq!(SriovCap::add(&mut cfg, &c), Err(SriovError::NoVfs));
    c.total_vfs = 1;
    for (b, why) in [
        (bar(6, BarKind::Mmio32, 0x1000), "index out of range"),
        (bar(5, K64, 0x1000), "index out of range"),
        (
            bar(0, K64, 0x800),
            "size must be a power of two of at least 4 KiB",
        ),
        (
            bar(0, K64, 0x3000),
            "size must be a power of two of at least 4 KiB",
        ),
        (
            bar(0, BarKind::Mmio32, 1 << 32),
            "size must be a power of two of at least 4 KiB",
        ),
        (bar(1, K64, 0x1000), "register already used"),
    ] {
        c.vf_bars = vec![bar(0, K64, 0x1000), b];
        assert_eq!(
            SriovCap::add(&mut cfg, &c),
            Err(SriovError::Bar {
                index: b.index,
                reason: why
            }),
            "{b:?}"
        );
    }
    assert!(cfg.extended_capabilities().is_empty(), "nothing half-added");
}
