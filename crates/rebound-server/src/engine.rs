//! Durable jobs. A job is a row with its ordered steps; the state machine of
//! `rebound-control` decides its steps from the item's state when it started
//! (`from_state`) and its request, so the engine can always recompute what a
//! job means after a restart.
//!
//! Steps run by the server (prechecks, state changes) are idempotent and are
//! simply run again after a restart; steps run by a component are resumed by
//! that component's next report, and fail with `job-step-timed-out` if no
//! report comes within the step timeout; operator steps wait for `continue`
//! (complete failover). No job can stay "running" forever.

use crate::AppState;
use crate::error::{AppError, AppResult};
use rebound_api::{
    Action, ActionRequest, ApiError, Executor, Failure, Item, ItemState, Job, JobState, JobStep,
    Location, PointChoice, StepReport, StepState, SyncMode,
};
use rebound_control::machine::{self, Decision, Effect, Request, Transition};
use rebound_control::{prechecks, time};
use rebound_types::ErrorCode;
use std::time::SystemTime;
use tracing::{info, warn};

/// The resolved request: defaults applied.
pub fn resolve(req: &ActionRequest) -> Request {
    Request {
        action: req.action,
        kind: req
            .kind
            .unwrap_or_else(|| machine::default_kind(req.action)),
        sync: req.sync.unwrap_or(SyncMode::Delta),
    }
}

/// The transition a job runs, recomputed from its start state and request.
pub fn transition_of(job: &Job) -> Option<Transition> {
    let from = job.from_state?;
    match machine::decide(from, resolve(&job.request)) {
        Ok(Decision::Start(t)) => Some(t),
        _ => None,
    }
}

fn step_percent(s: &JobStep) -> f64 {
    if s.state == StepState::Done {
        100.0
    } else if s.bytes_total > 0 {
        (s.bytes_done as f64 * 100.0 / s.bytes_total as f64).min(100.0)
    } else {
        0.0
    }
}

/// Start (or refuse) an action on an item.
/// `latest-group`: the latest group marker that every one of `items` has a
/// recovery point for (markers are the agreed barrier times), as
/// `group:MARKER`.
pub(crate) async fn resolve_latest_group(
    store: &rebound_store::Store,
    items: &[String],
) -> AppResult<String> {
    let mut common: Option<std::collections::BTreeSet<(u64, String)>> = None;
    for id in items {
        let mine: std::collections::BTreeSet<(u64, String)> = store
            .points(id)
            .await?
            .into_iter()
            .filter_map(|p| p.group_marker)
            .map(|m| (m.parse().unwrap_or(0), m))
            .collect();
        common = Some(match common {
            None => mine,
            Some(c) => c.intersection(&mine).cloned().collect(),
        });
    }
    match common.and_then(|c| c.into_iter().next_back()) {
        Some((_, m)) => Ok(format!("group:{m}")),
        None => Err(AppError::new(
            ErrorCode::PointNotFound,
            format!("no group recovery point is common to {}", items.join(", ")),
        )),
    }
}

