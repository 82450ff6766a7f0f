//! [`VfioPciDevice`]: a host PCI function passed through to the guest.

use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};

use super::bars::{discover, PassBar};
use super::config::{read_device_config, walk_standard, Owner, VirtConfig};
use super::dma::DmaMappings;
use super::interrupts::{MsixLayout, MsixPassthrough, VectorRouter};
use super::msi::MsiPassthrough;
use super::ops::VfioOps;
use super::{VfioError, IRQ_NORESIZE, MSIX_IRQ, MSI_IRQ, ROM_BAR, ROM_REGION};
use crate::bar::BAR_MEM_PREFETCH;
use crate::capability::{CAP_ID_MSI, CAP_ID_MSIX};
use crate::config::{ConfigSpace, BAR0, CONFIG_SPACE_SIZE, HEADER_TYPE};
use crate::msix::{Msix, MsixConfig};
use crate::{BarInfo, BarKind, BarMapping, DirectArea, MsiVectors, PciDevice};

/// How to present the function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VfioOptions {
    /// Offer the device's expansion ROM (as BAR index [`ROM_BAR`], read-only). Hidden
    /// by default: the ROM register reads 0.
    pub expose_rom: bool,
}

/// A passed-through PCI function (see the [module docs](super)).
///
/// Teardown: the VMM removes the memory slots it made from [`PciDevice::direct_areas`]
/// before the function is dropped (the mappings go with it). [`PciDevice::quiesce`]
/// and drop disable the interrupts, stop the device's DMA and memory decoding, reset
/// it and unmap its DMA (when [`VfioPciDevice::with_dma`] gave the mappings).
pub struct VfioPciDevice {
    config: VirtConfig,
    bars: Vec<PassBar>,
    msix: Option<MsixPassthrough>,
    msi: Option<MsiPassthrough>,
    dma: Option<Arc<Mutex<DmaMappings>>>,
    retired: bool,
    vectors: Arc<dyn MsiVectors>,
    /// Last: the device fds close after the mappings above are gone.
    ops: Arc<dyn VfioOps>,
}

impl std::fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("config", &self.config)
            .field("bars", &self.bars)
            .field("msix", &self.msix.is_some())
            .field("msi", &self.msi.is_some())
            .field("retired", &self.retired)
            .finish_non_exhaustive()
    }
}

/// The device's MSI-X layout from its capability at `cap`.
fn msix_layout(cfg: &ConfigSpace, cap: u16) -> (u16, MsixLayout) {
    let n = (cfg.read_u16(cap + 2) & 0x7ff) + 1;
    let table = cfg.read_u32(cap + 4);
    let pba = cfg.read_u32(cap + 8);
    let layout = MsixLayout {
        table_bar: (table & 7) as u8,
        table_offset: u64::from(table & !7),
        table_size: u64::from(n) * crate::msix::ENTRY_SIZE,
        pba_bar: (pba & 7) as u8,
        pba_offset: u64::from(pba & !7),
        pba_size: u64::from(n).div_ceil(64) * 8,
    };
    (n, layout)
}

/// Vectors the host can route for IRQ `index` (`fallback` when VFIO reports none).
fn host_vectors(ops: &dyn VfioOps, index: u32, fallback: u16) -> u16 {
    match ops.irq(index).map(|i| i.count) {
        Some(0) | None => {
            warn!(
                index,
                "VFIO reports no vectors for an interrupt capability the device has"
            );
            fallback
        }
        Some(n) => u16::try_from(n).unwrap_or(u16::MAX).min(fallback),
    }
}

/// How many [`MsiVectors`] a function needs to offer the guest every MSI-X vector (or
/// MSI vector) it has: the VMM sizes the `MsiVectors` it passes to
/// [`VfioPciDevice::new`] with this (a smaller one gives a smaller MSI-X table).
pub fn vectors_needed(ops: &dyn VfioOps) -> Result<u16, VfioError> {
    let (bytes, size) =
        read_device_config(ops).ok_or(VfioError::NotPci("no readable config space"))?;
    let config = VirtConfig::new(&bytes, size);
    let mut need = 0;
    for (id, off) in walk_standard(&config.cfg) {
        let off = u16::from(off);
        if id == CAP_ID_MSIX {
            let (n, _) = msix_layout(&config.cfg, off);
            need = need.max(host_vectors(ops, MSIX_IRQ, n));
        } else if id == CAP_ID_MSI {
            let n = MsiPassthrough::device_vectors(config.cfg.read_u16(off + 2));
            need = need.max(host_vectors(ops, MSI_IRQ, n));
        }
    }
    Ok(need)
}

