//! Configuration space of a passed-through function: the device's bytes, with the
//! registers a VMM must own served from an emulated [`ConfigSpace`].
//!
//! Every byte has an [`Owner`]: the device (read and written through the VFIO config
//! region), the model (the emulated copy, with its write masks), or both (the command
//! register: the model's copy is what the guest reads, and its memory space, bus
//! master and INTx disable bits are forwarded to the device).

use tracing::debug;

use super::ops::VfioOps;
use super::CONFIG_REGION;
use crate::config::{
    ConfigSpace, PciIds, COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY,
    CONFIG_SPACE_SIZE, HEADER_TYPE, INTERRUPT_LINE, INTERRUPT_PIN, ROM_ADDRESS,
};
use crate::BarMapping;

/// Command bits the guest controls on the device itself.
pub(crate) const COMMAND_FORWARDED: u16 =
    COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
/// Command: I/O space enable (kept off: I/O BARs are hidden).
const COMMAND_IO: u16 = 1;

/// Extended capabilities a guest must not see on a passed-through function, with the
/// most bytes each can span: SR-IOV, ARI, Resizable BAR, VF Resizable BAR.
pub(crate) const HIDDEN_EXT_CAPS: [(u16, u16); 4] =
    [(0x10, 0x40), (0x0e, 0x8), (0x15, 0x34), (0x24, 0x34)];

/// Who serves a config byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    Device,
    Emulated,
    /// Emulated, and guest writes are forwarded to the device (the command register).
    Forwarded,
}

/// The expansion ROM BAR when exposed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rom {
    /// Size the guest sees (power of two, at least 4 KiB).
    pub size: u64,
    /// Size of the VFIO ROM region (reads past it are all-ones).
    pub region_size: u64,
    /// Decoded address last reported.
    mapped: Option<u64>,
}

const ROM_ENABLE: u32 = 1;

/// The virtualized configuration space.
pub(crate) struct VirtConfig {
    pub cfg: ConfigSpace,
    owner: Box<[Owner; CONFIG_SPACE_SIZE]>,
    /// Size of the device's config region (256 for conventional PCI, 4096 for PCIe).
    region_size: u64,
    pub rom: Option<Rom>,
}

impl std::fmt::Debug for VirtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtConfig")
            .field("cfg", &self.cfg)
            .field("region_size", &self.region_size)
            .field("rom", &self.rom)
            .finish_non_exhaustive()
    }
}

/// Reads the device's whole config space (bytes past the region read all-ones).
pub(crate) fn read_device_config(ops: &dyn VfioOps) -> Option<(Box<[u8; CONFIG_SPACE_SIZE]>, u64)> {
    let region = ops.region(CONFIG_REGION)?;
    let size = region.size.min(CONFIG_SPACE_SIZE as u64);
    let mut bytes = Box::new([0xffu8; CONFIG_SPACE_SIZE]);
    if size < 64 {
        return None;
    }
    ops.read(CONFIG_REGION, 0, &mut bytes[..size as usize]);
    Some((bytes, size))
}

impl VirtConfig {
    /// Starts from the device's bytes, everything owned by the device except the
    /// header registers every passed-through function virtualizes.
    pub(crate) fn new(device: &[u8; CONFIG_SPACE_SIZE], region_size: u64) -> Self {
        let mut cfg = ConfigSpace::new(&PciIds::default());
        let masks: Vec<(u16, u8)> = (0..CONFIG_SPACE_SIZE as u16)
            .map(|o| (o, cfg.write_mask(o)))
            .filter(|&(_, m)| m != 0)
            .collect();
        cfg.set_bytes(0, &device[..]);
        // ConfigSpace::new's masks stay only on the registers we emulate below.
        for (o, _) in masks {
            cfg.set_write_mask(o, &[0]);
        }
        let mut me = VirtConfig {
            cfg,
            owner: Box::new([Owner::Device; CONFIG_SPACE_SIZE]),
            region_size,
            rom: None,
        };
        let dev_cmd = u16::from_le_bytes([device[4], device[5]]);
        me.cfg
            .set_u16(COMMAND, dev_cmd & !(COMMAND_FORWARDED | COMMAND_IO));
        me.cfg
            .set_write_mask(COMMAND, &COMMAND_FORWARDED.to_le_bytes());
        me.own(COMMAND, 2, Owner::Forwarded);
        // The VMM decides whether the slot is multi-function.
        me.cfg
            .set_u8(HEADER_TYPE, device[HEADER_TYPE as usize] & 0x7f);
        me.own(HEADER_TYPE, 1, Owner::Emulated);
        // BARs and the ROM BAR: declared by the caller; unassigned until then.
        me.cfg.set_bytes(crate::config::BAR0, &[0; 24]);
        me.own(crate::config::BAR0, 24, Owner::Emulated);
        me.cfg.set_u32(ROM_ADDRESS, 0);
        me.own(ROM_ADDRESS, 4, Owner::Emulated);
        // No INTx: pin 0, line a scratch register.
        me.cfg.set_u8(INTERRUPT_PIN, 0);
        me.cfg.set_u8(INTERRUPT_LINE, 0);
        me.cfg.set_write_mask(INTERRUPT_LINE, &[0xff]);
        me.own(INTERRUPT_LINE, 2, Owner::Emulated);
        me
    }

