//! A passed-through function on the root complex, driven the way a guest and a VMM
//! do it, over a minimal fake VFIO device (no VMM, no KVM, no host device).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use ferrio_pci::vfio::{
    IrqInfo, MmapArea, RegionInfo, VfioOps, VfioOptions, VfioPciDevice, CONFIG_REGION, MSIX_IRQ,
    REGION_MMAP, REGION_READ, REGION_WRITE,
};
use ferrio_pci::{
    BarMapping, ConfigChange, MsiMessage, MsiVectors, PciAddress, PciDevice, PciRoot,
    SharedPciDevice,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A PCIe function: BAR 0 (64-bit, 16 KiB, mmap-able) with a 4-vector MSI-X table at
/// 0x2000 and its PBA at 0x3000; MSI-X -> PCIe capabilities; SR-IOV then AER.
struct Fake {
    config: Mutex<Vec<u8>>,
    triggers: Mutex<HashMap<u32, Option<RawFd>>>,
    calls: Mutex<Vec<String>>,
}

impl Fake {
    fn new() -> Arc<Self> {
        let mut c = vec![0u8; 4096];
        let mut put = |off: usize, b: &[u8]| c[off..off + b.len()].copy_from_slice(b);
        put(0, &[0xe4, 0x14, 0x50, 0x16]);
        put(0x0a, &[0x00, 0x02]);
        put(0x10, &0x4u32.to_le_bytes());
        put(0x34, &[0x40]);
        put(0x40, &[0x11, 0x50, 0x03, 0x00]);
        put(0x44, &0x2000u32.to_le_bytes());
        put(0x48, &0x3000u32.to_le_bytes());
        put(0x50, &[0x10, 0x00, 0x02, 0x00]);
        put(0x100, &(0x10u32 | 1 << 16 | 0x140 << 20).to_le_bytes());
        put(0x140, &(0x01u32 | 2 << 16).to_le_bytes());
        Arc::new(Fake {
            config: Mutex::new(c),
            triggers: Mutex::new(HashMap::new()),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn log(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
}

impl VfioOps for Fake {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        let rw = REGION_READ | REGION_WRITE;
        match index {
            0 => Some(RegionInfo {
                index,
                size: 0x4000,
                flags: rw | REGION_MMAP,
                mmap_areas: vec![(0, 0x4000)],
            }),
            CONFIG_REGION => Some(RegionInfo {
                index,
                size: 0x1000,
                flags: rw,
                mmap_areas: vec![],
            }),
            _ => None,
        }
    }
    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        let o = offset as usize;
        if index == CONFIG_REGION {
            data.copy_from_slice(&self.config.lock().unwrap()[o..o + data.len()]);
        } else {
            data.fill(0);
        }
    }
    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        self.log(format!("write {index} {offset:#x} {data:?}"));
        if index == CONFIG_REGION {
            let o = offset as usize;
            self.config.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        }
    }
    fn irq(&self, index: u32) -> Option<IrqInfo> {
        (index == MSIX_IRQ).then_some(IrqInfo {
            index,
            count: 4,
            flags: 0,
        })
    }
    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<RawFd>]) -> io::Result<()> {
        self.log(format!("set_irqs {index} {start} {}", fds.len()));
        let mut t = self.triggers.lock().unwrap();
        for (i, fd) in fds.iter().enumerate() {
            t.insert(start + i as u32, *fd);
        }
        Ok(())
    }
    fn disable_irq(&self, index: u32) -> io::Result<()> {
        self.log(format!("disable_irq {index}"));
        self.triggers.lock().unwrap().clear();
        Ok(())
    }
    fn has_reset(&self) -> bool {
        true
    }
    fn reset(&self) -> io::Result<()> {
        self.log("reset".into());
        Ok(())
    }
    fn mmap(&self, _index: u32, _offset: u64, size: u64) -> io::Result<MmapArea> {
        MmapArea::anonymous(size)
    }
}

struct Vectors(Vec<EventFd>, Mutex<Vec<(u16, MsiMessage)>>);

