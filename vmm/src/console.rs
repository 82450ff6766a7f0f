//! The serial console's host side: where guest output goes (stdout, a file or nowhere,
//! watched for the kernel's panic line), and the stdin subscriber of the I/O thread
//! that feeds host input to the UART without dropping bytes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use ferrio_devices::serial::SerialDevice;
use ferrio_devices::{GuestEvent, GuestEventSink};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialConfig;

/// The line Linux prints when it panics. The guest kernel here has no pvpanic driver,
/// and with `panic=-1` a panic otherwise looks exactly like a reboot.
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
const MAX_TRACKED_LINE: usize = 512;

/// Guest console output: written through unbuffered (nothing is lost if the VMM is
/// killed), and scanned for the panic line.
pub struct ConsoleOut {
    sink: Option<File>,
    line: Vec<u8>,
    events: Arc<dyn GuestEventSink>,
}

impl ConsoleOut {
    /// Opens the sink chosen by `cfg`.
    pub fn open(cfg: &SerialConfig, events: Arc<dyn GuestEventSink>) -> io::Result<Self> {
        let sink = match cfg {
            SerialConfig::Stdio => Some(dup_stdio(libc::STDOUT_FILENO)?),
            SerialConfig::File(p) => Some(File::options().create(true).append(true).open(p)?),
            SerialConfig::None => None,
        };
        Ok(Self {
            sink,
            line: Vec::with_capacity(MAX_TRACKED_LINE),
            events,
        })
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' || b == b'\r' {
                self.line.clear();
            } else if self.line.len() < MAX_TRACKED_LINE {
                self.line.push(b);
                if self.line.ends_with(PANIC_MARKER) {
                    self.events.guest_event(GuestEvent::Panic);
                }
            }
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        if let Some(f) = &mut self.sink {
            f.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

/// A private duplicate of a standard descriptor, as a `File`.
fn dup_stdio(fd: i32) -> io::Result<File> {
    // SAFETY: dup() has no memory-safety preconditions; the result is checked.
    let new = unsafe { libc::dup(fd) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a freshly created descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(new) }))
}

/// The UART type ferrio uses.
pub type Serial = SerialDevice<ConsoleOut>;

/// I/O-thread subscriber: stdin -> UART receive FIFO. When the FIFO is full it stops
/// reading stdin until the guest drained the FIFO (`drained` fires), so bytes wait in
/// the host pipe instead of being dropped.
pub struct StdinForwarder {
    serial: Arc<Mutex<Serial>>,
    stdin: File,
    drained: EventFd,
    pending: Vec<u8>,
    reading: bool,
    eof: bool,
}

impl StdinForwarder {
    pub fn new(serial: Arc<Mutex<Serial>>, drained: EventFd) -> io::Result<Self> {
        Ok(Self {
            serial,
            stdin: dup_stdio(libc::STDIN_FILENO)?,
            drained,
            pending: Vec::new(),
            reading: false,
            eof: false,
        })
    }

    fn feed(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(&self.pending);
        self.pending.drain(..n);
    }

    /// Reads stdin only while nothing is pending.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let want = self.pending.is_empty() && !self.eof;
        if want != self.reading {
            let ev = Events::new(&self.stdin, EventSet::IN);
            let r = if want { ops.add(ev) } else { ops.remove(ev) };
            match r {
                Ok(()) => self.reading = want,
                Err(e) => {
                    tracing::debug!(
                        "console: stdin cannot be watched ({e:?}); host input disabled"
                    );
                    self.eof = true;
                    self.reading = false;
                }
            }
        }
    }
}

impl MutEventSubscriber for StdinForwarder {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            tracing::warn!("console: cannot watch the UART drain event: {e:?}");
        }
        self.update_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
        } else if events.fd() == self.stdin.as_raw_fd() {
            let mut buf = [0u8; 64];
            match self.stdin.read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("console: stdin read failed: {e}");
                    self.eof = true;
                }
            }
        }
        self.feed();
        self.update_interest(ops);
    }
}

/// Puts an interactive stdin in non-canonical, no-echo mode (signals still work) and
/// restores it when dropped.
pub struct TerminalGuard {
    saved: Option<libc::termios>,
}

impl TerminalGuard {
    pub fn new() -> Self {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Self { saved: None };
        }
        // SAFETY: termios is plain data; tcgetattr fills it and its result is checked.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid termios to write to.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Self { saved: None };
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO);
        // SAFETY: `t` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
            return Self { saved: None };
        }
        Self { saved: Some(saved) }
    }
}

impl Default for TerminalGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restores the termios read in new(); failure leaves the terminal as is.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Events(Mutex<Vec<GuestEvent>>);
    impl GuestEventSink for Events {
        fn guest_event(&self, e: GuestEvent) {
            self.0.lock().unwrap().push(e);
        }
    }

    #[test]
    fn panic_line_is_detected_across_writes() {
        let ev = Arc::new(Events::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut out = ConsoleOut::open(&SerialConfig::File(path.clone()), ev.clone()).unwrap();
        out.write_all(b"[ 1.0] ok\r\n[ 2.0] Kernel pa").unwrap();
        assert!(ev.0.lock().unwrap().is_empty());
        out.write_all(b"nic - not syncing: Attempted to kill init!\n")
            .unwrap();
        assert_eq!(*ev.0.lock().unwrap(), vec![GuestEvent::Panic]);
        let written = std::fs::read_to_string(path).unwrap();
        assert!(written.ends_with("Attempted to kill init!\n"));
    }

    #[test]
    fn no_sink_still_scans() {
        let ev = Arc::new(Events::default());
        let mut out = ConsoleOut::open(&SerialConfig::None, ev.clone()).unwrap();
        out.write_all(b"Kernel panic - not syncing\n").unwrap();
        assert_eq!(ev.0.lock().unwrap().len(), 1);
    }
}
