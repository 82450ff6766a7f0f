//! The VMM half of the embedding: what a VMM other than ferrio supplies to ferrio's
//! passthrough function model. Interrupt vectors ([`Vectors`]: one eventfd per vector
//! that this program waits on, where ferrio has KVM irqfds), "guest" memory (a
//! `GuestMemoryMmap` mapped for DMA at IOVA = GPA) and the opened device, and the
//! guest's PCI core: config accesses through the model to size and place BAR 0,
//! enable decoding and bus mastering, find the capabilities and program MSI-X.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrio_pci::vfio::{DmaMappings, VfioOptions, VfioPciDevice};
use ferrio_pci::{BarMapping, MsiMessage, MsiVectors, PciDevice};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where the "guest" RAM of the embedding lives (GPA = IOVA): 256 MiB, well away
/// from the virtio-iommu's reserved MSI window (0xfee00000-0xfeefffff).
pub const RAM_GPA: u64 = 0x1000_0000;
pub const RAM_LEN: usize = 2 << 20;
/// Where the program places BAR 0 (it plays firmware and the guest's PCI core).
pub const BAR0_GPA: u64 = 0xe000_0000;
/// MSI address the program writes in the table (x86 LAPIC window; only recorded).
pub const MSI_ADDRESS: u64 = 0xfee0_0000;

const CAP_PTR: u16 = 0x34;
const COMMAND: u16 = 0x04;
const STATUS_CAP_LIST: u16 = 0x10;
const CMD_MEMORY: u16 = 0x2;
const CMD_MASTER: u16 = 0x4;
const CAP_MSIX: u8 = 0x11;
const CAP_VENDOR: u8 = 0x09;
const MSIX_ENABLE: u16 = 0x8000;
const MSIX_MASKALL: u16 = 0x4000;

/// The vectors the model delivers: an eventfd each, messages recorded.
pub struct Vectors {
    fds: Vec<EventFd>,
    messages: Mutex<Vec<Option<MsiMessage>>>,
    commits: AtomicU32,
    fired: AtomicU32,
}

impl Vectors {
    pub fn new(n: u16) -> Result<Arc<Self>, String> {
        let fds = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Vectors {
            fds,
            messages: Mutex::new(vec![None; usize::from(n)]),
            commits: AtomicU32::new(0),
            fired: AtomicU32::new(0),
        }))
    }

    /// The message vector `v` was given, if any.
    pub fn message(&self, v: u16) -> Option<MsiMessage> {
        let m = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        m.get(usize::from(v)).copied().flatten()
    }

    pub fn commits(&self) -> u32 {
        self.commits.load(Ordering::Relaxed)
    }

    pub fn fired(&self) -> u32 {
        self.fired.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for vector `v`'s eventfd; returns the count read (0 on
    /// timeout).
    pub fn wait(&self, v: u16, timeout: Duration) -> Result<u64, String> {
        let fd = self
            .fds
            .get(usize::from(v))
            .ok_or_else(|| format!("no vector {v}"))?;
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(format!("poll: {e}"));
        }
        if n == 0 {
            return Ok(0);
        }
        match fd.read() {
            Ok(c) => Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(format!("eventfd read: {e}")),
        }
    }
}

