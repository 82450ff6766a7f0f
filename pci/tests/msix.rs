//! MSI-X semantics (PCI 3.0 6.8.2) through the config space and BAR accesses.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{Call, RecordingVectors, TestDevice, PBA_OFFSET};
use ferrio_pci::capability::CAP_ID_MSIX;
use ferrio_pci::config::{ConfigSpace, PciIds};
use ferrio_pci::msix::{Msix, MsixConfig, MsixError, CTRL_ENABLE, CTRL_FUNCTION_MASK};
use ferrio_pci::{BarInfo, BarKind, MsiMessage, PciDevice};

fn device(n: u16) -> (Arc<RecordingVectors>, TestDevice) {
    let v = RecordingVectors::new(n);
    let d = TestDevice::new(v.clone(), n);
    (v, d)
}

fn ctrl(d: &mut TestDevice, value: u16) {
    let cap = u16::from(d.msix.cap_offset());
    d.write_config(cap + 2, &value.to_le_bytes());
}

fn tw(d: &mut TestDevice, offset: u64, value: u32) {
    d.write_bar(0, offset, &value.to_le_bytes());
}

fn tr(d: &mut TestDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read_bar(0, offset, &mut b);
    u32::from_le_bytes(b)
}

fn pba(d: &mut TestDevice, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    d.read_bar(0, u64::from(PBA_OFFSET) + offset, &mut b);
    u64::from_le_bytes(b)
}

/// Programs entry `v` (masked) with a recognisable message.
fn program(d: &mut TestDevice, v: u16) -> MsiMessage {
    let base = u64::from(v) * 16;
    let msg = MsiMessage {
        address: 0xfee0_0000 | u64::from(v) << 12,
        data: 0x4000 | u32::from(v),
    };
    tw(d, base, msg.address as u32);
    tw(d, base + 4, 0);
    tw(d, base + 8, msg.data);
    msg
}

#[test]
fn capability_registers_through_config_space() {
    let (_, mut d) = device(8);
    let cap = d.cfg.find_capability(CAP_ID_MSIX).expect("msix cap");
    assert_eq!(cap, d.msix.cap_offset());
    let cap = u16::from(cap);
    assert_eq!(d.cfg.read_u16(cap + 2), 7);
    d.write_config(cap + 2, &0xffffu16.to_le_bytes());
    assert_eq!(d.cfg.read_u16(cap + 2), 0xc007);
    d.write_config(cap + 4, &[0xff; 4]);
    d.write_config(cap + 8, &[0xff; 4]);
    assert_eq!(d.cfg.read_u32(cap + 4), 0);
    assert_eq!(d.cfg.read_u32(cap + 8), PBA_OFFSET);
    // Byte write of the upper control byte only.
    d.write_config(cap + 3, &[0x00]);
    assert!(!d.msix.trigger_handle().is_enabled());
}

#[test]
fn reset_state_masks_everything_and_sets_pending() {
    let (v, mut d) = device(8);
    for e in 0..8 {
        assert_eq!(tr(&mut d, e * 16 + 12), 1, "entry {e} masked at reset");
        assert_eq!(tr(&mut d, e * 16), 0);
    }
    d.msix.trigger(3);
    assert_eq!(pba(&mut d, 0), 1 << 3);
    // Enabling MSI-X alone does not deliver a masked vector.
    ctrl(&mut d, CTRL_ENABLE);
    assert!(v.take().is_empty());
    assert!(d.msix.trigger_handle().is_pending(3));
}

#[test]
fn linux_enable_sequence() {
    let (v, mut d) = device(8);
    let h = d.msix.trigger_handle();
    // msix_capability_init: enable with the function masked, program, then unmask.
    ctrl(&mut d, CTRL_ENABLE | CTRL_FUNCTION_MASK);
    let m0 = program(&mut d, 0);
    let m1 = program(&mut d, 1);
    assert!(v.take().is_empty(), "masked entries do not touch routes");
    tw(&mut d, 12, 0);
    assert_eq!(v.take(), vec![Call::Set(0, m0), Call::Commit]);
    h.trigger(0);
    assert!(v.take().is_empty(), "function masked");
    assert_eq!(pba(&mut d, 0), 1);
    ctrl(&mut d, CTRL_ENABLE);
    assert_eq!(v.take(), vec![Call::Fire(0)]);
    assert_eq!(pba(&mut d, 0), 0);
    h.trigger(0);
    h.trigger(1);
    assert_eq!(v.take(), vec![Call::Fire(0)]);
    assert_eq!(pba(&mut d, 0), 0b10);
    tw(&mut d, 16 + 12, 0);
    assert_eq!(
        v.take(),
        vec![Call::Set(1, m1), Call::Commit, Call::Fire(1)]
    );
    assert_eq!(pba(&mut d, 0), 0);
    assert!(h.is_active() && !h.is_masked(1));
}

