//! A fake VFIO device (a NIC-like function built byte by byte) and a fake IOMMU
//! context that record every call, and `MsiVectors` with real eventfds.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vfio::ops::{DmaMapper, IrqInfo, MmapArea, RegionInfo, VfioOps};
use crate::vfio::{
    CONFIG_REGION, INTX_IRQ, IRQ_NORESIZE, MSIX_IRQ, MSI_IRQ, REGION_MMAP, REGION_READ,
    REGION_WRITE, ROM_REGION,
};
use crate::{MsiMessage, MsiVectors};

/// One call on the fake device or IOMMU context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Read {
        index: u32,
        offset: u64,
        len: usize,
    },
    Write {
        index: u32,
        offset: u64,
        data: Vec<u8>,
    },
    SetIrqs {
        index: u32,
        start: u32,
        fds: Vec<Option<RawFd>>,
    },
    DisableIrq(u32),
    Reset,
    Mmap {
        index: u32,
        offset: u64,
        size: u64,
    },
    DmaMap {
        iova: u64,
        size: u64,
        host: u64,
    },
    DmaUnmap {
        iova: u64,
        size: u64,
    },
}

/// The calls of a device and its IOMMU context, in order.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<Call>>>);

impl Log {
    pub fn push(&self, c: Call) {
        self.0.lock().unwrap().push(c);
    }
    /// Every call since the last take.
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    /// The calls since the last take, without config-space reads (the model reads the
    /// device's config freely).
    pub fn take_effects(&self) -> Vec<Call> {
        self.take()
            .into_iter()
            .filter(|c| !matches!(c, Call::Read { index, .. } if *index == CONFIG_REGION))
            .collect()
    }
}

/// Mmap layout of BAR 0 as the host reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bar0Mmap {
    /// Older kernels: sparse areas around the MSI-X table page.
    Sparse,
    /// Kernels with MSIX_MAPPABLE: the whole region.
    Whole,
}

/// What the fake NIC looks like.
#[derive(Debug, Clone, Copy)]
pub struct NicSpec {
    pub bar0_mmap: Bar0Mmap,
    pub msix_noresize: bool,
    pub sriov_first: bool,
    /// MSI (4 vectors, 64-bit, per-vector masking) instead of MSI-X.
    pub msi: bool,
    pub has_reset: bool,
    pub fail_mmap: bool,
    pub table_offset: u32,
    pub pba_offset: u32,
    /// Size of the VFIO region of BAR 2 (4 KiB: the whole BAR).
    pub bar2_region: u64,
    /// Size of the config region (4096 for PCIe).
    pub config_size: u64,
}

impl Default for NicSpec {
    fn default() -> Self {
        NicSpec {
            bar0_mmap: Bar0Mmap::Sparse,
            msix_noresize: false,
            sriov_first: false,
            msi: false,
            has_reset: true,
            fail_mmap: false,
            table_offset: 0x2000,
            pba_offset: 0x3000,
            bar2_region: 0x1000,
            config_size: 0x1000,
        }
    }
}

pub const VENDOR: u16 = 0x8086;
pub const DEVICE: u16 = 0x10fb;
/// The command register as the host left it: memory, bus master, SERR.
pub const HOST_COMMAND: u16 = 0x0106;
pub const MSIX_CAP: u16 = 0x50;
pub const MSI_CAP: u16 = 0x50;
pub const PCIE_CAP: u16 = 0x70;
pub const PM_CAP: u16 = 0x40;
pub const MSIX_VECTORS: u16 = 8;

fn put(cfg: &mut [u8], off: usize, bytes: &[u8]) {
    cfg[off..off + bytes.len()].copy_from_slice(bytes);
}

