#![allow(clippy::unwrap_used)]
//! The lifecycle state machine: the whole table, its symmetry, and random
//! action sequences.

use proptest::prelude::*;
use rebound_api::{
    Action, Direction, Executor, FailoverKind, ItemState, Phase, SiteRole, SyncMode,
};
use rebound_control::machine::{
    self, Decision, Effect, Request, active_site, decide, is_job_phase, mirror_action,
    mirror_decision, mirror_state, replicating,
};
use rebound_types::ErrorCode;
use std::collections::BTreeSet;

fn st(phase: Phase, direction: Direction) -> ItemState {
    ItemState { phase, direction }
}

/// What the table says, in short: the actions each stable phase allows for a
/// forward item, and the state a successful job leads to.
fn expected_forward(phase: Phase, action: Action) -> Option<ItemState> {
    use Direction::*;
    use Phase::*;
    let to = match (phase, action) {
        (Unprotected, Action::EnableProtection) => st(Protected, Forward),
        (Protected, Action::TestFailover) => st(TestFailoverActive, Forward),
        (Protected, Action::Failover) => st(CommitPending, Forward),
        (Protected, Action::DisableProtection) => st(Unprotected, Forward),
        (TestFailoverActive, Action::CleanupTestFailover) => st(Protected, Forward),
        (CommitPending, Action::ChangeRecoveryPoint) => st(CommitPending, Forward),
        (CommitPending, Action::Commit) => st(Committed, Forward),
        (Committed, Action::Reprotect) => st(Protected, Reverse),
        (Committed, Action::DisableProtection) => st(Unprotected, Reverse),
        _ => return None,
    };
    Some(to)
}

fn all_requests() -> Vec<Request> {
    let mut out = Vec::new();
    for &action in Action::ALL {
        for &kind in FailoverKind::ALL {
            for &sync in SyncMode::ALL {
                out.push(Request { action, kind, sync });
            }
        }
    }
    out
}

fn all_states() -> Vec<ItemState> {
    let mut out = Vec::new();
    for &phase in Phase::ALL {
        for &direction in Direction::ALL {
            out.push(st(phase, direction));
        }
    }
    out
}

