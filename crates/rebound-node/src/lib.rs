//! A site node (DESIGN.md §1, §5): the process server and master target
//! roles, the agent that runs with each machine, and the `local` driver that
//! hosts machines as directories.
//!
//! Data flows: an agent captures every write in the write path and spools
//! the stream into bounded, checksummed changeset files (a barrier in the
//! stream closes a crash-consistent point of all the machine's disks); its
//! shipper pushes them with the delta-sync engine to the site's process
//! server; the process server keeps them in a
//! durable cache and forwards it, in order, to the master target of the
//! other site, which appends it to the item's journal and reports the
//! recovery point. Whole-disk syncs (initial sync, reprotect, failback) are
//! pulls by the master target from the agent's read-only data port into a
//! staged copy that is switched in only when the job succeeds.

pub mod agent;
pub mod client;
pub mod facts;
pub mod machine;
pub mod node;
pub mod process;
pub mod ship;
pub mod target;

/// How changesets are pushed between components: whole files (no
/// comparison), with a small buffer pool — a changeset is at most 64 MiB,
/// and a node pushes for many items.
pub fn changeset_push_options() -> rebound_delta::Options {
    rebound_delta::Options {
        full: true,
        tuning: rebound_delta::Tuning {
            buffers: 4,
            hashers: 2,
            ..Default::default()
        },
        ..Default::default()
    }
}
