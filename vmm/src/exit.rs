//! How a VM run ends: the first stop reason wins, the main thread turns it into the
//! process exit code and a message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ferrio_devices::{GuestEvent, GuestEventSink};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Guest(GuestEvent),
    /// A vCPU hit something it cannot continue from.
    VcpuError {
        cpu: u8,
        message: String,
    },
    /// The I/O thread failed.
    IoThread(String),
    /// `--timeout` expired.
    Timeout(Duration),
    /// SIGINT/SIGTERM.
    Signal(i32),
}

impl StopReason {
    /// Process exit code: 0 power-off/reboot, 1 VMM error, 3 guest panic, 4 timeout,
    /// 128+N for signal N.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::Guest(GuestEvent::PowerOff | GuestEvent::Reset) => 0,
            StopReason::Guest(GuestEvent::Panic) => 3,
            StopReason::VcpuError { .. } | StopReason::IoThread(_) => 1,
            StopReason::Timeout(_) => 4,
            StopReason::Signal(n) => 128 + n,
        }
    }

    /// One line for stderr, if the outcome deserves one.
    pub fn message(&self) -> Option<String> {
        match self {
            StopReason::Guest(GuestEvent::PowerOff) => None,
            StopReason::Guest(GuestEvent::Reset) => {
                Some("guest requested a reboot; ferrio does not restart guests, exiting".into())
            }
            StopReason::Guest(GuestEvent::Panic) => Some("guest kernel panicked".into()),
            StopReason::VcpuError { cpu, message } => Some(format!("vCPU {cpu}: {message}")),
            StopReason::IoThread(m) => Some(format!("I/O thread: {m}")),
            StopReason::Timeout(d) => Some(format!(
                "timeout: the guest did not power off within {} s",
                d.as_secs()
            )),
            StopReason::Signal(n) => Some(format!("stopped by signal {n}")),
        }
    }
}

/// Shared by the vCPU threads, the devices and the main thread: records the first stop
/// reason and wakes the main thread.
pub struct StopSignal {
    evt: EventFd,
    reason: Mutex<Option<StopReason>>,
    stopping: AtomicBool,
    /// The guest printed its panic line; the reset that `panic=-1` triggers next is
    /// reported as a panic.
    panicked: AtomicBool,
}

impl StopSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        })
    }

    /// Records `reason` unless another one came first, and wakes the main thread.
    pub fn stop(&self, reason: StopReason) {
        let reason = match reason {
            StopReason::Guest(GuestEvent::Reset) if self.has_panicked() => {
                StopReason::Guest(GuestEvent::Panic)
            }
            other => other,
        };
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            tracing::debug!("stop requested: {reason:?}");
            *r = Some(reason);
        }
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the main thread: {e}");
        }
    }

    /// True once any stop was requested: vCPUs leave their run loop.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Records that the guest kernel announced a panic without stopping the vCPUs, so
    /// the rest of its report still reaches the console; the main thread ends the run
    /// at the guest's reset or after a grace period.
    pub fn note_panic(&self) {
        self.panicked.store(true, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the main thread: {e}");
        }
    }

    /// True once the guest announced a panic.
    pub fn has_panicked(&self) -> bool {
        self.panicked.load(Ordering::SeqCst)
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The fd the main thread polls.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl GuestEventSink for StopSignal {
    fn guest_event(&self, event: GuestEvent) {
        match event {
            GuestEvent::Panic => self.note_panic(),
            other => self.stop(StopReason::Guest(other)),
        }
    }
}

/// Signal number caught by [`install_signal_handlers`], 0 if none.
static CAUGHT_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// The stop eventfd the signal handler writes to.
static STOP_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(signo: libc::c_int) {
    CAUGHT_SIGNAL.store(signo, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` outlives the call.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// SIGINT and SIGTERM wake the main thread through `stop`'s eventfd, so the VMM can
/// restore the terminal and flush the console before it exits.
pub fn install_signal_handlers(stop: &StopSignal) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    STOP_FD.store(stop.eventfd().as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` only touches atomics and calls write(2), both
        // async-signal-safe; sigaction is zero-initialised plain data.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The signal caught by the handler, if any.
pub fn caught_signal() -> Option<i32> {
    match CAUGHT_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = StopSignal::new().unwrap();
        assert!(!s.is_stopping());
        s.guest_event(GuestEvent::PowerOff);
        s.guest_event(GuestEvent::Reset);
        assert!(s.is_stopping());
        assert_eq!(s.reason(), Some(StopReason::Guest(GuestEvent::PowerOff)));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn panic_then_reset_is_a_panic() {
        let s = StopSignal::new().unwrap();
        s.guest_event(GuestEvent::Panic);
        assert!(
            !s.is_stopping(),
            "the guest keeps running to finish its report"
        );
        assert!(s.has_panicked());
        s.guest_event(GuestEvent::Reset);
        assert_eq!(s.reason(), Some(StopReason::Guest(GuestEvent::Panic)));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(StopReason::Guest(GuestEvent::PowerOff).exit_code(), 0);
        assert_eq!(StopReason::Guest(GuestEvent::Reset).exit_code(), 0);
        assert_eq!(StopReason::Guest(GuestEvent::Panic).exit_code(), 3);
        assert_eq!(StopReason::Timeout(Duration::from_secs(1)).exit_code(), 4);
        assert_eq!(
            StopReason::VcpuError {
                cpu: 0,
                message: String::new()
            }
            .exit_code(),
            1
        );
        assert!(StopReason::Guest(GuestEvent::PowerOff).message().is_none());
        assert!(StopReason::Guest(GuestEvent::Reset)
            .message()
            .unwrap()
            .contains("reboot"));
    }
}
