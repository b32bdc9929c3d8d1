//! Data verification for tests, the demo and drills (DESIGN.md §9).
//!
//! [`workload`] writes [`pattern`] blocks through NBD with several writes in
//! flight and records every write in a durable [`log`]; [`verify`] reads the
//! disks back and checks them against the log: nothing torn or foreign,
//! every acknowledged write visible after a planned operation, and crash
//! consistency at an unplanned failover's point. Epoch records carry the
//! machine's history across failovers. [`lab`] starts a two-site lab of
//! real processes (configuration server, nodes, machines, workloads).

mod error;
pub mod lab;
pub mod log;
pub mod pattern;
pub mod verify;
pub mod workload;

#[cfg(test)]
mod tests;

pub use error::TestkitError;
pub use log::{EpochCut, Log, LogWriter, Record, WriteEntry, now_ns};
pub use verify::{
    DiskReport, DiskSource, Mode, VerifyReport, Violation, ViolationKind, verify, verify_paths,
};
pub use workload::{Started, StopReason, WorkloadConfig, WorkloadSummary, run_workload};
