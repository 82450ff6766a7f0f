//! Scenario `fio`: the guest half of the virtio-blk benchmark (`blk-bench`). Runs the
//! fio jobs of [`jobs::JOBS`] against /dev/vda (O_DIRECT, libaio) and reports each
//! job's result: `seq_read_mbps`, `rand_read_iops`, `seq_write_mbps`, plus the mean
//! completion latency of each (`<job>_clat_mean_us`). It is a benchmark, not a test:
//! the checks fail only when fio cannot run or its report cannot be read.
//!
//! Needs the benchmark image (`FERRIO_GUEST_EXTRAS=fio resources/build-guest.sh`, which
//! adds Debian's fio and its libraries) and a virtio disk. `ferrio.fio.runtime=S` and
//! `ferrio.fio.ramp=S` on the kernel command line override the job durations.

pub mod jobs;
mod json;

use std::time::Instant;

use crate::parse;
use crate::report::Reporter;
use crate::sys;

use jobs::{Job, JOBS};
use json::Json;

pub fn run(r: &mut Reporter) {
    // The write job overwrites the disk: never outside a guest (a host's /dev/vda may
    // well be its root file system).
    if !sys::is_init() {
        r.check(
            "in_guest",
            false,
            "refusing to run: the fio jobs overwrite /dev/vda, which only the guest's init may do",
        );
        return;
    }
    // Only a file check: starting fio costs ~25 s here (the emulated kernel maps its
    // 62 libraries); its version comes from the first report instead.
    let have_fio = std::path::Path::new(jobs::FIO).is_file();
    r.check(
        "fio",
        have_fio,
        if have_fio {
            jobs::FIO.to_owned()
        } else {
            format!(
                "no {} (boot the benchmark image: FERRIO_GUEST_EXTRAS=fio resources/build-guest.sh)",
                jobs::FIO
            )
        },
    );
    let disk = sys::read_u64("/sys/block/vda/size").map(|sectors| sectors * 512);
    let have_disk = disk.is_ok();
    r.check_result(
        "disk_bytes",
        disk.map_err(|e| format!("no virtio disk /dev/vda: {e}")),
    );
    if !have_fio || !have_disk {
        return;
    }

    let cmdline = sys::read("/proc/cmdline").unwrap_or_default();
    let seconds = |param: &str, default: u32| {
        parse::cmdline_param(&cmdline, param)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let runtime = seconds(jobs::RUNTIME_PARAM, jobs::DEFAULT_RUNTIME_S);
    let ramp = seconds(jobs::RAMP_PARAM, jobs::DEFAULT_RAMP_S);
    r.note(&format!(
        "fio jobs: runtime {runtime} s, ramp {ramp} s, on {}",
        jobs::GUEST_DISK
    ));

    let mut version_reported = false;
    for job in &JOBS {
        let started = Instant::now();
        let result = run_job(job, runtime, ramp);
        r.note(&format!(
            "{}: {:.1} s wall",
            job.name,
            started.elapsed().as_secs_f64()
        ));
        match result {
            Ok(m) => {
                if !version_reported {
                    r.check("fio_version", true, m.version.clone());
                    version_reported = true;
                }
                r.check(job.name, true, round3(m.value));
                r.check(
                    &format!("{}_clat_mean_us", job.name),
                    true,
                    round3(m.clat_mean_us),
                );
            }
            Err(e) => r.check(job.name, false, e),
        }
    }
}

/// What one job measured.
#[derive(Debug)]
struct Measured {
    value: f64,
    clat_mean_us: f64,
    /// fio's own `fio version` line.
    version: String,
}

fn run_job(job: &Job, runtime: u32, ramp: u32) -> Result<Measured, String> {
    let args = job.args(jobs::GUEST_DISK, runtime, ramp);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sys::run(jobs::FIO, &args)?;
    if !out.success() {
        return Err(format!(
            "fio exited with {:?}: {}",
            out.code,
            last_lines(&out.stderr, 5)
        ));
    }
    let report = json::parse_report(&out.stdout)
        .map_err(|e| format!("{e}; stderr: {}", last_lines(&out.stderr, 5)))?;
    measured(job, &report)
}

/// Reads a job's result out of fio's report.
fn measured(job: &Job, report: &Json) -> Result<Measured, String> {
    let fio_job = report
        .get("jobs")
        .and_then(|j| j.at(0))
        .ok_or("fio's report has no jobs")?;
    let error = fio_job.get("error").and_then(Json::as_f64).unwrap_or(0.0);
    if error != 0.0 {
        return Err(format!("fio reports error {error}"));
    }
    let stats = fio_job
        .get(job.dir.key())
        .ok_or_else(|| format!("fio's report has no `{}` section", job.dir.key()))?;
    let num = |path: &[&str]| {
        path.iter()
            .try_fold(stats, |v, k| v.get(k))
            .and_then(Json::as_f64)
            .ok_or_else(|| format!("fio's report has no {}.{}", job.dir.key(), path.join(".")))
    };
    let (bw_bytes, iops) = (num(&["bw_bytes"])?, num(&["iops"])?);
    if bw_bytes <= 0.0 || iops <= 0.0 {
        return Err(format!(
            "no I/O completed (bw_bytes {bw_bytes}, iops {iops})"
        ));
    }
    Ok(Measured {
        value: job.value(bw_bytes, iops),
        clat_mean_us: num(&["clat_ns", "mean"])? / 1000.0,
        version: report
            .get("fio version")
            .and_then(Json::as_str)
            .unwrap_or("unknown")
            .to_owned(),
    })
}

/// Three decimals: enough for the guest's small numbers, no float noise in the JSON.
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_direction_of_the_job_from_fio_report() {
        let text = r#"{"fio version":"fio-3.33","jobs":[{"jobname":"x","error":0,
            "read":{"bw_bytes":52428800,"iops":50.0,"clat_ns":{"mean":160000.0}},
            "write":{"bw_bytes":0,"iops":0.0,"clat_ns":{"mean":0.0}}}]}"#;
        let report = json::parse_report(text).unwrap();
        let m = measured(&JOBS[0], &report).unwrap();
        assert_eq!((round3(m.value), m.clat_mean_us), (52.429, 160.0));
        assert_eq!(m.version, "fio-3.33");
        let m = measured(&JOBS[1], &report).unwrap();
        assert_eq!(m.value, 50.0);
        // The write job finds no I/O in this report.
        assert!(measured(&JOBS[2], &report).unwrap_err().contains("no I/O"));

        let failed = json::parse_report(r#"{"jobs":[{"error":5}]}"#).unwrap();
        assert!(measured(&JOBS[0], &failed).unwrap_err().contains("error 5"));
        let empty = json::parse_report(r#"{"jobs":[]}"#).unwrap();
        assert!(measured(&JOBS[0], &empty).is_err());
        assert_eq!(last_lines("a\nb\nc\n", 2), "b | c");
    }
}
