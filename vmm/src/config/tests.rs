//! Unit tests of `config.rs` (kept apart so each file stays short).

use super::*;

/// A host with a fixed amount of RAM (or unknown).
struct FakeHost(Option<u64>);
impl HostInfo for FakeHost {
    fn total_memory(&self) -> Option<u64> {
        self.0
    }
}
const HOST: FakeHost = FakeHost(Some(8 << 30));

/// A temp dir holding a fake vmlinux (`vmlinux`) and initramfs (`initrd`).
fn files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("vmlinux"), b"\x7fELF\x02\x01\x01\0").expect("write");
    std::fs::write(dir.path().join("initrd"), b"070701").expect("write");
    dir
}

/// A builder with a valid kernel and an existing "KVM device".
fn builder(dir: &tempfile::TempDir) -> ConfigBuilder {
    let layer = FileConfig {
        kernel: Some(dir.path().join("vmlinux")),
        ..Default::default()
    };
    ConfigBuilder::new().apply(layer).kvm_device("/dev/null")
}

/// Validates `dir`'s builder with `layer` on top; returns the (one-line) error.
fn err_with(dir: &tempfile::TempDir, layer: FileConfig) -> ConfigError {
    let err = builder(dir)
        .apply(layer)
        .validate(&HOST)
        .expect_err("must fail");
    assert!(!err.to_string().contains('\n'), "multi-line message: {err}");
    err
}

fn mem(s: &str) -> Option<MemoryValue> {
    Some(MemoryValue::Text(s.into()))
}

#[test]
fn sizes_good() {
    for (s, want) in [
        ("65536", 65536),
        ("0", 0),
        ("1024K", 1 << 20),
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("512MiB", 512 << 20),
        ("512MB", 512 << 20),
        ("512mib", 512 << 20),
        ("2G", 2 << 30),
        ("2gb", 2 << 30),
        ("1T", 1 << 40),
        ("4096B", 4096),
        (" 8M ", 8 << 20),
        ("16777215T", 16_777_215 << 40),
    ] {
        assert_eq!(parse_size(s).expect(s), want, "{s}");
    }
}

#[test]
fn sizes_bad() {
    for (s, reason) in [
        ("", "empty"),
        ("12Q", "unknown unit"),
        ("-1", "not a non-negative whole number"),
        ("+1", "not a non-negative whole number"),
        ("1.5G", "not a non-negative whole number"),
        ("99999999999T", "too large"),
        ("16777216T", "too large"),
        ("99999999999999999999", "too large"),
        ("M", "no number"),
        ("iB", "needs a unit"),
        ("512iB", "needs a unit"),
        ("5 M", "not a non-negative whole number"),
    ] {
        let err = parse_size(s).expect_err(s);
        assert!(matches!(err, ConfigError::BadSize { .. }), "{s}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains(reason) && msg.contains(&format!("'{s}'")),
            "{s}: {msg}"
        );
    }
}

#[test]
fn serial_specs() {
    assert_eq!(parse_serial("stdio").expect("stdio"), SerialConfig::Stdio);
    assert_eq!(parse_serial("none").expect("none"), SerialConfig::None);
    assert_eq!(
        parse_serial("file=/tmp/a b.log").expect("file"),
        SerialConfig::File("/tmp/a b.log".into())
    );
    for bad in ["", "file=", "file", "tty", "file:/x", "STDIO ", "stdout"] {
        let err = parse_serial(bad).expect_err(bad);
        assert!(matches!(err, ConfigError::BadSerial(_)), "{bad}");
        assert!(err.to_string().contains("file=PATH"), "{err}");
    }
}

#[test]
fn meminfo() {
    let text = "MemTotal:       24731708 kB\nMemFree:        22971232 kB\n";
    assert_eq!(parse_meminfo(text), Some(24_731_708 * 1024));
    assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    assert_eq!(parse_meminfo("MemTotal: lots kB\n"), None);
    assert!(SystemHost.total_memory().is_some_and(|m| m > 0));
}

