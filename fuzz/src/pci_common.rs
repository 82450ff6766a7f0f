//! What the PCI targets share: host MSI-X vectors that check how the device model
//! uses them ([`Vectors`]), a virtio device that checks what the transport hands it
//! ([`Probe`]), and a tracker of the BAR decoding changes the root complex reports
//! ([`BarTracker`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ferrio_devices::virtio::features::VIRTIO_F_EVENT_IDX;
use ferrio_devices::virtio::ring::{self, read_config_bytes};
use ferrio_devices::virtio::VirtioInterrupt;
use ferrio_devices::virtio::{ActivateError, Activation, ActiveQueue, VirtioDevice};
use ferrio_pci::{BarMapping, ConfigChange, MsiMessage, MsiVectors, PciAddress};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use crate::guest::Mem;
use crate::input::Input;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Host MSI-X vectors: only vectors below `count` are routed or fired, and every
/// routing change is committed before the guest access that made it returns.
pub struct Vectors {
    count: u16,
    /// Vectors fired since the last [`Vectors::take_fired`].
    fired: Mutex<Vec<u16>>,
    uncommitted: AtomicUsize,
    /// Dropped with the function that owns them (a VF's): counts live sets.
    live: Option<Arc<AtomicUsize>>,
}

impl Vectors {
    pub fn new(count: u16) -> Arc<Self> {
        Arc::new(Self {
            count,
            fired: Mutex::default(),
            uncommitted: AtomicUsize::new(0),
            live: None,
        })
    }

    /// A set counted in `live` while it exists.
    pub fn counted(count: u16, live: &Arc<AtomicUsize>) -> Arc<Self> {
        live.fetch_add(1, Ordering::SeqCst);
        Arc::new(Self {
            count,
            fired: Mutex::default(),
            uncommitted: AtomicUsize::new(0),
            live: Some(live.clone()),
        })
    }

    pub fn take_fired(&self) -> Vec<u16> {
        std::mem::take(&mut *lock(&self.fired))
    }

    /// Vectors fired since the last [`Vectors::take_fired`], left in place.
    pub fn peek_fired(&self) -> Vec<u16> {
        lock(&self.fired).clone()
    }

    /// Routing changes not committed yet (0 between guest accesses).
    pub fn uncommitted(&self) -> usize {
        self.uncommitted.load(Ordering::SeqCst)
    }
}

