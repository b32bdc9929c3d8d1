//! The changeset file: the leaves one replication cycle changed, as they
//! were at the cycle's barrier, on their way from an agent through a process
//! server to a master target.
//!
//! ```text
//! "RBCSET01"  header_len:u32le  header (JSON)
//! { disk:u16le offset:u64le len:u32le data[len] }*    (offset, len: 4 KiB multiples)
//! 0xFFFF 0:u64 0:u32                                  end of records
//! blake3(everything before):[u8; 32]
//! ```
//!
//! The trailing BLAKE3 covers the whole file, so a file still being
//! transferred, torn by a crash or corrupted on disk is refused whole: it is
//! never applied in part.

use rebound_types::LEAF_SIZE;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RBCSET01";
const END: u16 = 0xFFFF;
/// Bounds what a reader accepts, whatever the file says.
const MAX_HEADER: u32 = 1 << 20;
const MAX_RECORD: u32 = 64 << 20;

/// Kind of recovery point a changeset closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Closes {
    CrashConsistent,
    AppConsistent,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub item: String,
    /// Cycle number of the sending agent; the master target applies each
    /// once, in order.
    pub seq: u64,
    /// The cycle's barrier, ns since the UNIX epoch.
    pub barrier_ns: u64,
    pub closes: Closes,
    /// Size of each disk of the machine, in its disk order.
    pub disk_sizes: Vec<u64>,
}

#[derive(Debug)]
pub enum ChangesetError {
    Io(io::Error),
    /// Incomplete, torn or corrupt: the checksum or the structure is wrong.
    Invalid(String),
}

impl std::fmt::Display for ChangesetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangesetError::Io(e) => write!(f, "{e}"),
            ChangesetError::Invalid(m) => write!(f, "invalid changeset: {m}"),
        }
    }
}

impl std::error::Error for ChangesetError {}

impl From<io::Error> for ChangesetError {
    fn from(e: io::Error) -> Self {
        ChangesetError::Io(e)
    }
}

/// Writes a changeset to `<path>.tmp`, then makes it durable under `path`.
pub struct Writer {
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    tmp: PathBuf,
    path: PathBuf,
    pub data_bytes: u64,
}

impl Writer {
    pub fn create(path: &Path, header: &Header) -> io::Result<Writer> {
        let tmp = rebound_disk::crashsafe::temp_path(path);
        let f = File::create(&tmp)?;
        let mut w = Writer {
            out: BufWriter::with_capacity(1 << 20, f),
            hasher: blake3::Hasher::new(),
            tmp,
            path: path.to_path_buf(),
            data_bytes: 0,
        };
        let h = serde_json::to_vec(header).map_err(io::Error::other)?;
        w.put(MAGIC)?;
        w.put(&(h.len() as u32).to_le_bytes())?;
        w.put(&h)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.hasher.update(b);
        self.out.write_all(b)
    }

    /// One run of changed leaves.
    pub fn record(&mut self, disk: u16, offset: u64, data: &[u8]) -> io::Result<()> {
        if disk == END
            || !offset.is_multiple_of(LEAF_SIZE)
            || !(data.len() as u64).is_multiple_of(LEAF_SIZE)
        {
            return Err(io::Error::other("changeset records are whole 4 KiB leaves"));
        }
        for part in data.chunks(MAX_RECORD as usize) {
            self.put(&disk.to_le_bytes())?;
            self.put(&offset.to_le_bytes())?;
            self.put(&(part.len() as u32).to_le_bytes())?;
            self.put(part)?;
        }
        self.data_bytes += data.len() as u64;
        Ok(())
    }

    /// End, checksum, fsync and rename into place.
    pub fn finish(mut self) -> io::Result<PathBuf> {
        self.put(&END.to_le_bytes())?;
        self.put(&0u64.to_le_bytes())?;
        self.put(&0u32.to_le_bytes())?;
        let sum = self.hasher.finalize();
        self.out.write_all(sum.as_bytes())?;
        let f = self.out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        rebound_disk::crashsafe::durable_rename(&self.tmp, &self.path)?;
        Ok(self.path)
    }
}

/// Check the whole file's checksum and return its header.
pub fn verify(path: &Path) -> Result<Header, ChangesetError> {
    let len = std::fs::metadata(path)?.len();
    if len < 8 + 4 + 14 + 32 {
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
    let mut r = BufReader::new(File::open(path)?);
    read_header(&mut r)
}

fn read_header(r: &mut impl Read) -> Result<Header, ChangesetError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(ChangesetError::Invalid("not a changeset file".into()));
    }
    let mut n = [0u8; 4];
    r.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n);
    if n > MAX_HEADER {
        return Err(ChangesetError::Invalid(format!("header of {n} bytes")));
    }
    let mut h = vec![0u8; n as usize];
    r.read_exact(&mut h)?;
    serde_json::from_slice(&h).map_err(|e| ChangesetError::Invalid(format!("header: {e}")))
}

/// Read a verified changeset's records in order.
pub fn read_records(
    path: &Path,
    mut f: impl FnMut(u16, u64, Vec<u8>) -> Result<(), ChangesetError>,
) -> Result<Header, ChangesetError> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let header = read_header(&mut r)?;
    loop {
        let mut rec = [0u8; 14];
        r.read_exact(&mut rec)?;
        let disk = u16::from_le_bytes([rec[0], rec[1]]);
        let offset = u64::from_le_bytes(rec[2..10].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(rec[10..14].try_into().unwrap_or_default());
        if disk == END {
            return Ok(header);
        }
        let size = header
            .disk_sizes
            .get(disk as usize)
            .copied()
            .ok_or_else(|| ChangesetError::Invalid(format!("record for disk {disk}")))?;
        if len > MAX_RECORD
            || !offset.is_multiple_of(LEAF_SIZE)
            || !(len as u64).is_multiple_of(LEAF_SIZE)
            || offset.saturating_add(len as u64) > size.next_multiple_of(LEAF_SIZE)
        {
            return Err(ChangesetError::Invalid(format!(
                "record disk {disk} offset {offset} length {len}"
            )));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        f(disk, offset, data)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            item: "vm1".into(),
            seq: 7,
            barrier_ns: 123,
            closes: Closes::CrashConsistent,
            disk_sizes: vec![1 << 20, 1 << 20],
        }
    }

    #[test]
    fn round_trip_and_corruption_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join(file_name(7));
        let mut w = Writer::create(&p, &header())?;
        w.record(0, 4096, &[1u8; 8192])?;
        w.record(1, 0, &[2u8; 4096])?;
        w.finish()?;
        assert_eq!(verify(&p)?, header());
        let mut got = Vec::new();
        read_records(&p, |d, o, data| {
            got.push((d, o, data.len(), data[0]));
            Ok(())
        })?;
        assert_eq!(got, vec![(0, 4096, 8192, 1), (1, 0, 4096, 2)]);
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
        assert!(w.record(0, 100, &[0u8; 4096]).is_err());
        assert!(w.record(0, 0, &[0u8; 100]).is_err());
        Ok(())
    }
}
