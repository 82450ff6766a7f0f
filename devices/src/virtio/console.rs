//! virtio-console (virtio 1.2, 5.3): one console port, no VIRTIO_CONSOLE_F_MULTIPORT.
//!
//! Queue 0 is the receiveq (host input to the guest), queue 1 the transmitq (guest
//! output). Guest output goes to a `Write` sink given at construction; host input comes
//! from an [`InputSource`] (any readable fd: stdin, a file, a Unix socket). While the
//! device is active a worker thread named `virtio-console` serves both queues
//! (module `worker`); the ring handling itself lives in [`queue`], free of threads.
//! Behind an IOMMU the queue functions touch guest memory only under a guard of the
//! activation's DMA tracker, and put it down while the sink writes.
//!
//! Input is read only while fewer than [`MAX_PENDING_INPUT`] bytes wait for guest
//! buffers, so a fast producer is back-pressured, never dropped; pending bytes survive a
//! device reset. Configuration space (5.3.4): `cols`, `rows` (valid with
//! VIRTIO_CONSOLE_F_SIZE, offered when a size was given), `max_nr_ports` (1) and
//! `emerg_wr` (VIRTIO_CONSOLE_F_EMERG_WRITE): a write there outputs one character.

pub mod queue;
mod worker;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::GuestMemory;

use self::worker::{HostInput, Worker, WorkerCtx};
use super::features::VIRTIO_F_EVENT_IDX;
use super::worker_util::ThreadHook;
use super::{
    device_type, queue_slots, required_queue, ActivateError, Activation, VirtioDevice,
    VirtioInterrupt,
};

/// The device reports `cols` and `rows` in its configuration space.
pub const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
/// Multiple ports and control queues (not offered).
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
/// The driver may write single characters through `emerg_wr`.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u64 = 1 << 2;

/// Index of the receiveq (host to guest).
pub const RX_QUEUE: u16 = 0;
/// Index of the transmitq (guest to host).
pub const TX_QUEUE: u16 = 1;
/// Maximum size of each queue.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Host input read ahead of the guest at most (bytes); beyond it the input source is
/// not read until the guest takes some.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;

const QUEUE_MAX_SIZES: [u16; 2] = [QUEUE_MAX_SIZE, QUEUE_MAX_SIZE];
/// Size of `struct virtio_console_config`.
const CONFIG_SIZE: usize = 12;
/// Offset of `emerg_wr` in the configuration space.
const EMERG_WR_OFFSET: u64 = 8;

/// The guest output sink, shared by the worker (transmitq) and `emerg_wr` writes.
type SharedSink = Arc<Mutex<Box<dyn Write + Send>>>;

/// Where host input for the guest comes from: an owned file descriptor that the worker
/// polls and reads with plain `read(2)` (no user-space buffering, so poll readiness is
/// exact). Any fd works: a terminal, a pipe, a regular file (always readable, until
/// EOF), a socket. A blocking fd is fine; it is only read after poll reports it
/// readable. Do not make a shared terminal fd non-blocking for this (stdout would share
/// the flag).
#[derive(Debug)]
pub struct InputSource(File);

impl InputSource {
    /// Input from any owned fd (`File`, `UnixStream`, `OwnedFd`, `ChildStdout`, ...).
    pub fn new(fd: impl Into<OwnedFd>) -> Self {
        Self(File::from(fd.into()))
    }

    /// Input from a duplicate of the process's standard input.
    pub fn stdin() -> io::Result<Self> {
        Ok(Self::new(io::stdin().as_fd().try_clone_to_owned()?))
    }
}

impl From<File> for InputSource {
    fn from(file: File) -> Self {
        Self::new(file)
    }
}

impl From<UnixStream> for InputSource {
    fn from(stream: UnixStream) -> Self {
        Self::new(stream)
    }
}

impl From<OwnedFd> for InputSource {
    fn from(fd: OwnedFd) -> Self {
        Self::new(fd)
    }
}

impl Read for InputSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl AsRawFd for InputSource {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for InputSource {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Device state: the host input lives in the worker while active.
enum State {
    /// Not running; holds the host input (and what is pending) for the next activation.
    Inactive(HostInput),
    /// The worker thread serves the queues.
    Active {
        worker: Worker,
        interrupt: Arc<dyn VirtioInterrupt>,
    },
}

/// A virtio-console device with one port.
pub struct VirtioConsole {
    sink: SharedSink,
    /// Terminal size (`cols`, `rows`), when VIRTIO_CONSOLE_F_SIZE is offered.
    size: Option<(u16, u16)>,
    acked_features: u64,
    state: State,
    /// Runs first in the worker thread.
    thread_hook: ThreadHook,
}

impl VirtioConsole {
    /// A console writing guest output to `output` and feeding it `input` (none: the
    /// guest's receiveq stays empty). VIRTIO_CONSOLE_F_SIZE is not offered; see
    /// [`VirtioConsole::with_size`].
    pub fn new(output: Box<dyn Write + Send>, input: Option<InputSource>) -> Self {
        Self {
            sink: Arc::new(Mutex::new(output)),
            size: None,
            acked_features: 0,
            state: State::Inactive(HostInput {
                source: input,
                pending: Default::default(),
            }),
            thread_hook: ThreadHook::default(),
        }
    }

