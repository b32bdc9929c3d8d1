//! A disk is a raw image file or a block device, addressed by byte offset.

use crate::DiskError;
use rustix::fs::{FileType, SeekFrom};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What O_DIRECT transfers need aligned: buffer address, offset and length.
/// 4 KiB satisfies every logical block size Linux disks use.
pub const DIRECT_ALIGN: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// A regular file holding a raw image (sparse-aware).
    Image,
    /// A block device.
    Block,
}

/// An open disk. Reads and writes are positional and may be issued from
/// several threads at once.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    kind: DiskKind,
    writable: bool,
    /// A second descriptor on the same file with O_DIRECT, opened on the
    /// first aligned read; `None` where the filesystem refuses O_DIRECT.
    direct: OnceLock<Option<File>>,
}

fn classify(path: &Path, file: &File) -> Result<DiskKind, DiskError> {
    let st = rustix::fs::fstat(file).map_err(|e| DiskError::from_io(path, "stat", e.into()))?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => Ok(DiskKind::Image),
        FileType::BlockDevice => Ok(DiskKind::Block),
        FileType::Directory => Err(DiskError::NotADisk {
            path: path.into(),
            what: "a directory",
        }),
        FileType::CharacterDevice => Err(DiskError::NotADisk {
            path: path.into(),
            what: "a character device",
        }),
        FileType::Fifo => Err(DiskError::NotADisk {
            path: path.into(),
            what: "a fifo",
        }),
        FileType::Socket => Err(DiskError::NotADisk {
            path: path.into(),
            what: "a socket",
        }),
        _ => Err(DiskError::NotADisk {
            path: path.into(),
            what: "an unknown file type",
        }),
    }
}

fn open_error(path: &Path, e: io::Error) -> DiskError {
    match e.kind() {
        io::ErrorKind::NotFound => DiskError::Missing { path: path.into() },
        io::ErrorKind::IsADirectory => DiskError::NotADisk {
            path: path.into(),
            what: "a directory",
        },
        _ => DiskError::from_io(path, "open", e),
    }
}

impl Disk {
    /// Open an existing disk for reading.
    pub fn open_read(path: &Path) -> Result<Disk, DiskError> {
        // Check the type before opening: opening a fifo would block.
        let meta = std::fs::metadata(path).map_err(|e| open_error(path, e))?;
        if meta.is_dir() {
            return Err(DiskError::NotADisk {
                path: path.into(),
                what: "a directory",
            });
        }
        let file = File::open(path).map_err(|e| open_error(path, e))?;
        let kind = classify(path, &file)?;
        Ok(Disk {
            file,
            path: path.into(),
            kind,
            writable: false,
            direct: OnceLock::new(),
        })
    }

