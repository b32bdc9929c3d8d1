//! The changeset file: a piece of an agent's change stream (the writes of
//! one stretch between barriers, or a bounded part of it, or a resync of
//! marked leaves) on its way from the agent's outbox through a process
//! server's cache to a master target's journal.
//!
//! ```text
//! "RBCSET02"  header_len:u32le  header (JSON: item, agent, seq, restart, disk_sizes)
//! { disk:u16le kind:u16le offset:u64le len:u32le data[len if kind = DATA] }*
//! 0xFFFF closes:u16le barrier_ns:u64le 0:u32            end of records
//! blake3(everything before):[u8; 32]
//! ```
//! `kind` is 0 for data, 1 for a zeroed (trimmed) range; offsets and lengths
//! are multiples of 4 KiB. Records are in the order the agent captured the
//! writes, so applying them in file order reproduces the disk. The end
//! record says what the file closes (0 nothing, 1 a crash-consistent point,
//! 2 an app-consistent point, 3 a group point whose marker is its barrier
//! time) and at which barrier: both are known only
//! when the file is closed, after its records were streamed out.
//!
//! The trailing BLAKE3 covers the whole file, so a file still being
//! transferred, torn by a crash or corrupted on disk is refused whole: it is
//! never applied in part. Sequence numbers are contiguous per agent: a
//! receiver that sees `seq` after `applied` with `seq != applied + 1` has
//! found a gap, unless the file is a `restart` (the first file of a resync,
//! which covers everything the agent has not seen applied).
//!
//! Any change to the layout bumps the magic; `golden_bytes` pins it.

use rebound_types::LEAF_SIZE;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RBCSET02";
const END: u16 = 0xFFFF;
const KIND_DATA: u16 = 0;
const KIND_ZERO: u16 = 1;
const RECORD_HEADER: usize = 16;
/// Bounds what a reader accepts, whatever the file says.
const MAX_HEADER: u32 = 1 << 20;
/// Largest data record (a zero record may say more).
pub const MAX_RECORD: u32 = 64 << 20;

/// Kind of recovery point a changeset closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Closes {
    /// A part of a stretch, or a resync: no recovery point.
    Nothing,
    CrashConsistent,
    AppConsistent,
    /// A crash-consistent point that is also its replication group's:
    /// every member closes one at the same barrier time, its marker.
    Group,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub item: String,
    /// The sending agent (component id): sequence numbers are its own.
    pub agent: String,
    /// Contiguous per agent; the master target applies each once, in order.
    pub seq: u64,
    /// The closing barrier (points) or the time the file was closed, ns
    /// since the UNIX epoch, on the agent's clock.
    pub barrier_ns: u64,
    pub closes: Closes,
    /// The first file of a resync: it and the files after it cover every
    /// change the master target has not reported applied, so it may follow
    /// any earlier sequence number.
    pub restart: bool,
    /// Size of each disk of the machine, in its disk order.
    pub disk_sizes: Vec<u64>,
}

/// The part of the header written when the file is opened.
#[derive(Serialize, Deserialize)]
struct Opening {
    item: String,
    agent: String,
    seq: u64,
    restart: bool,
    disk_sizes: Vec<u64>,
}

impl Closes {
    fn code(self) -> u16 {
        match self {
            Closes::Nothing => 0,
            Closes::CrashConsistent => 1,
            Closes::AppConsistent => 2,
            Closes::Group => 3,
        }
    }
    fn from_code(c: u16) -> Option<Closes> {
        Some(match c {
            0 => Closes::Nothing,
            1 => Closes::CrashConsistent,
            2 => Closes::AppConsistent,
            3 => Closes::Group,
            _ => return None,
        })
    }
}

/// One record of a changeset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Data {
        disk: u16,
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        disk: u16,
        offset: u64,
        len: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ChangesetError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Incomplete, torn or corrupt: the checksum or the structure is wrong.
    #[error("invalid changeset: {0}")]
    Invalid(String),
}

/// Writes a changeset to `<path>.tmp`, then makes it durable under `path`.
pub struct Writer {
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    tmp: PathBuf,
    path: PathBuf,
    /// Data bytes recorded (zero ranges not counted).
    pub data_bytes: u64,
    /// Records written.
    pub records: u64,
    /// The file starts a resync.
    pub restart: bool,
}

