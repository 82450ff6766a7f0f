//! The `VirtioDevice` surface: features, configuration space, activation errors.

use std::sync::Arc;

use super::{activation, memory, Driver, Mem, SharedBuf, TestInterrupt};
use crate::virtio::console::{
    VirtioConsole, VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE,
};
use crate::virtio::features::{VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1};
use crate::virtio::{device_type, ActivateError, VirtioDevice};

fn dev(d: &mut VirtioConsole) -> &mut dyn VirtioDevice<Mem> {
    d
}

fn console() -> (VirtioConsole, SharedBuf) {
    let sink = SharedBuf::default();
    (VirtioConsole::new(Box::new(sink.clone()), None), sink)
}

fn config(d: &mut VirtioConsole, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0xAA; len];
    dev(d).read_config(offset, &mut data);
    data
}

#[test]
fn identity_and_features() {
    let (mut c, _) = console();
    let d = dev(&mut c);
    assert_eq!(d.device_type(), device_type::CONSOLE);
    assert_eq!(d.queue_max_sizes(), &[256, 256]);
    assert_eq!(
        d.device_features(),
        VIRTIO_F_EVENT_IDX | VIRTIO_CONSOLE_F_EMERG_WRITE
    );
    let mut sized = console().0.with_size(80, 25);
    let features = dev(&mut sized).device_features();
    assert_ne!(features & VIRTIO_CONSOLE_F_SIZE, 0);
    assert_eq!(features & VIRTIO_CONSOLE_F_MULTIPORT, 0);
    // Acked bits outside the offer are dropped.
    dev(&mut sized).set_acked_features(u64::MAX);
    assert_eq!(
        sized.acked_features,
        VIRTIO_F_EVENT_IDX | VIRTIO_CONSOLE_F_EMERG_WRITE | VIRTIO_CONSOLE_F_SIZE
    );
    assert_eq!(sized.acked_features & VIRTIO_F_VERSION_1, 0);
}

#[test]
fn config_space_layout() {
    let mut c = console().0.with_size(132, 43);
    let all = config(&mut c, 0, 12);
    assert_eq!(all, [132, 0, 43, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(config(&mut c, 2, 2), [43, 0]);
    assert_eq!(config(&mut c, 4, 4), [1, 0, 0, 0]);
    // Past the end and straddling it read as zeros.
    assert_eq!(config(&mut c, 10, 4), [0; 4]);
    assert_eq!(config(&mut c, 64, 4), [0; 4]);
    assert_eq!(config(&mut c, u64::MAX, 2), [0; 2]);
    // Without the size feature cols/rows are 0.
    let (mut plain, _) = console();
    assert_eq!(config(&mut plain, 0, 4), [0; 4]);
}

#[test]
fn emerg_wr_outputs_one_character() {
    let (mut c, sink) = console();
    dev(&mut c).write_config(8, &u32::from(b'!').to_le_bytes());
    dev(&mut c).write_config(8, b"?");
    // Not emerg_wr: ignored.
    dev(&mut c).write_config(0, &[1, 2, 3, 4]);
    dev(&mut c).write_config(9, b"x");
    dev(&mut c).write_config(8, &[]);
    assert_eq!(sink.contents(), b"!?");
    assert_eq!(config(&mut c, 0, 12)[8..], [0; 4]);
}

#[test]
fn activation_errors_leave_the_device_usable() {
    let mem = memory();
    let rx = Driver::new(&mem, 0, 16);
    let tx = Driver::new(&mem, 0x8000, 16);
    let irq = Arc::new(TestInterrupt::default());
    let (mut c, _) = console();

    let err = dev(&mut c)
        .activate(activation(&mem, &[(0, &rx)], &irq).0)
        .unwrap_err();
    assert!(matches!(err, ActivateError::MissingQueue(1)), "{err}");
    let err = dev(&mut c)
        .activate(activation(&mem, &[(1, &tx)], &irq).0)
        .unwrap_err();
    assert!(matches!(err, ActivateError::MissingQueue(0)), "{err}");
    let err = dev(&mut c)
        .activate(activation(&mem, &[(0, &rx), (1, &tx), (2, &tx)], &irq).0)
        .unwrap_err();
    assert!(matches!(err, ActivateError::Invalid(_)), "{err}");
    assert!(!c.is_active());

    dev(&mut c)
        .activate(activation(&mem, &[(0, &rx), (1, &tx)], &irq).0)
        .unwrap();
    assert!(c.is_active());
    let err = dev(&mut c)
        .activate(activation(&mem, &[(0, &rx), (1, &tx)], &irq).0)
        .unwrap_err();
    assert!(matches!(err, ActivateError::Invalid(_)), "{err}");
    dev(&mut c).reset();
    assert!(!c.is_active());
    // Reset twice is harmless.
    dev(&mut c).reset();
}

#[test]
fn resize_signals_a_config_change_when_negotiated() {
    let mem = memory();
    let rx = Driver::new(&mem, 0, 16);
    let tx = Driver::new(&mem, 0x8000, 16);
    let irq = Arc::new(TestInterrupt::default());
    let mut c = console().0.with_size(80, 25);
    c.set_size(100, 30); // inactive: no interrupt
    assert_eq!(config(&mut c, 0, 4), [100, 0, 30, 0]);

    dev(&mut c).set_acked_features(VIRTIO_CONSOLE_F_SIZE);
    dev(&mut c)
        .activate(activation(&mem, &[(0, &rx), (1, &tx)], &irq).0)
        .unwrap();
    c.set_size(120, 40);
    assert_eq!(config(&mut c, 0, 4), [120, 0, 40, 0]);
    assert_eq!(irq.config.load(std::sync::atomic::Ordering::SeqCst), 1);
    dev(&mut c).reset();

    // Not negotiated: the size changes, no interrupt.
    dev(&mut c)
        .activate(activation(&mem, &[(0, &rx), (1, &tx)], &irq).0)
        .unwrap();
    c.set_size(90, 20);
    assert_eq!(irq.config.load(std::sync::atomic::Ordering::SeqCst), 1);
    // A console built without a size ignores resizes.
    let (mut plain, _) = console();
    plain.set_size(1, 1);
    assert_eq!(config(&mut plain, 0, 4), [0; 4]);
}
