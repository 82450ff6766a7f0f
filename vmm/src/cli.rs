//! The command line: a thin clap front end over [`crate::config`].
//!
//! Values are taken as given (sizes and serial specs as strings, counts as plain
//! integers) and checked by [`ConfigBuilder::validate`], so bad values produce a
//! one-line [`ConfigError`] instead of a clap usage error.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::config::{
    load_file, ConfigBuilder, ConfigError, FileConfig, HostInfo, MemoryValue, SystemHost, VmConfig,
};

/// ferrio: a minimal x86_64 KVM VMM.
#[derive(Debug, Parser)]
#[command(name = "ferrio", version, about, arg_required_else_help = true)]
pub struct Cli {
    /// More log output: -v info, -vv debug, -vvv trace (default: warnings only).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The `tracing` filter directive for the `-v` count: `warn`, `info`, `debug`, `trace`.
    pub fn log_filter(&self) -> &'static str {
        match self.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel in a new VM and run it until it shuts down.
    Run(RunArgs),
}

/// Flags of `ferrio run`; each overrides the same key of `--config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct RunArgs {
    /// Kernel image: vmlinux (ELF with a PVH note) or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (cpio archive).
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 panic=-1"].
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs, 1..=254 [default: 1].
    #[arg(long, value_name = "N")]
    pub cpus: Option<u64>,
    /// Guest RAM, e.g. 512M, 2G, 1024K or bytes [default: 512M].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Serial console output: stdio, none or file=PATH [default: stdio].
    #[arg(long, value_name = "stdio|file=PATH|none")]
    pub serial: Option<String>,
    /// A virtio-console PCI device: stdio, file=PATH, socket=PATH (listen, wait for one
    /// client) or none, with an optional `,slot=N` [default: none].
    #[arg(long, value_name = "BACKEND[,slot=N]")]
    pub console: Option<String>,
    /// A virtio-blk disk over a raw image (repeatable; guest order = this order):
    /// path=FILE[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,serial=ID][,slot=N][,io_engine=sync|uring][,iommu=on][,id=NAME][,vf_of=NAME].
    /// id=NAME names the disk; vf_of=NAME makes it an SR-IOV VF of the disk with that id
    /// (no slot of its own; the guest creates the VFs through the PF's sriov_numvfs)
    #[arg(long, value_name = "path=FILE[,...]")]
    pub disk: Vec<String>,
    /// A virtio-net NIC over a TAP (repeatable): tap=NAME (an existing TAP interface) or
    /// fd=N (an inherited TAP fd), [,mac=MAC][,num_queue_pairs=N][,queue_size=N][,slot=N][,iommu=on][,id=NAME][,vf_of=NAME].
    /// id=NAME names the NIC; vf_of=NAME makes it an SR-IOV VF of the NIC with that id,
    /// as for --disk
    #[arg(long, value_name = "tap=NAME|fd=N[,...]")]
    pub net: Vec<String>,
    /// Add a virtio-iommu; devices given `iommu=on` are placed behind it (their DMA is
    /// translated; the guest finds it through the ACPI VIOT table).
    #[arg(long)]
    pub iommu: bool,
    /// A host PCI function passed through with VFIO (repeatable; it must be bound to
    /// vfio-pci): path=/sys/bus/pci/devices/DDDD:BB:DD.F[,iommu=on][,slot=N][,backend=group|cdev]
    #[arg(long, value_name = "path=SYSFS[,...]")]
    pub device: Vec<String>,
    /// Stop with an error if the VM runs longer than this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// seccomp filters on every thread: on (a forbidden system call stops the VMM with
    /// exit code 159 and a message naming it), log (the kernel logs it, nothing is
    /// refused) or off [default: on].
    #[arg(long, value_name = "on|log|off")]
    pub seccomp: Option<String>,
    /// TOML or JSON config file (same keys as these flags; flags win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// KVM device node (for tests).
    #[arg(long, value_name = "PATH", hide = true)]
    pub kvm_device: Option<PathBuf>,
    /// Root of the sysfs and /dev trees `--device` checks (for tests: DIR/sys, DIR/dev).
    #[arg(long, value_name = "DIR", hide = true)]
    pub host_root: Option<PathBuf>,
}

impl RunArgs {
    /// The flags as a config layer (the `--config` and `--kvm-device` flags aside).
    fn layer(&self) -> FileConfig {
        FileConfig {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: self.memory.clone().map(MemoryValue::Text),
            serial: self.serial.clone(),
            timeout: self.timeout,
            console: self.console.clone(),
            disk: (!self.disk.is_empty()).then(|| self.disk.clone()),
            net: (!self.net.is_empty()).then(|| self.net.clone()),
            iommu: self.iommu.then_some(true),
            device: (!self.device.is_empty()).then(|| self.device.clone()),
            seccomp: self.seccomp.clone(),
        }
    }
}

