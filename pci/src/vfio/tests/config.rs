//! Config virtualization: identity passthrough, BAR sizing and moves, the command
//! register, the ROM BAR, INTx hiding, extended capability filtering.

use super::fake::{Call, NicSpec, DEVICE, HOST_COMMAND, PCIE_CAP, PM_CAP, VENDOR};
use super::*;
use crate::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY};
use crate::vfio::{CONFIG_REGION, ROM_BAR, ROM_REGION};
use crate::{BarInfo, BarKind, ConfigSpace};

fn config_writes(calls: &[Call]) -> Vec<(u64, Vec<u8>)> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Write {
                index,
                offset,
                data,
            } if *index == CONFIG_REGION => Some((*offset, data.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn identity_passes_through_header_is_virtualized() {
    let (mut dev, fake, _) = nic();
    assert_eq!(
        r32(&mut dev, 0),
        u32::from(DEVICE) << 16 | u32::from(VENDOR)
    );
    assert!(fake.log.take().contains(&Call::Read {
        index: CONFIG_REGION,
        offset: 0,
        len: 4
    }));
    assert_eq!(r32(&mut dev, 0x08), 0x0200_0001);
    // Multi-function bit cleared: the VMM decides.
    let mut b = [0u8];
    dev.read_config(0x0e, &mut b);
    assert_eq!(b[0], 0);
    // No INTx: pin 0; the line is a scratch register that stays in the model.
    assert_eq!(r16(&mut dev, 0x3c), 0);
    w16(&mut dev, 0x3c, 0x010b);
    assert_eq!(r16(&mut dev, 0x3c), 0x000b);
    assert!(config_writes(&fake.log.take()).is_empty());
    assert_eq!(fake.config(0x3c, 2), [0x0b, 0x01]);
    // A passthrough register: the PM control/status write reaches the device.
    w16(&mut dev, PM_CAP + 4, 0x0003);
    assert_eq!(
        config_writes(&fake.log.take()),
        vec![(u64::from(PM_CAP) + 4, vec![3, 0])]
    );
    // The PCIe capability is the device's.
    assert_eq!(r32(&mut dev, PCIE_CAP + 4), 0x0000_8000);
}

#[test]
fn bar_sizing_reads_the_size_mask() {
    let (mut dev, fake, _) = nic();
    assert_eq!(
        dev.bars(),
        vec![
            BarInfo {
                index: 0,
                kind: BarKind::Mmio64 {
                    prefetchable: false
                },
                size: 0x4000
            },
            BarInfo {
                index: 2,
                kind: BarKind::Mmio32,
                size: 0x1000
            },
        ]
    );
    // Unassigned at start, whatever the host had programmed.
    assert_eq!(r32(&mut dev, 0x10), 0x4);
    assert_eq!(r32(&mut dev, 0x18), 0);
    for reg in (0x10..0x28).step_by(4) {
        w32(&mut dev, reg, !0);
    }
    assert_eq!(r32(&mut dev, 0x10), 0xffff_c004);
    assert_eq!(r32(&mut dev, 0x14), 0xffff_ffff);
    assert_eq!(r32(&mut dev, 0x18), 0xffff_f000);
    // BAR 4 is an I/O-port BAR: hidden, sizes as absent.
    assert_eq!(r32(&mut dev, 0x20), 0);
    assert_eq!(r32(&mut dev, 0x1c), 0);
    // BAR registers never reach the device.
    assert!(config_writes(&fake.log.take()).is_empty());
    assert_eq!(fake.config(0x10, 4), 0xfe00_0004u32.to_le_bytes());
}

#[test]
fn bar_moves_report_mappings_and_keep_direct_offsets() {
    let (mut dev, _fake, _) = nic();
    let areas = dev.direct_areas(0);
    dev.set_bar_address(0, 0x80_0000_0000);
    dev.set_bar_address(2, 0xc000_0000);
    assert_eq!(dev.bar_mapping(0), None);
    let m = w16(&mut dev, COMMAND, COMMAND_MEMORY);
    assert_eq!(
        m,
        vec![
            BarMapping {
                index: 0,
                old: None,
                new: Some(0x80_0000_0000),
                size: 0x4000
            },
            BarMapping {
                index: 2,
                old: None,
                new: Some(0xc000_0000),
                size: 0x1000
            },
        ]
    );
    // The guest moves BAR 0 (upper half first, as Linux does).
    let m = w32(&mut dev, 0x14, 0x90);
    assert_eq!(m[0].new, Some(0x90_0000_0000));
    let m = w32(&mut dev, 0x10, 0x0001_0000);
    assert_eq!(
        (m[0].old, m[0].new),
        (Some(0x90_0000_0000), Some(0x90_0001_0000))
    );
    assert_eq!(dev.bar_mapping(0), Some(0x90_0001_0000));
    assert_eq!(dev.direct_areas(0), areas);
    let m = w16(&mut dev, COMMAND, 0);
    assert!(m.iter().all(|c| c.new.is_none()) && m.len() == 2);
}

#[test]
fn command_register_is_emulated_and_forwarded() {
    let fake = super::fake::FakeDevice::nic(NicSpec::default());
    let dev = VfioPciDevice::new(
        fake.clone(),
        super::fake::Vectors::new(8),
        VfioOptions::default(),
    );
    let mut dev = dev.unwrap();
    // At creation the device's memory decoding and bus mastering were turned off,
    // what the host set otherwise (SERR) kept.
    assert_eq!(
        fake.config_u16(4),
        HOST_COMMAND & !(COMMAND_MEMORY | COMMAND_BUS_MASTER)
    );
    fake.log.take();
    // The guest sees them off too.
    assert_eq!(
        r16(&mut dev, COMMAND),
        HOST_COMMAND & !(COMMAND_MEMORY | COMMAND_BUS_MASTER)
    );
    w16(&mut dev, COMMAND, 0xffff);
    let seen = r16(&mut dev, COMMAND);
    assert_eq!(
        seen & 0x0407,
        COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
    );
    // Forwarded: memory, bus master, INTx disable; I/O space never.
    let dev_cmd = fake.config_u16(4);
    assert_eq!(
        dev_cmd,
        0x0100 | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
    );
    w16(&mut dev, COMMAND, COMMAND_MEMORY);
    assert_eq!(fake.config_u16(4), 0x0100 | COMMAND_MEMORY);
    // A dword write over command + status: status goes to the device as written.
    fake.log.take();
    w32(&mut dev, COMMAND, 0xf900_0006);
    let writes = config_writes(&fake.log.take());
    assert!(writes.contains(&(6, vec![0x00, 0xf9])), "{writes:?}");
    assert_eq!(
        fake.config_u16(4),
        0x0100 | COMMAND_MEMORY | COMMAND_BUS_MASTER
    );
}

#[test]
fn rom_hidden_unless_asked() {
    let (mut dev, fake, _) = nic();
    assert_eq!(r32(&mut dev, 0x30), 0);
    w32(&mut dev, 0x30, !0);
    assert_eq!(r32(&mut dev, 0x30), 0);
    assert!(dev.bars().iter().all(|b| b.index != ROM_BAR));
    let mut b = [0u8; 4];
    dev.read_bar(ROM_BAR, 0, &mut b);
    assert_eq!(b, [0xff; 4]);
    assert!(fake.log.take_effects().is_empty());
}

#[test]
fn rom_exposed_as_bar_6() {
    let (mut dev, fake, _) = build(NicSpec::default(), 8, VfioOptions { expose_rom: true });
    let rom = BarInfo {
        index: ROM_BAR,
        kind: BarKind::Mmio32,
        size: 0x8000,
    };
    assert!(dev.bars().contains(&rom));
    // Linux sizes the ROM with the enable bit clear.
    w32(&mut dev, 0x30, 0xffff_f800);
    assert_eq!(r32(&mut dev, 0x30), 0xffff_8000);
    dev.set_bar_address(ROM_BAR, 0xd000_0000);
    w16(&mut dev, COMMAND, COMMAND_MEMORY);
    assert_eq!(dev.bar_mapping(ROM_BAR), None, "ROM enable bit still clear");
    let m = w32(&mut dev, 0x30, 0xd000_0001);
    assert_eq!(
        m,
        vec![BarMapping {
            index: ROM_BAR,
            old: None,
            new: Some(0xd000_0000),
            size: 0x8000
        }]
    );
    fake.log.take();
    assert_eq!(bar_r32(&mut dev, ROM_BAR, 0x10), 0x0101_0101);
    assert_eq!(
        fake.log.take(),
        vec![Call::Read {
            index: ROM_REGION,
            offset: 0x10,
            len: 4
        }]
    );
    // Past the 0x6000-byte region: all-ones, VFIO not called.
    assert_eq!(bar_r32(&mut dev, ROM_BAR, 0x6000), u32::MAX);
    assert_eq!(bar_r32(&mut dev, ROM_BAR, 0x5ffe), u32::MAX);
    bar_w32(&mut dev, ROM_BAR, 0, 0);
    assert!(fake.log.take().is_empty());
    let m = w16(&mut dev, COMMAND, 0);
    assert!(m.contains(&BarMapping {
        index: ROM_BAR,
        old: Some(0xd000_0000),
        new: None,
        size: 0x8000
    }));
}

/// The extended capabilities as a guest walks them from 0x100.
fn guest_ext_caps(dev: &mut VfioPciDevice) -> Vec<(u16, u16, u16)> {
    let mut cfg = ConfigSpace::new(&Default::default());
    let mut buf = vec![0u8; 4096];
    for off in (0x100..0x1000).step_by(4) {
        dev.read_config(off as u16, &mut buf[off..off + 4]);
    }
    cfg.set_bytes(0x100, &buf[0x100..]);
    cfg.extended_capabilities()
        .into_iter()
        .map(|(id, _, off)| (id, off, (cfg.read_u32(off) >> 20) as u16))
        .collect()
}

#[test]
fn extended_capabilities_filtered() {
    let (mut dev, fake, _) = nic();
    // AER only, its next pointer rewritten to end the list.
    assert_eq!(guest_ext_caps(&mut dev), vec![(0x0001, 0x100, 0)]);
    assert_eq!(r32(&mut dev, 0x100), 0x0002_0001);
    // The AER body is the device's.
    assert_eq!(r32(&mut dev, 0x104), 0x1234_5678);
    // The SR-IOV and ARI bodies read 0 and cannot be written (VF Enable stays off).
    assert_eq!(r32(&mut dev, 0x14c), 0);
    assert_eq!(r32(&mut dev, 0x184), 0);
    fake.log.take();
    w16(&mut dev, 0x148, 0x0009);
    assert!(config_writes(&fake.log.take()).is_empty());
    assert_eq!(r16(&mut dev, 0x148), 0);
}

#[test]
fn hidden_first_extended_capability_leaves_a_null_header() {
    let spec = NicSpec {
        sriov_first: true,
        ..NicSpec::default()
    };
    let (mut dev, _fake, _) = build(spec, 8, VfioOptions::default());
    // 0x100: null capability pointing to AER, which ends the list.
    assert_eq!(r32(&mut dev, 0x100), 0x140 << 20);
    let caps: Vec<_> = guest_ext_caps(&mut dev)
        .into_iter()
        .filter(|c| c.0 != 0)
        .collect();
    assert_eq!(caps, vec![(0x0001, 0x140, 0)]);
}

#[test]
fn conventional_config_region_and_bad_accesses() {
    let spec = NicSpec {
        config_size: 0x100,
        ..NicSpec::default()
    };
    let (mut dev, fake, _) = build(spec, 8, VfioOptions::default());
    // Past the 256-byte region: all-ones, no VFIO access (the fake asserts bounds).
    assert_eq!(r32(&mut dev, 0x100), u32::MAX);
    assert_eq!(r32(&mut dev, 0xffc), u32::MAX);
    w32(&mut dev, 0x200, 0x1234);
    let mut b = [0u8; 4];
    dev.read_config(0xffe, &mut b);
    assert_eq!(b, [0xff; 4]);
    assert!(dev.write_config(0xfff, &[1, 2]).is_empty());
    assert!(config_writes(&fake.log.take()).is_empty());
}