#[tracing::instrument(skip(state, req), fields(item = %item_key, action = %req.action))]
pub async fn submit(state: &AppState, item_key: &str, mut req: ActionRequest) -> AppResult<Job> {
    let store = &state.store;
    let _w = store.lock().await;
    let Some(mut item) = store.item(item_key).await? else {
        return Err(AppError::new(
            ErrorCode::ItemUnknown,
            format!("the configuration server does not know the item {item_key:?}"),
        ));
    };
    let resolved = resolve(&req);
    let decision =
        machine::decide(item.state, resolved).map_err(|r| AppError::new(r.code, r.message))?;
    match decision {
        Decision::CancelJob | Decision::Resume => {
            let Some(job_id) = item.job_id.clone() else {
                return Err(AppError::new(
                    ErrorCode::JobInterrupted,
                    format!(
                        "item {} is {} but has no job; run the action again",
                        item.name, item.state
                    ),
                ));
            };
            drop(_w);
            if resolved.action == Action::Cancel {
                cancel(state, &job_id).await
            } else {
                continue_job(state, &job_id).await
            }
        }
        Decision::Start(t) => {
            if req.point_id.as_deref().map(PointChoice::parse) == Some(PointChoice::LatestGroup) {
                let Some(g) = &item.group_id else {
                    return Err(AppError::new(
                        ErrorCode::InvalidRequest,
                        format!(
                            "item {} is in no replication group: latest-group has no meaning for it",
                            item.name
                        ),
                    ));
                };
                let members: Vec<String> = store
                    .items_in_group(g)
                    .await?
                    .into_iter()
                    .map(|m| m.id)
                    .collect();
                req.point_id = Some(resolve_latest_group(store, &members).await?);
            }
            if let Some(plan_id) = &req.plan_id {
                let Some(plan) = store.plan(plan_id).await? else {
                    return Err(AppError::new(
                        ErrorCode::NotFound,
                        format!("no recovery plan {plan_id:?}"),
                    ));
                };
                let members = plan.steps.iter().flat_map(|s| s.items.iter());
                if !members
                    .into_iter()
                    .any(|m| m == &item.id || m == &item.name)
                {
                    return Err(AppError::new(
                        ErrorCode::InvalidRequest,
                        format!(
                            "recovery plan {} does not contain item {}",
                            plan.name, item.name
                        ),
                    ));
                }
            }
            let now = time::now();
            let mt = match req.action {
                Action::EnableProtection | Action::Reprotect | Action::ReverseReplicate => {
                    req.master_target_id.clone()
                }
                _ => req
                    .master_target_id
                    .clone()
                    .or_else(|| item.master_target_id.clone()),
            };
            let destination = match t.effect {
                Effect::StartReplication => t.success.direction.target(),
                _ => t.abort.direction.target(),
            };
            let mut job = Job {
                id: rebound_store::new_id("job"),
                action: req.action,
                item_id: Some(item.id.clone()),
                plan_id: req.plan_id.clone(),
                state: JobState::Running,
                steps: Vec::new(),
                request: req.clone(),
                from_state: Some(item.state),
                cancel_requested: false,
                created_at: now.clone(),
                started_at: Some(now.clone()),
                ended_at: None,
                error: None,
            };
            for (i, s) in t.steps.iter().enumerate() {
                let component_id = match s.executor {
                    Executor::MasterTarget => mt.clone(),
                    Executor::Agent => item.agent_id.clone(),
                    Executor::ProcessServer => req
                        .process_server_id
                        .clone()
                        .or_else(|| item.process_server_id.clone()),
                    Executor::Server | Executor::Operator => None,
                };
                if matches!(
                    s.executor,
                    Executor::MasterTarget | Executor::Agent | Executor::ProcessServer
                ) && component_id.is_none()
                {
                    return Err(AppError::new(
                        ErrorCode::InvalidRequest,
                        format!(
                            "step {} of {} needs a {}; none is set on item {} or in the request",
                            s.name, req.action, s.executor, item.name
                        ),
                    ));
                }
                job.steps.push(JobStep {
                    index: i as u32,
                    name: s.name.to_string(),
                    executor: s.executor,
                    component_id,
                    state: StepState::Pending,
                    bytes_done: 0,
                    bytes_total: 0,
                    percent: 0.0,
                    started_at: None,
                    ended_at: None,
                    updated_at: None,
                    error: None,
                    job_ids: Vec::new(),
                    message: None,
                });
            }
            if t.steps.first().map(|s| s.name) == Some("prechecks") {
                let failures =
                    run_prechecks(state, &item, &req, resolved, destination, mt.as_deref()).await?;
                let step = &mut job.steps[0];
                step.started_at = Some(now.clone());
                step.ended_at = Some(now.clone());
                step.updated_at = Some(now.clone());
                if !failures.is_empty() {
                    step.state = StepState::Failed;
                    step.error = failures.first().cloned();
                    let err = AppError::prechecks(failures);
                    job.state = JobState::Failed;
                    job.ended_at = Some(now);
                    job.error = Some(err.0.clone());
                    store.insert_job(&job).await?;
                    info!(job = %job.id, "prechecks failed");
                    return Err(err);
                }
                step.state = StepState::Done;
                step.percent = 100.0;
            }
            store.insert_job(&job).await?;
            if t.effect == Effect::StartReplication {
                // A new replica is built: the old one's apply progress (of
                // another stream, maybe another agent) no longer describes it.
                item.replica_progress = None;
            }
            item.state = t.during();
            item.job_id = Some(job.id.clone());
            item.updated_at = time::now();
            store.put_item(&item).await?;
            info!(job = %job.id, state = %item.state, "job started");
            drop(_w);
            // Offer the first component step at once.
            advance(state, &job.id).await?;
            load_job(state, &job.id).await
        }
    }
}