    /// Makes `len` bytes at `start` served by `owner`.
    pub(crate) fn own(&mut self, start: u16, len: u16, owner: Owner) {
        let s = usize::from(start).min(CONFIG_SPACE_SIZE);
        let e = (usize::from(start) + usize::from(len)).min(CONFIG_SPACE_SIZE);
        if let Some(o) = self.owner.get_mut(s..e) {
            o.fill(owner);
        }
    }

    /// Hides `len` bytes at `start`: emulated, read-only zeros.
    fn hide(&mut self, start: u16, len: u16) {
        let end = (usize::from(start) + usize::from(len)).min(CONFIG_SPACE_SIZE);
        let n = end.saturating_sub(usize::from(start));
        self.cfg.set_bytes(start, &vec![0; n]);
        self.cfg.set_write_mask(start, &vec![0; n]);
        self.own(start, n as u16, Owner::Emulated);
    }

    /// Offers the ROM BAR (`region_size` bytes of VFIO ROM region).
    pub(crate) fn expose_rom(&mut self, region_size: u64) {
        let size = region_size.next_power_of_two().max(super::PAGE_SIZE);
        let mask = (!(size - 1) as u32 & 0xffff_f800) | ROM_ENABLE;
        self.cfg.set_write_mask(ROM_ADDRESS, &mask.to_le_bytes());
        self.rom = Some(Rom {
            size,
            region_size,
            mapped: None,
        });
    }

    fn rom_decoded(&self) -> Option<u64> {
        self.rom?;
        let reg = self.cfg.read_u32(ROM_ADDRESS);
        let addr = u64::from(reg & 0xffff_f800);
        (self.cfg.memory_enabled() && reg & ROM_ENABLE != 0 && addr != 0).then_some(addr)
    }

    /// Where the ROM decodes now.
    pub(crate) fn rom_mapping(&self) -> Option<u64> {
        self.rom_decoded()
    }

    /// Firmware-style ROM placement (enable bit untouched, change not reported).
    pub(crate) fn set_rom_address(&mut self, addr: u64) {
        let Some(rom) = self.rom else {
            debug!("ROM placement ignored: the ROM is not exposed");
            return;
        };
        let reg = self.cfg.read_u32(ROM_ADDRESS);
        let addr = (addr & !(rom.size - 1)) as u32 & 0xffff_f800;
        self.cfg.set_u32(ROM_ADDRESS, addr | (reg & ROM_ENABLE));
        let decoded = self.rom_decoded();
        if let Some(r) = self.rom.as_mut() {
            r.mapped = decoded;
        }
    }

    fn rom_change(&mut self) -> Option<BarMapping> {
        let decoded = self.rom_decoded();
        let rom = self.rom.as_mut()?;
        if decoded == rom.mapped {
            return None;
        }
        let change = BarMapping {
            index: super::ROM_BAR,
            old: rom.mapped,
            new: decoded,
            size: rom.size,
        };
        rom.mapped = decoded;
        Some(change)
    }

    /// Removes the hidden extended capabilities from the list the guest walks from
    /// 0x100 and zeroes their bodies. Returns the IDs removed.
    pub(crate) fn filter_extended_caps(&mut self) -> Vec<u16> {
        let caps = walk_extended(&self.cfg);
        let hidden = |id: u16| {
            HIDDEN_EXT_CAPS
                .iter()
                .find(|&&(h, _)| h == id)
                .map(|&(_, l)| l)
        };
        if !caps.iter().any(|&(id, _, _)| hidden(id).is_some()) {
            return Vec::new();
        }
        let mut offsets: Vec<u16> = caps.iter().map(|c| c.2).collect();
        offsets.sort_unstable();
        let mut removed = Vec::new();
        for &(id, _, off) in &caps {
            let Some(max_len) = hidden(id) else { continue };
            let next = offsets
                .iter()
                .copied()
                .find(|&o| o > off)
                .unwrap_or(CONFIG_SPACE_SIZE as u16);
            self.hide(off, (next - off).min(max_len));
            removed.push(id);
        }
        let kept: Vec<(u16, u8, u16)> = caps
            .iter()
            .copied()
            .filter(|&(id, _, _)| hidden(id).is_none())
            .collect();
        for (i, &(id, ver, off)) in kept.iter().enumerate() {
            let next = kept.get(i + 1).map_or(0, |k| k.2);
            self.cfg.set_u32(
                off,
                u32::from(id) | u32::from(ver) << 16 | u32::from(next) << 20,
            );
            self.cfg.set_write_mask(off, &[0; 4]);
            self.own(off, 4, Owner::Emulated);
        }
        if kept.first().map(|k| k.2) != Some(crate::capability::EXT_CAP_START) {
            // The list must start at 0x100: a null capability pointing to the first
            // kept one (all zero when none is kept: no extended capabilities).
            let next = kept.first().map_or(0, |k| k.2);
            let start = crate::capability::EXT_CAP_START;
            self.cfg.set_u32(start, u32::from(next) << 20);
            self.own(start, 4, Owner::Emulated);
        }
        debug!(?removed, "extended capabilities hidden from the guest");
        removed
    }

