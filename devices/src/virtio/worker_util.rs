//! The thread glue every virtio device worker shares: the thread and its kill eventfd
//! ([`WorkerThread`]), the worker's side of it ([`WorkerBase`]: poll with the kill
//! eventfd first, queue signals, the DEVICE_NEEDS_RESET state) and poll helpers.
//!
//! Logs name the thread (`virtio-console`, `virtio-blk-q0`, ...).
//!
//! An embedder can run code first thing in every worker thread, before it touches guest
//! memory or a queue: a [`ThreadHook`], given the thread's [`WorkerKind`] (ferrio
//! installs the thread's seccomp filter there).

use std::fmt::{self, Display};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VirtioInterrupt;

/// What a worker thread does, as far as the host is concerned: an embedder restricts
/// each kind to the system calls it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkerKind {
    /// `virtio-console`: the queues and the host ends of the port.
    Console,
    /// `virtio-blk-qN` with the synchronous engine (preadv/pwritev/fdatasync).
    Blk,
    /// `virtio-blk-qN` with the io_uring engine.
    BlkUring,
    /// `virtio-net-qN`: a queue pair and its TAP queue.
    Net,
    /// `virtio-iommu`: the requestq and the eventq.
    Iommu,
}

impl WorkerKind {
    /// Every kind.
    pub const ALL: [WorkerKind; 5] = [
        WorkerKind::Console,
        WorkerKind::Blk,
        WorkerKind::BlkUring,
        WorkerKind::Net,
        WorkerKind::Iommu,
    ];

    /// Short name: `console`, `blk`, `blk-uring`, `net`, `iommu`.
    pub fn name(self) -> &'static str {
        match self {
            WorkerKind::Console => "console",
            WorkerKind::Blk => "blk",
            WorkerKind::BlkUring => "blk-uring",
            WorkerKind::Net => "net",
            WorkerKind::Iommu => "iommu",
        }
    }
}

impl Display for WorkerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The function a [`ThreadHook`] runs.
pub type ThreadHookFn = dyn Fn(WorkerKind) -> io::Result<()> + Send + Sync;

/// Runs first thing in every worker thread a device starts, before the thread touches
/// guest memory, a queue or a host file; an error stops the thread before it does any
/// of that, and the spawn (so the activation) fails with it. The default does nothing.
#[derive(Clone, Default)]
pub struct ThreadHook(Option<Arc<ThreadHookFn>>);

impl ThreadHook {
    /// A hook running `f`.
    pub fn new(f: impl Fn(WorkerKind) -> io::Result<()> + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// Runs the hook for a thread of `kind` (on that thread).
    pub fn run(&self, kind: WorkerKind) -> io::Result<()> {
        self.0.as_ref().map_or(Ok(()), |f| f(kind))
    }
}

impl fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = if self.0.is_some() { "set" } else { "none" };
        write!(f, "ThreadHook({set})")
    }
}

/// A running worker thread, stopped by writing its kill eventfd.
pub struct WorkerThread<T> {
    name: String,
    kill: EventFd,
    handle: JoinHandle<Option<T>>,
}

impl<T: Send + 'static> WorkerThread<T> {
    /// Starts thread `name` of `kind`: it runs `hook` first, then `body`, which gets the
    /// worker's side of the kill eventfd and of `interrupt`. Returns once the hook has
    /// run; its error is this function's (and `body` never runs).
    pub fn spawn<F>(
        name: String,
        kind: WorkerKind,
        hook: &ThreadHook,
        interrupt: Arc<dyn VirtioInterrupt>,
        body: F,
    ) -> io::Result<Self>
    where
        F: FnOnce(WorkerBase) -> T + Send + 'static,
    {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let base = WorkerBase {
            name: name.clone(),
            kill: kill.try_clone()?,
            interrupt,
            failed: false,
        };
        let hook = hook.clone();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let started = hook.run(kind);
                let run = started.is_ok();
                // The spawner waits for this answer; it cannot be gone.
                let _ = ready_tx.send(started);
                run.then(|| body(base))
            })?;
        let started = ready
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the worker thread died at start")));
        match started {
            Ok(()) => Ok(Self { name, kill, handle }),
            Err(e) => {
                let _ = handle.join();
                Err(e)
            }
        }
    }

    /// Stops the thread and waits for it; what it returned, `None` if it panicked.
    pub fn stop(self) -> Option<T> {
        if let Err(e) = self.kill.write(1) {
            tracing::error!("{}: cannot signal the worker to stop: {e}", self.name);
        }
        match self.handle.join() {
            Ok(value) => value,
            Err(_) => {
                tracing::error!("{}: worker thread panicked", self.name);
                None
            }
        }
    }
}

/// Stops `workers`, one after the other.
pub fn stop_all<T: Send + 'static>(workers: impl IntoIterator<Item = WorkerThread<T>>) {
    for worker in workers {
        worker.stop();
    }
}

/// What [`WorkerBase::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Some fds other than the kill eventfd are ready (or the timeout passed).
    Ready,
    /// A signal interrupted poll: poll again.
    Retry,
    /// The kill eventfd fired, or poll failed (reported as a device error): the worker
    /// stops.
    Stop,
}

/// The worker's side of a [`WorkerThread`]: its kill eventfd, the interrupt, and
/// whether a ring error made it leave its queues alone until the reset.
pub struct WorkerBase {
    name: String,
    kill: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    failed: bool,
}

impl WorkerBase {
    /// The thread name, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A ring error was reported (DEVICE_NEEDS_RESET): the queues are left alone until
    /// the reset.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The kill eventfd's entry, which must come first in the set given to
    /// [`Self::wait`].
    pub fn kill_pollfd(&self) -> libc::pollfd {
        pollin(Some(self.kill.as_raw_fd()))
    }

