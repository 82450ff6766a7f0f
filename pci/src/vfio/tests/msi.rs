//! MSI (a device without MSI-X): the emulated capability and its VFIO routing.

use super::fake::{Call, NicSpec, VecCall, MSI_CAP};
use super::*;
use crate::vfio::MSI_IRQ;
use crate::MsiMessage;

const CTRL: u16 = MSI_CAP + 2;
const ADDR: u16 = MSI_CAP + 4;
const ADDR_HI: u16 = MSI_CAP + 8;
const DATA: u16 = MSI_CAP + 12;
const MASK: u16 = MSI_CAP + 16;
const PENDING: u16 = MSI_CAP + 20;

fn msi_nic() -> (
    VfioPciDevice,
    std::sync::Arc<fake::FakeDevice>,
    std::sync::Arc<fake::Vectors>,
) {
    build(
        NicSpec {
            msi: true,
            ..NicSpec::default()
        },
        4,
        VfioOptions::default(),
    )
}

#[test]
fn capability_layout() {
    let (mut dev, fake, _) = msi_nic();
    // 64-bit, per-vector masking, 4 vectors capable (MMC = 2), disabled.
    assert_eq!(r32(&mut dev, MSI_CAP), 0x0184_7005);
    w16(&mut dev, CTRL, 0xffff);
    // Enable and MME writable; MME above MMC is clamped when used.
    assert_eq!(r16(&mut dev, CTRL), 0x01f5);
    w16(&mut dev, CTRL, 0);
    w32(&mut dev, MASK, u32::MAX);
    assert_eq!(r32(&mut dev, MASK), 0xf);
    w32(&mut dev, PENDING, u32::MAX);
    assert_eq!(r32(&mut dev, PENDING), 0);
    assert!(!fake
        .log
        .take_effects()
        .iter()
        .any(|c| matches!(c, Call::Write { .. })));
    assert_eq!(crate::vfio::vectors_needed(fake.as_ref()).unwrap(), 4);
}

#[test]
fn enable_routes_the_block_and_masks_capture() {
    let (mut dev, fake, vectors) = msi_nic();
    w32(&mut dev, ADDR, 0xfee0_1000);
    w32(&mut dev, ADDR_HI, 0);
    w16(&mut dev, DATA, 0x50);
    assert!(fake.log.take_effects().is_empty());
    // Two vectors (MME = 1), enabled.
    w16(&mut dev, CTRL, 0x0011);
    let effects = fake.log.take_effects();
    assert_eq!(
        effects,
        vec![Call::SetIrqs {
            index: MSI_IRQ,
            start: 0,
            fds: vec![Some(vectors.fd(0)), Some(vectors.fd(1))]
        }]
    );
    let m = |v: u32| MsiMessage {
        address: 0xfee0_1000,
        data: 0x50 | v,
    };
    assert_eq!(
        vectors.take(),
        vec![
            VecCall::Set(0, m(0)),
            VecCall::Set(1, m(1)),
            VecCall::Commit
        ]
    );
    // Mask vector 1: its interrupts are captured and show in the pending bits.
    w32(&mut dev, MASK, 0b10);
    let calls = fake.log.take_effects();
    assert!(
        matches!(&calls[..], [Call::SetIrqs { index: MSI_IRQ, start: 1, fds }] if fds[0] != Some(vectors.fd(1)))
    );
    assert!(fake.raise(MSI_IRQ, 1));
    assert_eq!(r32(&mut dev, PENDING), 0b10);
    // Unmask: delivered, pending cleared, routed to the guest again.
    w32(&mut dev, MASK, 0);
    assert_eq!(vectors.take(), vec![VecCall::Fire(1)]);
    assert_eq!(r32(&mut dev, PENDING), 0);
    assert_eq!(fake.trigger(MSI_IRQ, 1), Some(vectors.fd(1)));
    fake.log.take();
    // A new message while enabled updates the routes, not VFIO.
    w16(&mut dev, DATA, 0x60);
    assert_eq!(
        vectors.take(),
        vec![
            VecCall::Set(
                0,
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x60
                }
            ),
            VecCall::Set(
                1,
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x61
                }
            ),
            VecCall::Commit
        ]
    );
    assert!(fake.log.take_effects().is_empty());
    // A different vector count: VFIO's block is rebuilt.
    w16(&mut dev, CTRL, 0x0021);
    let effects = fake.log.take_effects();
    assert_eq!(effects.first(), Some(&Call::DisableIrq(MSI_IRQ)));
    assert!(
        matches!(&effects[1], Call::SetIrqs { index: MSI_IRQ, start: 0, fds } if fds.len() == 4)
    );
    // Disable.
    w16(&mut dev, CTRL, 0);
    assert_eq!(fake.log.take_effects(), vec![Call::DisableIrq(MSI_IRQ)]);
}
