//! SR-IOV from the outside, as another VMM embeds it: a virtio PF on a `PciRoot`
//! with a `VirtioVfFactory`, no ferrio VMM. The guest's PCI core is played through
//! ECAM: VF Enable brings the VFs with their BARs, their config space looks like a
//! VF's, VF Disable takes them away; and a malicious guest throws random config
//! writes at the PF's capability and the VFs' config space while VFs come and go.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{RecordingVectors, Rng};
use ferrio_devices::virtio::{ActivateError, Activation, VirtioDevice};
use ferrio_pci::sriov::{reg, CONTROL_VF_ENABLE, CONTROL_VF_MSE};
use ferrio_pci::virtio_pci::{
    MsiAllocator, SriovRole, VfFunction, VirtioPciDevice, VirtioVf, VirtioVfFactory,
    VIRTIO_F_SR_IOV,
};
use ferrio_pci::{BarMapping, ConfigChange, MsiVectors, PciAddress, PciRoot, SharedPciDevice};
use vm_memory::{GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap;

/// A virtio device with one queue that does nothing (type 1, net).
struct Idle;

impl VirtioDevice<Mem> for Idle {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[64, 64]
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn set_acked_features(&mut self, _: u64) {}
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(&mut self, _: Activation<Mem>) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
}

const SRIOV: u16 = 0x100;
const VF_BAR: u64 = 0x40_0000_0000;
const VFS: u16 = 3;

struct Setup {
    root: PciRoot,
    pf: PciAddress,
    /// Live MSI-X vector sets handed to VFs (dropped when a VF function goes away).
    live_vectors: Arc<AtomicUsize>,
}

/// Counts the vector sets alive.
struct Counted(Arc<RecordingVectors>, Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MsiVectors for Counted {
    fn count(&self) -> u16 {
        self.0.count()
    }
    fn set_message(&self, v: u16, m: ferrio_pci::MsiMessage) -> std::io::Result<()> {
        self.0.set_message(v, m)
    }
    fn commit(&self) -> std::io::Result<()> {
        self.0.commit()
    }
    fn fire(&self, v: u16) -> std::io::Result<()> {
        self.0.fire(v)
    }
    fn eventfd(&self, _: u16) -> Option<&vmm_sys_util::eventfd::EventFd> {
        None
    }
}

fn setup() -> Setup {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let pf = VirtioPciDevice::with_role(
        Box::new(Idle),
        mem.clone(),
        RecordingVectors::new(3),
        false,
        SriovRole::Pf { total_vfs: VFS },
    )
    .unwrap();
    let vfs: Vec<Box<dyn VfFunction>> = (0..VFS)
        .map(|_| Box::new(VirtioVf::new(Box::new(Idle), mem.clone(), None)) as Box<dyn VfFunction>)
        .collect();
    let live = Arc::new(AtomicUsize::new(0));
    let counter = live.clone();
    let msi: MsiAllocator = Box::new(move |_, n| {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(Counted(RecordingVectors::new(n), counter.clone())) as Arc<dyn MsiVectors>)
    });
    let pf: SharedPciDevice = Arc::new(Mutex::new(pf));
    pf.lock().unwrap().set_vf_bar_address(0, VF_BAR);
    let mut root = PciRoot::new();
    let address = root
        .add_sriov_pf(Some(4), pf, Box::new(VirtioVfFactory::new(vfs, msi)))
        .unwrap();
    Setup {
        root,
        pf: address,
        live_vectors: live,
    }
}

fn ecam(a: PciAddress, reg: u16) -> u64 {
    u64::from(a.devfn()) << 12 | u64::from(reg)
}

fn read32(root: &PciRoot, a: PciAddress, reg: u16) -> u32 {
    let mut b = [0u8; 4];
    root.ecam_read(ecam(a, reg), &mut b);
    u32::from_le_bytes(b)
}

fn write16(root: &mut PciRoot, a: PciAddress, reg: u16, v: u16) -> Vec<ConfigChange> {
    root.ecam_write(ecam(a, reg), &v.to_le_bytes())
}

fn vf(pf: PciAddress, i: u8) -> PciAddress {
    PciAddress::new(pf.device, 1 + i)
}

#[test]
fn embedding_enable_use_disable() {
    let mut s = setup();
    let pf = s.pf;
    assert_eq!(pf, PciAddress::new(4, 0));
    // The PF: virtio-net with the SR-IOV capability and VIRTIO_F_SR_IOV offered.
    assert_eq!(read32(&s.root, pf, 0), 0x1041_1af4);
    assert_eq!(read32(&s.root, pf, SRIOV) & 0xffff, 0x10);
    assert_eq!(read32(&s.root, pf, SRIOV + reg::TOTAL_VFS - 2) >> 16, 3);
    assert_eq!(
        read32(&s.root, pf, SRIOV + reg::VF_DEVICE_ID - 2) >> 16,
        0x1041
    );
    let offered_hi = {
        let pf_dev = s.root.device(pf).unwrap();
        let mut d = pf_dev.lock().unwrap();
        d.write_bar(0, 0, &1u32.to_le_bytes()); // device_feature_select = 1
        let mut b = [0u8; 4];
        d.read_bar(0, 4, &mut b);
        u32::from_le_bytes(b)
    };
    assert_ne!(u64::from(offered_hi) << 32 & VIRTIO_F_SR_IOV, 0);
    // The VFs' devfns are kept: no plain device may take slot 4's functions.
    assert!(s
        .root
        .add_function(vf(pf, 0), s.root.device(pf).unwrap())
        .is_err());
    assert_eq!(
        read32(&s.root, vf(pf, 0), 0),
        u32::MAX,
        "no VF before VF Enable"
    );

    assert!(write16(&mut s.root, pf, SRIOV + reg::NUM_VFS, 2).is_empty());
    let changes = write16(
        &mut s.root,
        pf,
        SRIOV + reg::CONTROL,
        CONTROL_VF_ENABLE | CONTROL_VF_MSE,
    );
    let kinds: Vec<String> = changes.iter().map(|c| format!("{c:?}")).collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    assert!(matches!(changes[0], ConfigChange::VfAdded(a, _) if a == vf(pf, 0)));
    assert!(matches!(changes[1], ConfigChange::VfAdded(a, _) if a == vf(pf, 1)));
    let bars: Vec<(PciAddress, BarMapping)> =
        changes.iter().filter_map(ConfigChange::as_bar).collect();
    assert_eq!(bars[0].0, vf(pf, 0));
    assert_eq!((bars[0].1.old, bars[0].1.new), (None, Some(VF_BAR)));
    assert_eq!(
        (bars[1].1.old, bars[1].1.new),
        (None, Some(VF_BAR + 0x1_0000))
    );
    assert_eq!(s.live_vectors.load(Ordering::SeqCst), 2);
    drop(changes);

    // A VF's config space: IDs and BARs read as a VF's do, MSI-X and PCIe are there.
    let v0 = vf(pf, 0);
    assert_eq!(read32(&s.root, v0, 0), u32::MAX);
    assert_eq!(
        read32(&s.root, v0, 0x08) >> 8,
        0x02_00_00,
        "class of the PF"
    );
    assert_eq!(read32(&s.root, v0, 0x10), 0);
    s.root.ecam_write(ecam(v0, 0x10), &u32::MAX.to_le_bytes());
    assert_eq!(
        read32(&s.root, v0, 0x10),
        0,
        "VF BAR registers are read-only 0"
    );
    assert!(write16(&mut s.root, v0, 0x04, 0xffff).is_empty());
    assert_eq!(read32(&s.root, v0, 0x04) & 0xffff, 0x4, "only bus master");
    let caps = {
        let dev = s.root.device(v0).unwrap();
        let mut d = dev.lock().unwrap();
        let mut b = [0u8; 1];
        d.read_config(0x34, &mut b);
        b[0]
    };
    assert_ne!(caps, 0, "capability list present");

    // Moving VF BAR 0 moves both VFs; clearing VF MSE unmaps them.
    let m = s
        .root
        .ecam_write(ecam(pf, SRIOV + reg::VF_BAR0 + 4), &0x41u32.to_le_bytes());
    let m: Vec<_> = m.iter().filter_map(ConfigChange::as_bar).collect();
    assert_eq!(m.len(), 2);
    assert_eq!(m[1].1.new, Some(0x41_0000_0000 + 0x1_0000));
    let m = write16(&mut s.root, pf, SRIOV + reg::CONTROL, CONTROL_VF_ENABLE);
    assert!(m
        .iter()
        .all(|c| c.as_bar().is_some_and(|(_, b)| b.new.is_none())));
    assert_eq!(m.len(), 2);
    // NumVFs is frozen while enabled.
    assert!(write16(&mut s.root, pf, SRIOV + reg::NUM_VFS, 3).is_empty());
    assert_eq!(read32(&s.root, pf, SRIOV + reg::NUM_VFS) & 0xffff, 2);

    // VF Disable: VFs leave, last first, and are off the bus.
    let changes = write16(&mut s.root, pf, SRIOV + reg::CONTROL, 0);
    let removed: Vec<PciAddress> = changes
        .iter()
        .filter_map(|c| match c {
            ConfigChange::VfRemoved(a, d) => {
                d.lock().unwrap().quiesce();
                Some(*a)
            }
            _ => None,
        })
        .collect();
    assert_eq!(removed, [vf(pf, 1), vf(pf, 0)]);
    drop(changes);
    assert_eq!(read32(&s.root, v0, 0), u32::MAX);
    assert_eq!(
        s.live_vectors.load(Ordering::SeqCst),
        0,
        "VF vectors released"
    );
}

#[test]
fn malicious_guest_on_pf_capability_and_vf_config() {
    let mut s = setup();
    let pf = s.pf;
    s.root
        .ecam_write(ecam(pf, SRIOV + reg::NUM_VFS), &VFS.to_le_bytes());
    let mut rng = Rng::new(0x5121_0f00_0bad_cafe);
    let mut present: Vec<PciAddress> = Vec::new();
    let mut mapped = std::collections::HashMap::new();
    for step in 0..40_000u32 {
        let (target, reg) = match rng.below(4) {
            0 => (pf, SRIOV + rng.below(0x40) as u16),
            1 => (pf, SRIOV + reg::CONTROL),
            _ => (
                vf(pf, rng.below(u64::from(VFS) + 1) as u8),
                rng.below(0x1000) as u16,
            ),
        };
        let len = [1usize, 2, 4][rng.below(3) as usize];
        let reg = reg & !(len as u16 - 1);
        let value = rng.next().to_le_bytes();
        for c in s.root.ecam_write(ecam(target, reg), &value[..len]) {
            match c {
                ConfigChange::VfAdded(a, _) => {
                    assert!(!present.contains(&a), "{a} added twice at step {step}");
                    present.push(a);
                }
                ConfigChange::VfRemoved(a, d) => {
                    assert!(present.contains(&a), "{a} removed while absent");
                    present.retain(|p| *p != a);
                    assert!(
                        mapped.get(&a).is_none_or(Option::is_none),
                        "{a} removed with a BAR still mapped"
                    );
                    mapped.remove(&a);
                    d.lock().unwrap().quiesce();
                }
                ConfigChange::Bar(a, m) => {
                    let cur = mapped.entry(a).or_insert(None);
                    assert_eq!(*cur, m.old, "BAR report of {a} does not chain at {step}");
                    *cur = m.new;
                }
            }
        }
        let enabled = {
            let dev = s.root.device(pf).unwrap();
            let st = dev.lock().unwrap().sriov().unwrap();
            st.enabled_vfs
        };
        assert_eq!(present.len(), usize::from(enabled), "step {step}");
        assert!(enabled <= VFS);
        assert_eq!(s.live_vectors.load(Ordering::SeqCst), present.len());
        if rng.below(500) == 0 {
            for c in write16(&mut s.root, pf, SRIOV + reg::CONTROL, 0) {
                if let ConfigChange::VfRemoved(a, d) = c {
                    present.retain(|p| *p != a);
                    mapped.remove(&a);
                    d.lock().unwrap().quiesce();
                }
            }
        }
    }
    // The PF's identity and the read-only capability fields survived.
    assert_eq!(read32(&s.root, pf, 0), 0x1041_1af4);
    assert_eq!(
        read32(&s.root, pf, SRIOV + reg::TOTAL_VFS - 2) >> 16,
        u32::from(VFS)
    );
    assert_eq!(
        read32(&s.root, pf, SRIOV + reg::FIRST_VF_OFFSET),
        0x0001_0001
    );
}
