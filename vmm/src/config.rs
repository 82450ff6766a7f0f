//! The VM configuration: one typed struct, filled either from the command line
//! (`cli.rs`) or from a TOML/JSON file, then validated once.
//!
//! Layers are merged with [`ConfigBuilder`]: defaults < config file < command-line
//! flags; [`ConfigBuilder::validate`] then checks everything and yields a [`VmConfig`].
//! Relative paths (in files and flags alike) are relative to the current directory.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::layout::CMDLINE_MAX_SIZE;
pub use crate::seccomp::SeccompMode;
use crate::vfio::host::HostPaths;

/// Where the 16550 serial console's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's stdout; stdin feeds the guest when it is a terminal or a pipe.
    Stdio,
    /// Appended to a file (created if missing).
    File(PathBuf),
    /// No serial console device output (the device still exists, output is dropped).
    None,
}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// vmlinux ELF with a PVH entry note, or a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio archive) loaded next to the kernel.
    pub initramfs: Option<PathBuf>,
    /// Guest kernel command line, without the trailing NUL.
    pub cmdline: String,
    /// Number of vCPUs, 1..=MAX_VCPUS.
    pub cpus: u8,
    /// Guest RAM in bytes, a multiple of 4 KiB.
    pub memory_bytes: u64,
    /// Serial console output.
    pub serial: SerialConfig,
    /// Wall-clock limit for the whole run; exceeding it is an error exit.
    pub timeout: Option<Duration>,
    /// The KVM device node (default /dev/kvm).
    pub kvm_device: PathBuf,
    /// A virtio-console PCI device, if any.
    pub console: Option<ConsoleConfig>,
    /// virtio-blk devices, in guest order: every declared disk, SR-IOV VFs included
    /// (the VMM builds a VF through its PF: [`VmConfig::disk_vfs`]).
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, in guest order: every declared NIC, SR-IOV VFs included
    /// (the VMM builds a VF through its PF: [`VmConfig::net_vfs`]).
    pub nets: Vec<NetConfig>,
    /// Host PCI functions passed through with VFIO, in guest order.
    pub devices: Vec<DeviceConfig>,
    /// Where the `--device` functions' sysfs and /dev nodes are.
    pub vfio_host: HostPaths,
    /// A virtio-iommu translating the DMA of the devices with `iommu=on`.
    pub iommu: bool,
    /// What the threads' seccomp filters do with a system call outside their list.
    pub seccomp: SeccompMode,
}

/// Smallest guest RAM accepted.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest vCPU count accepted.
pub const MAX_VCPUS: u8 = 254;
/// Guest RAM when none is given.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Kernel command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";
/// KVM device node when none is given.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";
/// Guest RAM must be a multiple of this.
pub const MEMORY_ALIGN: u64 = 4 << 10;