impl VfioPciDevice {
    /// Builds the function model of the device behind `ops`: resets the device (if it
    /// can be), reads its config space, declares its memory BARs, emulates MSI-X/MSI
    /// with `msi` delivering the vectors, hides what must be hidden and mmaps the BAR
    /// areas the guest may access directly.
    pub fn new(
        ops: Arc<dyn VfioOps>,
        msi: Arc<dyn MsiVectors>,
        options: VfioOptions,
    ) -> Result<Self, VfioError> {
        let o = ops.as_ref();
        if o.has_reset() {
            if let Err(e) = o.reset() {
                warn!(error = %e, "VFIO device reset at start failed");
            }
        } else {
            info!("the device has no VFIO reset: passed through as the host left it");
        }
        let (bytes, size) =
            read_device_config(o).ok_or(VfioError::NotPci("no readable config space"))?;
        if bytes[usize::from(HEADER_TYPE)] & 0x7f != 0 {
            return Err(VfioError::NotPci("not a type-0 function (a bridge?)"));
        }
        let mut config = VirtConfig::new(&bytes, size);
        let mut bars = discover(o, &bytes[..]);
        for bar in &bars {
            let index = bar.info.index;
            config
                .cfg
                .add_bar(bar.info)
                .map_err(|source| VfioError::Bar { index, source })?;
            if bar.prefetch32 {
                let reg = BAR0 + 4 * u16::from(index);
                let v = config.cfg.read_u32(reg);
                config.cfg.set_u32(reg, v | BAR_MEM_PREFETCH);
            }
        }
        if options.expose_rom {
            match o.region(ROM_REGION).filter(|r| r.size > 0) {
                Some(r) => config.expose_rom(r.size),
                None => info!("the device has no expansion ROM to expose"),
            }
        }
        let caps = walk_standard(&config.cfg);
        let find = |id| caps.iter().find(|c| c.0 == id).map(|c| u16::from(c.1));
        let mut msix = None;
        if let Some(cap) = find(CAP_ID_MSIX) {
            msix = Some(Self::emulate_msix(&mut config, o, &msi, cap)?);
        }
        let mut msi_cap = None;
        if let Some(cap) = find(CAP_ID_MSI) {
            if msi.count() == 0 {
                return Err(VfioError::NoVectors {
                    need: MsiPassthrough::device_vectors(config.cfg.read_u16(cap + 2)),
                });
            }
            let ctrl = config.cfg.read_u16(cap + 2);
            let max = host_vectors(o, MSI_IRQ, msi.count());
            msi_cap = Some(MsiPassthrough::new(&mut config.cfg, cap, max));
            config.own(cap, MsiPassthrough::cap_len(ctrl), Owner::Emulated);
        }
        if msix.is_none() && msi_cap.is_none() {
            warn!("the device has neither MSI-X nor MSI: it gets no interrupts (INTx is not passed through)");
        }
        config.filter_extended_caps();
        // Memory decoding and bus mastering stay off until the guest turns them on.
        config.sync_command(o);
        let layout = msix.as_ref().map(|m| m.layout);
        for bar in &mut bars {
            bar.map_direct(o, layout.as_ref());
        }
        debug!(bars = bars.len(), "VFIO function model ready");
        Ok(VfioPciDevice {
            config,
            bars,
            msix,
            msi: msi_cap,
            dma: None,
            retired: false,
            vectors: msi,
            ops,
        })
    }

    fn emulate_msix(
        config: &mut VirtConfig,
        ops: &dyn VfioOps,
        msi: &Arc<dyn MsiVectors>,
        cap: u16,
    ) -> Result<MsixPassthrough, VfioError> {
        let (n_dev, layout) = msix_layout(&config.cfg, cap);
        if msi.count() == 0 {
            return Err(VfioError::NoVectors { need: n_dev });
        }
        let n = host_vectors(ops, MSIX_IRQ, n_dev).min(msi.count());
        if n < n_dev {
            info!(
                device = n_dev,
                offered = n,
                "MSI-X table limited to the vectors provided"
            );
        }
        let msix_config = MsixConfig {
            vectors: n,
            table_bar: layout.table_bar,
            table_offset: layout.table_offset as u32,
            pba_bar: layout.pba_bar,
            pba_offset: layout.pba_offset as u32,
        };
        let cap8 =
            u8::try_from(cap).map_err(|_| VfioError::NotPci("MSI-X capability out of place"))?;
        let msix = Msix::with_capability_at(&mut config.cfg, cap8, msix_config, msi.clone())?;
        config.own(cap, 12, Owner::Emulated);
        let block = ops
            .irq(MSIX_IRQ)
            .is_none_or(|i| i.flags & IRQ_NORESIZE != 0);
        Ok(MsixPassthrough {
            msix,
            router: VectorRouter::new(MSIX_IRQ, u32::from(n), block),
            layout,
        })
    }