#[test]
fn every_state_and_action_matches_the_table() {
    let mut checked = 0;
    for state in all_states() {
        for req in all_requests() {
            let got = decide(state, req);
            // The table is written for forward items; mirror reverse ones.
            let (fwd_phase, fwd_action) = match state.direction {
                Direction::Forward => (state.phase, req.action),
                Direction::Reverse => (state.phase, mirror_action(req.action)),
            };
            if is_job_phase(state.phase) {
                match (req.action, got) {
                    (Action::Cancel, Ok(Decision::CancelJob)) => {}
                    (Action::Complete, Ok(Decision::Resume)) => {
                        assert_eq!(state.phase, Phase::FailoverSynced)
                    }
                    (Action::Complete, Err(r)) => {
                        assert_ne!(state.phase, Phase::FailoverSynced);
                        assert_eq!(r.code, ErrorCode::ItemBusy);
                    }
                    (a, Err(r)) => {
                        assert!(a != Action::Cancel);
                        assert_eq!(r.code, ErrorCode::ItemBusy, "{state} {a}");
                        assert!(r.message.contains("cancel"), "{}", r.message);
                    }
                    (a, other) => panic!("{state} {a}: unexpected {other:?}"),
                }
            } else {
                match (expected_forward(fwd_phase, fwd_action), got) {
                    (Some(to), Ok(Decision::Start(t))) => {
                        let to = match state.direction {
                            Direction::Forward => to,
                            Direction::Reverse => mirror_state(to),
                        };
                        assert_eq!(t.success, to, "{state} {}", req.action);
                        assert_eq!(t.abort, state, "abort returns to the state before the job");
                        assert!(!t.steps.is_empty());
                        assert!(is_job_phase(t.during().phase), "{state} {}", req.action);
                        assert_eq!(t.steps.last().unwrap().executor, Executor::Server);
                        assert_eq!(t.steps.last().unwrap().name, "update_state");
                    }
                    (None, Err(r)) => {
                        assert_eq!(
                            r.code,
                            ErrorCode::ActionNotAllowed,
                            "{state} {}",
                            req.action
                        );
                        assert!(r.message.contains("allowed:"), "{}", r.message);
                    }
                    (want, got) => panic!("{state} {}: want {want:?}, got {got:?}", req.action),
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, Phase::ALL.len() * 2 * Action::ALL.len() * 4);
}

#[test]
fn the_machine_is_symmetric() {
    for state in all_states() {
        for req in all_requests() {
            let mirrored = Request {
                action: mirror_action(req.action),
                ..req
            };
            let a = decide(state, req).map(|d| mirror_decision(&d));
            let b = decide(mirror_state(state), mirrored);
            match (a, b) {
                (Ok(x), Ok(y)) => assert_eq!(x, y, "{state} {}", req.action),
                (Err(x), Err(y)) => assert_eq!(x.code, y.code, "{state} {}", req.action),
                (x, y) => panic!("{state} {}: {x:?} vs {y:?}", req.action),
            }
        }
    }
}

#[test]
fn failback_is_a_planned_failover_in_reverse() {
    let fwd = decide(
        st(Phase::Protected, Direction::Forward),
        Request {
            action: Action::Failover,
            kind: FailoverKind::Planned,
            sync: SyncMode::Delta,
        },
    )
    .unwrap();
    let back = decide(
        st(Phase::Protected, Direction::Reverse),
        Request::new(Action::Failback),
    )
    .unwrap();
    let (Decision::Start(f), Decision::Start(b)) = (fwd, back) else {
        panic!("both start jobs")
    };
    assert_eq!(f.steps, b.steps, "same steps");
    assert_eq!(b.success, st(Phase::CommitPending, Direction::Reverse));
    assert_eq!(active_site(b.success), SiteRole::Primary);
    let names: Vec<_> = b.steps.iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        [
            "prechecks",
            "count_differences",
            "delta_sync",
            "await_complete",
            "stop_source",
            "final_delta_sync",
            "verify",
            "start_destination",
            "update_state"
        ]
    );
    // Phase 1 runs while the source runs; the operator step is FAILBACK SYNCED.
    assert_eq!(b.state_at(2).phase, Phase::FailoverSyncing);
    assert_eq!(b.state_at(3).phase, Phase::FailoverSynced);
    assert_eq!(b.steps[3].executor, Executor::Operator);
    assert_eq!(b.state_at(4).phase, Phase::FailingOver);
    // Reverse replicate is the reprotect of the forward direction.
    let rr = decide(
        st(Phase::Committed, Direction::Reverse),
        Request::new(Action::ReverseReplicate),
    )
    .unwrap();
    let Decision::Start(rr) = rr else { panic!() };
    assert_eq!(rr.success, st(Phase::Protected, Direction::Forward));
    assert_eq!(rr.during(), st(Phase::Reprotecting, Direction::Forward));
    assert_eq!(active_site(rr.during()), SiteRole::Primary);
}

#[test]
fn unplanned_and_full_download_have_no_operator_step() {
    for (kind, sync) in [
        (FailoverKind::Unplanned, SyncMode::Delta),
        (FailoverKind::Planned, SyncMode::Full),
    ] {
        let Ok(Decision::Start(t)) = decide(
            st(Phase::Protected, Direction::Forward),
            Request {
                action: Action::Failover,
                kind,
                sync,
            },
        ) else {
            panic!()
        };
        assert!(t.steps.iter().all(|s| s.executor != Executor::Operator));
        assert_eq!(t.during().phase, Phase::FailingOver);
    }
}

#[test]
fn refusals_name_the_allowed_actions() {
    let r = decide(
        st(Phase::Protected, Direction::Reverse),
        Request::new(Action::Failover),
    )
    .unwrap_err();
    assert_eq!(r.code, ErrorCode::ActionNotAllowed);
    assert!(r.message.contains("use failback"), "{}", r.message);
    assert!(r.message.contains("failback"), "{}", r.message);
    let r = decide(
        st(Phase::Committed, Direction::Reverse),
        Request::new(Action::Reprotect),
    )
    .unwrap_err();
    assert!(r.message.contains("use reverse_replicate"), "{}", r.message);
    assert_eq!(
        machine::allowed_actions(st(Phase::CommitPending, Direction::Forward)),
        vec![Action::ChangeRecoveryPoint, Action::Commit]
    );
}

/// How a job ends in the simulation.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Succeed,
    Fail,
    Cancel,
    /// Stop at the operator step, if the job has one (then later actions hit it).
    Pause,
}

fn arb_request() -> impl Strategy<Value = Request> {
    (
        prop::sample::select(Action::ALL.to_vec()),
        prop::sample::select(FailoverKind::ALL.to_vec()),
        prop::sample::select(SyncMode::ALL.to_vec()),
    )
        .prop_map(|(action, kind, sync)| Request { action, kind, sync })
}

fn arb_outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => Just(Outcome::Succeed),
        1 => Just(Outcome::Fail),
        1 => Just(Outcome::Cancel),
        2 => Just(Outcome::Pause),
    ]
}

