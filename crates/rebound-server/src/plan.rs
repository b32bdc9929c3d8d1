//! Jobs of a recovery plan: one step per plan step, in order. A group step
//! starts the action on every item of the group (item jobs carrying the
//! plan's id) and is done when they all succeeded; it waits for the operator
//! when they all wait (complete failover), and fails when one fails. A
//! script step runs its command on the configuration server host
//! ([`crate::script`]) and fails the plan when it fails. Manual steps wait
//! for the operator, who does what they say and continues the job.

use crate::AppState;
use crate::engine::{self, load_job};
use crate::error::{AppError, AppResult};
use crate::script;
use rebound_api::{
    Action, ActionRequest, ApiError, Executor, Failure, Job, JobState, JobStep, PlanStepKind,
    StepState,
};
use rebound_control::time;
use rebound_types::ErrorCode;
use tracing::info;

/// Start an action for a whole recovery plan.
#[tracing::instrument(skip(state, req), fields(plan = %plan_key, action = %req.action))]
pub async fn submit(state: &AppState, plan_key: &str, mut req: ActionRequest) -> AppResult<Job> {
    if matches!(
        req.action,
        Action::Cancel | Action::Complete | Action::ChangeRecoveryPoint
    ) {
        return Err(AppError::new(
            ErrorCode::InvalidRequest,
            format!(
                "{} is not a plan action; use the plan job's cancel/continue or the item",
                req.action
            ),
        ));
    }
    let job = {
        let _w = state.store.lock().await;
        let plan = state.store.plan(plan_key).await?.ok_or_else(|| {
            AppError::new(
                ErrorCode::NotFound,
                format!("no recovery plan {plan_key:?}"),
            )
        })?;
        let busy = state
            .store
            .open_jobs()
            .await?
            .into_iter()
            .any(|j| j.item_id.is_none() && j.plan_id.as_deref() == Some(plan.id.as_str()));
        if busy {
            return Err(AppError::new(
                ErrorCode::ItemBusy,
                format!("recovery plan {} already has a running job", plan.name),
            ));
        }
        req.plan_id = Some(plan.id.clone());
        // One group point for the whole plan, chosen once: its item jobs
        // start one after another while points may still arrive.
        if req.point_id.as_deref().map(rebound_api::PointChoice::parse)
            == Some(rebound_api::PointChoice::LatestGroup)
        {
            let mut ids = Vec::new();
            for key in plan.steps.iter().flat_map(|s| s.items.iter()) {
                match state.store.item(key).await? {
                    Some(i) => ids.push(i.id),
                    None => {
                        return Err(AppError::new(
                            ErrorCode::ItemUnknown,
                            format!("recovery plan {} names an unknown item {key:?}", plan.name),
                        ));
                    }
                }
            }
            req.point_id = Some(crate::engine::resolve_latest_group(&state.store, &ids).await?);
        }
        let now = time::now();
        let steps = plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| JobStep {
                index: i as u32,
                name: match s.kind {
                    PlanStepKind::Group => format!("group: {}", s.items.join(", ")),
                    k => format!("{k}: {}", s.text.as_deref().unwrap_or_default()),
                },
                executor: match s.kind {
                    PlanStepKind::Group | PlanStepKind::Script => Executor::Server,
                    PlanStepKind::Manual => Executor::Operator,
                },
                component_id: None,
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
            })
            .collect();
        let job = Job {
            id: rebound_store::new_id("job"),
            action: req.action,
            item_id: None,
            plan_id: Some(plan.id.clone()),
            state: JobState::Running,
            steps,
            request: req,
            from_state: None,
            cancel_requested: false,
            created_at: now.clone(),
            started_at: Some(now),
            ended_at: None,
            error: None,
        };
        state.store.insert_job(&job).await?;
        info!(job = %job.id, "plan job started");
        job
    };
    advance(state, &job.id).await?;
    load_job(state, &job.id).await
}

