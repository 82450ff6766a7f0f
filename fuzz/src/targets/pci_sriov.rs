//! `pci_sriov`: the SR-IOV capability of a virtio PF on a `PciRoot` with a
//! `VirtioVfFactory` (`ferrio_pci::sriov` and `virtio_pci::sriov`): NumVFs and VF Enable
//! / VF MSE through ECAM, VF BAR sizing and placement, VFs coming and going with their
//! config space (a VF's header) and their MSI-X vectors, VF creation failures, and the
//! VFs' BAR 0 (common config, MSI-X) while decoded.
//!
//! Input: `u8` TotalVFs (1..=16), `u16` VF indexes whose MSI-X allocation fails, `u8`
//! flags (bit 0: firmware placed the VF BAR), then ops: 0 write in the SR-IOV
//! capability, 1 write the control register, 2/3 config write/read of the PF or a VF
//! (`u8` function, `u16` register, `u8` size, `u32` value), 4/5 BAR 0 write/read of the
//! PF or a VF while decoded (`u8` function, `u16` offset, `u8` size, `u64` value).
//!
//! Oracle: VFs are added once and removed only when present, with their BARs unmapped
//! first; the BAR reports chain; after every access the VFs present, their decoded
//! BARs and their live MSI-X vector sets are exactly what the capability says (minus
//! the VFs whose creation failed).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ferrio_pci::sriov::{reg, SriovState, CONTROL_VF_ENABLE, CONTROL_VF_MSE};
use ferrio_pci::virtio_pci::{
    MsiAllocator, SriovRole, VfFunction, VirtioPciDevice, VirtioVf, VirtioVfFactory,
};
use ferrio_pci::{ConfigChange, MsiVectors, PciAddress, PciRoot, SharedPciDevice};
use vm_memory::GuestAddress;

use crate::guest::Mem;
use crate::input::{Input, Seed};
use crate::pci_common::{access_len, BarTracker, Probe, Vectors};

const MAX_OPS: usize = 96;
const SLOT: u8 = 4;
const VF_BAR: u64 = 0x40_0000_0000;

fn probe() -> Probe {
    Probe {
        device_type: 1,
        queue_max_sizes: vec![64, 64],
        features: 1 << 32,
        config: vec![0; 12],
        state: Arc::default(),
    }
}

/// Offset of the SR-IOV extended capability (walked from 0x100).
fn sriov_offset(cfg: &ferrio_pci::ConfigSpace) -> u16 {
    let mut at = 0x100u16;
    loop {
        let header = cfg.read_u32(at);
        if header & 0xffff == 0x10 {
            return at;
        }
        let next = (header >> 20) as u16;
        assert!(next > at, "no SR-IOV capability");
        at = next;
    }
}

struct Rig {
    root: PciRoot,
    pf: PciAddress,
    sriov: u16,
    total: u16,
    failing: u16,
    live: Arc<AtomicUsize>,
    present: Vec<PciAddress>,
    bars: BarTracker,
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let total = u16::from(inp.u8() % 16) + 1;
    let failing = inp.u16();
    let placed = inp.u8() & 1 != 0;
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
    let Ok(pf) = VirtioPciDevice::with_role(
        Box::new(probe()),
        mem.clone(),
        Vectors::new(3),
        false,
        SriovRole::Pf { total_vfs: total },
    ) else {
        return;
    };
    let sriov = sriov_offset(pf.config_space());
    let vfs: Vec<Box<dyn VfFunction>> = (0..total)
        .map(|_| Box::new(VirtioVf::new(Box::new(probe()), mem.clone(), None)) as _)
        .collect();
    let live = Arc::new(AtomicUsize::new(0));
    let counter = live.clone();
    let pf_devfn = SLOT << 3;
    let msi: MsiAllocator = Box::new(move |address: PciAddress, n| {
        let index = address.devfn() - pf_devfn - 1;
        if index < 16 && failing & (1 << index) != 0 {
            return Err(std::io::Error::other("no GSI left"));
        }
        Ok(Vectors::counted(n, &counter) as Arc<dyn MsiVectors>)
    });
    let pf: SharedPciDevice = Arc::new(Mutex::new(pf));
    if placed {
        pf.lock().unwrap().set_vf_bar_address(0, VF_BAR);
    }
    let mut root = PciRoot::new();
    let pf_address = root
        .add_sriov_pf(Some(SLOT), pf, Box::new(VirtioVfFactory::new(vfs, msi)))
        .expect("room for the PF and its VFs");
    let mut rig = Rig {
        root,
        pf: pf_address,
        sriov,
        total,
        failing,
        live,
        present: Vec::new(),
        bars: BarTracker::default(),
    };
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 6 {
            0 => {
                let len = access_len(inp.u8()).min(4);
                let r = (rig.sriov + u16::from(inp.u8() % 0x40)) & !(len as u16 - 1);
                let value = inp.u32().to_le_bytes();
                rig.write(rig.pf, r, &value[..len]);
            }
            1 => {
                let value = inp.u16().to_le_bytes();
                rig.write(rig.pf, rig.sriov + reg::CONTROL, &value);
            }
            op @ (2 | 3) => {
                let f = rig.function(inp.u8());
                let len = access_len(inp.u8()).min(4);
                let r = (inp.u16() % 0x1000) & !(len as u16 - 1);
                let value = inp.u32().to_le_bytes();
                if op == 2 {
                    rig.write(f, r, &value[..len]);
                } else {
                    let mut out = [0u8; 4];
                    let at = u64::from(f.devfn()) << 12 | u64::from(r);
                    rig.root.ecam_read(at, &mut out[..len]);
                }
            }
            op => {
                let f = rig.function(inp.u8());
                let offset = u64::from(inp.u16());
                let len = access_len(inp.u8());
                let value = inp.u64().to_le_bytes();
                let dev = rig.root.device(f);
                if let (Some(dev), true) = (dev, rig.bars.mapped.contains_key(&(f, 0))) {
                    let mut d = dev.lock().unwrap();
                    if op == 4 {
                        d.write_bar(0, offset, &value[..len]);
                    } else {
                        let mut out = [0u8; 8];
                        d.read_bar(0, offset, &mut out[..len]);
                    }
                }
            }
        }
        rig.check();
    }
}

