//! The lifecycle of a replicated item (DESIGN.md §2) as a pure function:
//! for every state and every action, either the job it starts (its steps and
//! the states it leads to on success and on abort) or a refusal with a code.
//!
//! The machine is symmetric. A state is a phase and a direction; failback is a
//! failover of a reverse-protected item and reverse replicate is a reprotect of
//! an item committed at the primary site. [`mirror_state`] and
//! [`mirror_action`] map one half onto the other, and the tests check that
//! `decide(mirror(s), mirror(a)) == mirror(decide(s, a))` for every pair.

use rebound_api::{
    Action, Direction, Executor, FailoverKind, ItemState, Phase, SiteRole, SyncMode,
};
use rebound_types::ErrorCode;

/// An action with its options resolved (no defaults left to apply).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    pub action: Action,
    pub kind: FailoverKind,
    pub sync: SyncMode,
}

impl Request {
    pub fn new(action: Action) -> Request {
        Request {
            action,
            kind: default_kind(action),
            sync: SyncMode::Delta,
        }
    }
}

/// Default failover kind: a failover is unplanned (from a recovery point)
/// unless asked otherwise; a failback is planned (no data loss).
pub fn default_kind(action: Action) -> FailoverKind {
    match action {
        Action::Failback => FailoverKind::Planned,
        _ => FailoverKind::Unplanned,
    }
}

/// One step of a job plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StepPlan {
    pub name: &'static str,
    pub executor: Executor,
    /// The item's phase while this step runs (or waits).
    pub phase: Phase,
}

/// What a successful job changes about where consistent data lives. The
/// property tests track copies through these effects, independently of the
/// phase names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Nothing moves (test failover, cleanup, change of recovery point).
    None,
    /// The direction's target gets a replica kept consistent by replication.
    StartReplication,
    /// Replication stops; the replica is no longer maintained.
    StopReplication,
    /// The machine now runs at the target, from a consistent copy; the source
    /// keeps its data (and the replica its window) until commit.
    MoveToTarget,
    /// Commit: only the copy where the machine runs is kept current.
    Commit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub steps: Vec<StepPlan>,
    /// State after every step succeeded.
    pub success: ItemState,
    /// State after a failure or a cancel: always the state before the job
    /// (data sync writes into a staged layer, so nothing has changed).
    pub abort: ItemState,
    pub effect: Effect,
}

impl Transition {
    /// The item's state when the job starts.
    pub fn during(&self) -> ItemState {
        ItemState {
            phase: self.steps[0].phase,
            direction: self.success_direction_during(),
        }
    }

    fn success_direction_during(&self) -> Direction {
        // A reprotect runs in the new direction; everything else keeps it.
        if self.steps[0].phase == Phase::Reprotecting || self.steps[0].phase == Phase::Disabling {
            self.success.direction
        } else {
            self.abort.direction
        }
    }

