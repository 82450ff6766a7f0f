//! virtio-blk (virtio 1.2, 5.2): a disk backed by a [`BlockBackend`] (a raw image file:
//! [`FileBackend`]).
//!
//! Each queue the driver enables gets its own worker thread (`virtio-blk-q<N>`, module
//! `worker`), woken by the queue's notify eventfd, running the configured
//! [`IoEngine`] (synchronous system calls, or io_uring with a batch in flight); with VIRTIO_BLK_F_MQ the transport
//! already gives every queue its own MSI-X vector and ioeventfd. The ring handling is in
//! [`queue`], request parsing and execution in [`request`] (both free of threads), and
//! data moves between the backend and guest memory with vectored system calls on
//! pointers into guest memory, without a bounce buffer ([`backend`]).
//!
//! Behind an IOMMU each request holds a guard of the activation's DMA tracker from the
//! pop of its chain to its used element (an io_uring request keeps it while in
//! flight), none while the backend syncs or discards, and none while a worker waits. A
//! data buffer the mapping refuses fails its request with IOERR before any byte moves.
//!
//! Durability: VIRTIO_BLK_F_FLUSH is offered, so writes may sit in the host page cache
//! until a FLUSH request, which completes only after `fdatasync` returned. A driver that
//! does not negotiate FLUSH gets write-through: every write, discard and write-zeroes
//! is synced before it completes (5.2.6.3).
//!
//! Configuration space: `struct virtio_blk_config` up to and including
//! `write_zeroes_may_unmap` and its padding (60 bytes; the secure-erase and zoned
//! fields are not offered), little endian, read-only (writes are ignored).

pub mod backend;
mod engine;
mod exec;
mod io;
pub mod queue;
pub mod request;
pub mod uring;
mod worker;

#[cfg(test)]
mod tests;

use std::mem::offset_of;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::QueueT;
use vm_memory::GuestMemory;

pub use self::backend::{BlockBackend, FileBackend, IoBuf, IoBufMut};
pub use self::engine::IoEngine;
pub use self::request::{Disk, Limits, ID_BYTES, SECTOR_SIZE};
pub use self::uring::UringError;
use self::uring::UringRing;
use self::worker::{EngineSetup, Worker, WorkerCtx};
use super::features::{VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};
use super::worker_util::{stop_all, ThreadHook};
use super::{device_type, queue_slots, ActivateError, Activation, VirtioDevice};

/// Most queues a device may have (one worker thread each).
pub const MAX_QUEUES: u16 = 64;
/// Size of the configuration space the device exposes.
pub const CONFIG_SIZE: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// Why a device cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("the serial is {0} bytes long; at most 20 fit")]
    SerialTooLong(usize),
    #[error("{0} queues requested; 1 to {MAX_QUEUES} are supported")]
    QueueCount(u16),
    #[error("queue size {0} is not a power of two between 4 and 32768")]
    QueueSize(u16),
    #[error("invalid limit: {0}")]
    Limit(&'static str),
    #[error("io_engine=uring: {0}")]
    Uring(#[from] UringError),
}

/// How the disk is presented to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Offer VIRTIO_BLK_F_RO and fail every write.
    pub read_only: bool,
    /// The GET_ID answer, at most 20 bytes (none: the guest reads an empty id).
    pub serial: Option<String>,
    /// Number of request queues (VIRTIO_BLK_F_MQ when more than 1).
    pub num_queues: u16,
    /// Maximum size of each queue; `seg_max` is `queue_size - 2`, so a request of
    /// `seg_max` segments fits the ring even without indirect descriptors.
    pub queue_size: u16,
    /// Largest data segment in bytes (`size_max`, at least 4096).
    pub size_max: u32,
    /// Most sectors per discard segment (`max_discard_sectors`).
    pub max_discard_sectors: u32,
    /// Most segments per discard request (`max_discard_seg`).
    pub max_discard_seg: u32,
    /// Alignment hint for discards, in sectors (`discard_sector_alignment`).
    pub discard_sector_alignment: u32,
    /// Most sectors per write-zeroes segment (`max_write_zeroes_sectors`).
    pub max_write_zeroes_sectors: u32,
    /// Most segments per write-zeroes request (`max_write_zeroes_seg`).
    pub max_write_zeroes_seg: u32,
    /// How requests are executed.
    pub io_engine: IoEngine,
}

