//! The virtio-iommu device (virtio 1.2, 5.13): features, configuration space,
//! activation and reset. Queue 0 is the requestq, queue 1 the eventq; a worker thread
//! named `virtio-iommu` serves both while the device is active (module `worker`).
//!
//! Offered: VIRTIO_IOMMU_F_INPUT_RANGE (48-bit), F_DOMAIN_RANGE, F_MAP_UNMAP, F_PROBE
//! (one RESV_MEM property: the MSI doorbell) and VIRTIO_F_EVENT_IDX. Not offered:
//! F_BYPASS, F_BYPASS_CONFIG (`bypass` reads 0: unattached endpoints fault) and F_MMIO.

use std::sync::{Arc, Mutex};

use ferrio_devices::virtio::features::VIRTIO_F_EVENT_IDX;
use ferrio_devices::virtio::ring::read_config_bytes;
use ferrio_devices::virtio::worker_util::ThreadHook;
use ferrio_devices::virtio::{
    device_type, queue_slots, required_queue, ActivateError, Activation, VirtioDevice,
};
use vm_memory::GuestMemory;

use crate::domain::{Shared, State};
use crate::endpoint::Endpoint;
use crate::fault::FaultQueue;
use crate::mapping::{INPUT_END, INPUT_START, PAGE_SIZE};
use crate::request::{RequestCtx, PROPERTY_HEAD_SIZE, RESV_MEM_SIZE};
use crate::worker::{Worker, WorkerCtx};

/// The available range of virtual addresses is in `input_range`.
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u64 = 1 << 0;
/// The valid domain ids are in `domain_range`.
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u64 = 1 << 1;
/// MAP and UNMAP requests are available.
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u64 = 1 << 2;
/// Unattached endpoints bypass the IOMMU (not offered).
pub const VIRTIO_IOMMU_F_BYPASS: u64 = 1 << 3;
/// PROBE requests are available.
pub const VIRTIO_IOMMU_F_PROBE: u64 = 1 << 4;
/// The MMIO map flag is available (not offered).
pub const VIRTIO_IOMMU_F_MMIO: u64 = 1 << 5;
/// `bypass` and ATTACH_F_BYPASS (not offered).
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u64 = 1 << 6;

/// Index of the requestq.
pub const REQUEST_QUEUE: u16 = 0;
/// Index of the eventq.
pub const EVENT_QUEUE: u16 = 1;
/// Maximum size of each queue.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Size of `struct virtio_iommu_config`.
pub const CONFIG_SIZE: usize = 40;
/// Smallest `probe_size`: the MSI RESV_MEM property and an empty property after it.
pub const MIN_PROBE_SIZE: u32 = (RESV_MEM_SIZE + PROPERTY_HEAD_SIZE) as u32;
/// Largest `probe_size` accepted.
pub const MAX_PROBE_SIZE: u32 = 64 * 1024;

const QUEUE_MAX_SIZES: [u16; 2] = [QUEUE_MAX_SIZE, QUEUE_MAX_SIZE];

/// Why the VMM's call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("endpoint {0:#x} is already registered")]
    DuplicateEndpoint(u32),
}

/// Device parameters.
#[derive(Debug, Clone)]
pub struct IommuConfig {
    /// Valid domain ids, inclusive (`domain_range`). Domains only exist while an
    /// endpoint is attached, so there are never more domains than endpoints.
    pub domain_range: (u32, u32),
    /// Size of the PROBE properties buffer (`probe_size`), clamped to
    /// [`MIN_PROBE_SIZE`]..=[`MAX_PROBE_SIZE`] and rounded up to 8 bytes.
    pub probe_size: u32,
    /// Mappings per domain at most; a MAP beyond fails with VIRTIO_IOMMU_S_NOMEM.
    pub max_mappings: usize,
    /// Faults waiting for eventq buffers at most; more are dropped (and counted).
    pub max_pending_faults: usize,
}

impl Default for IommuConfig {
    fn default() -> Self {
        Self {
            domain_range: (1, u32::MAX),
            probe_size: 512,
            max_mappings: 1 << 18,
            max_pending_faults: 64,
        }
    }
}

/// The virtio-iommu device.
pub struct VirtioIommu {
    shared: Arc<Shared>,
    domain_range: (u32, u32),
    probe_size: u32,
    acked_features: u64,
    worker: Option<Worker>,
    /// Runs first in the worker thread.
    thread_hook: ThreadHook,
}

