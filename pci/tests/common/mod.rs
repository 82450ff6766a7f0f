//! Shared test fixtures: a recording `MsiVectors`, a test function with BARs, a PCIe
//! capability, MSI-X and an extended capability, and a seeded xorshift generator.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use ferrio_pci::capability::PciePortType;
use ferrio_pci::config::{ConfigSpace, PciIds};
use ferrio_pci::msix::{Msix, MsixConfig};
use ferrio_pci::{BarInfo, BarKind, BarMapping, MsiMessage, MsiVectors, PciDevice};
use vmm_sys_util::eventfd::EventFd;

/// One call made on the host side of the vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Set(u16, MsiMessage),
    Commit,
    Fire(u16),
}

/// An `MsiVectors` that records every call.
pub struct RecordingVectors {
    count: u16,
    calls: Mutex<Vec<Call>>,
}

impl RecordingVectors {
    pub fn new(count: u16) -> Arc<Self> {
        Arc::new(RecordingVectors {
            count,
            calls: Mutex::new(Vec::new()),
        })
    }

    /// The calls since the last `take`.
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    /// How many times `vector` fired since the last `take` (without taking).
    pub fn fires(&self, vector: u16) -> usize {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|c| **c == Call::Fire(vector)).count()
    }

    fn push(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }
}

impl MsiVectors for RecordingVectors {
    fn count(&self) -> u16 {
        self.count
    }
    fn set_message(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()> {
        self.push(Call::Set(vector, msg));
        Ok(())
    }
    fn commit(&self) -> std::io::Result<()> {
        self.push(Call::Commit);
        Ok(())
    }
    fn fire(&self, vector: u16) -> std::io::Result<()> {
        self.push(Call::Fire(vector));
        Ok(())
    }
    fn eventfd(&self, _vector: u16) -> Option<&EventFd> {
        None
    }
}

pub const VENDOR: u16 = 0x1af4;
pub const DEVICE: u16 = 0x10f0;
pub const CLASS: u32 = 0xff_00_00;
/// BAR 0: 32-bit, 16 KiB, MSI-X table at 0, PBA at 0x2000.
pub const BAR0_SIZE: u64 = 0x4000;
pub const PBA_OFFSET: u32 = 0x2000;
/// BAR 2: 64-bit prefetchable, 1 MiB.
pub const BAR2_SIZE: u64 = 0x10_0000;

/// A function like the virtio transport builds: two BARs, PCIe capability, MSI-X,
/// one extended capability.
pub struct TestDevice {
    pub cfg: ConfigSpace,
    pub msix: Msix,
    pub pcie_cap: u8,
    pub ext_cap: u16,
}

impl TestDevice {
    pub fn new(vectors: Arc<RecordingVectors>, n: u16) -> Self {
        let mut cfg = ConfigSpace::new(&PciIds {
            vendor: VENDOR,
            device: DEVICE,
            class: CLASS,
            revision: 3,
            subsystem_vendor: VENDOR,
            subsystem_device: 0x1100,
        });
        cfg.add_bar(BarInfo {
            index: 0,
            kind: BarKind::Mmio32,
            size: BAR0_SIZE,
        })
        .unwrap();
        cfg.add_bar(BarInfo {
            index: 2,
            kind: BarKind::Mmio64 { prefetchable: true },
            size: BAR2_SIZE,
        })
        .unwrap();
        let pcie_cap = cfg.add_pcie_capability(PciePortType::Endpoint).unwrap();
        let msix = Msix::new(
            &mut cfg,
            MsixConfig {
                vectors: n,
                table_bar: 0,
                table_offset: 0,
                pba_bar: 0,
                pba_offset: PBA_OFFSET,
            },
            vectors,
        )
        .unwrap();
        // A vendor-specific extended capability with one writable byte.
        let ext_cap = cfg
            .add_extended_capability(0x000b, 1, &[0x12, 0x34, 0x56, 0x78], &[0, 0xff])
            .unwrap();
        TestDevice {
            cfg,
            msix,
            pcie_cap,
            ext_cap,
        }
    }

    pub fn shared(vectors: Arc<RecordingVectors>, n: u16) -> Arc<Mutex<TestDevice>> {
        Arc::new(Mutex::new(Self::new(vectors, n)))
    }
}

impl PciDevice for TestDevice {
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

/// xorshift64*: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}
