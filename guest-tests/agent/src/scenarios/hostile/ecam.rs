//! Configuration-space attacks through the ECAM window itself (mapped from /dev/mem:
//! every store is one access the VMM decodes, with no kernel in between).
//!
//! - The sweep: on bus 0, every dword register (0x000..0x1000) of every function: the
//!   attacked functions (bound to vfio-pci, ours to break) get all-ones, garbage and
//!   their old value back; functions the kernel is using get their own value written
//!   back (a write of every register that must change nothing); absent functions get
//!   garbage in every dword of the 256-byte header space and one dword per 256 bytes
//!   of the extended space (every store is an exit to the VMM, ~0.1-0.4 ms on a PVM
//!   host: all 4 KiB of all 256 functions would take minutes). On three other buses (the second, a middle one, the last),
//!   the command and BAR 0 registers of every function get all-ones. Afterwards
//!   every function must read as before.
//! - BAR placement: the victim's BAR 0 moved exactly onto other ranges of the MMIO bus
//!   (the ECAM window, another function's BAR) while decoding, then back: the VMM must
//!   refuse the overlap and leave the other range working.

use std::time::Instant;

use super::attack::Seen;
use super::blk::Blk;
use super::machine::Ecam;
use crate::vfio::Mmio;

const FUNCTION_SPACE: u64 = 0x1000;
const ABSENT: u32 = 0xffff_ffff;

/// The ECAM window of one segment: its first bus mapped, and a few more (the guest
/// kernel builds page tables for a mapping eagerly, and it runs emulated: all 256
/// buses would cost seconds of page-table set-up for little gain).
pub struct Window {
    pub map: Mmio,
    pub others: Vec<(u8, Mmio)>,
    pub ecam: Ecam,
}

impl Window {
    /// Maps the first bus of `ecam` and, of the others, the second, the middle and
    /// the last one, from /dev/mem.
    pub fn open(ecam: Ecam) -> Result<Window, String> {
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/mem")
            .map_err(|e| format!("open /dev/mem: {e}"))?;
        let bus = |b: u8| {
            Mmio::map(
                &file,
                ecam.base + (u64::from(b - ecam.start_bus) << 20),
                1 << 20,
            )
        };
        let mut picks: Vec<u8> = [
            ecam.start_bus.saturating_add(1),
            ecam.start_bus / 2 + ecam.end_bus / 2,
            ecam.end_bus,
        ]
        .into_iter()
        .filter(|&b| b > ecam.start_bus && b <= ecam.end_bus)
        .collect();
        picks.dedup();
        let others = picks
            .into_iter()
            .map(|b| Ok((b, bus(b)?)))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Window {
            map: bus(ecam.start_bus)?,
            others,
            ecam,
        })
    }

    /// Offset of function `dev.fn` of the first bus in [`Self::map`].
    pub fn function(&self, dev: u8, func: u8) -> u64 {
        (u64::from(dev) << 15) | (u64::from(func) << 12)
    }

    /// Offset of the function named `bdf` (`0000:00:03.0`, on the first bus).
    pub fn bdf(&self, bdf: &str) -> Result<u64, String> {
        let bad = || format!("bad PCI address {bdf:?}");
        let (rest, func) = bdf.rsplit_once('.').ok_or_else(bad)?;
        let mut parts = rest.rsplit(':');
        let dev = parts.next().ok_or_else(bad)?;
        let bus = parts.next().ok_or_else(bad)?;
        let hex = |s: &str| u8::from_str_radix(s, 16).map_err(|_| bad());
        if hex(bus)? != self.ecam.start_bus {
            return Err(format!("{bdf} is not on bus {}", self.ecam.start_bus));
        }
        Ok(self.function(hex(dev)?, hex(func)?))
    }

    fn read_function(&self, base: u64) -> Result<Vec<u32>, String> {
        (0..FUNCTION_SPACE)
            .step_by(4)
            .map(|r| self.map.read32(base + r))
            .collect()
    }
}

/// What the sweep did.
#[derive(Debug, Default)]
struct Sweep {
    writes: u64,
    absent: u32,
    ours: u32,
    kernels: u32,
    /// Functions whose registers read differently afterwards: (bdf offset, dwords).
    changed: Vec<(u64, usize)>,
    /// Absent functions that answered afterwards.
    appeared: u32,
}

