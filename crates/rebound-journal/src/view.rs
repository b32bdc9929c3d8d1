//! Reading a recovery point: "base + journal up to P" without copying the
//! base. A view merges the sorted per-segment indexes (k-way, streaming) into
//! one resolved index — latest location of every block changed up to P —
//! kept in an unlinked scratch file with one in-memory fence key per 4 KiB
//! page of it. Memory: 16 bytes per 128 changed blocks plus one read buffer
//! per segment during the merge; never the journal's bytes.

use crate::error::{JournalError, Result};
use crate::format::{self, BLOCK, IdxEntry};
use crate::fs::{Fs, FsFile};
use crate::journal::{DiskMeta, Idx, Journal, PointInfo, Segment, ViewPins};
use rebound_disk::{Disk, is_zero};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const RES_LEN: usize = 32;
const PAGE_ENTRIES: usize = 128;
const PAGE_BYTES: usize = RES_LEN * PAGE_ENTRIES;
/// Unit of materialise IO.
const CHUNK: u64 = 1 << 20;

/// Where the block of a point lives in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub disk: u32,
    pub block: u64,
    seg: u32,
    data_off: u64,
    crc: u32,
}

impl Resolved {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.block.to_le_bytes());
        out.extend_from_slice(&self.data_off.to_le_bytes());
        out.extend_from_slice(&self.disk.to_le_bytes());
        out.extend_from_slice(&self.seg.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
    }
    fn decode(b: &[u8]) -> Resolved {
        Resolved {
            block: format::get_u64(b, 0),
            data_off: format::get_u64(b, 8),
            disk: format::get_u32(b, 16),
            seg: format::get_u32(b, 20),
            crc: format::get_u32(b, 24),
        }
    }
    fn key(&self) -> (u32, u64) {
        (self.disk, self.block)
    }
}

/// Sorted entries of one segment with seq <= `through`, streamed.
enum Source {
    File {
        f: Box<dyn FsFile>,
        path: PathBuf,
        off: u64,
        left: u64,
        buf: Vec<u8>,
        pos: usize,
        crc: u32,
        want: u32,
    },
    Mem(std::vec::IntoIter<IdxEntry>),
}

impl Source {
    fn new(fs: &dyn Fs, seg: &Segment, through: u64) -> Result<Source> {
        Ok(match &seg.idx {
            Idx::File {
                path,
                entries_off,
                count,
                crc,
                ..
            } => Source::File {
                f: fs
                    .open(path, false, false)
                    .map_err(|e| JournalError::io(path, "open index", e))?,
                path: path.clone(),
                off: *entries_off,
                left: count * format::ENTRY_LEN as u64,
                buf: Vec::new(),
                pos: 0,
                crc: 0,
                want: *crc,
            },
            Idx::Memory(v) => {
                let mut v: Vec<IdxEntry> = v.iter().filter(|e| e.seq <= through).copied().collect();
                v.sort_unstable_by_key(|e| e.key());
                Source::Mem(v.into_iter())
            }
        })
    }

    fn next_raw(&mut self) -> Result<Option<IdxEntry>> {
        match self {
            Source::Mem(it) => Ok(it.next()),
            Source::File {
                f,
                path,
                off,
                left,
                buf,
                pos,
                crc,
                want,
            } => {
                if *pos >= buf.len() {
                    if *left == 0 {
                        if crc != want {
                            return Err(JournalError::Corrupt {
                                path: path.clone(),
                                offset: 0,
                                what: "index entries checksum mismatch".into(),
                            });
                        }
                        return Ok(None);
                    }
                    let n = (*left).min(16 * 1024) as usize;
                    buf.resize(n, 0);
                    f.read_full(buf, *off)
                        .map_err(|e| JournalError::io(path.as_path(), "read index", e))?;
                    *crc = crc32c::crc32c_append(*crc, buf);
                    *off += n as u64;
                    *left -= n as u64;
                    *pos = 0;
                }
                let e = IdxEntry::decode(&buf[*pos..*pos + format::ENTRY_LEN]);
                *pos += format::ENTRY_LEN;
                Ok(Some(e))
            }
        }
    }

