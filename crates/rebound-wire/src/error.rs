use rebound_types::{Coded, ErrorCode};
use std::io;

/// What can go wrong on a connection. Each case maps to a stable code.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the connection {during}")]
    Closed { during: &'static str },
    #[error("network error {during}: {source}")]
    Io {
        during: &'static str,
        source: io::Error,
    },
    #[error("corrupt frame: {0}")]
    Corrupt(String),
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: u64, limit: u64 },
    #[error(
        "no common protocol version: we speak {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}"
    )]
    Version {
        ours_min: u16,
        ours_max: u16,
        theirs_min: u16,
        theirs_max: u16,
    },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("unexpected message: {0}")]
    Protocol(String),
    /// The peer reported an error of its own.
    #[error("the peer reports E{code}: {message}")]
    Remote { code: u32, message: String },
}

impl WireError {
    pub(crate) fn io(during: &'static str, e: io::Error) -> WireError {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => WireError::Closed { during },
            _ => WireError::Io { during, source: e },
        }
    }
}

impl Coded for WireError {
    fn code(&self) -> ErrorCode {
        match self {
            WireError::Closed { .. } => ErrorCode::PeerClosed,
            WireError::Io { .. } => ErrorCode::PeerClosed,
            WireError::Corrupt(_) => ErrorCode::CorruptFrame,
            WireError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::Version { .. } => ErrorCode::VersionMismatch,
            WireError::Auth(_) => ErrorCode::AuthFailed,
            WireError::Protocol(_) => ErrorCode::ProtocolViolation,
            WireError::Remote { code, .. } => {
                ErrorCode::from_number(*code).unwrap_or(ErrorCode::ProtocolViolation)
            }
        }
    }
}