#[test]
fn rewriting_an_unmasked_entry() {
    let (v, mut d) = device(4);
    ctrl(&mut d, CTRL_ENABLE);
    let m = program(&mut d, 2);
    tw(&mut d, 2 * 16 + 12, 0);
    assert_eq!(v.take(), vec![Call::Set(2, m), Call::Commit]);
    // Same value: nothing. New data: one route update.
    tw(&mut d, 2 * 16 + 8, m.data);
    assert!(v.take().is_empty());
    tw(&mut d, 2 * 16 + 8, 0x99);
    let m2 = MsiMessage { data: 0x99, ..m };
    assert_eq!(v.take(), vec![Call::Set(2, m2), Call::Commit]);
    // A 64-bit address write is one update; address bits 1:0 read as 0.
    d.write_bar(0, 2 * 16, &0x1_fee0_1003u64.to_le_bytes());
    let m3 = MsiMessage {
        address: 0x1_fee0_1000,
        data: 0x99,
    };
    assert_eq!(v.take(), vec![Call::Set(2, m3), Call::Commit]);
    let mut q = [0u8; 8];
    d.read_bar(0, 2 * 16, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
    // Masking: no route call; reserved control bits read 0.
    tw(&mut d, 2 * 16 + 12, 0xffff_ffff);
    assert!(v.take().is_empty());
    assert_eq!(tr(&mut d, 2 * 16 + 12), 1);
    // Data + control in one qword: one update, then the unmask.
    d.msix.trigger(2);
    let qword = 0x77u64; // data 0x77, vector control 0 (unmasked)
    d.write_bar(0, 2 * 16 + 8, &qword.to_le_bytes());
    let m4 = MsiMessage { data: 0x77, ..m3 };
    assert_eq!(
        v.take(),
        vec![Call::Set(2, m4), Call::Commit, Call::Fire(2)]
    );
    assert_eq!(d.msix.entry(2), Some((m4, false)));
}

#[test]
fn disable_and_function_mask_hold_interrupts() {
    let (v, mut d) = device(4);
    program(&mut d, 0);
    tw(&mut d, 12, 0);
    v.take();
    // Unmasked entry, MSI-X disabled: pending.
    d.msix.trigger(0);
    d.msix.trigger(0);
    assert!(v.take().is_empty());
    ctrl(&mut d, CTRL_ENABLE);
    assert_eq!(v.take(), vec![Call::Fire(0)], "pending collapses to one");
    ctrl(&mut d, CTRL_ENABLE | CTRL_FUNCTION_MASK);
    d.msix.trigger(0);
    assert!(v.take().is_empty());
    // Disabling keeps the pending bit; re-enabling with the function mask still set
    // does not deliver.
    ctrl(&mut d, CTRL_FUNCTION_MASK);
    ctrl(&mut d, CTRL_ENABLE | CTRL_FUNCTION_MASK);
    assert!(v.take().is_empty());
    ctrl(&mut d, CTRL_ENABLE);
    assert_eq!(v.take(), vec![Call::Fire(0)]);
    // Masking the vector again holds it.
    tw(&mut d, 12, 1);
    d.msix.trigger(0);
    assert!(v.take().is_empty());
    assert_eq!(pba(&mut d, 0), 1);
}

#[test]
fn out_of_range_and_odd_accesses() {
    let (v, mut d) = device(70);
    let h = d.msix.trigger_handle();
    h.trigger(70);
    h.trigger(0xffff);
    assert!(v.take().is_empty());
    h.trigger(69);
    h.trigger(33);
    assert_eq!(pba(&mut d, 8), 1 << 5);
    let mut hi = [0u8; 4];
    d.read_bar(0, u64::from(PBA_OFFSET) + 4, &mut hi);
    assert_eq!(u32::from_le_bytes(hi), 1 << 1);
    // PBA writes are ignored.
    d.write_bar(0, u64::from(PBA_OFFSET), &[0; 8]);
    assert_eq!(pba(&mut d, 0), 1 << 33);
    // Unsupported widths / misaligned: all-ones, writes ignored.
    for (off, len) in [
        (0u64, 1usize),
        (0, 2),
        (2, 4),
        (4, 8),
        (0, 3),
        (0, 16),
        (0, 0),
    ] {
        let mut b = vec![0u8; len];
        d.read_bar(0, off, &mut b);
        assert!(b.iter().all(|&x| x == 0xff), "read {off}+{len}");
        d.write_bar(0, off, &vec![0x55; len]);
    }
    assert_eq!(tr(&mut d, 0), 0);
    d.write_bar(0, 12, &[0]);
    assert_eq!(tr(&mut d, 12), 1);
    // Past the table (70 entries = 0x460 bytes): not MSI-X.
    let mut b = [0xaa; 4];
    d.read_bar(0, 0x460, &mut b);
    assert_eq!(b, [0; 4]);
    assert!(!d.msix.read_bar(0, 0x460, &mut b));
    assert!(!d.msix.read_bar(2, 0, &mut b));
    assert!(d.msix.read_bar(0, u64::from(PBA_OFFSET) + 8, &mut b));
    assert!(!d.msix.read_bar(0, u64::from(PBA_OFFSET) + 16, &mut b));
    // Direct structure accessors past the end.
    d.msix.table_read(70 * 16, &mut b);
    assert_eq!(b, [0xff; 4]);
    d.msix.pba_read(16, &mut b);
    assert_eq!(b, [0xff; 4]);
    d.msix.table_write(u64::MAX - 3, &[0; 4]);
    assert!(v.take().is_empty());
}

#[test]
fn reset_returns_to_power_on_state() {
    let (v, mut d) = device(4);
    ctrl(&mut d, CTRL_ENABLE | CTRL_FUNCTION_MASK);
    program(&mut d, 1);
    tw(&mut d, 16 + 12, 0);
    d.msix.trigger(1);
    let mut cfg = d.cfg.clone();
    d.msix.reset(&mut cfg);
    d.cfg = cfg;
    let cap = u16::from(d.msix.cap_offset());
    assert_eq!(d.cfg.read_u16(cap + 2), 3);
    assert_eq!(d.msix.entry(1), Some((MsiMessage::default(), true)));
    assert_eq!(pba(&mut d, 0), 0);
    v.take();
    d.msix.trigger(1);
    assert!(v.take().is_empty());
}

/// A worker triggers while a vCPU toggles the mask: a trigger that lands while masked
/// is never lost (it is delivered on unmask or by the trigger's own re-check).
#[test]
fn concurrent_trigger_and_unmask_lose_nothing() {
    let (v, mut d) = device(2);
    ctrl(&mut d, CTRL_ENABLE);
    program(&mut d, 0);
    let h = d.msix.trigger_handle();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                h.trigger(0);
                n += 1;
            }
            n
        })
    };
    for i in 0..20_000 {
        tw(&mut d, 12, i & 1);
        if i % 1000 == 0 {
            v.take();
        }
    }
    tw(&mut d, 12, 0);
    stop.store(true, Ordering::SeqCst);
    let n = worker.join().unwrap();
    assert!(n > 0);
    let h = d.msix.trigger_handle();
    assert!(!h.is_masked(0));
    assert!(
        !h.is_pending(0),
        "a trigger was left pending on an unmasked vector"
    );
}