async fn run_prechecks(
    state: &AppState,
    item: &Item,
    req: &ActionRequest,
    resolved: Request,
    destination: rebound_api::SiteRole,
    mt: Option<&str>,
) -> AppResult<Vec<Failure>> {
    let store = &state.store;
    let lookup = |id: Option<String>| async move {
        match id {
            Some(id) => store.component(&id).await,
            None => Ok(None),
        }
    };
    let agent = lookup(item.agent_id.clone()).await?;
    let master_target = lookup(mt.map(str::to_string)).await?;
    let ps = lookup(
        req.process_server_id
            .clone()
            .or_else(|| item.process_server_id.clone()),
    )
    .await?;
    let members = match &item.group_id {
        Some(g) => store
            .items_in_group(g)
            .await?
            .into_iter()
            .filter(|m| m.id != item.id)
            .collect(),
        None => Vec::new(),
    };
    let destination_site_id = match destination {
        rebound_api::SiteRole::Primary => item.primary_site_id.clone(),
        rebound_api::SiteRole::Recovery => item.recovery_site_id.clone(),
    };
    let mut failures = Vec::new();
    if let (Some(id), None) = (mt, &master_target) {
        failures.push(Failure::new(
            ErrorCode::NotFound,
            format!("no master target {id:?}"),
        ));
    }
    if let Some(p) = &req.point_id
        && matches!(PointChoice::parse(p), PointChoice::Id(_))
        && store.point(&item.id, p).await?.is_none()
    {
        failures.push(Failure::new(
            ErrorCode::PointNotFound,
            format!("item {} has no recovery point {p}", item.name),
        ));
    }
    let input = prechecks::Input {
        action: req.action,
        kind: resolved.kind,
        location: req.location.unwrap_or(Location::Original),
        item: Some(item),
        item_ref: &item.name,
        destination,
        destination_site_id: &destination_site_id,
        agent: agent.as_ref(),
        master_target: master_target.as_ref(),
        process_server: ps.as_ref(),
        datastore: req.datastore.as_deref().or(item.datastore.as_deref()),
        retention_volume: req
            .retention_volume
            .as_deref()
            .or(item.retention_volume.as_deref()),
        group_members: &members,
        plan_id: req.plan_id.as_deref(),
        now: SystemTime::now(),
        heartbeat_limit: state.config.heartbeat_limit,
    };
    failures.extend(prechecks::run(&input));
    Ok(failures)
}

pub(crate) async fn load_job(state: &AppState, id: &str) -> AppResult<Job> {
    state
        .store
        .job(id)
        .await?
        .ok_or_else(|| AppError::new(ErrorCode::JobNotFound, format!("no job {id:?}")))
}

/// Ask for a job to be cancelled: it ends at the engine's next pass, and the
/// item goes back to the state it had before the job.
pub async fn cancel(state: &AppState, id: &str) -> AppResult<Job> {
    let _w = state.store.lock().await;
    let mut job = load_job(state, id).await?;
    if job.state.is_finished() {
        return Err(AppError::new(
            ErrorCode::JobFinished,
            format!("job {id} already {}", job.state),
        ));
    }
    job.cancel_requested = true;
    state.store.put_job(&job).await?;
    drop(_w);
    // Finish it now rather than at the next tick.
    advance(state, id).await?;
    load_job(state, id).await
}

/// Let an operator step go on (complete failover, a manual action done).
pub async fn continue_job(state: &AppState, id: &str) -> AppResult<Job> {
    {
        let _w = state.store.lock().await;
        let mut job = load_job(state, id).await?;
        if job.state.is_finished() {
            return Err(AppError::new(
                ErrorCode::JobFinished,
                format!("job {id} already {}", job.state),
            ));
        }
        let Some(step) = job.steps.iter_mut().find(|s| s.state == StepState::Waiting) else {
            return Err(AppError::new(
                ErrorCode::ActionNotAllowed,
                format!("job {id} is not waiting for an operator"),
            ));
        };
        if !step.job_ids.is_empty() {
            // A plan's group step waits for its items' jobs: continue them.
            let children = step.job_ids.clone();
            step.state = StepState::Running;
            job.state = JobState::Running;
            state.store.put_job(&job).await?;
            drop(_w);
            for child in children {
                let waiting = state
                    .store
                    .job(&child)
                    .await?
                    .is_some_and(|c| c.state == JobState::Waiting);
                if waiting {
                    Box::pin(continue_job(state, &child)).await?;
                }
            }
            advance(state, id).await?;
            return load_job(state, id).await;
        }
        let now = time::now();
        step.state = StepState::Done;
        step.percent = 100.0;
        step.ended_at = Some(now.clone());
        step.updated_at = Some(now);
        job.state = JobState::Running;
        state.store.put_job(&job).await?;
        info!(job = %id, "operator step completed");
    }
    advance(state, id).await?;
    load_job(state, id).await
}

