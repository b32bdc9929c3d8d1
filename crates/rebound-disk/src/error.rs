use rebound_types::{Coded, ErrorCode};
use std::io;
use std::path::PathBuf;

/// A disk operation failed. The variants are the cases callers and operators
/// must tell apart; each maps to a stable code.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: no such disk")]
    Missing { path: PathBuf },
    #[error("{path}: not a raw image or block device ({what})")]
    NotADisk { path: PathBuf, what: &'static str },
    #[error("{path}: cannot write: {source}")]
    ReadOnly { path: PathBuf, source: io::Error },
    #[error("{path}: no space left on the filesystem")]
    NoSpace { path: PathBuf },
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
}

impl DiskError {
    /// Classify an IO error on `path` during `op`.
    pub fn from_io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> DiskError {
        let path = path.into();
        use rustix::io::Errno;
        match Errno::from_io_error(&source) {
            Some(Errno::NOSPC) | Some(Errno::DQUOT) => DiskError::NoSpace { path },
            Some(Errno::ROFS) | Some(Errno::ACCESS) | Some(Errno::PERM) => {
                DiskError::ReadOnly { path, source }
            }
            _ => DiskError::Io { path, op, source },
        }
    }
}

impl Coded for DiskError {
    fn code(&self) -> ErrorCode {
        match self {
            DiskError::Missing { .. } => ErrorCode::SourceMissing,
            DiskError::NotADisk { .. } => ErrorCode::NotADisk,
            DiskError::ReadOnly { .. } => ErrorCode::DestinationReadOnly,
            DiskError::NoSpace { .. } => ErrorCode::NoSpace,
            DiskError::Io { .. } => ErrorCode::DiskIo,
        }
    }
}
