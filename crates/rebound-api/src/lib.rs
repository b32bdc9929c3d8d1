//! REST types of the configuration server (`/api/v1`), shared by the server,
//! the `rebound` client commands and the dashboard. Every type derives
//! `utoipa::ToSchema` so that the OpenAPI spec under `openapi/` is generated
//! from the same definitions the handlers use.
//!
//! Times are RFC 3339 strings in UTC; sizes are bytes; durations are seconds.

use rebound_types::ErrorCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The one error shape of the API: every 4xx and 5xx answer has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// Stable numeric code (docs/errors.md).
    pub code: u32,
    /// What happened.
    pub message: String,
    /// What the operator should do about it.
    pub remedy: String,
    /// For `prechecks-failed` (4021): every failed check, each with its own code.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<Failure>,
}

/// One failed check or step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Failure {
    pub code: u32,
    pub message: String,
    pub remedy: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code: code.number(),
            message: message.into(),
            remedy: code.remedy().to_string(),
        }
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code: code.number(),
            message: message.into(),
            remedy: code.remedy().to_string(),
            failures: Vec::new(),
        }
    }

    /// The stable code, if this client knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_number(self.code)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        for failure in &self.failures {
            write!(f, "\n  E{}: {}", failure.code, failure.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

macro_rules! api_enum {
    ($(#[$doc:meta])* $name:ident { $( $(#[$vdoc:meta])* $variant:ident = $s:literal ),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $( $(#[$vdoc])* $variant, )* }

        impl $name {
            pub const ALL: &'static [$name] = &[ $( $name::$variant, )* ];

            /// The name used in JSON, the database and the CLI.
            pub const fn as_str(self) -> &'static str {
                match self { $( $name::$variant => $s, )* }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $( $s => Ok($name::$variant), )*
                    other => Err(format!(
                        "unknown {} {other:?}; expected one of: {}",
                        stringify!($name),
                        [$( $s ),*].join(", ")
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

api_enum! {
    /// The role of a site in a replication pair.
    SiteRole { Primary = "primary", Recovery = "recovery" }
}

impl SiteRole {
    pub const fn other(self) -> SiteRole {
        match self {
            SiteRole::Primary => SiteRole::Recovery,
            SiteRole::Recovery => SiteRole::Primary,
        }
    }
}

api_enum! {
    /// Operating system type of a machine or master target.
    OsType { Linux = "linux", Windows = "windows" }
}

api_enum! {
    /// Direction of replication: `forward` is primary → recovery, `reverse`
    /// is recovery → primary (after a reprotect).
    Direction { Forward = "forward", Reverse = "reverse" }
}

impl Direction {
    pub const fn flip(self) -> Direction {
        match self {
            Direction::Forward => Direction::Reverse,
            Direction::Reverse => Direction::Forward,
        }
    }
    /// The site replicated from (where the machine runs while protected).
    pub const fn source(self) -> SiteRole {
        match self {
            Direction::Forward => SiteRole::Primary,
            Direction::Reverse => SiteRole::Recovery,
        }
    }
    /// The site replicated to.
    pub const fn target(self) -> SiteRole {
        self.source().other()
    }
}

api_enum! {
    /// Phase of a replicated item's lifecycle (DESIGN.md §2). Phases ending in
    /// `-ing` (and `failover_synced`) belong to a running job.
    Phase {
        /// Known to the configuration server, not replicating.
        Unprotected = "unprotected",
        /// Enable protection: initial sync running.
        EnablingProtection = "enabling_protection",
        /// Replicating from the direction's source to its target.
        Protected = "protected",
        TestFailoverStarting = "test_failover_starting",
        /// A test machine runs at the target; replication continues.
        TestFailoverActive = "test_failover_active",
        TestFailoverCleaning = "test_failover_cleaning",
        /// Planned failover (failback when reverse), phase 1: delta sync while the source runs.
        FailoverSyncing = "failover_syncing",
        /// Phase 1 done, source still running: waits for `complete`.
        FailoverSynced = "failover_synced",
        /// Phase 2, unplanned failover or full download: the machine moves.
        FailingOver = "failing_over",
        /// Running at the target from a recovery point; commit pending.
        CommitPending = "commit_pending",
        ChangingPoint = "changing_point",
        Committing = "committing",
        /// Running at the target, committed, not replicating.
        Committed = "committed",
        /// Reprotect (reverse replicate when reverse): delta sync in the flipped direction.
        Reprotecting = "reprotecting",
        Disabling = "disabling",
    }
}

/// The lifecycle state of an item: a phase and a direction. The machine is
/// symmetric: the same phases serve failover and failback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub struct ItemState {
    pub phase: Phase,
    pub direction: Direction,
}

impl std::fmt::Display for ItemState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.phase, self.direction)
    }
}

api_enum! {
    /// Every operator action on a replicated item.
    Action {
        EnableProtection = "enable_protection",
        TestFailover = "test_failover",
        CleanupTestFailover = "cleanup_test_failover",
        /// Failover in the item's direction (planned or unplanned).
        Failover = "failover",
        /// A planned failover of a reverse-protected item back to the primary site.
        Failback = "failback",
        /// Phase 2 of a two-phase planned failover/failback.
        Complete = "complete",
        ChangeRecoveryPoint = "change_recovery_point",
        Commit = "commit",
        /// Replicate back from the site the machine now runs at (recovery → primary).
        Reprotect = "reprotect",
        /// Reprotect in the forward direction, after a failback (primary → recovery).
        ReverseReplicate = "reverse_replicate",
        Cancel = "cancel",
        DisableProtection = "disable_protection",
    }
}

api_enum! {
    /// Planned (no data loss; source stopped) or unplanned (from a recovery point).
    FailoverKind { Planned = "planned", Unplanned = "unplanned" }
}

api_enum! {
    /// How a planned failover/failback synchronises data.
    SyncMode {
        /// Two phases: differences while the source runs, then `complete`.
        Delta = "delta",
        /// Download every disk during the failover (no checksums).
        Full = "full",
    }
}

api_enum! {
    /// Where the machine is recovered.
    Location { Original = "original", Alternate = "alternate" }
}

api_enum! {
    JobState {
        Queued = "queued",
        Running = "running",
        /// Waiting for an operator (manual step, complete failover).
        Waiting = "waiting",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl JobState {
    pub const fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

api_enum! {
    StepState {
        Pending = "pending",
        Running = "running",
        Waiting = "waiting",
        Done = "done",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

api_enum! {
    /// Who runs a job step.
    Executor {
        /// The configuration server itself (prechecks, state changes).
        Server = "server",
        MasterTarget = "master_target",
        ProcessServer = "process_server",
        Agent = "agent",
        /// A person: manual-action steps, complete failover.
        Operator = "operator",
    }
}

api_enum! {
    /// What a token may do.
    Scope {
        /// Everything, including tokens and the registration key.
        Admin = "admin",
        /// Every portal action and read.
        Operator = "operator",
        /// Reads only.
        Viewer = "viewer",
        /// A mobility service: its own heartbeat and facts, its own steps.
        Agent = "agent",
        ProcessServer = "process_server",
        MasterTarget = "master_target",
    }
}

api_enum! {
    /// A component that enrols with the registration key.
    ComponentRole { Agent = "agent", ProcessServer = "process_server", MasterTarget = "master_target" }
}

impl ComponentRole {
    pub const fn scope(self) -> Scope {
        match self {
            ComponentRole::Agent => Scope::Agent,
            ComponentRole::ProcessServer => Scope::ProcessServer,
            ComponentRole::MasterTarget => Scope::MasterTarget,
        }
    }
    pub const fn executor(self) -> Executor {
        match self {
            ComponentRole::Agent => Executor::Agent,
            ComponentRole::ProcessServer => Executor::ProcessServer,
            ComponentRole::MasterTarget => Executor::MasterTarget,
        }
    }
}

api_enum! {
    PointKind { CrashConsistent = "crash_consistent", AppConsistent = "app_consistent" }
}

api_enum! {
    PlanStepKind { Group = "group", Script = "script", Manual = "manual" }
}

// ---------------------------------------------------------------- sites

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Site {
    pub id: String,
    pub name: String,
    pub role: SiteRole,
    pub created_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NewSite {
    pub name: String,
    pub role: SiteRole,
}

// ---------------------------------------------------------------- components

/// A datastore as seen from a master target's host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Datastore {
    pub name: String,
    /// e.g. `local-dir`; unsupported types are refused by a precheck (8061).
    pub kind: String,
    pub supported: bool,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub accessible: bool,
}

/// A retention volume with the facts its eligibility depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RetentionVolume {
    pub path: String,
    /// Filesystem type, e.g. `ext4`, `xfs`, `vfat`.
    pub filesystem: String,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub locked: bool,
    /// Used as a datastore or replication target.
    pub in_use: bool,
    /// The master target's install or cache volume.
    pub system_volume: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProcessServerFacts {
    pub cache_used_bytes: u64,
    pub cache_limit_bytes: u64,
    pub throughput_bytes_per_sec: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MasterTargetFacts {
    pub os: OsType,
    pub host: String,
    pub host_running: bool,
    pub disk_slots_used: u32,
    /// Default 60.
    pub disk_slot_limit: u32,
    pub retention_volumes: Vec<RetentionVolume>,
    pub datastores: Vec<Datastore>,
    /// UUIDs of the master target's own disks.
    pub disk_uuids: Vec<String>,
    /// Snapshots exist on the master target's disks.
    pub snapshots_present: bool,
    /// Machine names present on its host (for name conflicts, 78052).
    pub machines: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentFacts {
    pub machine: String,
    pub running: bool,
    pub suspended: bool,
    /// The job whose data sync the agent has taken a write barrier for:
    /// every write after it stays marked for replication. A master target
    /// starts a sync only once its job is named here.
    #[serde(default)]
    pub sync_barrier: Option<String>,
    /// When the agent took that barrier (ns since the UNIX epoch, the
    /// agent's clock): changesets closed after it are newer than the sync.
    #[serde(default)]
    pub sync_barrier_ns: Option<u64>,
    /// The capture path's state (continuous replication), when the agent
    /// replicates its item.
    #[serde(default)]
    pub replication: Option<ReplicationFacts>,
}

/// Which rung of the overload ladder an agent's replication is on
/// (DESIGN.md §3): writes stream; or they wait in the agent's bounded log;
/// or the log overflowed and the marked blocks are being resynchronised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationState {
    /// Every write is in the stream and the backlog is small.
    Streaming,
    /// The stream is behind (process server or master target slow or
    /// unreachable): writes wait in the agent's bounded log.
    Backlogged,
    /// The log overflowed or a gap was found: the dirty bitmap holds what
    /// the log dropped and the marked blocks are being shipped again.
    Resyncing,
}

/// The capture path of an agent, as it reports it in its heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicationFacts {
    pub state: ReplicationState,
    /// Captured bytes not yet received by the process server.
    pub backlog_bytes: u64,
    /// Leaves marked in the dirty bitmaps still to resynchronise (bytes).
    #[serde(default)]
    pub resync_bytes: u64,
    /// Estimated seconds until the backlog is shipped, at the recent rate.
    #[serde(default)]
    pub eta_secs: Option<u64>,
    /// Last changeset sequence number closed by the agent.
    pub captured_seq: u64,
    /// Last changeset the process server has received.
    pub shipped_seq: u64,
    /// Last changeset the master target reported applied.
    pub applied_seq: u64,
}

/// How far a master target has applied an agent's stream into the replica's
/// journal; the agent keeps its marks until they are applied, and a gap makes
/// it resynchronise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaProgress {
    /// The agent (component id) whose changesets these are.
    pub agent_id: String,
    /// Every changeset of that agent up to this sequence number is applied.
    pub applied_seq: u64,
    /// The apply stopped at `applied_seq` because the next changeset is
    /// missing, corrupt or out of order.
    #[serde(default)]
    pub gap: Option<StreamGap>,
    /// When the server received this report (RFC 3339; set by the server).
    #[serde(default)]
    pub updated_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StreamGap {
    /// The sequence number the master target expected next.
    pub expected_seq: u64,
    /// What it found instead (none: nothing complete arrived).
    #[serde(default)]
    pub found_seq: Option<u64>,
    pub reason: String,
}

/// A heartbeat with the facts of the sending component's role.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    pub version: String,
    #[serde(default)]
    pub process_server: Option<ProcessServerFacts>,
    #[serde(default)]
    pub master_target: Option<MasterTargetFacts>,
    #[serde(default)]
    pub agent: Option<AgentFacts>,
    /// `HOST:PORT` of the component's data port (replication traffic).
    #[serde(default)]
    pub data_addr: Option<String>,
}

/// A process server, master target or agent enrolled with the registration key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Component {
    pub id: String,
    pub role: ComponentRole,
    pub name: String,
    pub site_id: String,
    pub version: String,
    pub enrolled_at: String,
    pub last_heartbeat: Option<String>,
    /// Heartbeat younger than the server's limit (default 120 s).
    pub healthy: bool,
    pub process_server: Option<ProcessServerFacts>,
    pub master_target: Option<MasterTargetFacts>,
    pub agent: Option<AgentFacts>,
    /// `HOST:PORT` of its data port, from its last heartbeat.
    #[serde(default)]
    pub data_addr: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Enrolment {
    pub registration_key: String,
    pub role: ComponentRole,
    pub name: String,
    /// Site id or name.
    pub site: String,
    #[serde(default)]
    pub version: String,
}

/// Credentials issued at enrolment: shown once, stored hashed.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Credentials {
    pub component_id: String,
    pub scope: Scope,
    pub token: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NewToken {
    pub name: String,
    pub scope: Scope,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub created_at: String,
    /// Only in the answer that created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

// ---------------------------------------------------------------- items

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    pub uuid: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NewItem {
    /// Machine name; unique among items.
    pub name: String,
    pub os: OsType,
    pub disks: Vec<Disk>,
    /// Site ids or names.
    pub primary_site: String,
    pub recovery_site: String,
    /// Where the machine was created (default primary).
    #[serde(default)]
    pub born_at: Option<SiteRole>,
    /// The agent (component id) that runs with the machine, if enrolled.
    #[serde(default)]
    pub agent_id: Option<String>,
}

/// Why an item left its replication pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Detached {
    /// `migrated`, `moved`, `deleted` or `unprotected`.
    pub reason: String,
    pub at: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Item {
    pub id: String,
    pub name: String,
    pub os: OsType,
    pub disks: Vec<Disk>,
    pub primary_site_id: String,
    pub recovery_site_id: String,
    pub born_at: SiteRole,
    pub state: ItemState,
    /// Where the machine runs now.
    pub active_site: SiteRole,
    pub agent_id: Option<String>,
    pub policy_id: Option<String>,
    pub group_id: Option<String>,
    pub process_server_id: Option<String>,
    pub master_target_id: Option<String>,
    pub datastore: Option<String>,
    pub retention_volume: Option<String>,
    pub last_point: Option<RecoveryPoint>,
    /// Seconds since the last recovery point, if any.
    pub rpo_seconds: Option<u64>,
    pub detached: Option<Detached>,
    /// The job running on the item, if any.
    pub job_id: Option<String>,
    /// The capture path of the item's agent (from its last heartbeat).
    #[serde(default)]
    pub replication: Option<ReplicationFacts>,
    /// How far the master target has applied the agent's stream.
    #[serde(default)]
    pub replica_progress: Option<ReplicaProgress>,
    pub created_at: String,
    pub updated_at: String,
}

/// Mark an item migrated, moved, deleted or unprotected outside the lifecycle.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DetachRequest {
    pub reason: String,
}

/// An operator action on an item. Fields an action does not use are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionRequest {
    pub action: Action,
    #[serde(default)]
    pub kind: Option<FailoverKind>,
    #[serde(default)]
    pub sync: Option<SyncMode>,
    #[serde(default)]
    pub location: Option<Location>,
    /// Recovery point (failover, change_recovery_point, test failover): a point
    /// id, `latest` (default), `latest-processed`, `latest-app-consistent`, or
    /// `at:TIME` (RFC 3339: the latest point at or before it).
    #[serde(default)]
    pub point_id: Option<String>,
    #[serde(default)]
    pub policy_id: Option<String>,
    #[serde(default)]
    pub process_server_id: Option<String>,
    #[serde(default)]
    pub master_target_id: Option<String>,
    #[serde(default)]
    pub datastore: Option<String>,
    #[serde(default)]
    pub retention_volume: Option<String>,
    /// Part of this recovery plan's job (group members may only be reprotected so).
    #[serde(default)]
    pub plan_id: Option<String>,
}

impl ActionRequest {
    pub fn new(action: Action) -> ActionRequest {
        ActionRequest {
            action,
            kind: None,
            sync: None,
            location: None,
            point_id: None,
            policy_id: None,
            process_server_id: None,
            master_target_id: None,
            datastore: None,
            retention_volume: None,
            plan_id: None,
        }
    }
}

// ---------------------------------------------------------------- points

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecoveryPoint {
    pub id: String,
    pub item_id: String,
    pub time: String,
    pub kind: PointKind,
    /// Group marker when every member of the group reached it.
    pub group_marker: Option<String>,
    /// The point's write barrier in nanoseconds since the UNIX epoch (the
    /// instant the agent held writes), for `rebound verify --point-time`.
    #[serde(default)]
    pub barrier_ns: Option<u64>,
}

/// How an action's `point_id` chooses a recovery point: a point id, or
/// `latest`, `latest-processed`, `latest-app-consistent`, `latest-group`,
/// `group:MARKER`, or `at:TIME` (RFC 3339: the latest point at or before
/// it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointChoice {
    Latest,
    LatestProcessed,
    LatestAppConsistent,
    /// The latest group point common to every member of the item's
    /// replication group (or every item of the recovery plan); the
    /// configuration server turns it into `Group(marker)`.
    LatestGroup,
    /// The group point with this marker (`group:MARKER`).
    Group(String),
    /// Nanoseconds since the UNIX epoch.
    AtOrBefore(u64),
    Id(String),
}

#[cfg(test)]
mod point_choice_tests {
    use super::PointChoice;

    #[test]
    fn keywords_times_and_ids() {
        assert_eq!(PointChoice::parse("latest"), PointChoice::Latest);
        assert_eq!(
            PointChoice::parse("latest-app-consistent"),
            PointChoice::LatestAppConsistent
        );
        assert_eq!(
            PointChoice::parse("at:1970-01-01T00:00:01Z"),
            PointChoice::AtOrBefore(1_000_000_000)
        );
        assert_eq!(
            PointChoice::parse("at:yesterday"),
            PointChoice::Id("at:yesterday".into())
        );
        assert_eq!(
            PointChoice::parse("1a2b.7"),
            PointChoice::Id("1a2b.7".into())
        );
    }
}

impl PointChoice {
    pub fn parse(s: &str) -> PointChoice {
        match s {
            "latest" => PointChoice::Latest,
            "latest-processed" => PointChoice::LatestProcessed,
            "latest-app-consistent" => PointChoice::LatestAppConsistent,
            "latest-group" => PointChoice::LatestGroup,
            other if other.starts_with("group:") => PointChoice::Group(other[6..].to_string()),
            other => match other
                .strip_prefix("at:")
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            {
                Some(d) => PointChoice::AtOrBefore(d.as_nanos() as u64),
                None => PointChoice::Id(other.to_string()),
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NewRecoveryPoint {
    /// The journal's point id.
    pub id: String,
    /// RFC 3339; default now.
    #[serde(default)]
    pub time: Option<String>,
    pub kind: PointKind,
    #[serde(default)]
    pub group_marker: Option<String>,
    #[serde(default)]
    pub barrier_ns: Option<u64>,
}

// ---------------------------------------------------------------- policies

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Policy {
    pub id: String,
    pub name: String,
    pub rpo_threshold_secs: u64,
    pub retention_secs: u64,
    pub app_consistent_frequency_secs: u64,
    /// Interval of crash-consistent recovery points (barriers in the
    /// change stream).
    #[serde(default = "default_crash_consistent_secs")]
    pub crash_consistent_frequency_secs: u64,
    /// Failback policies are read-only.
    pub read_only: bool,
    /// On a replication policy: its failback policy.
    pub failback_policy_id: Option<String>,
    /// On a failback policy: the replication policy it belongs to.
    pub parent_policy_id: Option<String>,
    pub created_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NewPolicy {
    pub name: String,
    pub rpo_threshold_secs: u64,
    pub retention_secs: u64,
    pub app_consistent_frequency_secs: u64,
    /// Default 5 s; 1 to 3600.
    #[serde(default = "default_crash_consistent_secs")]
    #[schema(default = 5, minimum = 1, maximum = 3600)]
    pub crash_consistent_frequency_secs: u64,
}

/// Crash-consistent points every 5 s unless a policy says otherwise (the
/// failback policy too).
pub const DEFAULT_CRASH_CONSISTENT_SECS: u64 = 5;

fn default_crash_consistent_secs() -> u64 {
    DEFAULT_CRASH_CONSISTENT_SECS
}

/// The failback policy created with every replication policy.
pub const FAILBACK_RPO_SECS: u64 = 15 * 60;
pub const FAILBACK_RETENTION_SECS: u64 = 24 * 3600;
pub const FAILBACK_APP_CONSISTENT_SECS: u64 = 60 * 60;

// ---------------------------------------------------------------- groups, plans

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub item_ids: Vec<String>,
    pub created_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NewGroup {
    pub name: String,
    /// Item ids or names.
    pub items: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlanStep {
    pub kind: PlanStepKind,
    /// For `group` steps: the items (ids or names) failed over together.
    #[serde(default)]
    pub items: Vec<String>,
    /// For `script` steps: the command line, run with `/bin/sh -c` **on the
    /// configuration server host** (as the server's user, stdin closed, with
    /// `REBOUND_PLAN_ID`, `REBOUND_PLAN_NAME`, `REBOUND_ACTION` and
    /// `REBOUND_JOB_ID` in its environment); exit status 0 lets the plan go
    /// on, anything else fails the plan job with `plan-script-failed` (4032).
    /// The last 4 KiB of its output become the step's `message`. For
    /// `manual` steps: the instruction the operator follows before `continue`.
    #[serde(default)]
    pub text: Option<String>,
    /// For `script` steps: seconds the command may run before it is killed
    /// and the step fails (default 300, at most 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

impl PlanStep {
    /// A script step's timeout when none is given.
    pub const DEFAULT_SCRIPT_TIMEOUT_SECS: u64 = 300;
    /// The longest timeout a script step may have.
    pub const MAX_SCRIPT_TIMEOUT_SECS: u64 = 86_400;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub steps: Vec<PlanStep>,
    pub created_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NewPlan {
    pub name: String,
    pub steps: Vec<PlanStep>,
}

// ---------------------------------------------------------------- jobs

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobStep {
    pub index: u32,
    pub name: String,
    pub executor: Executor,
    /// The component that runs it (for component steps).
    pub component_id: Option<String>,
    pub state: StepState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub percent: f64,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// Last progress report (component steps time out without one).
    pub updated_at: Option<String>,
    pub error: Option<Failure>,
    /// For a group step of a recovery plan's job: the item jobs it started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub job_ids: Vec<String>,
    /// What the step last said, e.g. the exact bytes that differ and an ETA
    /// before a reprotect or failback moves data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: String,
    pub action: Action,
    pub item_id: Option<String>,
    pub plan_id: Option<String>,
    pub state: JobState,
    pub steps: Vec<JobStep>,
    /// The request that started it.
    pub request: ActionRequest,
    /// The item's state when the job started (its state again after a failure or cancel).
    pub from_state: Option<ItemState>,
    pub cancel_requested: bool,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub error: Option<ApiError>,
}

/// Progress or result of a component step, sent by the component that runs it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct StepReport {
    /// `running`, `done` or `failed`.
    pub state: StepState,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    /// With `failed`: the stable code and message.
    #[serde(default)]
    pub error_code: Option<u32>,
    #[serde(default)]
    pub message: Option<String>,
}

/// A step assigned to the calling component.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkItem {
    pub job_id: String,
    pub step_index: u32,
    pub step: String,
    pub action: Action,
    pub item_id: Option<String>,
    pub request: ActionRequest,
}

// ---------------------------------------------------------------- misc

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn enums_round_trip_through_json_and_text() {
        for &p in Phase::ALL {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(Phase::from_str(p.as_str()).unwrap(), p);
        }
        for &a in Action::ALL {
            assert_eq!(Action::from_str(a.as_str()).unwrap(), a);
        }
        assert!(Scope::from_str("root").is_err());
    }

    #[test]
    fn error_shape_has_code_message_remedy() {
        let e = ApiError::new(ErrorCode::ItemUnknown, "no item vm1");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["code"], 4005);
        assert_eq!(v["message"], "no item vm1");
        assert_eq!(v["remedy"], ErrorCode::ItemUnknown.remedy());
        assert!(v.get("failures").is_none(), "empty failures are omitted");
    }

    #[test]
    fn direction_sites() {
        assert_eq!(Direction::Forward.source(), SiteRole::Primary);
        assert_eq!(Direction::Reverse.target(), SiteRole::Primary);
        assert_eq!(Direction::Forward.flip(), Direction::Reverse);
    }
}
