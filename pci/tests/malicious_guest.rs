//! A malicious guest: seeded random config accesses over ECAM and 0xCF8/0xCFC and
//! random MSI-X table/PBA accesses of any size and offset. Nothing may panic,
//! read-only bits must keep their values, BAR reports must chain (`old` = the previous
//! `new`) and end where `bar_mapping` says, and no unmasked vector stays pending.

mod common;

use common::{Call, RecordingVectors, Rng, TestDevice, CLASS, DEVICE, VENDOR};
use ferrio_pci::{ConfigChange, PciAddress, PciDevice, PciRoot, SharedPciDevice};
use std::collections::HashMap;

const LENS: [usize; 8] = [0, 1, 2, 3, 4, 5, 8, 16];

struct Snapshot {
    data: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
}

fn snapshot(d: &TestDevice) -> Snapshot {
    let mut data = vec![0u8; 4096];
    d.cfg.read(0, &mut data);
    Snapshot {
        data,
        wmask: (0..4096).map(|o| d.cfg.write_mask(o)).collect(),
        w1c: (0..4096).map(|o| d.cfg.w1c_mask(o)).collect(),
    }
}

fn config_offset(rng: &mut Rng, interesting: &[u64]) -> u64 {
    let dev = rng.below(4);
    let func = if rng.below(8) == 0 { rng.below(8) } else { 0 };
    let reg = match rng.below(10) {
        0 => return rng.next(),
        1 => return rng.below(4 << 20),
        2..=4 => interesting[rng.below(interesting.len() as u64) as usize] + rng.below(4),
        5..=7 => rng.below(0x100),
        _ => rng.below(0x1000),
    };
    dev << 15 | func << 12 | reg
}

