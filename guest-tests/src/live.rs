//! A guest that is still running: for tests that act while the VM runs (kill the VMM
//! at a given point, talk to a device) rather than wait for the power-off. Console
//! lines are teed to stderr and a log file like [`crate::run`] does.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::boot::{kill, log_file, spawn_piped, Line};
use crate::protocol::{parse_line, CheckResult, Event};
use crate::{boot_lock, ensure_image, ferrio_binary, Boot, Error, FileLock, GuestImage, Result};

/// A spawned guest whose console is read as it comes. Dropping it kills the VMM.
pub struct LiveGuest {
    child: Child,
    lines: mpsc::Receiver<Line>,
    stderr: mpsc::Receiver<String>,
    log: File,
    log_path: PathBuf,
    start: Instant,
    console: String,
    eof: bool,
    status: Option<ExitStatus>,
    _lock: Option<FileLock>,
}

impl LiveGuest {
    /// Builds the image and ferrio if needed, waits for [`boot_lock`] and spawns `boot`.
    pub fn spawn(boot: &Boot) -> Result<LiveGuest> {
        let image = ensure_image()?;
        let ferrio = ferrio_binary()?;
        Self::spawn_with(&ferrio, &image, boot)
    }

    /// Spawns `boot` with a given ferrio and image, holding [`boot_lock`] until dropped.
    pub fn spawn_with(ferrio: &Path, image: &GuestImage, boot: &Boot) -> Result<LiveGuest> {
        let lock = boot_lock()?;
        let mut guest = Self::spawn_command(boot.command(ferrio, image), &boot.scenario)?;
        guest._lock = Some(lock);
        Ok(guest)
    }

    /// Spawns any command whose stdout is a guest console (no lock taken).
    pub fn spawn_command(cmd: Command, scenario: &str) -> Result<LiveGuest> {
        let (log_path, mut log) = log_file(scenario)?;
        let _ = writeln!(log, "# {cmd:?}");
        eprintln!(
            "[guest-tests] {cmd:?}\n[guest-tests] log: {}",
            log_path.display()
        );
        let (child, lines, stderr) = spawn_piped(cmd)?;
        Ok(LiveGuest {
            child,
            lines,
            stderr,
            log,
            log_path,
            start: Instant::now(),
            console: String::new(),
            eof: false,
            status: None,
            _lock: None,
        })
    }

    /// The next console line, waiting at most `timeout`; `None` on timeout or once the
    /// console closed (see [`LiveGuest::console_closed`]).
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        if self.eof {
            return None;
        }
        match self.lines.recv_timeout(timeout) {
            Ok(Line::Text(line)) => {
                let at = self.start.elapsed().as_secs_f64();
                eprintln!("[guest {at:7.2}] {line}");
                let _ = writeln!(self.log, "[{at:8.3}] {line}");
                self.console.push_str(&line);
                self.console.push('\n');
                Some(line)
            }
            Ok(Line::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.eof = true;
                None
            }
            Err(mpsc::RecvTimeoutError::Timeout) => None,
        }
    }

    /// Whether the VMM closed its stdout (it exited, or is about to).
    pub fn console_closed(&self) -> bool {
        self.eof
    }

    /// Reads the console until the agent reports check `check` (passing or not) and
    /// returns it. Fails on timeout, when the console closes or the agent finishes
    /// first, and on a malformed protocol line; the error carries the console tail.
    pub fn wait_for_result(&mut self, check: &str, timeout: Duration) -> Result<CheckResult> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let why = if left.is_zero() {
                format!("no `{check}` result within {timeout:?}")
            } else if let Some(line) = self.next_line(left) {
                match parse_line(&line) {
                    Ok(Event::Result(r)) if r.check == check => return Ok(r),
                    Ok(Event::Done(d)) => format!("the agent finished ({d:?}) without `{check}`"),
                    Err(e) => e,
                    Ok(_) => continue,
                }
            } else if self.eof {
                format!("the console closed before `{check}`")
            } else {
                continue;
            };
            return Err(self.failure(&why));
        }
    }

    /// An error describing `why`, with the console tail and log path.
    fn failure(&self, why: &str) -> Error {
        let lines: Vec<&str> = self.console.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        Error::Guest(format!(
            "{why}\n--- console tail ({}) ---\n{tail}",
            self.log_path.display()
        ))
    }

    /// Kills the VMM (SIGKILL to its process group) at once and reaps it. Returns
    /// how it ended: killed by signal 9, unless it had exited on its own before.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        kill(&mut self.child);
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io("wait for the VMM", e))?;
        self.status = Some(status);
        let stderr = self
            .stderr
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        for line in stderr.lines() {
            eprintln!("[vmm stderr] {line}");
        }
        let _ = writeln!(
            self.log,
            "# killed by the harness after {:.3} s: {status}\n# --- vmm stderr ---\n{stderr}",
            self.start.elapsed().as_secs_f64()
        );
        Ok(status)
    }

    /// The console so far, `\r` stripped.
    pub fn console(&self) -> &str {
        &self.console
    }

    /// Where the console is logged.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Time since the spawn.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for LiveGuest {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn waits_for_a_result_then_kills_a_hanging_guest() {
        let script = "echo 'FERRIO-AGENT start'; echo noise; \
            echo 'FERRIO-RESULT {\"scenario\":\"fake\",\"check\":\"other\",\"ok\":true,\"value\":1}'; \
            echo 'FERRIO-RESULT {\"scenario\":\"fake\",\"check\":\"w\",\"ok\":true,\"value\":\"abc\"}'; \
            sleep 60";
        let mut guest = LiveGuest::spawn_command(sh(script), "fake-live").unwrap();
        let r = guest.wait_for_result("w", Duration::from_secs(20)).unwrap();
        assert!(r.ok);
        assert_eq!(r.value, serde_json::json!("abc"));
        assert!(guest.console().contains("noise\n"));
        let started = Instant::now();
        let status = guest.kill().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(guest.kill().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn reports_a_guest_that_finishes_or_stalls_without_the_result() {
        let done = "echo 'FERRIO-DONE {\"scenario\":\"fake\",\"passed\":1,\"failed\":0}'";
        let mut guest = LiveGuest::spawn_command(sh(done), "fake-live-done").unwrap();
        let err = guest
            .wait_for_result("w", Duration::from_secs(20))
            .unwrap_err();
        assert!(err.to_string().contains("finished"), "{err}");

        let mut guest = LiveGuest::spawn_command(sh("echo hi"), "fake-live-eof").unwrap();
        let err = guest
            .wait_for_result("w", Duration::from_secs(20))
            .unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
        assert!(guest.console_closed());
        assert!(guest.kill().unwrap().success());

        let mut guest = LiveGuest::spawn_command(sh("sleep 30"), "fake-live-slow").unwrap();
        let err = guest
            .wait_for_result("w", Duration::from_millis(300))
            .unwrap_err();
        assert!(err.to_string().contains("within"), "{err}");
    }
}