/// A component reports progress or the result of its step.
pub async fn report(
    state: &AppState,
    job_id: &str,
    index: u32,
    component_id: Option<&str>,
    is_admin: bool,
    rep: StepReport,
) -> AppResult<Job> {
    {
        let _w = state.store.lock().await;
        let mut job = load_job(state, job_id).await?;
        let Some(step) = job.steps.get_mut(index as usize) else {
            return Err(AppError::new(
                ErrorCode::NotFound,
                format!("job {job_id} has no step {index}"),
            ));
        };
        if !is_admin && step.component_id.as_deref() != component_id {
            return Err(AppError::new(
                ErrorCode::Forbidden,
                format!("step {index} of job {job_id} is not assigned to this component"),
            ));
        }
        if job.state.is_finished() {
            return Err(AppError::new(
                ErrorCode::JobFinished,
                format!("job {job_id} already {}", job.state),
            ));
        }
        if step.state != StepState::Running {
            return Err(AppError::new(
                ErrorCode::ActionNotAllowed,
                format!(
                    "step {index} of job {job_id} is {}, not running",
                    step.state
                ),
            ));
        }
        let now = time::now();
        step.bytes_done = rep.bytes_done;
        step.bytes_total = rep.bytes_total.max(rep.bytes_done);
        step.updated_at = Some(now.clone());
        if rep.state != StepState::Failed && rep.message.is_some() {
            step.message = rep.message.clone();
        }
        match rep.state {
            StepState::Running => {}
            StepState::Done => {
                step.state = StepState::Done;
                step.ended_at = Some(now);
            }
            StepState::Failed => {
                let code = rep
                    .error_code
                    .and_then(ErrorCode::from_number)
                    .unwrap_or(ErrorCode::JobInterrupted);
                let f = Failure::new(
                    code,
                    rep.message
                        .unwrap_or_else(|| format!("step {} failed", step.name)),
                );
                step.state = StepState::Failed;
                step.ended_at = Some(now);
                step.error = Some(f);
            }
            other => {
                return Err(AppError::new(
                    ErrorCode::InvalidRequest,
                    format!("a step report's state is running, done or failed, not {other}"),
                ));
            }
        }
        step.percent = step_percent(step);
        state.store.put_job(&job).await?;
    }
    advance(state, job_id).await?;
    load_job(state, job_id).await
}

/// End a job: write its final state, and the item's.
pub(crate) async fn finish(
    state: &AppState,
    job: &mut Job,
    t: Option<&Transition>,
    result: JobState,
    error: Option<ApiError>,
) -> AppResult<()> {
    let now = time::now();
    job.state = result;
    job.ended_at = Some(now.clone());
    job.error = error;
    for s in &mut job.steps {
        if matches!(
            s.state,
            StepState::Pending | StepState::Running | StepState::Waiting
        ) {
            s.state = StepState::Cancelled;
            s.ended_at = Some(now.clone());
        }
        s.percent = step_percent(s);
    }
    state.store.put_job(job).await?;
    if let Some(item_id) = &job.item_id
        && let Some(mut item) = state.store.item(item_id).await?
        && item.job_id.as_deref() == Some(job.id.as_str())
    {
        item.job_id = None;
        item.state = match (result, t, job.from_state) {
            (JobState::Succeeded, Some(t), _) => {
                apply_success(state, &mut item, job, t).await?;
                t.success
            }
            (_, Some(t), _) => t.abort,
            (_, None, Some(from)) => from,
            (_, None, None) => item.state,
        };
        item.updated_at = now;
        state.store.put_item(&item).await?;
    }
    info!(job = %job.id, state = %result, "job finished");
    Ok(())
}

