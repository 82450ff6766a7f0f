//! The VF life cycle against real KVM, without a guest: a virtio-blk SR-IOV PF with two
//! VFs is built and attached to the buses as `ferrio run` does, then this test plays
//! the guest's PCI core and virtio driver through ECAM and the VF BARs: VF Enable,
//! bus master, virtio initialisation up to DRIVER_OK (one worker thread per VF), and
//! VF Disable. After 100 such cycles the process must have the threads and file
//! descriptors it had before the first (irqfds, ioeventfds, notify eventfds, workers
//! and GSI routes are all released on VF Disable). Alone in its test binary, so no
//! other test's threads or fds disturb the counts.

use std::path::Path;
use std::sync::Arc;

use ferrio_devices::Bus;
use ferrio_pci::sriov::{reg, CONTROL_VF_ENABLE, CONTROL_VF_MSE, EXT_CAP_ID_SRIOV};
use ferrio_pci::virtio_pci::common_cfg::offset as cc;
use ferrio_vmm::config::parse_disk;
use ferrio_vmm::interrupts::GsiRouting;
use ferrio_vmm::layout::pci_segments;
use ferrio_vmm::memory;
use ferrio_vmm::pci::placement::Placement;
use ferrio_vmm::pci::{disk, PciBuilder};
use kvm_ioctls::Kvm;

const MEM: u64 = 256 << 20;
const CYCLES: usize = 100;
const VFS: u16 = 2;
/// Where the "driver" puts each VF's queue 0 (descriptors, avail, used), 64 KiB apart.
const RING_BASE: u64 = 0x10_0000;

struct Machine {
    mmio: Arc<Bus>,
    ecam: u64,
    pf_devfn: u64,
}

impl Machine {
    fn cfg_addr(&self, devfn: u64, reg: u64) -> u64 {
        self.ecam + (devfn << 12) + reg
    }
    fn cfg_write(&self, devfn: u64, reg: u64, data: &[u8]) {
        assert!(self.mmio.write(self.cfg_addr(devfn, reg), data));
    }
    fn cfg_read32(&self, devfn: u64, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.mmio.read(self.cfg_addr(devfn, reg), &mut b));
        u32::from_le_bytes(b)
    }
    fn write(&self, addr: u64, data: &[u8]) {
        assert!(self.mmio.write(addr, data), "nothing at {addr:#x}");
    }
    fn read8(&self, addr: u64) -> u8 {
        let mut b = [0u8; 1];
        assert!(self.mmio.read(addr, &mut b), "nothing at {addr:#x}");
        b[0]
    }
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).expect(dir).count()
}

fn image(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path.display().to_string()
}

/// VF Enable with NumVFs = `VFS` and VF MSE: both VFs appear at PF devfn + 1 and + 2.
fn enable(m: &Machine, sriov: u64) {
    m.cfg_write(
        m.pf_devfn,
        sriov + u64::from(reg::NUM_VFS),
        &VFS.to_le_bytes(),
    );
    let ctrl = CONTROL_VF_ENABLE | CONTROL_VF_MSE;
    m.cfg_write(
        m.pf_devfn,
        sriov + u64::from(reg::CONTROL),
        &ctrl.to_le_bytes(),
    );
}