/// The NIC's config space: BAR0 64-bit 16 KiB, BAR2 32-bit 4 KiB, BAR4 I/O, ROM;
/// capabilities PM -> MSI-X (or MSI) -> PCIe; extended AER -> SR-IOV -> ARI (or
/// SR-IOV first).
fn nic_config(spec: &NicSpec) -> Vec<u8> {
    let mut c = vec![0u8; 4096];
    put(&mut c, 0x00, &VENDOR.to_le_bytes());
    put(&mut c, 0x02, &DEVICE.to_le_bytes());
    put(&mut c, 0x04, &HOST_COMMAND.to_le_bytes());
    put(&mut c, 0x06, &0x0010u16.to_le_bytes());
    put(&mut c, 0x08, &[0x01, 0x00, 0x00, 0x02]);
    c[0x0e] = 0x80;
    put(&mut c, 0x10, &0xfe00_0004u32.to_le_bytes());
    put(&mut c, 0x18, &0xfd00_0000u32.to_le_bytes());
    put(&mut c, 0x20, &0x0000_e001u32.to_le_bytes());
    put(&mut c, 0x2c, &[0x86, 0x80, 0x03, 0x00]);
    put(&mut c, 0x30, &0xfc00_0000u32.to_le_bytes());
    c[0x34] = PM_CAP as u8;
    c[0x3c] = 0x0b;
    c[0x3d] = 0x01;
    // PM: capabilities 0x0003, control/status 0.
    put(&mut c, 0x40, &[0x01, MSIX_CAP as u8, 0x03, 0x00]);
    if spec.msi {
        // MSI: 64-bit, per-vector masking, 4 vectors capable.
        put(&mut c, 0x50, &[0x05, PCIE_CAP as u8]);
        put(&mut c, 0x52, &0x0184u16.to_le_bytes());
    } else {
        put(&mut c, 0x50, &[0x11, PCIE_CAP as u8]);
        put(&mut c, 0x52, &(MSIX_VECTORS - 1).to_le_bytes());
        put(&mut c, 0x54, &spec.table_offset.to_le_bytes());
        put(&mut c, 0x58, &spec.pba_offset.to_le_bytes());
    }
    put(&mut c, 0x70, &[0x10, 0x00, 0x02, 0x00]);
    put(&mut c, 0x74, &0x0000_8000u32.to_le_bytes());
    let (aer, sriov, ari) = if spec.sriov_first {
        (0x140u32, 0x100u32, 0x180u32)
    } else {
        (0x100, 0x140, 0x180)
    };
    let next = |n: u32| n << 20;
    let (aer_next, sriov_next) = if spec.sriov_first {
        (ari, aer)
    } else {
        (sriov, ari)
    };
    put(
        &mut c,
        aer as usize,
        &(0x0001 | 2 << 16 | next(aer_next)).to_le_bytes(),
    );
    put(&mut c, aer as usize + 4, &0x1234_5678u32.to_le_bytes());
    put(
        &mut c,
        sriov as usize,
        &(0x0010 | 1 << 16 | next(sriov_next)).to_le_bytes(),
    );
    // SR-IOV: InitialVFs/TotalVFs 8, VF BAR0.
    put(&mut c, sriov as usize + 0x0c, &[8, 0, 8, 0]);
    put(&mut c, sriov as usize + 0x24, &0xf000_0004u32.to_le_bytes());
    put(&mut c, ari as usize, &(0x000eu32 | 1 << 16).to_le_bytes());
    put(&mut c, ari as usize + 4, &0x0000_0100u32.to_le_bytes());
    c.truncate(spec.config_size as usize);
    c
}

/// A fake VFIO device.
pub struct FakeDevice {
    pub log: Log,
    regions: Vec<RegionInfo>,
    irqs: Vec<IrqInfo>,
    memory: Mutex<HashMap<u32, Vec<u8>>>,
    has_reset: bool,
    fail_mmap: bool,
    /// Installed triggers: (irq index, vector) -> fd.
    triggers: Mutex<HashMap<(u32, u32), RawFd>>,
}

impl FakeDevice {
    pub fn nic(spec: NicSpec) -> Arc<Self> {
        Self::nic_with_log(spec, Log::default())
    }

    pub fn nic_with_log(spec: NicSpec, log: Log) -> Arc<Self> {
        let rw = REGION_READ | REGION_WRITE;
        let bar0_areas = match spec.bar0_mmap {
            Bar0Mmap::Sparse => vec![(0, 0x2000), (0x3000, 0x1000)],
            Bar0Mmap::Whole => vec![(0, 0x4000)],
        };
        let region = |index, size, flags, mmap_areas| RegionInfo {
            index,
            size,
            flags,
            mmap_areas,
        };
        let regions = vec![
            region(0, 0x4000, rw | REGION_MMAP, bar0_areas),
            region(2, spec.bar2_region, rw, vec![]),
            region(4, 0x20, rw, vec![]),
            region(ROM_REGION, 0x6000, REGION_READ, vec![]),
            region(CONFIG_REGION, spec.config_size, rw, vec![]),
        ];
        let msix_flags = if spec.msix_noresize { IRQ_NORESIZE } else { 0 };
        let irqs = vec![
            IrqInfo {
                index: INTX_IRQ,
                count: 1,
                flags: 0,
            },
            IrqInfo {
                index: MSI_IRQ,
                count: if spec.msi { 4 } else { 1 },
                flags: IRQ_NORESIZE,
            },
            IrqInfo {
                index: MSIX_IRQ,
                count: if spec.msi { 0 } else { u32::from(MSIX_VECTORS) },
                flags: msix_flags,
            },
        ];
        let mut memory = HashMap::new();
        memory.insert(0, (0..0x4000u32).map(|i| i as u8).collect());
        memory.insert(2, vec![0x5a; spec.bar2_region as usize]);
        memory.insert(4, vec![0; 0x20]);
        memory.insert(ROM_REGION, (0..0x6000u32).map(|i| (i >> 4) as u8).collect());
        memory.insert(CONFIG_REGION, nic_config(&spec));
        Arc::new(FakeDevice {
            log,
            regions,
            irqs,
            memory: Mutex::new(memory),
            has_reset: spec.has_reset,
            fail_mmap: spec.fail_mmap,
            triggers: Mutex::new(HashMap::new()),
        })
    }

