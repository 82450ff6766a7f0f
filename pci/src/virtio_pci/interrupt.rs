//! The transport state device workers share with the vCPU thread, and the
//! [`VirtioInterrupt`] a device receives at activation.
//!
//! Workers signal from their own threads, so everything they touch is atomic: the ISR
//! byte, the DEVICE_NEEDS_RESET flag, the config generation counter and the MSI-X
//! vector each queue (and configuration changes) is routed to. The vCPU thread mirrors
//! these into the [`super::common_cfg::CommonCfg`] register file before each access.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use ferrio_devices::virtio::VirtioInterrupt;
use tracing::{debug, warn};

use super::common_cfg::NO_VECTOR;

/// ISR bit 0: a queue has used buffers (virtio 1.2, 4.1.4.5).
pub const ISR_QUEUE: u8 = 1;
/// ISR bit 1: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// Delivers one MSI-X vector of the function, honouring the MSI-X enable, function mask
/// and per-vector mask bits (a masked vector becomes pending). Implemented by the
/// MSI-X model's trigger handle; tests may substitute their own.
pub trait VectorTrigger: Send + Sync {
    /// Delivers (or marks pending) `vector`.
    fn trigger(&self, vector: u16) -> std::io::Result<()>;
}

/// Transport state shared between the device model and the device's workers.
#[derive(Debug)]
pub struct SharedState {
    isr: AtomicU8,
    needs_reset: AtomicBool,
    config_generation: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Box<[AtomicU16]>,
}

impl SharedState {
    /// State for `num_queues` queues: no interrupt routed, ISR clear.
    pub fn new(num_queues: usize) -> Self {
        Self {
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        }
    }

    /// Reads and clears the ISR byte (what a driver read of the ISR field does).
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    /// The ISR byte without clearing it.
    pub fn isr(&self) -> u8 {
        self.isr.load(Ordering::Acquire)
    }

    /// Whether a worker reported a fatal device error since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Sets DEVICE_NEEDS_RESET (mirrored into the status register by the transport).
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
    }

    /// The config generation counter.
    pub fn config_generation(&self) -> u8 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Moves the config generation forward (device configuration changed).
    pub fn bump_config_generation(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Routes configuration-change interrupts to `vector` ([`NO_VECTOR`] = none).
    pub fn set_config_vector(&self, vector: u16) {
        self.config_vector.store(vector, Ordering::Release);
    }

    /// Routes queue `queue`'s interrupts to `vector` (ignored for unknown queues).
    pub fn set_queue_vector(&self, queue: u16, vector: u16) {
        if let Some(v) = self.queue_vectors.get(usize::from(queue)) {
            v.store(vector, Ordering::Release);
        }
    }

    /// The vector of queue `queue` ([`NO_VECTOR`] for unknown queues).
    pub fn queue_vector(&self, queue: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(queue))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    /// The configuration-change vector.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    /// Transport reset: ISR, DEVICE_NEEDS_RESET and the vector routing are cleared; the
    /// config generation keeps counting.
    pub fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in self.queue_vectors.iter() {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }

    fn raise_isr(&self, bits: u8) {
        self.isr.fetch_or(bits, Ordering::AcqRel);
    }
}

/// The [`VirtioInterrupt`] of a virtio-pci function: queue and configuration
/// interrupts go to the MSI-X vectors the driver assigned in the common configuration;
/// [`NO_VECTOR`] means the driver wants no interrupt. The ISR byte is kept coherent
/// either way.
pub struct PciInterrupt {
    shared: Arc<SharedState>,
    trigger: Arc<dyn VectorTrigger>,
}

impl PciInterrupt {
    /// An interrupt handle over `shared` delivering through `trigger`.
    pub fn new(shared: Arc<SharedState>, trigger: Arc<dyn VectorTrigger>) -> Self {
        Self { shared, trigger }
    }

    fn fire(&self, vector: u16) -> std::io::Result<()> {
        if vector == NO_VECTOR {
            return Ok(());
        }
        self.trigger.trigger(vector)
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) -> std::io::Result<()> {
        self.shared.raise_isr(ISR_QUEUE);
        self.fire(self.shared.queue_vector(queue))
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.shared.bump_config_generation();
        self.shared.raise_isr(ISR_CONFIG);
        self.fire(self.shared.config_vector())
    }

    fn device_error(&self) {
        if !self.shared.needs_reset.swap(true, Ordering::AcqRel) {
            debug!("virtio-pci: device error, DEVICE_NEEDS_RESET");
        }
        self.shared.raise_isr(ISR_CONFIG);
        if let Err(e) = self.fire(self.shared.config_vector()) {
            warn!("virtio-pci: config interrupt for DEVICE_NEEDS_RESET failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fired(Mutex<Vec<u16>>);
    impl VectorTrigger for Fired {
        fn trigger(&self, vector: u16) -> std::io::Result<()> {
            self.0.lock().unwrap().push(vector);
            Ok(())
        }
    }

    fn setup() -> (Arc<SharedState>, Arc<Fired>, PciInterrupt) {
        let shared = Arc::new(SharedState::new(2));
        let fired = Arc::new(Fired::default());
        let irq = PciInterrupt::new(shared.clone(), fired.clone());
        (shared, fired, irq)
    }

    #[test]
    fn queue_and_config_vectors() {
        let (shared, fired, irq) = setup();
        irq.signal_queue(0).unwrap();
        irq.signal_config().unwrap();
        assert!(
            fired.0.lock().unwrap().is_empty(),
            "NO_VECTOR fires nothing"
        );
        assert_eq!(shared.take_isr(), ISR_QUEUE | ISR_CONFIG);
        assert_eq!(shared.take_isr(), 0);
        shared.set_queue_vector(0, 1);
        shared.set_queue_vector(1, 2);
        shared.set_queue_vector(7, 3);
        shared.set_config_vector(0);
        irq.signal_queue(1).unwrap();
        irq.signal_queue(0).unwrap();
        irq.signal_queue(9).unwrap();
        irq.signal_config().unwrap();
        assert_eq!(*fired.0.lock().unwrap(), vec![2, 1, 0]);
        assert_eq!(shared.config_generation(), 2);
    }

    #[test]
    fn device_error_sets_needs_reset_and_fires_config() {
        let (shared, fired, irq) = setup();
        shared.set_config_vector(3);
        irq.device_error();
        assert!(shared.needs_reset());
        assert_eq!(shared.isr(), ISR_CONFIG);
        assert_eq!(*fired.0.lock().unwrap(), vec![3]);
        shared.reset();
        assert!(!shared.needs_reset());
        assert_eq!(shared.isr(), 0);
        assert_eq!(shared.config_vector(), NO_VECTOR);
        assert_eq!(shared.queue_vector(0), NO_VECTOR);
    }
}