    fn next(&mut self, through: u64) -> Result<Option<IdxEntry>> {
        loop {
            match self.next_raw()? {
                Some(e) if e.seq > through => continue,
                other => return Ok(other),
            }
        }
    }
}

fn read_block(f: &dyn FsFile, path: &Path, data_off: u64, crc: u32, out: &mut [u8]) -> Result<()> {
    f.read_full(out, data_off)
        .map_err(|e| JournalError::io(path, "read", e))?;
    if crc32c::crc32c(out) != crc {
        return Err(JournalError::Corrupt {
            path: path.into(),
            offset: data_off,
            what: "block data checksum mismatch".into(),
        });
    }
    Ok(())
}

/// Apply the latest write of every block of one segment to the base disks.
/// Returns (blocks, bytes) written.
pub(crate) fn apply_segment(
    fs: &dyn Fs,
    seg: &Segment,
    bases: &[Box<dyn FsFile>],
    disks: &[DiskMeta],
) -> Result<(u64, u64)> {
    let f = fs
        .open(&seg.path, false, false)
        .map_err(|e| JournalError::io(&seg.path, "open", e))?;
    let mut src = Source::new(fs, seg, u64::MAX)?;
    let mut run = Run::default();
    let (mut blocks, mut bytes) = (0u64, 0u64);
    let mut prev: Option<IdxEntry> = None;
    let mut block = vec![0u8; BLOCK as usize];
    loop {
        let e = src.next(u64::MAX)?;
        if let Some(p) = prev
            && e.is_none_or(|e| (e.disk, e.block) != (p.disk, p.block))
        {
            read_block(&*f, &seg.path, p.data_off, p.crc, &mut block)?;
            if p.disk as usize >= bases.len().min(disks.len()) {
                return Err(corrupt_disk(&seg.path, p.disk));
            }
            run.push(bases, disks, p.disk, p.block, &block)?;
            blocks += 1;
            bytes += BLOCK;
        }
        match e {
            Some(e) => prev = Some(e),
            None => break,
        }
    }
    run.flush(bases, disks)?;
    Ok((blocks, bytes))
}

fn corrupt_disk(path: &Path, disk: u32) -> JournalError {
    JournalError::Corrupt {
        path: path.into(),
        offset: 0,
        what: format!("index names disk {disk}, which the item lacks"),
    }
}

/// Consecutive blocks written with one call (a hole punched if all zero).
#[derive(Default)]
struct Run {
    disk: Option<u32>,
    start: u64,
    buf: Vec<u8>,
}

impl Run {
    fn push(
        &mut self,
        bases: &[Box<dyn FsFile>],
        disks: &[DiskMeta],
        disk: u32,
        block: u64,
        data: &[u8],
    ) -> Result<()> {
        let contiguous =
            self.disk == Some(disk) && self.start + (self.buf.len() as u64 / BLOCK) == block;
        if !contiguous || self.buf.len() >= CHUNK as usize {
            self.flush(bases, disks)?;
            self.disk = Some(disk);
            self.start = block;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Write the run to its own disk's base.
    fn flush(&mut self, bases: &[Box<dyn FsFile>], disks: &[DiskMeta]) -> Result<()> {
        let Some(d) = self.disk else { return Ok(()) };
        if self.buf.is_empty() {
            return Ok(());
        }
        let (f, path) = (&bases[d as usize], &disks[d as usize].base);
        let off = self.start * BLOCK;
        let r = if is_zero(&self.buf) {
            f.zero(off, self.buf.len() as u64)
        } else {
            f.write_at(&self.buf, off)
        };
        r.map_err(|e| JournalError::Io {
            path: path.clone(),
            op: "write base",
            source: e,
        })?;
        self.buf.clear();
        Ok(())
    }
}

struct PinGuard {
    pins: ViewPins,
    point: u64,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut m = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get_mut(&self.point) {
            *c -= 1;
            if *c == 0 {
                m.remove(&self.point);
            }
        }
    }
}

/// A read-only block view of one recovery point. While it exists, retention
/// does not fold past its point; segment files it reads stay open.
pub struct PointView {
    point: PointInfo,
    disks: Vec<DiskMeta>,
    bases: Vec<Box<dyn FsFile>>,
    segs: Vec<(PathBuf, Box<dyn FsFile>)>,
    resolved: File,
    count: u64,
    fences: Vec<(u32, u64)>,
    cache: Mutex<Option<(usize, Vec<Resolved>)>>,
    _pin: PinGuard,
}

impl std::fmt::Debug for PointView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointView")
            .field("point", &self.point.id)
            .field("changed_blocks", &self.count)
            .finish()
    }
}