impl Default for BlockConfig {
    fn default() -> Self {
        Self {
            read_only: false,
            serial: None,
            num_queues: 1,
            queue_size: 256,
            size_max: 1 << 20,
            // QEMU's limit: the largest request below 2 GiB.
            max_discard_sectors: (i32::MAX as u32) >> 9,
            max_discard_seg: 32,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: (i32::MAX as u32) >> 9,
            max_write_zeroes_seg: 32,
            io_engine: IoEngine::Sync,
        }
    }
}

/// Device state.
enum State {
    Inactive,
    /// One worker per enabled queue.
    Active(Vec<Worker>),
}

/// A virtio-blk device.
pub struct VirtioBlock {
    backend: Arc<dyn BlockBackend>,
    config: BlockConfig,
    id: [u8; ID_BYTES],
    /// Disk size in sectors (a partial last sector is not exposed).
    capacity: u64,
    limits: Limits,
    queue_sizes: Vec<u16>,
    acked_features: u64,
    state: State,
    /// Runs first in every worker thread.
    thread_hook: ThreadHook,
}

impl VirtioBlock {
    /// A disk on `backend` presented as `config` says.
    pub fn new(backend: Box<dyn BlockBackend>, config: BlockConfig) -> Result<Self, BlockError> {
        let mut id = [0u8; ID_BYTES];
        if let Some(serial) = &config.serial {
            let bytes = serial.as_bytes();
            if bytes.len() > ID_BYTES {
                return Err(BlockError::SerialTooLong(bytes.len()));
            }
            id[..bytes.len()].copy_from_slice(bytes);
        }
        if config.num_queues == 0 || config.num_queues > MAX_QUEUES {
            return Err(BlockError::QueueCount(config.num_queues));
        }
        if !config.queue_size.is_power_of_two() || !(4..=32768).contains(&config.queue_size) {
            return Err(BlockError::QueueSize(config.queue_size));
        }
        if config.size_max < 4096 {
            return Err(BlockError::Limit("size_max below 4096"));
        }
        let nonzero = [
            (config.max_discard_sectors, "max_discard_sectors is 0"),
            (config.max_discard_seg, "max_discard_seg is 0"),
            (
                config.discard_sector_alignment,
                "discard_sector_alignment is 0",
            ),
            (
                config.max_write_zeroes_sectors,
                "max_write_zeroes_sectors is 0",
            ),
            (config.max_write_zeroes_seg, "max_write_zeroes_seg is 0"),
        ];
        if let Some((_, why)) = nonzero.iter().find(|(value, _)| *value == 0) {
            return Err(BlockError::Limit(why));
        }
        if config.io_engine == IoEngine::Uring {
            // Fail now (at VMM start) rather than at activation: no silent fallback.
            backend.raw_file().ok_or(UringError::NoFile)?;
            uring::probe()?;
        }
        let size = backend.size();
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                "virtio-blk: image size {size} is not a multiple of 512; the tail is not exposed"
            );
        }
        let limits = Limits {
            seg_max: u32::from(config.queue_size) - 2,
            size_max: config.size_max,
            max_discard_sectors: config.max_discard_sectors,
            max_discard_seg: config.max_discard_seg,
            max_write_zeroes_sectors: config.max_write_zeroes_sectors,
            max_write_zeroes_seg: config.max_write_zeroes_seg,
        };
        Ok(Self {
            backend: Arc::from(backend),
            id,
            capacity: size / SECTOR_SIZE,
            limits,
            queue_sizes: vec![config.queue_size; usize::from(config.num_queues)],
            config,
            acked_features: 0,
            state: State::Inactive,
            thread_hook: ThreadHook::default(),
        })
    }

    /// Runs `hook` first thing in every worker thread (see [`ThreadHook`]).
    pub fn with_thread_hook(mut self, hook: ThreadHook) -> Self {
        self.thread_hook = hook;
        self
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The limits the device advertises and enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether workers are running (between activation and reset).
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active(_))
    }

    fn offered_features(&self) -> u64 {
        let mut bits = vec![
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ];
        if self.config.read_only {
            bits.push(VIRTIO_BLK_F_RO);
        }
        if self.config.num_queues > 1 {
            bits.push(VIRTIO_BLK_F_MQ);
        }
        bits.iter()
            .fold(VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC, |acc, bit| {
                acc | 1 << bit
            })
    }

    /// The configuration space (`struct virtio_blk_config`, little endian).
    pub fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            c[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        let l = &self.limits;
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.capacity.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, size_max),
            &l.size_max.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &l.seg_max.to_le_bytes(),
        );
        // geometry (cylinders, heads, sectors) stays 0: VIRTIO_BLK_F_GEOMETRY is not
        // offered.
        let blk_size = SECTOR_SIZE as u32;
        put(
            offset_of!(virtio_blk_config, blk_size),
            &blk_size.to_le_bytes(),
        );
        // Topology: physical block = logical block (exponent 0), no alignment offset,
        // minimum I/O one block, no optimal I/O size.
        put(
            offset_of!(virtio_blk_config, min_io_size),
            &1u16.to_le_bytes(),
        );
        let num_queues = self.config.num_queues;
        put(
            offset_of!(virtio_blk_config, num_queues),
            &num_queues.to_le_bytes(),
        );
        let words = [
            (
                offset_of!(virtio_blk_config, max_discard_sectors),
                l.max_discard_sectors,
            ),
            (
                offset_of!(virtio_blk_config, max_discard_seg),
                l.max_discard_seg,
            ),
            (
                offset_of!(virtio_blk_config, discard_sector_alignment),
                self.config.discard_sector_alignment,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                l.max_write_zeroes_sectors,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                l.max_write_zeroes_seg,
            ),
        ];
        for (offset, value) in words {
            put(offset, &value.to_le_bytes());
        }
        // Write zeroes with UNMAP punches holes.
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        c
    }

    fn start<M: GuestMemory + Clone + Send + 'static>(
        &mut self,
        activation: Activation<M>,
    ) -> Result<(), ActivateError> {
        if self.is_active() {
            return Err(ActivateError::Invalid(
                "virtio-blk is already active".into(),
            ));
        }
        let Activation {
            mem,
            queues,
            interrupt,
            dma,
        } = activation;
        let event_idx = self.acked_features & VIRTIO_F_EVENT_IDX != 0;
        let slots = queue_slots("virtio-blk", queues, self.queue_sizes.len(), event_idx)?;
        if slots.iter().all(Option::is_none) {
            return Err(ActivateError::MissingQueue(0));
        }
        let disk = Arc::new(Disk {
            backend: self.backend.clone(),
            capacity: self.capacity,
            read_only: self.config.read_only,
            id: self.id,
            limits: self.limits,
            features: self.acked_features,
        });
        let mut workers = Vec::new();
        for queue in slots.into_iter().flatten() {
            let engine = match self.engine_setup(queue.queue.size()) {
                Ok(engine) => engine,
                Err(e) => {
                    stop_all(workers);
                    return Err(ActivateError::Worker(std::io::Error::other(e)));
                }
            };
            let ctx = WorkerCtx {
                mem: mem.clone(),
                queue,
                disk: disk.clone(),
                interrupt: interrupt.clone(),
                engine,
                dma: dma.clone(),
            };
            match worker::spawn(&self.thread_hook, ctx) {
                Ok(worker) => workers.push(worker),
                Err(e) => {
                    stop_all(workers);
                    return Err(ActivateError::Worker(e));
                }
            }
        }
        tracing::debug!(
            "virtio-blk: activated with {} queue(s) (event_idx: {event_idx})",
            workers.len()
        );
        self.state = State::Active(workers);
        Ok(())
    }

    /// The engine of a queue of `size` entries.
    fn engine_setup(&self, size: u16) -> Result<EngineSetup, UringError> {
        match self.config.io_engine {
            IoEngine::Sync => Ok(EngineSetup::Sync),
            IoEngine::Uring => {
                let fd = self.backend.raw_file().ok_or(UringError::NoFile)?;
                Ok(EngineSetup::Uring(Box::new(UringRing::new(fd, size)?)))
            }
        }
    }

    /// Stops the workers, if any, and waits for them.
    fn stop(&mut self) {
        if let State::Active(workers) = std::mem::replace(&mut self.state, State::Inactive) {
            stop_all(workers);
        }
    }
}

impl<M: GuestMemory + Clone + Send + 'static> VirtioDevice<M> for VirtioBlock {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.offered_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.offered_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::ring::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "virtio-blk: ignored config write of {} byte(s) at {offset:#x}",
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

impl Drop for VirtioBlock {
    fn drop(&mut self) {
        self.stop();
    }
}
