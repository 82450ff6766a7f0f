//! seccomp end to end with the tiny hand-assembled guest: it drives a virtio-blk
//! function as a driver would (BAR 0 moved below 4 GiB, memory decoding, virtio
//! initialisation up to DRIVER_OK, one queue) and submits a write of sector 1 and a
//! read of sector 0, polls the used ring, prints both status bytes and the first
//! bytes read on COM1 and powers off. So each engine runs real requests under its
//! worker's filter (the io_uring engine: ring set up on the vCPU thread, READV/WRITEV
//! through `io_uring_enter`, write-through fdatasync), and the test hook
//! `FERRIO_SECCOMP_SELFTEST` shows what a forbidden system call does, in a blk worker,
//! the other threads, and (with a guest that only activates them) the virtio-console
//! and virtio-iommu workers.

mod common;

use std::path::Path;
use std::process::Output;

use common::{ferrio, Code};
use ferrio_pci::virtio_pci::common_cfg::offset as cc;

/// The disk's slot: 00:03.0.
const SLOT: u32 = 3;
/// The console's slot in the worker test (the virtio-iommu takes the first free one).
const CONSOLE_SLOT: u32 = 4;
const IOMMU_SLOT: u32 = 1;
/// Where the guest puts BAR 0 (the start of the 32-bit MMIO window).
const BAR: u32 = 0xc000_0000;
/// Queue 0's notification address (notify_off 0, multiplier 4).
const NOTIFY: u32 = BAR + 0x3000;
/// The ring and the requests, in guest RAM.
const DESC: u32 = 0x20_0000;
const AVAIL: u32 = 0x20_1000;
const USED: u32 = 0x20_2000;
const WRITE_HEADER: u32 = 0x20_3000;
const WRITE_DATA: u32 = 0x20_4000;
const WRITE_STATUS: u32 = 0x20_5000;
const READ_HEADER: u32 = 0x20_6000;
const READ_DATA: u32 = 0x20_7000;
const READ_STATUS: u32 = 0x20_8000;
const QUEUE_SIZE: u16 = 16;
const SECTOR: usize = 512;

const VIRTQ_DESC_F_NEXT: u32 = 1;
const VIRTQ_DESC_F_WRITE: u32 = 2;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;

/// What the guest writes to sector 1.
const WRITTEN: &[u8; 8] = b"SECCOMP!";
/// What the image holds in sector 0 (the guest reads it back).
const IMAGE_HEAD: &[u8; 8] = b"ferrio-0";

/// 32-bit protected-mode stores and a poll loop.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    /// `mov dword [addr], value`
    fn store32(mut self, addr: u32, value: u32) -> Self {
        self.0.extend([0xc7, 0x05]);
        self.0.extend(addr.to_le_bytes());
        self.0.extend(value.to_le_bytes());
        self
    }

    /// `mov word [addr], value`
    fn store16(mut self, addr: u32, value: u16) -> Self {
        self.0.extend([0x66, 0xc7, 0x05]);
        self.0.extend(addr.to_le_bytes());
        self.0.extend(value.to_le_bytes());
        self
    }

    /// `mov byte [addr], value`
    fn store8(mut self, addr: u32, value: u8) -> Self {
        self.0.extend([0xc6, 0x05]);
        self.0.extend(addr.to_le_bytes());
        self.0.push(value);
        self
    }

    /// A 64-bit register as two dword stores.
    fn store64(self, addr: u32, value: u64) -> Self {
        self.store32(addr, value as u32)
            .store32(addr + 4, (value >> 32) as u32)
    }

    /// `1: cmp word [addr], value; jne 1b`
    fn wait16(mut self, addr: u32, value: u8) -> Self {
        self.0.extend([0x66, 0x83, 0x3d]);
        self.0.extend(addr.to_le_bytes());
        self.0.extend([value, 0x75, 0xf6]);
        self
    }

    /// Descriptor `index`: `len` bytes at `addr`, `flags`, then `next`.
    fn desc(self, index: u32, addr: u32, len: u32, flags: u32, next: u32) -> Self {
        let at = DESC + 16 * index;
        self.store64(at, u64::from(addr))
            .store32(at + 8, len)
            .store32(at + 12, flags | next << 16)
    }

    /// A three-descriptor request from `first`: header, data, status.
    fn request(self, first: u32, kind: u32, sector: u64, bufs: [u32; 3]) -> Self {
        let [header, data, status] = bufs;
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT
        } else {
            VIRTQ_DESC_F_NEXT
        };
        self.store32(header, kind)
            .store32(header + 4, 0)
            .store64(header + 8, sector)
            .store8(status, 0xff)
            .desc(first, header, 16, VIRTQ_DESC_F_NEXT, first + 1)
            .desc(first + 1, data, SECTOR as u32, data_flags, first + 2)
            .desc(first + 2, status, 1, VIRTQ_DESC_F_WRITE, 0)
    }
}