/// The sweep (see the module docs). `ours` are the functions the agent may break.
fn sweep(w: &Window, ours: &[u64]) -> Result<Sweep, String> {
    let mut s = Sweep::default();
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let base = w.function(dev, func);
            if w.map.read32(base)? == ABSENT {
                let regs = (0..0x100)
                    .step_by(4)
                    .chain((0x100..FUNCTION_SPACE).step_by(0x100));
                for r in regs {
                    w.map.write32(base + r, 0xa5a5_a5a5 ^ r as u32)?;
                    s.writes += 1;
                }
                w.map.write64(base, u64::MAX)?;
                w.map.write8(base + 4, 0xff)?;
                s.writes += 2;
                s.absent += 1;
                s.appeared += u32::from(w.map.read32(base)? != ABSENT);
                continue;
            }
            let saved = w.read_function(base)?;
            let mine = ours.contains(&base);
            for (i, &old) in saved.iter().enumerate() {
                let r = 4 * i as u64;
                if mine {
                    for v in [u32::MAX, 0x5a5a_5a5a ^ r as u32] {
                        w.map.write32(base + r, v)?;
                    }
                    s.writes += 2;
                }
                w.map.write32(base + r, old)?;
                s.writes += 1;
            }
            if mine {
                s.ours += 1;
            } else {
                s.kernels += 1;
            }
            let now = w.read_function(base)?;
            // Status bits are write-one-to-clear: writing back what was read may
            // clear them. Anything else must be as before.
            let diff = (0..saved.len())
                .filter(|&i| {
                    let mask = if i == 1 { 0x0000_ffff } else { u32::MAX };
                    saved[i] & mask != now[i] & mask
                })
                .count();
            if diff > 0 {
                s.changed.push((base, diff));
            }
        }
    }
    for (_, bus) in &w.others {
        for devfn in 0..256u64 {
            let base = devfn << 12;
            bus.write32(base + 0x04, u32::MAX)?;
            bus.write32(base + 0x10, u32::MAX)?;
            s.writes += 2;
            s.appeared += u32::from(bus.read32(base)? != ABSENT);
        }
    }
    Ok(s)
}

/// The sweep as an attack on `b` (whose function, and `others`, are ours). Afterwards
/// the sessions turn memory decoding, bus mastering and MSI-X back on.
pub fn sweep_attack(
    b: &mut Blk,
    w: &Window,
    others: &[&super::session::Session],
) -> Result<Seen, String> {
    let mut ours = vec![w.bdf(&b.d.s.bdf)?];
    for s in others {
        ours.push(w.bdf(&s.bdf)?);
    }
    let start = Instant::now();
    let s = sweep(w, &ours)?;
    let secs = start.elapsed().as_secs_f64();
    for session in std::iter::once(b.d.s).chain(others.iter().copied()) {
        session.reenable()?;
        session.rearm_msix()?;
    }
    let ok = s.changed.is_empty() && s.appeared == 0;
    Ok(Seen::new(
        ok,
        format!(
            "{} register writes in {secs:.1} s ({:.0}/s): bus {} - {} absent functions \
             (header + a dword per 256 bytes), {} attacked functions (every register 3 \
             times), {} functions \
             in use (every register written back); buses {:?}: command and BAR 0 of every \
             function; functions changed afterwards: {:?}; absent functions that answered: {}",
            s.writes,
            s.writes as f64 / secs,
            w.ecam.start_bus,
            s.absent,
            s.ours,
            s.kernels,
            w.others.iter().map(|(b, _)| *b).collect::<Vec<_>>(),
            s.changed,
            s.appeared
        ),
    ))
}

/// Moves the victim's BAR 0 exactly onto each of `targets` (name, address) and back,
/// with memory decoding on. After each move back, the ECAM window must still decode
/// (the victim's vendor id reads through it) and each target that is a function's
/// BAR must still answer (`probe`: its first dword through /dev/mem is not all-ones).
pub fn bar_over_others(
    b: &mut Blk,
    w: &Window,
    targets: &[(&str, u64, bool)],
) -> Result<Seen, String> {
    b.start()?;
    let f = w.bdf(&b.d.s.bdf)?;
    let (lo, hi) = (w.map.read32(f + 0x10)?, w.map.read32(f + 0x14)?);
    let id = w.map.read32(f)?;
    let mut ok = true;
    let mut seen = Vec::new();
    for &(what, addr, probe) in targets {
        w.map.write32(f + 0x10, (addr as u32 & !0xf) | (lo & 0xf))?;
        w.map.write32(f + 0x14, (addr >> 32) as u32)?;
        let claimed = w.map.read32(f + 0x10)?;
        w.map.write32(f + 0x10, lo)?;
        w.map.write32(f + 0x14, hi)?;
        let ecam_ok = w.map.read32(f)? == id;
        let target_ok = if probe { probe_bar(addr)? } else { ecam_ok };
        let own = b.d.status()?;
        let fine = ecam_ok && target_ok && own != 0xff;
        ok &= fine;
        seen.push(format!(
            "{what} at {addr:#x} (BAR read {claimed:#x}): ECAM {}, target {}, own registers {}",
            if ecam_ok { "ok" } else { "GONE" },
            if target_ok { "ok" } else { "GONE" },
            if own != 0xff { "ok" } else { "GONE" },
        ));
    }
    Ok(Seen::new(ok, seen.join("; ")))
}

/// Whether the register page at `addr` (a virtio-pci BAR 0: common configuration
/// first) answers: `num_queues` through /dev/mem is neither 0 nor all-ones.
fn probe_bar(addr: u64) -> Result<bool, String> {
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/mem")
        .map_err(|e| format!("open /dev/mem: {e}"))?;
    let page = Mmio::map(&file, addr, 4096)?;
    let num_queues = page.read16(0x12)?;
    Ok(num_queues != 0 && num_queues != 0xffff)
}
