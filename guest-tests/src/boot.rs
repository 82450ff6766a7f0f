//! Booting a guest scenario: building the `ferrio run` command line, streaming the
//! console (teed to stderr and a log file under target/guest-tests/logs), parsing the
//! agent's lines, timing boot-to-/init and enforcing a host-side timeout.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::protocol::{parse_line, Event};
use crate::{ensure_image, ferrio_binary, work_dir, Error, FileLock, GuestImage, Outcome, Result};

/// Extra time the harness gives the VMM beyond its own `--timeout` before killing it.
const HOST_GRACE: Duration = Duration::from_secs(30);

/// One guest boot: which scenario, on what machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub scenario: String,
    pub cpus: u8,
    /// Guest RAM as ferrio's `--memory` takes it, e.g. "512M".
    pub memory: String,
    /// More `ferrio run` arguments (devices, `--config`, ...).
    pub extra_args: Vec<String>,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
    /// Passed as ferrio's `--timeout`; the harness kills the VMM a little later.
    pub timeout: Duration,
    /// A network namespace handle (`/run/netns/NAME`) the VMM joins before it runs,
    /// e.g. to open a TAP that exists only there (see [`crate::NetNs`]).
    pub netns: Option<PathBuf>,
}

impl Boot {
    /// Defaults: 1 vCPU, 512M, 600 s (a PVM-host boot alone takes 1-4 minutes).
    pub fn new(scenario: &str) -> Boot {
        Boot {
            scenario: scenario.to_owned(),
            cpus: 1,
            memory: "512M".into(),
            extra_args: Vec::new(),
            extra_cmdline: String::new(),
            timeout: Duration::from_secs(600),
            netns: None,
        }
    }

    pub fn cpus(mut self, cpus: u8) -> Boot {
        self.cpus = cpus;
        self
    }

    pub fn memory(mut self, memory: &str) -> Boot {
        self.memory = memory.to_owned();
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Boot {
        self.timeout = timeout;
        self
    }

    /// Runs the VMM inside the network namespace `ns`.
    pub fn netns(mut self, ns: &Path) -> Boot {
        self.netns = Some(ns.to_path_buf());
        self
    }

    /// The full kernel command line for `base`.
    pub fn cmdline(&self, base: &str) -> String {
        let mut cmdline = format!("{base} ferrio.scenario={}", self.scenario);
        if !self.extra_cmdline.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(self.extra_cmdline.trim());
        }
        cmdline
    }

    /// The `ferrio run` command for this boot.
    pub fn command(&self, ferrio: &Path, image: &GuestImage) -> Command {
        let mut cmd = Command::new(ferrio);
        cmd.arg("run")
            .arg("--kernel")
            .arg(&image.kernel)
            .arg("--initramfs")
            .arg(&image.initramfs)
            .arg("--cmdline")
            .arg(self.cmdline(&image.base_cmdline))
            .arg("--cpus")
            .arg(self.cpus.to_string())
            .arg("--memory")
            .arg(&self.memory)
            .args(["--serial", "stdio", "--timeout"])
            .arg(self.timeout.as_secs().max(1).to_string())
            .args(&self.extra_args);
        if let Some(ns) = &self.netns {
            crate::netns::enter_on_exec(&mut cmd, ns);
        }
        cmd
    }
}

/// Builds the image and ferrio if needed, then boots `boot`.
pub fn run(boot: &Boot) -> Result<Outcome> {
    let image = ensure_image()?;
    let ferrio = ferrio_binary()?;
    run_with(&ferrio, &image, boot)
}

/// Boots `boot` with a given ferrio binary and image, holding [`boot_lock`].
pub fn run_with(ferrio: &Path, image: &GuestImage, boot: &Boot) -> Result<Outcome> {
    let _lock = boot_lock()?;
    run_command(
        boot.command(ferrio, image),
        &boot.scenario,
        boot.timeout + HOST_GRACE,
    )
}

/// A line of the VMM's stdout, or its end.
pub(crate) enum Line {
    Text(String),
    Eof,
}

/// Reads `r` line by line (lossy UTF-8, `\r` stripped) into `tx`.
pub(crate) fn pump_lines(r: impl Read, tx: mpsc::Sender<Line>) {
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                let text = text.trim_end_matches(['\n', '\r']).replace('\r', "");
                if tx.send(Line::Text(text)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Line::Eof);
}