/// The virtio function at `slot`: BAR 0 (64-bit) below 4 GiB, memory decoding and
/// bus mastering, then initialisation up to DRIVER_OK with queues `0..queues` (queue
/// `i`'s rings 64 KiB after queue `i - 1`'s), when its worker threads start.
fn activate(slot: u32, queues: u32) -> Asm {
    let cfg = 0xe000_0000 | slot << 15;
    let status = BAR + cc::DEVICE_STATUS as u32;
    let q = |offset: u64| BAR + offset as u32;
    let mut asm = Asm::default()
        .store32(cfg + 0x10, BAR)
        .store32(cfg + 0x14, 0)
        .store16(cfg + 0x04, 0x6)
        .store8(status, 0)
        .store8(status, 1 | 2)
        .store32(q(cc::DRIVER_FEATURE_SELECT), 1)
        .store32(q(cc::DRIVER_FEATURE), 1) // VIRTIO_F_VERSION_1
        .store8(status, 1 | 2 | 8);
    for i in 0..queues {
        let ring = u64::from(DESC + i * 0x1_0000);
        asm = asm
            .store16(q(cc::QUEUE_SELECT), i as u16)
            .store16(q(cc::QUEUE_SIZE), QUEUE_SIZE)
            .store64(q(cc::QUEUE_DESC), ring)
            .store64(q(cc::QUEUE_DRIVER), ring + 0x1000)
            .store64(q(cc::QUEUE_DEVICE), ring + 0x2000)
            .store16(q(cc::QUEUE_ENABLE), 1);
    }
    asm.store8(status, 1 | 2 | 4 | 8)
}

/// The guest: virtio-blk initialisation up to DRIVER_OK, a write and a read, the
/// results on COM1, power-off.
fn guest(path: &Path) {
    let asm = activate(SLOT, 1)
        .store32(
            WRITE_DATA,
            u32::from_le_bytes(WRITTEN[..4].try_into().unwrap()),
        )
        .store32(
            WRITE_DATA + 4,
            u32::from_le_bytes(WRITTEN[4..].try_into().unwrap()),
        )
        .request(
            0,
            VIRTIO_BLK_T_OUT,
            1,
            [WRITE_HEADER, WRITE_DATA, WRITE_STATUS],
        )
        .request(3, VIRTIO_BLK_T_IN, 0, [READ_HEADER, READ_DATA, READ_STATUS])
        .store16(AVAIL + 4, 0)
        .store16(AVAIL + 6, 3)
        .store16(AVAIL + 2, 2)
        .store16(NOTIFY, 0)
        // Both used elements.
        .wait16(USED + 2, 2);
    Code::default()
        .raw(&asm.0)
        .print_mmio32(WRITE_STATUS)
        .print_mmio32(READ_STATUS)
        .print_mmio32(READ_DATA)
        .print_mmio32(READ_DATA + 4)
        .power_off()
        .write_elf(path);
}

/// A guest, a 1 MiB image with [`IMAGE_HEAD`] at 0, and the `--disk` argument.
fn setup(dir: &Path, engine: &str) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let kernel = dir.join("k.elf");
    guest(&kernel);
    let image = dir.join("disk.img");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..IMAGE_HEAD.len()].copy_from_slice(IMAGE_HEAD);
    std::fs::write(&image, bytes).unwrap();
    let disk = format!("path={},slot={SLOT},io_engine={engine}", image.display());
    (kernel, image, disk)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `ferrio run` with the disk, `--seccomp mode` unless `None`, and the test hook.
fn run(kernel: &Path, disk: &str, mode: Option<&str>, selftest: Option<&str>) -> Output {
    let mut args = vec!["--disk", disk, "--serial", "stdio"];
    if let Some(mode) = mode {
        args.extend(["--seccomp", mode]);
    }
    match selftest {
        Some(kind) => std::env::set_var("FERRIO_SECCOMP_SELFTEST", kind),
        None => std::env::remove_var("FERRIO_SECCOMP_SELFTEST"),
    }
    let o = ferrio(kernel, &args);
    std::env::remove_var("FERRIO_SECCOMP_SELFTEST");
    o
}