impl VirtioIommu {
    /// A device with no endpoint yet; register them with
    /// [`VirtioIommu::add_endpoint`] before the guest runs.
    pub fn new(config: IommuConfig) -> Self {
        let probe_size = config
            .probe_size
            .clamp(MIN_PROBE_SIZE, MAX_PROBE_SIZE)
            .next_multiple_of(8);
        let (start, end) = config.domain_range;
        let domain_range = (start.min(end), start.max(end));
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new(domain_range, config.max_mappings.max(1))),
                faults: FaultQueue::new(config.max_pending_faults.max(1)),
            }),
            domain_range,
            probe_size,
            acked_features: 0,
            worker: None,
            thread_hook: ThreadHook::default(),
        }
    }

    /// Runs `hook` first thing in the worker thread (see [`ThreadHook`]).
    pub fn with_thread_hook(mut self, hook: ThreadHook) -> Self {
        self.thread_hook = hook;
        self
    }

    /// Registers the endpoint `id` (for PCI: `bus << 8 | devfn`) and returns it: the
    /// VMM builds the device's memory as
    /// `IommuMemory::new(guest_memory, endpoint.clone(), true, bitmap)` and gives the
    /// device `endpoint.dma_tracker()`. Until the guest attaches it to a domain, every
    /// access of the endpoint faults.
    pub fn add_endpoint(&self, id: u32) -> Result<Endpoint, Error> {
        let core = self
            .shared
            .lock()
            .add_endpoint(id)
            .ok_or(Error::DuplicateEndpoint(id))?;
        Ok(Endpoint::new(core, self.shared.clone()))
    }

    /// Registers a hardware endpoint `id` (a passed-through function, whose DMA the
    /// host IOMMU translates): the mappings of the domain it is attached to are kept
    /// in `mirror` (see [`crate::mirror`]). Its `Endpoint` is only needed for its id.
    pub fn add_hardware_endpoint(
        &self,
        id: u32,
        mirror: std::sync::Arc<dyn crate::DmaMirror>,
    ) -> Result<Endpoint, Error> {
        let core = self
            .shared
            .lock()
            .add_endpoint_with(id, Some(mirror))
            .ok_or(Error::DuplicateEndpoint(id))?;
        Ok(Endpoint::new(core, self.shared.clone()))
    }

    /// Faults dropped because too many were pending, since creation.
    pub fn dropped_faults(&self) -> u64 {
        self.shared.faults.dropped()
    }

    /// Faults waiting for eventq buffers.
    pub fn pending_faults(&self) -> usize {
        self.shared.faults.len()
    }

    /// Number of domains (endpoints attached to at least one).
    pub fn domain_count(&self) -> usize {
        self.shared.lock().domain_count()
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Whether a worker is running (between activation and reset).
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Serves the queues once on the calling thread, as the worker does when the guest
    /// kicks them: every available request of `requests`, then the pending faults into
    /// `events`, with the features acked so far. For the fuzz targets in `fuzz/`, which
    /// drive the device without its worker (do not activate it as well).
    #[cfg(feature = "test-utils")]
    pub fn serve_queues<M: GuestMemory>(
        &self,
        requests: &mut virtio_queue::Queue,
        events: &mut virtio_queue::Queue,
        mem: &M,
    ) -> Result<
        (crate::queue::RequestStats, crate::queue::EventStats),
        ferrio_devices::virtio::ring::RingError,
    > {
        let request_ctx = RequestCtx {
            map_unmap: self.acked_features & VIRTIO_IOMMU_F_MAP_UNMAP != 0,
            probe: self.acked_features & VIRTIO_IOMMU_F_PROBE != 0,
            probe_size: self.probe_size,
        };
        let requests = crate::queue::process_requests(requests, mem, &self.shared, &request_ctx)?;
        let events = crate::queue::post_faults(events, mem, &self.shared.faults)?;
        Ok((requests, events))
    }

    fn offered_features(&self) -> u64 {
        VIRTIO_IOMMU_F_INPUT_RANGE
            | VIRTIO_IOMMU_F_DOMAIN_RANGE
            | VIRTIO_IOMMU_F_MAP_UNMAP
            | VIRTIO_IOMMU_F_PROBE
            | VIRTIO_F_EVENT_IDX
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&PAGE_SIZE.to_le_bytes());
        c[8..16].copy_from_slice(&INPUT_START.to_le_bytes());
        c[16..24].copy_from_slice(&INPUT_END.to_le_bytes());
        c[24..28].copy_from_slice(&self.domain_range.0.to_le_bytes());
        c[28..32].copy_from_slice(&self.domain_range.1.to_le_bytes());
        c[32..36].copy_from_slice(&self.probe_size.to_le_bytes());
        // bypass (36) = 0, reserved (37..40).
        c
    }

    fn start<M: GuestMemory + Send + 'static>(
        &mut self,
        activation: Activation<M>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Invalid(
                "virtio-iommu is already active".into(),
            ));
        }
        let Activation {
            mem,
            queues,
            interrupt,
            // The IOMMU's own queues are in guest-physical memory: nothing to track.
            dma: _,
        } = activation;
        let event_idx = self.acked_features & VIRTIO_F_EVENT_IDX != 0;
        let mut slots = queue_slots("virtio-iommu", queues, QUEUE_MAX_SIZES.len(), event_idx)?;
        let requests = required_queue(&mut slots, REQUEST_QUEUE)?;
        let events = required_queue(&mut slots, EVENT_QUEUE)?;
        let request_ctx = RequestCtx {
            map_unmap: self.acked_features & VIRTIO_IOMMU_F_MAP_UNMAP != 0,
            probe: self.acked_features & VIRTIO_IOMMU_F_PROBE != 0,
            probe_size: self.probe_size,
        };
        let worker = Worker::spawn(
            &self.thread_hook,
            WorkerCtx {
                mem,
                requests,
                events,
                interrupt,
                shared: self.shared.clone(),
                request_ctx,
            },
        )?;
        tracing::debug!("virtio-iommu: activated (event_idx: {event_idx})");
        self.worker = Some(worker);
        Ok(())
    }

    /// Stops the worker, then forgets every domain and mapping: endpoints fault until
    /// the guest attaches them again. Returns once the DMA that was in flight on the
    /// old translations has finished.
    fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        let fence = self.shared.lock().reset();
        fence.wait();
        self.shared.faults.clear();
    }
}

impl<M: GuestMemory + Send + 'static> VirtioDevice<M> for VirtioIommu {
    fn device_type(&self) -> u32 {
        device_type::IOMMU
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn device_features(&self) -> u64 {
        self.offered_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.offered_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Without VIRTIO_IOMMU_F_BYPASS_CONFIG every field is read-only.
        tracing::debug!(
            "virtio-iommu: ignored config write of {} byte(s) at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
        self.start(activation)
    }

    fn reset(&mut self) {
        self.stop();
        self.acked_features = 0;
    }

    fn set_thread_hook(&mut self, hook: ThreadHook) {
        self.thread_hook = hook;
    }
}

impl Drop for VirtioIommu {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