pub(crate) fn log_file(scenario: &str) -> Result<(PathBuf, File)> {
    let dir = work_dir().join("logs");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let path = dir.join(format!("{scenario}-{stamp}.log"));
    let file =
        File::create(&path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    Ok((path, file))
}

/// Kills the child's whole process group (it was spawned as a group leader).
pub(crate) fn kill(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signals our own child's process group only.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
}

/// Waits until no other guest boot of this harness runs on this host (across threads
/// and processes: a file lock in target/guest-tests); held until dropped.
pub fn boot_lock() -> Result<FileLock> {
    FileLock::acquire(&work_dir().join("boot.lock"))
}

/// Runs any guest-booting command (ferrio, or QEMU from [`crate::qemu_command`]) whose
/// stdout is the guest's serial console, and collects the agent's output. The process
/// (with its process group) is killed after `limit`. Take [`boot_lock`] around it when
/// it boots a real guest.
pub fn run_command(cmd: Command, scenario: &str, limit: Duration) -> Result<Outcome> {
    let (log_path, mut log) = log_file(scenario)?;
    let _ = writeln!(log, "# {cmd:?}");
    eprintln!(
        "[guest-tests] {cmd:?}\n[guest-tests] log: {}",
        log_path.display()
    );

    let start = Instant::now();
    let (mut child, rx, err_rx) = spawn_piped(cmd)?;

    let deadline = start + limit;
    let mut outcome_console = String::new();
    let (mut results, mut done, mut errors) = (Vec::new(), None, Vec::new());
    let mut boot_to_init = None;
    let mut host_timeout = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            host_timeout = true;
            kill(&mut child);
            break;
        }
        let line = match rx.recv_timeout(left) {
            Ok(Line::Text(line)) => line,
            Ok(Line::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
        };
        let at = start.elapsed();
        eprintln!("[guest {:7.2}] {line}", at.as_secs_f64());
        let _ = writeln!(log, "[{:8.3}] {line}", at.as_secs_f64());
        outcome_console.push_str(&line);
        outcome_console.push('\n');
        match parse_line(&line) {
            Ok(Event::AgentStart) => {
                boot_to_init.get_or_insert(at);
            }
            Ok(Event::Result(r)) => results.push(r),
            Ok(Event::Done(d)) => done = Some(d),
            Ok(Event::Other) => {}
            Err(e) => errors.push(e),
        }
    }

    // Stdout is closed (or we gave up): wait for the exit, still bounded by the deadline.
    let exit_status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                host_timeout = true;
                kill(&mut child);
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                kill(&mut child);
                return Err(Error::io("wait for the VMM", e));
            }
        }
    };
    let total = start.elapsed();
    // Bounded: a leftover grandchild could hold the pipe open.
    let vmm_stderr = err_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    for line in vmm_stderr.lines() {
        eprintln!("[vmm stderr] {line}");
    }
    let _ = writeln!(
        log,
        "# exit: {exit_status} after {:.3} s, boot to /init: {:?}, host timeout: {host_timeout}\n# --- vmm stderr ---\n{vmm_stderr}",
        total.as_secs_f64(),
        boot_to_init.map(|d| d.as_secs_f64()),
    );
    Ok(Outcome {
        scenario: scenario.to_owned(),
        results,
        done,
        exit_status,
        host_timeout,
        boot_to_init,
        total,
        console: outcome_console,
        vmm_stderr,
        protocol_errors: errors,
        log_path,
    })
}

/// Spawns `cmd` as a process-group leader with stdin closed; returns the child, its
/// stdout as lines, and its whole stderr once it closed.
pub(crate) fn spawn_piped(
    mut cmd: Command,
) -> Result<(Child, mpsc::Receiver<Line>, mpsc::Receiver<String>)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("spawn {cmd:?}"), e))?;
    let (tx, lines) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        thread::spawn(move || pump_lines(stdout, tx));
    }
    let (err_tx, stderr) = mpsc::channel();
    if let Some(mut err) = child.stderr.take() {
        thread::spawn(move || {
            let mut text = Vec::new();
            let _ = err.read_to_end(&mut text);
            let _ = err_tx.send(String::from_utf8_lossy(&text).into_owned());
        });
    }
    Ok((child, lines, stderr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_carries_scenario_and_machine() {
        let image = GuestImage {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            base_cmdline: "console=ttyS0 panic=-1".into(),
        };
        let mut boot = Boot::new("boot").cpus(2).memory("1G");
        boot.extra_cmdline = " foo=1 ".into();
        boot.extra_args = vec!["--config".into(), "x.toml".into()];
        let cmd = boot.command(Path::new("/ferrio"), &image);
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into()).collect();
        let expected = [
            "run",
            "--kernel",
            "/k",
            "--initramfs",
            "/i",
            "--cmdline",
            "console=ttyS0 panic=-1 ferrio.scenario=boot foo=1",
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--serial",
            "stdio",
            "--timeout",
            "600",
            "--config",
            "x.toml",
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn run_command_parses_a_fake_guest_and_times_out_hung_ones() {
        let script = "echo 'early boot'; echo 'FERRIO-AGENT start'; \
            echo 'FERRIO-RESULT {\"scenario\":\"fake\",\"check\":\"a\",\"ok\":true,\"value\":\"v\"}'; \
            echo 'FERRIO-DONE {\"scenario\":\"fake\",\"passed\":1,\"failed\":0}'; echo bye >&2";
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        let out = run_command(cmd, "fake", Duration::from_secs(20)).unwrap();
        assert!(out.exit_status.success());
        assert!(out.boot_to_init.is_some());
        assert_eq!(out.value_str("a"), Some("v"));
        assert_eq!(out.vmm_stderr.trim(), "bye");
        assert!(out.problems().is_empty(), "{:?}", out.problems());
        assert!(out.console.starts_with("early boot\n"));

        let mut hung = Command::new("sh");
        hung.args(["-c", "echo 'FERRIO-AGENT start'; sleep 30"]);
        let out = run_command(hung, "fake-hung", Duration::from_millis(500)).unwrap();
        assert!(out.host_timeout);
        assert!(out.total < Duration::from_secs(10));
        assert!(!out.problems().is_empty());
    }
}
