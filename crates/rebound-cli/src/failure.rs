//! How the CLI ends on an error: the stable code, the message and the remedy on
//! stderr, and an exit status that scripts can rely on.
//!
//! Exit statuses: 0 success; 1 `diff` found differences; 2 invalid usage;
//! 3 failed with a coded error; 4 interrupted (run again to resume);
//! 5 verification found the disks different.
//! Configuration server client commands exit 3 with the server's code (e.g.
//! 4008 action not allowed, 4021 prechecks failed with every failure listed);
//! `--wait` and `jobs watch` exit 0 when the job succeeded or waits for an
//! operator, and 3 with the job's own code when it failed or was cancelled.

use rebound_types::{Coded, ErrorCode};
use std::fmt;
use std::process::ExitCode;

pub const EXIT_DIFFERENT: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_FAILED: u8 = 3;
pub const EXIT_INTERRUPTED: u8 = 4;
pub const EXIT_MISMATCH: u8 = 5;

/// An error with a stable code, raised at the CLI's edge.
#[derive(Debug)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl Coded for Failure {
    fn code(&self) -> ErrorCode {
        self.code
    }
}

/// Find the stable code of an error chain, if any link carries one.
pub fn code_of(err: &anyhow::Error) -> Option<ErrorCode> {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return Some(f.code);
        }
        if let Some(e) = cause.downcast_ref::<rebound_api::ApiError>() {
            return Some(e.error_code().unwrap_or(ErrorCode::BadResponse));
        }
        if let Some(e) = cause.downcast_ref::<rebound_journal::JournalError>() {
            return Some(e.code());
        }
        if let Some(e) = cause.downcast_ref::<rebound_disk::DiskError>() {
            return Some(e.code());
        }
        if let Some(e) = cause.downcast_ref::<rebound_agent::AgentError>() {
            return Some(e.code());
        }
        if let Some(e) = cause.downcast_ref::<rebound_nbd::NbdError>() {
            return Some(e.code());
        }
        if let Some(e) = cause.downcast_ref::<rebound_delta::SyncError>() {
            return Some(e.code());
        }
        if let Some(e) = cause.downcast_ref::<rebound_wire::WireError>() {
            return Some(e.code());
        }
    }
    None
}

pub fn exit_status(code: Option<ErrorCode>) -> u8 {
    match code {
        Some(ErrorCode::InvalidArgument) => EXIT_USAGE,
        Some(ErrorCode::Interrupted) | Some(ErrorCode::PeerClosed) => EXIT_INTERRUPTED,
        Some(ErrorCode::VerifyMismatch) => EXIT_MISMATCH,
        _ => EXIT_FAILED,
    }
}

/// Print the error for an operator and choose the exit status.
pub fn report(err: &anyhow::Error) -> ExitCode {
    let code = code_of(err);
    match code {
        Some(c) => {
            eprintln!("error E{} ({}): {err:#}", c.number(), c.name());
            eprintln!("remedy: {}", c.remedy());
        }
        None => eprintln!("error: {err:#}"),
    }
    ExitCode::from(exit_status(code))
}
