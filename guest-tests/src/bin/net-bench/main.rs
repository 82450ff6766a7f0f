//! `net-bench`: virtio-net TCP throughput of ferrio against QEMU (vhost off), guest to
//! host and host to guest. Same kernel, initramfs, command line, vCPUs, memory, MAC
//! and queue pairs; both VMMs use the same multi-queue TAP in a throw-away network
//! namespace, one at a time (runs alternate: ferrio, QEMU, ferrio, ...). The guest
//! runs scenario `net` (its flows pinned to different vCPUs); the host peer measures
//! each direction from its first data byte to its last. Writes JSON; a benchmark, not
//! a test. Needs root, `ip`, /dev/net/tun and (for the comparison) QEMU.
//!
//! ```text
//! cargo run --release -p ferrio-guest-tests --bin net-bench -- [--mib 256]
//!     [--flows 2] [--pairs 2] [--runs 1] [--cpus 2] [--memory 512M]
//!     [--vmm both|ferrio|qemu] [--verify] [--out target/guest-bench/net-bench.json]
//! ```
//! Without `--verify` the guest does not hash the data (sha256 on a vCPU would be
//! part of what is measured); with it both ends hash and compare. `--cpus` defaults
//! to 2, but to 1 when QEMU runs on a PVM host, where QEMU cannot boot more
//! (`qemu_max_cpus`); a guest with 1 vCPU uses one queue pair.

mod report;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use ferrio_guest_tests::net_wire as wire;
use ferrio_guest_tests::{
    boot_lock, ensure_image, ferrio_binary, qemu_command, qemu_max_cpus, qemu_net_args, repo_root,
    run_command, run_with, Boot, GuestImage, NetNs, NetPeer, Outcome,
};
use serde_json::json;

use report::{ratios, Series};

const USAGE: &str = "usage: net-bench [--mib N] [--flows N] [--pairs N] [--runs N] [--cpus N] \
    [--memory SIZE] [--vmm both|ferrio|qemu] [--verify] [--out FILE]";

struct Args {
    mib: u64,
    flows: u8,
    pairs: u8,
    runs: usize,
    cpus: Option<u8>,
    memory: String,
    ferrio: bool,
    qemu: bool,
    verify: bool,
    out: PathBuf,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        mib: 256,
        flows: 2,
        pairs: 2,
        runs: 1,
        cpus: None,
        memory: "512M".into(),
        ferrio: true,
        qemu: true,
        verify: false,
        out: repo_root().join("target/guest-bench/net-bench.json"),
    };
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--mib" => a.mib = value()?.parse().map_err(|_| "bad --mib")?,
            "--flows" => a.flows = value()?.parse().map_err(|_| "bad --flows")?,
            "--pairs" => a.pairs = value()?.parse().map_err(|_| "bad --pairs")?,
            "--runs" => a.runs = value()?.parse().map_err(|_| "bad --runs")?,
            "--cpus" => a.cpus = Some(value()?.parse().map_err(|_| "bad --cpus")?),
            "--memory" => a.memory = value()?,
            "--vmm" => match value()?.as_str() {
                "both" => (a.ferrio, a.qemu) = (true, true),
                "ferrio" => (a.ferrio, a.qemu) = (true, false),
                "qemu" => (a.ferrio, a.qemu) = (false, true),
                v => return Err(format!("bad --vmm {v:?}")),
            },
            "--verify" => a.verify = true,
            "--out" => a.out = value()?.into(),
            _ => return Err(format!("unknown argument {arg}\n{USAGE}")),
        }
    }
    if a.runs == 0 || a.mib == 0 || a.flows == 0 || a.pairs == 0 || a.cpus == Some(0) {
        return Err("--runs, --mib, --flows, --pairs and --cpus must be at least 1".into());
    }
    Ok(a)
}

