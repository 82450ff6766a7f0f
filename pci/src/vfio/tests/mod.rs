//! Unit tests of the passthrough function model against a fake VFIO device.

mod bars;
mod config;
mod dma;
mod fake;
mod lifecycle;
mod msi;
mod msix;

use std::sync::Arc;

use fake::{FakeDevice, NicSpec, Vectors};

use super::{VfioOptions, VfioPciDevice};
use crate::{BarMapping, PciDevice};

/// A model over a fake NIC with `n` vectors.
fn build(
    spec: NicSpec,
    n: u16,
    options: VfioOptions,
) -> (VfioPciDevice, Arc<FakeDevice>, Arc<Vectors>) {
    let fake = FakeDevice::nic(spec);
    let vectors = Vectors::new(n);
    let dev = VfioPciDevice::new(fake.clone(), vectors.clone(), options).expect("model");
    fake.log.take();
    (dev, fake, vectors)
}

/// The default NIC with 8 vectors.
fn nic() -> (VfioPciDevice, Arc<FakeDevice>, Arc<Vectors>) {
    build(NicSpec::default(), 8, VfioOptions::default())
}

fn r32(dev: &mut VfioPciDevice, off: u16) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(off, &mut b);
    u32::from_le_bytes(b)
}

fn r16(dev: &mut VfioPciDevice, off: u16) -> u16 {
    let mut b = [0u8; 2];
    dev.read_config(off, &mut b);
    u16::from_le_bytes(b)
}

fn w32(dev: &mut VfioPciDevice, off: u16, v: u32) -> Vec<BarMapping> {
    dev.write_config(off, &v.to_le_bytes())
}

fn w16(dev: &mut VfioPciDevice, off: u16, v: u16) -> Vec<BarMapping> {
    dev.write_config(off, &v.to_le_bytes())
}

fn bar_r32(dev: &mut VfioPciDevice, bar: u8, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_bar(bar, off, &mut b);
    u32::from_le_bytes(b)
}

fn bar_w32(dev: &mut VfioPciDevice, bar: u8, off: u64, v: u32) {
    dev.write_bar(bar, off, &v.to_le_bytes());
}