#[test]
fn toml_and_json_agree() {
    let dir = files();
    let (k, i) = (dir.path().join("vmlinux"), dir.path().join("initrd"));
    let toml = format!(
        "kernel = {k:?}\ninitramfs = {i:?}\ncmdline = \"quiet\"\ncpus = 2\n\
         memory = \"1G\"\nserial = \"file=/tmp/s.log\"\ntimeout = 60\n\
         console = \"socket=/tmp/c.sock,slot=3\"\n\
         net = [\"tap=tap0,num_queue_pairs=2\", \"fd=5,mac=02:00:00:00:00:07\"]\n"
    );
    let json = format!(
        r#"{{"kernel": {k:?}, "initramfs": {i:?}, "cmdline": "quiet", "cpus": 2,
            "memory": 1073741824, "serial": "file=/tmp/s.log", "timeout": 60,
            "console": "socket=/tmp/c.sock,slot=3",
            "net": ["tap=tap0,num_queue_pairs=2", "fd=5,mac=02:00:00:00:00:07"]}}"#
    );
    std::fs::write(dir.path().join("vm.toml"), toml).expect("write");
    std::fs::write(dir.path().join("vm.JSON"), json).expect("write");
    let load = |name: &str| {
        let file = load_file(&dir.path().join(name)).expect(name);
        ConfigBuilder::new()
            .apply(file)
            .kvm_device("/dev/null")
            .validate(&HOST)
            .expect(name)
    };
    let cfg = load("vm.toml");
    assert_eq!(cfg, load("vm.JSON"));
    assert_eq!(
        cfg,
        VmConfig {
            kernel: k,
            initramfs: Some(i),
            cmdline: "quiet".into(),
            cpus: 2,
            memory_bytes: 1 << 30,
            serial: SerialConfig::File("/tmp/s.log".into()),
            timeout: Some(Duration::from_secs(60)),
            kvm_device: "/dev/null".into(),
            console: Some(ConsoleConfig {
                backend: ConsoleBackend::Socket("/tmp/c.sock".into()),
                slot: Some(3),
                iommu: false,
            }),
            disks: vec![],
            devices: vec![],
            vfio_host: crate::vfio::host::HostPaths::default(),
            iommu: false,
            seccomp: SeccompMode::On,
            nets: vec![
                NetConfig {
                    backend: NetBackendConfig::Tap("tap0".into()),
                    mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                    num_queue_pairs: 2,
                    queue_size: 256,
                    slot: None,
                    iommu: false,
                    id: None,
                    vf_of: None,
                },
                NetConfig {
                    backend: NetBackendConfig::Fd(5),
                    mac: MacAddr([2, 0, 0, 0, 0, 7]),
                    num_queue_pairs: 1,
                    queue_size: 256,
                    slot: None,
                    iommu: false,
                    id: None,
                    vf_of: None,
                },
            ],
        }
    );
}

#[test]
fn file_errors() {
    let dir = files();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let cases = [
        (
            write("a.toml", "kernel = \"/k\"\nbogus = 1\n"),
            "line 2 column 1: unknown field `bogus`",
        ),
        (
            write("a.json", r#"{"kernel": "/k", "bogus": 1}"#),
            "unknown field `bogus`",
        ),
        (write("b.toml", "cpus = \n"), "line 1"),
        (
            write("c.toml", "cpus = -1\n"),
            "line 1 column 8: invalid value: integer `-1`",
        ),
        (write("d.toml", "memory = -4096\n"), "size string"),
        (write("e.toml", "memory = true\n"), "size string"),
        (write("b.json", "{\"memory\": 1.5}"), "size string"),
        (write("c.json", "{"), "EOF"),
    ];
    for (path, want) in cases {
        let err = load_file(&path).expect_err("bad file");
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::ParseFile { .. }), "{msg}");
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(want),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }
    let err = load_file(&write("vm.yaml", "")).expect_err("yaml");
    assert!(matches!(err, ConfigError::UnknownExtension { .. }), "{err}");
    assert!(err.to_string().contains(".toml or .json"), "{err}");
    let err = load_file(&dir.path().join("missing.toml")).expect_err("missing");
    assert!(matches!(err, ConfigError::ReadFile { .. }), "{err}");
    assert!(err.to_string().contains("missing.toml"), "{err}");
}

