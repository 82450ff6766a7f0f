//! Guest-side system helpers: the init duties (mounts, console, PATH, modules),
//! reading sysfs/procfs files, running busybox commands and powering off.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where busybox and its few applet links live in the initramfs.
pub const PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";
/// The busybox binary. Most applets have no link (each file slows the boot on PVM
/// hosts), so call them through [`busybox`].
pub const BUSYBOX: &str = "/bin/busybox";
/// Kernel modules shipped for stock (non-PVM) kernels; empty or absent otherwise.
pub const MODULES_DIR: &str = "/lib/modules";

/// True when running as the guest's init (PID 1) rather than on a development host.
pub fn is_init() -> bool {
    std::process::id() == 1
}

/// Mounts `fstype` at `target`, creating the directory; an already mounted
/// filesystem (EBUSY) is fine.
pub fn mount_fs(source: &str, target: &str, fstype: &str) -> Result<(), String> {
    if let Err(e) = std::fs::create_dir_all(target) {
        return Err(format!("mkdir {target}: {e}"));
    }
    let c = |s: &str| CString::new(s).map_err(|e| format!("{s:?}: {e}"));
    let (src, tgt, fs) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        Ok(())
    } else {
        Err(format!("mount {fstype} on {target}: {err}"))
    }
}

/// Makes sure fds 0, 1 and 2 are open, on /dev/console if the kernel could not
/// give init a console (no /dev/console in the initramfs before devtmpfs is mounted).
pub fn ensure_console() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on any integer fd is harmless.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let path = c"/dev/console";
        // SAFETY: valid path; the returned fd is checked.
        let console = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if console < 0 {
            return;
        }
        if console != fd {
            // SAFETY: both fds are valid.
            unsafe {
                libc::dup2(console, fd);
                libc::close(console);
            }
        }
    }
}

/// The init duties: mounts, console, PATH. Returns the errors it met (not fatal).
pub fn init_system() -> Vec<String> {
    let mut errors = Vec::new();
    for (src, target, fs) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        if let Err(e) = mount_fs(src, target, fs) {
            errors.push(e);
        }
    }
    ensure_console();
    std::env::set_var("PATH", PATH);
    errors
}

/// Reads a whole text file.
pub fn read(path: impl AsRef<Path>) -> Result<String, String> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads a text file (typically a sysfs/procfs attribute) without surrounding whitespace.
pub fn read_trimmed(path: impl AsRef<Path>) -> Result<String, String> {
    read(path).map(|s| s.trim().to_owned())
}

/// Reads a file holding one integer, decimal or `0x` hexadecimal.
#[allow(dead_code)] // for the device scenarios (pci, blk, net, ...)
pub fn read_u64(path: impl AsRef<Path>) -> Result<u64, String> {
    let text = read_trimmed(path.as_ref())?;
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{}: not a number: {text:?}", path.as_ref().display()))
}

/// Result of running a command.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `prog args...` (looked up in PATH, so busybox applets work) and captures its output.
pub fn run(prog: &str, args: &[&str]) -> Result<CmdOutput, String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    Ok(CmdOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs a command and returns its stdout if it exited 0, else an error with its stderr.
pub fn run_ok(prog: &str, args: &[&str]) -> Result<String, String> {
    let out = run(prog, args)?;
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "{prog} {}: exit {:?}: {}",
            args.join(" "),
            out.code,
            out.stderr.trim()
        ))
    }
}

/// Runs busybox applet `applet` (whether or not it has a /bin link) and returns its
/// stdout if it exited 0.
pub fn busybox(applet: &str, args: &[&str]) -> Result<String, String> {
    let mut full = Vec::with_capacity(args.len() + 1);
    full.push(applet);
    full.extend_from_slice(args);
    run_ok(BUSYBOX, &full)
}

/// Every `*.ko` file below `dir`, sorted.
fn find_modules(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            find_modules(&path, found);
        } else if path.extension().is_some_and(|e| e == "ko") {
            found.push(path);
        }
    }
}

/// Loads the kernel modules shipped in the initramfs (stock kernels only; the PVM
/// kernel has everything built in and ships none). Dependencies are resolved by
/// retrying failed modules until a pass makes no progress. Returns (loaded, failures).
pub fn load_modules(dir: &str) -> (usize, Vec<String>) {
    let mut pending = Vec::new();
    find_modules(Path::new(dir), &mut pending);
    pending.sort();
    let mut loaded = 0;
    loop {
        let mut failures = Vec::new();
        let mut retry = Vec::new();
        let before = loaded;
        for module in pending {
            let path = module.to_string_lossy().into_owned();
            match busybox("insmod", &[&path]) {
                Ok(_) => loaded += 1,
                Err(e) => {
                    failures.push(e);
                    retry.push(module);
                }
            }
        }
        pending = retry;
        if pending.is_empty() || loaded == before {
            return (loaded, failures);
        }
    }
}

/// Flushes filesystems and powers the machine off. Outside the guest (not PID 1) it
/// just exits with `code`. Never returns.
pub fn power_off(code: i32) -> ! {
    if !is_init() {
        std::process::exit(code);
    }
    // SAFETY: plain syscalls without pointer arguments. tcdrain waits until the tty
    // layer has handed every queued byte to the UART: the kernel does not flush tty
    // output on power-off, so without it the last result lines can be lost.
    unsafe {
        libc::tcdrain(libc::STDOUT_FILENO);
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    let err = io::Error::last_os_error();
    eprintln!("FERRIO-AGENT power-off failed: {err}");
    // Exiting makes the kernel panic, which the VMM reports: better than hanging.
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbers_and_runs_commands() {
        let dir = std::env::temp_dir().join(format!("ferrio-agent-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dec"), "42\n").unwrap();
        std::fs::write(dir.join("hex"), "0x1af4\n").unwrap();
        std::fs::write(dir.join("bad"), "x\n").unwrap();
        assert_eq!(read_u64(dir.join("dec")), Ok(42));
        assert_eq!(read_u64(dir.join("hex")), Ok(0x1af4));
        assert!(read_u64(dir.join("bad")).is_err());
        assert!(read_u64(dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(run_ok("echo", &["hi"]).as_deref(), Ok("hi\n"));
        assert!(run_ok("false", &[]).is_err());
        assert!(run("/nonexistent-binary", &[]).is_err());
    }
}
