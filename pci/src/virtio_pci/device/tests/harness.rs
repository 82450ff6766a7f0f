//! Test doubles (a recording virtio device and MSI host side) and a driver that
//! programs the function the way Linux's virtio_pci_modern does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferrio_devices::virtio::features::VIRTIO_F_VERSION_1;
use ferrio_devices::virtio::status::*;
use ferrio_devices::virtio::{
    device_type, ActivateError, Activation, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::super::VirtioPciDevice;
use crate::capability::{CAP_ID_MSIX, CAP_ID_VENDOR};
use crate::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::virtio_pci::common_cfg::offset::*;
use crate::virtio_pci::layout::{cap, cfg_type};
use crate::{MsiMessage, MsiVectors, PciDevice};

pub type Mem = GuestMemoryMmap;

/// Guest RAM of the tests: 1 MiB at 0.
pub const MEM_SIZE: usize = 0x10_0000;
/// Where the driver places BAR 0.
pub const BAR_ADDR: u64 = 0x1_0000_0000;
/// Device-specific bit the fake device offers.
pub const DEV_FEATURE: u64 = 1 << 3;

/// The host side of MSI-X: records deliveries.
pub struct FakeMsi {
    pub count: u16,
    pub fired: Mutex<Vec<u16>>,
    pub messages: Mutex<Vec<(u16, MsiMessage)>>,
}

impl FakeMsi {
    pub fn new(count: u16) -> Arc<Self> {
        Arc::new(Self {
            count,
            fired: Mutex::default(),
            messages: Mutex::default(),
        })
    }
    pub fn take_fired(&self) -> Vec<u16> {
        std::mem::take(&mut *self.fired.lock().unwrap())
    }
}

impl MsiVectors for FakeMsi {
    fn count(&self) -> u16 {
        self.count
    }
    fn set_message(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()> {
        self.messages.lock().unwrap().push((vector, msg));
        Ok(())
    }
    fn commit(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn fire(&self, vector: u16) -> std::io::Result<()> {
        self.fired.lock().unwrap().push(vector);
        Ok(())
    }
    fn eventfd(&self, _vector: u16) -> Option<&EventFd> {
        None
    }
}

/// One queue as the device received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRecord {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub ready: bool,
    pub event_idx: bool,
}

/// Everything the fake device was asked to do.
#[derive(Default)]
pub struct DevLog {
    pub acked: Vec<u64>,
    pub activations: Vec<Vec<QueueRecord>>,
    pub resets: usize,
    pub config_writes: Vec<(u64, Vec<u8>)>,
    pub interrupt: Option<Arc<dyn VirtioInterrupt>>,
    pub notify: Vec<EventFd>,
    /// Set when `reset` ran while a worker (the interrupt) was still held.
    pub reset_while_active: bool,
}

/// A virtio device that records calls. Config space: 8 bytes, 0x10..0x17.
pub struct FakeDevice {
    pub log: Arc<Mutex<DevLog>>,
    pub max_sizes: Vec<u16>,
    pub features: u64,
    pub fail_activate: bool,
    pub config: [u8; 8],
    pub kind: u32,
}

impl FakeDevice {
    pub fn new(max_sizes: &[u16]) -> (Self, Arc<Mutex<DevLog>>) {
        let log = Arc::new(Mutex::new(DevLog::default()));
        let dev = Self {
            log: log.clone(),
            max_sizes: max_sizes.to_vec(),
            features: DEV_FEATURE | ferrio_devices::virtio::features::VIRTIO_F_EVENT_IDX,
            fail_activate: false,
            config: [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17],
            kind: device_type::CONSOLE,
        };
        (dev, log)
    }
}

impl VirtioDevice<Mem> for FakeDevice {
    fn device_type(&self) -> u32 {
        self.kind
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn set_acked_features(&mut self, features: u64) {
        self.log.lock().unwrap().acked.push(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, activation: Activation<Mem>) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::MissingQueue(7));
        }
        let mut log = self.log.lock().unwrap();
        let queues = activation
            .queues
            .iter()
            .map(|q| QueueRecord {
                index: q.index,
                size: q.queue.size(),
                desc: q.queue.desc_table(),
                avail: q.queue.avail_ring(),
                used: q.queue.used_ring(),
                ready: q.queue.ready(),
                event_idx: q.queue.event_idx_enabled(),
            })
            .collect();
        log.activations.push(queues);
        log.notify = activation.queues.into_iter().map(|q| q.notify).collect();
        log.interrupt = Some(activation.interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        let mut log = self.log.lock().unwrap();
        log.resets += 1;
        log.reset_while_active |= log.interrupt.is_some();
        log.interrupt = None;
        log.notify.clear();
    }
}

pub fn guest_memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// The guest driver: config space and BAR accesses only, as Linux makes them.
pub struct Driver {
    pub dev: VirtioPciDevice<Mem>,
    /// cfg_type -> (cap offset, bar, offset, length)
    pub caps: HashMap<u8, (u16, u8, u32, u32)>,
    pub notify_multiplier: u32,
    pub msix_cap: u16,
}

impl Driver {
    pub fn new(dev: VirtioPciDevice<Mem>) -> Self {
        let mut d = Self {
            dev,
            caps: HashMap::new(),
            notify_multiplier: 0,
            msix_cap: 0,
        };
        d.probe();
        d
    }

    pub fn cfg_read(&mut self, offset: u16, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read_config(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }
    pub fn cfg_write(&mut self, offset: u16, len: usize, value: u32) {
        self.dev.write_config(offset, &value.to_le_bytes()[..len]);
    }

    /// Walks the capability list (pci_find_capability / virtio_pci_find_capability).
    fn probe(&mut self) {
        let mut ptr = self.cfg_read(0x34, 1) as u16 & !3;
        let mut guard = 0;
        while ptr != 0 && guard < 48 {
            guard += 1;
            let id = self.cfg_read(ptr, 1) as u8;
            if id == CAP_ID_VENDOR {
                let t = self.cfg_read(ptr + cap::CFG_TYPE, 1) as u8;
                let bar = self.cfg_read(ptr + cap::BAR, 1) as u8;
                let off = self.cfg_read(ptr + cap::OFFSET, 4);
                let len = self.cfg_read(ptr + cap::LENGTH, 4);
                self.caps.entry(t).or_insert((ptr, bar, off, len));
                if t == cfg_type::NOTIFY {
                    self.notify_multiplier = self.cfg_read(ptr + cap::EXTRA, 4);
                }
            } else if id == CAP_ID_MSIX {
                self.msix_cap = ptr;
            }
            ptr = self.cfg_read(ptr + 1, 1) as u16 & !3;
        }
    }

    /// Sizes and places BAR 0 (64-bit) and enables memory decoding + bus mastering.
    pub fn map_bar(&mut self) {
        self.cfg_write(0x10, 4, u32::MAX);
        self.cfg_write(0x14, 4, u32::MAX);
        let lo = self.cfg_read(0x10, 4);
        let hi = self.cfg_read(0x14, 4);
        let size = !(u64::from(hi) << 32 | u64::from(lo & !0xf)) + 1;
        assert_eq!(size, 0x1_0000);
        self.cfg_write(0x10, 4, BAR_ADDR as u32);
        self.cfg_write(0x14, 4, (BAR_ADDR >> 32) as u32);
        let cmd = self.cfg_read(COMMAND, 2);
        let mappings = self.dev.write_config(
            COMMAND,
            &((cmd as u16) | COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        assert_eq!(mappings.len(), 1);
        assert_eq!(mappings[0].new, Some(BAR_ADDR));
    }

    fn region(&self, t: u8) -> u64 {
        u64::from(self.caps[&t].2)
    }

    pub fn bar_read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    pub fn bar_write(&mut self, offset: u64, len: usize, value: u64) {
        self.dev.write_bar(0, offset, &value.to_le_bytes()[..len]);
    }

    pub fn common_read(&mut self, field: u64, len: usize) -> u64 {
        let base = self.region(cfg_type::COMMON);
        self.bar_read(base + field, len)
    }
    pub fn common_write(&mut self, field: u64, len: usize, value: u64) {
        let base = self.region(cfg_type::COMMON);
        self.bar_write(base + field, len, value);
    }
    pub fn status(&mut self) -> u8 {
        self.common_read(DEVICE_STATUS, 1) as u8
    }
    pub fn add_status(&mut self, bits: u8) {
        let s = self.status();
        self.common_write(DEVICE_STATUS, 1, u64::from(s | bits));
    }
    pub fn isr(&mut self) -> u8 {
        let base = self.region(cfg_type::ISR);
        self.bar_read(base, 1) as u8
    }
    pub fn notify_offset(&mut self, queue: u16) -> u64 {
        self.common_write(QUEUE_SELECT, 2, u64::from(queue));
        let off = self.common_read(QUEUE_NOTIFY_OFF, 2);
        self.region(cfg_type::NOTIFY) + off * u64::from(self.notify_multiplier)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (re-read). Returns whether
    /// the device accepted the features.
    pub fn negotiate(&mut self, wanted: u64) -> bool {
        self.common_write(DEVICE_STATUS, 1, 0);
        assert_eq!(self.status(), 0);
        self.add_status(ACKNOWLEDGE);
        self.add_status(DRIVER);
        self.common_write(DEVICE_FEATURE_SELECT, 4, 0);
        let lo = self.common_read(DEVICE_FEATURE, 4);
        self.common_write(DEVICE_FEATURE_SELECT, 4, 1);
        let hi = self.common_read(DEVICE_FEATURE, 4);
        let features = (hi << 32 | lo) & wanted;
        self.common_write(DRIVER_FEATURE_SELECT, 4, 0);
        self.common_write(DRIVER_FEATURE, 4, features & 0xffff_ffff);
        self.common_write(DRIVER_FEATURE_SELECT, 4, 1);
        self.common_write(DRIVER_FEATURE, 4, features >> 32);
        self.add_status(FEATURES_OK);
        self.status() & FEATURES_OK != 0
    }

    /// pci_alloc_irq_vectors + request_irq: enables MSI-X with the function masked,
    /// programs and unmasks `vectors` entries, then clears the function mask.
    pub fn enable_msix(&mut self, vectors: u16) {
        let ctrl = self.msix_cap + 2;
        let v = self.cfg_read(ctrl, 2);
        self.cfg_write(ctrl, 2, v | 0xc000);
        let table = u64::from(self.cfg_read(self.msix_cap + 4, 4) & !7);
        for i in 0..u64::from(vectors) {
            let e = table + 16 * i;
            self.bar_write(e, 4, 0xfee0_0000);
            self.bar_write(e + 4, 4, 0);
            self.bar_write(e + 8, 4, 0x40 + i);
            self.bar_write(e + 12, 4, 0);
        }
        let v = self.cfg_read(ctrl, 2);
        self.cfg_write(ctrl, 2, v & !0x4000);
    }

    /// vp_modern setup_vq: size, rings (two 32-bit halves), vector, notify offset,
    /// then queue_enable. Returns whether the vector was accepted.
    pub fn setup_queue(&mut self, q: u16, size: u16, base: u64, vector: u16) -> bool {
        self.common_write(QUEUE_SELECT, 2, u64::from(q));
        assert_ne!(self.common_read(QUEUE_SIZE, 2), 0, "queue {q} unavailable");
        self.common_write(QUEUE_SIZE, 2, u64::from(size));
        let (desc, avail, used) = ring_addrs(base, size);
        for (field, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, avail),
            (QUEUE_DEVICE, used),
        ] {
            self.common_write(field, 4, addr & 0xffff_ffff);
            self.common_write(field + 4, 4, addr >> 32);
        }
        self.common_write(QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        let accepted = self.common_read(QUEUE_MSIX_VECTOR, 2) == u64::from(vector);
        self.common_write(QUEUE_ENABLE, 2, 1);
        accepted
    }

    /// The whole bring-up: features, MSI-X (config vector 0, queue i -> vector i + 1),
    /// every queue at `base + 0x4000 * i` with `size`, DRIVER_OK.
    pub fn bring_up(&mut self, wanted: u64, size: u16) {
        assert!(self.negotiate(wanted));
        let n = self.common_read(NUM_QUEUES, 2) as u16;
        self.enable_msix(n + 1);
        self.common_write(CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(self.common_read(CONFIG_MSIX_VECTOR, 2), 0);
        for q in 0..n {
            assert!(self.setup_queue(q, size, 0x1_0000 + 0x4000 * u64::from(q), q + 1));
        }
        self.add_status(DRIVER_OK);
    }
}

/// Descriptor table, available ring and used ring of a split queue laid out at `base`.
pub fn ring_addrs(base: u64, size: u16) -> (u64, u64, u64) {
    let desc = base;
    let avail = desc + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    (desc, avail, used)
}

/// Features a Linux driver would want from the fake device.
pub const WANTED: u64 = VIRTIO_F_VERSION_1 | DEV_FEATURE;

/// A fake device with queues of `max_sizes` behind the transport, and its driver.
pub fn setup(max_sizes: &[u16]) -> (Driver, Arc<Mutex<DevLog>>, Arc<FakeMsi>) {
    let (dev, log) = FakeDevice::new(max_sizes);
    let msi = FakeMsi::new(max_sizes.len() as u16 + 1);
    let pci = VirtioPciDevice::new(Box::new(dev), guest_memory(), msi.clone(), false).unwrap();
    let mut driver = Driver::new(pci);
    driver.map_bar();
    (driver, log, msi)
}