/// Everything that can be wrong with a configuration. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file at `path` could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML/JSON or has wrong keys or types; `message`
    /// is the parser's, flattened to one line.
    #[error("invalid config file {}: {message}", path.display())]
    ParseFile { path: PathBuf, message: String },
    /// The config file name ends in neither `.toml` nor `.json`.
    #[error("config file {}: unknown extension (must be .toml or .json)", path.display())]
    UnknownExtension { path: PathBuf },
    /// The size string `input` (like `512M`) could not be parsed.
    #[error("invalid size '{input}': {reason} (examples: 512M, 2G, 1024K, 65536)")]
    BadSize { input: String, reason: &'static str },
    /// `cpus` is 0.
    #[error("cpus must be at least 1")]
    ZeroCpus,
    /// `cpus` is above [`MAX_VCPUS`].
    #[error("cpus {0} exceeds the maximum of {MAX_VCPUS}")]
    TooManyCpus(u64),
    /// Guest RAM below [`MIN_MEMORY`].
    #[error("memory {} is below the minimum of {}", human(*.0), human(MIN_MEMORY))]
    MemoryTooSmall(u64),
    /// Guest RAM above the host's physical memory (both in bytes).
    #[error("memory {} exceeds the host's physical memory ({})", human(*.requested), human(*.host))]
    MemoryTooLarge { requested: u64, host: u64 },
    /// Guest RAM not a multiple of 4 KiB.
    #[error("memory {0} bytes is not a multiple of 4 KiB")]
    MemoryUnaligned(u64),
    /// Neither the file nor the flags name a kernel.
    #[error("no kernel given: use --kernel PATH or `kernel` in the config file")]
    NoKernel,
    /// The kernel path is missing, not a regular readable file, or not a kernel.
    #[error("kernel {}: {reason}", path.display())]
    Kernel { path: PathBuf, reason: String },
    /// The initramfs path is missing or not a regular readable file.
    #[error("initramfs {}: {reason}", path.display())]
    Initramfs { path: PathBuf, reason: String },
    /// The KVM device node does not exist.
    #[error("KVM device {}: {source}", path.display())]
    KvmDevice {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The serial spec is not `stdio`, `none` or `file=PATH`.
    #[error("invalid serial spec '{0}' (expected stdio, none or file=PATH)")]
    BadSerial(String),
    /// A disk image is missing, not a file or of a bad size.
    #[error("disk {}: {reason}", path.display())]
    Disk { path: PathBuf, reason: String },
    /// A device spec (`--console`, ...) is malformed or conflicts with another.
    #[error("invalid device spec '{spec}': {reason}")]
    BadDevice { spec: String, reason: String },
    /// A `--device` function cannot be passed through (the message says why and how).
    #[error(transparent)]
    Vfio(#[from] crate::vfio::host::HostError),
    /// A device asks for `iommu=on` but there is no virtio-iommu.
    #[error("iommu=on needs a virtio-iommu: add --iommu (or `iommu = true` in the config file)")]
    NoIommu,
    /// `timeout` is 0.
    #[error("timeout must be at least 1 second")]
    ZeroTimeout,
    /// The kernel command line (`len` bytes) is longer than `max` bytes.
    #[error("kernel command line is {len} bytes, longer than the maximum of {max}")]
    CmdlineTooLong { len: usize, max: usize },
    /// The kernel command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The seccomp mode is not `on`, `log` or `off`.
    #[error("invalid seccomp mode '{0}' (expected on, log or off)")]
    BadSeccomp(String),
}

/// Formats a byte count for messages: `N GiB` when exact, else `N.N GiB` (any unit
/// from KiB to TiB), or `N bytes` below 1 KiB.
fn human(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    match UNITS.iter().find(|(shift, _)| bytes >> shift != 0) {
        Some((shift, unit)) if bytes & ((1u64 << shift) - 1) == 0 => {
            format!("{} {unit}", bytes >> shift)
        }
        Some((shift, unit)) => format!("{:.1} {unit}", bytes as f64 / (1u64 << shift) as f64),
        None => format!("{bytes} bytes"),
    }
}

/// Parses a size: digits, then an optional unit `K`, `M`, `G` or `T` (powers of
/// 1024), then an optional `B` or `iB`. Case-insensitive; `512MB` = `512MiB` = `512M`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = |reason| ConfigError::BadSize {
        input: s.to_string(),
        reason,
    };
    let lower = s.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return Err(bad("empty"));
    }
    let (body, needs_unit) = match lower.strip_suffix("ib") {
        Some(body) => (body, true),
        None => (lower.strip_suffix('b').unwrap_or(&lower), false),
    };
    let (digits, shift) = match body.char_indices().last() {
        Some((i, 'k')) => (&body[..i], 10),
        Some((i, 'm')) => (&body[..i], 20),
        Some((i, 'g')) => (&body[..i], 30),
        Some((i, 't')) => (&body[..i], 40),
        _ if needs_unit => return Err(bad("'iB' needs a unit (K, M, G or T)")),
        _ => (body, 0),
    };
    if digits.is_empty() {
        return Err(bad("no number"));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        let reason = if digits.bytes().any(|b| b.is_ascii_alphabetic()) {
            "unknown unit (use K, M, G or T)"
        } else {
            "not a non-negative whole number"
        };
        return Err(bad(reason));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| bad("too large"))
}

