//! The virtio-pci common configuration structure (virtio 1.2, 4.1.4.3) as a pure state
//! machine: feature negotiation, the device status state machine and the per-queue
//! configuration registers. It knows nothing about PCI, interrupts or the device; the
//! transport ([`super::VirtioPciDevice`]) acts on the [`CommonCfgAction`] a write
//! returns.
//!
//! Register layout (offsets inside the structure, little endian):
//!
//! | offset | width | field | access |
//! |---|---|---|---|
//! | 0x00 | 4 | device_feature_select | RW |
//! | 0x04 | 4 | device_feature | RO |
//! | 0x08 | 4 | driver_feature_select | RW |
//! | 0x0c | 4 | driver_feature | RW |
//! | 0x10 | 2 | config_msix_vector | RW |
//! | 0x12 | 2 | num_queues | RO |
//! | 0x14 | 1 | device_status | RW |
//! | 0x15 | 1 | config_generation | RO |
//! | 0x16 | 2 | queue_select | RW |
//! | 0x18 | 2 | queue_size | RW |
//! | 0x1a | 2 | queue_msix_vector | RW |
//! | 0x1c | 2 | queue_enable | RW |
//! | 0x1e | 2 | queue_notify_off | RO |
//! | 0x20 | 8 | queue_desc | RW |
//! | 0x28 | 8 | queue_driver | RW |
//! | 0x30 | 8 | queue_device | RW |
//! | 0x38 | 2 | queue_notify_data | RO |
//! | 0x3a | 2 | queue_reset | RW |
//!
//! Every field must be accessed with its natural width; the 64-bit fields as two
//! 32-bit halves (an aligned 8-byte access is accepted too). Any other access reads 0
//! and is ignored on write.

use ferrio_devices::virtio::{features, status};
use tracing::debug;

use super::VirtioPciError;

/// "No MSI-X vector" (virtio 1.2, 4.1.4.3): no interrupt for this queue / config.
pub const NO_VECTOR: u16 = 0xffff;

/// Size of the common configuration structure in bytes.
pub const COMMON_CFG_SIZE: u64 = 0x3c;

/// Largest queue size the split ring allows (virtio 1.2, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Largest number of queues the transport supports: one MSI-X vector per queue plus one
/// for configuration changes make at most 1024 vectors, which fit BAR 0's MSI-X table
/// area (see [`super::layout`]).
pub const MAX_QUEUES: usize = 1023;

/// Field offsets inside the common configuration structure (named as in the spec's
/// `struct virtio_pci_common_cfg`; see the table in the module docs).
pub mod offset {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    pub const QUEUE_NOTIFY_DATA: u64 = 0x38;
    pub const QUEUE_RESET: u64 = 0x3a;
}

/// Status bits the driver may set.
const DRIVER_STATUS_BITS: u8 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK | status::FAILED;

/// What the transport must do after a write to the common configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommonCfgAction {
    /// Nothing beyond the register update.
    None,
    /// The driver wrote 0 to device_status. Nothing has been cleared yet: the transport
    /// stops the device first, then calls [`CommonCfg::reset`].
    Reset,
    /// FEATURES_OK was accepted with `features` (the driver's feature set, a subset of
    /// the offer); `driver_ok` when the same write also set DRIVER_OK.
    FeaturesOk { features: u64, driver_ok: bool },
    /// DRIVER_OK was set: the transport activates the device.
    DriverOk,
}

/// The driver's configuration of one queue, as the transport reads it at DRIVER_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue size (a power of two, at most the device's maximum).
    pub size: u16,
    /// MSI-X vector for used-buffer notifications ([`NO_VECTOR`] = none).
    pub msix_vector: u16,
    /// queue_enable was written with 1.
    pub enabled: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (available) ring address.
    pub driver: u64,
    /// Device (used) ring address.
    pub device: u64,
}

impl QueueConfig {
    fn reset(max_size: u16) -> Self {
        Self {
            size: max_size,
            msix_vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// The common configuration register file of one virtio-pci function.
#[derive(Debug, Clone)]
pub struct CommonCfg {
    offered: u64,
    max_sizes: Vec<u16>,
    msix_vectors: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    /// The driver wrote a nonzero value to a feature word beyond bit 63.
    driver_features_unknown: bool,
    config_msix_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
}

impl CommonCfg {
    /// A register file offering `offered` features, with one queue per entry of
    /// `queue_max_sizes` (each a power of two, at most [`MAX_QUEUE_SIZE`]) and
    /// `msix_vectors` MSI-X vectors (vector numbers at or above it read back as
    /// [`NO_VECTOR`]).
    pub fn new(
        offered: u64,
        queue_max_sizes: &[u16],
        msix_vectors: u16,
    ) -> Result<Self, VirtioPciError> {
        if queue_max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues(queue_max_sizes.len()));
        }
        for (index, &max) in queue_max_sizes.iter().enumerate() {
            if max == 0 || max > MAX_QUEUE_SIZE || !max.is_power_of_two() {
                return Err(VirtioPciError::InvalidQueueMaxSize { index, max });
            }
        }
        let mut cfg = Self {
            offered,
            max_sizes: queue_max_sizes.to_vec(),
            msix_vectors,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            driver_features_unknown: false,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: Vec::new(),
        };
        cfg.reset();
        Ok(cfg)
    }

    /// Device reset (status 0 written): clears the features, the status, the selectors,
    /// the queue configuration and the MSI-X vector assignments. config_generation is
    /// kept (it only ever moves forward).
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.driver_features_unknown = false;
        self.config_msix_vector = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        self.queues = self
            .max_sizes
            .iter()
            .map(|&m| QueueConfig::reset(m))
            .collect();
    }

