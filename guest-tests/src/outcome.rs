//! What one guest run produced, and the assertions tests make on it.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::protocol::{CheckResult, Done};

/// The result of one guest boot.
#[derive(Debug)]
pub struct Outcome {
    pub scenario: String,
    /// The agent's checks, in order.
    pub results: Vec<CheckResult>,
    /// The agent's summary; `None` if it never got that far.
    pub done: Option<Done>,
    /// How the VMM (or QEMU) process ended.
    pub exit_status: ExitStatus,
    /// The harness killed the process because it outlived the timeout.
    pub host_timeout: bool,
    /// Wall-clock time from spawning the VMM to the `FERRIO-AGENT start` line.
    pub boot_to_init: Option<Duration>,
    /// Wall-clock time from spawn to exit.
    pub total: Duration,
    /// The guest console (the VMM's stdout), `\r` stripped.
    pub console: String,
    /// The VMM's stderr.
    pub vmm_stderr: String,
    /// Protocol lines that did not parse.
    pub protocol_errors: Vec<String>,
    /// Where the console and stderr were logged.
    pub log_path: PathBuf,
}

impl Outcome {
    /// The check named `check`, if the agent reported it.
    pub fn result(&self, check: &str) -> Option<&CheckResult> {
        self.results.iter().find(|r| r.check == check)
    }

    /// The value the guest reported for `check`.
    pub fn value(&self, check: &str) -> Option<&serde_json::Value> {
        self.result(check).map(|r| &r.value)
    }

    /// The value of `check` as an unsigned integer.
    pub fn value_u64(&self, check: &str) -> Option<u64> {
        self.value(check).and_then(serde_json::Value::as_u64)
    }

    /// The value of `check` as a string.
    pub fn value_str(&self, check: &str) -> Option<&str> {
        self.value(check).and_then(serde_json::Value::as_str)
    }

    /// The process's exit code (`None` when killed by a signal).
    pub fn exit_code(&self) -> Option<i32> {
        self.exit_status.code()
    }

    /// The last `n` console lines.
    pub fn console_tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Everything that is wrong with this run, empty when the agent ran, finished,
    /// and every check passed.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.host_timeout {
            problems.push(format!("killed by the harness after {:?}", self.total));
        }
        if self.boot_to_init.is_none() {
            problems.push("the agent never started (no `FERRIO-AGENT start`)".into());
            if self.exit_status.success() && self.console.contains("reboot: Power down") {
                // Only the agent powers off: it ran, but its tty output never arrived.
                problems.push(
                    "the guest powered off without agent output: the tty path of the serial \
                     console is broken (UART transmit interrupt?); `ferrio.console=kmsg` on the \
                     command line makes the agent report through printk instead"
                        .into(),
                );
            }
        }
        problems.extend(self.protocol_errors.iter().cloned());
        for r in self.results.iter().filter(|r| !r.ok) {
            problems.push(format!("check `{}` failed: {}", r.check, r.value));
        }
        match &self.done {
            None => problems.push("the agent did not finish (no `FERRIO-DONE`)".into()),
            Some(done) => {
                let ok = self.results.iter().filter(|r| r.ok).count();
                if done.failed != 0 || done.passed as usize != ok || ok == 0 {
                    problems.push(format!(
                        "summary {done:?} does not match {ok} passing of {} results",
                        self.results.len()
                    ));
                }
            }
        }
        problems
    }

    /// A human-readable report: problems, the console tail and the VMM's stderr.
    pub fn failure_report(&self, problems: &[String]) -> String {
        format!(
            "guest scenario `{}` failed ({}):\n  - {}\n--- console tail ({}) ---\n{}\n--- vmm stderr ---\n{}",
            self.scenario,
            self.exit_status,
            problems.join("\n  - "),
            self.log_path.display(),
            self.console_tail(60),
            self.vmm_stderr.trim_end(),
        )
    }

    /// Panics, with the console tail, unless the agent ran and every check passed.
    #[track_caller]
    pub fn assert_all_ok(&self) {
        let problems = self.problems();
        if !problems.is_empty() {
            panic!("{}", self.failure_report(&problems));
        }
    }

    /// Panics, with the console tail, unless the VMM exited with `code`.
    #[track_caller]
    pub fn assert_exit_code(&self, code: i32) {
        if self.exit_code() != Some(code) {
            let problem = format!("expected exit code {code}, got {}", self.exit_status);
            panic!("{}", self.failure_report(&[problem]));
        }
    }

    /// The results as an aligned text table plus timing lines.
    pub fn table(&self) -> String {
        let width = self
            .results
            .iter()
            .map(|r| r.check.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut out = format!("{:<width$}  {:<4}  value\n", "check", "ok");
        for r in &self.results {
            let value = match &r.value {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            let ok = if r.ok { "ok" } else { "FAIL" };
            out.push_str(&format!("{:<width$}  {ok:<4}  {value}\n", r.check));
        }
        let secs = |d: Option<std::time::Duration>| {
            d.map_or("-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
        };
        out.push_str(&format!(
            "boot to /init: {}, total: {}, {}\n",
            secs(self.boot_to_init),
            secs(Some(self.total)),
            self.exit_status
        ));
        out
    }
}
