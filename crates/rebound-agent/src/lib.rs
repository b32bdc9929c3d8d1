//! The agent (mobility service, DESIGN.md §1, §3, §5). This crate holds its
//! export of a machine's disks over NBD: every write, trim and zeroing goes
//! through [`DiskExport`], which marks the touched 4 KiB leaves in a
//! persistent [`DirtyTracker`] before acknowledging it. Replication asks the
//! tracker which leaves changed since a [`Marker`] and clears them once the
//! target has acknowledged.

mod dirty;
mod error;
mod export;

pub use dirty::{DirtyTracker, Marker, OpenReport, REGION_SIZE, WriteGuard};
pub use error::AgentError;
pub use export::{DiskExport, ExportSpec, Persister, spawn_persister};