    /// Open a disk for reading and writing; with `create`, a missing image is
    /// created empty (grow it with [`Disk::set_len`], which keeps it sparse).
    pub fn open_write(path: &Path, create: bool) -> Result<Disk, DiskError> {
        if let Ok(meta) = std::fs::metadata(path)
            && meta.is_dir()
        {
            return Err(DiskError::NotADisk {
                path: path.into(),
                what: "a directory",
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .open(path)
            .map_err(|e| open_error(path, e))?;
        let kind = classify(path, &file)?;
        Ok(Disk {
            file,
            path: path.into(),
            kind,
            writable: true,
            direct: OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn io_err(&self, op: &'static str, e: impl Into<io::Error>) -> DiskError {
        DiskError::from_io(&self.path, op, e.into())
    }

    /// Size in bytes.
    pub fn size(&self) -> Result<u64, DiskError> {
        match self.kind {
            DiskKind::Image => Ok(self
                .file
                .metadata()
                .map_err(|e| self.io_err("stat", e))?
                .len()),
            DiskKind::Block => {
                rustix::fs::seek(&self.file, SeekFrom::End(0)).map_err(|e| self.io_err("seek", e))
            }
        }
    }

    /// Grow or shrink an image; a grown image reads as zeros and takes no space.
    pub fn set_len(&self, len: u64) -> Result<(), DiskError> {
        match self.kind {
            DiskKind::Image => self
                .file
                .set_len(len)
                .map_err(|e| self.io_err("truncate", e)),
            DiskKind::Block => {
                let size = self.size()?;
                if size == len {
                    Ok(())
                } else {
                    Err(DiskError::Io {
                        path: self.path.clone(),
                        op: "resize",
                        source: io::Error::other(format!(
                            "a block device cannot change size ({size} bytes, {len} asked)"
                        )),
                    })
                }
            }
        }
    }

    /// Read exactly `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err("read", e)),
            }
        }
        Ok(())
    }

    /// Like [`Disk::read_at`], for bulk reads into a buffer whose address,
    /// length and `offset` are multiples of [`DIRECT_ALIGN`]: such reads
    /// bypass the page cache (O_DIRECT), which saves the kernel's copy and
    /// leaves a running machine's cache alone. Unaligned requests and
    /// filesystems without O_DIRECT (tmpfs) read through the cache.
    pub fn read_aligned(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let aligned = (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64);
        if let (true, Some(direct)) = (aligned, self.direct_file()) {
            let mut done = 0;
            loop {
                if done == buf.len() {
                    return Ok(());
                }
                match direct.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => {
                        buf[done..].fill(0);
                        return Ok(());
                    }
                    // A short read is the end of the file (or of a device).
                    Ok(n) if !n.is_multiple_of(DIRECT_ALIGN) => {
                        done += n;
                        buf[done..].fill(0);
                        return Ok(());
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Some filesystems accept the flag and refuse the IO.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                        break;
                    }
                    Err(e) => return Err(self.io_err("read", e)),
                }
            }
        }
        self.read_at(buf, offset)
    }

    /// Like [`Disk::write_at`], for bulk writes of a buffer whose address,
    /// length and `offset` are multiples of [`DIRECT_ALIGN`]: such writes go
    /// straight to the disk (O_DIRECT) instead of through the page cache,
    /// which makes the closing fdatasync cheap. They still need it: the
    /// disk's own cache and new block allocations are only durable after
    /// [`Disk::sync_data`]. Other requests take the buffered path.
    pub fn write_aligned(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let aligned = (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64);
        if let (true, true, Some(direct)) = (aligned, self.writable, self.direct_file()) {
            match direct.write_all_at(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {}
                Err(e) => return Err(self.io_err("write", e)),
            }
        }
        self.write_at(buf, offset)
    }

    fn direct_file(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                // Through /proc so the descriptor is on this very inode even if
                // the path has been replaced since it was opened.
                let fd_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                OpenOptions::new()
                    .read(true)
                    .write(self.writable)
                    .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                    .open(fd_path)
                    .ok()
            })
            .as_ref()
    }

    /// Write all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err("write", e))
    }

    /// Make `range` read as zeros, freeing its space where the filesystem can
    /// (punch-hole); falls back to writing zeros.
    pub fn zero_range(&self, range: Range<u64>) -> Result<(), DiskError> {
        if crate::zeroing::punch_hole(self, range.clone())? {
            return Ok(());
        }
        crate::zeroing::write_zeros(self, range)
    }

    /// Make written data durable (fdatasync).
    pub fn sync_data(&self) -> Result<(), DiskError> {
        self.file
            .sync_data()
            .map_err(|e| self.io_err("fdatasync", e))
    }

    /// The ranges inside `range` that may hold data; everything else is a hole
    /// and reads as zeros. Block devices and filesystems without SEEK_DATA
    /// report the whole range.
    pub fn data_extents(&self, range: Range<u64>) -> Result<Vec<Range<u64>>, DiskError> {
        if self.kind == DiskKind::Block || range.is_empty() {
            return Ok(vec![range]);
        }
        let mut out = Vec::new();
        let mut pos = range.start;
        while pos < range.end {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                // ENXIO: no data at or after pos.
                Err(rustix::io::Errno::NXIO) => break,
                Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
                    out.push(pos..range.end);
                    break;
                }
                Err(e) => return Err(self.io_err("seek-data", e)),
            };
            if data >= range.end {
                break;
            }
            let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(data)) {
                Ok(h) => h,
                Err(rustix::io::Errno::NXIO) => range.end,
                Err(e) => return Err(self.io_err("seek-hole", e)),
            };
            let end = hole.min(range.end);
            out.push(data..end);
            pos = end;
        }
        Ok(out)
    }
}