impl MsiVectors for Vectors {
    fn count(&self) -> u16 {
        self.0.len() as u16
    }
    fn set_message(&self, vector: u16, msg: MsiMessage) -> io::Result<()> {
        self.1.lock().unwrap().push((vector, msg));
        Ok(())
    }
    fn commit(&self) -> io::Result<()> {
        Ok(())
    }
    fn fire(&self, vector: u16) -> io::Result<()> {
        self.0[usize::from(vector)].write(1)
    }
    fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.0.get(usize::from(vector))
    }
}

fn ecam(reg: u64) -> u64 {
    1 << 15 | reg
}

fn er32(root: &PciRoot, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    root.ecam_read(ecam(reg), &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn guest_enumerates_maps_and_routes_a_passed_through_function() {
    let fake = Fake::new();
    let vectors = Arc::new(Vectors(
        (0..4)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect(),
        Mutex::new(Vec::new()),
    ));
    let dev = VfioPciDevice::new(fake.clone(), vectors.clone(), VfioOptions::default()).unwrap();
    assert_eq!(
        fake.calls.lock().unwrap().first().map(String::as_str),
        Some("reset")
    );
    let dev = Arc::new(Mutex::new(dev));
    let shared: SharedPciDevice = dev.clone();
    let mut root = PciRoot::new();
    assert_eq!(root.add_device(None, shared), Ok(PciAddress::new(1, 0)));

    // Identity and the capability walk the guest does.
    assert_eq!(er32(&root, 0), 0x1650_14e4);
    let mut caps = Vec::new();
    let mut ptr = er32(&root, 0x34) & 0xfc;
    while ptr != 0 {
        let h = er32(&root, u64::from(ptr));
        caps.push(h & 0xff);
        ptr = (h >> 8) & 0xfc;
    }
    assert_eq!(caps, vec![0x11, 0x10]);
    // Extended: SR-IOV hidden behind a null header, AER kept.
    assert_eq!(er32(&root, 0x100), 0x140 << 20);
    assert_eq!(er32(&root, 0x140), 0x0002_0001);

    // BAR sizing and placement, then memory decoding.
    root.ecam_write(ecam(0x10), &u32::MAX.to_le_bytes());
    root.ecam_write(ecam(0x14), &u32::MAX.to_le_bytes());
    assert_eq!(er32(&root, 0x10), 0xffff_c004);
    root.ecam_write(ecam(0x10), &0x0000_0000u32.to_le_bytes());
    root.ecam_write(ecam(0x14), &0x40u32.to_le_bytes());
    let changes = root.ecam_write(ecam(0x04), &0x0006u16.to_le_bytes());
    let bars: Vec<_> = changes.iter().filter_map(ConfigChange::as_bar).collect();
    assert_eq!(
        bars,
        vec![(
            PciAddress::new(1, 0),
            BarMapping {
                index: 0,
                old: None,
                new: Some(0x40_0000_0000),
                size: 0x4000
            }
        )]
    );
    // The VMM maps everything but the MSI-X pages straight into the guest.
    let areas = dev.lock().unwrap().direct_areas(0);
    assert_eq!(
        areas.iter().map(|a| (a.offset, a.size)).collect::<Vec<_>>(),
        vec![(0, 0x2000)]
    );

    // The guest's driver enables MSI-X and unmasks vector 1.
    root.ecam_write(ecam(0x42), &0x8000u16.to_le_bytes());
    {
        let mut d = dev.lock().unwrap();
        d.write_bar(0, 0x2010, &0xfee0_0000u32.to_le_bytes());
        d.write_bar(0, 0x2018, &0x0000_0031u32.to_le_bytes());
        d.write_bar(0, 0x201c, &0u32.to_le_bytes());
    }
    assert_eq!(
        fake.triggers.lock().unwrap().get(&1).copied().flatten(),
        Some(vectors.0[1].as_raw_fd())
    );
    assert_eq!(
        vectors.1.lock().unwrap().as_slice(),
        &[(
            1,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x31
            }
        )]
    );

    // Teardown: interrupts off before the reset.
    dev.lock().unwrap().quiesce();
    let calls = fake.calls.lock().unwrap().clone();
    let disable = calls.iter().rposition(|c| c == "disable_irq 2").unwrap();
    let reset = calls.iter().rposition(|c| c == "reset").unwrap();
    assert!(disable < reset, "{calls:?}");
}