/// Builds the validated [`VmConfig`]: defaults, then `--config`, then the flags.
pub fn parse_config(args: RunArgs) -> Result<VmConfig, ConfigError> {
    parse_config_with(args, &SystemHost)
}

/// [`parse_config`] with an explicit host (tests use a fake one).
pub fn parse_config_with(args: RunArgs, host: &dyn HostInfo) -> Result<VmConfig, ConfigError> {
    let mut builder = ConfigBuilder::new();
    if let Some(path) = &args.config {
        builder = builder.apply(load_file(path)?);
    }
    builder = builder.apply(args.layer());
    if let Some(root) = args.host_root {
        builder = builder.host_root(root);
    }
    if let Some(dev) = args.kvm_device {
        builder = builder.kvm_device(dev);
    }
    builder.validate(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SeccompMode, SerialConfig, DEFAULT_CMDLINE};
    use clap::error::ErrorKind;
    use std::time::Duration;

    /// A host with 8 GiB of RAM.
    struct Host;
    impl HostInfo for Host {
        fn total_memory(&self) -> Option<u64> {
            Some(8 << 30)
        }
    }

    fn run_args(argv: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["ferrio", "run"].iter().chain(argv)).expect("parse");
        let Command::Run(args) = cli.command;
        args
    }

    /// A temp dir with a fake vmlinux (ELF magic) named `vmlinux`.
    fn kernel_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("vmlinux"), b"\x7fELF\x02\x01\x01").expect("write");
        dir
    }

    fn path_str(dir: &tempfile::TempDir, name: &str) -> String {
        dir.path().join(name).display().to_string()
    }

    #[test]
    fn all_flags() {
        let dir = kernel_dir();
        std::fs::write(dir.path().join("initrd"), b"cpio").expect("write");
        let (kernel, initrd) = (path_str(&dir, "vmlinux"), path_str(&dir, "initrd"));
        let args = run_args(&[
            "--kernel",
            &kernel,
            "--initramfs",
            &initrd,
            "--cmdline",
            "quiet",
            "--cpus",
            "4",
            "--memory",
            "1G",
            "--serial",
            "none",
            "--timeout",
            "30",
            "--kvm-device",
            "/dev/null",
        ]);
        let cfg = parse_config_with(args, &Host).expect("valid");
        assert_eq!(cfg.kernel, PathBuf::from(kernel));
        assert_eq!(cfg.initramfs, Some(PathBuf::from(initrd)));
        assert_eq!(cfg.cmdline, "quiet");
        assert_eq!((cfg.cpus, cfg.memory_bytes), (4, 1 << 30));
        assert_eq!(cfg.serial, SerialConfig::None);
        assert_eq!(cfg.timeout, Some(Duration::from_secs(30)));
        assert_eq!(cfg.kvm_device, PathBuf::from("/dev/null"));
    }

    #[test]
    fn defaults() {
        let dir = kernel_dir();
        let args = run_args(&["--kernel", &path_str(&dir, "vmlinux"), "--kvm-device", "/"]);
        let cfg = parse_config_with(args, &Host).expect("valid");
        assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
        assert_eq!((cfg.cpus, cfg.memory_bytes), (1, 512 << 20));
        assert_eq!((cfg.serial, cfg.timeout), (SerialConfig::Stdio, None));
        let args = run_args(&["--kernel", &path_str(&dir, "vmlinux")]);
        assert_eq!(args.kvm_device, None, "the builder supplies /dev/kvm");
    }

    #[test]
    fn flags_override_config_file() {
        let dir = kernel_dir();
        std::fs::write(dir.path().join("other"), b"\x7fELF").expect("write");
        let file = dir.path().join("vm.toml");
        let text = format!(
            "kernel = {:?}\ncpus = 2\nmemory = \"256M\"\ncmdline = \"from-file\"\ntimeout = 9\n",
            path_str(&dir, "vmlinux")
        );
        std::fs::write(&file, text).expect("write");
        let file = file.display().to_string();
        let base = ["--config", file.as_str(), "--kvm-device", "/"];

        let cfg = parse_config_with(run_args(&base), &Host).expect("valid");
        assert_eq!((cfg.cpus, cfg.memory_bytes), (2, 256 << 20));
        assert_eq!(
            (cfg.cmdline.as_str(), cfg.timeout),
            ("from-file", Some(Duration::from_secs(9)))
        );

        let other = path_str(&dir, "other");
        let flags = [
            "--cpus",
            "3",
            "--memory",
            "128M",
            "--kernel",
            &other,
            "--timeout",
            "5",
        ];
        let cfg =
            parse_config_with(run_args(&[&base[..], &flags[..]].concat()), &Host).expect("valid");
        assert_eq!((cfg.cpus, cfg.memory_bytes), (3, 128 << 20));
        assert_eq!(cfg.kernel, PathBuf::from(other));
        assert_eq!(
            cfg.cmdline, "from-file",
            "unset flags keep the file's value"
        );
        assert_eq!(cfg.timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn missing_config_file() {
        let args = run_args(&["--config", "/nonexistent/vm.toml"]);
        let err = parse_config_with(args, &Host).expect_err("no file");
        assert!(matches!(err, ConfigError::ReadFile { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/vm.toml"), "{err}");
    }

    #[test]
    fn unknown_flag_rejected() {
        let err = Cli::try_parse_from(["ferrio", "run", "--bogus"]).expect_err("unknown");
        assert_eq!(err.kind(), ErrorKind::UnknownArgument);
    }

    #[test]
    fn bad_number_rejected_by_clap() {
        let err = Cli::try_parse_from(["ferrio", "run", "--cpus", "x"]).expect_err("nan");
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn zero_cpus_rejected() {
        let dir = kernel_dir();
        let args = run_args(&["--kernel", &path_str(&dir, "vmlinux"), "--cpus", "0"]);
        let err = parse_config_with(args, &Host).expect_err("0 cpus");
        assert!(matches!(err, ConfigError::ZeroCpus));
        assert_eq!(err.to_string(), "cpus must be at least 1");
    }

    #[test]
    fn missing_kernel() {
        let err = parse_config_with(run_args(&[]), &Host).expect_err("no kernel");
        assert!(matches!(err, ConfigError::NoKernel));
        assert!(err.to_string().contains("--kernel"), "{err}");
    }

    #[test]
    fn subcommand_required() {
        let err = Cli::try_parse_from(["ferrio"]).expect_err("no subcommand");
        assert_eq!(
            err.kind(),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
    }

    #[test]
    fn version_and_hidden_flag() {
        let err = Cli::try_parse_from(["ferrio", "--version"]).expect_err("version");
        assert_eq!(err.kind(), ErrorKind::DisplayVersion);
        let help = Cli::try_parse_from(["ferrio", "run", "--help"]).expect_err("help");
        assert!(help.to_string().contains("--kernel"));
        assert!(!help.to_string().contains("--kvm-device"));
    }

    #[test]
    fn seccomp_mode_from_flag_and_file() {
        let dir = kernel_dir();
        let kernel = path_str(&dir, "vmlinux");
        let base = ["--kernel", kernel.as_str(), "--kvm-device", "/"];
        let cfg = parse_config_with(run_args(&base), &Host).expect("valid");
        assert_eq!(cfg.seccomp, SeccompMode::On, "filters are on by default");
        let file = dir.path().join("vm.toml");
        std::fs::write(&file, "seccomp = \"off\"\n").expect("write");
        let file = file.display().to_string();
        let with_file = [&base[..], &["--config", &file]].concat();
        let cfg = parse_config_with(run_args(&with_file), &Host).expect("valid");
        assert_eq!(cfg.seccomp, SeccompMode::Off);
        let flag = [&with_file[..], &["--seccomp", "log"]].concat();
        let cfg = parse_config_with(run_args(&flag), &Host).expect("valid");
        assert_eq!(cfg.seccomp, SeccompMode::Log, "the flag wins");
        let bad = [&base[..], &["--seccomp", "strict"]].concat();
        let err = parse_config_with(run_args(&bad), &Host).expect_err("bad mode");
        assert!(matches!(err, ConfigError::BadSeccomp(_)), "{err}");
        assert_eq!(
            err.to_string(),
            "invalid seccomp mode 'strict' (expected on, log or off)"
        );
    }

    #[test]
    fn verbose_counts() {
        let level = |argv: &[&str]| Cli::try_parse_from(argv).expect("parse").log_filter();
        assert_eq!(level(&["ferrio", "run"]), "warn");
        assert_eq!(level(&["ferrio", "-v", "run"]), "info");
        assert_eq!(level(&["ferrio", "run", "-vv"]), "debug");
        assert_eq!(level(&["ferrio", "run", "--verbose", "-vv"]), "trace");
        assert_eq!(level(&["ferrio", "-vvvv", "run"]), "trace");
    }
}
