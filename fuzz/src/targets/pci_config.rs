//! `pci_config`: PCI configuration space through the root complex (`PciRoot`: ECAM and
//! the 0xCF8/0xCFC mechanism, decoding, access validation, the host bridge, absent
//! functions) on two test functions built like the virtio transport's (a 32-bit and
//! a 64-bit prefetchable BAR, PCI Express capability, MSI-X, an extended capability):
//! write masks and RW1C bits, BAR sizing and placement, the command register, the
//! capability lists; and MSI-X through the decoded BARs (table and PBA, in one BAR or
//! split over two), with interrupts raised by the device side.
//!
//! Input: `u8` vector count of each function (MSI-X table and PBA in BAR 0 for the
//! first, table in BAR 2 and PBA in BAR 0 for the second), then ops: 0/1 ECAM
//! write/read (`u8` target: function, host bridge or anywhere; `u16` register; `u8`
//! size; `u32` value), 2/3 port write/read at 0xCF8 + `u8 % 8`, 4/5 BAR write/read
//! (only BARs the root reported decoded: `u8` function and BAR, `u32` offset, `u8`
//! size, `u64` value), 6 the device raises a vector.
//!
//! Oracle: the BAR reports chain and are aligned, identity registers never change,
//! routes are committed, vectors fire only while deliverable, and none stays pending
//! while deliverable.

use std::sync::{Arc, Mutex};

use ferrio_pci::capability::PciePortType;
use ferrio_pci::config::{ConfigSpace, PciIds};
use ferrio_pci::msix::{Msix, MsixConfig};
use ferrio_pci::{BarInfo, BarKind, BarMapping, PciAddress, PciDevice, PciRoot};

use crate::input::{Input, Seed};
use crate::pci_common::{access_len, BarTracker, Vectors};

const MAX_OPS: usize = 128;
const BAR0_SIZE: u64 = 0x4000;
const BAR2_SIZE: u64 = 0x10_0000;
const PBA_OFFSET: u32 = 0x2000;

/// A function like the virtio transport builds.
pub struct TestFn {
    cfg: ConfigSpace,
    msix: Msix,
}

impl TestFn {
    /// `split`: the MSI-X table in BAR 2, the PBA in BAR 0.
    fn new(vectors: Arc<Vectors>, n: u16, split: bool) -> Option<Self> {
        let mut cfg = ConfigSpace::new(&PciIds {
            vendor: 0x1af4,
            device: 0x10f0,
            class: 0xff_00_00,
            revision: 3,
            subsystem_vendor: 0x1af4,
            subsystem_device: 0x1100,
        });
        cfg.add_bar(BarInfo {
            index: 0,
            kind: BarKind::Mmio32,
            size: BAR0_SIZE,
        })
        .ok()?;
        cfg.add_bar(BarInfo {
            index: 2,
            kind: BarKind::Mmio64 { prefetchable: true },
            size: BAR2_SIZE,
        })
        .ok()?;
        cfg.add_pcie_capability(PciePortType::Endpoint).ok()?;
        let (table_bar, table_offset) = if split { (2, 0x8000) } else { (0, 0) };
        let msix = Msix::new(
            &mut cfg,
            MsixConfig {
                vectors: n,
                table_bar,
                table_offset,
                pba_bar: 0,
                pba_offset: PBA_OFFSET,
            },
            vectors,
        )
        .ok()?;
        cfg.add_extended_capability(0x000b, 1, &[0x12, 0x34, 0x56, 0x78], &[0, 0xff])
            .ok()?;
        Some(TestFn { cfg, msix })
    }
}

