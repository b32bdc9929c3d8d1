//! Stable error codes. Each code keeps its number forever; the reference
//! system's codes (95226, 78093, 78052, 8061) keep theirs. `docs/errors.md`
//! lists every code with its cause and remedy, and a test keeps the two in
//! step.
//!
//! Ranges: 1000s disks and input, 1100s wire, 1200s delta sync,
//! 2000s journal, 3000s NBD and agent, 4000s control plane, 5000s workload,
//! verify and the NBD client.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $num:literal, $name:literal, $remedy:literal; )*) => {
        /// A stable, documented error code.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant = $num, )*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            /// The stable number shown to operators.
            pub const fn number(self) -> u32 {
                self as u32
            }

            /// A short stable name (`kebab-case`), for logs and JSON.
            pub const fn name(self) -> &'static str {
                match self { $( ErrorCode::$variant => $name, )* }
            }

            /// What the operator should do about it.
            pub const fn remedy(self) -> &'static str {
                match self { $( ErrorCode::$variant => $remedy, )* }
            }

            /// The code with this number, if there is one.
            pub fn from_number(n: u32) -> Option<ErrorCode> {
                match n { $( $num => Some(ErrorCode::$variant), )* _ => None }
            }
        }
    };
}

error_codes! {
    // --- the reference system's codes ---
    /// The machine's agent cannot reach the configuration server.
    AgentUnreachable = 95226, "agent-unreachable",
        "Check that the agent service runs on the machine and can reach the configuration server's address and port; wait for its heartbeat, then retry.";
    /// The machine to replicate from is not running, is suspended, or is unreachable.
    MachineNotRunning = 78093, "machine-not-running",
        "Start the machine (or resume it) so that its agent can register, then retry.";
    /// A machine of the same name exists where the new one would be created.
    NameConflict = 78052, "name-conflict",
        "Remove or rename the existing machine on the target host, or fail back to the original location.";
    /// The datastore is not accessible from the master target's host.
    DatastoreInaccessible = 8061, "datastore-inaccessible",
        "Mount the datastore read/write on the master target's host, make sure it has free space and a supported type, then refresh and retry.";

    // --- disks and input: 1000s ---
    /// A disk named as a source does not exist.
    SourceMissing = 1001, "source-missing",
        "Check the path or export name of the source disk.";
    /// A path that must be a raw image or block device is something else.
    NotADisk = 1002, "not-a-disk",
        "Give a raw image file or a block device, not a directory or special file.";
    /// The destination cannot be written (read-only file or filesystem, permissions).
    DestinationReadOnly = 1003, "destination-read-only",
        "Make the destination writable (permissions, read-only mount) or choose another destination.";
    /// The destination's filesystem is full.
    NoSpace = 1004, "no-space",
        "Free space on the destination's filesystem, then run the same command again: it resumes where it stopped.";
    /// The destination is larger than the source and shrinking was not asked for.
    ShrinkRefused = 1005, "shrink-refused",
        "Pass --allow-shrink if the destination may lose the bytes past the source's size.";
    /// An input/output error on a disk.
    DiskIo = 1006, "disk-io",
        "Check the disk and the kernel log (dmesg); run the command again once the device is healthy.";
    /// A command-line argument, address or option is invalid.
    InvalidArgument = 1007, "invalid-argument",
        "Correct the argument; `rebound help <command>` lists the accepted forms.";
    /// A token file is missing, unreadable or empty.
    TokenUnreadable = 1008, "token-unreadable",
        "Create the token file (one line, at least 16 characters) and make it readable only by the service user.";
    /// A process server's cache is at its limit and refused a changeset.
    CacheFull = 1009, "cache-full",
        "Nothing is lost: the agent keeps its changes (changesets, then its dirty bitmap) until the cache drains. Check that the item's master target runs and is reachable from the process server, or give the process server a larger --cache-limit.";

    // --- wire protocol: 1100s ---
    /// The peer refused our credentials (or we refused its).
    AuthFailed = 1101, "auth-failed",
        "Use the same token on both sides (--token-file); tokens are compared without being sent.";
    /// The peer speaks a protocol version we do not.
    VersionMismatch = 1102, "version-mismatch",
        "Upgrade the older side so that both run the same rebound release.";
    /// A frame failed its checksum or could not be decoded.
    CorruptFrame = 1103, "corrupt-frame",
        "The network or a middlebox altered data in flight; nothing corrupt was applied. Run the command again; if it repeats, check the network path.";
    /// The peer closed the connection in the middle of an exchange.
    PeerClosed = 1104, "peer-closed",
        "The other side stopped or the network dropped; run the command again, it resumes from its cursor.";
    /// The peer sent a message that is valid but not allowed at this point.
    ProtocolViolation = 1105, "protocol-violation",
        "Both sides must run the same rebound release; report the message if they do.";
    /// A connection could not be established.
    ConnectFailed = 1106, "connect-failed",
        "Check the address and port, that the server runs, and that the port is open between the two hosts.";
    /// The remote side does not have the named disk.
    ExportNotFound = 1107, "export-not-found",
        "Check the disk name in the rebound:// address; it is relative to the server's --root.";
    /// A frame announced a length above the protocol's limit.
    FrameTooLarge = 1108, "frame-too-large",
        "The peer is not a rebound peer of this version, or the stream is corrupt; check what listens on that port.";
    /// Another sync of the same disk is running on the server.
    ExportBusy = 1109, "export-busy",
        "Wait for the other sync of this disk to finish (or stop it), then run the command again.";

    // --- delta sync: 1200s ---
    /// After a sync the BLAKE3 roots of source and destination differ.
    VerifyMismatch = 1201, "verify-mismatch",
        "The destination was changed during the sync or a disk returned bad data; run the sync again and check the disks.";
    /// The persistent resume state is unreadable or belongs to other disks.
    ResumeStateInvalid = 1202, "resume-state-invalid",
        "Remove the state directory named in the message; the next sync compares everything again (still sending only what differs).";
    /// The sync was interrupted (signal or cancel) before it finished.
    Interrupted = 1203, "interrupted",
        "Run the same command again: it resumes from its persistent cursor.";
    /// The source changed size or identity while the sync ran.
    SourceChanged = 1204, "source-changed",
        "Stop writers to the source (or sync from a snapshot), then run the sync again.";

    // --- journal: 2000s ---
    /// No journal for this item on the retention volume.
    JournalMissing = 2001, "journal-missing",
        "Check the --volume directory and the item name; `rebound journal inspect --volume DIR` lists the items it holds.";
    /// The journal's metadata has an unknown format or version, or cannot be parsed.
    JournalFormat = 2002, "journal-format",
        "Use the rebound release that wrote this retention volume, or restore the item's metadata files from a backup.";
    /// A journal record failed its checksum.
    JournalCorrupt = 2003, "journal-corrupt",
        "Recovery points after the damaged record are unusable; fail over to an earlier point or resync the item (delta sync), and check the retention volume's storage.";
    /// The retention volume has no space left for the journal.
    RetentionVolumeFull = 2004, "retention-volume-full",
        "Free space on the retention volume or shorten the recovery point retention; what was already written is intact and appends resume once space is available.";
    /// The recovery point asked for does not exist (never taken, or folded by retention).
    PointNotFound = 2005, "point-not-found",
        "List the recovery points with `rebound journal points` and choose one inside the retention window.";
    /// The recovery point exists but its data is incomplete or damaged.
    PointUnusable = 2006, "point-unusable",
        "Choose an earlier recovery point (before the damaged record) or resync the item.";
    /// Another process holds the journal open for writing.
    JournalLocked = 2007, "journal-locked",
        "Stop the other writer of this item's journal (master target service) or use a read-only command.";
    /// A changeset is malformed: unaligned, outside the disk, or naming an unknown disk.
    ChangesetInvalid = 2008, "changeset-invalid",
        "The sender and the journal disagree on the item's disks; check the item's disk sizes and resync it.";
    /// An input/output error on the retention volume or the base disks.
    JournalIo = 2009, "journal-io",
        "Check the retention volume and the datastore (dmesg, mount state), then reopen the journal; durable points are kept.";
    /// The target of a materialise is unsuitable (wrong size, exists, not a disk).
    MaterialiseTarget = 2010, "materialise-target",
        "Give new file paths, or existing disks of exactly the item's disk sizes, for the materialised point.";

    // --- NBD and agent: 3000s ---
    /// The NBD listener could not be opened (address in use, bad path, permissions).
    NbdListenFailed = 3001, "nbd-listen-failed",
        "Free the address or choose another with --listen; for unix:PATH remove a stale socket and check the directory is writable.";
    /// An NBD client broke the protocol; its connection was closed, the server and the disk are unaffected.
    NbdProtocol = 3002, "nbd-protocol",
        "Check the client (qemu, nbd-client, libnbd) and its version; the export keeps serving other connections.";
    /// Two disks given to one agent export would have the same export name.
    NbdExportDuplicate = 3003, "nbd-export-duplicate",
        "Give each disk a distinct file name, or name the exports explicitly with NAME=PATH.";
    /// The dirty-tracking state file cannot be read, written or synced.
    DirtyStateIo = 3004, "dirty-state-io",
        "Make the state directory (--state-dir) writable and healthy; until then the export refuses writes it could not track.";
    /// Another agent already tracks this disk (its state file is locked).
    DirtyStateLocked = 3005, "dirty-state-locked",
        "Stop the other agent serving this disk; one disk is exported by one agent at a time.";

    // --- workload, verify and the NBD client: 5000s ---
    /// The workload log cannot be read or written, or a record before its last is damaged.
    WorkloadLog = 5001, "workload-log",
        "Check the --log path, its permissions and free space; a damaged record before the last one means the log was altered, start a new log on fresh disks.";
    /// The NBD server closed the connection or failed a request while the workload ran.
    WorkloadDisconnected = 5002, "workload-disconnected",
        "Expected when the export is stopped or failed over (pass --tolerate-disconnect); otherwise check the export and run the workload again, it continues the same log.";
    /// The disks do not hold what the workload log says they must.
    WorkloadVerifyFailed = 5003, "workload-verify-failed",
        "A write was lost, torn, reordered or resurrected: the message names the disk, the block and the write ids; check the replication path that produced these disks.";
    /// The NBD server refused the export name.
    NbdExportRefused = 5004, "nbd-export-refused",
        "Check the export name in the NBD URI (`nbdinfo --list URI` lists the exports).";
    /// The NBD server answered something outside the protocol or beyond our limits.
    NbdServerProtocol = 5005, "nbd-server-protocol",
        "Check what listens at that address and that it is an NBD server speaking the fixed newstyle protocol.";
    /// The NBD server answered a request with an error.
    NbdRequestFailed = 5006, "nbd-request-failed",
        "Check the server's log and its disk (errno in the message); run the command again once the export is healthy.";

    // --- control plane: 4000s ---
    /// The request carried no bearer token, or an unknown or revoked one.
    Unauthorised = 4001, "unauthorised",
        "Pass a valid API token (REBOUND_TOKEN or --token-file); `rebound server init` printed the admin token once.";
    /// The token is valid but its scope does not allow this request.
    Forbidden = 4002, "forbidden",
        "Use a token whose scope allows this action (an operator or admin token); component tokens only report their own facts.";
    /// The registration key given at enrolment is wrong.
    RegistrationKeyInvalid = 4003, "registration-key-invalid",
        "Use the registration key printed by `rebound server init`.";
    /// The request body or a parameter is malformed or out of range.
    InvalidRequest = 4004, "invalid-request",
        "Correct the request; the OpenAPI spec under openapi/ lists every field and its type.";
    /// The configuration server does not know the replicated item.
    ItemUnknown = 4005, "item-unknown",
        "List the items with `rebound items`; an item that is not in the configuration server cannot be failed over or back (restore the server's backup if it was lost).";
    /// A named site, server, policy, group, plan or point does not exist.
    NotFound = 4006, "not-found",
        "Check the id or name; the list commands (`rebound sites`, `servers`, `policies`, `groups`, `plans`, `points ITEM`) show what exists.";
    /// The job does not exist.
    JobNotFound = 4007, "job-not-found",
        "List the jobs with `rebound jobs`; job ids start with `job-`.";
    /// The action is not allowed in the item's current state.
    ActionNotAllowed = 4008, "action-not-allowed",
        "Check the item's state with `rebound items ITEM`; the message lists the actions its state allows.";
    /// A job is already running on the item (or the plan).
    ItemBusy = 4009, "item-busy",
        "Wait for the running job to finish (`rebound jobs watch JOB`) or cancel it, then retry.";
    /// An object with the same name already exists in the configuration server.
    AlreadyExists = 4010, "already-exists",
        "Choose another name, or use the existing object.";
    /// The master target's OS type differs from the machine's.
    MasterTargetOsMismatch = 4011, "master-target-os-mismatch",
        "Choose a master target of the machine's OS type (a Linux machine needs a Linux master target).";
    /// The master target has no free disk slots for the item's disks.
    DiskSlotsExceeded = 4012, "disk-slots-exceeded",
        "Choose another master target, or add one; a master target attaches at most its disk limit (default 60).";
    /// The retention volume cannot hold a journal.
    RetentionVolumeIneligible = 4013, "retention-volume-ineligible",
        "Choose a retention volume on its own filesystem: not FAT/FAT32, non-zero capacity, not locked, not a datastore or replication target, not the master target's install or cache volume; refresh after adding one.";
    /// Snapshots exist on the master target's disks.
    SnapshotsPresent = 4014, "snapshots-present",
        "Delete the snapshots on the master target, then retry (snapshots on the machine itself are merged by the job).";
    /// A disk UUID of the machine equals one of the master target's.
    DiskUuidCollision = 4015, "disk-uuid-collision",
        "The machine and the master target were cloned from one template; choose another master target or change the disk UUIDs.";
    /// A replication group mixes OS types.
    GroupMixedOs = 4016, "group-mixed-os",
        "Put only machines of one OS type in a replication group.";
    /// A replication group's members use different master targets.
    GroupMixedMasterTarget = 4017, "group-mixed-master-target",
        "Give every member of the replication group the same master target; otherwise no common recovery point exists.";
    /// A member of a replication group was reprotected outside a recovery plan.
    GroupOutsidePlan = 4018, "group-outside-plan",
        "Reprotect a replication group through a recovery plan that contains it (`rebound reprotect --plan PLAN`).";
    /// The item was migrated, moved, deleted or unprotected.
    ItemNotFailbackable = 4019, "item-not-failbackable",
        "The item no longer belongs to its replication pair; protect the machine again (a new item) instead of failing it back.";
    /// The machine was created at the recovery site.
    BornAtRecoverySite = 4020, "born-at-recovery-site",
        "A machine created at the recovery site cannot be reprotected to the primary site; protect it as a new item in the other direction.";
    /// One or more prechecks failed; each failure is listed with its own code.
    PrechecksFailed = 4021, "prechecks-failed",
        "Fix every failure listed in `failures` (each has its own code and remedy), then run the action again; nothing was changed.";
    /// The policy is a failback policy and cannot be edited.
    PolicyReadOnly = 4022, "policy-read-only",
        "Failback policies are created with their replication policy and are read-only; edit the replication policy instead.";
    /// A job step run by a component stopped reporting progress.
    JobStepTimedOut = 4023, "job-step-timed-out",
        "Check the component named in the step (heartbeat, logs), then run the action again; the destination keeps its previous state.";
    /// The configuration server restarted while a step could not be resumed.
    JobInterrupted = 4024, "job-interrupted",
        "Run the action again; the job was failed on restart instead of being left in progress.";
    /// The job was cancelled by an operator.
    JobCancelled = 4025, "job-cancelled",
        "Nothing to do: the item is back in the state it had before the job; run the action again when wanted.";
    /// The job has already finished and cannot be cancelled or completed.
    JobFinished = 4026, "job-finished",
        "Check the job's result with `rebound jobs JOB`.";
    /// The configuration server's database cannot be opened, read or written.
    StoreUnavailable = 4027, "store-unavailable",
        "Check the data directory (or DATABASE_URL), its permissions and free space, and the server's log.";
    /// The data directory has no initialised database, or already has one.
    DataDirState = 4028, "data-dir-state",
        "Run `rebound server init --data-dir DIR` once on an empty directory, then `rebound server run --data-dir DIR`.";
    /// A process server or master target has not heartbeated recently.
    ComponentUnreachable = 4029, "component-unreachable",
        "Check that the process server or master target runs and reaches the configuration server; wait for its heartbeat, then retry.";
    /// The server answered something the client does not understand.
    BadResponse = 4030, "bad-response",
        "Use a client of the same rebound release as the server.";
    /// A backup or restore of the configuration server failed.
    BackupFailed = 4031, "backup-failed",
        "Check the paths and free space; restore only onto a stopped server with an empty or absent data directory, or a new, empty PostgreSQL database (`CREATE DATABASE`).";
    /// A recovery plan's script step exited with an error or ran past its timeout.
    PlanScriptFailed = 4032, "plan-script-failed",
        "Read the script's output in the step's message, fix the script or what it automates (it runs on the configuration server host), then run the plan action again.";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "E{} {}", self.number(), self.name())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.number())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        ErrorCode::from_number(n)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {n}")))
    }
}

/// Errors that carry a stable code. Edges (CLI, API) use it to print the code
/// and remedy and to choose an exit status.
pub trait Coded {
    fn code(&self) -> ErrorCode;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn numbers_and_names_are_unique_and_round_trip() {
        let mut nums = HashSet::new();
        let mut names = HashSet::new();
        for &c in ErrorCode::ALL {
            assert!(nums.insert(c.number()), "duplicate number {}", c.number());
            assert!(names.insert(c.name()), "duplicate name {}", c.name());
            assert_eq!(ErrorCode::from_number(c.number()), Some(c));
            assert!(!c.remedy().is_empty());
        }
        assert_eq!(ErrorCode::from_number(4), None);
    }

    /// docs/errors.md must document every code: the operator's reference may
    /// not fall behind the code.
    #[test]
    fn every_code_is_documented() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/errors.md");
        let doc = std::fs::read_to_string(path).expect("docs/errors.md is readable");
        for &c in ErrorCode::ALL {
            let row = format!("| {} | `{}` |", c.number(), c.name());
            assert!(
                doc.contains(&row),
                "docs/errors.md lacks the row starting {row:?}"
            );
        }
    }
}