fn build(c: MsixConfig, have: u16) -> Result<(ConfigSpace, Msix), MsixError> {
    let mut cfg = ConfigSpace::new(&PciIds::default());
    cfg.add_bar(BarInfo {
        index: 0,
        kind: BarKind::Mmio32,
        size: 0x2000,
    })
    .unwrap();
    let msix = Msix::new(&mut cfg, c, RecordingVectors::new(have))?;
    Ok((cfg, msix))
}

#[test]
fn creation_checks_and_layout() {
    let c = |vectors, table_bar, table_offset, pba_offset| MsixConfig {
        vectors,
        table_bar,
        table_offset,
        pba_bar: 0,
        pba_offset,
    };
    let err = |c, have| build(c, have).err();
    assert_eq!(
        err(c(0, 0, 0, 0x1000), 1),
        Some(MsixError::InvalidVectorCount(0))
    );
    assert_eq!(
        err(c(2049, 0, 0, 0x1000), 4096),
        Some(MsixError::InvalidVectorCount(2049))
    );
    assert_eq!(
        err(c(4, 0, 0, 0x1000), 2),
        Some(MsixError::NotEnoughVectors { have: 2, need: 4 })
    );
    assert_eq!(err(c(4, 0, 4, 0x1000), 4), Some(MsixError::Misaligned(4)));
    assert_eq!(err(c(4, 1, 0, 0x1000), 4), Some(MsixError::OutsideBar(1)));
    assert_eq!(
        err(c(2, 0, 0x1ff0, 0x1000), 4),
        Some(MsixError::OutsideBar(0))
    );
    assert_eq!(err(c(4, 0, 0, 0x38), 4), Some(MsixError::Overlap));
    let (cfg, msix) = build(c(65, 0, 0x800, 0x1000), 65).expect("valid");
    let cap = u16::from(msix.cap_offset());
    assert_eq!(cfg.find_capability(CAP_ID_MSIX), Some(msix.cap_offset()));
    assert_eq!(cfg.read_u16(cap + 2), 64);
    assert_eq!(cfg.read_u32(cap + 4), 0x800);
    assert_eq!(cfg.read_u32(cap + 8), 0x1000);
    assert_eq!(msix.config().pba_size(), 16);
    assert_eq!(msix.config().table_size(), 65 * 16);
    assert_eq!(msix.entry(64), Some((MsiMessage::default(), true)));
    assert_eq!(msix.entry(65), None);
}
