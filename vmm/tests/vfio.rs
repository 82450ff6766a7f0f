//! `--device` (VFIO passthrough) as a user meets it on a host without VFIO: every
//! error is one `ferrio:` line that says how to fix it, exit 1, and nothing runs.
//! The real host's PCI functions are bound to other drivers here; a fake sysfs tree
//! (`--host-root`) covers what this host cannot show, and the permission check runs
//! as `nobody`.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::{ferrio, Code};

fn one_error_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line wanted, got:\n{err}");
    assert!(!err.contains("panicked"));
    lines[0].to_string()
}

fn kernel(dir: &Path) -> std::path::PathBuf {
    let k = dir.join("k.elf");
    Code::default().power_off().write_elf(&k);
    k
}

#[test]
fn not_a_pci_function_and_iommu_without_iommu() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let line = one_error_line(&ferrio(&k, &["--device", "path=/tmp"]));
    assert_eq!(
        line,
        "ferrio: /tmp: not a PCI function (expected /sys/bus/pci/devices/DDDD:BB:DD.F)"
    );
    let line = one_error_line(&ferrio(&k, &["--device", "path=/tmp,iommu=on"]));
    assert!(
        line.contains("iommu=on needs a virtio-iommu: add --iommu"),
        "{line}"
    );
    let line = one_error_line(&ferrio(&k, &["--device", "path=/tmp,backend=x"]));
    assert!(
        line.ends_with("backend must be group, cdev or auto"),
        "{line}"
    );
}

#[test]
fn a_host_function_bound_to_another_driver() {
    // The first PCI function of this host that has a driver and is not vfio-pci.
    let found = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| {
                std::fs::read_link(p.join("driver"))
                    .ok()
                    .and_then(|t| t.file_name().map(|n| n != "vfio-pci"))
                    .unwrap_or(false)
            })
        });
    let Some(path) = found else {
        eprintln!("skipped: this host has no PCI function bound to a driver other than vfio-pci");
        return;
    };
    let bdf = path.file_name().unwrap().to_string_lossy().into_owned();
    let driver = std::fs::read_link(path.join("driver")).unwrap();
    let driver = driver.file_name().unwrap().to_string_lossy();
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let spec = format!("path=/sys/bus/pci/devices/{bdf}");
    let line = one_error_line(&ferrio(&k, &["--device", &spec]));
    assert_eq!(
        line,
        format!(
            "ferrio: {bdf} is bound to {driver}, not vfio-pci; hand it over with: \
             echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; \
             echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; \
             echo {bdf} > /sys/bus/pci/drivers_probe"
        )
    );
}

/// A fake host with one function bound to vfio-pci in IOMMU group 4, its group node
/// readable and writable by root only.
fn fake_host(root: &Path) -> std::path::PathBuf {
    let f = root.join("sys/devices/pci0000:00/0000:01:00.0");
    let group = root.join("sys/kernel/iommu_groups/4");
    let driver = root.join("sys/bus/pci/drivers/vfio-pci");
    for d in [&f, &group.join("devices"), &driver, &root.join("dev/vfio")] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(f.join("config"), [0u8; 64]).unwrap();
    symlink(&driver, f.join("driver")).unwrap();
    symlink(&group, f.join("iommu_group")).unwrap();
    symlink(&f, group.join("devices/0000:01:00.0")).unwrap();
    let node = root.join("dev/vfio/4");
    std::fs::write(&node, b"").unwrap();
    std::fs::set_permissions(&node, PermissionsExt::from_mode(0o600)).unwrap();
    f
}

#[test]
fn no_permission_on_the_group_node() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let f = fake_host(dir.path());
    let k = kernel(dir.path());
    std::fs::set_permissions(&k, PermissionsExt::from_mode(0o644)).unwrap();
    let spec = format!("path={}", f.display());
    let root = dir.path().display().to_string();
    let args = [
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--host-root",
        &root,
        "--device",
        &spec,
    ];
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let out = if as_root {
        match Command::new("runuser")
            .args(["-u", "nobody", "--", env!("CARGO_BIN_EXE_ferrio")])
            .args(args)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipped: cannot run as nobody here (runuser: {e})");
                return;
            }
        }
    } else {
        Command::new(env!("CARGO_BIN_EXE_ferrio"))
            .args(args)
            .output()
            .unwrap()
    };
    if matches!(out.status.code(), Some(126 | 127)) {
        eprintln!(
            "skipped: nobody cannot execute {} here (a root-only checkout)",
            env!("CARGO_BIN_EXE_ferrio")
        );
        return;
    }
    let line = one_error_line(&out);
    assert_eq!(
        line,
        format!(
            "ferrio: no permission to open {}/dev/vfio/4 read-write: run ferrio as root or give this user access to it",
            dir.path().display()
        )
    );
    // As root the same tree gets past every check (to the missing KVM node here).
    if as_root {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrio"))
            .args(args)
            .args(["--kvm-device", "/nonexistent/kvm"])
            .output()
            .unwrap();
        let line = one_error_line(&out);
        assert!(
            line.starts_with("ferrio: KVM device /nonexistent/kvm"),
            "{line}"
        );
    }
}