impl PciDevice for TestFn {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.cfg.read(offset, data);
    }
    fn write_config(&mut self, offset: u16, data: &[u8]) -> Vec<BarMapping> {
        let changes = self.cfg.write(offset, data);
        self.msix.config_write(&self.cfg, offset, data.len());
        changes
    }
    fn bars(&self) -> Vec<BarInfo> {
        self.cfg.bars()
    }
    fn set_bar_address(&mut self, index: u8, addr: u64) {
        self.cfg.set_bar_address(index, addr);
    }
    fn bar_mapping(&self, index: u8) -> Option<u64> {
        self.cfg.bar_mapping(index)
    }
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if !self.msix.read_bar(bar, offset, data) {
            data.fill(0);
        }
    }
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.msix.write_bar(bar, offset, data);
    }
}

struct Func {
    address: PciAddress,
    dev: Arc<Mutex<TestFn>>,
    vectors: Arc<Vectors>,
}

fn ecam(a: PciAddress, reg: u16) -> u64 {
    u64::from(a.devfn()) << 12 | u64::from(reg)
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut root = PciRoot::new();
    let mut funcs = Vec::new();
    for (i, address) in [PciAddress::new(1, 0), PciAddress::new(1, 1)]
        .into_iter()
        .enumerate()
    {
        let n = u16::from(inp.u8() % 128) + 1;
        let vectors = Vectors::new(n);
        let Some(f) = TestFn::new(vectors.clone(), n, i == 1) else {
            return;
        };
        let dev = Arc::new(Mutex::new(f));
        root.add_function(address, dev.clone()).expect("free devfn");
        funcs.push(Func {
            address,
            dev,
            vectors,
        });
    }
    let mut bars = BarTracker::default();
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 7 {
            op @ (0 | 1) => {
                let target = inp.u8();
                let reg = inp.u16() % 0x1000;
                let len = access_len(inp.u8());
                let value = u64::from(inp.u32()).to_le_bytes();
                let offset = match target % 4 {
                    0 | 1 => ecam(funcs[usize::from(target % 2)].address, reg),
                    2 => ecam(PciAddress::new(0, 0), reg),
                    _ => u64::from(inp.u32()) << 8 | u64::from(reg & 0xff),
                };
                if op == 0 {
                    let changes = bars.apply_all(root.ecam_write(offset, &value[..len]));
                    crate::note!("pci: ECAM write {offset:#x}: {changes:?}");
                } else {
                    let mut out = [0u8; 8];
                    root.ecam_read(offset, &mut out[..len]);
                }
            }
            op @ (2 | 3) => {
                let port = u64::from(inp.u8() % 8);
                let len = access_len(inp.u8()).min(4);
                let value = inp.u32().to_le_bytes();
                if op == 2 {
                    bars.apply_all(root.pio_write(port, &value[..len]));
                } else {
                    let mut out = [0u8; 4];
                    root.pio_read(port, &mut out[..len]);
                }
            }
            op @ (4 | 5) => {
                let which = inp.u8();
                let f = &funcs[usize::from(which % 2)];
                let bar = if which & 2 != 0 { 2 } else { 0 };
                let size = if bar == 2 { BAR2_SIZE } else { BAR0_SIZE };
                let offset = u64::from(inp.u32()) % size;
                let len = access_len(inp.u8()).min((size - offset) as usize);
                let value = inp.u64().to_le_bytes();
                // Only a decoded BAR is reachable.
                if bars.mapped.contains_key(&(f.address, bar)) {
                    let mut d = f.dev.lock().unwrap();
                    if op == 4 {
                        d.write_bar(bar, offset, &value[..len]);
                    } else {
                        let mut out = [0u8; 8];
                        d.read_bar(bar, offset, &mut out[..len]);
                    }
                }
            }
            _ => {
                let f = &funcs[usize::from(inp.u8() % 2)];
                let d = f.dev.lock().unwrap();
                let n = d.msix.config().vectors;
                d.msix.trigger(inp.u16() % n);
            }
        }
        for f in &funcs {
            crate::note!("pci: {} fired {:?}", f.address, f.vectors.peek_fired());
            check(f);
        }
        let mut id = [0u8; 4];
        root.ecam_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36, "host bridge identity");
    }
}

