//! How a VM run ends, end to end with KVM: power-off, the two reset paths, a guest
//! panic, a timeout, and where the console goes. The guest is a few hand-assembled
//! instructions (tests/common), so each case takes milliseconds.

mod common;

use common::{ferrio, Code};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn power_off_exits_zero_with_console_output() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k.elf");
    Code::default()
        .print("hello from the guest\n")
        .power_off()
        .write_elf(&k);
    let o = ferrio(&k, &["--cpus", "2"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello from the guest\n");
    assert!(o.stderr.is_empty(), "power-off is silent: {}", stderr(&o));
}

#[test]
fn acpi_reset_and_i8042_reset_are_reboots() {
    let dir = tempfile::tempdir().unwrap();
    for (name, code) in [
        ("acpi", Code::default().out(0x602, 1)),
        ("i8042", Code::default().out(0x64, 0xfe)),
    ] {
        let k = dir.path().join(name);
        code.write_elf(&k);
        let o = ferrio(&k, &[]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains("reboot"), "{name}: {}", stderr(&o));
    }
}

#[test]
fn guest_panic_then_reset_exits_three_with_the_whole_report() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k.elf");
    Code::default()
        .print("Kernel panic - not syncing: Attempted to kill init!\nKernel Offset: disabled\n")
        .out(0x602, 1)
        .write_elf(&k);
    let o = ferrio(&k, &[]);
    assert_eq!(o.status.code(), Some(3), "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("panicked"));
    // Output after the panic line still reaches the console.
    assert!(String::from_utf8_lossy(&o.stdout).ends_with("Kernel Offset: disabled\n"));
}

#[test]
fn guest_panic_without_reset_ends_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k.elf");
    Code::default()
        .print("Kernel panic - not syncing: hang\n")
        .write_elf(&k);
    let t = std::time::Instant::now();
    let o = ferrio(&k, &[]);
    assert_eq!(o.status.code(), Some(3), "stderr: {}", stderr(&o));
    assert!(t.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn timeout_exits_four_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k.elf");
    Code::default().spin().write_elf(&k);
    let t = std::time::Instant::now();
    let o = ferrio(&k, &["--timeout", "1"]);
    assert_eq!(o.status.code(), Some(4), "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("timeout"), "{}", stderr(&o));
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn serial_to_file_and_to_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k.elf");
    Code::default()
        .print("to the file\n")
        .power_off()
        .write_elf(&k);
    let log = dir.path().join("console.log");
    let o = ferrio(&k, &["--serial", &format!("file={}", log.display())]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "to the file\n");
    let o = ferrio(&k, &["--serial", "none"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(o.stdout.is_empty());
}

#[test]
fn config_file_boots_the_same_guest() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k.elf");
    Code::default()
        .print("via config\n")
        .power_off()
        .write_elf(&k);
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"kernel": "{}", "cpus": 2, "memory": "128M"}}"#,
            k.display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferrio"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "via config\n");
}

#[test]
fn a_writable_disk_image_is_locked_against_a_second_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k.elf");
    Code::default().spin().write_elf(&k);
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let rw = format!("path={}", img.display());
    let ro = format!("path={},readonly=on", img.display());
    // The first VMM holds the image while its guest spins.
    let mut first = common::spawn(&k, &["--disk", &rw]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    for spec in [&rw, &ro] {
        let o = ferrio(&k, &["--disk", spec, "--timeout", "5"]);
        assert_eq!(o.status.code(), Some(1), "{spec}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("in use by another process"),
            "{}",
            stderr(&o)
        );
    }
    first.kill().unwrap();
    first.wait().unwrap();
    // Readers share an image: one spins holding a shared lock, another boots beside it.
    let spin = dir.path().join("spin.elf");
    Code::default().spin().write_elf(&spin);
    Code::default().power_off().write_elf(&k);
    let mut reader = common::spawn(&spin, &["--disk", &ro]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "the first reader is still running"
    );
    let o = ferrio(&k, &["--disk", &ro]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let _ = reader.kill();
    let _ = reader.wait();
}
