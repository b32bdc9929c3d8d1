//! Persistent resume state of one side of a sync.
//!
//! A directory holds `meta.json` (session id and the identity of the disks)
//! and `chunks.log`, an append-only log of fixed records `(chunk index,
//! BLAKE3 of the chunk, crc32c)`. A destination appends a record only after
//! the chunk's data is fsynced; a source as its chunks end (its hashes are
//! facts about the source alone; a resume starts at the shorter of the two
//! logs). The valid prefix of the log is the cursor: a torn or
//! corrupt tail is cut off, so a crash at any moment loses at most the chunks
//! after the last fsync, which the next run compares again.

use crate::SyncError;
use rebound_disk::crashsafe;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const RECORD: usize = 8 + 32 + 4;
const META_VERSION: u32 = 1;

/// What the state is about: if any of it changed, the state is stale.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    /// `source` or `destination`.
    pub role: String,
    /// The disk's path or export name on this side.
    pub disk: String,
    pub dev: u64,
    pub ino: u64,
    /// Size of the source disk (the size of the sync).
    pub size: u64,
    /// Modification time of the source (ns), on the source side only: a
    /// source written to between runs must not be resumed.
    pub mtime_ns: Option<i128>,
    pub full: bool,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    version: u32,
    session: String,
    identity: Identity,
}

/// An open resume state.
pub struct SideState {
    dir: PathBuf,
    log: File,
    pub session: [u8; 16],
    /// BLAKE3 of chunks `0..hashes.len()`, all durable.
    pub hashes: Vec<[u8; 32]>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn new_session_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_err()
    {
        // Unique enough without entropy: time and pid.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id.copy_from_slice(
            &blake3::hash(format!("{t}-{}", std::process::id()).as_bytes()).as_bytes()[..16],
        );
    }
    id
}

fn state_err(dir: &Path, what: impl std::fmt::Display) -> SyncError {
    SyncError::State(format!("{}: {what}", dir.display()))
}