/// True when every byte of `buf` is zero. Word-at-a-time; the compiler
/// vectorises the inner loop.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = unsafe_free_split(buf);
    head.iter().all(|&b| b == 0)
        && body
            .chunks(8)
            .all(|w| w.iter().fold(0u64, |acc, &b| acc | b as u64) == 0)
        && tail.iter().all(|&b| b == 0)
}

// Split without `align_to` (which is unsafe): the body is a multiple of 64 bytes.
fn unsafe_free_split(buf: &[u8]) -> (&[u8], &[u8], &[u8]) {
    let body_len = buf.len() / 64 * 64;
    let (body, tail) = buf.split_at(body_len);
    (&[], body, tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebound_types::Coded;
    use rebound_types::ErrorCode;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        let mut b = vec![0u8; 4097];
        b[4096] = 1;
        assert!(!is_zero(&b));
        b[4096] = 0;
        b[17] = 3;
        assert!(!is_zero(&b));
    }

    #[test]
    fn extents_holes_and_punch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let d = Disk::open_write(&p, true).unwrap();
        d.set_len(16 << 20).unwrap();
        assert!(d.data_extents(0..16 << 20).unwrap().is_empty());
        d.write_at(&[7u8; 4096], 8 << 20).unwrap();
        let ext = d.data_extents(0..16 << 20).unwrap();
        assert_eq!(ext.len(), 1);
        assert!(ext[0].start <= 8 << 20 && ext[0].end >= (8 << 20) + 4096);
        d.zero_range((8 << 20)..(8 << 20) + 4096).unwrap();
        let mut buf = [1u8; 4096];
        d.read_at(&mut buf, 8 << 20).unwrap();
        assert!(is_zero(&buf));
        // Past the end reads as zeros.
        d.read_at(&mut buf, (16 << 20) - 100).unwrap();
        assert!(is_zero(&buf));
    }

    #[test]
    fn aligned_reads_match_buffered_reads_and_zero_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let d = Disk::open_write(&p, true).unwrap();
        let data: Vec<u8> = (0..3 * 4096 + 1000).map(|i| (i % 251) as u8).collect();
        d.write_at(&data, 0).unwrap();
        let mut backing = vec![1u8; 5 * DIRECT_ALIGN];
        let off = backing.as_ptr().align_offset(DIRECT_ALIGN);
        let buf = &mut backing[off..off + 4 * DIRECT_ALIGN];
        // Dirty pages of the same file are seen by the direct descriptor.
        d.read_aligned(buf, 0).unwrap();
        assert_eq!(&buf[..data.len()], &data[..]);
        assert!(is_zero(&buf[data.len()..]));
        // Unaligned requests take the buffered path and agree.
        let mut small = [0u8; 100];
        d.read_aligned(&mut small, 4097).unwrap();
        assert_eq!(&small[..], &data[4097..4197]);
        // An aligned write bypasses the cache; buffered reads still see it.
        buf.fill(9);
        d.write_aligned(&buf[..2 * DIRECT_ALIGN], DIRECT_ALIGN as u64)
            .unwrap();
        d.read_at(&mut small, DIRECT_ALIGN as u64 - 50).unwrap();
        assert_eq!(&small[..50], &data[4046..4096]);
        assert!(small[50..].iter().all(|&b| b == 9));
        d.sync_data().unwrap();
    }

    #[test]
    fn open_errors_have_codes() {
        let dir = tempfile::tempdir().unwrap();
        let e = Disk::open_read(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.code(), ErrorCode::SourceMissing);
        let e = Disk::open_read(dir.path()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::NotADisk);
        let e = Disk::open_write(dir.path(), true).unwrap_err();
        assert_eq!(e.code(), ErrorCode::NotADisk);
    }
}
