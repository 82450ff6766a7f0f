//! Integration tests of the `ferrio` binary's error handling: every bad input must
//! end in a non-zero exit and a single `ferrio: <error>` line on stderr (clap usage
//! errors: exit code 2), never in a panic.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long one invocation may take before the test gives up on it.
const DEADLINE: Duration = Duration::from_secs(30);

/// The result of one run of the binary.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `ferrio ARGS` with stdin closed and a deadline, capturing its output.
fn ferrio(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrio"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("FERRIO_LOG")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferrio");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            pipe.read_to_end(&mut buf).expect("read pipe");
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            child.kill().expect("kill");
            panic!("ferrio {args:?} still running after {DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: stdout.join().expect("stdout thread"),
        stderr: stderr.join().expect("stderr thread"),
    }
}

/// Asserts stderr holds no panic or backtrace hint.
fn assert_no_panic(run: &Run) {
    for bad in ["panicked", "RUST_BACKTRACE"] {
        assert!(
            !run.stderr.contains(bad),
            "stderr mentions {bad}:\n{}",
            run.stderr
        );
    }
}

/// Asserts a clean runtime error (exit 1, one `ferrio: ` line); returns that line.
fn expect_error(args: &[&str]) -> String {
    let run = ferrio(args);
    assert_no_panic(&run);
    assert_eq!(
        run.status.code(),
        Some(1),
        "ferrio {args:?}; stderr:\n{}",
        run.stderr
    );
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "want one stderr line for {args:?}, got:\n{}",
        run.stderr
    );
    assert!(
        lines[0].starts_with("ferrio: "),
        "bad stderr line: {}",
        lines[0]
    );
    lines[0].to_string()
}

/// Asserts a clap usage error (exit 2, no panic); returns stderr.
fn expect_usage_error(args: &[&str]) -> String {
    let run = ferrio(args);
    assert_no_panic(&run);
    assert_eq!(
        run.status.code(),
        Some(2),
        "ferrio {args:?}; stderr:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.trim().is_empty(),
        "usage error without a message"
    );
    run.stderr
}

/// A temp dir with a file `vmlinux` that passes the kernel format sniff.
fn workdir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"\x7fELF\x02\x01\x01\0").expect("write kernel");
    (dir, kernel.display().to_string())
}

fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Deterministic pseudo-random bytes (xorshift64), avoiding the ELF magic.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect();
    if out.first() == Some(&0x7f) {
        out[0] = 0;
    }
    out
}

#[test]
fn missing_kernel_file() {
    let (dir, _) = workdir();
    let missing = path_in(dir.path(), "no-such-vmlinux").display().to_string();
    let line = expect_error(&["run", "--kernel", &missing]);
    assert!(line.contains(&missing), "{line}");
}

#[test]
fn garbage_kernel_file() {
    let (dir, _) = workdir();
    let garbage = path_in(dir.path(), "garbage.bin");
    std::fs::write(&garbage, random_bytes(4096)).expect("write");
    let garbage = garbage.display().to_string();
    let line = expect_error(&["run", "--kernel", &garbage]);
    assert!(line.contains(&garbage), "{line}");
    assert!(
        line.contains("vmlinux") && line.contains("bzImage"),
        "{line}"
    );
}

#[test]
fn kernel_is_a_directory() {
    let (dir, _) = workdir();
    let path = dir.path().display().to_string();
    let line = expect_error(&["run", "--kernel", &path]);
    assert!(
        line.contains(&path) && line.contains("not a regular file"),
        "{line}"
    );
}

#[test]
fn no_kernel_given() {
    let line = expect_error(&["run"]);
    assert!(line.contains("--kernel"), "{line}");
}

#[test]
fn memory_too_small() {
    let (_dir, kernel) = workdir();
    let line = expect_error(&["run", "--kernel", &kernel, "--memory", "1M"]);
    assert!(line.contains("below the minimum"), "{line}");
}

#[test]
fn memory_too_large() {
    let (_dir, kernel) = workdir();
    let line = expect_error(&["run", "--kernel", &kernel, "--memory", "100T"]);
    assert!(
        line.contains("exceeds the host's physical memory"),
        "{line}"
    );
}

#[test]
fn memory_not_a_size() {
    let (_dir, kernel) = workdir();
    let line = expect_error(&["run", "--kernel", &kernel, "--memory", "12Q"]);
    assert!(line.contains("invalid size '12Q'"), "{line}");
}