fn scratch_file(volume: &Path) -> Result<File> {
    let dir = volume.join("tmp");
    tempfile::tempfile_in(&dir)
        .or_else(|_| tempfile::tempfile())
        .map_err(|e| JournalError::Io {
            path: dir,
            op: "create scratch file",
            source: e,
        })
}

impl Journal {
    /// Open a read view of point `id`.
    pub fn view(&self, id: u64) -> Result<PointView> {
        let point = self.point(id)?.clone();
        let _span =
            tracing::info_span!("journal.view", item = %self.meta.item, point = id).entered();
        {
            let mut m = self.view_pins.lock().unwrap_or_else(|p| p.into_inner());
            *m.entry(id).or_insert(0) += 1;
        }
        let pin = PinGuard {
            pins: self.view_pins.clone(),
            point: id,
        };
        let fs = &*self.fs;
        let segs = self.segment_files(id);
        let mut sources = Vec::with_capacity(segs.len());
        let mut files = Vec::with_capacity(segs.len());
        for s in &segs {
            sources.push(Source::new(fs, s, id)?);
            files.push((
                s.path.clone(),
                fs.open(&s.path, false, false)
                    .map_err(|e| JournalError::io(&s.path, "open", e))?,
            ));
        }
        let mut heap = BinaryHeap::new();
        for (i, src) in sources.iter_mut().enumerate() {
            if let Some(e) = src.next(id)? {
                heap.push(Reverse((e.disk, e.block, e.seq, i, e.data_off, e.crc)));
            }
        }
        let resolved = scratch_file(&self.volume)?;
        let mut out = Vec::with_capacity(PAGE_BYTES * 16);
        let mut written = 0u64;
        let mut count = 0u64;
        let mut fences = Vec::new();
        let mut cur: Option<Resolved> = None;
        let flush_out = |out: &mut Vec<u8>, written: &mut u64| -> Result<()> {
            resolved
                .write_all_at(out, *written)
                .map_err(|e| JournalError::Io {
                    path: self.volume.join("tmp"),
                    op: "write scratch",
                    source: e,
                })?;
            *written += out.len() as u64;
            out.clear();
            Ok(())
        };
        while let Some(Reverse((disk, block, _seq, i, data_off, crc))) = heap.pop() {
            let r = Resolved {
                disk,
                block,
                seg: i as u32,
                data_off,
                crc,
            };
            if let Some(c) = cur
                && c.key() != r.key()
            {
                if count.is_multiple_of(PAGE_ENTRIES as u64) {
                    fences.push(c.key());
                }
                c.encode(&mut out);
                count += 1;
                if out.len() >= PAGE_BYTES * 16 {
                    flush_out(&mut out, &mut written)?;
                }
            }
            // Entries pop in (disk, block, seq) order: the last one of a key is the latest.
            cur = Some(r);
            if let Some(e) = sources[i].next(id)? {
                heap.push(Reverse((e.disk, e.block, e.seq, i, e.data_off, e.crc)));
            }
        }
        if let Some(c) = cur {
            if count.is_multiple_of(PAGE_ENTRIES as u64) {
                fences.push(c.key());
            }
            c.encode(&mut out);
            count += 1;
        }
        flush_out(&mut out, &mut written)?;
        let mut bases = Vec::new();
        for d in &self.meta.disks {
            bases.push(
                fs.open(&d.base, false, false)
                    .map_err(|e| JournalError::io(&d.base, "open base", e))?,
            );
        }
        tracing::debug!(changed_blocks = count, segments = files.len(), "view ready");
        Ok(PointView {
            point,
            disks: self.meta.disks.clone(),
            bases,
            segs: files,
            resolved,
            count,
            fences,
            cache: Mutex::new(None),
            _pin: pin,
        })
    }

