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
}