    /// Guest read of `data.len()` bytes at `offset`.
    pub(crate) fn read(&self, ops: &dyn VfioOps, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        let start = usize::from(offset);
        let Some(end) = start
            .checked_add(data.len())
            .filter(|&e| e <= CONFIG_SPACE_SIZE)
        else {
            return;
        };
        if (start..end).any(|o| self.owner[o] == Owner::Device) {
            let dev_end = end.min(self.region_size as usize);
            if start < dev_end {
                ops.read(CONFIG_REGION, start as u64, &mut data[..dev_end - start]);
            }
        }
        for (i, b) in data.iter_mut().enumerate() {
            if self.owner[start + i] != Owner::Device {
                *b = self.cfg.read_u8((start + i) as u16);
            }
        }
    }

    /// Guest write of `data` at `offset`: emulated bytes through the masks, device
    /// bytes to the device, the command register to both. Returns the BAR (and ROM)
    /// decoding changes.
    pub(crate) fn write(&mut self, ops: &dyn VfioOps, offset: u16, data: &[u8]) -> Vec<BarMapping> {
        let start = usize::from(offset);
        let Some(end) = start
            .checked_add(data.len())
            .filter(|&e| e <= CONFIG_SPACE_SIZE)
        else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        let mut forward_command = false;
        let mut i = start;
        while i < end {
            let owner = self.owner[i];
            let run_end = (i..end).find(|&j| self.owner[j] != owner).unwrap_or(end);
            let bytes = &data[i - start..run_end - start];
            match owner {
                Owner::Device => {
                    let dev_end = run_end.min(self.region_size as usize);
                    if i < dev_end {
                        ops.write(CONFIG_REGION, i as u64, &bytes[..dev_end - i]);
                    }
                }
                Owner::Emulated | Owner::Forwarded => {
                    changes.extend(self.cfg.write(i as u16, bytes));
                    forward_command |= owner == Owner::Forwarded;
                }
            }
            i = run_end;
        }
        if forward_command {
            self.sync_command(ops);
        }
        let touches_rom =
            crate::config::ranges_overlap(offset, data.len(), ROM_ADDRESS, ROM_ADDRESS + 4)
                || crate::config::ranges_overlap(offset, data.len(), COMMAND, COMMAND + 2);
        if touches_rom {
            changes.extend(self.rom_change());
        }
        changes
    }

    /// Writes the forwarded command bits to the device (the others as the device has
    /// them; I/O space off).
    pub(crate) fn sync_command(&self, ops: &dyn VfioOps) {
        let mut dev = [0u8; 2];
        ops.read(CONFIG_REGION, u64::from(COMMAND), &mut dev);
        let dev = u16::from_le_bytes(dev);
        let cmd =
            (dev & !(COMMAND_FORWARDED | COMMAND_IO)) | (self.cfg.command() & COMMAND_FORWARDED);
        ops.write(CONFIG_REGION, u64::from(COMMAND), &cmd.to_le_bytes());
    }

    /// Stops the device's memory decoding and DMA (command bits cleared on the
    /// device, not in the guest's view).
    pub(crate) fn stop_device(&self, ops: &dyn VfioOps) {
        let mut dev = [0u8; 2];
        ops.read(CONFIG_REGION, u64::from(COMMAND), &mut dev);
        let cmd = u16::from_le_bytes(dev) & !(COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_IO);
        ops.write(CONFIG_REGION, u64::from(COMMAND), &cmd.to_le_bytes());
    }
}

/// The standard capabilities as `(id, offset)`, stopping at a repeated offset.
pub(crate) fn walk_standard(cfg: &ConfigSpace) -> Vec<(u8, u8)> {
    let mut seen = Vec::new();
    cfg.capabilities()
        .into_iter()
        .take_while(|&(_, off)| {
            let new = !seen.contains(&off);
            seen.push(off);
            new
        })
        .collect()
}

/// The extended capabilities as `(id, version, offset)`, stopping at a repeated
/// offset.
pub(crate) fn walk_extended(cfg: &ConfigSpace) -> Vec<(u16, u8, u16)> {
    let mut seen = Vec::new();
    cfg.extended_capabilities()
        .into_iter()
        .take_while(|&(_, _, off)| {
            let new = !seen.contains(&off);
            seen.push(off);
            new
        })
        .collect()
}