    /// Materialise point `id` into raw images; see [`PointView::materialise`].
    pub fn materialise(&self, id: u64, target: &Target) -> Result<MaterialiseStats> {
        self.view(id)?.materialise(target)
    }
}

/// Where to materialise a point: one path per disk of the item, in order.
#[derive(Clone, Debug)]
pub enum Target {
    /// New sparse image files (must not exist; written then renamed durably).
    NewFiles(Vec<PathBuf>),
    /// Existing disks of the right size, updated in place: only blocks that
    /// differ are written (the original-location case).
    InPlace(Vec<PathBuf>),
}

#[derive(Clone, Debug, Default, serde::Serialize, PartialEq, Eq)]
pub struct MaterialiseStats {
    pub disks: usize,
    pub blocks_written: u64,
    pub bytes_written: u64,
    pub blocks_compared: u64,
}

fn disk_err(e: rebound_disk::DiskError) -> JournalError {
    JournalError::Disk(e)
}

/// Sorted chunk indices given as merged ranges, walked in order.
struct ChunkSet {
    ranges: Vec<Range<u64>>,
    i: usize,
    next: u64,
}

impl ChunkSet {
    fn new(mut extents: Vec<Range<u64>>) -> ChunkSet {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        extents.sort_by_key(|r| r.start);
        for r in extents {
            let c = r.start / CHUNK..r.end.div_ceil(CHUNK);
            match ranges.last_mut() {
                Some(l) if c.start <= l.end => l.end = l.end.max(c.end),
                _ => ranges.push(c),
            }
        }
        let next = ranges.first().map_or(u64::MAX, |r| r.start);
        ChunkSet { ranges, i: 0, next }
    }
    fn peek(&self) -> Option<u64> {
        (self.next != u64::MAX).then_some(self.next)
    }
    /// Move past chunk `c`.
    fn skip_to(&mut self, c: u64) {
        while self.i < self.ranges.len() {
            let r = &self.ranges[self.i];
            if c + 1 < r.end {
                self.next = r.start.max(c + 1);
                return;
            }
            self.i += 1;
        }
        self.next = u64::MAX;
    }
}

impl PointView {
    pub fn point(&self) -> &PointInfo {
        &self.point
    }
    pub fn disks(&self) -> &[DiskMeta] {
        &self.disks
    }
    /// Number of blocks the journal changed up to this point.
    pub fn changed_blocks(&self) -> u64 {
        self.count
    }

    fn scratch_err(&self, e: std::io::Error) -> JournalError {
        JournalError::Io {
            path: PathBuf::from("(view scratch)"),
            op: "read",
            source: e,
        }
    }

    fn page(&self, p: usize) -> Result<Vec<Resolved>> {
        let n = ((self.count - (p * PAGE_ENTRIES) as u64) as usize).min(PAGE_ENTRIES);
        let mut b = vec![0u8; n * RES_LEN];
        self.resolved
            .read_exact_at(&mut b, (p * PAGE_BYTES) as u64)
            .map_err(|e| self.scratch_err(e))?;
        Ok(b.chunks(RES_LEN).map(Resolved::decode).collect())
    }

    fn lookup(&self, disk: u32, block: u64) -> Result<Option<Resolved>> {
        let key = (disk, block);
        let p = self.fences.partition_point(|f| *f <= key);
        if p == 0 {
            return Ok(None);
        }
        let p = p - 1;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.as_ref().is_none_or(|(cp, _)| *cp != p) {
            *cache = Some((p, self.page(p)?));
        }
        let Some((_, page)) = cache.as_ref() else {
            return Ok(None);
        };
        Ok(page
            .binary_search_by_key(&key, |r| r.key())
            .ok()
            .map(|i| page[i]))
    }

