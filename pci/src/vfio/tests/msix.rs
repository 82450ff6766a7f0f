//! MSI-X: the emulated capability, table trapping, per-vector and function masking,
//! lazy enable, capture of interrupts raised while masked.

use super::fake::{Call, FakeDevice, NicSpec, VecCall, Vectors, MSIX_CAP};
use super::*;
use crate::vfio::{VfioError, CONFIG_REGION, MSIX_IRQ};
use crate::MsiMessage;

const TABLE: u64 = 0x2000;
const PBA: u64 = 0x3000;
const CTRL: u16 = MSIX_CAP + 2;
const ENABLE: u16 = 0x8000;
const FMASK: u16 = 0x4000;

fn msg(v: u16) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000 | u64::from(v) << 12,
        data: 0x40 + u32::from(v),
    }
}

fn program(dev: &mut VfioPciDevice, v: u16) {
    let e = TABLE + 16 * u64::from(v);
    let m = msg(v);
    bar_w32(dev, 0, e, m.address as u32);
    bar_w32(dev, 0, e + 4, (m.address >> 32) as u32);
    bar_w32(dev, 0, e + 8, m.data);
}

fn set_mask(dev: &mut VfioPciDevice, v: u16, masked: bool) {
    bar_w32(dev, 0, TABLE + 16 * u64::from(v) + 12, u32::from(masked));
}

fn pba(dev: &mut VfioPciDevice) -> u64 {
    let mut b = [0u8; 8];
    dev.read_bar(0, PBA, &mut b);
    u64::from_le_bytes(b)
}

/// The SET_IRQS calls among `calls`.
fn set_irqs(calls: Vec<Call>) -> Vec<(u32, u32, Vec<Option<i32>>)> {
    calls
        .into_iter()
        .filter_map(|c| match c {
            Call::SetIrqs { index, start, fds } => Some((index, start, fds)),
            _ => None,
        })
        .collect()
}

#[test]
fn capability_is_emulated() {
    let (mut dev, fake, _) = nic();
    assert_eq!(r32(&mut dev, MSIX_CAP), 0x0007_7011);
    assert_eq!(r32(&mut dev, MSIX_CAP + 4), 0x2000);
    assert_eq!(r32(&mut dev, MSIX_CAP + 8), 0x3000);
    fake.log.take();
    w16(&mut dev, CTRL, ENABLE | FMASK);
    assert_eq!(r16(&mut dev, CTRL), 0xc007);
    assert!(!fake
        .log
        .take()
        .iter()
        .any(|c| matches!(c, Call::Write { index, .. } if *index == CONFIG_REGION)));
    assert_eq!(fake.config_u16(usize::from(CTRL)), 0x0007);
}

#[test]
fn unmask_routes_the_vector_and_mask_captures_it() {
    let (mut dev, fake, vectors) = nic();
    w16(&mut dev, CTRL, ENABLE);
    program(&mut dev, 2);
    // Lazy: nothing in VFIO while every vector is masked.
    assert!(set_irqs(fake.log.take()).is_empty());
    set_mask(&mut dev, 2, false);
    assert_eq!(
        set_irqs(fake.log.take()),
        vec![(MSIX_IRQ, 2, vec![Some(vectors.fd(2))])]
    );
    assert_eq!(
        vectors.take(),
        vec![VecCall::Set(2, msg(2)), VecCall::Commit]
    );
    // Mask: VFIO now signals the model's capture eventfd, not the guest's.
    set_mask(&mut dev, 2, true);
    let calls = set_irqs(fake.log.take());
    assert_eq!(calls.len(), 1);
    let (index, start, fds) = &calls[0];
    assert_eq!((*index, *start, fds.len()), (MSIX_IRQ, 2, 1));
    assert!(fds[0].is_some() && fds[0] != Some(vectors.fd(2)));
    // The device raises vector 2 while masked: pending in the PBA, not delivered.
    assert!(fake.raise(MSIX_IRQ, 2));
    assert_eq!(pba(&mut dev), 1 << 2);
    assert!(vectors.take().is_empty());
    // Unmask: delivered once, and VFIO signals the guest's eventfd again.
    set_mask(&mut dev, 2, false);
    assert_eq!(
        vectors.take(),
        vec![VecCall::Set(2, msg(2)), VecCall::Commit, VecCall::Fire(2)]
    );
    assert_eq!(
        set_irqs(fake.log.take()),
        vec![(MSIX_IRQ, 2, vec![Some(vectors.fd(2))])]
    );
    assert_eq!(pba(&mut dev), 0);
    assert_eq!(fake.trigger(MSIX_IRQ, 2), Some(vectors.fd(2)));
}

#[test]
fn captured_interrupt_fires_on_unmask_without_a_pba_read() {
    let (mut dev, fake, vectors) = nic();
    w16(&mut dev, CTRL, ENABLE);
    program(&mut dev, 1);
    set_mask(&mut dev, 1, false);
    set_mask(&mut dev, 1, true);
    fake.raise(MSIX_IRQ, 1);
    vectors.take();
    set_mask(&mut dev, 1, false);
    let fires = vectors
        .take()
        .into_iter()
        .filter(|c| *c == VecCall::Fire(1))
        .count();
    assert_eq!(fires, 1);
}

