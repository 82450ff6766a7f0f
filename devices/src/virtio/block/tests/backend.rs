//! `FileBackend` on its own: vectored transfers (also beyond IOV_MAX), end of file,
//! read-only images and the zero-fill fallback.

use super::{pattern, TempImage};
use crate::virtio::block::backend::{BlockBackend, IoBuf, IoBufMut};

const SIZE: usize = 64 * 1024;

fn original() -> Vec<u8> {
    (0..SIZE).map(pattern).collect()
}

#[test]
fn vectored_round_trip() {
    let image = TempImage::new(SIZE);
    let backend = image.open(false);
    assert_eq!(backend.size(), SIZE as u64);
    let (a, b, c) = (vec![1u8; 100], vec![2u8; 0], vec![3u8; 4000]);
    let bufs = [
        IoBuf::from(&a[..]),
        IoBuf::from(&b[..]),
        IoBuf::from(&c[..]),
    ];
    assert_eq!(backend.write_vectored(1000, &bufs).unwrap(), 4100);
    let mut want = original();
    want[1000..1100].fill(1);
    want[1100..5100].fill(3);
    assert!(image.contents() == want);

    let (mut x, mut y) = (vec![0u8; 3000], vec![0u8; 2000]);
    let mut bufs = [IoBufMut::from(&mut x[..]), IoBufMut::from(&mut y[..])];
    assert_eq!(backend.read_vectored(500, &mut bufs).unwrap(), 5000);
    assert_eq!(x, want[500..3500]);
    assert_eq!(y, want[3500..5500]);
}

#[test]
fn more_buffers_than_iov_max() {
    let image = TempImage::new(SIZE);
    let backend = image.open(false);
    let data: Vec<u8> = (0..3 * 2000).map(|i| (i % 7) as u8).collect();
    let bufs: Vec<IoBuf> = data.chunks(3).map(IoBuf::from).collect();
    assert_eq!(backend.write_vectored(4096, &bufs).unwrap(), data.len());
    let mut back = vec![0u8; data.len()];
    let mut bufs: Vec<IoBufMut> = back.chunks_mut(3).map(IoBufMut::from).collect();
    assert_eq!(backend.read_vectored(4096, &mut bufs).unwrap(), data.len());
    assert_eq!(back, data);
}

#[test]
fn reads_stop_at_end_of_file() {
    let image = TempImage::new(SIZE);
    let backend = image.open(true);
    let mut buf = vec![0u8; 1000];
    let n = backend
        .read_vectored(SIZE as u64 - 100, &mut [IoBufMut::from(&mut buf[..])])
        .unwrap();
    assert_eq!(n, 100);
    assert_eq!(buf[..100], original()[SIZE - 100..]);
}

#[test]
fn read_only_images_refuse_writes() {
    let image = TempImage::new(SIZE);
    let backend = image.open(true);
    let data = [9u8; 512];
    backend
        .write_vectored(0, &[IoBuf::from(&data[..])])
        .unwrap_err();
    backend.write_zeroes(0, 512, false).unwrap_err();
    backend.discard(0, 4096).unwrap_err();
    assert!(image.contents() == original());
}

#[test]
fn zero_fill_fallback_zeroes() {
    let image = TempImage::new(SIZE);
    let backend = image.open(false);
    backend.zero_fill(1000, 60_000).unwrap();
    let mut want = original();
    want[1000..61_000].fill(0);
    assert!(image.contents() == want);
}