fn check(f: &Func) {
    let d = f.dev.lock().unwrap();
    assert_eq!(d.cfg.read_u32(0), 0x10f0_1af4, "identity of {}", f.address);
    assert_eq!(f.vectors.uncommitted(), 0, "MSI-X routes left uncommitted");
    let trigger = d.msix.trigger_handle();
    for v in f.vectors.take_fired() {
        assert!(
            trigger.is_active() && !trigger.is_masked(v),
            "vector {v} fired while masked"
        );
    }
    if trigger.is_active() {
        for v in 0..trigger.vector_count() {
            let lost = trigger.is_pending(v) && !trigger.is_masked(v);
            assert!(
                !lost,
                "vector {v} of {} pending while deliverable",
                f.address
            );
        }
    }
}

fn write(seed: Seed, target: u8, reg: u16, len_code: u8, value: u32) -> Seed {
    seed.u8(0).u8(target).u16(reg).u8(len_code).u32(value)
}

fn read(seed: Seed, target: u8, reg: u16) -> Seed {
    seed.u8(1).u8(target).u16(reg).u8(2).u32(0)
}

fn bar(seed: Seed, which: u8, offset: u32, len_code: u8, value: u64) -> Seed {
    seed.u8(4).u8(which).u32(offset).u8(len_code).u64(value)
}

/// Seeds: firmware-style enumeration (BAR sizing, placement, memory enable), the
/// capability walk, MSI-X set-up through the BARs with interrupts raised while masked
/// and delivered at unmask, the 0xCF8 mechanism.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut s = Seed::new().u8(3).u8(7);
    for t in 0..2u8 {
        s = read(s, t, 0);
        s = write(s, t, 0x10, 2, u32::MAX);
        s = read(s, t, 0x10);
        s = write(s, t, 0x10, 2, 0xc000_0000 + 0x10_0000 * u32::from(t));
        s = write(s, t, 0x18, 2, 0);
        s = write(s, t, 0x1c, 2, 0x40 + u32::from(t));
        s = write(s, t, 0x04, 1, 0x6);
        s = read(s, t, 0x34);
    }
    let enum_only = s.clone();
    // MSI-X enable in message control, 2 bytes into the capability.
    let cap = |split| {
        let f = TestFn::new(Vectors::new(8), 8, split).expect("test function");
        u16::from(f.msix.cap_offset())
    };
    for t in 0..2u8 {
        s = read(s, t, 0x100);
        s = write(s, t, cap(t == 1) + 2, 1, 0x8000);
    }
    // Function 0: vectors masked, a device interrupt goes pending, unmask delivers.
    for v in 0..4u32 {
        s = bar(s, 0, 16 * v, 2, 0xfee0_0000);
        s = bar(s, 0, 16 * v + 8, 2, 0x30 + u64::from(v));
    }
    s = s.u8(6).u8(0).u16(1);
    s = bar(s, 0, 16 + 12, 2, 0);
    s = s.u8(5).u8(0).u32(PBA_OFFSET).u8(3).u64(0);
    // Function 1: table in BAR 2.
    s = bar(s, 3, 0x8000, 3, 0xfee0_0000);
    s = bar(s, 3, 0x800c, 2, 0);
    s = s.u8(6).u8(1).u16(0);
    let msix = s;
    let mut p = Seed::new().u8(0).u8(0);
    p = p.u8(2).u8(0).u8(2).u32(0x8000_0800); // 00:01.0 reg 0
    p = p.u8(3).u8(4).u8(2).u32(0);
    p = p.u8(2).u8(0).u8(2).u32(0x8000_0904); // 00:01.1 command
    p = p.u8(2).u8(4).u8(1).u32(0x6);
    p = p.u8(3).u8(6).u8(1).u32(0);
    vec![
        ("enumerate", enum_only.build()),
        ("msix", msix.build()),
        ("port_cf8", p.build()),
    ]
}