#[test]
fn later_layers_win() {
    let dir = files();
    let file = FileConfig {
        cpus: Some(2),
        memory: mem("1G"),
        cmdline: Some("file".into()),
        ..Default::default()
    };
    let flags = FileConfig {
        cpus: Some(4),
        ..Default::default()
    };
    let cfg = builder(&dir)
        .apply(file)
        .apply(flags)
        .validate(&HOST)
        .expect("valid");
    assert_eq!(
        (cfg.cpus, cfg.memory_bytes, cfg.cmdline.as_str()),
        (4, 1 << 30, "file")
    );
}

#[test]
fn defaults() {
    let dir = files();
    let cfg = builder(&dir).validate(&HOST).expect("valid");
    assert_eq!((cfg.cpus, cfg.memory_bytes), (1, DEFAULT_MEMORY));
    assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
    assert_eq!(
        (cfg.serial, cfg.timeout, cfg.initramfs),
        (SerialConfig::Stdio, None, None)
    );
    let layer = FileConfig {
        kernel: Some(dir.path().join("vmlinux")),
        ..Default::default()
    };
    let b = ConfigBuilder::new().apply(layer);
    if std::path::Path::new(DEFAULT_KVM_DEVICE).exists() {
        assert_eq!(
            b.validate(&HOST).expect("valid").kvm_device,
            PathBuf::from("/dev/kvm")
        );
    }
}

#[test]
fn cpu_limits() {
    let dir = files();
    let cpus = |n| FileConfig {
        cpus: Some(n),
        ..Default::default()
    };
    assert!(matches!(err_with(&dir, cpus(0)), ConfigError::ZeroCpus));
    let err = err_with(&dir, cpus(255));
    assert_eq!(err.to_string(), "cpus 255 exceeds the maximum of 254");
    assert!(matches!(
        err_with(&dir, cpus(1 << 40)),
        ConfigError::TooManyCpus(_)
    ));
    let ok = builder(&dir)
        .apply(cpus(254))
        .validate(&HOST)
        .expect("254 cpus");
    assert_eq!(ok.cpus, MAX_VCPUS);
}

#[test]
fn memory_limits() {
    let dir = files();
    let m = |s: &str| FileConfig {
        memory: mem(s),
        ..Default::default()
    };
    let err = err_with(&dir, m("1M"));
    assert_eq!(
        err.to_string(),
        "memory 1 MiB is below the minimum of 64 MiB"
    );
    let err = err_with(&dir, m("16G"));
    assert_eq!(
        err.to_string(),
        "memory 16 GiB exceeds the host's physical memory (8 GiB)"
    );
    let err = err_with(&dir, m("67109376"));
    assert_eq!(
        err.to_string(),
        "memory 67109376 bytes is not a multiple of 4 KiB"
    );
    assert!(matches!(
        err_with(&dir, m("12Q")),
        ConfigError::BadSize { .. }
    ));
    let bytes = FileConfig {
        memory: Some(MemoryValue::Bytes(64 << 20)),
        ..Default::default()
    };
    let ok = builder(&dir).apply(bytes).validate(&HOST).expect("64 MiB");
    assert_eq!(ok.memory_bytes, MIN_MEMORY);
    // Unknown host memory skips the check; exactly the host's memory is allowed.
    builder(&dir)
        .apply(m("1T"))
        .validate(&FakeHost(None))
        .expect("unknown host");
    builder(&dir)
        .apply(m("8G"))
        .validate(&HOST)
        .expect("all of it");
}

#[test]
fn kernel_checks() {
    let dir = files();
    let err = ConfigBuilder::new()
        .kvm_device("/dev/null")
        .validate(&HOST)
        .expect_err("none");
    assert!(matches!(err, ConfigError::NoKernel), "{err}");
    let k = |p: PathBuf| FileConfig {
        kernel: Some(p),
        ..Default::default()
    };
    let missing = dir.path().join("nope");
    let err = err_with(&dir, k(missing.clone()));
    assert!(matches!(err, ConfigError::Kernel { .. }));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
    let err = err_with(&dir, k(dir.path().to_path_buf()));
    assert!(err.to_string().ends_with("not a regular file"), "{err}");
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x5au8; 4096]).expect("write");
    let err = err_with(&dir, k(garbage.clone()));
    let msg = err.to_string();
    assert!(
        msg.contains(&garbage.display().to_string()) && msg.contains("bzImage"),
        "{msg}"
    );
    let err = err_with(&dir, k(dir.path().join("initrd")));
    assert!(err.to_string().contains("not a vmlinux"), "{err}");
    // A bzImage is recognised by its "HdrS" header magic at 0x202.
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(dir.path().join("bzImage"), bz).expect("write");
    builder(&dir)
        .apply(k(dir.path().join("bzImage")))
        .validate(&HOST)
        .expect("bzImage");
}

