//! The QEMU baseline: the same image and scenario booted by QEMU, to validate the
//! image independently of ferrio and to compare boot times.
//!
//! Measured on a PVM host with QEMU 7.2 (see the crate README / guest-tests report):
//! `-bios qboot.rom` (a minimal firmware) boots the PVH vmlinux directly.

use std::path::Path;
use std::process::Command;

use crate::{Boot, GuestImage};

/// qboot firmware as installed by Debian's qemu-system-x86 (falls back to SeaBIOS).
pub const QEMU_BIOS: &str = "/usr/share/qemu/qboot.rom";

/// The QEMU command booting `image` with `scenario`; its stdout is the serial
/// console, and a guest power-off ends it with status 0 (pair with
/// [`crate::run_command`]). `memory` uses QEMU's `-m` syntax, which accepts "512M".
pub fn qemu_command(image: &GuestImage, scenario: &str, cpus: u8, memory: &str) -> Command {
    let cmdline = Boot::new(scenario).cmdline(&image.base_cmdline);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-enable-kvm", "-cpu", "host", "-M", "pc"]);
    if Path::new(QEMU_BIOS).is_file() {
        cmd.args(["-bios", QEMU_BIOS]);
    }
    cmd.args(["-m", memory, "-smp", &cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initramfs)
        .arg("-append")
        .arg(cmdline);
    cmd
}

/// The most vCPUs a QEMU guest can have on this host: 1 on PVM hosts, where the guest
/// kernel patches its text with int3 as soon as a second CPU is online, PVM's
/// instruction emulator refuses the int3 and QEMU (unlike ferrio, see
/// `vmm/src/cpu/pvm.rs`) stops the VM with "emulation failure".
pub fn qemu_max_cpus() -> u8 {
    if Path::new("/sys/module/kvm_pvm").exists() {
        1
    } else {
        u8::MAX
    }
}

/// QEMU arguments for a virtio-net-pci NIC on the existing (multi-queue) TAP `tap`,
/// with `queue_pairs` queue pairs and MSI-X vectors for all of them, the control
/// queue and the config interrupt; vhost off, so QEMU's own device model moves the
/// packets (as ferrio does). The QEMU process must run where the TAP is (see
/// [`crate::NetNs::enter_on_exec`]).
pub fn qemu_net_args(tap: &str, mac: &str, queue_pairs: u8) -> Vec<String> {
    let pairs = queue_pairs.max(1);
    let mut netdev = format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off");
    let mut device = format!("virtio-net-pci,netdev=n0,mac={mac},disable-legacy=on,romfile=");
    if pairs > 1 {
        netdev.push_str(&format!(",queues={pairs}"));
        device.push_str(&format!(",mq=on,vectors={}", 2 * u32::from(pairs) + 2));
    }
    vec!["-netdev".into(), netdev, "-device".into(), device]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_command_boots_kernel_with_scenario() {
        let image = GuestImage {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            base_cmdline: "console=ttyS0".into(),
        };
        let cmd = qemu_command(&image, "boot", 2, "512M");
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into()).collect();
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(after("-kernel"), "/k");
        assert_eq!(after("-initrd"), "/i");
        assert_eq!(after("-append"), "console=ttyS0 ferrio.scenario=boot");
        assert_eq!(after("-smp"), "2");
        assert_eq!(after("-m"), "512M");
        assert!(args.iter().any(|a| a == "-no-reboot"));
    }

    #[test]
    fn qemu_net_args_describe_a_multi_queue_tap_nic() {
        let args = qemu_net_args("ftap0", "52:54:00:12:34:56", 2);
        assert_eq!(args[0], "-netdev");
        assert_eq!(
            args[1],
            "tap,id=n0,ifname=ftap0,script=no,downscript=no,vhost=off,queues=2"
        );
        assert_eq!(args[2], "-device");
        assert_eq!(
            args[3],
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,disable-legacy=on,romfile=,mq=on,vectors=6"
        );
        let single = qemu_net_args("t", "m", 1);
        assert!(!single[1].contains("queues") && !single[3].contains("mq=on"));
    }
}
