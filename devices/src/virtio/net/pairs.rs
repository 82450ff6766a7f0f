//! Which queue pairs are in use (virtio 1.2, 5.1.6.5.5): pair 0 from activation on, the
//! first `n` after VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET. The control queue's worker changes
//! the count; every pair worker reads it with one atomic load and is woken through its
//! own eventfd, so the data path takes no lock. The TAP queues of pairs out of use are
//! detached, so the host does not steer frames to a queue nobody reads.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use super::backend::TapQueue;

/// Whether each host queue is attached; outlives activations (the TAP keeps its state).
pub type AttachState = Arc<Mutex<Vec<bool>>>;

/// The queue pairs of one activation.
pub struct Pairs {
    active: AtomicU16,
    queues: Vec<Arc<dyn TapQueue>>,
    /// Pairs that have a worker (the driver enabled both of their queues).
    present: Vec<bool>,
    attached: AttachState,
    /// One wake-up eventfd per pair worker (`None` for pairs without a worker).
    wakes: Vec<Option<EventFd>>,
}

impl Pairs {
    /// Pair 0 in use. `present[i]`: pair `i` has a worker, woken through `wakes[i]`.
    pub fn new(
        queues: Vec<Arc<dyn TapQueue>>,
        present: Vec<bool>,
        attached: AttachState,
        wakes: Vec<Option<EventFd>>,
    ) -> Self {
        Self {
            active: AtomicU16::new(1),
            queues,
            present,
            attached,
            wakes,
        }
    }

    /// Number of pairs the driver uses.
    pub fn active(&self) -> u16 {
        self.active.load(Ordering::Acquire)
    }

    /// Whether pair `pair` is in use (pair 0 always is).
    pub fn is_enabled(&self, pair: u16) -> bool {
        pair == 0 || pair < self.active()
    }

    /// Most queue pairs.
    pub fn max(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Uses the first `n` pairs: attaches their host queues (those with a worker),
    /// detaches the others (queue 0 never), then wakes every worker. Returns the first
    /// attach/detach error; the other queues are still updated.
    pub fn set_active(&self, n: u16) -> io::Result<()> {
        let mut result = Ok(());
        {
            let mut attached = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
            for (i, queue) in self.queues.iter().enumerate().skip(1) {
                let want = i < usize::from(n) && self.present.get(i).copied().unwrap_or(false);
                let Some(state) = attached.get_mut(i) else {
                    continue;
                };
                if *state == want {
                    continue;
                }
                match queue.set_enabled(want) {
                    Ok(()) => *state = want,
                    Err(e) => {
                        tracing::warn!("virtio-net: cannot attach/detach host queue {i}: {e}");
                        if result.is_ok() {
                            result = Err(e);
                        }
                    }
                }
            }
        }
        self.active.store(n.max(1), Ordering::Release);
        for wake in self.wakes.iter().flatten() {
            if let Err(e) = wake.write(1) {
                tracing::warn!("virtio-net: cannot wake a queue worker: {e}");
            }
        }
        result
    }
}