impl MsiVectors for Vectors {
    fn count(&self) -> u16 {
        u16::try_from(self.fds.len()).unwrap_or(u16::MAX)
    }
    fn set_message(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()> {
        let mut m = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = m.get_mut(usize::from(vector)) {
            *slot = Some(msg);
        }
        Ok(())
    }
    fn commit(&self) -> std::io::Result<()> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn fire(&self, vector: u16) -> std::io::Result<()> {
        self.fired.fetch_add(1, Ordering::Relaxed);
        match self.fds.get(usize::from(vector)) {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
    fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.fds.get(usize::from(vector))
    }
}

/// One opened function: the model, its vectors, its DMA mappings and the memory.
/// Field order is drop order: the model (which resets the device and unmaps DMA)
/// before the memory it may DMA into.
pub struct Session {
    pub dev: VfioPciDevice,
    pub vectors: Arc<Vectors>,
    pub dma: Arc<Mutex<DmaMappings>>,
    pub mem: GuestMemoryMmap,
}

/// Guest memory, mapped for DMA, and the model around the opened device.
/// Returns the session and a description (vectors, mapping).
pub fn build(opened: ferrio_pci::vfio::OpenedDevice) -> Result<(Session, String), String> {
    let (ops, mapper) = opened;
    let need = ferrio_pci::vfio::vectors_needed(ops.as_ref()).map_err(|e| e.to_string())?;
    let vectors = Vectors::new(need)?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_GPA), RAM_LEN)])
        .map_err(|e| format!("guest memory: {e}"))?;
    let host = mem
        .get_host_address(GuestAddress(RAM_GPA))
        .map_err(|e| format!("guest memory address: {e}"))? as u64;
    let mut dma = DmaMappings::new(mapper);
    dma.map_all(&[(RAM_GPA, RAM_LEN as u64, host)])
        .map_err(|e| format!("vectors_needed {need}; {e}"))?;
    let dma = Arc::new(Mutex::new(dma));
    let msi: Arc<dyn MsiVectors> = vectors.clone();
    let dev = VfioPciDevice::new(ops, msi, VfioOptions::default())
        .map_err(|e| format!("VfioPciDevice::new: {e}"))?
        .with_dma(dma.clone());
    let text = format!(
        "vectors_needed {need}; DMA {RAM_LEN:#x} bytes at iova {RAM_GPA:#x} (host {host:#x})"
    );
    Ok((
        Session {
            dev,
            vectors,
            dma,
            mem,
        },
        text,
    ))
}

pub fn cfg_read(dev: &mut dyn PciDevice, off: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

pub fn cfg_write(dev: &mut dyn PciDevice, off: u16, len: usize, v: u32) -> Vec<BarMapping> {
    dev.write_config(off, &v.to_le_bytes()[..len])
}

/// A capability found in the standard list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub id: u8,
    pub offset: u16,
}

/// The standard capability list as the guest walks it (bounded).
pub fn capabilities(dev: &mut dyn PciDevice) -> Vec<Cap> {
    let mut caps = Vec::new();
    if cfg_read(dev, 0x06, 2) as u16 & STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut off = cfg_read(dev, CAP_PTR, 1) as u16 & 0xfc;
    while off >= 0x40 && caps.len() < 48 {
        let head = cfg_read(dev, off, 2);
        caps.push(Cap {
            id: head as u8,
            offset: off,
        });
        off = (head >> 8) as u16 & 0xfc;
    }
    caps
}

/// A virtio-pci structure (virtio 1.2, 4.1.4): type, BAR, offset, length and the
/// notify multiplier (for the notification structure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCap {
    pub cfg_type: u8,
    pub bar: u8,
    pub offset: u64,
    pub length: u32,
    pub multiplier: u32,
}

pub fn virtio_caps(dev: &mut dyn PciDevice, caps: &[Cap]) -> Vec<VirtioCap> {
    caps.iter()
        .filter(|c| c.id == CAP_VENDOR)
        .map(|c| VirtioCap {
            cfg_type: cfg_read(dev, c.offset + 3, 1) as u8,
            bar: cfg_read(dev, c.offset + 4, 1) as u8,
            offset: u64::from(cfg_read(dev, c.offset + 8, 4)),
            length: cfg_read(dev, c.offset + 12, 4),
            multiplier: cfg_read(dev, c.offset + 16, 4),
        })
        .collect()
}

/// BAR 0 sized the way firmware does (all-ones, read the mask), placed at
/// [`BAR0_GPA`]: returns (size, 64-bit, prefetchable).
pub fn size_and_place_bar0(dev: &mut dyn PciDevice) -> Result<(u64, bool, bool), String> {
    let lo = cfg_read(dev, 0x10, 4);
    let wide = lo & 0b110 == 0b100;
    let prefetch = lo & 0b1000 != 0;
    if lo & 1 != 0 {
        return Err(format!("BAR 0 is an I/O BAR ({lo:#x})"));
    }
    cfg_write(dev, 0x10, 4, u32::MAX);
    let mut mask = u64::from(cfg_read(dev, 0x10, 4) & !0xf);
    if wide {
        cfg_write(dev, 0x14, 4, u32::MAX);
        mask |= u64::from(cfg_read(dev, 0x14, 4)) << 32;
    } else {
        mask |= 0xffff_ffff_0000_0000;
    }
    let size = (!mask).wrapping_add(1);
    if mask == 0 || !size.is_power_of_two() {
        return Err(format!("BAR 0 mask {mask:#x} (register {lo:#x})"));
    }
    cfg_write(dev, 0x10, 4, BAR0_GPA as u32);
    if wide {
        cfg_write(dev, 0x14, 4, (BAR0_GPA >> 32) as u32);
    }
    let back = u64::from(cfg_read(dev, 0x10, 4) & !0xf)
        | if wide {
            u64::from(cfg_read(dev, 0x14, 4)) << 32
        } else {
            0
        };
    if back != BAR0_GPA {
        return Err(format!("BAR 0 reads {back:#x} after writing {BAR0_GPA:#x}"));
    }
    Ok((size, wide, prefetch))
}

