use rebound_types::{Coded, ErrorCode};
use std::io;
use std::path::PathBuf;

/// A journal operation failed. Callers must tell these cases apart: a full
/// volume is retried after space is freed, a corrupt record makes later points
/// unusable, a locked journal means another writer runs.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("no journal for item {item:?} in {volume}")]
    Missing { volume: PathBuf, item: String },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    #[error("{path}: corrupt record at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("{path}: retention volume full")]
    VolumeFull { path: PathBuf },
    #[error("recovery point {0} not found")]
    PointNotFound(u64),
    #[error("recovery point {id} is unusable: {why}")]
    PointUnusable { id: u64, why: String },
    #[error("{path}: journal is locked by another writer")]
    Locked { path: PathBuf },
    #[error("invalid changeset: {0}")]
    InvalidChangeset(String),
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("journal is read-only or must be reopened after an earlier failure: {0}")]
    NotWritable(String),
    #[error("{path}: {what}")]
    Target { path: PathBuf, what: String },
    /// A materialise output disk failed (its own code: no space, read-only...).
    #[error(transparent)]
    Disk(rebound_disk::DiskError),
}

impl JournalError {
    /// Classify an IO error: ENOSPC and EDQUOT mean a full retention volume.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> JournalError {
        let path = path.into();
        match rustix::io::Errno::from_io_error(&source) {
            Some(rustix::io::Errno::NOSPC) | Some(rustix::io::Errno::DQUOT) => {
                JournalError::VolumeFull { path }
            }
            _ => JournalError::Io { path, op, source },
        }
    }
}

impl Coded for JournalError {
    fn code(&self) -> ErrorCode {
        match self {
            JournalError::Missing { .. } => ErrorCode::JournalMissing,
            JournalError::Format { .. } => ErrorCode::JournalFormat,
            JournalError::Corrupt { .. } => ErrorCode::JournalCorrupt,
            JournalError::VolumeFull { .. } => ErrorCode::RetentionVolumeFull,
            JournalError::PointNotFound(_) => ErrorCode::PointNotFound,
            JournalError::PointUnusable { .. } => ErrorCode::PointUnusable,
            JournalError::Locked { .. } => ErrorCode::JournalLocked,
            JournalError::InvalidChangeset(_) => ErrorCode::ChangesetInvalid,
            JournalError::Io { .. } | JournalError::NotWritable(_) => ErrorCode::JournalIo,
            JournalError::Target { .. } => ErrorCode::MaterialiseTarget,
            JournalError::Disk(e) => e.code(),
        }
    }
}

pub type Result<T, E = JournalError> = std::result::Result<T, E>;
