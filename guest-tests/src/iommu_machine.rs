//! One machine description for the `iommu` and `vfio-in-guest` tests, bootable by
//! either VMM, so the same test checks ferrio and validates itself against QEMU:
//!
//! - ferrio: `--iommu`, and `iommu=on` on every `--disk`, `--console` and `--net`;
//! - QEMU: `-M q35` (QEMU builds the ACPI VIOT for a virtio-iommu-pci there),
//!   `-device virtio-iommu-pci`, and virtio devices with
//!   `disable-legacy=on,iommu_platform=on` (without them QEMU's virtio devices do not
//!   translate their DMA through the IOMMU).
//!
//! The tests pick the VMM with `FERRIO_IOMMU_TEST_VMM=qemu` ([`Vmm::from_env`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{
    boot_lock, ensure_image, enter_on_exec, ferrio_binary, qemu_net_args, run_command, run_with,
    Boot, GuestImage, Outcome, Result, QEMU_BIOS,
};

/// The environment variable that selects the VMM (`qemu`; anything else: ferrio).
pub const VMM_ENV: &str = "FERRIO_IOMMU_TEST_VMM";
/// Time QEMU gets beyond the boot's timeout (QEMU has no `--timeout` of its own).
const QEMU_GRACE: Duration = Duration::from_secs(30);

/// Which VMM boots the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Ferrio,
    Qemu,
}

impl Vmm {
    /// [`Vmm::Qemu`] when `FERRIO_IOMMU_TEST_VMM=qemu`, else [`Vmm::Ferrio`].
    pub fn from_env() -> Vmm {
        match std::env::var(VMM_ENV) {
            Ok(v) if v.eq_ignore_ascii_case("qemu") => Vmm::Qemu,
            _ => Vmm::Ferrio,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Vmm::Ferrio => "ferrio",
            Vmm::Qemu => "qemu",
        }
    }
}

/// A virtio device behind the IOMMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IommuDevice {
    /// virtio-blk over a raw image.
    Disk {
        path: PathBuf,
        serial: String,
        num_queues: u8,
    },
    /// virtio-console whose port output goes to a file.
    Console { path: PathBuf },
    /// virtio-net on an existing TAP; a multi-queue TAP (as [`crate::NetNs`] makes)
    /// needs `queue_pairs` > 1 under QEMU, which opens it multi-queue only then.
    Net {
        tap: String,
        mac: String,
        queue_pairs: u8,
    },
}

/// A guest boot with a virtio-iommu and devices behind it.
#[derive(Debug, Clone)]
pub struct IommuMachine {
    /// Scenario, vCPUs, memory, extra command line, timeout, network namespace
    /// (`extra_args` are ferrio-only and appended after the devices).
    pub boot: Boot,
    pub devices: Vec<IommuDevice>,
}

impl IommuMachine {
    pub fn new(boot: Boot) -> IommuMachine {
        IommuMachine {
            boot,
            devices: Vec::new(),
        }
    }

    pub fn device(mut self, device: IommuDevice) -> IommuMachine {
        self.devices.push(device);
        self
    }

    /// ferrio's arguments for the IOMMU and the devices.
    pub fn ferrio_args(&self) -> Vec<String> {
        let mut args = vec!["--iommu".to_owned()];
        for d in &self.devices {
            let (flag, spec) = match d {
                IommuDevice::Disk {
                    path,
                    serial,
                    num_queues,
                } => (
                    "--disk",
                    format!(
                        "path={},serial={serial},num_queues={num_queues}",
                        path.display()
                    ),
                ),
                IommuDevice::Console { path } => ("--console", format!("file={}", path.display())),
                IommuDevice::Net {
                    tap,
                    mac,
                    queue_pairs,
                } => (
                    "--net",
                    format!("tap={tap},mac={mac},num_queue_pairs={queue_pairs}"),
                ),
            };
            args.push(flag.to_owned());
            args.push(format!("{spec},iommu=on"));
        }
        args
    }

    /// QEMU's arguments for the IOMMU and the devices (see the module comment).
    pub fn qemu_device_args(&self) -> Vec<String> {
        const BEHIND_IOMMU: &str = "disable-legacy=on,iommu_platform=on";
        let mut args: Vec<String> = vec!["-device".into(), "virtio-iommu-pci".into()];
        fn push(args: &mut Vec<String>, flag: &str, value: String) {
            args.push(flag.to_owned());
            args.push(value);
        }
        for (i, d) in self.devices.iter().enumerate() {
            match d {
                IommuDevice::Disk {
                    path,
                    serial,
                    num_queues,
                } => {
                    push(
                        &mut args,
                        "-drive",
                        format!(
                            "file={},if=none,id=disk{i},format=raw,discard=unmap",
                            path.display()
                        ),
                    );
                    push(
                        &mut args,
                        "-device",
                        format!(
                            "virtio-blk-pci,drive=disk{i},serial={serial},num-queues={num_queues},{BEHIND_IOMMU}"
                        ),
                    );
                }
                IommuDevice::Console { path } => {
                    push(
                        &mut args,
                        "-chardev",
                        format!("file,id=con{i},path={}", path.display()),
                    );
                    push(
                        &mut args,
                        "-device",
                        format!("virtio-serial-pci,id=vser{i},{BEHIND_IOMMU}"),
                    );
                    push(
                        &mut args,
                        "-device",
                        format!("virtconsole,chardev=con{i},bus=vser{i}.0"),
                    );
                }
                IommuDevice::Net {
                    tap,
                    mac,
                    queue_pairs,
                } => {
                    // The net test's NIC arguments, with the device behind the IOMMU.
                    for mut arg in qemu_net_args(tap, mac, *queue_pairs) {
                        if arg.starts_with("virtio-net-pci,") {
                            arg.push_str(",iommu_platform=on");
                        }
                        args.push(arg);
                    }
                }
            }
        }
        args
    }