/// What a successful job records on the item besides its state.
async fn apply_success(
    state: &AppState,
    item: &mut Item,
    job: &Job,
    t: &Transition,
) -> AppResult<()> {
    let req = &job.request;
    if t.effect == Effect::StartReplication {
        item.master_target_id = req
            .master_target_id
            .clone()
            .or(item.master_target_id.take());
        item.process_server_id = req
            .process_server_id
            .clone()
            .or(item.process_server_id.take());
        item.datastore = req.datastore.clone().or(item.datastore.take());
        item.retention_volume = req
            .retention_volume
            .clone()
            .or(item.retention_volume.take());
        item.detached = None;
        // Reprotect selects the failback policy; reverse replicate the forward one.
        let policy = match req.policy_id.clone() {
            Some(p) => Some(p),
            None => match (req.action, item.policy_id.clone()) {
                (Action::Reprotect, Some(p)) => state
                    .store
                    .policy(&p)
                    .await?
                    .and_then(|p| p.failback_policy_id)
                    .or(Some(p)),
                (Action::ReverseReplicate, Some(p)) => state
                    .store
                    .policy(&p)
                    .await?
                    .and_then(|p| p.parent_policy_id)
                    .or(Some(p)),
                (_, p) => p,
            },
        };
        item.policy_id = policy;
    }
    if t.effect == Effect::StopReplication {
        item.master_target_id = None;
        item.process_server_id = None;
    }
    Ok(())
}

/// Move one job forward as far as it can go now.
#[tracing::instrument(skip(state))]
pub async fn advance(state: &AppState, job_id: &str) -> AppResult<()> {
    let _w = state.store.lock().await;
    let mut job = load_job(state, job_id).await?;
    if job.state.is_finished() {
        return Ok(());
    }
    if job.item_id.is_none() && job.plan_id.is_some() {
        drop(_w);
        return Box::pin(crate::plan::advance(state, job_id)).await;
    }
    let t = transition_of(&job);
    if job.cancel_requested {
        let e = ApiError::new(
            ErrorCode::JobCancelled,
            format!("job {} was cancelled", job.id),
        );
        return finish(state, &mut job, t.as_ref(), JobState::Cancelled, Some(e)).await;
    }
    let Some(t) = t else {
        let e = ApiError::new(
            ErrorCode::JobInterrupted,
            format!(
                "job {} cannot be resumed: its request no longer applies",
                job.id
            ),
        );
        return finish(state, &mut job, None, JobState::Failed, Some(e)).await;
    };
    let now = time::now();
    loop {
        if let Some(failed) = job.steps.iter().find(|s| s.state == StepState::Failed) {
            let f = failed
                .error
                .clone()
                .unwrap_or_else(|| Failure::new(ErrorCode::JobInterrupted, "step failed"));
            let mut e = ApiError::new(
                ErrorCode::from_number(f.code).unwrap_or(ErrorCode::JobInterrupted),
                format!("step {} failed: {}", failed.name, f.message),
            );
            e.remedy = f.remedy.clone();
            return finish(state, &mut job, Some(&t), JobState::Failed, Some(e)).await;
        }
        let Some(i) = job.steps.iter().position(|s| s.state != StepState::Done) else {
            return finish(state, &mut job, Some(&t), JobState::Succeeded, None).await;
        };
        set_item_phase(state, &job, t.state_at(i)).await?;
        let step = &mut job.steps[i];
        match (step.executor, step.state) {
            (Executor::Server, _) => {
                // Server steps are idempotent: prechecks ran at submission,
                // update_state is applied by `finish`.
                step.state = StepState::Done;
                step.started_at.get_or_insert(now.clone());
                step.ended_at = Some(now.clone());
                step.updated_at = Some(now.clone());
                step.percent = 100.0;
                continue;
            }
            (Executor::Operator, StepState::Pending) => {
                step.state = StepState::Waiting;
                step.started_at = Some(now.clone());
                step.updated_at = Some(now.clone());
                job.state = JobState::Waiting;
                state.store.put_job(&job).await?;
                info!(step = i, "waiting for an operator");
                return Ok(());
            }
            (Executor::Operator, _) => return Ok(()),
            (_, StepState::Pending) => {
                step.state = StepState::Running;
                step.started_at = Some(now.clone());
                step.updated_at = Some(now.clone());
                job.state = JobState::Running;
                state.store.put_job(&job).await?;
                return Ok(());
            }
            (_, StepState::Running) => {
                let last = step.updated_at.as_deref().and_then(time::parse);
                let stale = match last {
                    Some(t0) => SystemTime::now()
                        .duration_since(t0)
                        .map(|age| age > state.config.step_timeout)
                        .unwrap_or(false),
                    None => true,
                };
                if stale {
                    warn!(step = i, "component step timed out");
                    step.state = StepState::Failed;
                    step.ended_at = Some(now.clone());
                    step.error = Some(Failure::new(
                        ErrorCode::JobStepTimedOut,
                        format!(
                            "{} {} did not report on step {} for {} s",
                            step.executor,
                            step.component_id.as_deref().unwrap_or("-"),
                            step.name,
                            state.config.step_timeout.as_secs()
                        ),
                    ));
                    continue;
                }
                state.store.put_job(&job).await?;
                return Ok(());
            }
            (_, _) => {
                state.store.put_job(&job).await?;
                return Ok(());
            }
        }
    }
}