#[test]
fn initramfs_checks() {
    let dir = files();
    let i = |p: PathBuf| FileConfig {
        initramfs: Some(p),
        ..Default::default()
    };
    let missing = dir.path().join("nope");
    let err = err_with(&dir, i(missing.clone()));
    assert!(matches!(err, ConfigError::Initramfs { .. }));
    assert!(err
        .to_string()
        .starts_with(&format!("initramfs {}: ", missing.display())));
    let err = err_with(&dir, i(dir.path().to_path_buf()));
    assert!(err.to_string().ends_with("not a regular file"), "{err}");
}

#[test]
fn other_checks() {
    let dir = files();
    let serial = FileConfig {
        serial: Some("tty".into()),
        ..Default::default()
    };
    assert!(matches!(err_with(&dir, serial), ConfigError::BadSerial(_)));
    let timeout = FileConfig {
        timeout: Some(0),
        ..Default::default()
    };
    assert!(matches!(err_with(&dir, timeout), ConfigError::ZeroTimeout));
    let line = |s: String| FileConfig {
        cmdline: Some(s),
        ..Default::default()
    };
    let err = err_with(&dir, line("x".repeat(CMDLINE_MAX_SIZE)));
    assert!(matches!(err, ConfigError::CmdlineTooLong { .. }), "{err}");
    let ok = builder(&dir)
        .apply(line("x".repeat(CMDLINE_MAX_SIZE - 1)))
        .validate(&HOST);
    assert_eq!(ok.expect("fits").cmdline.len(), CMDLINE_MAX_SIZE - 1);
    assert!(matches!(
        err_with(&dir, line("a\0b".into())),
        ConfigError::CmdlineNul
    ));
    let err = builder(&dir)
        .kvm_device("/nonexistent")
        .validate(&HOST)
        .expect_err("no kvm");
    assert!(matches!(err, ConfigError::KvmDevice { .. }));
    assert!(
        err.to_string().starts_with("KVM device /nonexistent: "),
        "{err}"
    );
}

#[test]
fn human_sizes() {
    assert_eq!(human(0), "0 bytes");
    assert_eq!(human(1023), "1023 bytes");
    assert_eq!(human(64 << 20), "64 MiB");
    assert_eq!(human(3 << 40), "3 TiB");
    assert_eq!(human(24_731_708 * 1024), "23.6 GiB");
}

#[test]
fn iommu_on_needs_an_iommu() {
    let dir = files();
    for layer in [
        FileConfig {
            disk: Some(vec!["path=/dev/null,iommu=on".into()]),
            ..Default::default()
        },
        FileConfig {
            net: Some(vec!["tap=tap0,iommu=on".into()]),
            ..Default::default()
        },
        FileConfig {
            console: Some("file=/tmp/c,iommu=on".into()),
            ..Default::default()
        },
    ] {
        assert!(matches!(err_with(&dir, layer), ConfigError::NoIommu));
    }
    let cfg = builder(&dir)
        .apply(FileConfig {
            net: Some(vec!["tap=tap0,iommu=on".into()]),
            iommu: Some(true),
            ..Default::default()
        })
        .validate(&HOST)
        .unwrap();
    assert!(cfg.iommu && cfg.nets[0].iommu);
}

#[test]
fn one_tap_fd_per_nic() {
    let dir = files();
    let err = err_with(
        &dir,
        FileConfig {
            net: Some(vec!["fd=5".into(), "fd=5,mac=02:00:00:00:00:01".into()]),
            ..Default::default()
        },
    );
    assert!(err.to_string().contains("two NICs"), "{err}");
}

mod sriov;