impl Writer {
    pub fn create(path: &Path, header: &Header) -> io::Result<Writer> {
        let tmp = temp_path(path);
        let f = File::create(&tmp)?;
        let mut w = Writer {
            out: BufWriter::with_capacity(1 << 20, f),
            hasher: blake3::Hasher::new(),
            tmp,
            path: path.to_path_buf(),
            data_bytes: 0,
            records: 0,
            restart: header.restart,
        };
        let h = serde_json::to_vec(&Opening {
            item: header.item.clone(),
            agent: header.agent.clone(),
            seq: header.seq,
            restart: header.restart,
            disk_sizes: header.disk_sizes.clone(),
        })
        .map_err(io::Error::other)?;
        w.put(MAGIC)?;
        w.put(&(h.len() as u32).to_le_bytes())?;
        w.put(&h)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.hasher.update(b);
        self.out.write_all(b)
    }

    fn record_header(&mut self, disk: u16, kind: u16, offset: u64, len: u32) -> io::Result<()> {
        let mut h = [0u8; RECORD_HEADER];
        h[0..2].copy_from_slice(&disk.to_le_bytes());
        h[2..4].copy_from_slice(&kind.to_le_bytes());
        h[4..12].copy_from_slice(&offset.to_le_bytes());
        h[12..16].copy_from_slice(&len.to_le_bytes());
        self.put(&h)
    }

    fn check(disk: u16, offset: u64, len: u64) -> io::Result<()> {
        if disk == END || !offset.is_multiple_of(LEAF_SIZE) || !len.is_multiple_of(LEAF_SIZE) {
            return Err(io::Error::other("changeset records are whole 4 KiB leaves"));
        }
        Ok(())
    }

    /// One run of written leaves.
    pub fn data(&mut self, disk: u16, offset: u64, data: &[u8]) -> io::Result<()> {
        Self::check(disk, offset, data.len() as u64)?;
        let mut off = offset;
        for part in data.chunks(MAX_RECORD as usize) {
            self.record_header(disk, KIND_DATA, off, part.len() as u32)?;
            self.put(part)?;
            self.records += 1;
            off += part.len() as u64;
        }
        self.data_bytes += data.len() as u64;
        Ok(())
    }

    /// A range that now reads as zeros (trim, write-zeroes).
    pub fn zero(&mut self, disk: u16, offset: u64, len: u64) -> io::Result<()> {
        Self::check(disk, offset, len)?;
        let step = (u32::MAX as u64) & !(LEAF_SIZE - 1);
        let mut off = offset;
        while off < offset + len {
            let n = (offset + len - off).min(step);
            self.record_header(disk, KIND_ZERO, off, n as u32)?;
            self.records += 1;
            off += n;
        }
        Ok(())
    }

    /// End with what the file closes, checksum, fsync and rename into place.
    pub fn finish(mut self, closes: Closes, barrier_ns: u64) -> io::Result<PathBuf> {
        self.record_header(END, closes.code(), barrier_ns, 0)?;
        let sum = self.hasher.finalize();
        self.out.write_all(sum.as_bytes())?;
        let f = self.out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        rebound_disk::crashsafe::durable_rename(&self.tmp, &self.path)?;
        Ok(self.path)
    }

    /// Drop the unfinished file.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn temp_path(path: &Path) -> PathBuf {
    rebound_disk::crashsafe::temp_path(path)
}

/// Check the whole file's checksum and return its header.
pub fn verify(path: &Path) -> Result<Header, ChangesetError> {
    let len = std::fs::metadata(path)?.len();
    if len < (8 + 4 + RECORD_HEADER + 32) as u64 {
        return Err(ChangesetError::Invalid(format!("{len} bytes is too short")));
    }
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut hasher = blake3::Hasher::new();
    let mut left = len - 32;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        r.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    let mut sum = [0u8; 32];
    r.read_exact(&mut sum)?;
    if hasher.finalize().as_bytes() != &sum {
        return Err(ChangesetError::Invalid(
            "checksum mismatch (incomplete or corrupt)".into(),
        ));
    }
    let f = File::open(path)?;
    let mut end = [0u8; RECORD_HEADER];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut end, len - 32 - RECORD_HEADER as u64)?;
    let mut h = read_header(&mut BufReader::new(f))?;
    close_from(&mut h, &end)?;
    Ok(h)
}

fn close_from(h: &mut Header, end: &[u8; RECORD_HEADER]) -> Result<(), ChangesetError> {
    if u16::from_le_bytes([end[0], end[1]]) != END {
        return Err(ChangesetError::Invalid("no end record".into()));
    }
    h.closes = Closes::from_code(u16::from_le_bytes([end[2], end[3]]))
        .ok_or_else(|| ChangesetError::Invalid("unknown point kind".into()))?;
    h.barrier_ns = u64::from_le_bytes(end[4..12].try_into().unwrap_or_default());
    Ok(())
}

