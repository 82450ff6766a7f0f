//! The SIGSYS report of `--seccomp on`: filters answer a system call outside their
//! list with SECCOMP_RET_TRAP, the kernel sends the calling thread SIGSYS without
//! running the call, and [`on_sigsys`] writes one line to stderr naming the thread, its
//! kind and the system call, then ends the process with [`EXIT_CODE`].
//!
//! The handler only uses a stack buffer, a thread-local set before the filter was
//! installed, `write(2)` and `exit_group(2)`, which every filter allows. No filter
//! allows `rt_sigaction`, so code running under a filter cannot replace the handler;
//! blocking SIGSYS does not help either: the kernel then resets it to the default
//! action and the process dies of the signal.

use std::cell::Cell;
use std::io;

use super::names;

/// Exit code after a forbidden system call: 128 + SIGSYS, as a shell reports a
/// process killed by that signal.
pub const EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: i32 = 1;

/// Thread names are at most 15 bytes (TASK_COMM_LEN - 1).
const NAME_MAX: usize = 15;

/// Who this thread is, for the report; plain data, so reading it from the handler
/// needs no allocation and no lazy initialisation.
#[derive(Clone, Copy)]
struct Label {
    kind: &'static str,
    name: [u8; NAME_MAX],
    name_len: usize,
}

thread_local! {
    static LABEL: Cell<Label> = const {
        Cell::new(Label { kind: "", name: [0; NAME_MAX], name_len: 0 })
    };
}

/// Records the calling thread's kind and name for the report; called before the
/// thread installs its filter.
pub fn label_thread(kind: &'static str) {
    let mut label = Label {
        kind,
        name: [0; NAME_MAX],
        name_len: 0,
    };
    if let Some(name) = std::thread::current().name() {
        let bytes = &name.as_bytes()[..name.len().min(NAME_MAX)];
        label.name[..bytes.len()].copy_from_slice(bytes);
        label.name_len = bytes.len();
    }
    LABEL.with(|l| l.set(label));
}

/// The SIGSYS part of `siginfo_t` on x86_64 (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    _signo: i32,
    _errno: i32,
    code: i32,
    _pad: i32,
    _call_addr: *mut libc::c_void,
    syscall: i32,
    _arch: u32,
}

/// A fixed buffer the report is assembled in (no allocation in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_num(&mut self, value: i64) {
        if value < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut v = value.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }
}

/// The report line for system call `nr` made by the thread labelled `kind`/`name`.
fn report(kind: &str, name: &[u8], nr: i64) -> Line {
    let mut line = Line::new();
    line.push(b"ferrio: seccomp: thread ");
    line.push(if name.is_empty() { b"?" } else { name });
    line.push(b" (");
    // A thread without a label has not installed its own filter yet: it runs under
    // the one inherited from the thread that created it.
    line.push(
        if kind.is_empty() {
            "creator's filter"
        } else {
            kind
        }
        .as_bytes(),
    );
    line.push(b") made a forbidden system call: ");
    match names::name(nr) {
        Some(n) => {
            line.push(n.as_bytes());
            line.push(b" (");
            line.push_num(nr);
            line.push(b")");
        }
        None => {
            line.push(b"number ");
            line.push_num(nr);
        }
    }
    line.push(b"; the VMM stops\n");
    line
}

extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; for
    // SIGSYS its union holds `_sigsys`, which SigsysInfo lays out (x86_64).
    let info = unsafe { &*info.cast::<SigsysInfo>() };
    let label = LABEL.with(Cell::get);
    let line = if info.code == SYS_SECCOMP {
        report(
            label.kind,
            &label.name[..label.name_len],
            i64::from(info.syscall),
        )
    } else {
        let mut line = Line::new();
        line.push(b"ferrio: SIGSYS not sent by seccomp; the VMM stops\n");
        line
    };
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `line` outlives the write.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_CODE);
    }
}

/// Installs the SIGSYS handler (process-wide; before any filter is).
pub fn install_handler() -> io::Result<()> {
    // SAFETY: `on_sigsys` only reads its siginfo and a plain thread-local, and calls
    // write(2) and _exit(2), all async-signal-safe; sigaction is zero-initialised plain
    // data.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(line: &Line) -> &str {
        std::str::from_utf8(&line.buf[..line.len]).unwrap()
    }

    #[test]
    fn report_names_thread_kind_and_call() {
        let line = report("blk", b"virtio-blk-q0", libc::SYS_socket);
        assert_eq!(
            text(&line),
            "ferrio: seccomp: thread virtio-blk-q0 (blk) made a forbidden system call: \
             socket (41); the VMM stops\n"
        );
        let line = report("", b"", 999);
        assert_eq!(
            text(&line),
            "ferrio: seccomp: thread ? (creator's filter) made a forbidden system call: \
             number 999; the VMM stops\n"
        );
    }

    #[test]
    fn label_is_per_thread() {
        std::thread::Builder::new()
            .name("a-rather-long-thread-name".into())
            .spawn(|| {
                label_thread("vcpu");
                let l = LABEL.with(Cell::get);
                assert_eq!(l.kind, "vcpu");
                assert_eq!(&l.name[..l.name_len], b"a-rather-long-t");
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(LABEL.with(Cell::get).kind, "");
        assert_eq!(EXIT_CODE, 159);
    }
}
