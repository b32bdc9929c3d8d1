//! The workload log: one append-only file of JSON lines, one record a line.
//!
//! ```text
//! {"type":"run","t":…,"disks":[SIZE,…],"inflight":4}
//! {"type":"epoch","epoch":1,"cut_ns":T}
//! {"type":"issued","id":7,"disk":0,"offset":40960,"blocks":3,"epoch":1,"t_issued":…}
//! {"type":"acked","id":7,"t_acked":…}
//! ```
//!
//! Times are nanoseconds since the UNIX epoch (CLOCK_REALTIME). `issued` is
//! appended before the write is sent, `acked` after its reply arrived. The
//! writer flushes and fdatasyncs about every 100 ms and at exit. A damaged
//! last line (a crash while appending; also a tail of NUL bytes) is ignored
//! when reading and cut off before appending again; a damaged line followed
//! by valid ones is an error.

use crate::error::TestkitError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// A workload run started: disk sizes in `--disk` order.
    Run {
        t: u64,
        disks: Vec<u64>,
        inflight: u32,
    },
    /// A new epoch: of the earlier epochs' writes, those issued after
    /// `cut_ns` never happened (the disks were rolled back to that point).
    Epoch {
        epoch: u32,
        cut_ns: u64,
    },
    Issued {
        id: u64,
        disk: u16,
        offset: u64,
        blocks: u32,
        epoch: u32,
        t_issued: u64,
    },
    Acked {
        id: u64,
        t_acked: u64,
    },
}

/// One write, from its `issued` and (maybe) `acked` records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WriteEntry {
    pub id: u64,
    pub disk: u16,
    pub offset: u64,
    pub blocks: u32,
    pub epoch: u32,
    pub t_issued: u64,
    pub t_acked: Option<u64>,
}

impl WriteEntry {
    /// The byte range it covers on its disk.
    pub fn end(&self) -> u64 {
        self.offset
            .saturating_add(u64::from(self.blocks) * crate::pattern::BLOCK as u64)
    }

    pub fn covers(&self, disk: u16, offset: u64) -> bool {
        self.disk == disk && offset >= self.offset && offset < self.end()
    }
}

/// An epoch record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EpochCut {
    pub epoch: u32,
    pub cut_ns: u64,
}

/// The whole log, read and checked.
#[derive(Clone, Debug, Default)]
pub struct Log {
    pub writes: BTreeMap<u64, WriteEntry>,
    /// Epoch records in log order (epochs strictly increasing).
    pub cuts: Vec<EpochCut>,
    /// The epoch new writes belong to: the last epoch record's, or 0.
    pub epoch: u32,
    /// Disk sizes of the last `run` record.
    pub disks: Vec<u64>,
    pub runs: u32,
    /// The last line was damaged and ignored.
    pub torn_tail: bool,
    /// Bytes of the file up to the end of the last valid line.
    pub valid_len: u64,
}