    /// The device's own config bytes (what the guest's passthrough writes reached).
    pub fn config(&self, offset: usize, len: usize) -> Vec<u8> {
        let mem = self.memory.lock().unwrap();
        mem[&CONFIG_REGION][offset..offset + len].to_vec()
    }

    pub fn config_u16(&self, offset: usize) -> u16 {
        let b = self.config(offset, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// The fd VFIO would signal for `vector` of IRQ `index` now.
    pub fn trigger(&self, index: u32, vector: u32) -> Option<RawFd> {
        self.triggers.lock().unwrap().get(&(index, vector)).copied()
    }

    /// The device raises `vector`: VFIO signals its trigger, if it has one.
    pub fn raise(&self, index: u32, vector: u32) -> bool {
        let Some(fd) = self.trigger(index, vector) else {
            return false;
        };
        let one = 1u64.to_ne_bytes();
        // SAFETY: `fd` is an eventfd the model installed and still owns (its capture
        // fd or an MsiVectors fd, both alive while the model is); we write the
        // 8-byte counter increment from a live buffer.
        let n = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        n == 8
    }

    fn region_size(&self, index: u32) -> u64 {
        self.regions
            .iter()
            .find(|r| r.index == index)
            .map_or(0, |r| r.size)
    }

    fn check(&self, index: u32, offset: u64, len: usize) {
        let end = offset.checked_add(len as u64).expect("offset overflow");
        assert!(
            end <= self.region_size(index),
            "access past region {index}: {offset:#x}+{len}"
        );
    }
}

impl VfioOps for FakeDevice {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        self.regions.iter().find(|r| r.index == index).cloned()
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        self.check(index, offset, data.len());
        self.log.push(Call::Read {
            index,
            offset,
            len: data.len(),
        });
        let mem = self.memory.lock().unwrap();
        let src = &mem[&index][offset as usize..offset as usize + data.len()];
        data.copy_from_slice(src);
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        self.check(index, offset, data.len());
        self.log.push(Call::Write {
            index,
            offset,
            data: data.to_vec(),
        });
        let mut mem = self.memory.lock().unwrap();
        let dst = mem.get_mut(&index).unwrap();
        dst[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    fn irq(&self, index: u32) -> Option<IrqInfo> {
        self.irqs.iter().find(|i| i.index == index).copied()
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<RawFd>]) -> io::Result<()> {
        self.log.push(Call::SetIrqs {
            index,
            start,
            fds: fds.to_vec(),
        });
        let mut t = self.triggers.lock().unwrap();
        for (i, fd) in fds.iter().enumerate() {
            let key = (index, start + i as u32);
            match fd {
                Some(fd) => t.insert(key, *fd),
                None => t.remove(&key),
            };
        }
        Ok(())
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        self.log.push(Call::DisableIrq(index));
        self.triggers.lock().unwrap().retain(|k, _| k.0 != index);
        Ok(())
    }

    fn has_reset(&self) -> bool {
        self.has_reset
    }

    fn reset(&self) -> io::Result<()> {
        self.log.push(Call::Reset);
        Ok(())
    }

    fn mmap(&self, index: u32, offset: u64, size: u64) -> io::Result<MmapArea> {
        self.log.push(Call::Mmap {
            index,
            offset,
            size,
        });
        if self.fail_mmap {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        MmapArea::anonymous(size)
    }
}

/// A fake IOMMU context logging into the device's log.
pub struct FakeDma {
    pub log: Log,
    /// Maps at this IOVA fail.
    pub fail_iova: Option<u64>,
}

impl DmaMapper for FakeDma {
    fn map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        if self.fail_iova == Some(iova) {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        self.log.push(Call::DmaMap {
            iova,
            size,
            host: host_addr,
        });
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        self.log.push(Call::DmaUnmap { iova, size });
        Ok(())
    }
}

/// What the model did with the vector routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VecCall {
    Set(u16, MsiMessage),
    Commit,
    Fire(u16),
}

/// `MsiVectors` with one real eventfd per vector, recording calls.
pub struct Vectors {
    fds: Vec<EventFd>,
    calls: Mutex<Vec<VecCall>>,
}

impl Vectors {
    pub fn new(count: u16) -> Arc<Self> {
        Arc::new(Vectors {
            fds: (0..count)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            calls: Mutex::new(Vec::new()),
        })
    }

    pub fn fd(&self, v: u16) -> RawFd {
        self.fds[usize::from(v)].as_raw_fd()
    }

    pub fn take(&self) -> Vec<VecCall> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl MsiVectors for Vectors {
    fn count(&self) -> u16 {
        self.fds.len() as u16
    }
    fn set_message(&self, vector: u16, msg: MsiMessage) -> io::Result<()> {
        self.calls.lock().unwrap().push(VecCall::Set(vector, msg));
        Ok(())
    }
    fn commit(&self) -> io::Result<()> {
        self.calls.lock().unwrap().push(VecCall::Commit);
        Ok(())
    }
    fn fire(&self, vector: u16) -> io::Result<()> {
        self.calls.lock().unwrap().push(VecCall::Fire(vector));
        Ok(())
    }
    fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.fds.get(usize::from(vector))
    }
}