/// The simulated world: where the machine runs and which sites hold a
/// consistent copy, changed only by the effects of successful jobs.
struct World {
    state: ItemState,
    /// A paused job: its transition and the step it waits at.
    paused: Option<machine::Transition>,
    active: SiteRole,
    copies: BTreeSet<SiteRole>,
}

impl World {
    fn new(direction: Direction) -> World {
        World {
            state: st(Phase::Unprotected, direction),
            paused: None,
            active: direction.source(),
            copies: BTreeSet::from([direction.source()]),
        }
    }

    fn finish(&mut self, t: &machine::Transition, ok: bool) {
        if !ok {
            self.state = t.abort;
            return;
        }
        match t.effect {
            Effect::None => {}
            Effect::StartReplication => {
                assert!(
                    self.copies.contains(&self.active),
                    "replicating from a copy"
                );
                self.copies.insert(self.active.other());
            }
            Effect::StopReplication => self.copies.retain(|&s| s == self.active),
            Effect::MoveToTarget => {
                let target = t.abort.direction.target();
                assert!(self.copies.contains(&target), "failover needs a replica");
                self.active = target;
            }
            Effect::Commit => self.copies.retain(|&s| s == self.active),
        }
        self.state = t.success;
    }

    fn check(&self) {
        let s = self.state;
        assert_eq!(
            is_job_phase(s.phase),
            self.paused.is_some(),
            "{s}: a job phase exactly while a job is open"
        );
        assert!(!self.copies.is_empty(), "{s}: no consistent copy anywhere");
        assert!(
            self.copies.contains(&self.active),
            "{s}: the machine runs at {} without a consistent copy there",
            self.active
        );
        assert_eq!(active_site(s), self.active, "{s}: active site");
        if replicating(s) {
            assert_eq!(self.copies.len(), 2, "{s}: replicating without a replica");
        }
        // A state always offers a way on: some action is allowed.
        assert!(!machine::allowed_actions(s).is_empty(), "{s}: dead end");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_action_sequences_stay_defined_and_keep_a_copy(
        reverse_start in any::<bool>(),
        steps in prop::collection::vec((arb_request(), arb_outcome()), 1..60),
    ) {
        let mut w = World::new(if reverse_start { Direction::Reverse } else { Direction::Forward });
        w.check();
        for (req, outcome) in steps {
            let before = w.state;
            match decide(w.state, req) {
                Err(r) => {
                    prop_assert_eq!(w.state, before, "a refusal changes nothing");
                    prop_assert!(matches!(r.code, ErrorCode::ActionNotAllowed | ErrorCode::ItemBusy));
                }
                Ok(Decision::CancelJob) => {
                    let t = w.paused.take().expect("cancel only with an open job");
                    w.finish(&t, false);
                    prop_assert_eq!(w.state, t.abort);
                }
                Ok(Decision::Resume) => {
                    let t = w.paused.take().expect("resume only with an open job");
                    let ok = !matches!(outcome, Outcome::Fail | Outcome::Cancel);
                    w.finish(&t, ok);
                }
                Ok(Decision::Start(t)) => {
                    prop_assert!(w.paused.is_none());
                    let wait = t.steps.iter().position(|s| s.executor == Executor::Operator);
                    match (outcome, wait) {
                        (Outcome::Pause, Some(i)) => {
                            w.state = t.state_at(i);
                            prop_assert_eq!(w.state.phase, Phase::FailoverSynced);
                            w.paused = Some(t);
                        }
                        (Outcome::Succeed | Outcome::Pause, _) => w.finish(&t, true),
                        (Outcome::Fail | Outcome::Cancel, _) => {
                            w.finish(&t, false);
                            prop_assert_eq!(w.state, before, "abort leaves the item as it was");
                        }
                    }
                }
            }
            w.check();
        }
    }
}