/// The guest's report: both statuses OK (0; the low byte of each dword printed) and
/// sector 0's first bytes.
fn assert_io_done(o: &Output, image: &Path, what: &str) {
    assert_eq!(o.status.code(), Some(0), "{what}: {}", stderr(o));
    let out = &o.stdout;
    assert_eq!(out.len(), 16, "{what}: {out:x?} / {}", stderr(o));
    assert_eq!((out[0], out[4]), (0, 0), "{what}: request statuses");
    assert_eq!(&out[8..16], IMAGE_HEAD, "{what}: what the guest read");
    let written = std::fs::read(image).unwrap();
    assert_eq!(&written[SECTOR..SECTOR + 8], WRITTEN, "{what}: sector 1");
    assert!(written[SECTOR + 8..2 * SECTOR].iter().all(|&b| b == 0));
}

// One test function: the test hook is an environment variable of this process.
#[test]
fn filters_on_by_default_both_engines_work_and_a_forbidden_call_stops_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    for engine in ["sync", "uring"] {
        let (kernel, image, disk) = setup(dir.path(), engine);
        // Default mode (on): real requests through each engine.
        let o = run(&kernel, &disk, None, None);
        assert_io_done(&o, &image, engine);
        assert!(o.stderr.is_empty(), "{engine}: {}", stderr(&o));

        // A forbidden call from the worker: exit 159 and a line naming it.
        let kind = if engine == "uring" {
            "blk-uring"
        } else {
            "blk"
        };
        let o = run(&kernel, &disk, None, Some(kind));
        assert_eq!(o.status.code(), Some(159), "{kind}: {}", stderr(&o));
        let expected = format!(
            "ferrio: seccomp: thread virtio-blk-q0 ({kind}) made a forbidden system call: \
             socket (41); the VMM stops\n"
        );
        assert!(stderr(&o).ends_with(&expected), "{kind}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "no request completed: {:x?}", o.stdout);

        // log: the call is let through (and logged by the kernel), the VM runs on.
        let (kernel, image, disk) = setup(dir.path(), engine);
        let o = run(&kernel, &disk, Some("log"), Some(kind));
        assert_io_done(&o, &image, "log");
        assert!(
            stderr(&o).contains("the filter let it through"),
            "{}",
            stderr(&o)
        );

        // off: no filter at all.
        let (kernel, image, disk) = setup(dir.path(), engine);
        let o = run(&kernel, &disk, Some("off"), Some(kind));
        assert_io_done(&o, &image, "off");
    }

    // The other threads' filters refuse it too.
    let (kernel, _, disk) = setup(dir.path(), "sync");
    for (kind, thread) in [("vcpu", "vcpu0"), ("io", "io"), ("main", "main")] {
        let o = run(&kernel, &disk, Some("on"), Some(kind));
        assert_eq!(o.status.code(), Some(159), "{kind}: {}", stderr(&o));
        let expected =
            format!("thread {thread} ({kind}) made a forbidden system call: socket (41)");
        assert!(stderr(&o).contains(&expected), "{kind}: {}", stderr(&o));
    }

    // The console and iommu workers: a guest that only activates the function.
    for (kind, slot, queues, thread) in [
        ("console", CONSOLE_SLOT, 2, "virtio-console"),
        ("iommu", IOMMU_SLOT, 2, "virtio-iommu"),
    ] {
        let k = dir.path().join(format!("{kind}.elf"));
        Code::default()
            .raw(&activate(slot, queues).0)
            .print("active\n")
            .spin()
            .write_elf(&k);
        let console = format!(
            "file={},slot={CONSOLE_SLOT}",
            dir.path().join("c").display()
        );
        let args = ["--console", &console, "--iommu", "--timeout", "10"];
        std::env::set_var("FERRIO_SECCOMP_SELFTEST", kind);
        let o = ferrio(&k, &args);
        std::env::remove_var("FERRIO_SECCOMP_SELFTEST");
        assert_eq!(o.status.code(), Some(159), "{kind}: {}", stderr(&o));
        let expected =
            format!("thread {thread} ({kind}) made a forbidden system call: socket (41)");
        assert!(stderr(&o).contains(&expected), "{kind}: {}", stderr(&o));
    }

    // Not a mode.
    let o = run(&kernel, &disk, Some("strict"), None);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid seccomp mode 'strict'"));
}
