//! DMA fences: which guest-memory requests of a device are in flight.
//!
//! A device whose guest memory goes through an IOMMU takes a [`DmaGuard`] from its
//! endpoint's [`DmaTracker`] before it translates or touches a request's buffers, and
//! keeps it until it has finished with them (an asynchronous engine keeps it with the
//! in-flight request: the guard is `Send`). When the guest removes a mapping (an IOMMU
//! UNMAP or DETACH), the IOMMU first invalidates its translation caches and then calls
//! [`DmaTracker::wait_for_inflight`]: once that returns, every request that could have
//! translated through the old mapping is finished, so the guest may reuse the pages.
//!
//! The tracker is epoch based, like sleepable RCU: requests count themselves in the
//! current one of two epochs; a wait flips the epoch and waits only for the old one to
//! drain, so requests that start during the wait never delay it (a busy device cannot
//! starve an UNMAP). Waits are serialized with each other.
//!
//! Hold a guard only while the device actually uses guest memory: a guard kept while
//! waiting for the guest (a posted receive buffer, say) would stall the guest's UNMAP.
//! Devices not behind an IOMMU use [`DmaTracker::untracked`], whose guards cost nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// Shared state of a tracked [`DmaTracker`].
#[derive(Debug, Default)]
struct Inner {
    /// Requests in flight, per epoch parity.
    inflight: [AtomicUsize; 2],
    /// The current epoch; its low bit is the parity new requests count in.
    epoch: AtomicUsize,
    /// A waiter may be sleeping on `cond` (guards then notify when they drain an epoch).
    waiting: AtomicBool,
    /// Serializes waiters, and is the mutex `cond` sleeps with.
    wait_lock: Mutex<()>,
    /// Signalled when an epoch drains while a waiter is sleeping.
    drained_lock: Mutex<()>,
    cond: Condvar,
}

/// Tracks a device's in-flight guest-memory requests. Cheap to clone: clones share the
/// same counters.
#[derive(Debug, Clone, Default)]
pub struct DmaTracker {
    /// `None`: untracked (no IOMMU); guards cost nothing and waits return at once.
    inner: Option<Arc<Inner>>,
}

/// One request in flight: it counts until dropped.
#[derive(Debug)]
#[must_use = "the request is only tracked while the guard lives"]
pub struct DmaGuard {
    /// The tracker and the parity this request counted in; `None` when untracked.
    slot: Option<(Arc<Inner>, usize)>,
}

impl DmaTracker {
    /// A tracker whose requests are counted: for a device behind an IOMMU.
    pub fn new() -> Self {
        Self {
            inner: Some(Arc::new(Inner::default())),
        }
    }

    /// A tracker that counts nothing: for devices not behind an IOMMU. The same as
    /// `DmaTracker::default()`.
    pub fn untracked() -> Self {
        Self { inner: None }
    }

    /// Whether requests are counted (false for [`DmaTracker::untracked`]).
    pub fn is_tracked(&self) -> bool {
        self.inner.is_some()
    }

    /// Marks a request in flight until the returned guard is dropped. Take it before
    /// translating the request's addresses.
    pub fn begin(&self) -> DmaGuard {
        let Some(inner) = &self.inner else {
            return DmaGuard { slot: None };
        };
        loop {
            let epoch = inner.epoch.load(Ordering::SeqCst);
            let parity = epoch & 1;
            inner.inflight[parity].fetch_add(1, Ordering::SeqCst);
            // If a waiter flipped the epoch meanwhile, it may already have seen this
            // parity drained: count in the new epoch instead. Otherwise the flip comes
            // after our increment and the waiter will wait for us.
            if inner.epoch.load(Ordering::SeqCst) == epoch {
                return DmaGuard {
                    slot: Some((inner.clone(), parity)),
                };
            }
            release(inner, parity);
        }
    }

    /// Returns once every request whose [`DmaTracker::begin`] returned before this call
    /// has finished (dropped its guard). Requests that begin during the wait do not
    /// delay it. Blocks the calling thread; returns at once when untracked.
    pub fn wait_for_inflight(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        let _serial = inner
            .wait_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Every request of the other parity predates the previous wait's return, which
        // waited for them: only the current parity can hold requests older than us.
        let old = inner.epoch.fetch_add(1, Ordering::SeqCst) & 1;
        if inner.inflight[old].load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut drained = inner
            .drained_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        inner.waiting.store(true, Ordering::SeqCst);
        while inner.inflight[old].load(Ordering::SeqCst) != 0 {
            drained = inner
                .cond
                .wait(drained)
                .unwrap_or_else(PoisonError::into_inner);
        }
        inner.waiting.store(false, Ordering::SeqCst);
    }

    /// Requests in flight now (both epochs); for diagnostics and tests.
    pub fn inflight(&self) -> usize {
        self.inner.as_ref().map_or(0, |inner| {
            inner.inflight[0].load(Ordering::SeqCst) + inner.inflight[1].load(Ordering::SeqCst)
        })
    }
}