/// Memory space and bus master on; returns the command register read back and the
/// BAR decoding changes the write caused.
pub fn enable_decoding(dev: &mut dyn PciDevice) -> (u16, Vec<BarMapping>) {
    let cmd = cfg_read(dev, COMMAND, 2) as u16;
    let changes = cfg_write(dev, COMMAND, 2, u32::from(cmd | CMD_MEMORY | CMD_MASTER));
    (cfg_read(dev, COMMAND, 2) as u16, changes)
}

/// The MSI-X capability: table size, table BAR/offset, PBA BAR/offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixInfo {
    pub cap: u16,
    pub size: u16,
    pub table_bar: u8,
    pub table_offset: u64,
    pub pba_bar: u8,
    pub pba_offset: u64,
}

pub fn msix_info(dev: &mut dyn PciDevice, caps: &[Cap]) -> Option<MsixInfo> {
    let cap = caps.iter().find(|c| c.id == CAP_MSIX)?.offset;
    let ctrl = cfg_read(dev, cap + 2, 2);
    let table = cfg_read(dev, cap + 4, 4);
    let pba = cfg_read(dev, cap + 8, 4);
    Some(MsixInfo {
        cap,
        size: (ctrl & 0x7ff) as u16 + 1,
        table_bar: (table & 7) as u8,
        table_offset: u64::from(table & !7),
        pba_bar: (pba & 7) as u8,
        pba_offset: u64::from(pba & !7),
    })
}

/// As Linux does: MSI-X enabled with the function masked, the entries of `vectors`
/// programmed (message [`MSI_ADDRESS`], data = vector) and unmasked, then the function
/// unmasked. Returns the control register read back.
pub fn enable_msix(dev: &mut dyn PciDevice, m: &MsixInfo, vectors: &[u16]) -> u16 {
    cfg_write(dev, m.cap + 2, 2, u32::from(MSIX_ENABLE | MSIX_MASKALL));
    for &v in vectors {
        let at = m.table_offset + 16 * u64::from(v);
        dev.write_bar(m.table_bar, at, &(MSI_ADDRESS as u32).to_le_bytes());
        dev.write_bar(m.table_bar, at + 4, &0u32.to_le_bytes());
        dev.write_bar(m.table_bar, at + 8, &u32::from(v).to_le_bytes());
        dev.write_bar(m.table_bar, at + 12, &0u32.to_le_bytes());
    }
    cfg_write(dev, m.cap + 2, 2, u32::from(MSIX_ENABLE));
    cfg_read(dev, m.cap + 2, 2) as u16
}

/// Vector control of table entry `v` (bit 0: masked).
pub fn msix_vector_ctrl(dev: &mut dyn PciDevice, m: &MsixInfo, v: u16) -> u32 {
    let mut b = [0u8; 4];
    dev.read_bar(m.table_bar, m.table_offset + 16 * u64::from(v) + 12, &mut b);
    u32::from_le_bytes(b)
}

/// The guest kernel's `vfio-msix[N](BDF)` lines in /proc/interrupts: the vectors
/// VFIO has eventfd triggers for.
pub fn vfio_irq_lines(bdf: &str) -> Result<Vec<String>, String> {
    let text = crate::sys::read("/proc/interrupts")?;
    Ok(text
        .lines()
        .filter(|l| l.contains("vfio-msix") && l.contains(bdf))
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect())
}