impl Rig {
    /// The PF (0) or VF `n - 1`, or the function right after the last VF.
    fn function(&self, n: u8) -> PciAddress {
        let devfn = self.pf.devfn() + n % (self.total as u8 + 2);
        PciAddress::new(devfn >> 3, devfn & 7)
    }

    fn write(&mut self, f: PciAddress, r: u16, value: &[u8]) {
        let at = u64::from(f.devfn()) << 12 | u64::from(r);
        let changes = self.root.ecam_write(at, value);
        crate::note!("sriov: write {f} {r:#x} {value:?}: {changes:?}");
        for c in changes {
            match c {
                ConfigChange::Bar(a, m) => self.bars.apply(a, &m),
                ConfigChange::VfAdded(a, _) => {
                    assert!(!self.present.contains(&a), "{a} added twice");
                    self.present.push(a);
                }
                ConfigChange::VfRemoved(a, d) => {
                    assert!(self.present.contains(&a), "{a} removed while absent");
                    assert!(!self.bars.any_mapped(a), "{a} removed with a BAR mapped");
                    self.present.retain(|p| *p != a);
                    self.bars.forget(a);
                    d.lock().unwrap().quiesce();
                }
            }
        }
    }

    fn state(&self) -> SriovState {
        let pf = self.root.device(self.pf).expect("the PF");
        let st = pf.lock().unwrap().sriov().expect("a PF");
        st
    }

    fn check(&self) {
        let st = self.state();
        assert!(
            st.enabled_vfs <= self.total,
            "{} VFs of {}",
            st.enabled_vfs,
            self.total
        );
        for index in 0..self.total {
            let a = SriovState::vf_address(self.pf, index).expect("VF fits");
            let failed = index < 16 && self.failing & (1 << index) != 0;
            let want = index < st.enabled_vfs && !failed;
            assert_eq!(self.present.contains(&a), want, "VF {index} presence");
            assert_eq!(self.root.device(a).is_some(), want, "VF {index} on the bus");
            let mapped = self.bars.mapped.get(&(a, 0)).copied();
            let expected = if want { st.vf_bar(index, 0) } else { None };
            assert_eq!(mapped, expected, "VF {index} BAR 0 ({st:?})");
        }
        assert_eq!(
            self.live.load(Ordering::SeqCst),
            self.present.len(),
            "live MSI-X sets"
        );
        let mut id = [0u8; 4];
        self.root
            .ecam_read(u64::from(self.pf.devfn()) << 12, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1041_1af4, "PF identity");
    }
}

/// Seeds: enumeration of the PF, NumVFs, VF BAR placement, VF Enable + MSE, a VF's
/// config space and common config, VF Disable; with a failing VF; re-enable.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
    let pf = VirtioPciDevice::with_role(
        Box::new(probe()),
        mem,
        Vectors::new(3),
        false,
        SriovRole::Pf { total_vfs: 3 },
    )
    .expect("PF");
    let sriov = sriov_offset(pf.config_space());
    let cap_write = |s: Seed, r: u16, len_code: u8, v: u32| s.u8(0).u8(len_code).u8(r as u8).u32(v);
    let control = |s: Seed, v: u16| s.u8(1).u16(v);
    let cfg_write =
        |s: Seed, f: u8, r: u16, len_code: u8, v: u32| s.u8(2).u8(f).u8(len_code).u16(r).u32(v);
    let cfg_read = |s: Seed, f: u8, r: u16| s.u8(3).u8(f).u8(2).u16(r).u32(0);
    let mut s = Seed::new().u8(2).u16(0).u8(0);
    s = cfg_read(s, 0, sriov);
    s = cap_write(s, reg::NUM_VFS, 1, 3);
    s = cap_write(s, reg::VF_BAR0, 2, u32::MAX);
    s = cap_write(s, reg::VF_BAR0, 2, 0);
    s = cap_write(s, reg::VF_BAR0 + 4, 2, 0x40);
    s = control(s, CONTROL_VF_ENABLE | CONTROL_VF_MSE);
    s = cfg_read(s, 1, 0);
    s = cfg_read(s, 2, 0x34);
    s = cfg_write(s, 1, 0x04, 1, 0xffff);
    // VF 0's common config: device_feature_select = 1, read device_feature.
    s = s.u8(4).u8(1).u16(0).u8(2).u64(1);
    s = s.u8(5).u8(1).u16(4).u8(2).u64(0);
    s = cap_write(s, reg::NUM_VFS, 1, 1);
    s = control(s, CONTROL_VF_ENABLE);
    s = control(s, 0);
    let cycle = s.clone().u8(1).u16(CONTROL_VF_ENABLE | CONTROL_VF_MSE);
    let failing = {
        let mut b = s.0.clone();
        b[1] = 0b10; // VF 1's vectors cannot be allocated
        Seed(b)
    };
    vec![
        ("enable_use_disable", s.build()),
        ("re_enable", cycle.build()),
        ("failing_vf", failing.build()),
    ]
}