/// The guest's vCPUs: as asked, else 2 (or what QEMU can boot here).
fn cpus(a: &Args, qemu_max: u8) -> Result<u8, String> {
    let limit = if a.qemu { qemu_max } else { u8::MAX };
    match a.cpus {
        None => Ok(2.min(limit)),
        Some(n) if n <= limit => Ok(n),
        Some(n) => Err(format!(
            "QEMU cannot boot a {n}-vCPU guest on this (PVM) host: use --cpus {limit} or \
             --vmm ferrio"
        )),
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("net-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match bench(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("net-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    out.status
        .success()
        .then(|| text.lines().next().unwrap_or("").to_owned())
}

/// One guest run under one VMM: the outcome, the peer's flows and errors.
fn record(series: &mut Series, peer: &NetPeer, outcome: ferrio_guest_tests::Result<Outcome>) {
    match outcome {
        Ok(o) => series.record(&o, &peer.flows(), &peer.errors()),
        Err(e) => series.fail(e.to_string()),
    }
}

/// Runs the benchmark; `Ok(false)` when a requested VMM produced no result.
fn bench(args: &Args) -> Result<bool, String> {
    if let Some(why) = NetNs::unavailable() {
        return Err(why);
    }
    let cpus = cpus(args, qemu_max_cpus())?;
    let qemu_version = if args.qemu {
        Some(
            first_line("qemu-system-x86_64", &["--version"])
                .ok_or("qemu-system-x86_64 not found: resources/host-setup.sh --with-qemu")?,
        )
    } else {
        None
    };
    let mut image: GuestImage = ensure_image().map_err(|e| e.to_string())?;
    let ferrio = if args.ferrio {
        Some(ferrio_binary().map_err(|e| e.to_string())?)
    } else {
        None
    };
    // Both VMMs get the same command line, knobs included.
    image.base_cmdline.push_str(&format!(
        " {}={} {}={} {}=3 {}={}",
        wire::MIB_PARAM,
        args.mib,
        wire::FLOWS_PARAM,
        args.flows,
        wire::PINGS_PARAM,
        wire::VERIFY_PARAM,
        u8::from(args.verify)
    ));
    let ns = NetNs::create().map_err(|e| e.to_string())?;
    let peer = NetPeer::start(&ns, args.verify).map_err(|e| e.to_string())?;

    // Generous: boot (1-4 min on PVM hosts) plus the transfers at 1 MB/s or more.
    let timeout = Duration::from_secs(600 + 2 * args.mib);
    let mut boot = Boot::new("net")
        .cpus(cpus)
        .memory(&args.memory)
        .timeout(timeout)
        .netns(ns.path());
    boot.extra_args = ns.ferrio_net_args(wire::GUEST_MAC, args.pairs);
    let qemu_net = qemu_net_args(ns.tap(), wire::GUEST_MAC, args.pairs);
    let mut qemu_line = String::new();
    let (mut ferrio_runs, mut qemu_runs) = (Series::default(), Series::default());
    for i in 0..args.runs {
        if let Some(ferrio) = &ferrio {
            eprintln!("[net-bench] run {}/{}: ferrio", i + 1, args.runs);
            peer.clear();
            record(&mut ferrio_runs, &peer, run_with(ferrio, &image, &boot));
            eprintln!("[net-bench] ferrio: {}", ferrio_runs.summary());
        }
        if args.qemu {
            eprintln!("[net-bench] run {}/{}: qemu", i + 1, args.runs);
            peer.clear();
            let mut qemu = qemu_command(&image, "net", cpus, &args.memory);
            qemu.args(&qemu_net);
            qemu_line = format!("{qemu:?}");
            ns.enter_on_exec(&mut qemu);
            let limit = timeout + Duration::from_secs(30);
            let outcome = boot_lock().and_then(|_lock| run_command(qemu, "net-qemu", limit));
            record(&mut qemu_runs, &peer, outcome);
            eprintln!("[net-bench] qemu: {}", qemu_runs.summary());
        }
    }

    let report = json!({
        "benchmark": "virtio-net TCP throughput",
        "host_kvm": if Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" },
        "kernel": image.kernel,
        "initramfs": image.initramfs,
        "cmdline": boot.cmdline(&image.base_cmdline),
        "cpus": cpus,
        "memory": args.memory,
        "queue_pairs": args.pairs,
        "mib_per_direction": args.mib,
        "flows_per_direction": args.flows,
        "verify": args.verify,
        "runs": args.runs,
        "units": "MB/s = 10^6 bytes/s, measured by the host peer from the first to the last \
                  data byte of a direction (host to guest: to the guest's answer)",
        "ferrio_net": boot.extra_args.join(" "),
        "qemu_command": qemu_line,
        "qemu_version": qemu_version,
        "ferrio": args.ferrio.then(|| ferrio_runs.json()),
        "qemu": args.qemu.then(|| qemu_runs.json()),
        "ratio_ferrio_over_qemu": ratios(&ferrio_runs, &qemu_runs),
    });
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    std::fs::write(&args.out, &text)
        .map_err(|e| format!("cannot write {}: {e}", args.out.display()))?;
    println!("{text}");
    if args.ferrio {
        println!("ferrio: {}", ferrio_runs.summary());
    }
    if args.qemu {
        println!("qemu:   {}", qemu_runs.summary());
    }
    println!("ratio ferrio/qemu: {}", ratios(&ferrio_runs, &qemu_runs));
    eprintln!("[net-bench] wrote {}", args.out.display());
    Ok((!args.ferrio || ferrio_runs.has_results()) && (!args.qemu || qemu_runs.has_results()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, String> {
        parse_args(s.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_options() {
        let a = parse("--mib 64 --flows 4 --vmm qemu --verify --runs 2").unwrap();
        assert_eq!((a.mib, a.flows, a.runs, a.pairs), (64, 4, 2, 2));
        assert!(a.verify && a.qemu && !a.ferrio);
        let d = parse("").unwrap();
        assert!(d.ferrio && d.qemu && !d.verify && d.mib == 256);
        assert!(d.out.ends_with("target/guest-bench/net-bench.json"));
        assert!(parse("--vmm kvmtool").is_err());
        assert_eq!(cpus(&d, 1), Ok(1));
        assert_eq!(cpus(&d, u8::MAX), Ok(2));
        let f = parse("--cpus 2 --vmm ferrio").unwrap();
        assert_eq!(cpus(&f, 1), Ok(2));
        assert!(cpus(&parse("--cpus 2").unwrap(), 1).is_err());
        assert!(parse("--mib 0").is_err());
        assert!(parse("--bogus").is_err());
    }
}