/// Parses a serial spec: `stdio`, `none` or `file=PATH`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "none" => Ok(SerialConfig::None),
        _ => match s.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
            _ => Err(ConfigError::BadSerial(s.to_string())),
        },
    }
}

/// A memory size as written in a config file: bytes, or a size string like `"512M"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryValue {
    /// A plain number of bytes.
    Bytes(u64),
    /// A size string, parsed by [`parse_size`].
    Text(String),
}

impl MemoryValue {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, ConfigError> {
        match self {
            MemoryValue::Bytes(n) => Ok(*n),
            MemoryValue::Text(s) => parse_size(s),
        }
    }
}

impl<'de> Deserialize<'de> for MemoryValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MemoryValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of bytes or a size string like \"512M\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MemoryValue, E> {
                Ok(MemoryValue::Bytes(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MemoryValue, E> {
                u64::try_from(v)
                    .map(MemoryValue::Bytes)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MemoryValue, E> {
                Ok(MemoryValue::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The config file format (TOML or JSON, same keys). Every field is optional;
/// the same struct is used as the command-line layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Kernel image path.
    pub kernel: Option<PathBuf>,
    /// Initramfs path.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Number of vCPUs (range-checked by validation).
    pub cpus: Option<u64>,
    /// Guest RAM: bytes or a size string.
    pub memory: Option<MemoryValue>,
    /// Serial spec, same syntax as `--serial`.
    pub serial: Option<String>,
    /// Run timeout in seconds.
    pub timeout: Option<u64>,
    /// virtio-console spec, same syntax as `--console`.
    pub console: Option<String>,
    /// virtio-blk specs, same syntax as `--disk`.
    pub disk: Option<Vec<String>>,
    /// virtio-net specs, same syntax as `--net`.
    pub net: Option<Vec<String>>,
    /// Create a virtio-iommu (`--iommu`).
    pub iommu: Option<bool>,
    /// VFIO passthrough specs, same syntax as `--device`.
    pub device: Option<Vec<String>>,
    /// seccomp mode, same values as `--seccomp`.
    pub seccomp: Option<String>,
}

/// Byte offset to 1-based `line:column`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Reads a config file, choosing the format by extension (`.toml` or `.json`).
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let is_toml = match ext.as_deref() {
        Some("toml") => true,
        Some("json") => false,
        _ => return Err(ConfigError::UnknownExtension { path: path.into() }),
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.into(),
        source,
    })?;
    let parsed = if is_toml {
        toml::from_str(&text).map_err(|e| match e.span() {
            Some(span) => {
                let (line, col) = line_col(&text, span.start);
                format!("line {line} column {col}: {}", e.message())
            }
            None => e.message().to_string(),
        })
    } else {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    };
    parsed.map_err(|message| ConfigError::ParseFile {
        path: path.into(),
        message: message.split_whitespace().collect::<Vec<_>>().join(" "),
    })
}

/// Facts about the host that validation needs; a trait so tests can fake them.
pub trait HostInfo {
    /// Physical memory in bytes, or `None` when unknown (the check is skipped).
    fn total_memory(&self) -> Option<u64>;
}

/// The real host: reads `MemTotal` from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemHost;

impl HostInfo for SystemHost {
    fn total_memory(&self) -> Option<u64> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        parse_meminfo(&text)
    }
}

/// Extracts `MemTotal` (in bytes) from the text of `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib = rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    kib.checked_mul(1024)
}

/// Merges configuration layers (later layers win) and validates the result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigBuilder {
    layer: FileConfig,
    kvm_device: Option<PathBuf>,
    host_paths: Option<HostPaths>,
}