#[test]
fn zero_cpus() {
    let (_dir, kernel) = workdir();
    let line = expect_error(&["run", "--kernel", &kernel, "--cpus", "0"]);
    assert!(line.contains("cpus must be at least 1"), "{line}");
}

#[test]
fn too_many_cpus() {
    let (_dir, kernel) = workdir();
    let line = expect_error(&["run", "--kernel", &kernel, "--cpus", "255"]);
    assert!(line.contains("maximum of 254"), "{line}");
}

#[test]
fn bad_serial_spec() {
    let (_dir, kernel) = workdir();
    let line = expect_error(&["run", "--kernel", &kernel, "--serial", "tty"]);
    assert!(line.contains("serial"), "{line}");
}

#[test]
fn bad_console_specs() {
    let (_dir, kernel) = workdir();
    let line = expect_error(&["run", "--kernel", &kernel, "--console", "tty"]);
    assert!(line.contains("invalid device spec 'tty'"), "{line}");
    let line = expect_error(&["run", "--kernel", &kernel, "--console", "stdio,slot=0"]);
    assert!(line.contains("slot"), "{line}");
    // Two devices cannot both read stdin.
    let line = expect_error(&["run", "--kernel", &kernel, "--console", "stdio"]);
    assert!(line.contains("serial port already uses stdio"), "{line}");
}

#[test]
fn bad_disks() {
    let (dir, kernel) = workdir();
    let missing = path_in(dir.path(), "missing.img");
    let line = expect_error(&[
        "run",
        "--kernel",
        &kernel,
        "--disk",
        &format!("path={}", missing.display()),
    ]);
    assert!(
        line.contains("missing.img") && line.contains("No such file"),
        "{line}"
    );
    let odd = path_in(dir.path(), "odd.img");
    std::fs::File::create(&odd).unwrap().set_len(1000).unwrap();
    let line = expect_error(&[
        "run",
        "--kernel",
        &kernel,
        "--disk",
        &format!("path={}", odd.display()),
    ]);
    assert!(line.contains("multiple of 512"), "{line}");
    let line = expect_error(&["run", "--kernel", &kernel, "--disk", "path=/x,queue_size=3"]);
    assert!(line.contains("queue_size"), "{line}");
}

#[test]
fn zero_timeout() {
    let (_dir, kernel) = workdir();
    let line = expect_error(&["run", "--kernel", &kernel, "--timeout", "0"]);
    assert!(line.contains("timeout"), "{line}");
}

#[test]
fn missing_kvm_device() {
    let (_dir, kernel) = workdir();
    let line = expect_error(&["run", "--kernel", &kernel, "--kvm-device", "/nonexistent"]);
    assert!(line.contains("/nonexistent"), "{line}");
    assert!(line.to_lowercase().contains("kvm"), "{line}");
}

#[test]
fn config_file_unknown_key() {
    let (dir, kernel) = workdir();
    let file = path_in(dir.path(), "vm.toml");
    std::fs::write(&file, format!("kernel = {kernel:?}\nbogus_key = 1\n")).expect("write");
    let file = file.display().to_string();
    let line = expect_error(&["run", "--config", &file]);
    assert!(line.contains(&file) && line.contains("bogus_key"), "{line}");
}