    fn read_resolved(&self, r: &Resolved, out: &mut [u8]) -> Result<()> {
        let (path, f) = &self.segs[r.seg as usize];
        read_block(f.as_ref(), path, r.data_off, r.crc, out)
    }

    /// Read `buf.len()` bytes of disk `disk` at `offset`, as of this point.
    pub fn read_at(&self, disk: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let d = self
            .disks
            .get(disk)
            .ok_or_else(|| JournalError::InvalidChangeset(format!("no disk {disk}")))?;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > d.size)
        {
            return Err(JournalError::InvalidChangeset(format!(
                "read at {offset} runs past the disk's end"
            )));
        }
        let base = &self.bases[disk];
        let mut block = vec![0u8; BLOCK as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(buf.len() - done);
            match self.lookup(disk as u32, b)? {
                Some(r) => {
                    self.read_resolved(&r, &mut block)?;
                    buf[done..done + n].copy_from_slice(&block[within..within + n]);
                }
                None => {
                    base.read_full(&mut buf[done..done + n], pos)
                        .map_err(|e| JournalError::io(&d.base, "read", e))?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Every resolved block, in (disk, block) order.
    fn resolved_iter(&self) -> impl Iterator<Item = Result<Resolved>> + '_ {
        let mut page = 0usize;
        let pages = self.count.div_ceil(PAGE_ENTRIES as u64) as usize;
        let mut cur: std::vec::IntoIter<Resolved> = Vec::new().into_iter();
        std::iter::from_fn(move || {
            loop {
                if let Some(r) = cur.next() {
                    return Some(Ok(r));
                }
                if page >= pages {
                    return None;
                }
                match self.page(page) {
                    Ok(v) => cur = v.into_iter(),
                    Err(e) => return Some(Err(e)),
                }
                page += 1;
            }
        })
    }

    /// Write the point's disks to `target`. Cost: the base's data extents
    /// plus the journal's changed blocks (plus, in place, reading the target).
    pub fn materialise(&self, target: &Target) -> Result<MaterialiseStats> {
        let paths = match target {
            Target::NewFiles(p) | Target::InPlace(p) => p,
        };
        if paths.len() != self.disks.len() {
            return Err(JournalError::Target {
                path: PathBuf::new(),
                what: format!("{} paths given for {} disks", paths.len(), self.disks.len()),
            });
        }
        let _span = tracing::info_span!("journal.materialise", point = self.point.id).entered();
        let mut stats = MaterialiseStats {
            disks: self.disks.len(),
            ..Default::default()
        };
        let mut it = self.resolved_iter().peekable();
        for (d, path) in paths.iter().enumerate() {
            let meta = &self.disks[d];
            let in_place = matches!(target, Target::InPlace(_));
            let (out, tmp) = if in_place {
                let disk = Disk::open_write(path, false).map_err(disk_err)?;
                let size = disk.size().map_err(disk_err)?;
                if size != meta.size {
                    return Err(JournalError::Target {
                        path: path.clone(),
                        what: format!("{size} bytes, disk {:?} has {}", meta.name, meta.size),
                    });
                }
                (disk, None)
            } else {
                if path.exists() {
                    return Err(JournalError::Target {
                        path: path.clone(),
                        what: "already exists".into(),
                    });
                }
                let tmp = rebound_disk::crashsafe::temp_path(path);
                let disk = Disk::open_write(&tmp, true).map_err(disk_err)?;
                disk.set_len(0).map_err(disk_err)?;
                disk.set_len(meta.size).map_err(disk_err)?;
                (disk, Some(tmp))
            };
            let base_extents = Disk::open_read(&meta.base)
                .map_err(disk_err)?
                .data_extents(0..meta.size)
                .map_err(disk_err)?;
            let mut extents = base_extents.clone();
            if in_place {
                extents.extend(out.data_extents(0..meta.size).map_err(disk_err)?);
            }
            let mut chunks = ChunkSet::new(extents);
            let mut touched = [false; (CHUNK / BLOCK) as usize];
            let mut buf = vec![0u8; CHUNK as usize];
            let mut tbuf = vec![0u8; CHUNK as usize];
            loop {
                let next_j = match it.peek() {
                    Some(Ok(r)) if r.disk as usize == d => Some(r.block * BLOCK / CHUNK),
                    Some(Err(_)) => {
                        if let Some(Err(e)) = it.next() {
                            return Err(e);
                        }
                        None
                    }
                    _ => None,
                };
                let c = match (next_j, chunks.peek()) {
                    (Some(a), Some(b)) => a.min(b),
                    (Some(a), None) | (None, Some(a)) => a,
                    (None, None) => break,
                };
                chunks.skip_to(c);
                let start = c * CHUNK;
                let len = (meta.size - start).min(CHUNK) as usize;
                let buf = &mut buf[..len];
                // Reading a hole costs as much as reading data (the kernel
                // zero-fills page cache): only read where the base has data.
                let has_base = overlaps(&base_extents, start, start + len as u64);
                if has_base {
                    self.bases[d]
                        .read_full(buf, start)
                        .map_err(|e| JournalError::io(&meta.base, "read", e))?;
                } else {
                    buf.fill(0);
                }
                touched.fill(false);
                while let Some(Ok(r)) = it.peek() {
                    if r.disk as usize != d || r.block * BLOCK / CHUNK != c {
                        break;
                    }
                    let at = (r.block * BLOCK - start) as usize;
                    self.read_resolved(r, &mut buf[at..at + BLOCK as usize])?;
                    touched[at / BLOCK as usize] = true;
                    it.next();
                }
                if in_place {
                    let tbuf = &mut tbuf[..len];
                    out.read_at(tbuf, start).map_err(disk_err)?;
                    stats.blocks_compared += len as u64 / BLOCK;
                    write_runs(
                        &out,
                        buf,
                        start,
                        |i| buf_block(buf, i) != buf_block(tbuf, i),
                        &mut stats,
                    )?;
                } else {
                    write_runs(
                        &out,
                        buf,
                        start,
                        |i| (has_base || touched[i]) && !is_zero(buf_block(buf, i)),
                        &mut stats,
                    )?;
                }
            }
            out.sync_data().map_err(disk_err)?;
            if let Some(tmp) = tmp {
                rebound_disk::crashsafe::durable_rename(&tmp, path).map_err(|e| {
                    JournalError::Io {
                        path: path.clone(),
                        op: "rename",
                        source: e,
                    }
                })?;
            }
        }
        tracing::info!(blocks = stats.blocks_written, "point materialised");
        Ok(stats)
    }
}

/// Whether sorted, disjoint `extents` overlap `start..end`.
fn overlaps(extents: &[Range<u64>], start: u64, end: u64) -> bool {
    let i = extents.partition_point(|r| r.end <= start);
    extents.get(i).is_some_and(|r| r.start < end)
}

fn buf_block(buf: &[u8], i: usize) -> &[u8] {
    &buf[i * BLOCK as usize..((i + 1) * BLOCK as usize).min(buf.len())]
}

/// Write the runs of blocks selected by `want` (zero runs punched).
fn write_runs(
    out: &Disk,
    buf: &[u8],
    start: u64,
    want: impl Fn(usize) -> bool,
    stats: &mut MaterialiseStats,
) -> Result<()> {
    let n = buf.len().div_ceil(BLOCK as usize);
    let mut i = 0;
    while i < n {
        if !want(i) {
            i += 1;
            continue;
        }
        let zero = is_zero(buf_block(buf, i));
        let mut j = i + 1;
        while j < n && want(j) && is_zero(buf_block(buf, j)) == zero {
            j += 1;
        }
        let a = i * BLOCK as usize;
        let b = (j * BLOCK as usize).min(buf.len());
        let off = start + a as u64;
        if zero {
            out.zero_range(off..start + b as u64).map_err(disk_err)?;
        } else {
            out.write_at(&buf[a..b], off).map_err(disk_err)?;
        }
        stats.blocks_written += (j - i) as u64;
        stats.bytes_written += (b - a) as u64;
        i = j;
    }
    Ok(())
}