    /// The item's state while step `index` runs.
    pub fn state_at(&self, index: usize) -> ItemState {
        ItemState {
            phase: self.steps[index.min(self.steps.len() - 1)].phase,
            direction: self.success_direction_during(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start a new job.
    Start(Transition),
    /// Let the item's waiting job go on (complete failover).
    Resume,
    /// Cancel the item's running job.
    CancelJob,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// The phases that belong to a running job.
pub fn is_job_phase(phase: Phase) -> bool {
    !matches!(
        phase,
        Phase::Unprotected
            | Phase::Protected
            | Phase::TestFailoverActive
            | Phase::CommitPending
            | Phase::Committed
    )
}

/// Where the machine runs in this state.
pub fn active_site(state: ItemState) -> SiteRole {
    match state.phase {
        Phase::CommitPending | Phase::ChangingPoint | Phase::Committing | Phase::Committed => {
            state.direction.target()
        }
        _ => state.direction.source(),
    }
}

/// Whether data flows from the source to a maintained replica in this state.
pub fn replicating(state: ItemState) -> bool {
    matches!(
        state.phase,
        Phase::Protected
            | Phase::TestFailoverStarting
            | Phase::TestFailoverActive
            | Phase::TestFailoverCleaning
            | Phase::FailoverSyncing
            | Phase::FailoverSynced
            | Phase::FailingOver
    )
}

pub fn mirror_state(s: ItemState) -> ItemState {
    ItemState {
        phase: s.phase,
        direction: s.direction.flip(),
    }
}

pub fn mirror_action(a: Action) -> Action {
    match a {
        Action::Failover => Action::Failback,
        Action::Failback => Action::Failover,
        Action::Reprotect => Action::ReverseReplicate,
        Action::ReverseReplicate => Action::Reprotect,
        other => other,
    }
}

pub fn mirror_decision(d: &Decision) -> Decision {
    match d {
        Decision::Start(t) => Decision::Start(Transition {
            steps: t.steps.clone(),
            success: mirror_state(t.success),
            abort: mirror_state(t.abort),
            effect: t.effect,
        }),
        other => other.clone(),
    }
}

const fn step(name: &'static str, executor: Executor, phase: Phase) -> StepPlan {
    StepPlan {
        name,
        executor,
        phase,
    }
}

fn st(phase: Phase, direction: Direction) -> ItemState {
    ItemState { phase, direction }
}

/// The failover action named for a direction: `failover` forward, `failback` reverse.
pub fn failover_action(d: Direction) -> Action {
    match d {
        Direction::Forward => Action::Failover,
        Direction::Reverse => Action::Failback,
    }
}

/// The reprotect action for an item committed after a failover in direction
/// `d`: `reprotect` when it now runs at the recovery site, `reverse_replicate`
/// when it runs at the primary site again.
pub fn reprotect_action(d: Direction) -> Action {
    match d {
        Direction::Forward => Action::Reprotect,
        Direction::Reverse => Action::ReverseReplicate,
    }
}

/// Every action the state allows (the message of a refusal lists them).
pub fn allowed_actions(state: ItemState) -> Vec<Action> {
    Action::ALL
        .iter()
        .copied()
        .filter(|&a| table(state, Request::new(a)).is_some())
        .collect()
}

/// The lifecycle: what `req` does in `state`.
pub fn decide(state: ItemState, req: Request) -> Result<Decision, Refusal> {
    if let Some(d) = table(state, req) {
        return Ok(d);
    }
    let action = req.action;
    let d = state.direction;
    if is_job_phase(state.phase) {
        return Err(Refusal {
            code: ErrorCode::ItemBusy,
            message: format!(
                "{action} is not possible while the item is {state}: a job is running on it; wait for it or cancel it"
            ),
        });
    }
    let allowed: Vec<&str> = allowed_actions(state).iter().map(|a| a.as_str()).collect();
    let hint = match action {
        Action::Failover | Action::Failback if state.phase == Phase::Protected => {
            format!("; the item replicates {}, so use {}", d, failover_action(d))
        }
        Action::Reprotect | Action::ReverseReplicate if state.phase == Phase::Committed => {
            format!("; use {}", reprotect_action(d))
        }
        _ => String::new(),
    };
    Err(Refusal {
        code: ErrorCode::ActionNotAllowed,
        message: format!(
            "{action} is not allowed while the item is {state}; allowed: {}{hint}",
            if allowed.is_empty() {
                "nothing".to_string()
            } else {
                allowed.join(", ")
            }
        ),
    })
}

/// The table itself: `None` where the action is not allowed.
fn table(state: ItemState, req: Request) -> Option<Decision> {
    use Executor::{Agent, MasterTarget as Mt, Operator, Server};
    let d = state.direction;
    let action = req.action;

    if is_job_phase(state.phase) {
        return match action {
            Action::Cancel => Some(Decision::CancelJob),
            Action::Complete if state.phase == Phase::FailoverSynced => Some(Decision::Resume),
            _ => None,
        };
    }

    let start = |steps: Vec<StepPlan>, success: ItemState, effect: Effect| {
        Some(Decision::Start(Transition {
            steps,
            success,
            abort: state,
            effect,
        }))
    };

    match (state.phase, action) {
        (Phase::Unprotected, Action::EnableProtection) => {
            let p = Phase::EnablingProtection;
            start(
                vec![
                    step("prechecks", Server, p),
                    step("initial_sync", Mt, p),
                    step("update_state", Server, p),
                ],
                st(Phase::Protected, d),
                Effect::StartReplication,
            )
        }
        (Phase::Protected, Action::TestFailover) => {
            let p = Phase::TestFailoverStarting;
            start(
                vec![
                    step("prechecks", Server, p),
                    step("create_test_machine", Mt, p),
                    step("update_state", Server, p),
                ],
                st(Phase::TestFailoverActive, d),
                Effect::None,
            )
        }
        (Phase::TestFailoverActive, Action::CleanupTestFailover) => {
            let p = Phase::TestFailoverCleaning;
            start(
                vec![
                    step("remove_test_machine", Mt, p),
                    step("update_state", Server, p),
                ],
                st(Phase::Protected, d),
                Effect::None,
            )
        }
        (Phase::Protected, a) if a == failover_action(d) => {
            let steps = match (req.kind, req.sync) {
                (FailoverKind::Planned, SyncMode::Delta) => vec![
                    step("prechecks", Server, Phase::FailoverSyncing),
                    step("count_differences", Mt, Phase::FailoverSyncing),
                    step("delta_sync", Mt, Phase::FailoverSyncing),
                    step("await_complete", Operator, Phase::FailoverSynced),
                    step("stop_source", Agent, Phase::FailingOver),
                    step("final_delta_sync", Mt, Phase::FailingOver),
                    step("verify", Mt, Phase::FailingOver),
                    step("start_destination", Mt, Phase::FailingOver),
                    step("update_state", Server, Phase::FailingOver),
                ],
                (FailoverKind::Planned, SyncMode::Full) => vec![
                    step("prechecks", Server, Phase::FailingOver),
                    step("stop_source", Agent, Phase::FailingOver),
                    step("full_download", Mt, Phase::FailingOver),
                    step("verify", Mt, Phase::FailingOver),
                    step("start_destination", Mt, Phase::FailingOver),
                    step("update_state", Server, Phase::FailingOver),
                ],
                (FailoverKind::Unplanned, _) => vec![
                    step("prechecks", Server, Phase::FailingOver),
                    step("materialise_point", Mt, Phase::FailingOver),
                    step("start_destination", Mt, Phase::FailingOver),
                    step("update_state", Server, Phase::FailingOver),
                ],
            };
            start(steps, st(Phase::CommitPending, d), Effect::MoveToTarget)
        }
        (Phase::CommitPending, Action::ChangeRecoveryPoint) => {
            let p = Phase::ChangingPoint;
            start(
                vec![
                    step("materialise_point", Mt, p),
                    step("start_destination", Mt, p),
                    step("update_state", Server, p),
                ],
                st(Phase::CommitPending, d),
                Effect::None,
            )
        }
        (Phase::CommitPending, Action::Commit) => {
            let p = Phase::Committing;
            start(
                vec![step("commit", Mt, p), step("update_state", Server, p)],
                st(Phase::Committed, d),
                Effect::Commit,
            )
        }
        (Phase::Committed, a) if a == reprotect_action(d) => {
            let p = Phase::Reprotecting;
            start(
                vec![
                    step("prechecks", Server, p),
                    step("count_differences", Mt, p),
                    step("delta_sync", Mt, p),
                    step("update_state", Server, p),
                ],
                st(Phase::Protected, d.flip()),
                Effect::StartReplication,
            )
        }
        (Phase::Protected, Action::DisableProtection) => {
            let p = Phase::Disabling;
            start(
                vec![
                    step("stop_replication", Mt, p),
                    step("update_state", Server, p),
                ],
                st(Phase::Unprotected, d),
                Effect::StopReplication,
            )
        }
        (Phase::Committed, Action::DisableProtection) => {
            let p = Phase::Disabling;
            start(
                vec![step("update_state", Server, p)],
                st(Phase::Unprotected, d.flip()),
                Effect::StopReplication,
            )
        }
        _ => None,
    }
}