#[test]
fn json_config_file_unknown_key() {
    let (dir, _) = workdir();
    let file = path_in(dir.path(), "vm.json");
    std::fs::write(&file, r#"{"cpus": 1, "bogus_key": true}"#).expect("write");
    let file = file.display().to_string();
    let line = expect_error(&["run", "--config", &file]);
    assert!(line.contains(&file) && line.contains("bogus_key"), "{line}");
}

#[test]
fn config_file_missing() {
    let (dir, _) = workdir();
    let file = path_in(dir.path(), "missing.toml").display().to_string();
    let line = expect_error(&["run", "--config", &file]);
    assert!(line.contains(&file), "{line}");
}

#[test]
fn config_file_unknown_extension() {
    let (dir, _) = workdir();
    let file = path_in(dir.path(), "vm.yaml");
    std::fs::write(&file, "cpus: 1\n").expect("write");
    let line = expect_error(&["run", "--config", &file.display().to_string()]);
    assert!(line.contains(".toml or .json"), "{line}");
}

#[test]
fn unknown_flag() {
    let stderr = expect_usage_error(&["run", "--bogus-flag"]);
    assert!(stderr.contains("--bogus-flag"), "{stderr}");
}

#[test]
fn non_numeric_cpus() {
    let stderr = expect_usage_error(&["run", "--cpus", "many"]);
    assert!(stderr.contains("--cpus"), "{stderr}");
}

#[test]
fn no_subcommand() {
    expect_usage_error(&[]);
}

#[test]
fn version() {
    let run = ferrio(&["--version"]);
    assert_no_panic(&run);
    assert!(run.status.success(), "stderr:\n{}", run.stderr);
    assert!(
        run.stdout.contains(env!("CARGO_PKG_VERSION")),
        "{}",
        run.stdout
    );
}

#[test]
fn bad_nets() {
    let (_dir, kernel) = workdir();
    let run = |spec: &str| expect_error(&["run", "--kernel", &kernel, "--net", spec]);
    let line = run("tap=ftap0,mac=01:02:03:04:05:06");
    assert!(line.contains("unicast"), "{line}");
    let line = run("tap=ftap0,mac=52:54:00");
    assert!(line.contains("mac must be"), "{line}");
    let line = run("mac=52:54:00:12:34:56");
    assert!(line.contains("tap=NAME or fd=N"), "{line}");
    let line = run("tap=a,num_queue_pairs=2,fd=4");
    assert!(line.contains("exactly one"), "{line}");
}

/// Runs `ferrio run --kernel K ARGS` (`--iommu` included, so `iommu=on` alone never
/// fails) and returns the error line. Disk paths need not exist: the SR-IOV checks
/// come before any image is opened.
fn sriov_error(args: &[&str]) -> String {
    let (_dir, kernel) = workdir();
    let argv = [&["run", "--kernel", &kernel, "--iommu"], args].concat();
    expect_error(&argv)
}

#[test]
fn sriov_bad_ids() {
    let why = "must be 1..=32 characters of A-Z, a-z, 0-9, _ and -";
    let line = sriov_error(&["--net", "tap=a,id=pf.0"]);
    assert_eq!(
        line,
        format!("ferrio: invalid device spec 'tap=a,id=pf.0': id {why}")
    );
    let long = format!("path=/nonexistent/a.img,id={}", "x".repeat(33));
    let line = sriov_error(&["--disk", &long]);
    assert_eq!(
        line,
        format!("ferrio: invalid device spec '{long}': id {why}")
    );
    let line = sriov_error(&["--net", "tap=a,vf_of="]);
    assert_eq!(
        line,
        format!("ferrio: invalid device spec 'tap=a,vf_of=': vf_of {why}")
    );
}

#[test]
fn sriov_duplicate_id() {
    let line = sriov_error(&[
        "--disk",
        "path=/nonexistent/a.img,id=dev0",
        "--net",
        "tap=a,id=dev0",
    ]);
    assert_eq!(
        line,
        "ferrio: invalid device spec 'tap=a,id=dev0': duplicate id `dev0` \
         (ids must be unique across all disks and net devices)"
    );
}

#[test]
fn sriov_unknown_pf() {
    let line = sriov_error(&["--net", "id=pf0,tap=tpf0", "--net", "tap=tvf0,vf_of=pf1"]);
    assert_eq!(
        line,
        "ferrio: invalid device spec 'tap=tvf0,vf_of=pf1': unknown PF id `pf1`"
    );
    let line = sriov_error(&["--disk", "path=/nonexistent/vf.img,vf_of=d0"]);
    assert_eq!(
        line,
        "ferrio: invalid device spec 'path=/nonexistent/vf.img,vf_of=d0': unknown PF id `d0`"
    );
}

#[test]
fn sriov_vf_of_other_device_type() {
    let line = sriov_error(&[
        "--net",
        "id=pf0,tap=tpf0",
        "--disk",
        "path=/nonexistent/vf.img,vf_of=pf0",
    ]);
    assert_eq!(
        line,
        "ferrio: invalid device spec 'path=/nonexistent/vf.img,vf_of=pf0': PF `pf0` is a net \
         device, but this VF is a disk (a VF has its PF's device type)"
    );
    let line = sriov_error(&[
        "--disk",
        "id=d0,path=/nonexistent/pf.img",
        "--net",
        "tap=tvf0,vf_of=d0",
    ]);
    assert_eq!(
        line,
        "ferrio: invalid device spec 'tap=tvf0,vf_of=d0': PF `d0` is a disk, but this VF is \
         a net device (a VF has its PF's device type)"
    );
}

#[test]
fn sriov_vf_of_a_vf() {
    let line = sriov_error(&[
        "--net",
        "id=pf0,tap=tpf0",
        "--net",
        "id=vf0,tap=tvf0,vf_of=pf0",
        "--net",
        "tap=tvf1,vf_of=vf0",
    ]);
    assert_eq!(
        line,
        "ferrio: invalid device spec 'tap=tvf1,vf_of=vf0': PF `vf0` is itself a VF \
         (of `pf0`); a VF cannot have VFs"
    );
}

#[test]
fn sriov_vf_with_a_slot() {
    let line = sriov_error(&[
        "--disk",
        "id=d0,path=/nonexistent/pf.img",
        "--disk",
        "path=/nonexistent/vf.img,vf_of=d0,slot=6",
    ]);
    assert_eq!(
        line,
        "ferrio: invalid device spec 'path=/nonexistent/vf.img,vf_of=d0,slot=6': a VF takes \
         no slot=: it sits at its PF's devfn + 1 + VF index"
    );
}

#[test]
fn sriov_too_many_vfs_for_the_slot() {
    let vfs: Vec<String> = (0..8).map(|i| format!("tap=tvf{i},vf_of=pf0")).collect();
    let mut args = vec!["--net", "id=pf0,tap=tpf0,slot=31"];
    for vf in &vfs {
        args.extend(["--net", vf.as_str()]);
    }
    let line = sriov_error(&args);
    assert_eq!(
        line,
        "ferrio: invalid device spec 'id=pf0,tap=tpf0,slot=31': PF `pf0` at slot 31 has 8 VFs, \
         but at most 7 fit there (the last VF's devfn, slot * 8 + VFs, must be <= 0xFF)"
    );
}

#[test]
fn sriov_too_many_vfs() {
    let vfs: Vec<String> = (0..249).map(|i| format!("tap=v{i},vf_of=pf0")).collect();
    let mut args = vec!["--net", "id=pf0,tap=tpf0"];
    for vf in &vfs {
        args.extend(["--net", vf.as_str()]);
    }
    let line = sriov_error(&args);
    assert_eq!(
        line,
        "ferrio: invalid device spec 'id=pf0,tap=tpf0': PF `pf0` has 249 VFs, more than the \
         maximum of 248"
    );
}

#[test]
fn sriov_vf_iommu_without_pf_iommu() {
    let line = sriov_error(&[
        "--net",
        "id=pf0,tap=tpf0",
        "--net",
        "tap=tvf0,vf_of=pf0,iommu=on",
    ]);
    assert_eq!(
        line,
        "ferrio: invalid device spec 'tap=tvf0,vf_of=pf0,iommu=on': iommu=on on a VF needs \
         iommu=on on its PF `pf0`"
    );
}

#[test]
fn sriov_valid_config_passes_validation() {
    // A valid PF + VFs gets through validation to the KVM device check (the last one).
    let (dir, kernel) = workdir();
    let image = |name: &str| {
        let path = path_in(dir.path(), name);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        path.display().to_string()
    };
    let disks = [
        format!("id=d0,path={},slot=3", image("pf.img")),
        format!("path={},vf_of=d0,readonly=on,serial=vf0", image("vf0.img")),
    ];
    let file = path_in(dir.path(), "vm.toml");
    std::fs::write(
        &file,
        format!(
            "kernel = {kernel:?}\nnet = [\"id=pf0,tap=tpf0,iommu=on\", \
             \"tap=tvf0,vf_of=pf0,iommu=on\", \"tap=tvf1,vf_of=pf0,mac=02:00:00:00:00:01\"]\n"
        ),
    )
    .expect("write");
    let line = expect_error(&[
        "run",
        "--config",
        &file.display().to_string(),
        "--iommu",
        "--disk",
        &disks[0],
        "--disk",
        &disks[1],
        "--kvm-device",
        "/nonexistent/kvm",
    ]);
    assert!(
        line.starts_with("ferrio: KVM device /nonexistent/kvm: "),
        "{line}"
    );
}