impl ConfigBuilder {
    /// A builder holding only the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a layer: every field set in `top` replaces the current value.
    pub fn apply(mut self, top: FileConfig) -> Self {
        let l = &mut self.layer;
        l.kernel = top.kernel.or(l.kernel.take());
        l.initramfs = top.initramfs.or(l.initramfs.take());
        l.cmdline = top.cmdline.or(l.cmdline.take());
        l.cpus = top.cpus.or(l.cpus);
        l.memory = top.memory.or(l.memory.take());
        l.serial = top.serial.or(l.serial.take());
        l.timeout = top.timeout.or(l.timeout);
        l.console = top.console.or(l.console.take());
        l.disk = top.disk.or(l.disk.take());
        l.net = top.net.or(l.net.take());
        l.iommu = top.iommu.or(l.iommu);
        l.device = top.device.or(l.device.take());
        l.seccomp = top.seccomp.or(l.seccomp.take());
        self
    }

    /// Sets the KVM device node (default [`DEFAULT_KVM_DEVICE`]).
    pub fn kvm_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_device = Some(path.into());
        self
    }

    /// Looks for sysfs and /dev under `root` (`root/sys`, `root/dev`) when checking
    /// `--device` functions (tests use a fake tree).
    pub fn host_root(mut self, root: impl AsRef<Path>) -> Self {
        self.host_paths = Some(HostPaths {
            sys: root.as_ref().join("sys"),
            dev: root.as_ref().join("dev"),
        });
        self
    }

    /// Checks every value and produces the final [`VmConfig`]. Cheap checks come
    /// first, then the file-system ones (kernel, initramfs, KVM device).
    pub fn validate(self, host: &dyn HostInfo) -> Result<VmConfig, ConfigError> {
        let l = self.layer;
        let cpus = match l.cpus.unwrap_or(1) {
            0 => return Err(ConfigError::ZeroCpus),
            n => u8::try_from(n)
                .ok()
                .filter(|&c| c <= MAX_VCPUS)
                .ok_or(ConfigError::TooManyCpus(n))?,
        };
        let memory_bytes = l
            .memory
            .as_ref()
            .map_or(Ok(DEFAULT_MEMORY), MemoryValue::bytes)?;
        if memory_bytes < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(memory_bytes));
        }
        if memory_bytes & (MEMORY_ALIGN - 1) != 0 {
            return Err(ConfigError::MemoryUnaligned(memory_bytes));
        }
        match host.total_memory() {
            Some(host) if memory_bytes > host => {
                return Err(ConfigError::MemoryTooLarge {
                    requested: memory_bytes,
                    host,
                })
            }
            Some(_) => {}
            None => tracing::warn!("host memory unknown; not checking the memory size"),
        }
        let cmdline = l.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if cmdline.len() > CMDLINE_MAX_SIZE - 1 {
            let max = CMDLINE_MAX_SIZE - 1;
            return Err(ConfigError::CmdlineTooLong {
                len: cmdline.len(),
                max,
            });
        }
        if cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let seccomp = match l.seccomp.as_deref() {
            None => SeccompMode::default(),
            Some(s) => s.parse().map_err(|_| ConfigError::BadSeccomp(s.into()))?,
        };
        let timeout = match l.timeout {
            Some(0) => return Err(ConfigError::ZeroTimeout),
            t => t.map(Duration::from_secs),
        };
        let serial = l
            .serial
            .as_deref()
            .map_or(Ok(SerialConfig::Stdio), parse_serial)?;
        let console = l.console.as_deref().map_or(Ok(None), parse_console)?;
        if serial == SerialConfig::Stdio
            && matches!(&console, Some(c) if c.backend == ConsoleBackend::Stdio)
        {
            return Err(ConfigError::BadDevice {
                spec: "stdio".into(),
                reason: "the serial port already uses stdio: give --serial none or file=PATH"
                    .into(),
            });
        }
        let disks = l
            .disk
            .iter()
            .flatten()
            .map(|spec| parse_disk(spec))
            .collect::<Result<Vec<_>, _>>()?;
        let nets = l
            .net
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, spec)| parse_net(spec, i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut fds: Vec<_> = nets
            .iter()
            .filter_map(|n| match n.backend {
                NetBackendConfig::Fd(fd) => Some(fd),
                NetBackendConfig::Tap(_) => None,
            })
            .collect();
        fds.sort_unstable();
        if let Some(w) = fds.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::BadDevice {
                spec: format!("fd={}", w[0]),
                reason: "the same TAP fd is given to two NICs".into(),
            });
        }
        sriov::check(
            l.disk.as_deref().unwrap_or_default(),
            &disks,
            l.net.as_deref().unwrap_or_default(),
            &nets,
        )?;
        let devices = l
            .device
            .iter()
            .flatten()
            .map(|spec| parse_device(spec))
            .collect::<Result<Vec<_>, _>>()?;
        let iommu = l.iommu.unwrap_or(false);
        let behind_iommu = console
            .iter()
            .map(|c| c.iommu)
            .chain(disks.iter().map(|d| d.iommu))
            .chain(devices.iter().map(|d| d.iommu));
        if !iommu
            && behind_iommu
                .chain(nets.iter().map(|n| n.iommu))
                .any(|on| on)
        {
            return Err(ConfigError::NoIommu);
        }
        let kernel = l.kernel.ok_or(ConfigError::NoKernel)?;
        if let Err(reason) = check_kernel(&kernel) {
            return Err(ConfigError::Kernel {
                path: kernel,
                reason,
            });
        }
        if let Some(path) = &l.initramfs {
            if let Err(reason) = open_regular(path) {
                return Err(ConfigError::Initramfs {
                    path: path.clone(),
                    reason,
                });
            }
        }
        for d in &disks {
            if let Err(reason) = check_disk_file(&d.path) {
                return Err(ConfigError::Disk {
                    path: d.path.clone(),
                    reason,
                });
            }
        }
        let vfio_host = self.host_paths.unwrap_or_default();
        for d in &devices {
            crate::vfio::host::check(&d.path, d.backend, &vfio_host)?;
        }
        let kvm_device = self.kvm_device.unwrap_or_else(|| DEFAULT_KVM_DEVICE.into());
        if let Err(source) = std::fs::metadata(&kvm_device) {
            return Err(ConfigError::KvmDevice {
                path: kvm_device,
                source,
            });
        }
        Ok(VmConfig {
            kernel,
            initramfs: l.initramfs,
            cmdline,
            cpus,
            memory_bytes,
            serial,
            timeout,
            kvm_device,
            console,
            disks,
            nets,
            devices,
            vfio_host,
            iommu,
            seccomp,
        })
    }
}

