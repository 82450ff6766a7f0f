//! [`DmaHold`]: a device's hold on its [`DmaTracker`] for one request or batch.
//!
//! A device keeps a [`DmaGuard`] while it translates and accesses guest memory, and
//! puts it down whenever it waits for the host without touching guest memory (a flush,
//! a blocking write to a host sink) and at the end of each request, so that an IOMMU
//! UNMAP waits for the accesses that started before it and never for an idle wait.
//! With an untracked tracker every operation is a branch on `None`.

use crate::dma::{DmaGuard, DmaTracker};

/// A guard that can be put down and taken again; holds one from creation.
pub struct DmaHold<'a> {
    tracker: &'a DmaTracker,
    guard: Option<DmaGuard>,
}

impl<'a> DmaHold<'a> {
    /// Takes a guard.
    pub fn new(tracker: &'a DmaTracker) -> Self {
        Self {
            tracker,
            guard: Some(tracker.begin()),
        }
    }

    /// Puts the guard down: the device does not touch guest memory until
    /// [`resume`](Self::resume).
    pub fn pause(&mut self) {
        self.guard = None;
    }

    /// Holds a guard again (a new one, if it was put down or taken away).
    pub fn resume(&mut self) {
        if self.guard.is_none() {
            self.guard = Some(self.tracker.begin());
        }
    }

    /// Runs `op`, which touches no guest memory (a host system call that may block),
    /// with the guard put down; holds one again afterwards.
    pub fn paused<T>(&mut self, op: impl FnOnce() -> T) -> T {
        self.pause();
        let result = op();
        self.resume();
        result
    }

    /// Ends the current request and starts the next one: an UNMAP waiting for the
    /// current one may go on, and it is not delayed by the new guard.
    pub fn renew(&mut self) {
        self.pause();
        self.resume();
    }

    /// Hands the guard over to a request that stays in flight (an asynchronous
    /// engine); the hold then has none until [`resume`](Self::resume).
    pub fn take(&mut self) -> Option<DmaGuard> {
        self.guard.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_counts_while_held_only() {
        let tracker = DmaTracker::new();
        let mut hold = DmaHold::new(&tracker);
        assert_eq!(tracker.inflight(), 1);
        hold.pause();
        assert_eq!(tracker.inflight(), 0);
        // Waits return at once while the hold is put down.
        tracker.wait_for_inflight();
        hold.resume();
        hold.resume();
        assert_eq!(tracker.inflight(), 1);
        hold.renew();
        assert_eq!(tracker.inflight(), 1);
        let seen = hold.paused(|| tracker.inflight());
        assert_eq!((seen, tracker.inflight()), (0, 1));
        let guard = hold.take();
        assert!(guard.is_some());
        assert_eq!(tracker.inflight(), 1);
        drop(hold);
        assert_eq!(tracker.inflight(), 1);
        drop(guard);
        assert_eq!(tracker.inflight(), 0);
    }
}