    /// The QEMU command: q35 (the VIOT needs it), the same kernel, initramfs and
    /// command line as ferrio gets, serial console on stdout.
    pub fn qemu_command(&self, image: &GuestImage) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-enable-kvm", "-cpu", "host", "-M", "q35"]);
        if Path::new(QEMU_BIOS).is_file() {
            cmd.args(["-bios", QEMU_BIOS]);
        }
        cmd.args(["-m", &self.boot.memory, "-smp", &self.boot.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initramfs)
            .arg("-append")
            .arg(self.boot.cmdline(&image.base_cmdline))
            .args(self.qemu_device_args());
        if let Some(ns) = &self.boot.netns {
            enter_on_exec(&mut cmd, ns);
        }
        cmd
    }

    /// Builds what is needed and boots the machine under `vmm` (holding the boot
    /// lock). QEMU runs are logged as `<scenario>-qemu`.
    pub fn run(&self, vmm: Vmm) -> Result<Outcome> {
        let image = ensure_image()?;
        match vmm {
            Vmm::Ferrio => {
                let mut boot = self.boot.clone();
                let mut args = self.ferrio_args();
                args.append(&mut boot.extra_args);
                boot.extra_args = args;
                run_with(&ferrio_binary()?, &image, &boot)
            }
            Vmm::Qemu => {
                let cmd = self.qemu_command(&image);
                let _lock = boot_lock()?;
                let name = format!("{}-qemu", self.boot.scenario);
                run_command(cmd, &name, self.boot.timeout + QEMU_GRACE)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> IommuMachine {
        let mut boot = Boot::new("iommu").memory("1G");
        boot.extra_cmdline = "iommu.strict=1".into();
        IommuMachine::new(boot)
            .device(IommuDevice::Disk {
                path: "/d.img".into(),
                serial: "s1".into(),
                num_queues: 2,
            })
            .device(IommuDevice::Console {
                path: "/c.out".into(),
            })
            .device(IommuDevice::Net {
                tap: "t0".into(),
                mac: "52:54:00:00:00:01".into(),
                queue_pairs: 2,
            })
    }

    #[test]
    fn ferrio_gets_the_iommu_and_every_device_behind_it() {
        assert_eq!(
            machine().ferrio_args(),
            [
                "--iommu",
                "--disk",
                "path=/d.img,serial=s1,num_queues=2,iommu=on",
                "--console",
                "file=/c.out,iommu=on",
                "--net",
                "tap=t0,mac=52:54:00:00:00:01,num_queue_pairs=2,iommu=on",
            ]
        );
    }

    #[test]
    fn qemu_gets_q35_a_virtio_iommu_and_translated_devices() {
        let image = GuestImage {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            base_cmdline: "console=ttyS0".into(),
        };
        let cmd = machine().qemu_command(&image);
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into()).collect();
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(after("-M"), "q35");
        assert_eq!(after("-m"), "1G");
        assert_eq!(
            after("-append"),
            "console=ttyS0 ferrio.scenario=iommu iommu.strict=1"
        );
        assert_eq!(after("-device"), "virtio-iommu-pci");
        let devices: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(flag, _)| *flag == "-device")
            .map(|(_, d)| d)
            .collect();
        assert_eq!(devices.len(), 5, "{devices:?}");
        for d in devices
            .iter()
            .filter(|d| d.starts_with("virtio-") && d.contains("-pci,"))
        {
            assert!(
                d.contains(",disable-legacy=on,") && d.ends_with(",iommu_platform=on"),
                "{d} is not behind the IOMMU"
            );
        }
        assert!(args.contains(&"file=/d.img,if=none,id=disk0,format=raw,discard=unmap".into()));
        assert!(args.contains(&"virtconsole,chardev=con1,bus=vser1.0".into()));
        assert_eq!(
            after("-netdev"),
            "tap,id=n0,ifname=t0,script=no,downscript=no,vhost=off,queues=2"
        );
        assert!(args
            .iter()
            .any(|a| a.starts_with("virtio-net-pci,netdev=n0,")
                && a.ends_with(",mq=on,vectors=6,iommu_platform=on")));
    }
}