#[test]
fn random_accesses_never_panic_or_corrupt() {
    let mut root = PciRoot::new();
    let vectors = [RecordingVectors::new(70), RecordingVectors::new(1)];
    let devs = [
        TestDevice::shared(vectors[0].clone(), 70),
        TestDevice::shared(vectors[1].clone(), 1),
    ];
    let addrs = [PciAddress::new(1, 0), PciAddress::new(2, 0)];
    for (d, a) in devs.iter().zip(addrs) {
        let shared: SharedPciDevice = d.clone();
        assert_eq!(root.add_device(Some(a.device), shared), Ok(a));
    }
    let before: Vec<Snapshot> = devs.iter().map(|d| snapshot(&d.lock().unwrap())).collect();
    let (msix_ctrl, pcie) = {
        let d = devs[0].lock().unwrap();
        (u64::from(d.msix.cap_offset()) + 2, u64::from(d.pcie_cap))
    };
    let interesting = [
        0x04,
        0x06,
        0x10,
        0x14,
        0x18,
        0x1c,
        0x20,
        msix_ctrl,
        pcie + 8,
    ];
    let triggers = [
        devs[0].lock().unwrap().msix.trigger_handle(),
        devs[1].lock().unwrap().msix.trigger_handle(),
    ];
    let mut model: HashMap<(PciAddress, u8), Option<u64>> = HashMap::new();
    let mut rng = Rng::new(0x5eed_f00d_dead_beef);
    let mut buf = [0u8; 16];
    let (mut reports, mut fires) = (0usize, 0usize);

    for i in 0..60_000u32 {
        let len = LENS[rng.below(LENS.len() as u64) as usize];
        let changes = match rng.below(12) {
            0..=2 => {
                let data = rng.bytes(len);
                root.ecam_write(config_offset(&mut rng, &interesting), &data)
            }
            3 | 4 => {
                root.ecam_read(config_offset(&mut rng, &interesting), &mut buf[..len]);
                Vec::new()
            }
            5 => {
                let off = rng.below(10);
                if off == 0 && rng.below(2) == 0 {
                    let dev = rng.below(4) as u32;
                    let reg = config_offset(&mut rng, &interesting) as u32 & 0xffc;
                    let v = (rng.next() as u32 & 0x0f00_0003) | 0x8000_0000 | dev << 11;
                    let v = v | (reg & 0xfc) | (reg >> 8) << 24;
                    root.pio_write(0, &v.to_le_bytes())
                } else {
                    let data = rng.bytes(len);
                    root.pio_write(off, &data)
                }
            }
            6 => {
                root.pio_read(rng.below(10), &mut buf[..len]);
                Vec::new()
            }
            7..=9 => {
                let d = &devs[rng.below(2) as usize];
                let bar = if rng.below(8) == 0 {
                    rng.below(7) as u8
                } else {
                    0
                };
                let offset = match rng.below(4) {
                    0 => rng.next(),
                    1 => 0x2000 + rng.below(0x20),
                    _ => rng.below(0x480),
                };
                let mut d = d.lock().unwrap();
                if rng.below(3) == 0 {
                    d.read_bar(bar, offset, &mut buf[..len]);
                } else {
                    let data = rng.bytes(len);
                    d.write_bar(bar, offset, &data);
                }
                Vec::new()
            }
            _ => {
                let v = if rng.below(8) == 0 {
                    rng.next() as u16
                } else {
                    rng.below(72) as u16
                };
                triggers[rng.below(2) as usize].trigger(v);
                Vec::new()
            }
        };
        for (addr, m) in changes.iter().filter_map(ConfigChange::as_bar) {
            let cur = model.entry((addr, m.index)).or_insert(None);
            assert_eq!(*cur, m.old, "report {m:?} does not chain at step {i}");
            assert_ne!(m.old, m.new);
            *cur = m.new;
            reports += 1;
        }
        if i % 1000 == 0 {
            for v in &vectors {
                fires += v
                    .take()
                    .iter()
                    .filter(|c| matches!(c, Call::Fire(_)))
                    .count();
            }
            for h in &triggers {
                for v in 0..h.vector_count() {
                    if h.is_active() && !h.is_masked(v) {
                        assert!(!h.is_pending(v), "vector {v} left pending at step {i}");
                    }
                }
            }
        }
    }

    for ((d, snap), addr) in devs.iter().zip(&before).zip(addrs) {
        let d = d.lock().unwrap();
        let after = snapshot(&d);
        for off in 0..4096 {
            let changed = after.data[off] ^ snap.data[off];
            let free = snap.wmask[off] | snap.w1c[off];
            assert_eq!(
                changed & !free,
                0,
                "read-only bits changed at {addr} {off:#x}"
            );
            let set = after.data[off] & !snap.data[off] & snap.w1c[off];
            assert_eq!(set, 0, "RW1C bits set by the guest at {off:#x}");
            assert_eq!(after.wmask[off], snap.wmask[off]);
        }
        assert_eq!(d.cfg.read_u16(0), VENDOR);
        assert_eq!(d.cfg.read_u16(2), DEVICE);
        assert_eq!(d.cfg.read_u32(8) >> 8, CLASS);
        assert_eq!(d.cfg.capabilities().len(), 2);
        for bar in d.bars() {
            let reported = model.get(&(addr, bar.index)).copied().flatten();
            assert_eq!(
                reported,
                d.bar_mapping(bar.index),
                "BAR {} of {addr}",
                bar.index
            );
        }
    }
    eprintln!("{reports} BAR reports, {fires} MSI-X fires");
    // The run must have exercised BAR decoding and MSI-X delivery.
    assert!(
        reports > 20 && fires > 0,
        "reports {reports}, fires {fires}"
    );
    let mut id = [0u8; 4];
    root.ecam_read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
    root.ecam_read(8, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x0600_0000);
}

/// Direct `ConfigSpace` accesses with any offset and length (no root-complex checks).
#[test]
fn config_space_accepts_any_offset_and_length() {
    let mut d = TestDevice::new(RecordingVectors::new(4), 4);
    let mut rng = Rng::new(42);
    let mut big = vec![0u8; 5000];
    for _ in 0..20_000 {
        let off = rng.next() as u16;
        let len = rng.below(5000) as usize;
        if rng.below(2) == 0 {
            d.cfg.read(off, &mut big[..len]);
        } else {
            let data = rng.bytes(len.min(64));
            let _ = d.cfg.write(off, &data);
            d.msix.config_write(&d.cfg, off, data.len());
        }
    }
    assert_eq!(d.cfg.read_u16(0), VENDOR);
}
