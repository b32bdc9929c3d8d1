//! Prechecks (DESIGN.md §6): everything the configuration server can decide
//! from its own data and the facts components report, run before a job moves
//! a byte. [`run`] returns every failure, not only the first.

use rebound_api::{
    Action, Component, FailoverKind, Failure, Item, Location, RetentionVolume, SiteRole,
};
use rebound_types::ErrorCode;
use std::time::{Duration, SystemTime};

/// Filesystems a retention volume may not use.
const INELIGIBLE_FILESYSTEMS: &[&str] = &["vfat", "fat", "fat16", "fat32", "msdos", "exfat"];

/// What the prechecks look at. The server gathers it from the store.
pub struct Input<'a> {
    pub action: Action,
    pub kind: FailoverKind,
    pub location: Location,
    /// The item; `None` when the configuration server does not know it.
    pub item: Option<&'a Item>,
    /// The name the caller used for the item (for the message when unknown).
    pub item_ref: &'a str,
    /// The site (role) the job writes to.
    pub destination: SiteRole,
    pub destination_site_id: &'a str,
    /// The item's agent, if it has one.
    pub agent: Option<&'a Component>,
    pub master_target: Option<&'a Component>,
    pub process_server: Option<&'a Component>,
    pub datastore: Option<&'a str>,
    pub retention_volume: Option<&'a str>,
    /// The other members of the item's replication group.
    pub group_members: &'a [Item],
    /// The recovery plan the action runs under, if any.
    pub plan_id: Option<&'a str>,
    pub now: SystemTime,
    /// Heartbeats older than this are stale (95226 / 4029).
    pub heartbeat_limit: Duration,
}

fn needs_running_source(input: &Input<'_>) -> bool {
    match input.action {
        Action::EnableProtection | Action::Reprotect | Action::ReverseReplicate => true,
        Action::Failover | Action::Failback => input.kind == FailoverKind::Planned,
        _ => false,
    }
}

fn writes_machine(input: &Input<'_>) -> bool {
    matches!(
        input.action,
        Action::EnableProtection
            | Action::Reprotect
            | Action::ReverseReplicate
            | Action::Failover
            | Action::Failback
            | Action::TestFailover
    )
}

/// The machine a test failover of `item` creates on the master target's host.
pub fn test_machine_name(item: &str) -> String {
    format!("{item}-test")
}

/// Whether a component's last heartbeat is recent enough.
pub fn heartbeat_fresh(c: &Component, now: SystemTime, limit: Duration) -> bool {
    let Some(last) = c.last_heartbeat.as_deref() else {
        return false;
    };
    match humantime_parse(last) {
        Some(t) => now
            .duration_since(t)
            .map(|age| age <= limit)
            .unwrap_or(true),
        None => false,
    }
}

fn humantime_parse(s: &str) -> Option<SystemTime> {
    crate::time::parse(s)
}

/// Why a retention volume cannot hold a journal, if it cannot.
pub fn retention_volume_problem(v: &RetentionVolume) -> Option<String> {
    let fs = v.filesystem.to_ascii_lowercase();
    if INELIGIBLE_FILESYSTEMS.contains(&fs.as_str()) {
        return Some(format!("its filesystem is {}", v.filesystem));
    }
    if v.capacity_bytes == 0 {
        return Some("its capacity is zero".into());
    }
    if v.locked {
        return Some("it is locked".into());
    }
    if v.in_use {
        return Some("it is already used as a datastore or replication target".into());
    }
    if v.system_volume {
        return Some("it is the master target's install or cache volume".into());
    }
    None
}