#[test]
fn function_mask_and_disable() {
    let (mut dev, fake, vectors) = nic();
    w16(&mut dev, CTRL, ENABLE);
    for v in 0..2 {
        program(&mut dev, v);
        set_mask(&mut dev, v, false);
    }
    assert_eq!(
        set_irqs(fake.log.take()),
        vec![
            (MSIX_IRQ, 0, vec![Some(vectors.fd(0))]),
            (MSIX_IRQ, 1, vec![Some(vectors.fd(1))]),
        ]
    );
    // Function mask: both vectors move to capture in one call.
    w16(&mut dev, CTRL, ENABLE | FMASK);
    let calls = set_irqs(fake.log.take());
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0].0, calls[0].1, calls[0].2.len()), (MSIX_IRQ, 0, 2));
    assert!(!calls[0].2.contains(&Some(vectors.fd(0))));
    fake.raise(MSIX_IRQ, 1);
    vectors.take();
    // Function unmask: the captured interrupt is delivered, routes restored.
    w16(&mut dev, CTRL, ENABLE);
    assert!(vectors.take().contains(&VecCall::Fire(1)));
    assert_eq!(
        set_irqs(fake.log.take()),
        vec![(MSIX_IRQ, 0, vec![Some(vectors.fd(0)), Some(vectors.fd(1))])]
    );
    // Disable: VFIO's MSI-X index goes off entirely.
    w16(&mut dev, CTRL, 0);
    assert_eq!(fake.log.take_effects(), vec![Call::DisableIrq(MSIX_IRQ)]);
    assert_eq!(fake.trigger(MSIX_IRQ, 0), None);
    // Re-enable: the unmasked vectors come back.
    w16(&mut dev, CTRL, ENABLE);
    assert_eq!(
        set_irqs(fake.log.take()),
        vec![(MSIX_IRQ, 0, vec![Some(vectors.fd(0)), Some(vectors.fd(1))])]
    );
}

#[test]
fn noresize_enables_the_whole_table_at_once() {
    let spec = NicSpec {
        msix_noresize: true,
        ..NicSpec::default()
    };
    let (mut dev, fake, vectors) = build(spec, 8, VfioOptions::default());
    w16(&mut dev, CTRL, ENABLE);
    program(&mut dev, 2);
    set_mask(&mut dev, 2, false);
    let mut expect = vec![None; 8];
    expect[2] = Some(vectors.fd(2));
    assert_eq!(set_irqs(fake.log.take()), vec![(MSIX_IRQ, 0, expect)]);
    program(&mut dev, 3);
    set_mask(&mut dev, 3, false);
    assert_eq!(
        set_irqs(fake.log.take()),
        vec![(MSIX_IRQ, 3, vec![Some(vectors.fd(3))])]
    );
}

#[test]
fn unprogrammed_vector_is_not_routed() {
    let (mut dev, fake, _) = nic();
    w16(&mut dev, CTRL, ENABLE);
    set_mask(&mut dev, 4, false);
    assert!(set_irqs(fake.log.take()).is_empty());
    // MSI-X disabled: table writes are kept, nothing reaches VFIO.
    w16(&mut dev, CTRL, 0);
    program(&mut dev, 5);
    set_mask(&mut dev, 5, false);
    assert!(set_irqs(fake.log.take()).is_empty());
}

#[test]
fn table_limited_to_the_vectors_given() {
    let (mut dev, fake, _) = build(NicSpec::default(), 4, VfioOptions::default());
    assert_eq!(r16(&mut dev, CTRL) & 0x7ff, 3);
    fake.log.take();
    // Entry 5 is past the emulated table: the device's (VFIO blocks its table).
    bar_r32(&mut dev, 0, TABLE + 0x50);
    assert_eq!(
        fake.log.take(),
        vec![Call::Read {
            index: 0,
            offset: TABLE + 0x50,
            len: 4
        }]
    );
    // The table page stays out of the direct areas.
    assert!(dev
        .direct_areas(0)
        .iter()
        .all(|a| a.offset + a.size <= TABLE));
}

#[test]
fn odd_table_accesses_are_harmless() {
    let (mut dev, fake, vectors) = nic();
    w16(&mut dev, CTRL, ENABLE);
    let mut b = [0u8; 2];
    dev.read_bar(0, TABLE + 2, &mut b);
    assert_eq!(b, [0xff; 2]);
    dev.write_bar(0, TABLE + 12, &[0]);
    dev.write_bar(0, TABLE + 13, &[0, 0, 0, 0]);
    bar_w32(&mut dev, 0, PBA, u32::MAX);
    assert_eq!(pba(&mut dev), 0);
    assert!(set_irqs(fake.log.take()).is_empty());
    assert!(vectors.take().is_empty());
}

#[test]
fn no_vectors_is_an_error() {
    let fake = FakeDevice::nic(NicSpec::default());
    let err = VfioPciDevice::new(fake, Vectors::new(0), VfioOptions::default()).unwrap_err();
    assert!(matches!(err, VfioError::NoVectors { need: 8 }));
    let fake = FakeDevice::nic(NicSpec::default());
    assert_eq!(crate::vfio::vectors_needed(fake.as_ref()).unwrap(), 8);
}
