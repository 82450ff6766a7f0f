//! The fio jobs of the virtio-blk benchmark. One definition for both sides: the agent's
//! `fio` scenario runs them in the guest against the virtio disk, and `blk-bench`
//! (which includes this file with `#[path]`) runs the very same command lines on the
//! host against the image file, as the upper limit. Pure code: no I/O, no crate paths.

/// Seconds each job measures (`--runtime`, with `--time_based`), unless overridden.
pub const DEFAULT_RUNTIME_S: u32 = 20;
/// Seconds each job runs before measuring (`--ramp_time`), unless overridden.
pub const DEFAULT_RAMP_S: u32 = 2;
/// Kernel command-line parameters that override the two defaults in the guest.
pub const RUNTIME_PARAM: &str = "ferrio.fio.runtime";
pub const RAMP_PARAM: &str = "ferrio.fio.ramp";
/// The disk the guest benchmarks: the first virtio-blk device.
pub const GUEST_DISK: &str = "/dev/vda";
/// Where the bench image puts fio (Debian's package path).
pub const FIO: &str = "/usr/bin/fio";

/// The data direction a job measures: which part of fio's JSON report holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

impl Dir {
    /// The key of this direction's statistics in a job of fio's JSON report.
    pub fn key(self) -> &'static str {
        match self {
            Dir::Read => "read",
            Dir::Write => "write",
        }
    }
}

/// What a job reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Throughput in MB/s (10^6 bytes per second), from `bw_bytes`.
    MegabytesPerSecond,
    /// Operations per second, from `iops`.
    Iops,
}

/// One fio job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    /// The result name (`seq_read_mbps`, ...); also fio's `--name`.
    pub name: &'static str,
    /// fio's `--rw`.
    pub rw: &'static str,
    /// fio's `--bs`.
    pub bs: &'static str,
    pub iodepth: u32,
    pub dir: Dir,
    pub metric: Metric,
}

/// The benchmark: sequential read and write with 1 MiB blocks at queue depth 8, and
/// 4 KiB random reads at queue depth 32. Reads come first, so they read the image's
/// pattern before the write job overwrites it.
pub const JOBS: [Job; 3] = [
    Job {
        name: "seq_read_mbps",
        rw: "read",
        bs: "1M",
        iodepth: 8,
        dir: Dir::Read,
        metric: Metric::MegabytesPerSecond,
    },
    Job {
        name: "rand_read_iops",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        dir: Dir::Read,
        metric: Metric::Iops,
    },
    Job {
        name: "seq_write_mbps",
        rw: "write",
        bs: "1M",
        iodepth: 8,
        dir: Dir::Write,
        metric: Metric::MegabytesPerSecond,
    },
];

impl Job {
    /// fio's arguments for this job on `filename` (a block device or an image file).
    /// `--thread`: no fork, which is slow in a guest whose kernel is emulated.
    pub fn args(&self, filename: &str, runtime_s: u32, ramp_s: u32) -> Vec<String> {
        vec![
            format!("--name={}", self.name),
            format!("--filename={filename}"),
            format!("--rw={}", self.rw),
            format!("--bs={}", self.bs),
            format!("--iodepth={}", self.iodepth),
            "--direct=1".into(),
            "--ioengine=libaio".into(),
            "--numjobs=1".into(),
            "--thread".into(),
            format!("--runtime={runtime_s}"),
            "--time_based".into(),
            format!("--ramp_time={ramp_s}"),
            "--eta=never".into(),
            "--output-format=json".into(),
        ]
    }

    /// The reported value, from the direction's `bw_bytes` (bytes/s) and `iops`.
    pub fn value(&self, bw_bytes: f64, iops: f64) -> f64 {
        match self.metric {
            Metric::MegabytesPerSecond => bw_bytes / 1e6,
            Metric::Iops => iops,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_have_distinct_names_and_the_benchmark_parameters() {
        let names: Vec<&str> = JOBS.iter().map(|j| j.name).collect();
        assert_eq!(names, ["seq_read_mbps", "rand_read_iops", "seq_write_mbps"]);
        let rand = JOBS[1];
        assert_eq!((rand.bs, rand.iodepth, rand.dir), ("4k", 32, Dir::Read));
        let args = JOBS[2].args("/dev/vda", 20, 2).join(" ");
        assert_eq!(
            args,
            "--name=seq_write_mbps --filename=/dev/vda --rw=write --bs=1M --iodepth=8 \
             --direct=1 --ioengine=libaio --numjobs=1 --thread --runtime=20 --time_based \
             --ramp_time=2 --eta=never --output-format=json"
        );
        assert_eq!(JOBS[0].value(250e6, 238.0), 250.0);
        assert_eq!(JOBS[1].value(4096e3, 1000.0), 1000.0);
    }
}