enum Next {
    Stop,
    Again,
    Start(usize, Vec<String>),
    Script(script::Spec),
}

/// Whether a plan job's step is a script step (its name is `script: CMD`).
pub(crate) fn is_script_step(step: &JobStep) -> bool {
    step.executor == Executor::Server && step.name.starts_with("script: ")
}

fn failure_of(e: &ApiError) -> Failure {
    Failure {
        code: e.code,
        message: e.to_string(),
        remedy: e.remedy.clone(),
    }
}

/// Move a plan job forward as far as it can go now.
pub async fn advance(state: &AppState, job_id: &str) -> AppResult<()> {
    for _ in 0..10_000 {
        let next = {
            let _w = state.store.lock().await;
            step_once(state, job_id).await?
        };
        match next {
            Next::Stop => return Ok(()),
            Next::Again => continue,
            Next::Script(spec) => {
                script::spawn(state, spec);
                return Ok(());
            }
            Next::Start(i, items) => {
                let job = load_job(state, job_id).await?;
                let mut ids = Vec::new();
                let mut error = None;
                for item in items {
                    match engine::submit(state, &item, job.request.clone()).await {
                        Ok(child) => ids.push(child.id),
                        Err(e) => {
                            error = Some(e.0);
                            break;
                        }
                    }
                }
                let _w = state.store.lock().await;
                let mut job = load_job(state, job_id).await?;
                if let Some(e) = &error {
                    for id in &ids {
                        request_cancel(state, id).await?;
                    }
                    let step = &mut job.steps[i];
                    step.state = StepState::Failed;
                    step.ended_at = Some(time::now());
                    step.error = Some(failure_of(e));
                }
                job.steps[i].job_ids = ids;
                state.store.put_job(&job).await?;
            }
        }
    }
    Ok(())
}

async fn request_cancel(state: &AppState, id: &str) -> AppResult<()> {
    if let Some(mut child) = state.store.job(id).await?
        && !child.state.is_finished()
    {
        child.cancel_requested = true;
        state.store.put_job(&child).await?;
        state.wake.notify_one();
    }
    Ok(())
}