impl Log {
    /// Read and check the log at `path`; a missing file is an empty log.
    pub fn read(path: &Path) -> Result<Log, TestkitError> {
        match std::fs::read(path) {
            Ok(bytes) => Log::parse(&bytes, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Log::default()),
            Err(source) => Err(TestkitError::LogIo {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parse the bytes of a log (`path` only names it in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Log, TestkitError> {
        let mut log = Log::default();
        let mut pos = 0usize;
        let mut line_no = 0u64;
        while pos < bytes.len() {
            line_no += 1;
            let (line, next) = match bytes[pos..].iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[pos..pos + i], Some(pos + i + 1)),
                None => (&bytes[pos..], None),
            };
            let parsed = match next {
                // Without its newline a line is torn even when it parses.
                None => None,
                Some(_) => serde_json::from_slice::<Record>(line).ok(),
            };
            let Some(rec) = parsed else {
                let rest_blank = next.is_none_or(|n| {
                    bytes[n..]
                        .iter()
                        .all(|&b| b == 0 || b.is_ascii_whitespace())
                });
                if rest_blank {
                    log.torn_tail = bytes[pos..].iter().any(|&b| !b.is_ascii_whitespace());
                    break;
                }
                return Err(TestkitError::LogCorrupt {
                    path: path.to_path_buf(),
                    line: line_no,
                    reason: "not a valid record, and valid records follow it".into(),
                });
            };
            log.apply(rec).map_err(|reason| TestkitError::LogCorrupt {
                path: path.to_path_buf(),
                line: line_no,
                reason,
            })?;
            pos = next.unwrap_or(bytes.len());
            log.valid_len = pos as u64;
        }
        Ok(log)
    }

    fn apply(&mut self, rec: Record) -> Result<(), String> {
        match rec {
            Record::Run { disks, .. } => {
                self.disks = disks;
                self.runs += 1;
            }
            Record::Epoch { epoch, cut_ns } => {
                if epoch <= self.epoch {
                    return Err(format!(
                        "epoch {epoch} does not follow epoch {}",
                        self.epoch
                    ));
                }
                self.epoch = epoch;
                self.cuts.push(EpochCut { epoch, cut_ns });
            }
            Record::Issued {
                id,
                disk,
                offset,
                blocks,
                epoch,
                t_issued,
            } => {
                if epoch != self.epoch {
                    return Err(format!(
                        "write {id} carries epoch {epoch} but the log is in epoch {}",
                        self.epoch
                    ));
                }
                if blocks == 0 || offset % crate::pattern::BLOCK as u64 != 0 {
                    return Err(format!("write {id} is empty or unaligned"));
                }
                let w = WriteEntry {
                    id,
                    disk,
                    offset,
                    blocks,
                    epoch,
                    t_issued,
                    t_acked: None,
                };
                if self.writes.insert(id, w).is_some() {
                    return Err(format!("write id {id} is issued twice"));
                }
            }
            Record::Acked { id, t_acked } => {
                let w = self
                    .writes
                    .get_mut(&id)
                    .ok_or_else(|| format!("write {id} acknowledged but never issued"))?;
                if w.t_acked.is_some() {
                    return Err(format!("write {id} acknowledged twice"));
                }
                w.t_acked = Some(t_acked);
            }
        }
        Ok(())
    }

    /// The highest write id in the log (0 when empty).
    pub fn max_id(&self) -> u64 {
        self.writes.keys().next_back().copied().unwrap_or(0)
    }

    pub fn acked(&self) -> usize {
        self.writes.values().filter(|w| w.t_acked.is_some()).count()
    }
}

/// Nanoseconds since the UNIX epoch (CLOCK_REALTIME).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct Inner {
    w: BufWriter<File>,
    failed: bool,
}

/// Appends records; shared by the workers. Durable after [`LogWriter::sync`].
pub struct LogWriter {
    path: PathBuf,
    inner: Mutex<Inner>,
    file: File,
}

impl LogWriter {
    /// Open (or create) the log at `path` for appending: read what it holds,
    /// cut a torn last record off, and return both.
    pub fn open(path: &Path) -> Result<(LogWriter, Log), TestkitError> {
        let io = |source| TestkitError::LogIo {
            path: path.to_path_buf(),
            source,
        };
        let log = Log::read(path)?;
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        if file.metadata().map_err(io)?.len() != log.valid_len {
            file.set_len(log.valid_len).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        if !existed {
            file.sync_all().map_err(io)?;
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                rebound_disk::crashsafe::fsync_dir(dir).map_err(io)?;
            }
        }
        let append = OpenOptions::new().append(true).open(path).map_err(io)?;
        Ok((
            LogWriter {
                path: path.to_path_buf(),
                inner: Mutex::new(Inner {
                    w: BufWriter::with_capacity(256 << 10, append),
                    failed: false,
                }),
                file,
            },
            log,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> TestkitError {
        TestkitError::LogIo {
            path: self.path.clone(),
            source,
        }
    }

    /// Append one record (buffered).
    pub fn append(&self, rec: &Record) -> Result<(), TestkitError> {
        let mut line = serde_json::to_vec(rec).map_err(|e| self.io(std::io::Error::other(e)))?;
        line.push(b'\n');
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| self.io(std::io::Error::other("log writer poisoned")))?;
        if inner.failed {
            return Err(self.io(std::io::Error::other("an earlier write failed")));
        }
        inner.w.write_all(&line).map_err(|e| {
            inner.failed = true;
            self.io(e)
        })
    }

    /// Flush the buffer and fdatasync the file.
    pub fn sync(&self) -> Result<(), TestkitError> {
        {
            let mut inner = self
                .inner
                .lock()
                .map_err(|_| self.io(std::io::Error::other("log writer poisoned")))?;
            if let Err(e) = inner.w.flush() {
                inner.failed = true;
                return Err(self.io(e));
            }
        }
        self.file.sync_data().map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(id: u64, epoch: u32) -> Record {
        Record::Issued {
            id,
            disk: 0,
            offset: id * 4096,
            blocks: 1,
            epoch,
            t_issued: id * 10,
        }
    }

    #[test]
    fn round_trip_and_continue() -> Result<(), TestkitError> {
        let dir = tempfile::tempdir().map_err(|e| TestkitError::Invalid(e.to_string()))?;
        let path = dir.path().join("w.log");
        {
            let (w, log) = LogWriter::open(&path)?;
            assert_eq!(log.max_id(), 0);
            w.append(&Record::Run {
                t: 1,
                disks: vec![1 << 20],
                inflight: 1,
            })?;
            w.append(&issued(1, 0))?;
            w.append(&Record::Acked { id: 1, t_acked: 15 })?;
            w.append(&issued(2, 0))?;
            w.sync()?;
        }
        // A torn record at the end: ignored, then cut before appending.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"type\":\"acked\",\"id\":2,\"t_ac"))
            .map_err(|e| TestkitError::Invalid(e.to_string()))?;
        let (w, log) = LogWriter::open(&path)?;
        assert!(log.torn_tail);
        assert_eq!(log.max_id(), 2);
        assert_eq!(log.acked(), 1);
        assert_eq!(log.disks, vec![1 << 20]);
        w.append(&Record::Epoch {
            epoch: 1,
            cut_ns: 12,
        })?;
        w.append(&issued(3, 1))?;
        w.sync()?;
        drop(w);
        let log = Log::read(&path)?;
        assert!(!log.torn_tail);
        assert_eq!(log.epoch, 1);
        assert_eq!(
            log.cuts,
            vec![EpochCut {
                epoch: 1,
                cut_ns: 12
            }]
        );
        assert_eq!(log.writes.len(), 3);
        Ok(())
    }

    #[test]
    fn damage_before_the_end_is_an_error() {
        let p = Path::new("x.log");
        let good = b"{\"type\":\"issued\",\"id\":1,\"disk\":0,\"offset\":0,\"blocks\":1,\"epoch\":0,\"t_issued\":5}\n";
        let mut bytes = good.to_vec();
        bytes.extend_from_slice(b"garbage\n");
        bytes.extend_from_slice(b"{\"type\":\"acked\",\"id\":1,\"t_acked\":6}\n");
        assert!(matches!(
            Log::parse(&bytes, p),
            Err(TestkitError::LogCorrupt { line: 2, .. })
        ));
        // A NUL tail (crash after the size grew) is a torn tail.
        let mut nul = good.to_vec();
        nul.extend_from_slice(&[0u8; 300]);
        let log = Log::parse(&nul, p).ok();
        assert!(
            log.as_ref()
                .is_some_and(|l| l.torn_tail && l.writes.len() == 1)
        );
        // Semantic damage: an ack for an unknown write, an issue in the wrong epoch.
        assert!(Log::parse(b"{\"type\":\"acked\",\"id\":9,\"t_acked\":6}\n", p).is_err());
        let mut wrong_epoch = b"{\"type\":\"epoch\",\"epoch\":1,\"cut_ns\":3}\n".to_vec();
        wrong_epoch.extend_from_slice(good);
        assert!(Log::parse(&wrong_epoch, p).is_err());
    }
}
