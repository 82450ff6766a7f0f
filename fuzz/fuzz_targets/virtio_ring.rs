#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferrio_fuzz::virtio_ring(data));