fn read_header(r: &mut impl Read) -> Result<Header, ChangesetError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(ChangesetError::Invalid(if magic.starts_with(b"RBCSET") {
            format!(
                "changeset format {} (this version reads {})",
                String::from_utf8_lossy(&magic[6..]),
                String::from_utf8_lossy(&MAGIC[6..])
            )
        } else {
            "not a changeset file".into()
        }));
    }
    let mut n = [0u8; 4];
    r.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n);
    if n > MAX_HEADER {
        return Err(ChangesetError::Invalid(format!("header of {n} bytes")));
    }
    let mut h = vec![0u8; n as usize];
    r.read_exact(&mut h)?;
    let o: Opening =
        serde_json::from_slice(&h).map_err(|e| ChangesetError::Invalid(format!("header: {e}")))?;
    Ok(Header {
        item: o.item,
        agent: o.agent,
        seq: o.seq,
        barrier_ns: 0,
        closes: Closes::Nothing,
        restart: o.restart,
        disk_sizes: o.disk_sizes,
    })
}

/// Remembers what [`verify`] said of each file, so a queue scanned every
/// few milliseconds hashes each complete file once, not on every scan. A
/// success is kept while the file's length and mtime stay the same; a
/// failure only briefly (a file still arriving may keep its length and,
/// within the kernel's timestamp granularity, its mtime).
#[derive(Default)]
pub struct VerifyCache {
    seen: std::collections::HashMap<PathBuf, Seen>,
}

enum Seen {
    Complete(u64, std::time::SystemTime, Header),
    Invalid(std::time::Instant),
}

/// How long an invalid verdict stands before the file is hashed again.
const INVALID_FOR: std::time::Duration = std::time::Duration::from_millis(250);

impl VerifyCache {
    pub fn verify(&mut self, path: &Path) -> Result<Header, ChangesetError> {
        let m = std::fs::metadata(path)?;
        let (len, mtime) = (m.len(), m.modified()?);
        match self.seen.get(path) {
            Some(Seen::Complete(l, t, h)) if (*l, *t) == (len, mtime) => return Ok(h.clone()),
            Some(Seen::Invalid(at)) if at.elapsed() < INVALID_FOR => {
                return Err(ChangesetError::Invalid(
                    "checksum mismatch (incomplete or corrupt)".into(),
                ));
            }
            _ => {}
        }
        let r = verify(path);
        match &r {
            Ok(h) => {
                self.seen
                    .insert(path.to_path_buf(), Seen::Complete(len, mtime, h.clone()));
            }
            Err(ChangesetError::Invalid(_)) => {
                self.seen
                    .insert(path.to_path_buf(), Seen::Invalid(std::time::Instant::now()));
            }
            Err(_) => {}
        }
        r
    }

    /// Forget files that are gone.
    pub fn retain_existing(&mut self) {
        self.seen.retain(|p, _| p.exists());
    }
}

/// The opening header of a file, unverified (what a sender needs to name
/// it; receivers [`verify`]).
pub fn header_of(path: &Path) -> Result<Header, ChangesetError> {
    read_header(&mut BufReader::new(File::open(path)?))
}

