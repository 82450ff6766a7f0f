//! Tests of virtio-console: helpers shared by the queue, device and worker tests.

mod device;
mod iommu;
mod queue;
mod worker;

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

pub(super) use crate::virtio::testing::{
    activation, get, memory, put, ro, wait_for, wo, Driver, Mem, TestInterrupt, MEM_SIZE,
};

/// A sink shared between the device and the test.
#[derive(Clone, Default)]
pub(super) struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
