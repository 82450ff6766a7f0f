//! Where the agent's protocol lines go. Normally stdout, i.e. /dev/console: a tty,
//! whose output needs the UART's transmit interrupt. With `ferrio.console=kmsg` on the
//! kernel command line they go through the kernel log instead (printk writes the
//! serial port by polling), which works even when the VMM delivers no serial IRQs.

use std::fs::File;
use std::io::{self, Write};

/// Writes each line as one kernel log record at KERN_CRIT (shown at any loglevel≥3).
pub struct KmsgWriter {
    file: File,
    pending: Vec<u8>,
}

impl KmsgWriter {
    /// Opens /dev/kmsg and disables its write rate limit (10 lines per 5 s by default).
    pub fn open() -> io::Result<KmsgWriter> {
        let _ = std::fs::write("/proc/sys/kernel/printk_devkmsg", "on\n");
        let file = File::options().write(true).open("/dev/kmsg")?;
        Ok(KmsgWriter {
            file,
            pending: Vec::new(),
        })
    }
}

impl Write for KmsgWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let mut record = b"<2>".to_vec();
            record.extend_from_slice(&self.pending[..end]);
            self.pending.drain(..=end);
            // One write() is one record; errors are ignored (nothing better to do).
            let _ = self.file.write(&record);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.pending.push(b'\n');
            self.write(&[])?;
        }
        Ok(())
    }
}

/// The console for protocol lines: kmsg when asked for (and available), else stdout.
pub fn open(use_kmsg: bool) -> Box<dyn Write> {
    if use_kmsg {
        if let Ok(k) = KmsgWriter::open() {
            return Box::new(k);
        }
    }
    Box::new(io::stdout())
}