/// Run every check that applies to the action; all failures are returned.
pub fn run(input: &Input<'_>) -> Vec<Failure> {
    let mut out = Vec::new();
    let Some(item) = input.item else {
        out.push(Failure::new(
            ErrorCode::ItemUnknown,
            format!(
                "the configuration server does not know the item {:?}",
                input.item_ref
            ),
        ));
        return out;
    };

    // The item must still belong to its replication pair.
    if let Some(d) = &item.detached
        && input.action != Action::EnableProtection
    {
        out.push(Failure::new(
            ErrorCode::ItemNotFailbackable,
            format!("item {} was {} at {}", item.name, d.reason, d.at),
        ));
    }

    if matches!(input.action, Action::Reprotect)
        && item.born_at == SiteRole::Recovery
        && input.destination == SiteRole::Primary
    {
        out.push(Failure::new(
            ErrorCode::BornAtRecoverySite,
            format!(
                "item {} was created at the recovery site; it cannot be reprotected to the primary site",
                item.name
            ),
        ));
    }

    // The machine's agent: registered and heartbeating, machine running.
    if needs_running_source(input) {
        match input.agent {
            None => out.push(Failure::new(
                ErrorCode::AgentUnreachable,
                format!("item {} has no registered agent", item.name),
            )),
            Some(agent) if !heartbeat_fresh(agent, input.now, input.heartbeat_limit) => {
                out.push(Failure::new(
                    ErrorCode::AgentUnreachable,
                    format!(
                        "the agent of {} last heartbeated at {} (limit {} s)",
                        item.name,
                        agent.last_heartbeat.as_deref().unwrap_or("never"),
                        input.heartbeat_limit.as_secs()
                    ),
                ))
            }
            Some(agent) => {
                if let Some(f) = &agent.agent
                    && (!f.running || f.suspended)
                {
                    out.push(Failure::new(
                        ErrorCode::MachineNotRunning,
                        format!(
                            "machine {} is {}",
                            f.machine,
                            if f.suspended {
                                "suspended"
                            } else {
                                "not running"
                            }
                        ),
                    ));
                }
            }
        }
    }

    // Replication groups: same OS, same master target, reprotect only in a plan.
    if item.group_id.is_some() {
        if let Some(other) = input.group_members.iter().find(|m| m.os != item.os) {
            out.push(Failure::new(
                ErrorCode::GroupMixedOs,
                format!(
                    "group members {} ({}) and {} ({}) have different OS types",
                    item.name, item.os, other.name, other.os
                ),
            ));
        }
        let mt = input.master_target.map(|c| c.id.as_str());
        if let Some(other) = input
            .group_members
            .iter()
            .find(|m| m.master_target_id.is_some() && m.master_target_id.as_deref() != mt)
        {
            out.push(Failure::new(
                ErrorCode::GroupMixedMasterTarget,
                format!(
                    "group member {} uses master target {}, not {}",
                    other.name,
                    other.master_target_id.as_deref().unwrap_or("-"),
                    mt.unwrap_or("-")
                ),
            ));
        }
        if matches!(input.action, Action::Reprotect | Action::ReverseReplicate)
            && input.plan_id.is_none()
        {
            out.push(Failure::new(
                ErrorCode::GroupOutsidePlan,
                format!(
                    "item {} belongs to a replication group; reprotect it through a recovery plan",
                    item.name
                ),
            ));
        }
    }

    if !writes_machine(input) {
        return out;
    }

    // The master target that writes the destination.
    let Some(mt) = input.master_target else {
        out.push(Failure::new(
            ErrorCode::InvalidRequest,
            format!("no known master target chosen for {}", item.name),
        ));
        return out;
    };
    if mt.site_id != input.destination_site_id {
        out.push(Failure::new(
            ErrorCode::InvalidRequest,
            format!(
                "master target {} is at site {}, but the job writes to the {} site {}",
                mt.name, mt.site_id, input.destination, input.destination_site_id
            ),
        ));
    }
    if !heartbeat_fresh(mt, input.now, input.heartbeat_limit) {
        out.push(Failure::new(
            ErrorCode::ComponentUnreachable,
            format!(
                "master target {} last heartbeated at {}",
                mt.name,
                mt.last_heartbeat.as_deref().unwrap_or("never")
            ),
        ));
    }
    if let Some(ps) = input.process_server
        && !heartbeat_fresh(ps, input.now, input.heartbeat_limit)
    {
        out.push(Failure::new(
            ErrorCode::ComponentUnreachable,
            format!(
                "process server {} last heartbeated at {}",
                ps.name,
                ps.last_heartbeat.as_deref().unwrap_or("never")
            ),
        ));
    }
    let Some(facts) = &mt.master_target else {
        out.push(Failure::new(
            ErrorCode::ComponentUnreachable,
            format!("master target {} has not reported its facts yet", mt.name),
        ));
        return out;
    };
    if !facts.host_running {
        out.push(Failure::new(
            ErrorCode::ComponentUnreachable,
            format!("the master target's host {} is not running", facts.host),
        ));
    }
    if facts.os != item.os {
        out.push(Failure::new(
            ErrorCode::MasterTargetOsMismatch,
            format!(
                "master target {} runs {}, machine {} runs {}",
                mt.name, facts.os, item.name, item.os
            ),
        ));
    }
    let needed = u32::try_from(item.disks.len()).unwrap_or(u32::MAX);
    if facts.disk_slots_used.saturating_add(needed) > facts.disk_slot_limit {
        out.push(Failure::new(
            ErrorCode::DiskSlotsExceeded,
            format!(
                "master target {} has {} of {} disk slots in use; {} needs {}",
                mt.name, facts.disk_slots_used, facts.disk_slot_limit, item.name, needed
            ),
        ));
    }
    if facts.snapshots_present {
        out.push(Failure::new(
            ErrorCode::SnapshotsPresent,
            format!("master target {} has snapshots on its disks", mt.name),
        ));
    }
    for disk in &item.disks {
        if facts
            .disk_uuids
            .iter()
            .any(|u| u.eq_ignore_ascii_case(&disk.uuid))
        {
            out.push(Failure::new(
                ErrorCode::DiskUuidCollision,
                format!(
                    "disk {} of {} has UUID {}, as a disk of master target {}",
                    disk.name, item.name, disk.uuid, mt.name
                ),
            ));
        }
    }
    match input.retention_volume {
        None => out.push(Failure::new(
            ErrorCode::RetentionVolumeIneligible,
            format!("no retention volume chosen on master target {}", mt.name),
        )),
        Some(path) => match facts.retention_volumes.iter().find(|v| v.path == path) {
            None => out.push(Failure::new(
                ErrorCode::RetentionVolumeIneligible,
                format!(
                    "master target {} reports no retention volume {path} (refresh after adding one)",
                    mt.name
                ),
            )),
            Some(v) => {
                if let Some(why) = retention_volume_problem(v) {
                    out.push(Failure::new(
                        ErrorCode::RetentionVolumeIneligible,
                        format!("retention volume {path} is ineligible: {why}"),
                    ));
                }
            }
        },
    }
    let size: u64 = item.disks.iter().map(|d| d.size_bytes).sum();
    match input.datastore {
        None => out.push(Failure::new(
            ErrorCode::DatastoreInaccessible,
            format!("no datastore chosen on master target {}", mt.name),
        )),
        Some(name) => match facts.datastores.iter().find(|d| d.name == name) {
            None => out.push(Failure::new(
                ErrorCode::DatastoreInaccessible,
                format!(
                    "datastore {name} is not attached to master target {}'s host",
                    mt.name
                ),
            )),
            Some(ds) => {
                if !ds.accessible {
                    out.push(Failure::new(
                        ErrorCode::DatastoreInaccessible,
                        format!("datastore {name} is not accessible read/write"),
                    ));
                }
                if !ds.supported {
                    out.push(Failure::new(
                        ErrorCode::DatastoreInaccessible,
                        format!("datastore {name} has the unsupported type {}", ds.kind),
                    ));
                }
                if ds.free_bytes < size {
                    out.push(Failure::new(
                        ErrorCode::DatastoreInaccessible,
                        format!(
                            "datastore {name} has {} bytes free, {} needs {size}",
                            ds.free_bytes, item.name
                        ),
                    ));
                }
            }
        },
    }
    // A new machine would be created on the host: its name must be free. A
    // test failover creates `<name>-test` (the machine itself may be there,
    // stopped, after a failback).
    let new_name = match input.action {
        Action::TestFailover => Some(test_machine_name(&item.name)),
        Action::EnableProtection => Some(item.name.clone()),
        _ => (input.location == Location::Alternate).then(|| item.name.clone()),
    };
    if let Some(name) = new_name
        && facts.machines.contains(&name)
    {
        out.push(Failure::new(
            ErrorCode::NameConflict,
            format!(
                "a machine named {name} already exists on host {}",
                facts.host
            ),
        ));
    }
    out
}
