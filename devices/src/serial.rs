//! 16550 UART on the port-I/O bus, built on vm-superio's register model.
//!
//! Output goes to any `Write` sink. Input is queued by the I/O thread with
//! [`SerialDevice::enqueue_input`]; when the guest has drained the receive FIFO the
//! device signals `input_ready` so the I/O thread can feed the next bytes (nothing is
//! dropped when the guest reads slower than the host types).

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};

use crate::{BusDevice, InterruptLine};

/// vm-superio trigger adapter over the crate's [`InterruptLine`].
pub struct IrqTrigger(pub Arc<dyn InterruptLine>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// Tells the I/O thread that the guest emptied the receive FIFO.
struct InputDrained(Option<Arc<dyn InterruptLine>>);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(line) = &self.0 {
            if let Err(e) = line.trigger() {
                tracing::warn!("serial: cannot signal drained input: {e}");
            }
        }
    }
}

/// A 16550 UART occupying 8 ports.
pub struct SerialDevice<W: Write + Send> {
    uart: Serial<IrqTrigger, InputDrained, W>,
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART raising `irq` and writing guest output to `out`. `input_ready` (optional)
    /// is triggered whenever the guest drained the receive FIFO.
    pub fn new(
        irq: Arc<dyn InterruptLine>,
        out: W,
        input_ready: Option<Arc<dyn InterruptLine>>,
    ) -> Self {
        Self {
            uart: Serial::with_events(IrqTrigger(irq), InputDrained(input_ready), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO (the
    /// caller keeps the rest until `input_ready` fires).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = room.min(bytes.len());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The output sink (to flush it before the VMM exits).
    pub fn writer_mut(&mut self) -> &mut W {
        self.uart.writer_mut()
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are one byte wide; wider accesses read the first register and
        // pad with zeroes, as the 16550's 8-bit data bus would.
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(off, value) {
            tracing::warn!("serial: write to register {off} failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Counter(AtomicUsize);
    impl InterruptLine for Counter {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn guest_output_reaches_the_sink() {
        let sink = Sink::default();
        let mut dev = SerialDevice::new(Arc::new(Counter::default()), sink.clone(), None);
        for b in b"hello" {
            dev.write(THR, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hello");
    }

    #[test]
    fn host_input_raises_irq_and_signals_drain() {
        let irq = Arc::new(Counter::default());
        let drained = Arc::new(Counter::default());
        let mut dev = SerialDevice::new(irq.clone(), Sink::default(), Some(drained.clone()));
        dev.write(IER, &[0x1]); // receive-data-available interrupt
        let big = vec![b'x'; 100];
        let n = dev.enqueue_input(&big);
        assert!(n > 0 && n < big.len(), "FIFO takes only what fits: {n}");
        assert!(irq.0.load(Ordering::SeqCst) > 0);
        let mut b = [0u8; 1];
        for _ in 0..n {
            dev.read(THR, &mut b);
            assert_eq!(b[0], b'x');
        }
        assert_eq!(drained.0.load(Ordering::SeqCst), 1);
        // Data-ready bit clear once drained.
        dev.read(LSR, &mut b);
        assert_eq!(b[0] & 1, 0);
    }

    #[test]
    fn odd_offsets_and_widths_do_not_panic() {
        let mut dev = SerialDevice::new(Arc::new(Counter::default()), Sink::default(), None);
        let mut wide = [0u8; 4];
        dev.read(7, &mut wide);
        dev.read(300, &mut wide);
        dev.write(300, &[1, 2]);
        dev.write(2, &[]);
        dev.read(0, &mut []);
    }
}
