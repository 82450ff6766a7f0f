//! Reset at start, quiesce and drop order (interrupts off before the reset, DMA
//! unmapped after it), nothing reaches the device after teardown.

use std::sync::{Arc, Mutex};

use super::fake::{Call, FakeDevice, FakeDma, Log, NicSpec, Vectors, MSIX_CAP};
use super::*;
use crate::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::vfio::{DmaMappings, CONFIG_REGION, MSIX_IRQ};

#[test]
fn reset_at_start_before_reading_config() {
    let log = Log::default();
    let fake = FakeDevice::nic_with_log(NicSpec::default(), log.clone());
    let _dev = VfioPciDevice::new(fake, Vectors::new(8), VfioOptions::default()).unwrap();
    let calls = log.take();
    assert_eq!(calls.first(), Some(&Call::Reset));
    assert_eq!(calls.iter().filter(|c| **c == Call::Reset).count(), 1);

    let spec = NicSpec {
        has_reset: false,
        ..NicSpec::default()
    };
    let fake = FakeDevice::nic_with_log(spec, log.clone());
    let _dev = VfioPciDevice::new(fake, Vectors::new(8), VfioOptions::default()).unwrap();
    assert!(!log.take().contains(&Call::Reset));
}

/// A model with MSI-X enabled and vector 0 routed, DMA attached.
fn running(log: &Log) -> (VfioPciDevice, Arc<FakeDevice>, Arc<Mutex<DmaMappings>>) {
    let fake = FakeDevice::nic_with_log(NicSpec::default(), log.clone());
    let vectors = Vectors::new(8);
    let dma = Arc::new(Mutex::new(DmaMappings::new(Arc::new(FakeDma {
        log: log.clone(),
        fail_iova: None,
    }))));
    dma.lock()
        .unwrap()
        .map_all(&[(0, 0x10_0000, 0x1000_0000)])
        .unwrap();
    let mut dev = VfioPciDevice::new(fake.clone(), vectors, VfioOptions::default())
        .unwrap()
        .with_dma(dma.clone());
    w16(&mut dev, COMMAND, COMMAND_MEMORY | COMMAND_BUS_MASTER);
    w16(&mut dev, MSIX_CAP + 2, 0x8000);
    bar_w32(&mut dev, 0, 0x2000, 0xfee0_0000);
    bar_w32(&mut dev, 0, 0x200c, 0);
    assert!(fake.trigger(MSIX_IRQ, 0).is_some());
    log.take();
    (dev, fake, dma)
}

/// The teardown calls: interrupts off, DMA/decoding stopped, reset, DMA unmapped.
fn assert_teardown(calls: Vec<Call>, fake: &FakeDevice) {
    let effects: Vec<&Call> = calls
        .iter()
        .filter(|c| !matches!(c, Call::Read { index, .. } if *index == CONFIG_REGION))
        .collect();
    assert_eq!(
        effects,
        vec![
            &Call::DisableIrq(MSIX_IRQ),
            &Call::Write {
                index: CONFIG_REGION,
                offset: u64::from(COMMAND),
                data: 0x0100u16.to_le_bytes().to_vec()
            },
            &Call::Reset,
            &Call::DmaUnmap {
                iova: 0,
                size: 0x10_0000
            },
        ]
    );
    assert_eq!(fake.trigger(MSIX_IRQ, 0), None);
}

#[test]
fn quiesce_order_and_silence_after() {
    let log = Log::default();
    let (mut dev, fake, dma) = running(&log);
    dev.quiesce();
    assert_teardown(log.take(), &fake);
    assert!(dma.lock().unwrap().is_empty());
    // Accesses after quiesce are ignored: nothing reaches the device.
    assert_eq!(r32(&mut dev, 0), u32::MAX);
    assert!(w16(&mut dev, COMMAND, COMMAND_MEMORY).is_empty());
    assert_eq!(bar_r32(&mut dev, 0, 0x10), u32::MAX);
    bar_w32(&mut dev, 2, 0, 1);
    dev.quiesce();
    drop(dev);
    assert!(log.take().is_empty(), "teardown runs once");
}

#[test]
fn drop_tears_down_in_order() {
    let log = Log::default();
    let (dev, fake, _dma) = running(&log);
    drop(dev);
    assert_teardown(log.take(), &fake);
}
