//! A tiny hand-assembled guest for VMM lifecycle tests: a 64-bit ELF with a PVH note
//! whose 32-bit entry runs a few port writes. Only general-purpose instructions, so it
//! runs the same under hardware KVM and under the PVM emulator.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

/// Where the code is loaded and entered.
const ENTRY: u64 = 0x10_0000;
const CODE_OFFSET: u64 = 0x1000;
const NOTE_OFFSET: u64 = 0x200;

/// Builder for 32-bit code.
#[derive(Default)]
pub struct Code(Vec<u8>);

impl Code {
    /// `mov dx, port; mov al, value; out dx, al`.
    pub fn out(mut self, port: u16, value: u8) -> Self {
        self.0.extend([0x66, 0xba]);
        self.0.extend(port.to_le_bytes());
        self.0.extend([0xb0, value, 0xee]);
        self
    }

    /// Writes `text` to COM1.
    pub fn print(mut self, text: &str) -> Self {
        for b in text.bytes() {
            self = self.out(0x3f8, b);
        }
        self
    }

    /// ACPI S5: SLP_TYP 5, SLP_EN.
    pub fn power_off(self) -> Self {
        self.out(0x600, (5 << 2) | 0x20)
    }

    /// Writes the 4 bytes of `eax` to COM1, low byte first.
    fn print_eax(mut self) -> Self {
        self.0.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
        for _ in 0..4 {
            self.0.extend([0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
        }
        self
    }

    /// `mov eax, [addr]` (an MMIO load), then prints eax.
    pub fn print_mmio32(mut self, addr: u32) -> Self {
        self.0.push(0xa1);
        self.0.extend(addr.to_le_bytes());
        self.print_eax()
    }

    /// Reads a config dword through 0xCF8/0xCFC, then prints it.
    pub fn print_cf8(mut self, address: u32) -> Self {
        self.0.push(0xb8); // mov eax, imm32
        self.0.extend(address.to_le_bytes());
        self.0.extend([0x66, 0xba, 0xf8, 0x0c, 0xef]); // mov dx, 0xcf8; out dx, eax
        self.0.extend([0x66, 0xba, 0xfc, 0x0c, 0xed]); // mov dx, 0xcfc; in eax, dx
        self.print_eax()
    }

    /// Appends machine code assembled elsewhere (32-bit protected mode).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    /// `jmp $` forever.
    pub fn spin(mut self) -> Self {
        self.0.extend([0xeb, 0xfe]);
        self
    }

    /// Writes the ELF to `path`.
    pub fn write_elf(self, path: &Path) {
        let code = self.spin().0;
        let mut note = Vec::new();
        note.extend(4u32.to_le_bytes()); // namesz
        note.extend(4u32.to_le_bytes()); // descsz
        note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        note.extend(b"Xen\0");
        note.extend((ENTRY as u32).to_le_bytes());

        let mut elf = vec![0u8; (CODE_OFFSET as usize) + code.len()];
        let mut w = |at: usize, bytes: &[u8]| elf[at..at + bytes.len()].copy_from_slice(bytes);
        w(0, &[0x7f, b'E', b'L', b'F', 2, 1, 1]);
        w(16, &2u16.to_le_bytes()); // ET_EXEC
        w(18, &0x3eu16.to_le_bytes()); // x86_64
        w(20, &1u32.to_le_bytes());
        w(24, &ENTRY.to_le_bytes());
        w(32, &64u64.to_le_bytes()); // e_phoff
        w(52, &64u16.to_le_bytes()); // e_ehsize
        w(54, &56u16.to_le_bytes()); // e_phentsize
        w(56, &2u16.to_le_bytes()); // e_phnum
        let phdr = |p_type: u32, offset: u64, addr: u64, size: u64| {
            let mut h = Vec::new();
            h.extend(p_type.to_le_bytes());
            h.extend(5u32.to_le_bytes()); // R+X
            h.extend(offset.to_le_bytes());
            h.extend(addr.to_le_bytes());
            h.extend(addr.to_le_bytes());
            h.extend(size.to_le_bytes());
            h.extend(size.to_le_bytes());
            h.extend(4u64.to_le_bytes());
            h
        };
        w(64, &phdr(1, CODE_OFFSET, ENTRY, code.len() as u64));
        w(120, &phdr(4, NOTE_OFFSET, 0, note.len() as u64));
        w(NOTE_OFFSET as usize, &note);
        w(CODE_OFFSET as usize, &code);
        std::fs::File::create(path)
            .unwrap()
            .write_all(&elf)
            .unwrap();
    }
}

/// Runs `ferrio run --kernel <elf> <args>` with a 60 s safety net.
pub fn ferrio(kernel: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("60")
        .arg(env!("CARGO_BIN_EXE_ferrio"))
        .arg("run")
        .arg("--kernel")
        .arg(kernel);
    cmd.args(["--memory", "64M"]).args(args);
    if !args.contains(&"--timeout") {
        cmd.args(["--timeout", "30"]);
    }
    cmd.env_remove("FERRIO_LOG").env_remove("RUST_LOG");
    cmd.stdin(std::process::Stdio::null());
    cmd.output().expect("run ferrio")
}

/// Starts `ferrio run` in the background (serial off, 20 s timeout) for tests that need
/// a VMM running while they act.
pub fn spawn(kernel: &Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_ferrio"))
        .args([
            "run",
            "--memory",
            "64M",
            "--timeout",
            "20",
            "--serial",
            "none",
            "--kernel",
        ])
        .arg(kernel)
        .args(args)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn ferrio")
}