/// Read a verified changeset's records in order.
pub fn read_records(
    path: &Path,
    mut f: impl FnMut(Record) -> Result<(), ChangesetError>,
) -> Result<Header, ChangesetError> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut header = read_header(&mut r)?;
    loop {
        let mut rec = [0u8; RECORD_HEADER];
        r.read_exact(&mut rec)?;
        let disk = u16::from_le_bytes([rec[0], rec[1]]);
        let kind = u16::from_le_bytes([rec[2], rec[3]]);
        let offset = u64::from_le_bytes(rec[4..12].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(rec[12..16].try_into().unwrap_or_default());
        if disk == END {
            close_from(&mut header, &rec)?;
            return Ok(header);
        }
        let size = header
            .disk_sizes
            .get(disk as usize)
            .copied()
            .ok_or_else(|| ChangesetError::Invalid(format!("record for disk {disk}")))?;
        if (kind == KIND_DATA && len > MAX_RECORD)
            || kind > KIND_ZERO
            || !offset.is_multiple_of(LEAF_SIZE)
            || !(len as u64).is_multiple_of(LEAF_SIZE)
            || offset.saturating_add(len as u64) > size.next_multiple_of(LEAF_SIZE)
        {
            return Err(ChangesetError::Invalid(format!(
                "record disk {disk} kind {kind} offset {offset} length {len}"
            )));
        }
        if kind == KIND_ZERO {
            f(Record::Zero {
                disk,
                offset,
                len: len as u64,
            })?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        f(Record::Data { disk, offset, data })?;
    }
}

/// File name of a changeset in a queue directory: sorts in sequence order.
pub fn file_name(seq: u64) -> String {
    format!("{seq:020}.cs")
}

/// The changeset files of a queue directory, in sequence order.
pub fn queued(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name.strip_suffix(".cs").and_then(|s| s.parse::<u64>().ok()) {
            out.push((seq, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Bytes of the changeset files of a queue directory.
pub fn queued_bytes(dir: &Path) -> u64 {
    queued(dir)
        .map(|q| {
            q.iter()
                .filter_map(|(_, p)| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            item: "vm1".into(),
            agent: "a1".into(),
            seq: 7,
            barrier_ns: 123,
            closes: Closes::CrashConsistent,
            restart: false,
            disk_sizes: vec![1 << 20, 1 << 20],
        }
    }

    fn read_all(p: &Path) -> Result<Vec<Record>, ChangesetError> {
        let mut got = Vec::new();
        read_records(p, |r| {
            got.push(r);
            Ok(())
        })?;
        Ok(got)
    }

    #[test]
    fn round_trip_and_corruption_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join(file_name(7));
        let mut w = Writer::create(&p, &header())?;
        w.data(0, 4096, &[1u8; 8192])?;
        w.zero(1, 8192, 4096)?;
        w.data(1, 0, &[2u8; 4096])?;
        w.finish(Closes::CrashConsistent, 123)?;
        assert_eq!(verify(&p)?, header());
        assert_eq!(
            read_all(&p)?,
            vec![
                Record::Data {
                    disk: 0,
                    offset: 4096,
                    data: vec![1u8; 8192]
                },
                Record::Zero {
                    disk: 1,
                    offset: 8192,
                    len: 4096
                },
                Record::Data {
                    disk: 1,
                    offset: 0,
                    data: vec![2u8; 4096]
                },
            ]
        );
        assert_eq!(queued(dir.path())?, vec![(7, p.clone())]);

        // One flipped byte anywhere: refused.
        let mut bytes = std::fs::read(&p)?;
        bytes[100] ^= 1;
        std::fs::write(&p, &bytes)?;
        assert!(matches!(verify(&p), Err(ChangesetError::Invalid(_))));
        // Truncated (still arriving): refused.
        std::fs::write(&p, &bytes[..bytes.len() / 2])?;
        assert!(matches!(verify(&p), Err(ChangesetError::Invalid(_))));
        Ok(())
    }

    #[test]
    fn unaligned_records_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut w = Writer::create(&dir.path().join("x.cs"), &header())?;
        assert!(w.data(0, 100, &[0u8; 4096]).is_err());
        assert!(w.data(0, 0, &[0u8; 100]).is_err());
        assert!(w.zero(0, 0, 100).is_err());
        w.abandon();
        Ok(())
    }

    /// The layout is a format of ours: these bytes must not change without
    /// a new magic.
    #[test]
    fn golden_bytes() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join(file_name(1));
        let h = Header {
            item: "i".into(),
            agent: "a".into(),
            seq: 1,
            barrier_ns: 2,
            closes: Closes::AppConsistent,
            restart: true,
            disk_sizes: vec![8192],
        };
        let mut w = Writer::create(&p, &h)?;
        w.data(0, 4096, &[0xAB; 4096])?;
        w.zero(0, 0, 4096)?;
        w.finish(Closes::AppConsistent, 2)?;
        let b = std::fs::read(&p)?;
        let json = br#"{"item":"i","agent":"a","seq":1,"restart":true,"disk_sizes":[8192]}"#;
        let mut want = Vec::new();
        want.extend_from_slice(b"RBCSET02");
        want.extend_from_slice(&(json.len() as u32).to_le_bytes());
        want.extend_from_slice(json);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]);
        want.extend_from_slice(&[0xAB; 4096]);
        want.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]);
        want.extend_from_slice(&[0xFF, 0xFF, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let sum = blake3::hash(&want);
        want.extend_from_slice(sum.as_bytes());
        assert_eq!(b, want);
        let read = verify(&p)?;
        assert_eq!(
            (read.closes, read.barrier_ns, read.restart),
            (Closes::AppConsistent, 2, true)
        );
        // The old format is refused with a clear message.
        let mut old = b.clone();
        old[7] = b'1';
        std::fs::write(&p, &old)?;
        let e = read_records(&p, |_| Ok(())).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("format 01")),
            "{e:?}"
        );
        Ok(())
    }
}
