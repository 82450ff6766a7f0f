//! `virtio_pci`: the virtio-pci modern transport (`ferrio_pci::virtio_pci`) around a
//! probe device: the common configuration register file through BAR 0 and through the
//! PCI_CFG window (feature negotiation, the status state machine, queue registers),
//! queue building and validation at DRIVER_OK against guest memory, ISR, notify
//! writes, device config, the MSI-X table and PBA in BAR 0, resets, and the probe's
//! queues served and signalled through the transport's interrupt (queue vectors the
//! guest programmed, MSI-X masking and pending bits).
//!
//! Input: guest (guest-physical), probe (`u8 type, u8 queues, u8 max size log2 per
//! queue, u64 features`), `u8` flags (bit 0 ACCESS_PLATFORM, bit 1 the device refuses
//! activation), then ops: 0/1 BAR 0 write/read (`u8` region, `u16` offset, `u8` size,
//! `u64` value), 2/3 config write/read (`u8` target, `u16` offset, `u8` size, `u32`
//! value), 4 poke, 5 the device serves its queues, 6 the device signals a config
//! change or an error, 7 the device refuses activation from now on or not.
//!
//! Oracle: see [`check`].

use std::sync::Mutex;

use ferrio_devices::virtio::status;
use ferrio_pci::virtio_pci::{layout, offered_features, VirtioPciDevice};
use ferrio_pci::PciDevice;

use crate::guest::{self, physical_guest, Guest, Image, Mem, Ring};
use crate::input::{Input, Seed};
use crate::pci_common::{access_len, serve_probe, Probe, ProbeState, Vectors};

const MAX_OPS: usize = 96;

/// BAR 0 regions an access is aimed at (the last two: anywhere, the very end).
const REGIONS: [u64; 8] = [
    layout::COMMON_OFFSET,
    layout::ISR_OFFSET,
    layout::DEVICE_OFFSET,
    layout::NOTIFY_OFFSET,
    layout::MSIX_TABLE_OFFSET,
    layout::MSIX_PBA_OFFSET,
    0,
    layout::BAR_SIZE - 8,
];

fn bar_offset(sel: u8, off: u16) -> u64 {
    match sel % 8 {
        6 => u64::from(off),
        7 => REGIONS[7] + u64::from(off % 8),
        r => REGIONS[usize::from(r)] + u64::from(off % 0x1000),
    }
}

/// Offset of the vendor capability of `cfg_type` (the PCI_CFG window: 5).
pub fn virtio_cap(dev: &VirtioPciDevice<Mem>, cfg_type: u8) -> u16 {
    let cfg = dev.config_space();
    let mut at = cfg.read_u8(0x34);
    while at != 0 {
        let a = u16::from(at);
        if cfg.read_u8(a) == 0x09 && cfg.read_u8(a + 3) == cfg_type {
            return a;
        }
        at = cfg.read_u8(a + 1);
    }
    panic!("no virtio capability {cfg_type}");
}

/// Config space offset for a target: 0 raw, 1 the PCI_CFG capability, 2 MSI-X message
/// control, 3 the command register; aligned to `len`.
fn config_offset(dev: &VirtioPciDevice<Mem>, sel: u8, off: u16, len: usize) -> u16 {
    let raw = match sel % 4 {
        0 => off % 0x1000,
        1 => virtio_cap(dev, 5) + off % 20,
        2 => u16::from(dev.msix().cap_offset()) + 2,
        _ => 4,
    };
    raw & !(len as u16 - 1)
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let guest = Guest::physical(&mut inp);
    let probe = Probe::read(&mut inp);
    let flags = inp.u8();
    let access_platform = flags & 1 != 0;
    let state = probe.state.clone();
    state.lock().unwrap().refuse = flags & 2 != 0;
    let offered = offered_features(probe.features, access_platform);
    let vectors = Vectors::new(probe.queue_max_sizes.len() as u16 + 1);
    let Ok(mut dev) = VirtioPciDevice::new(
        Box::new(probe),
        guest.phys.clone(),
        vectors.clone(),
        access_platform,
    ) else {
        return;
    };
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 8 {
            op @ (0 | 1) => {
                let write = op == 0;
                let offset = bar_offset(inp.u8(), inp.u16());
                let len = access_len(inp.u8()).min((layout::BAR_SIZE - offset) as usize);
                let value = inp.u64().to_le_bytes();
                if write {
                    dev.write_bar(0, offset, &value[..len]);
                } else {
                    let mut out = [0u8; 8];
                    dev.read_bar(0, offset, &mut out[..len]);
                }
            }
            op @ (2 | 3) => {
                let write = op == 2;
                let (sel, off) = (inp.u8(), inp.u16());
                let len = access_len(inp.u8()).min(4);
                let offset = config_offset(&dev, sel, off, len);
                let value = inp.u32().to_le_bytes();
                if write {
                    let _ = dev.write_config(offset, &value[..len]);
                } else {
                    let mut out = [0u8; 4];
                    dev.read_config(offset, &mut out[..len]);
                }
            }
            4 => guest::poke(&guest.phys, &mut inp),
            5 => serve_probe(&state),
            6 => {
                let error = inp.bool();
                let s = state.lock().unwrap();
                if let Some((_, _, irq)) = &s.active {
                    if error {
                        irq.device_error();
                    } else {
                        let _ = irq.signal_config();
                    }
                }
            }
            _ => state.lock().unwrap().refuse = inp.bool(),
        }
        crate::note!(
            "virtio-pci: status {:#x} active {} fired {:?}",
            dev.status(),
            dev.is_active(),
            vectors.peek_fired()
        );
        check(&dev, &state, &vectors, offered);
    }
}