/// Ends one request counted in `parity`, waking a waiter if it drained that epoch.
fn release(inner: &Inner, parity: usize) {
    if inner.inflight[parity].fetch_sub(1, Ordering::SeqCst) == 1
        && inner.waiting.load(Ordering::SeqCst)
    {
        // Taking the lock orders this notification after the waiter's check of the
        // counter (it holds the lock from the check until it sleeps): no lost wake-up.
        let _drained = inner
            .drained_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        inner.cond.notify_all();
    }
}

impl Drop for DmaGuard {
    fn drop(&mut self) {
        if let Some((inner, parity)) = self.slot.take() {
            release(&inner, parity);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use super::*;

    /// Runs `wait_for_inflight` on another thread; the receiver gets a message when it
    /// returns.
    fn spawn_wait(tracker: &DmaTracker) -> (mpsc::Receiver<()>, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let tracker = tracker.clone();
        let handle = thread::spawn(move || {
            tracker.wait_for_inflight();
            tx.send(()).unwrap();
        });
        (rx, handle)
    }

    #[test]
    fn wait_without_requests_returns_at_once() {
        let tracker = DmaTracker::new();
        tracker.wait_for_inflight();
        let guard = tracker.begin();
        drop(guard);
        tracker.wait_for_inflight();
        assert_eq!(tracker.inflight(), 0);
    }

    #[test]
    fn untracked_counts_nothing() {
        let tracker = DmaTracker::untracked();
        assert!(!tracker.is_tracked());
        assert!(!DmaTracker::default().is_tracked());
        let _guard = tracker.begin();
        assert_eq!(tracker.inflight(), 0);
        // Does not block although a guard is alive.
        tracker.wait_for_inflight();
    }

    #[test]
    fn guard_in_another_thread_delays_the_wait() {
        let tracker = DmaTracker::new();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (held_tx, held_rx) = mpsc::channel::<()>();
        let device = {
            let tracker = tracker.clone();
            thread::spawn(move || {
                let guard = tracker.begin();
                held_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                drop(guard);
            })
        };
        held_rx.recv().unwrap();
        assert_eq!(tracker.inflight(), 1);
        let (done, waiter) = spawn_wait(&tracker);
        assert!(
            done.recv_timeout(Duration::from_millis(200)).is_err(),
            "the wait returned while a request was in flight"
        );
        release_tx.send(()).unwrap();
        done.recv_timeout(Duration::from_secs(10))
            .expect("the wait did not return after the request finished");
        device.join().unwrap();
        waiter.join().unwrap();
        assert_eq!(tracker.inflight(), 0);
    }

    #[test]
    fn guard_taken_after_the_wait_began_does_not_delay_it() {
        let tracker = DmaTracker::new();
        let old = tracker.begin();
        let (done, waiter) = spawn_wait(&tracker);
        // Wait until the waiter flipped the epoch (then it sleeps on the old request).
        let inner = tracker.inner.clone().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while inner.epoch.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "waiter never started");
            thread::yield_now();
        }
        // A request starting now, held by another thread for the whole test.
        let late = {
            let tracker = tracker.clone();
            thread::spawn(move || tracker.begin()).join().unwrap()
        };
        assert_eq!(tracker.inflight(), 2);
        assert!(done.recv_timeout(Duration::from_millis(100)).is_err());
        drop(old);
        done.recv_timeout(Duration::from_secs(10))
            .expect("a request started after the wait delayed it");
        waiter.join().unwrap();
        assert_eq!(tracker.inflight(), 1);
        // The next wait does wait for it.
        let (done, waiter) = spawn_wait(&tracker);
        assert!(done.recv_timeout(Duration::from_millis(100)).is_err());
        drop(late);
        done.recv_timeout(Duration::from_secs(10)).unwrap();
        waiter.join().unwrap();
    }

    #[test]
    fn busy_device_does_not_starve_the_wait() {
        let tracker = DmaTracker::new();
        let stop = Arc::new(AtomicBool::new(false));
        let device = {
            let (tracker, stop) = (tracker.clone(), stop.clone());
            thread::spawn(move || {
                // Always at least one request in flight: overlapping guards.
                let mut held = tracker.begin();
                while !stop.load(Ordering::SeqCst) {
                    let next = tracker.begin();
                    thread::sleep(Duration::from_micros(50));
                    // Drops the older request; `next` stays in flight.
                    held = next;
                }
                drop(held);
            })
        };
        for _ in 0..20 {
            let (done, waiter) = spawn_wait(&tracker);
            done.recv_timeout(Duration::from_secs(10))
                .expect("wait starved by a busy device");
            waiter.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        device.join().unwrap();
        assert_eq!(tracker.inflight(), 0);
    }

    #[test]
    fn guard_is_send() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<DmaGuard>();
        assert_send::<DmaTracker>();
    }
}
