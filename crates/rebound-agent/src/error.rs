use rebound_disk::DiskError;
use rebound_types::{Coded, ErrorCode};
use std::io;
use std::path::PathBuf;

/// Failures of the agent's export and its dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("dirty-tracking state {path}: {op} failed: {source}")]
    StateIo {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("dirty-tracking state {path} is locked by another agent")]
    StateLocked { path: PathBuf },
    #[error("dirty tracking of {path} stopped after an earlier state IO error; writes are refused")]
    StateFailed { path: PathBuf },
    #[error("export is closed")]
    Closed,
    #[error("a block device needs --state-dir for its dirty-tracking state: {0}")]
    NoStateDir(PathBuf),
    #[error(transparent)]
    Disk(#[from] DiskError),
}

impl AgentError {
    pub(crate) fn state(path: &std::path::Path, op: &'static str, source: io::Error) -> AgentError {
        AgentError::StateIo {
            path: path.into(),
            op,
            source,
        }
    }
}

impl Coded for AgentError {
    fn code(&self) -> ErrorCode {
        match self {
            AgentError::StateIo { .. } | AgentError::StateFailed { .. } | AgentError::Closed => {
                ErrorCode::DirtyStateIo
            }
            AgentError::StateLocked { .. } => ErrorCode::DirtyStateLocked,
            AgentError::NoStateDir(_) => ErrorCode::InvalidArgument,
            AgentError::Disk(e) => e.code(),
        }
    }
}