    /// Gives the function the DMA mappings of its IOMMU context, so that teardown
    /// unmaps them after the device is reset (never while it may still do DMA).
    pub fn with_dma(mut self, dma: Arc<Mutex<DmaMappings>>) -> Self {
        self.dma = Some(dma);
        self
    }

    /// The host interface (e.g. for [`VfioOps::kvm_vfio_fd`]).
    pub fn ops(&self) -> &Arc<dyn VfioOps> {
        &self.ops
    }

    /// Stops the device for good: interrupts disabled, DMA and decoding off, reset,
    /// DMA unmapped. Idempotent.
    fn shutdown(&mut self) {
        if self.retired {
            return;
        }
        self.retired = true;
        let ops = self.ops.as_ref();
        if let Some(m) = self.msix.as_mut() {
            m.reset(ops, &mut self.config.cfg);
        }
        if let Some(m) = self.msi.as_mut() {
            m.reset(ops, &mut self.config.cfg);
        }
        self.config.stop_device(ops);
        if ops.has_reset() {
            if let Err(e) = ops.reset() {
                warn!(error = %e, "VFIO device reset at teardown failed");
            }
        }
        if let Some(dma) = &self.dma {
            let failed = dma.lock().unwrap_or_else(|e| e.into_inner()).unmap_all();
            if failed > 0 {
                warn!(failed, "DMA mappings the IOMMU would not unmap");
            }
        }
        debug!("VFIO function stopped");
    }

    fn rom_read(&self, offset: u64, data: &mut [u8]) {
        let inside = self.config.rom.is_some_and(|r| {
            offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= r.region_size)
        });
        if inside {
            self.ops.read(ROM_REGION, offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn bar(&self, index: u8) -> Option<&PassBar> {
        self.bars.iter().find(|b| b.info.index == index)
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        if self.retired || usize::from(offset) + data.len() > CONFIG_SPACE_SIZE {
            data.fill(0xff);
            return;
        }
        if let Some(msi) = self.msi.as_mut() {
            msi.config_read(&mut self.config.cfg, offset, data.len());
        }
        self.config.read(self.ops.as_ref(), offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Vec<BarMapping> {
        if self.retired || data.is_empty() || usize::from(offset) + data.len() > CONFIG_SPACE_SIZE {
            return Vec::new();
        }
        let ops = self.ops.as_ref();
        let changes = self.config.write(ops, offset, data);
        if let Some(m) = self.msix.as_mut() {
            m.config_write(
                ops,
                self.vectors.as_ref(),
                &self.config.cfg,
                offset,
                data.len(),
            );
        }
        if let Some(m) = self.msi.as_mut() {
            m.config_write(
                ops,
                self.vectors.as_ref(),
                &mut self.config.cfg,
                offset,
                data.len(),
            );
        }
        changes
    }

    fn bars(&self) -> Vec<BarInfo> {
        let mut bars = self.config.cfg.bars();
        if let Some(rom) = self.config.rom {
            bars.push(BarInfo {
                index: ROM_BAR,
                kind: BarKind::Mmio32,
                size: rom.size,
            });
        }
        bars
    }

    fn set_bar_address(&mut self, index: u8, addr: u64) {
        if index == ROM_BAR {
            self.config.set_rom_address(addr);
        } else {
            self.config.cfg.set_bar_address(index, addr);
        }
    }

    fn bar_mapping(&self, index: u8) -> Option<u64> {
        if index == ROM_BAR {
            self.config.rom_mapping()
        } else {
            self.config.cfg.bar_mapping(index)
        }
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if self.retired {
            data.fill(0xff);
            return;
        }
        if bar == ROM_BAR {
            self.rom_read(offset, data);
            return;
        }
        if let Some(m) = self.msix.as_mut() {
            if m.read_bar(bar, offset, data) {
                return;
            }
        }
        match self.bar(bar) {
            Some(b) => b.read(self.ops.as_ref(), offset, data),
            None => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if self.retired || bar == ROM_BAR {
            return;
        }
        let ops = self.ops.as_ref();
        if let Some(m) = self.msix.as_mut() {
            if m.write_bar(ops, self.vectors.as_ref(), bar, offset, data) {
                return;
            }
        }
        if let Some(b) = self.bar(bar) {
            b.write(ops, offset, data);
        }
    }

    fn direct_areas(&self, bar: u8) -> Vec<DirectArea> {
        self.bar(bar).map(PassBar::direct_areas).unwrap_or_default()
    }

    fn quiesce(&mut self) {
        self.shutdown();
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.shutdown();
        for bar in &mut self.bars {
            bar.unmap_direct();
        }
    }
}
