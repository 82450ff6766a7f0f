//! `boot-bench`: boot-to-init time of ferrio against QEMU, same kernel, initramfs,
//! command line, vCPUs and memory, runs alternated (ferrio, QEMU, ferrio, ...) so a
//! drifting host affects both. Writes JSON; it is a benchmark, not a test.
//!
//! ```text
//! cargo run --release -p ferrio-guest-tests --bin boot-bench -- [--runs N] [--cpus N]
//!     [--memory 512M] [--out target/bench/boot.json]
//! ```
//! "Boot to init" is the wall time from spawning the VMM to the agent's first console
//! line (`FERRIO-AGENT start`, printed by /init right after it mounted /proc, /sys and
//! /dev); "total" runs until the VMM exits after the guest's power-off.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use ferrio_guest_tests::{
    boot_lock, ensure_image, ferrio_binary, qemu_command, repo_root, run_command, run_with, Boot,
    Outcome,
};
use serde_json::{json, Value};

struct Args {
    runs: usize,
    cpus: u8,
    memory: String,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runs: 3,
        cpus: 1,
        memory: "512M".into(),
        out: repo_root().join("target/bench/boot.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => a.runs = value()?.parse().map_err(|_| "bad --runs")?,
            "--cpus" => a.cpus = value()?.parse().map_err(|_| "bad --cpus")?,
            "--memory" => a.memory = value()?,
            "--out" => a.out = value()?.into(),
            _ => {
                return Err(format!(
                    "unknown argument {arg}\nusage: boot-bench [--runs N] [--cpus N] [--memory SIZE] [--out FILE]"
                ))
            }
        }
    }
    if a.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(a)
}

/// One VMM's runs.
#[derive(Default)]
struct Series {
    boot_to_init: Vec<f64>,
    total: Vec<f64>,
    failures: Vec<String>,
}

impl Series {
    fn record(&mut self, o: &Outcome) {
        match (o.boot_to_init, o.exit_code(), o.problems()) {
            (Some(t), Some(0), p) if p.is_empty() => {
                self.boot_to_init.push(t.as_secs_f64());
                self.total.push(o.total.as_secs_f64());
            }
            (_, code, p) => self.failures.push(format!(
                "exit {code:?}; {}; console tail: {}",
                p.join("; "),
                o.console_tail(3).replace('\n', " | ")
            )),
        }
    }

    fn json(&self) -> Value {
        json!({
            "boot_to_init_s": self.boot_to_init,
            "boot_to_init_median_s": median(&self.boot_to_init),
            "total_s": self.total,
            "total_median_s": median(&self.total),
            "failures": self.failures,
        })
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?)
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let (image, ferrio) = match (ensure_image(), ferrio_binary()) {
        (Ok(i), Ok(f)) => (i, f),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("boot-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let boot = Boot::new("boot").cpus(args.cpus).memory(&args.memory);
    let limit = boot.timeout + Duration::from_secs(30);
    let (mut ferrio_runs, mut qemu_runs) = (Series::default(), Series::default());
    for i in 0..args.runs {
        eprintln!("[boot-bench] run {}/{}: ferrio", i + 1, args.runs);
        match run_with(&ferrio, &image, &boot) {
            Ok(o) => ferrio_runs.record(&o),
            Err(e) => ferrio_runs.failures.push(e.to_string()),
        }
        eprintln!("[boot-bench] run {}/{}: qemu", i + 1, args.runs);
        let qemu = qemu_command(&image, "boot", args.cpus, &args.memory);
        let outcome = boot_lock().and_then(|_lock| run_command(qemu, "boot-qemu", limit));
        match outcome {
            Ok(o) => qemu_runs.record(&o),
            Err(e) => qemu_runs.failures.push(e.to_string()),
        }
    }
    let f_init = median(&ferrio_runs.boot_to_init);
    let q_init = median(&qemu_runs.boot_to_init);
    let report = json!({
        "benchmark": "boot_to_init",
        "host_kvm": if std::path::Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" },
        "kernel": image.kernel,
        "cmdline": boot.cmdline(&image.base_cmdline),
        "cpus": args.cpus,
        "memory": args.memory,
        "runs": args.runs,
        "qemu_version": command_output("qemu-system-x86_64", &["--version"]),
        "ferrio": ferrio_runs.json(),
        "qemu": qemu_runs.json(),
        "ratio_boot_to_init_ferrio_over_qemu": ratio(f_init, q_init),
        "ratio_total_ferrio_over_qemu": ratio(median(&ferrio_runs.total), median(&qemu_runs.total)),
    });
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&args.out, &text) {
        eprintln!("boot-bench: cannot write {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!("{text}");
    eprintln!("[boot-bench] wrote {}", args.out.display());
    if ferrio_runs.boot_to_init.is_empty() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
