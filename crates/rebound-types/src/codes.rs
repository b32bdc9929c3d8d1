//! Stable error codes. Each code keeps its number forever; the reference
//! system's codes (95226, 78093, 78052, 8061) keep theirs. `docs/errors.md`
//! lists every code with its cause and remedy, and a test keeps the two in
//! step.
//!
//! Ranges: 1000s disks and input, 1100s wire, 1200s delta sync,
//! 2000s journal, 3000s NBD and agent, 4000s control plane.

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