    /// Polls `fds` (`fds[0]` is [`Self::kill_pollfd`]) for up to `timeout_ms` (-1:
    /// no limit).
    pub fn wait(&self, fds: &mut [libc::pollfd], timeout_ms: i32) -> Wake {
        match poll(fds, timeout_ms) {
            Ok(_) if fds[0].revents != 0 => Wake::Stop,
            Ok(_) => Wake::Ready,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Wake::Retry,
            Err(e) => {
                tracing::error!("{}: poll failed: {e}; worker stops", self.name);
                self.interrupt.device_error();
                Wake::Stop
            }
        }
    }

    /// Whether the kill eventfd fired (without waiting).
    pub fn stop_requested(&self) -> bool {
        let mut fds = [self.kill_pollfd()];
        matches!(poll(&mut fds, 0), Ok(n) if n > 0)
    }

    /// Tells the driver about used buffers in `queue`; a failure is logged.
    pub fn signal(&self, queue: u16) {
        if let Err(e) = self.interrupt.signal_queue(queue) {
            tracing::warn!("{}: cannot signal queue {queue}: {e}", self.name);
        }
    }

    /// Reports a ring error: DEVICE_NEEDS_RESET, and [`Self::failed`] from now on.
    pub fn fail(&mut self, error: &dyn Display) {
        tracing::error!("{}: {error}; the device needs a reset", self.name);
        self.failed = true;
        self.interrupt.device_error();
    }

    /// Consumes an eventfd's counter (nothing to do if it is already zero).
    pub fn drain(&self, fd: &EventFd) {
        if let Err(e) = fd.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!("{}: cannot read an eventfd: {e}", self.name);
            }
        }
    }
}

/// A pollfd waiting for `events` on `fd`; a negative fd (ignored by poll) for `None`.
pub fn pollfd(fd: Option<RawFd>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.unwrap_or(-1),
        events,
        revents: 0,
    }
}

/// [`pollfd`] waiting for input.
pub fn pollin(fd: Option<RawFd>) -> libc::pollfd {
    pollfd(fd, libc::POLLIN)
}

/// poll(2) on `fds`: the number of ready entries.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, writable slice of `fds.len()` pollfd structs that lives
    // across the call; poll only writes their `revents` fields.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::TestInterrupt;
    use std::sync::Mutex;

    const KIND: WorkerKind = WorkerKind::Console;

    #[test]
    fn stop_returns_the_body_result_and_wait_sees_the_kill() {
        let irq = Arc::new(TestInterrupt::default());
        let thread = WorkerThread::spawn(
            "test-worker".into(),
            KIND,
            &ThreadHook::default(),
            irq.clone(),
            |mut base| {
                let mut fds = [base.kill_pollfd()];
                while base.wait(&mut fds, -1) != Wake::Stop {}
                assert!(base.stop_requested());
                base.signal(3);
                base.fail(&"broken ring");
                base.failed()
            },
        )
        .unwrap();
        assert_eq!(thread.stop(), Some(true));
        assert_eq!(irq.queue_count(3), 1);
        assert_eq!(irq.errors.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_panicking_worker_stops_with_none() {
        let irq = Arc::new(TestInterrupt::default());
        let hook = ThreadHook::default();
        let body = |_| -> u8 { panic!("worker bug") };
        let thread = WorkerThread::spawn("test-panic".into(), KIND, &hook, irq, body).unwrap();
        assert_eq!(thread.stop(), None);
    }

    #[test]
    fn drain_resets_an_eventfd() {
        let irq = Arc::new(TestInterrupt::default());
        let thread = WorkerThread::spawn(
            "test-drain".into(),
            KIND,
            &ThreadHook::default(),
            irq,
            |base| {
                let fd = EventFd::new(EFD_NONBLOCK).unwrap();
                fd.write(2).unwrap();
                base.drain(&fd);
                base.drain(&fd);
                let mut fds = [pollin(Some(fd.as_raw_fd())), pollin(None)];
                poll(&mut fds, 0).unwrap()
            },
        )
        .unwrap();
        assert_eq!(thread.stop(), Some(0));
    }

    #[test]
    fn the_hook_runs_first_on_the_worker_thread() {
        let irq = Arc::new(TestInterrupt::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let hook = ThreadHook::new(move |kind| {
            let name = std::thread::current().name().map(str::to_owned);
            log.lock().unwrap().push((kind, name));
            Ok(())
        });
        let body = |base: WorkerBase| base.name().to_owned();
        let thread =
            WorkerThread::spawn("test-hook".into(), WorkerKind::Net, &hook, irq, body).unwrap();
        // The hook has run when spawn returns.
        let expected = vec![(WorkerKind::Net, Some("test-hook".to_owned()))];
        assert_eq!(*seen.lock().unwrap(), expected);
        assert_eq!(thread.stop().as_deref(), Some("test-hook"));
    }

    #[test]
    fn a_failing_hook_fails_the_spawn_and_the_body_never_runs() {
        let irq = Arc::new(TestInterrupt::default());
        let hook = ThreadHook::new(|_| Err(io::Error::other("no filter")));
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let body = move |_| flag.store(true, std::sync::atomic::Ordering::SeqCst);
        let err = WorkerThread::spawn("test-refused".into(), KIND, &hook, irq, body)
            .err()
            .expect("the hook's error");
        assert_eq!(err.to_string(), "no filter");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(format!("{hook:?}"), "ThreadHook(set)");
        assert_eq!(WorkerKind::BlkUring.to_string(), "blk-uring");
    }
}
