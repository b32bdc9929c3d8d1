use rebound_types::{Coded, ErrorCode};
use std::io;

/// Failures of the server itself (not of one request: those become NBD
/// errnos on the wire).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error("invalid listen address {0:?}: expected unix:PATH or tcp:HOST:PORT")]
    BadAddress(String),
    #[error("export name {0:?} is used twice")]
    DuplicateExport(String),
    #[error("client broke the protocol: {0}")]
    Protocol(String),
    #[error("connection IO: {0}")]
    Io(#[from] io::Error),
}

impl Coded for NbdError {
    fn code(&self) -> ErrorCode {
        match self {
            NbdError::Listen { .. } => ErrorCode::NbdListenFailed,
            NbdError::BadAddress(_) => ErrorCode::InvalidArgument,
            NbdError::DuplicateExport(_) => ErrorCode::NbdExportDuplicate,
            NbdError::Protocol(_) => ErrorCode::NbdProtocol,
            NbdError::Io(_) => ErrorCode::PeerClosed,
        }
    }
}