/// Opens `path` for reading, requiring a regular file.
fn open_regular(path: &Path) -> Result<File, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    File::open(path).map_err(|e| e.to_string())
}

/// Checks that `path` is a readable file that looks like a vmlinux ELF (`\x7fELF`
/// at 0) or a bzImage (`HdrS` at 0x202).
fn check_kernel(path: &Path) -> Result<(), String> {
    let mut head = Vec::with_capacity(0x206);
    open_regular(path)?
        .take(0x206)
        .read_to_end(&mut head)
        .map_err(|e| e.to_string())?;
    let elf = head.starts_with(b"\x7fELF");
    let bzimage = head.get(0x202..0x206) == Some(b"HdrS".as_slice());
    if elf || bzimage {
        Ok(())
    } else {
        Err("not a vmlinux (ELF) or bzImage kernel image".into())
    }
}

mod console;
mod device;
mod disk;
mod net;
mod sriov;
#[cfg(test)]
mod tests;

pub use console::{parse_console, ConsoleBackend, ConsoleConfig, MAX_PCI_SLOT};
pub use device::{parse_device, DeviceConfig, VfioBackendChoice};
pub use disk::{check_disk_file, parse_disk, DiskConfig};
pub use net::{parse_net, MacAddr, NetBackendConfig, NetConfig};
pub use sriov::{MAX_ID_LEN, MAX_VFS_PER_PF};
