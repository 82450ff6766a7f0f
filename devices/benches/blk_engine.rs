//! virtio-blk engines, sync against io_uring, through the real worker thread: a
//! hand-built split ring keeps N requests in flight (4 KiB random reads, 1 MiB
//! sequential reads) on a 256 MiB image, page cache warm (`buffered`) and O_DIRECT
//! (`direct`). Prints requests/s and MB/s and writes `target/bench/blk-engine.json`.
//!
//!     cargo bench -p ferrio-devices --bench blk-engine [-- SECONDS]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrio_devices::virtio::block::{BlockConfig, FileBackend, IoEngine, VirtioBlock};
use ferrio_devices::virtio::{Activation, ActiveQueue, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Mem = GuestMemoryMmap<()>;

const IMAGE_SIZE: u64 = 256 << 20;
const QUEUE_SIZE: u16 = 256;
const DESC: u64 = 0;
const AVAIL: u64 = DESC + 16 * QUEUE_SIZE as u64;
const USED: u64 = (AVAIL + 6 + 2 * QUEUE_SIZE as u64 + 3) & !3;
const HDRS: u64 = 0x10_0000;
const STATUS: u64 = 0x20_0000;
const DATA: u64 = 0x100_0000;
const MEM_SIZE: usize = 0x100_0000 + 64 * (1 << 20);

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_queue(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_config(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn device_error(&self) {
        panic!("device error");
    }
}

struct Job {
    name: &'static str,
    block: u32,
    depth: u16,
    random: bool,
}

/// xorshift, for reproducible random sectors.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn w16(mem: &Mem, at: u64, v: u16) {
    mem.write_obj(v, GuestAddress(at)).unwrap();
}
fn r16(mem: &Mem, at: u64) -> u16 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

/// Runs `job` on `engine` for `secs`; returns (requests/s, MB/s).
fn run(image: &Path, direct: bool, engine: IoEngine, job: &Job, secs: f64) -> (f64, f64) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut opts = std::fs::File::options();
    opts.read(true).write(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let backend = FileBackend::new(opts.open(image).unwrap()).unwrap();
    let config = BlockConfig {
        queue_size: QUEUE_SIZE,
        io_engine: engine,
        ..BlockConfig::default()
    };
    let mut dev = VirtioBlock::new(Box::new(backend), config).unwrap();
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(DESC))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL))
        .unwrap();
    queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    queue.set_ready(true);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let d: &mut dyn VirtioDevice<Mem> = &mut dev;
    d.set_acked_features(d.device_features());
    d.activate(Activation {
        mem: mem.clone(),
        queues: vec![ActiveQueue {
            index: 0,
            queue,
            notify: kick.try_clone().unwrap(),
        }],
        interrupt: Arc::new(NoIrq),
        dma: Default::default(),
    })
    .unwrap();
    let sectors = IMAGE_SIZE / 512;
    let per = u64::from(job.block) / 512;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut next_seq = 0u64;
    let mut avail = 0u16;
    // Request k uses descriptors 3k..3k+2.
    let mut publish = |k: u16, avail: &mut u16| {
        let sector = if job.random {
            rng.next() % (sectors / per) * per
        } else {
            let s = next_seq;
            next_seq = (next_seq + per) % sectors;
            s
        };
        let hdr = HDRS + 16 * u64::from(k);
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let data = DATA + u64::from(k) * u64::from(job.block);
        let descs = [
            (hdr, 16u32, 1u16),
            (data, job.block, 1 | 2),
            (STATUS + u64::from(k), 1, 2),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let slot = 3 * u64::from(k) + i as u64;
            let at = DESC + 16 * slot;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            w16(&mem, at + 12, flags);
            w16(&mem, at + 14, (slot + 1) as u16);
        }
        w16(&mem, AVAIL + 4 + 2 * u64::from(*avail % QUEUE_SIZE), 3 * k);
        *avail = avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        w16(&mem, AVAIL + 2, *avail);
    };
    for k in 0..job.depth {
        publish(k, &mut avail);
    }
    kick.write(1).unwrap();
    let (start, deadline) = (Instant::now(), Duration::from_secs_f64(secs));
    let (mut used_seen, mut done) = (0u16, 0u64);
    while start.elapsed() < deadline {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let used = r16(&mem, USED + 2);
        if used == used_seen {
            std::hint::spin_loop();
            continue;
        }
        while used_seen != used {
            let id = r16(&mem, USED + 4 + 8 * u64::from(used_seen % QUEUE_SIZE));
            let k = id / 3;
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(STATUS + u64::from(k)))
                    .unwrap(),
                0
            );
            publish(k, &mut avail);
            used_seen = used_seen.wrapping_add(1);
            done += 1;
        }
        kick.write(1).unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    d.reset();
    let rps = done as f64 / elapsed;
    (rps, rps * f64::from(job.block) / 1e6)
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2.0);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&root).unwrap();
    let image = root.join("blk-engine.img");
    if std::fs::metadata(&image).map(|m| m.len()).ok() != Some(IMAGE_SIZE) {
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let mut f = std::fs::File::create(&image).unwrap();
        for _ in 0..IMAGE_SIZE >> 20 {
            f.write_all(&chunk).unwrap();
        }
    }
    let jobs = [
        Job {
            name: "4k-randread-qd1",
            block: 4096,
            depth: 1,
            random: true,
        },
        Job {
            name: "4k-randread-qd32",
            block: 4096,
            depth: 32,
            random: true,
        },
        Job {
            name: "1m-seqread-qd8",
            block: 1 << 20,
            depth: 8,
            random: false,
        },
    ];
    let mut results = Vec::new();
    println!(
        "{:<10} {:<18} {:>7} {:>12} {:>10}",
        "cache", "job", "engine", "requests/s", "MB/s"
    );
    for (cache, direct) in [("buffered", false), ("direct", true)] {
        for job in &jobs {
            for (engine, ename) in [(IoEngine::Sync, "sync"), (IoEngine::Uring, "uring")] {
                let (rps, mbs) = run(&image, direct, engine, job, secs);
                println!(
                    "{cache:<10} {:<18} {ename:>7} {rps:>12.0} {mbs:>10.1}",
                    job.name
                );
                results.push(format!(
                    "{{\"cache\":\"{cache}\",\"job\":\"{}\",\"engine\":\"{ename}\",\"requests_per_s\":{rps:.0},\"mb_per_s\":{mbs:.1}}}",
                    job.name
                ));
            }
        }
    }
    let json = format!(
        "{{\"image_bytes\":{IMAGE_SIZE},\"seconds_per_run\":{secs},\"results\":[\n  {}\n]}}\n",
        results.join(",\n  ")
    );
    std::fs::write(root.join("blk-engine.json"), json).unwrap();
    println!("written {}", root.join("blk-engine.json").display());
}
