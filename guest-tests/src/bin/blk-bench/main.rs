//! `blk-bench`: virtio-blk throughput of ferrio against QEMU, with fio in the guest
//! (sequential read/write MB/s at 1 MiB x QD8, 4 KiB random-read IOPS at QD32; O_DIRECT,
//! libaio), and the same fio jobs on the host on the same image file as the upper
//! limit. Same kernel, initramfs (the fio flavour from `FERRIO_GUEST_EXTRAS=fio
//! resources/build-guest.sh`), command line, vCPUs, memory and image; VMM runs
//! alternated (ferrio, QEMU, ferrio, ...). Writes JSON; a benchmark, not a test.
//!
//! ```text
//! cargo run --release -p ferrio-guest-tests --bin blk-bench -- [--runs N]
//!     [--runtime S] [--ramp S] [--size 1G] [--cpus N] [--memory 512M]
//!     [--image target/bench/blk.img] [--out target/bench/blk.json] [--no-host]
//! ```
//! Both VMMs bypass the host page cache: ferrio `direct=on`, QEMU `cache=none,aio=native`.

mod host;
// The guest's job definitions, so that the host runs exactly the same fio jobs.
#[path = "../../../agent/src/scenarios/fio/jobs.rs"]
#[allow(dead_code)] // guest-only constants
mod jobs;
mod stats;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use ferrio_guest_tests::{
    boot_lock, ferrio_binary, qemu_command, read_manifest, repo_root, run_command, run_with, Boot,
    GuestImage,
};
use serde_json::json;

use host::{first_line, host_fio, shell_line, write_image};
use stats::{ratios, Series};

const USAGE: &str = "usage: blk-bench [--runs N] [--runtime S] [--ramp S] [--size SIZE] \
    [--cpus N] [--memory SIZE] [--image FILE] [--out FILE] [--no-host] [--iommu]";

struct Args {
    runs: usize,
    runtime: u32,
    ramp: u32,
    size: u64,
    cpus: u8,
    memory: String,
    image: PathBuf,
    out: PathBuf,
    host: bool,
    /// Also run ferrio with the disk behind its virtio-iommu (`iommu.strict=1`).
    iommu: bool,
}

/// "1G", "512M", "4096K" or plain bytes.
fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn parse_args() -> Result<Args, String> {
    let bench = repo_root().join("target/bench");
    let mut a = Args {
        runs: 1,
        runtime: jobs::DEFAULT_RUNTIME_S,
        ramp: jobs::DEFAULT_RAMP_S,
        size: 1 << 30,
        cpus: 1,
        memory: "512M".into(),
        image: bench.join("blk.img"),
        out: bench.join("blk.json"),
        host: true,
        iommu: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => a.runs = value()?.parse().map_err(|_| "bad --runs")?,
            "--runtime" => a.runtime = value()?.parse().map_err(|_| "bad --runtime")?,
            "--ramp" => a.ramp = value()?.parse().map_err(|_| "bad --ramp")?,
            "--size" => a.size = parse_size(&value()?).ok_or("bad --size")?,
            "--cpus" => a.cpus = value()?.parse().map_err(|_| "bad --cpus")?,
            "--memory" => a.memory = value()?,
            "--image" => a.image = value()?.into(),
            "--out" => a.out = value()?.into(),
            "--no-host" => a.host = false,
            "--iommu" => a.iommu = true,
            _ => return Err(format!("unknown argument {arg}\n{USAGE}")),
        }
    }
    if a.runs == 0 || a.runtime == 0 {
        return Err("--runs and --runtime must be at least 1".into());
    }
    if a.size < 1 << 20 || a.size % (1 << 20) != 0 {
        return Err("--size must be a non-zero multiple of 1M".into());
    }
    if a.image.to_string_lossy().contains(',') {
        return Err("--image: the path must not contain a comma (ferrio's --disk syntax)".into());
    }
    Ok(a)
}