impl SideState {
    /// Load the state in `dir` if it exists and matches `identity`. A state
    /// that does not match, or whose meta is unreadable, is discarded (the
    /// sync then compares everything again, which is always safe).
    pub fn load(dir: &Path, identity: &Identity) -> Result<Option<SideState>, SyncError> {
        let meta_path = dir.join("meta.json");
        let Ok(text) = std::fs::read_to_string(&meta_path) else {
            return Ok(None);
        };
        let meta: Meta = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "discarding unreadable resume state");
                return Ok(None);
            }
        };
        let Some(session) = unhex16(&meta.session) else {
            return Ok(None);
        };
        if meta.version != META_VERSION || &meta.identity != identity {
            tracing::info!(dir = %dir.display(), "resume state belongs to other disks; starting over");
            return Ok(None);
        }
        let log_path = dir.join("chunks.log");
        let mut raw = Vec::new();
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| state_err(dir, e))?;
        log.read_to_end(&mut raw).map_err(|e| state_err(dir, e))?;
        let mut hashes = Vec::new();
        for rec in raw.chunks_exact(RECORD) {
            let idx =
                u64::from_le_bytes(rec[..8].try_into().map_err(|_| state_err(dir, "record"))?);
            let crc = u32::from_le_bytes(
                rec[40..44]
                    .try_into()
                    .map_err(|_| state_err(dir, "record"))?,
            );
            if crc != crc32c::crc32c(&rec[..40]) || idx != hashes.len() as u64 {
                break;
            }
            let mut h = [0u8; 32];
            h.copy_from_slice(&rec[8..40]);
            hashes.push(h);
        }
        let valid = (hashes.len() * RECORD) as u64;
        if valid != raw.len() as u64 {
            tracing::warn!(dir = %dir.display(), kept = hashes.len(), "cutting a torn or corrupt tail off the resume log");
            log.set_len(valid).map_err(|e| state_err(dir, e))?;
            log.sync_all().map_err(|e| state_err(dir, e))?;
        }
        Ok(Some(SideState {
            dir: dir.into(),
            log,
            session,
            hashes,
        }))
    }

    /// Start a new state in `dir`, replacing whatever was there.
    pub fn create(
        dir: &Path,
        identity: &Identity,
        session: [u8; 16],
    ) -> Result<SideState, SyncError> {
        crashsafe::remove_dir_all_durable(dir).map_err(|e| state_err(dir, e))?;
        crashsafe::create_dir_all_durable(dir).map_err(|e| state_err(dir, e))?;
        let log_path = dir.join("chunks.log");
        let log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .map_err(|e| state_err(dir, e))?;
        log.sync_all().map_err(|e| state_err(dir, e))?;
        let meta = Meta {
            version: META_VERSION,
            session: hex(&session),
            identity: identity.clone(),
        };
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| state_err(dir, e))?;
        // meta.json is written last: a state without it is ignored.
        crashsafe::write_file_durable(&dir.join("meta.json"), &text)
            .map_err(|e| state_err(dir, e))?;
        Ok(SideState {
            dir: dir.into(),
            log,
            session,
            hashes: Vec::new(),
        })
    }

    pub fn chunks(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Forget chunks from `n` on (the other side has fewer).
    pub fn truncate(&mut self, n: u64) -> Result<(), SyncError> {
        if n < self.chunks() {
            self.hashes.truncate(n as usize);
            self.log
                .set_len(n * RECORD as u64)
                .map_err(|e| state_err(&self.dir, e))?;
            self.log.sync_all().map_err(|e| state_err(&self.dir, e))?;
        }
        Ok(())
    }

    /// Record that chunks `self.chunks()..` with these hashes are durable.
    pub fn append(&mut self, hashes: &[[u8; 32]]) -> Result<(), SyncError> {
        if hashes.is_empty() {
            return Ok(());
        }
        let mut raw = Vec::with_capacity(hashes.len() * RECORD);
        for (i, h) in hashes.iter().enumerate() {
            let start = raw.len();
            raw.extend_from_slice(&(self.chunks() + i as u64).to_le_bytes());
            raw.extend_from_slice(h);
            let crc = crc32c::crc32c(&raw[start..]);
            raw.extend_from_slice(&crc.to_le_bytes());
        }
        self.log
            .write_all(&raw)
            .map_err(|e| state_err(&self.dir, e))?;
        self.log.sync_data().map_err(|e| state_err(&self.dir, e))?;
        self.hashes.extend_from_slice(hashes);
        Ok(())
    }

    /// The sync finished: the state is no longer needed.
    pub fn remove(self) -> Result<(), SyncError> {
        crashsafe::remove_dir_all_durable(&self.dir).map_err(|e| state_err(&self.dir, e))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The identity of a disk file for resume checks.
pub fn identity(
    role: &str,
    name: &str,
    file: &File,
    size: u64,
    full: bool,
    with_mtime: bool,
) -> Identity {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().ok();
    Identity {
        role: role.into(),
        disk: name.into(),
        dev: m.as_ref().map(|m| m.dev()).unwrap_or(0),
        ino: m.as_ref().map(|m| m.ino()).unwrap_or(0),
        size,
        mtime_ns: if with_mtime {
            m.as_ref()
                .map(|m| i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()))
        } else {
            None
        },
        full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident() -> Identity {
        Identity {
            role: "destination".into(),
            disk: "d".into(),
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: None,
            full: false,
        }
    }

    #[test]
    fn append_reload_and_cut_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("s");
        let mut s = SideState::create(&d, &ident(), [5; 16]).unwrap();
        s.append(&[[1; 32], [2; 32]]).unwrap();
        s.append(&[[3; 32]]).unwrap();
        drop(s);
        // A torn record at the end.
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.join("chunks.log"))
            .unwrap();
        f.write_all(&[9; 20]).unwrap();
        let s = SideState::load(&d, &ident()).unwrap().unwrap();
        assert_eq!(s.session, [5; 16]);
        assert_eq!(s.hashes, vec![[1; 32], [2; 32], [3; 32]]);
        assert_eq!(
            std::fs::metadata(d.join("chunks.log")).unwrap().len(),
            3 * RECORD as u64
        );
        // Corrupt the middle record: the cursor stops before it.
        let mut raw = std::fs::read(d.join("chunks.log")).unwrap();
        raw[RECORD + 10] ^= 1;
        std::fs::write(d.join("chunks.log"), raw).unwrap();
        let mut s = SideState::load(&d, &ident()).unwrap().unwrap();
        assert_eq!(s.chunks(), 1);
        s.truncate(0).unwrap();
        // Another identity does not resume.
        let mut other = ident();
        other.size = 4;
        assert!(SideState::load(&d, &other).unwrap().is_none());
        s.remove().unwrap();
        assert!(!d.exists());
    }
}
