//! Zeroing primitives that report "not supported" instead of falling back,
//! so a caller (the NBD export's FAST_ZERO) can tell a cheap zero from a slow one.

use crate::{Disk, DiskError};
use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use std::ops::Range;

/// Deallocate `range` so that it reads as zeros (punch a hole; on a block
/// device, a zeroing discard). `Ok(false)`: the filesystem or device cannot.
pub fn punch_hole(disk: &Disk, range: Range<u64>) -> Result<bool, DiskError> {
    fallocate(
        disk,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        range,
        "punch-hole",
    )
}

/// Make `range` read as zeros while keeping it allocated (FALLOC_FL_ZERO_RANGE).
/// `Ok(false)`: the filesystem or device cannot.
pub fn zero_allocated(disk: &Disk, range: Range<u64>) -> Result<bool, DiskError> {
    fallocate(
        disk,
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        range,
        "zero-range",
    )
}

/// Write zeros over `range`, a buffer at a time (the slow, always-working way).
pub fn write_zeros(disk: &Disk, range: Range<u64>) -> Result<(), DiskError> {
    let len = range.end.saturating_sub(range.start);
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut off = range.start;
    while off < range.end {
        let n = (range.end - off).min(zeros.len() as u64) as usize;
        disk.write_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

fn fallocate(
    disk: &Disk,
    flags: FallocateFlags,
    range: Range<u64>,
    op: &'static str,
) -> Result<bool, DiskError> {
    if range.is_empty() {
        return Ok(true);
    }
    match rustix::fs::fallocate(disk.file(), flags, range.start, range.end - range.start) {
        Ok(()) => Ok(true),
        Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) | Err(Errno::INVAL) | Err(Errno::NODEV) => {
            Ok(false)
        }
        Err(e) => Err(DiskError::from_io(disk.path(), op, e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punch_and_zero_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let d = Disk::open_write(&dir.path().join("z.img"), true).unwrap();
        d.set_len(1 << 20).unwrap();
        d.write_at(&[9u8; 65536], 0).unwrap();
        let mut buf = vec![1u8; 65536];
        if punch_hole(&d, 4096..8192).unwrap() {
            d.read_at(&mut buf[..4096], 4096).unwrap();
            assert!(crate::is_zero(&buf[..4096]));
        }
        if zero_allocated(&d, 8192..12288).unwrap() {
            d.read_at(&mut buf[..4096], 8192).unwrap();
            assert!(crate::is_zero(&buf[..4096]));
        }
        write_zeros(&d, 100..200).unwrap();
        d.read_at(&mut buf[..4096], 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 9));
        assert!(crate::is_zero(&buf[100..200]));
        assert!(buf[200..4096].iter().all(|&b| b == 9));
    }
}