    /// Runs `hook` first thing in the worker thread (see [`ThreadHook`]).
    pub fn with_thread_hook(mut self, hook: ThreadHook) -> Self {
        self.thread_hook = hook;
        self
    }

    /// Offers VIRTIO_CONSOLE_F_SIZE with an initial terminal size.
    pub fn with_size(mut self, cols: u16, rows: u16) -> Self {
        self.size = Some((cols, rows));
        self
    }

    /// Updates the terminal size (a host terminal resize) and, when the driver
    /// negotiated VIRTIO_CONSOLE_F_SIZE and the device is active, signals a
    /// configuration change. Ignored when the device was built without a size (the
    /// feature cannot appear after negotiation).
    pub fn set_size(&mut self, cols: u16, rows: u16) {
        if self.size.is_none() {
            tracing::debug!("virtio-console: no size feature; resize ignored");
            return;
        }
        self.size = Some((cols, rows));
        if let State::Active { interrupt, .. } = &self.state {
            if self.acked_features & VIRTIO_CONSOLE_F_SIZE != 0 {
                if let Err(e) = interrupt.signal_config() {
                    tracing::warn!("virtio-console: cannot signal the resize: {e}");
                }
            }
        }
    }

    /// Whether a worker is running (between activation and reset).
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active { .. })
    }

    fn offered_features(&self) -> u64 {
        let size = if self.size.is_some() {
            VIRTIO_CONSOLE_F_SIZE
        } else {
            0
        };
        VIRTIO_F_EVENT_IDX | VIRTIO_CONSOLE_F_EMERG_WRITE | size
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let (cols, rows) = self.size.unwrap_or((0, 0));
        let mut config = [0u8; CONFIG_SIZE];
        config[0..2].copy_from_slice(&cols.to_le_bytes());
        config[2..4].copy_from_slice(&rows.to_le_bytes());
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        // emerg_wr (8..12) is write-only and reads as 0.
        config
    }

    fn emergency_write(&self, byte: u8) {
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = sink.write_all(&[byte]).and_then(|()| sink.flush()) {
            tracing::warn!("virtio-console: emergency write lost: {e}");
        }
    }

    fn start<M: GuestMemory + Send + 'static>(
        &mut self,
        activation: Activation<M>,
    ) -> Result<(), ActivateError> {
        let State::Inactive(input) = &mut self.state else {
            return Err(ActivateError::Invalid(
                "virtio-console is already active".into(),
            ));
        };
        let Activation {
            mem,
            queues,
            interrupt,
            dma,
        } = activation;
        let event_idx = self.acked_features & VIRTIO_F_EVENT_IDX != 0;
        let mut slots = queue_slots("virtio-console", queues, QUEUE_MAX_SIZES.len(), event_idx)?;
        let rx = required_queue(&mut slots, RX_QUEUE)?;
        let tx = required_queue(&mut slots, TX_QUEUE)?;
        let ctx = WorkerCtx {
            mem,
            rx,
            tx,
            interrupt: interrupt.clone(),
            sink: self.sink.clone(),
            input: std::mem::take(input),
            dma,
        };
        let worker = worker::spawn(&self.thread_hook, ctx)?;
        tracing::debug!("virtio-console: activated (event_idx: {event_idx})");
        self.state = State::Active { worker, interrupt };
        Ok(())
    }

    /// Stops the worker, if any, keeping the host input for the next activation.
    fn stop(&mut self) {
        if !self.is_active() {
            return;
        }
        let state = std::mem::replace(&mut self.state, State::Inactive(HostInput::default()));
        if let State::Active { worker, .. } = state {
            self.state = State::Inactive(worker.stop().unwrap_or_default());
        }
    }

    /// Bytes of host input waiting for guest buffers (`None` while active: the worker
    /// owns them).
    #[cfg(test)]
    fn pending_input(&self) -> Option<usize> {
        match &self.state {
            State::Inactive(input) => Some(input.pending.len()),
            State::Active { .. } => None,
        }
    }
}

impl<M: GuestMemory + Send + 'static> VirtioDevice<M> for VirtioConsole {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
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
        super::ring::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr is a le32; take a 1..=4 byte write at its start, low byte first.
        match data.first() {
            Some(&byte) if offset == EMERG_WR_OFFSET && data.len() <= 4 => {
                self.emergency_write(byte)
            }
            _ => tracing::debug!(
                "virtio-console: ignored config write of {} byte(s) at {offset:#x}",
                data.len()
            ),
        }
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

impl Drop for VirtioConsole {
    fn drop(&mut self) {
        self.stop();
    }
}