/// After every guest access: the status moved in order, the acked features are a
/// subset of the offer, the transport and the device agree on whether it runs,
/// routing changes were committed, and no interrupt is left pending while it could
/// be delivered (a lost interrupt).
fn check(dev: &VirtioPciDevice<Mem>, state: &Mutex<ProbeState>, vectors: &Vectors, offered: u64) {
    let st = dev.status();
    let has = |bit: u8| st & bit != 0;
    if has(status::DRIVER_OK) {
        assert!(has(status::FEATURES_OK), "status {st:#x}");
    }
    if has(status::FEATURES_OK) {
        assert!(
            has(status::DRIVER) && has(status::ACKNOWLEDGE),
            "status {st:#x}"
        );
    }
    let s = state.lock().unwrap();
    assert_eq!(s.acked & !offered, 0, "acked features not offered");
    assert_eq!(
        dev.is_active(),
        s.active.is_some(),
        "transport and device disagree"
    );
    drop(s);
    assert_eq!(vectors.uncommitted(), 0, "MSI-X routes left uncommitted");
    let trigger = dev.msix().trigger_handle();
    for v in vectors.take_fired() {
        assert!(
            trigger.is_active() && !trigger.is_masked(v),
            "vector {v} fired while masked"
        );
    }
    if trigger.is_active() {
        for v in 0..trigger.vector_count() {
            let lost = trigger.is_pending(v) && !trigger.is_masked(v);
            assert!(!lost, "vector {v} pending while deliverable");
        }
    }
}

/// Seed ops: a BAR 0 write of `len` bytes at `offset` (raw), a config write.
fn bar(seed: Seed, offset: u64, len_code: u8, value: u64) -> Seed {
    seed.u8(0).u8(6).u16(offset as u16).u8(len_code).u64(value)
}

fn config(seed: Seed, offset: u16, len_code: u8, value: u32) -> Seed {
    seed.u8(2).u8(0).u16(offset).u8(len_code).u32(value)
}

/// The Linux driver's bring-up of a 2-queue device: MSI-X on, features, queue 0 at the
/// seed's ring, vectors, DRIVER_OK, a kick; then a reset.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut img = Image::new();
    let mut ring = Ring::new(&mut img, 0, 16);
    ring.add(&mut img, &[(0x1000, 64, false), (0x1100, 64, true)]);
    let probe = |seed: Seed| seed.u8(1).u8(1).u8(8).u8(8).u64(1 << 29 | 1 << 32);
    // Where the MSI-X capability sits (the same for every probe of this shape).
    let msix_ctrl = {
        let mut inp = Input::new(&[1, 1, 8, 8]);
        let p = Probe::read(&mut inp);
        let mem = Mem::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)]).expect("memory");
        let dev =
            VirtioPciDevice::new(Box::new(p), mem, Vectors::new(3), false).expect("probe device");
        u16::from(dev.msix().cap_offset()) + 2
    };
    let mut s = probe(physical_guest(Seed::new(), &img)).u8(0);
    s = config(s, 4, 1, 0x6); // memory space + bus master
    s = config(s, msix_ctrl, 1, 0x8000); // MSI-X enable
    for v in 0..3u64 {
        let e = layout::MSIX_TABLE_OFFSET + 16 * v;
        s = bar(s, e, 3, 0xfee0_0000);
        s = bar(s, e + 8, 2, 0x40 + v);
        s = bar(s, e + 12, 2, 0); // unmask
    }
    s = bar(s, 0x14, 0, 1); // ACKNOWLEDGE
    s = bar(s, 0x14, 0, 3); // DRIVER
    s = bar(s, 0x00, 2, 1).u8(1).u8(6).u16(0x04).u8(2).u64(0); // feature word 1
    s = bar(s, 0x08, 2, 0);
    s = bar(s, 0x0c, 2, 1 << 29);
    s = bar(s, 0x08, 2, 1);
    s = bar(s, 0x0c, 2, 1);
    s = bar(s, 0x14, 0, 0xb); // FEATURES_OK
    s = bar(s, 0x10, 1, 2); // config vector
    s = bar(s, 0x16, 1, 0); // queue 0
    s = bar(s, 0x18, 1, 16);
    s = bar(s, 0x1a, 1, 0);
    s = bar(s, 0x20, 2, ring.spec.desc);
    s = bar(s, 0x24, 2, 0);
    s = bar(s, 0x28, 3, ring.spec.avail);
    s = bar(s, 0x30, 3, ring.spec.used);
    s = bar(s, 0x1c, 1, 1);
    s = bar(s, 0x14, 0, 0xf); // DRIVER_OK
    s = bar(s, layout::NOTIFY_OFFSET, 1, 0);
    // Serve the queue, read the ISR.
    let bringup = s.clone().u8(5).u8(1).u8(1).u16(0).u8(0).u64(0);
    let reset = bar(bringup.clone().u8(6).u8(0), 0x14, 0, 0).u8(5);
    let masked = bar(s.clone(), layout::MSIX_TABLE_OFFSET + 12, 2, 1).u8(5);
    let masked = bar(masked, layout::MSIX_TABLE_OFFSET + 12, 2, 0);
    // The same bring-up's first steps through the PCI_CFG window: bar 0, offset 0x14,
    // length 1, then the data.
    let mut w = probe(physical_guest(Seed::new(), &img)).u8(0);
    for (field, value) in [(4u16, 0u32), (8, 0x14), (12, 1), (16, 1)] {
        w = w.u8(2).u8(1).u16(field).u8(2).u32(value);
    }
    let window = w.u8(2).u8(1).u16(16).u8(0).u32(3);
    vec![
        ("bringup", bringup.build()),
        ("bringup_reset", reset.build()),
        ("masked_vector", masked.build()),
        ("pci_cfg_window", window.build()),
    ]
}