/// What Linux's virtio_pci_modern + a driver do for one VF up to DRIVER_OK, with queue 0.
fn drive_vf(m: &Machine, devfn: u64, bar: u64, index: u64) {
    // Vendor/device read 0xffff on a VF.
    assert_eq!(m.cfg_read32(devfn, 0), 0xffff_ffff);
    m.cfg_write(devfn, 0x04, &4u16.to_le_bytes()); // bus master
    let status = |s: u8| m.write(bar + cc::DEVICE_STATUS, &[s]);
    status(0);
    status(1 | 2);
    m.write(bar + cc::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
    m.write(bar + cc::DRIVER_FEATURE, &1u32.to_le_bytes()); // VERSION_1
    status(1 | 2 | 8);
    assert_eq!(m.read8(bar + cc::DEVICE_STATUS) & 8, 8, "FEATURES_OK kept");
    let ring = RING_BASE + index * 0x1_0000;
    m.write(bar + cc::QUEUE_SELECT, &0u16.to_le_bytes());
    m.write(bar + cc::QUEUE_SIZE, &16u16.to_le_bytes());
    for (reg, addr) in [
        (cc::QUEUE_DESC, ring),
        (cc::QUEUE_DRIVER, ring + 0x1000),
        (cc::QUEUE_DEVICE, ring + 0x2000),
    ] {
        m.write(bar + reg, &(addr as u32).to_le_bytes());
        m.write(bar + reg + 4, &((addr >> 32) as u32).to_le_bytes());
    }
    m.write(bar + cc::QUEUE_ENABLE, &1u16.to_le_bytes());
    status(1 | 2 | 4 | 8);
    assert_eq!(m.read8(bar + cc::DEVICE_STATUS), 1 | 2 | 4 | 8, "DRIVER_OK");
}

#[test]
fn hundred_vf_enable_disable_cycles_leak_nothing() {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("skipped: /dev/kvm is not usable here ({e})");
            return;
        }
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let routing = GsiRouting::new(vm.clone()).unwrap();
    let mem = memory::create_guest_memory(MEM).unwrap();
    let segments = pci_segments(1, memory::ram_end(MEM));
    let dir = tempfile::tempdir().unwrap();
    let spec = |name: &str, extra: &str| format!("path={},{extra}", image(dir.path(), name));
    let pf = disk::create(&parse_disk(&spec("pf.img", "id=d0")).unwrap()).unwrap();
    let vfs = ["vf0.img", "vf1.img"].map(|n| {
        (
            disk::create(&parse_disk(&spec(n, "vf_of=d0")).unwrap()).unwrap(),
            false,
        )
    });
    let mut pci = PciBuilder::new(routing.clone(), &segments).unwrap();
    let mut place = Placement::new(&mut pci, mem.clone(), false);
    let (pf_address, vf_addresses) = place.add_pf((pf, false), vfs.into(), None).unwrap();
    assert!(place.finish().unwrap().is_none());
    assert_eq!(vf_addresses.len(), usize::from(VFS));
    let mmio = Arc::new(Bus::new());
    let pio = Bus::new();
    pci.attach(vm.clone(), &mmio, &pio, 8).unwrap();
    let m = Machine {
        mmio,
        ecam: segments[0].ecam().start,
        pf_devfn: u64::from(pf_address.devfn()),
    };
    // The SR-IOV capability is the PF's first extended capability.
    let sriov = 0x100u64;
    assert_eq!(
        m.cfg_read32(m.pf_devfn, sriov) & 0xffff,
        u32::from(EXT_CAP_ID_SRIOV)
    );
    let vf_bar0 = u64::from(m.cfg_read32(m.pf_devfn, sriov + u64::from(reg::VF_BAR0)) & !0xf)
        | u64::from(m.cfg_read32(m.pf_devfn, sriov + u64::from(reg::VF_BAR0) + 4)) << 32;
    assert_ne!(vf_bar0, 0, "VF BAR 0 placed at boot");

    let (threads, fds) = (count("/proc/self/task"), count("/proc/self/fd"));
    for cycle in 0..CYCLES {
        enable(&m, sriov);
        for (i, vf) in (0u64..).zip(&vf_addresses) {
            drive_vf(&m, u64::from(vf.devfn()), vf_bar0 + i * 0x1_0000, i);
        }
        if cycle == 0 {
            // One worker per VF queue is running now.
            assert_eq!(count("/proc/self/task"), threads + usize::from(VFS));
        }
        m.cfg_write(
            m.pf_devfn,
            sriov + u64::from(reg::CONTROL),
            &0u16.to_le_bytes(),
        );
        // VFs are gone: config reads all-ones, their BARs are off the bus.
        for vf in &vf_addresses {
            assert_eq!(m.cfg_read32(u64::from(vf.devfn()), 0), 0xffff_ffff);
        }
        let mut b = [0u8; 1];
        assert!(!m.mmio.read(vf_bar0, &mut b), "VF 0's BAR still mapped");
        m.cfg_write(
            m.pf_devfn,
            sriov + u64::from(reg::NUM_VFS),
            &0u16.to_le_bytes(),
        );
    }
    assert_eq!(
        count("/proc/self/task"),
        threads,
        "threads after {CYCLES} cycles"
    );
    assert_eq!(count("/proc/self/fd"), fds, "fds after {CYCLES} cycles");
}
