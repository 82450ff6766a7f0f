//! Small legacy platform devices that only exist to let the guest stop the machine:
//! the ACPI hardware-reduced sleep/reset registers and the i8042 reset line.

use std::sync::Arc;

use crate::{BusDevice, GuestEvent, GuestEventSink};

/// ACPI (hardware-reduced) sleep control, sleep status and reset registers, one byte
/// each at offsets 0, 1 and 2 of a 3-port range.
pub struct AcpiPmDevice {
    sink: Arc<dyn GuestEventSink>,
    s5_slp_typ: u8,
    reset_value: u8,
}

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = 1;
const RESET: u64 = 2;
/// SLP_EN in the sleep control register (ACPI 6.x, 4.8.3.7).
const SLP_EN: u8 = 1 << 5;
/// WAK_STS in the sleep status register.
const WAK_STS: u8 = 1 << 7;

impl AcpiPmDevice {
    /// Reports power-off when the guest enters the sleep state whose SLP_TYP is
    /// `s5_slp_typ`, and reset when it writes `reset_value` to the reset register.
    pub fn new(sink: Arc<dyn GuestEventSink>, s5_slp_typ: u8, reset_value: u8) -> Self {
        Self {
            sink,
            s5_slp_typ,
            reset_value,
        }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == SLEEP_STATUS {
            if let Some(b) = data.first_mut() {
                *b = WAK_STS;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let slp_typ = (value >> 2) & 0x7;
                if slp_typ == self.s5_slp_typ {
                    self.sink.guest_event(GuestEvent::PowerOff);
                } else {
                    tracing::warn!("acpi: sleep type {slp_typ} not supported, ignored");
                }
            }
            RESET if value == self.reset_value => self.sink.guest_event(GuestEvent::Reset),
            _ => {}
        }
    }
}

/// The i8042 keyboard controller at ports 0x60-0x64, reduced to what an OS uses to
/// reset the machine: command 0xfe (pulse reset line) on the command port.
pub struct I8042Device {
    sink: Arc<dyn GuestEventSink>,
}

const I8042_COMMAND: u64 = 4;
const I8042_CMD_RESET: u8 = 0xfe;

impl I8042Device {
    pub fn new(sink: Arc<dyn GuestEventSink>) -> Self {
        Self { sink }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0 (no data, input buffer empty); the data port reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND && data.first() == Some(&I8042_CMD_RESET) {
            self.sink.guest_event(GuestEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Events(Mutex<Vec<GuestEvent>>);
    impl GuestEventSink for Events {
        fn guest_event(&self, event: GuestEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let ev = Arc::new(Events::default());
        let mut pm = AcpiPmDevice::new(ev.clone(), 5, 1);
        pm.write(SLEEP_CONTROL, &[(5 << 2) | SLP_EN]);
        pm.write(RESET, &[1]);
        assert_eq!(
            *ev.0.lock().unwrap(),
            vec![GuestEvent::PowerOff, GuestEvent::Reset]
        );
    }

    #[test]
    fn other_writes_are_ignored() {
        let ev = Arc::new(Events::default());
        let mut pm = AcpiPmDevice::new(ev.clone(), 5, 1);
        pm.write(SLEEP_CONTROL, &[5 << 2]); // no SLP_EN
        pm.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]); // S3: unsupported
        pm.write(RESET, &[2]);
        pm.write(9, &[1]);
        pm.write(RESET, &[]);
        let mut b = [0u8; 4];
        pm.read(SLEEP_STATUS, &mut b);
        assert_eq!(b, [WAK_STS, 0, 0, 0]);
        assert!(ev.0.lock().unwrap().is_empty());
    }

    #[test]
    fn i8042_reset_command() {
        let ev = Arc::new(Events::default());
        let mut kbd = I8042Device::new(ev.clone());
        kbd.write(0, &[I8042_CMD_RESET]); // data port
        kbd.write(I8042_COMMAND, &[0x20]);
        assert!(ev.0.lock().unwrap().is_empty());
        kbd.write(I8042_COMMAND, &[I8042_CMD_RESET]);
        assert_eq!(*ev.0.lock().unwrap(), vec![GuestEvent::Reset]);
    }
}