impl Drop for Vectors {
    fn drop(&mut self) {
        if let Some(live) = &self.live {
            live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl MsiVectors for Vectors {
    fn count(&self) -> u16 {
        self.count
    }

    fn set_message(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()> {
        assert!(
            vector < self.count,
            "route for vector {vector} of {}",
            self.count
        );
        assert_eq!(msg.address & 3, 0, "unaligned MSI address {msg:?}");
        self.uncommitted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn commit(&self) -> std::io::Result<()> {
        self.uncommitted.store(0, Ordering::SeqCst);
        Ok(())
    }

    fn fire(&self, vector: u16) -> std::io::Result<()> {
        assert!(
            vector < self.count,
            "fired vector {vector} of {}",
            self.count
        );
        lock(&self.fired).push(vector);
        Ok(())
    }

    fn eventfd(&self, _vector: u16) -> Option<&EventFd> {
        None
    }
}

/// What the transport gave the [`Probe`] device.
#[derive(Default)]
pub struct ProbeState {
    pub acked: u64,
    pub activations: usize,
    pub resets: usize,
    pub active: Option<(Mem, Vec<ActiveQueue>, Arc<dyn VirtioInterrupt>)>,
    /// The device refuses the next activations.
    pub refuse: bool,
}

/// A virtio device with queues but no worker: it checks each activation against the
/// virtio-pci contract and serves its queues when the harness says so.
pub struct Probe {
    pub device_type: u32,
    pub queue_max_sizes: Vec<u16>,
    pub features: u64,
    pub config: Vec<u8>,
    pub state: Arc<Mutex<ProbeState>>,
}

impl Probe {
    /// A probe from the input: `u8` type (net, block, console, iommu), `u8` queue
    /// count (1..=8), `u8` max size log2 per queue, `u64` features.
    pub fn read(inp: &mut Input<'_>) -> Probe {
        let device_type = [1, 2, 3, 23][usize::from(inp.u8() % 4)];
        let queues = usize::from(inp.u8() % 8) + 1;
        let queue_max_sizes = (0..queues).map(|_| 1u16 << (inp.u8() % 16)).collect();
        Probe {
            device_type,
            queue_max_sizes,
            features: inp.u64(),
            config: (0..24u8).collect(),
            state: Arc::default(),
        }
    }
}

impl VirtioDevice<Mem> for Probe {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn set_acked_features(&mut self, features: u64) {
        lock(&self.state).acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(slot) = at.and_then(|a| self.config.get_mut(a)) {
                *slot = *b;
            }
        }
    }

    fn activate(&mut self, act: Activation<Mem>) -> Result<(), ActivateError> {
        let mut s = lock(&self.state);
        assert!(s.active.is_none(), "activated twice without a reset");
        s.activations += 1;
        let event_idx = s.acked & VIRTIO_F_EVENT_IDX != 0;
        let mut seen = vec![false; self.queue_max_sizes.len()];
        for q in &act.queues {
            let i = usize::from(q.index);
            assert!(
                i < seen.len() && !seen[i],
                "queue {i} out of range or twice"
            );
            seen[i] = true;
            let size = q.queue.size();
            assert!(size.is_power_of_two() && size <= self.queue_max_sizes[i]);
            assert!(
                q.queue.ready() && q.queue.is_valid(&act.mem),
                "queue {i} invalid"
            );
            assert_eq!(
                q.queue.event_idx_enabled(),
                event_idx,
                "queue {i} event idx"
            );
        }
        if s.refuse {
            return Err(ActivateError::Invalid("refused by the fuzz probe".into()));
        }
        s.active = Some((act.mem, act.queues, act.interrupt));
        Ok(())
    }

    fn reset(&mut self) {
        let mut s = lock(&self.state);
        s.resets += 1;
        s.active = None;
    }
}

/// Serves every active queue of `state` once (each chain returned with length 0) and
/// signals as a worker would; a ring error reports DEVICE_NEEDS_RESET.
pub fn serve_probe(state: &Mutex<ProbeState>) {
    let mut s = lock(state);
    let Some((mem, queues, irq)) = s.active.as_mut() else {
        return;
    };
    for q in queues.iter_mut() {
        let mut failed = false;
        let served = ring::serve_batch(&mut q.queue, &*mem, 64, |queue| {
            let Some(chain) = ring::pop_chain(queue, &*mem)? else {
                return Ok(ring::Step::Empty);
            };
            let head = chain.head_index();
            ring::return_chain("probe", queue, &*mem, head, 0)?;
            Ok(ring::Step::Next)
        });
        match served.and_then(|_| ring::needs_notification(&mut q.queue, &*mem)) {
            Ok(true) => {
                let _ = irq.signal_queue(q.index);
            }
            Ok(false) => {}
            Err(_) => failed = true,
        }
        if failed {
            irq.device_error();
        }
    }
}

/// The BAR decoding the root complex reported, per function and BAR: each report
/// must start where the previous one ended.
#[derive(Default)]
pub struct BarTracker {
    pub mapped: HashMap<(PciAddress, u8), u64>,
}

impl BarTracker {
    pub fn apply(&mut self, address: PciAddress, m: &BarMapping) {
        let key = (address, m.index);
        let cur = self.mapped.get(&key).copied();
        assert_eq!(cur, m.old, "BAR report of {address} does not chain: {m:?}");
        assert!(m.size.is_power_of_two() && m.size >= 0x1000, "{m:?}");
        match m.new {
            Some(new) => {
                assert_eq!(new % m.size, 0, "BAR of {address} misaligned: {m:?}");
                self.mapped.insert(key, new);
            }
            None => {
                self.mapped.remove(&key);
            }
        }
    }

    /// Applies the BAR changes of `changes`; returns them for VF handling.
    pub fn apply_all(&mut self, changes: Vec<ConfigChange>) -> Vec<ConfigChange> {
        for c in &changes {
            if let Some((a, m)) = c.as_bar() {
                self.apply(a, &m);
            }
        }
        changes
    }

    /// Whether any BAR of `address` is still decoded.
    pub fn any_mapped(&self, address: PciAddress) -> bool {
        self.mapped.keys().any(|(a, _)| *a == address)
    }

    /// Forgets the BARs of a function that went away (checked unmapped first).
    pub fn forget(&mut self, address: PciAddress) {
        self.mapped.retain(|(a, _), _| *a != address);
    }
}

/// An access size: 1, 2, 4 or 8 bytes.
pub fn access_len(b: u8) -> usize {
    1 << (b % 4)
}