/// Builds (if an input changed) and returns the fio flavour of the guest image, in
/// target/guest-bench.
fn bench_image() -> Result<GuestImage, String> {
    let root = repo_root();
    let out = Command::new("bash")
        .arg(root.join("resources/build-guest.sh"))
        .env("FERRIO_GUEST_EXTRAS", "fio")
        .env_remove("FERRIO_GUEST_DIR")
        .output()
        .map_err(|e| format!("cannot run build-guest.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "FERRIO_GUEST_EXTRAS=fio resources/build-guest.sh failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    read_manifest(&root.join("target/guest-bench/manifest")).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("blk-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match bench(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("blk-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the benchmark; `Ok(false)` when ferrio produced no result.
fn bench(args: &Args) -> Result<bool, String> {
    let qemu_version = first_line("qemu-system-x86_64", &["--version"])
        .ok_or("qemu-system-x86_64 not found: resources/host-setup.sh --with-qemu")?;
    let host_fio_version = if args.host {
        Some(first_line("fio", &["--version"]).ok_or(
            "fio not found on the host: resources/host-setup.sh --with-fio (or pass --no-host)",
        )?)
    } else {
        None
    };
    let mut image = bench_image()?;
    let ferrio = ferrio_binary().map_err(|e| e.to_string())?;
    // Both VMMs get the same command line, job durations included.
    image.base_cmdline.push_str(&format!(
        " {}={} {}={}",
        jobs::RUNTIME_PARAM,
        args.runtime,
        jobs::RAMP_PARAM,
        args.ramp
    ));
    eprintln!(
        "[blk-bench] writing {} bytes to {}",
        args.size,
        args.image.display()
    );
    write_image(&args.image, args.size)?;
    let img = args.image.to_string_lossy().into_owned();

    let host = match host_fio_version {
        Some(_) => Some(host_fio(&args.image, args.runtime, args.ramp)?),
        None => None,
    };

    let ferrio_disk = format!("path={img},num_queues=1,direct=on");
    let qemu_disk = [
        "-drive".to_owned(),
        format!(
            "file={},if=none,id=d0,format=raw,cache=none,aio=native",
            img.replace(',', ",,")
        ),
        "-device".to_owned(),
        "virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=1".to_owned(),
    ];
    let mut boot = Boot::new("fio").cpus(args.cpus).memory(&args.memory);
    let per_job = u64::from(args.runtime + args.ramp);
    boot = boot.timeout(Duration::from_secs(900 + 3 * 4 * per_job));
    boot.extra_args = vec!["--disk".into(), ferrio_disk.clone()];
    let limit = boot.timeout + Duration::from_secs(30);
    let (mut ferrio_runs, mut qemu_runs) = (Series::default(), Series::default());
    let mut iommu_runs = Series::default();
    let mut iommu_boot = boot.clone();
    iommu_boot.extra_args = vec![
        "--iommu".into(),
        "--disk".into(),
        format!("{ferrio_disk},iommu=on"),
    ];
    iommu_boot.extra_cmdline = "iommu.strict=1".into();
    let mut qemu_line = String::new();
    for i in 0..args.runs {
        eprintln!("[blk-bench] run {}/{}: ferrio", i + 1, args.runs);
        match run_with(&ferrio, &image, &boot) {
            Ok(o) => ferrio_runs.record(&o),
            Err(e) => ferrio_runs.failures.push(e.to_string()),
        }
        if args.iommu {
            eprintln!(
                "[blk-bench] run {}/{}: ferrio, disk behind the virtio-iommu",
                i + 1,
                args.runs
            );
            match run_with(&ferrio, &image, &iommu_boot) {
                Ok(o) => iommu_runs.record(&o),
                Err(e) => iommu_runs.failures.push(e.to_string()),
            }
        }
        eprintln!("[blk-bench] run {}/{}: qemu", i + 1, args.runs);
        let mut qemu = qemu_command(&image, "fio", args.cpus, &args.memory);
        qemu.args(&qemu_disk);
        qemu_line = shell_line(&qemu);
        match boot_lock().and_then(|_lock| run_command(qemu, "fio-qemu", limit)) {
            Ok(o) => qemu_runs.record(&o),
            Err(e) => qemu_runs.failures.push(e.to_string()),
        }
    }

    let f = |n: &str| ferrio_runs.median(n);
    let q = |n: &str| qemu_runs.median(n);
    let fi = |n: &str| iommu_runs.median(n);
    let h = |n: &str| host.as_ref().and_then(|h| h.get(n).copied());
    let report = json!({
        "benchmark": "virtio-blk fio",
        "host_kvm": if Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" },
        "kernel": image.kernel,
        "initramfs": image.initramfs,
        "cmdline": boot.cmdline(&image.base_cmdline),
        "cpus": args.cpus,
        "memory": args.memory,
        "runs": args.runs,
        "image": {"path": img, "size_bytes": args.size},
        "fio_jobs": jobs::JOBS.iter().map(|j| json!({
            "name": j.name,
            "args": j.args(jobs::GUEST_DISK, args.runtime, args.ramp).join(" "),
        })).collect::<Vec<_>>(),
        "units": "MB/s = 10^6 bytes/s; clat in microseconds",
        "ferrio_disk": format!("--disk {ferrio_disk}"),
        "qemu_command": qemu_line,
        "qemu_version": qemu_version,
        "host_fio_version": host_fio_version,
        "ferrio": ferrio_runs.json(),
        "qemu": qemu_runs.json(),
        "ferrio_iommu": args.iommu.then(|| iommu_runs.json()),
        "ferrio_iommu_disk": args.iommu.then(|| format!("--iommu --disk {ferrio_disk},iommu=on (cmdline iommu.strict=1)")),
        "host": host,
        "ratio_ferrio_iommu_over_ferrio": args.iommu.then(|| ratios(fi, f)),
        "ratio_ferrio_over_qemu": ratios(f, q),
        "ratio_ferrio_over_host": ratios(f, h),
        "ratio_qemu_over_host": ratios(q, h),
    });
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    std::fs::write(&args.out, &text)
        .map_err(|e| format!("cannot write {}: {e}", args.out.display()))?;
    println!("{text}");
    eprintln!("[blk-bench] wrote {}", args.out.display());
    Ok(!ferrio_runs.values.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
    }
}
