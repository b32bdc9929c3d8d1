//! The agent (mobility service, DESIGN.md §1, §3, §5). Every write, trim and
//! zeroing of a machine's disks goes through [`DiskExport`] (the NBD export),
//! which marks the touched 4 KiB leaves in a persistent [`DirtyTracker`] and,
//! while the machine replicates, copies the change into the [`Capture`]
//! queue. The [`Spool`] drains that queue into the outbox (bounded
//! [`changeset`] files), closes recovery points at barriers and resyncs
//! marked leaves after an overflow; the node ships the files and tells the
//! spool what the master target applied, which clears the marks.

pub mod capture;
pub mod changeset;
pub mod control;
mod dirty;
mod error;
mod export;
pub mod spool;

pub use capture::{Capture, Mode as CaptureMode};
pub use control::{Inputs, Progress, Restart, Rung, StreamControl, Tick};
pub use dirty::{DirtyTracker, Marker, OpenReport, REGION_SIZE, WriteGuard};
pub use error::AgentError;
pub use export::{DiskExport, ExportSpec, Persister, spawn_persister};
pub use spool::{Spool, SpoolConfig, StreamOwner};