async fn step_once(state: &AppState, job_id: &str) -> AppResult<Next> {
    let mut job = load_job(state, job_id).await?;
    if job.state.is_finished() {
        return Ok(Next::Stop);
    }
    let now = time::now();
    if job.cancel_requested {
        state.scripts.kill(&job.id);
        for s in &job.steps {
            for id in &s.job_ids {
                request_cancel(state, id).await?;
            }
        }
        let e = ApiError::new(
            ErrorCode::JobCancelled,
            format!("job {} was cancelled", job.id),
        );
        engine::finish(state, &mut job, None, JobState::Cancelled, Some(e)).await?;
        return Ok(Next::Stop);
    }
    if let Some(failed) = job.steps.iter().find(|s| s.state == StepState::Failed) {
        let f = failed.error.clone().unwrap_or_else(|| {
            Failure::new(ErrorCode::JobInterrupted, "a step of the plan failed")
        });
        let mut e = ApiError::new(
            ErrorCode::from_number(f.code).unwrap_or(ErrorCode::JobInterrupted),
            format!("plan step {} failed: {}", failed.name, f.message),
        );
        e.remedy = f.remedy;
        engine::finish(state, &mut job, None, JobState::Failed, Some(e)).await?;
        return Ok(Next::Stop);
    }
    let Some(i) = job.steps.iter().position(|s| s.state != StepState::Done) else {
        engine::finish(state, &mut job, None, JobState::Succeeded, None).await?;
        return Ok(Next::Stop);
    };
    let step = &mut job.steps[i];
    match (step.executor, step.state) {
        (Executor::Operator, StepState::Pending) => {
            step.state = StepState::Waiting;
            step.started_at = Some(now.clone());
            step.updated_at = Some(now);
            job.state = JobState::Waiting;
            state.store.put_job(&job).await?;
            Ok(Next::Stop)
        }
        (Executor::Server, StepState::Pending) => {
            let plan_id = job.plan_id.clone().unwrap_or_default();
            let plan = state.store.plan(&plan_id).await?;
            let plan_step = plan.as_ref().and_then(|p| p.steps.get(i));
            if let (Some(p), Some(ps)) = (&plan, plan_step)
                && ps.kind == PlanStepKind::Script
            {
                let spec = script::Spec {
                    job_id: job.id.clone(),
                    index: i,
                    command: ps.text.clone().unwrap_or_default(),
                    timeout: std::time::Duration::from_secs(
                        ps.timeout_secs
                            .unwrap_or(rebound_api::PlanStep::DEFAULT_SCRIPT_TIMEOUT_SECS),
                    ),
                    plan_id: p.id.clone(),
                    plan_name: p.name.clone(),
                    action: job.action.to_string(),
                };
                step.state = StepState::Running;
                step.started_at = Some(now.clone());
                step.updated_at = Some(now);
                job.state = JobState::Running;
                state.store.put_job(&job).await?;
                info!(job = %job.id, step = i, "running the plan's script step");
                return Ok(Next::Script(spec));
            }
            if is_script_step(step) {
                // The plan no longer has this script: never guess a command.
                step.state = StepState::Failed;
                step.ended_at = Some(now);
                step.error = Some(Failure::new(
                    ErrorCode::PlanScriptFailed,
                    format!("recovery plan {plan_id} has no script step {i} any more"),
                ));
                state.store.put_job(&job).await?;
                return Ok(Next::Again);
            }
            let items = plan
                .and_then(|p| p.steps.get(i).map(|s| s.items.clone()))
                .unwrap_or_default();
            step.state = StepState::Running;
            step.started_at = Some(now.clone());
            step.updated_at = Some(now);
            job.state = JobState::Running;
            state.store.put_job(&job).await?;
            Ok(Next::Start(i, items))
        }
        (Executor::Server, _) if step.job_ids.is_empty() => {
            // Its item jobs are being started (`advance` writes their ids),
            // or its script runs (`script` writes its result); after a
            // restart `recover` fails such a step instead.
            Ok(Next::Stop)
        }
        (Executor::Server, _) => {
            let mut children = Vec::new();
            for id in &step.job_ids {
                if let Some(c) = state.store.job(id).await? {
                    children.push(c);
                }
            }
            let n = children.len().max(1) as f64;
            step.percent = children
                .iter()
                .map(|c| {
                    let k = c.steps.len().max(1) as f64;
                    c.steps.iter().map(|s| s.percent).sum::<f64>() / k
                })
                .sum::<f64>()
                / n;
            if let Some(bad) = children
                .iter()
                .find(|c| matches!(c.state, JobState::Failed | JobState::Cancelled))
            {
                let e = bad.error.clone().unwrap_or_else(|| {
                    ApiError::new(
                        ErrorCode::JobInterrupted,
                        format!("job {} {}", bad.id, bad.state),
                    )
                });
                step.state = StepState::Failed;
                step.ended_at = Some(now);
                step.error = Some(failure_of(&e));
                state.store.put_job(&job).await?;
                return Ok(Next::Again);
            }
            if children.iter().all(|c| c.state == JobState::Succeeded) {
                step.state = StepState::Done;
                step.percent = 100.0;
                step.ended_at = Some(now);
                state.store.put_job(&job).await?;
                return Ok(Next::Again);
            }
            let all_settled = children
                .iter()
                .all(|c| matches!(c.state, JobState::Succeeded | JobState::Waiting));
            let (step_state, job_state) = if all_settled {
                (StepState::Waiting, JobState::Waiting)
            } else {
                (StepState::Running, JobState::Running)
            };
            if step.state != step_state || job.state != job_state {
                step.state = step_state;
                job.state = job_state;
                state.store.put_job(&job).await?;
            }
            Ok(Next::Stop)
        }
        _ => Ok(Next::Stop),
    }
}
