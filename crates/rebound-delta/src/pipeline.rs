//! Reading and hashing chunks, pipelined: one thread reads chunks in order
//! (skipping holes), a pool of threads hashes them; buffers come from a
//! bounded pool, which is what bounds memory.

use crate::tree::{ChunkTree, TreeHasher};
use crossbeam_channel::{Receiver, Sender, bounded};
use rebound_disk::{DIRECT_ALIGN, Disk, DiskError};
use rebound_types::CHUNK_SIZE;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Bytes behind each buffer: a whole chunk plus the slack that lets it
/// start on a [`DIRECT_ALIGN`] boundary.
const BACKING: usize = CHUNK_SIZE as usize + DIRECT_ALIGN;

/// A bounded pool of chunk buffers. Taking blocks once all are in use.
#[derive(Clone)]
pub struct BufPool {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    made: Arc<AtomicUsize>,
    limit: usize,
}

impl BufPool {
    pub fn new(limit: usize) -> BufPool {
        let (tx, rx) = bounded(limit);
        BufPool {
            tx,
            rx,
            made: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// A buffer of `len` bytes, at most a chunk (content unspecified).
    pub fn take(&self, len: usize) -> Buf {
        let data = match self.rx.try_recv() {
            Ok(v) => v,
            Err(_) if self.made.fetch_add(1, Ordering::Relaxed) < self.limit => vec![0; BACKING],
            Err(_) => {
                // Everything made is in use: wait for one to come back.
                self.made.fetch_sub(1, Ordering::Relaxed);
                self.rx.recv().unwrap_or_else(|_| vec![0; BACKING])
            }
        };
        // The backing never grows, so the aligned start never moves.
        let off = data.as_ptr().align_offset(DIRECT_ALIGN);
        let mut buf = Buf {
            data,
            off,
            len: 0,
            pool: self.tx.clone(),
        };
        buf.set_len(len);
        buf
    }
}

/// A pooled chunk buffer starting on a [`DIRECT_ALIGN`] boundary (so that
/// reads into it can bypass the page cache); goes back to its pool when
/// dropped.
pub struct Buf {
    data: Vec<u8>,
    off: usize,
    len: usize,
    pool: Sender<Vec<u8>>,
}

impl Buf {
    /// Change the length (at most a chunk); new bytes are unspecified.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(CHUNK_SIZE as usize);
    }

    /// `range` of the buffer, which may run past its length up to a whole
    /// chunk: room for reads rounded up to the alignment.
    fn span_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        let end = range.end.min(CHUNK_SIZE as usize);
        &mut self.data[self.off + range.start.min(end)..self.off + end]
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[self.off..self.off + self.len]
    }
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.off..self.off + self.len]
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let _ = self.pool.try_send(std::mem::take(&mut self.data));
    }
}

/// A chunk read and hashed.
pub struct Chunk {
    pub idx: u64,
    pub buf: Buf,
    /// Byte ranges of `buf` that were read (everything else is a hole).
    pub data: Vec<Range<usize>>,
    pub tree: Option<ChunkTree>,
    pub blake3: Option<[u8; 32]>,
}

/// What to compute for each chunk.
#[derive(Clone)]
pub struct Want {
    /// Hash the tree with this key; `None`: only find the zero leaves.
    pub tree: Option<Arc<TreeHasher>>,
    pub blake3: bool,
}

/// Length of chunk `idx` of a disk of `size` bytes.
pub fn chunk_len(size: u64, idx: u64) -> usize {
    (size - idx * CHUNK_SIZE).min(CHUNK_SIZE) as usize
}

/// Start reading chunks `range` of `disk` (or of an all-zero disk when
/// `disk` is `None`). Chunks arrive on the returned channel possibly out of
/// order; the channel ends after the last chunk or the first error.
///
/// Each worker reads and hashes whole chunks, so several reads are in flight
/// at once (disks and virtual disks want a queue, not one request at a time).
/// A worker takes its buffer before it claims the next chunk index: a claimed
/// chunk can always be read, so the lowest chunk in flight always completes
/// and the two sides of a sync cannot wait on each other's buffers.
pub fn spawn(
    disk: Option<Arc<Disk>>,
    size: u64,
    range: Range<u64>,
    pool: BufPool,
    want: Want,
    workers: usize,
) -> Receiver<Result<Chunk, DiskError>> {
    let workers = workers.max(1);
    let (out_tx, out_rx) = bounded::<Result<Chunk, DiskError>>(workers * 2);
    let next = Arc::new(AtomicU64::new(range.start));
    let failed = Arc::new(AtomicBool::new(false));
    for _ in 0..workers {
        let (out_tx, want, pool, disk) = (out_tx.clone(), want.clone(), pool.clone(), disk.clone());
        let (next, failed) = (next.clone(), failed.clone());
        let end = range.end;
        std::thread::spawn(move || {
            loop {
                let buf = pool.take(CHUNK_SIZE as usize);
                let idx = next.fetch_add(1, Ordering::Relaxed);
                if idx >= end || failed.load(Ordering::Relaxed) {
                    return;
                }
                let result = read_chunk(disk.as_deref(), size, idx, buf).map(|mut c| {
                    c.tree = Some(match &want.tree {
                        _ if c.data.is_empty() => ChunkTree::zero(c.buf.len()),
                        Some(h) => h.chunk(&c.buf, &c.data),
                        None => ChunkTree::presence(&c.buf, &c.data),
                    });
                    if want.blake3 {
                        c.blake3 = Some(*blake3::hash(&c.buf).as_bytes());
                    }
                    c
                });
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                if out_tx.send(result).is_err() {
                    return;
                }
            }
        });
    }
    out_rx
}

fn read_chunk(disk: Option<&Disk>, size: u64, idx: u64, mut buf: Buf) -> Result<Chunk, DiskError> {
    let len = chunk_len(size, idx);
    buf.set_len(len);
    let start = idx * CHUNK_SIZE;
    let mut data = Vec::new();
    if let Some(disk) = disk {
        let end = (start + len as u64).min(size);
        for ext in disk.data_extents(start..end)? {
            data.push((ext.start - start) as usize..(ext.end - start) as usize);
        }
    }
    // Holes are zero-filled in memory, data is read: each byte once. Reads
    // are widened to the alignment (extents are filesystem blocks, so this
    // only rounds the end of the disk up) and so bypass the page cache.
    let mut pos = 0;
    for r in &data {
        if pos < r.start {
            buf[pos..r.start].fill(0);
        }
        if let Some(disk) = disk {
            let a = r.start / DIRECT_ALIGN * DIRECT_ALIGN;
            let b = r.end.next_multiple_of(DIRECT_ALIGN);
            disk.read_aligned(buf.span_mut(a..b), start + a as u64)?;
        }
        pos = r.end;
    }
    buf[pos..].fill(0);
    Ok(Chunk {
        idx,
        buf,
        data,
        tree: None,
        blake3: None,
    })
}
