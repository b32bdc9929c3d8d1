use rebound_nbd::ClientError;
use rebound_types::{Coded, ErrorCode};
use std::io;
use std::path::PathBuf;

/// Failures of the workload and the checker (a verification that finds the
/// disks wrong is not an error: it is a report with violations).
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("workload log {path}: {source}")]
    LogIo { path: PathBuf, source: io::Error },
    #[error("workload log {path}, line {line}: {reason}")]
    LogCorrupt {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Nbd {
        what: String,
        #[source]
        source: ClientError,
    },
    #[error("{what}: {source}")]
    Disk {
        what: String,
        #[source]
        source: rebound_disk::DiskError,
    },
}

impl Coded for TestkitError {
    fn code(&self) -> ErrorCode {
        match self {
            TestkitError::LogIo { .. } | TestkitError::LogCorrupt { .. } => ErrorCode::WorkloadLog,
            TestkitError::Invalid(_) => ErrorCode::InvalidArgument,
            TestkitError::Nbd { source, .. } => source.code(),
            TestkitError::Disk { source, .. } => source.code(),
        }
    }
}
