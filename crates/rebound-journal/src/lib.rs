//! The replica journal of rebound's master target (DESIGN.md §3, "Journal").
//!
//! Each replicated item keeps base disks (sparse raw images on a datastore)
//! and, on the retention volume, a redo journal of **changesets** in
//! append-only, checksummed segment files. A changeset may close a
//! **recovery point** (crash-consistent, app-consistent, or a group marker).
//! Any point in the window can be read through a [`PointView`] (base +
//! journal up to the point, without copying the base) or **materialised**
//! into raw images. Retention folds changesets older than the window into the
//! base, segment by segment, never past a pinned point.
//!
//! Crash safety: a changeset is visible only once its commit record is
//! complete and checksummed; points are fsynced before they are reported;
//! metadata changes go through durable renames; a torn tail is truncated at
//! open and a corrupt record makes the points after it unusable instead of
//! being applied. All IO goes through [`fs::Fs`] so tests inject faults.

mod error;
pub mod format;
pub mod fs;
mod journal;
mod segment;
mod view;
pub mod volume;

pub use error::{JournalError, Result};
pub use journal::{
    Appended, Changeset, DiskMeta, DiskSpec, FoldReport, Journal, Options, Pin, PointInfo,
    PointKind, Problem, Usage, VerifyReport, Write, item_dir,
};
pub use view::{MaterialiseStats, PointView, Target};