async fn set_item_phase(state: &AppState, job: &Job, s: ItemState) -> AppResult<()> {
    let Some(item_id) = &job.item_id else {
        return Ok(());
    };
    if let Some(mut item) = state.store.item(item_id).await?
        && item.job_id.as_deref() == Some(job.id.as_str())
        && item.state != s
    {
        item.state = s;
        item.updated_at = time::now();
        state.store.put_item(&item).await?;
    }
    Ok(())
}

/// After a restart: give running component steps a full timeout to report
/// again (they resume from their last finished step), and fail jobs whose
/// item has lost track of them.
pub async fn recover(state: &AppState) -> AppResult<()> {
    let jobs = state.store.open_jobs().await?;
    let _w = state.store.lock().await;
    let now = time::now();
    for mut job in jobs {
        let mut changed = false;
        if job.item_id.is_none() {
            // A plan's group step interrupted while starting its item jobs,
            // or a script step whose script died with the server: it is
            // failed, never run again behind the operator's back.
            for s in &mut job.steps {
                if s.executor == Executor::Server
                    && s.state == StepState::Running
                    && s.job_ids.is_empty()
                {
                    let why = if crate::plan::is_script_step(s) {
                        "the server restarted while this script ran; it is not run again \
                         by itself: check what it did, then run the plan action again"
                    } else {
                        "the server restarted while this step started its item jobs"
                    };
                    s.state = StepState::Failed;
                    s.ended_at = Some(now.clone());
                    s.error = Some(Failure::new(ErrorCode::JobInterrupted, why));
                    changed = true;
                }
            }
        }
        for s in &mut job.steps {
            if s.state == StepState::Running && s.executor != Executor::Server {
                s.updated_at = Some(now.clone());
                changed = true;
            }
        }
        let orphan = match &job.item_id {
            Some(id) => state
                .store
                .item(id)
                .await?
                .is_none_or(|i| i.job_id.as_deref() != Some(job.id.as_str())),
            None => false,
        };
        if orphan {
            let e = ApiError::new(
                ErrorCode::JobInterrupted,
                format!(
                    "job {} was interrupted by a restart and its item no longer refers to it",
                    job.id
                ),
            );
            let t = transition_of(&job);
            finish(state, &mut job, t.as_ref(), JobState::Failed, Some(e)).await?;
            continue;
        }
        if changed {
            state.store.put_job(&job).await?;
        }
        info!(job = %job.id, "job resumed after restart");
    }
    // An item whose job ended (or vanished) while the item was being written
    // back gets the state the job's outcome gives it.
    for mut item in state.store.items().await? {
        let Some(job_id) = item.job_id.clone() else {
            continue;
        };
        let job = state.store.job(&job_id).await?;
        if job.as_ref().is_some_and(|j| !j.state.is_finished()) {
            continue;
        }
        let t = job.as_ref().and_then(transition_of);
        item.state = match (&job, &t) {
            (Some(j), Some(t)) if j.state == JobState::Succeeded => {
                apply_success(state, &mut item, j, t).await?;
                t.success
            }
            (_, Some(t)) => t.abort,
            (Some(j), None) => j.from_state.unwrap_or(item.state),
            (None, None) => {
                // Jobs are written before the item refers to them, so this
                // only happens to a database edited by hand.
                tracing::error!(item = %item.id, job = %job_id, "item refers to a job that does not exist");
                continue;
            }
        };
        warn!(item = %item.id, job = %job_id, state = %item.state, "item repaired after restart");
        item.job_id = None;
        item.updated_at = now.clone();
        state.store.put_item(&item).await?;
    }
    Ok(())
}

/// The engine: advance every open job on a tick or when woken.
pub async fn run(state: AppState) {
    loop {
        match state.store.open_jobs().await {
            Ok(jobs) => {
                for job in jobs {
                    if let Err(e) = advance(&state, &job.id).await {
                        warn!(job = %job.id, code = e.0.code, message = %e.0.message, "job engine");
                    }
                }
            }
            Err(e) => warn!(error = %e, "job engine cannot list jobs"),
        }
        tokio::select! {
            _ = state.wake.notified() => {}
            _ = tokio::time::sleep(state.config.engine_tick) => {}
        }
    }
}
