use rebound_disk::DiskError;
use rebound_types::{Coded, ErrorCode};
use rebound_wire::WireError;

/// Why a sync failed. Callers tell these apart: a mismatch is never a
/// success, a wire or disk failure leaves a resumable destination.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("verification failed: {0}")]
    Mismatch(String),
    #[error("the destination ({dest} bytes) is larger than the source ({src} bytes)")]
    Shrink { src: u64, dest: u64 },
    #[error("resume state: {0}")]
    State(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no disk named {0:?} on the server")]
    NotFound(String),
    #[error("the source changed while it was read: {0}")]
    SourceChanged(String),
    #[error("the cache under {dir:?} holds {used} bytes of its {limit}: no room for {size} more")]
    QuotaFull {
        dir: &'static str,
        used: u64,
        limit: u64,
        size: u64,
    },
    /// An error the peer reported, with its code.
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
}

impl Coded for SyncError {
    fn code(&self) -> ErrorCode {
        match self {
            SyncError::Disk(e) => e.code(),
            SyncError::Wire(e) => e.code(),
            SyncError::Mismatch(_) => ErrorCode::VerifyMismatch,
            SyncError::Shrink { .. } => ErrorCode::ShrinkRefused,
            SyncError::State(_) => ErrorCode::ResumeStateInvalid,
            SyncError::Invalid(_) => ErrorCode::InvalidArgument,
            SyncError::NotFound(_) => ErrorCode::ExportNotFound,
            SyncError::SourceChanged(_) => ErrorCode::SourceChanged,
            SyncError::QuotaFull { .. } => ErrorCode::CacheFull,
            SyncError::Remote { code, .. } => *code,
        }
    }
}

impl SyncError {
    /// The message to send to the peer before giving up.
    pub fn to_msg(&self) -> rebound_wire::Msg {
        rebound_wire::Msg::Error {
            code: self.code().number(),
            message: self.to_string(),
        }
    }

    /// Turn a peer's `Error` message into an error of ours.
    pub fn from_remote(code: u32, message: String) -> SyncError {
        match ErrorCode::from_number(code) {
            Some(code) => SyncError::Remote {
                code,
                message: format!("the peer reports: {message}"),
            },
            None => SyncError::Wire(WireError::Remote { code, message }),
        }
    }
}