    /// The features offered to the driver.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The features the driver wrote (meaningful once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Sets DEVICE_NEEDS_RESET (device side only; the driver cannot set it).
    pub fn set_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
    }

    /// config_generation as the driver reads it.
    pub fn config_generation(&self) -> u8 {
        self.config_generation
    }

    /// Sets config_generation (the transport keeps the counter where device workers
    /// can bump it and mirrors it here).
    pub fn set_config_generation(&mut self, generation: u8) {
        self.config_generation = generation;
    }

    /// Moves config_generation forward (the device configuration changed).
    pub fn bump_config_generation(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// The MSI-X vector for configuration changes ([`NO_VECTOR`] = none).
    pub fn config_msix_vector(&self) -> u16 {
        self.config_msix_vector
    }

    /// Number of queues.
    pub fn num_queues(&self) -> u16 {
        // At most MAX_QUEUES, checked in `new`.
        self.queues.len() as u16
    }

    /// The configuration of queue `index`.
    pub fn queue(&self, index: u16) -> Option<&QueueConfig> {
        self.queues.get(usize::from(index))
    }

    /// The configuration of all queues, in index order.
    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Reads `data.len()` bytes at `offset`. Accesses that do not match a field (or a
    /// 32-bit half of a 64-bit field) read as zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(value) = self.read_field(offset, data.len()) else {
            debug!(offset, len = data.len(), "virtio-pci: bad common cfg read");
            return;
        };
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn read_field(&self, offset: u64, len: usize) -> Option<u64> {
        use offset::*;
        let q = self.selected();
        let value = match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (DEVICE_FEATURE, 4) => feature_word(self.offered, self.device_feature_select),
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (DRIVER_FEATURE, 4) => feature_word(self.driver_features, self.driver_feature_select),
            (CONFIG_MSIX_VECTOR, 2) => u64::from(self.config_msix_vector),
            (NUM_QUEUES, 2) => u64::from(self.num_queues()),
            (DEVICE_STATUS, 1) => u64::from(self.status),
            (CONFIG_GENERATION, 1) => u64::from(self.config_generation),
            (QUEUE_SELECT, 2) => u64::from(self.queue_select),
            (QUEUE_SIZE, 2) => q.map_or(0, |q| u64::from(q.size)),
            (QUEUE_MSIX_VECTOR, 2) => q.map_or(0, |q| u64::from(q.msix_vector)),
            (QUEUE_ENABLE, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            // notify_off = queue index (the transport's notify_off_multiplier spaces
            // the queues); notify_data = queue index too.
            (QUEUE_NOTIFY_OFF, 2) | (QUEUE_NOTIFY_DATA, 2) => {
                q.map_or(0, |_| u64::from(self.queue_select))
            }
            (QUEUE_RESET, 2) => 0,
            (o @ QUEUE_DESC..=0x37, 4 | 8) if o % 4 == 0 && (len == 4 || o % 8 == 0) => {
                let Some(q) = q else { return Some(0) };
                let field = match o & !7 {
                    QUEUE_DESC => q.desc,
                    QUEUE_DRIVER => q.driver,
                    _ => q.device,
                };
                if len == 8 {
                    field
                } else if o % 8 == 0 {
                    field & 0xffff_ffff
                } else {
                    field >> 32
                }
            }
            _ => return None,
        };
        Some(value)
    }

    /// Writes `data` at `offset` and returns what the transport must do next.
    /// Writes that do not match a field, or that the current state does not allow,
    /// are ignored (logged at debug level).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> CommonCfgAction {
        use offset::*;
        let len = data.len();
        if !matches!(len, 1 | 2 | 4 | 8) {
            debug!(offset, len, "virtio-pci: bad common cfg write width");
            return CommonCfgAction::None;
        }
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let driver_ok = self.status & status::DRIVER_OK != 0;
        match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(value as u32),
            (CONFIG_MSIX_VECTOR, 2) => self.config_msix_vector = self.check_vector(value as u16),
            (DEVICE_STATUS, 1) => return self.write_status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_SIZE | QUEUE_MSIX_VECTOR | QUEUE_ENABLE, 2) | (QUEUE_DESC..=0x37, 4 | 8)
                if driver_ok =>
            {
                debug!(
                    offset,
                    "virtio-pci: queue configuration write after DRIVER_OK ignored"
                );
            }
            (QUEUE_SIZE, 2) => {
                let size = value as u16;
                let index = usize::from(self.queue_select);
                if let (Some(q), Some(&max)) =
                    (self.queues.get_mut(index), self.max_sizes.get(index))
                {
                    if size != 0 && size <= max && size.is_power_of_two() {
                        q.size = size;
                    } else {
                        debug!(index, size, max, "virtio-pci: invalid queue size ignored");
                    }
                }
            }
            (QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.check_vector(value as u16);
                if let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) {
                    q.msix_vector = vector;
                }
            }
            (QUEUE_ENABLE, 2) => {
                if let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) {
                    // Writing 0 is forbidden to the driver (4.1.4.3.2); ignore it.
                    if value == 1 {
                        q.enabled = true;
                    } else {
                        debug!(value, "virtio-pci: queue_enable write ignored");
                    }
                }
            }
            (o @ QUEUE_DESC..=0x37, 4 | 8) if o % 4 == 0 && (len == 4 || o % 8 == 0) => {
                let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) else {
                    return CommonCfgAction::None;
                };
                let field = match o & !7 {
                    QUEUE_DESC => &mut q.desc,
                    QUEUE_DRIVER => &mut q.driver,
                    _ => &mut q.device,
                };
                *field = if len == 8 {
                    value
                } else if o % 8 == 0 {
                    (*field & !0xffff_ffff) | value
                } else {
                    (*field & 0xffff_ffff) | (value << 32)
                };
            }
            (QUEUE_RESET, 2) => {
                // VIRTIO_F_RING_RESET is never offered (the transport masks it), so the
                // field is inert.
                debug!(value, "virtio-pci: queue_reset write ignored");
            }
            _ => debug!(offset, len, "virtio-pci: bad common cfg write"),
        }
        CommonCfgAction::None
    }

    fn check_vector(&self, vector: u16) -> u16 {
        if vector == NO_VECTOR || vector < self.msix_vectors {
            vector
        } else {
            debug!(
                vector,
                "virtio-pci: MSI-X vector out of range, reads back NO_VECTOR"
            );
            NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, word: u32) {
        if self.status & (status::FEATURES_OK | status::DRIVER_OK) != 0 {
            debug!("virtio-pci: driver_feature write after FEATURES_OK ignored");
            return;
        }
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(word),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(word) << 32)
            }
            // Words beyond bit 63: nothing is offered there, so any set bit makes
            // FEATURES_OK fail.
            _ => self.driver_features_unknown |= word != 0,
        }
    }

    /// Whether the driver's feature set can be accepted at FEATURES_OK.
    fn features_acceptable(&self) -> bool {
        let unknown = self.driver_features & !self.offered;
        if unknown != 0 || self.driver_features_unknown {
            debug!(
                unknown = format_args!("{unknown:#x}"),
                "virtio-pci: driver accepted features that were not offered"
            );
            return false;
        }
        if self.driver_features & features::VIRTIO_F_VERSION_1 == 0 {
            debug!("virtio-pci: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        true
    }

    fn write_status(&mut self, value: u8) -> CommonCfgAction {
        if value == 0 {
            return CommonCfgAction::Reset;
        }
        let current = self.status;
        // The driver cannot clear bits (only reset can) nor set DEVICE_NEEDS_RESET.
        let target = current | (value & DRIVER_STATUS_BITS);
        let mut added = target & !current;
        if added & status::FAILED != 0 {
            self.status |= status::FAILED;
            added &= !status::FAILED;
        }
        if added == 0 {
            return CommonCfgAction::None;
        }
        if current & (status::FAILED | status::DEVICE_NEEDS_RESET) != 0 {
            debug!(
                current,
                value, "virtio-pci: status progress after FAILED/NEEDS_RESET ignored"
            );
            return CommonCfgAction::None;
        }
        let has = |bit: u8| target & bit != 0;
        let in_order = (!has(status::DRIVER) || has(status::ACKNOWLEDGE))
            && (!has(status::FEATURES_OK) || has(status::DRIVER))
            && (!has(status::DRIVER_OK) || has(status::FEATURES_OK));
        if !in_order {
            debug!(
                current,
                value, "virtio-pci: out-of-order status write ignored"
            );
            return CommonCfgAction::None;
        }
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // FEATURES_OK reads back clear: the driver sees the refusal.
            return CommonCfgAction::None;
        }
        self.status |= added;
        let driver_ok = added & status::DRIVER_OK != 0;
        if added & status::FEATURES_OK != 0 {
            CommonCfgAction::FeaturesOk {
                features: self.driver_features,
                driver_ok,
            }
        } else if driver_ok {
            CommonCfgAction::DriverOk
        } else {
            CommonCfgAction::None
        }
    }
}

/// Word `select` (32 bits) of a 64-bit feature set; words beyond bit 63 read 0.
fn feature_word(features: u64, select: u32) -> u64 {
    match select {
        0 => features & 0xffff_ffff,
        1 => features >> 32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests;
