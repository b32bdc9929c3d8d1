//! The handlers of `/api/v1`. Each one checks the caller's scope first, so a
//! refused request changes nothing.

use crate::AppState;
use crate::auth::Caller;
use crate::engine;
use crate::error::{AppError, AppResult};
use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use rebound_api::*;
use rebound_control::{prechecks, time};
use rebound_store::{JobFilter, new_id};
use rebound_types::ErrorCode;
use serde::Deserialize;
use std::time::SystemTime;
use tracing::{info, warn};
use utoipa::IntoParams;

type Created<T> = (StatusCode, Json<T>);

fn bad(message: impl Into<String>) -> AppError {
    AppError::new(ErrorCode::InvalidRequest, message)
}

fn check_name(name: &str, what: &str) -> AppResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{what} name {name:?} must be 1–128 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

fn not_found(what: &str, key: &str) -> AppError {
    AppError::new(ErrorCode::NotFound, format!("no {what} {key:?}"))
}

// ------------------------------------------------------------------ health, enrolment

#[utoipa::path(get, path = "/api/v1/health", tag = "server",
    responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// Enrol a component with the registration key; returns its own credentials.
#[utoipa::path(post, path = "/api/v1/enrol", tag = "components", request_body = Enrolment,
    responses((status = 201, body = Credentials), (status = 401, body = ApiError), (status = 409, body = ApiError)))]
pub async fn enrol(
    State(state): State<AppState>,
    Json(e): Json<Enrolment>,
) -> AppResult<Created<Credentials>> {
    let store = &state.store;
    let _w = store.lock().await;
    let expected = store.meta("registration_key_hash").await?;
    if expected.as_deref() != Some(rebound_store::hash_secret(&e.registration_key).as_str()) {
        return Err(AppError::new(
            ErrorCode::RegistrationKeyInvalid,
            "the registration key is not this configuration server's",
        ));
    }
    check_name(&e.name, "component")?;
    let site = store
        .site(&e.site)
        .await?
        .ok_or_else(|| not_found("site", &e.site))?;
    let component = Component {
        id: new_id(match e.role {
            ComponentRole::Agent => "agent",
            ComponentRole::ProcessServer => "ps",
            ComponentRole::MasterTarget => "mt",
        }),
        role: e.role,
        name: e.name.clone(),
        site_id: site.id,
        version: e.version.clone(),
        enrolled_at: time::now(),
        last_heartbeat: None,
        healthy: false,
        process_server: None,
        master_target: None,
        agent: None,
        data_addr: None,
    };
    store.insert_component(&component).await?;
    let token = format!("rbt_{}", rebound_store::random_hex(24));
    store
        .insert_token(
            &format!("{}:{}", e.role, e.name),
            e.role.scope(),
            &token,
            Some(&component.id),
        )
        .await?;
    tracing::info!(component = %component.id, role = %e.role, "component enrolled");
    Ok((
        StatusCode::CREATED,
        Json(Credentials {
            component_id: component.id,
            scope: e.role.scope(),
            token,
        }),
    ))
}

// ------------------------------------------------------------------ tokens

#[utoipa::path(get, path = "/api/v1/tokens", tag = "server", security(("bearer" = [])),
    responses((status = 200, body = [TokenInfo]), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_tokens(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
) -> AppResult<Json<Vec<TokenInfo>>> {
    c.require(&[])?;
    Ok(Json(state.store.list_tokens().await?))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "server", security(("bearer" = [])), request_body = NewToken,
    responses((status = 201, body = TokenInfo), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn create_token(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Json(req): Json<NewToken>,
) -> AppResult<Created<TokenInfo>> {
    c.require(&[])?;
    if !matches!(req.scope, Scope::Admin | Scope::Operator | Scope::Viewer) {
        return Err(bad(
            "component tokens are issued at enrolment; choose admin, operator or viewer",
        ));
    }
    check_name(&req.name, "token")?;
    let _w = state.store.lock().await;
    let secret = format!("rbt_{}", rebound_store::random_hex(24));
    let mut info = state
        .store
        .insert_token(&req.name, req.scope, &secret, None)
        .await?;
    info.token = Some(secret);
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "server", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn revoke_token(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> AppResult<StatusCode> {
    c.require(&[])?;
    if id == c.token_id {
        return Err(AppError::new(
            ErrorCode::ActionNotAllowed,
            "a token cannot revoke itself; revoke it with another admin token",
        ));
    }
    let _w = state.store.lock().await;
    state.store.revoke_token(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------ sites

#[utoipa::path(get, path = "/api/v1/sites", tag = "sites", security(("bearer" = [])),
    responses((status = 200, body = [Site]), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_sites(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
) -> AppResult<Json<Vec<Site>>> {
    c.require_reader()?;
    Ok(Json(state.store.sites().await?))
}

#[utoipa::path(post, path = "/api/v1/sites", tag = "sites", security(("bearer" = [])), request_body = NewSite,
    responses((status = 201, body = Site), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create_site(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Json(req): Json<NewSite>,
) -> AppResult<Created<Site>> {
    c.require_operator()?;
    check_name(&req.name, "site")?;
    let site = Site {
        id: new_id("site"),
        name: req.name,
        role: req.role,
        created_at: time::now(),
    };
    let _w = state.store.lock().await;
    state.store.insert_site(&site).await?;
    Ok((StatusCode::CREATED, Json(site)))
}

// ------------------------------------------------------------------ components

fn with_health(mut c: Component, state: &AppState) -> Component {
    c.healthy = prechecks::heartbeat_fresh(&c, SystemTime::now(), state.config.heartbeat_limit);
    c
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ComponentQuery {
    /// Only components of this role.
    pub role: Option<ComponentRole>,
}

/// Process servers, master targets and agents.
#[utoipa::path(get, path = "/api/v1/components", tag = "components", security(("bearer" = [])),
    params(ComponentQuery),
    responses((status = 200, body = [Component]), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_components(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<ComponentQuery>,
) -> AppResult<Json<Vec<Component>>> {
    c.require_reader()?;
    let all = state.store.components().await?;
    Ok(Json(
        all.into_iter()
            .filter(|x| q.role.is_none_or(|r| r == x.role))
            .map(|x| with_health(x, &state))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/v1/components/{id}", tag = "components", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Component), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn get_component(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> AppResult<Json<Component>> {
    if c.component_id.as_deref() != Some(id.as_str()) {
        c.require_reader_or_component()?;
    }
    let comp = state
        .store
        .component(&id)
        .await?
        .ok_or_else(|| not_found("component", &id))?;
    Ok(Json(with_health(comp, &state)))
}

/// A component's heartbeat, with the facts of its role.
#[utoipa::path(post, path = "/api/v1/components/{id}/heartbeat", tag = "components", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = Heartbeat,
    responses((status = 200, body = Component), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn heartbeat(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Json(hb): Json<Heartbeat>,
) -> AppResult<Json<Component>> {
    c.require_component(&id)?;
    let _w = state.store.lock().await;
    let mut comp = state
        .store
        .component(&id)
        .await?
        .ok_or_else(|| not_found("component", &id))?;
    let wrong = match comp.role {
        ComponentRole::Agent => hb.process_server.is_some() || hb.master_target.is_some(),
        ComponentRole::ProcessServer => hb.agent.is_some() || hb.master_target.is_some(),
        ComponentRole::MasterTarget => hb.agent.is_some() || hb.process_server.is_some(),
    };
    if wrong {
        return Err(bad(format!(
            "a {} reports only its own role's facts",
            comp.role
        )));
    }
    comp.version = hb.version;
    comp.last_heartbeat = Some(time::now());
    let mut rung_change = None;
    if hb.agent.is_some() {
        let before = replication_state(comp.agent.as_ref());
        let after = replication_state(hb.agent.as_ref());
        if before != after {
            rung_change = Some((before, after));
        }
        comp.agent = hb.agent;
    }
    if hb.process_server.is_some() {
        comp.process_server = hb.process_server;
    }
    if hb.master_target.is_some() {
        comp.master_target = hb.master_target;
    }
    if hb.data_addr.is_some() {
        comp.data_addr = hb.data_addr;
    }
    state.store.put_component(&comp).await?;
    if let Some((from, to)) = rung_change {
        log_replication_change(&state, &comp.id, from, to).await;
    }
    Ok(Json(with_health(comp, &state)))
}

fn replication_state(facts: Option<&AgentFacts>) -> Option<ReplicationState> {
    facts.and_then(|a| a.replication.as_ref()).map(|r| r.state)
}

fn state_name(s: Option<ReplicationState>) -> &'static str {
    match s {
        None => "none",
        Some(ReplicationState::Streaming) => "streaming",
        Some(ReplicationState::Backlogged) => "backlogged",
        Some(ReplicationState::Resyncing) => "resyncing",
    }
}

/// A change of rung (streaming, backlogged, resyncing) is what an operator
/// looks for in the log when an RPO is missed: name the items it affects.
/// Rare, so scanning the items here costs nothing on ordinary heartbeats; a
/// failed lookup only costs the item ids in the line, never the heartbeat.
async fn log_replication_change(
    state: &AppState,
    agent_id: &str,
    from: Option<ReplicationState>,
    to: Option<ReplicationState>,
) {
    let items = state.store.items().await.unwrap_or_else(|e| {
        warn!(agent = %agent_id, error = %e, "cannot list the items of an agent");
        Vec::new()
    });
    let mut named = false;
    for item in items
        .iter()
        .filter(|i| i.agent_id.as_deref() == Some(agent_id))
    {
        named = true;
        info!(item = %item.id, agent = %agent_id, from = state_name(from), to = state_name(to), "replication state changed");
    }
    if !named {
        info!(agent = %agent_id, from = state_name(from), to = state_name(to), "replication state changed (agent of no item)");
    }
}

// ------------------------------------------------------------------ policies

#[utoipa::path(get, path = "/api/v1/policies", tag = "policies", security(("bearer" = [])),
    responses((status = 200, body = [Policy]), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_policies(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
) -> AppResult<Json<Vec<Policy>>> {
    c.require_reader()?;
    Ok(Json(state.store.policies().await?))
}

#[utoipa::path(get, path = "/api/v1/policies/{id}", tag = "policies", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Policy), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn get_policy(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> AppResult<Json<Policy>> {
    c.require_reader_or_component()?;
    Ok(Json(
        state
            .store
            .policy(&id)
            .await?
            .ok_or_else(|| not_found("policy", &id))?,
    ))
}

/// Crash-consistent points are barriers in the change stream: more often than
/// every second floods the journal, rarer than hourly is no longer continuous.
const CRASH_CONSISTENT_SECS: std::ops::RangeInclusive<u64> = 1..=3600;

fn check_policy(p: &NewPolicy) -> AppResult<()> {
    check_name(&p.name, "policy")?;
    const YEAR: u64 = 366 * 24 * 3600;
    for (v, what) in [
        (p.rpo_threshold_secs, "rpo_threshold_secs"),
        (p.retention_secs, "retention_secs"),
        (
            p.app_consistent_frequency_secs,
            "app_consistent_frequency_secs",
        ),
    ] {
        if v == 0 || v > YEAR {
            return Err(bad(format!("{what} must be between 1 and {YEAR}")));
        }
    }
    let cc = p.crash_consistent_frequency_secs;
    if !CRASH_CONSISTENT_SECS.contains(&cc) {
        let mut e = bad(format!(
            "crash_consistent_frequency_secs is {cc}; crash-consistent recovery points are taken every {} to {} seconds",
            CRASH_CONSISTENT_SECS.start(),
            CRASH_CONSISTENT_SECS.end()
        ));
        e.0.remedy = format!(
            "Set crash_consistent_frequency_secs (`rebound policies add --crash-consistent-secs N`) between {} and {}, or leave it out for the default of {DEFAULT_CRASH_CONSISTENT_SECS} s.",
            CRASH_CONSISTENT_SECS.start(),
            CRASH_CONSISTENT_SECS.end()
        );
        return Err(e);
    }
    Ok(())
}

/// Create a replication policy; its read-only failback policy (15 min / 24 h
/// / 60 min) is created with it.
#[utoipa::path(post, path = "/api/v1/policies", tag = "policies", security(("bearer" = [])), request_body = NewPolicy,
    responses((status = 201, body = [Policy], description = "the policy and its failback policy"), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create_policy(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Json(req): Json<NewPolicy>,
) -> AppResult<Created<Vec<Policy>>> {
    c.require_operator()?;
    check_policy(&req)?;
    let now = time::now();
    let id = new_id("pol");
    let fb_id = new_id("pol");
    let policy = Policy {
        id: id.clone(),
        name: req.name.clone(),
        rpo_threshold_secs: req.rpo_threshold_secs,
        retention_secs: req.retention_secs,
        app_consistent_frequency_secs: req.app_consistent_frequency_secs,
        crash_consistent_frequency_secs: req.crash_consistent_frequency_secs,
        read_only: false,
        failback_policy_id: Some(fb_id.clone()),
        parent_policy_id: None,
        created_at: now.clone(),
    };
    let failback = Policy {
        id: fb_id,
        name: format!("{}-failback", req.name),
        rpo_threshold_secs: FAILBACK_RPO_SECS,
        retention_secs: FAILBACK_RETENTION_SECS,
        app_consistent_frequency_secs: FAILBACK_APP_CONSISTENT_SECS,
        crash_consistent_frequency_secs: DEFAULT_CRASH_CONSISTENT_SECS,
        read_only: true,
        failback_policy_id: None,
        parent_policy_id: Some(id),
        created_at: now,
    };
    let _w = state.store.lock().await;
    if state.store.policy(&failback.name).await?.is_some() {
        return Err(AppError::new(
            ErrorCode::AlreadyExists,
            format!("a policy named {:?} exists", failback.name),
        ));
    }
    state.store.insert_policy(&policy).await?;
    state.store.insert_policy(&failback).await?;
    Ok((StatusCode::CREATED, Json(vec![policy, failback])))
}

/// Change a replication policy's values; failback policies are read-only.
#[utoipa::path(put, path = "/api/v1/policies/{id}", tag = "policies", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = NewPolicy,
    responses((status = 200, body = Policy), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn update_policy(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Json(req): Json<NewPolicy>,
) -> AppResult<Json<Policy>> {
    c.require_operator()?;
    check_policy(&req)?;
    let _w = state.store.lock().await;
    let mut p = state
        .store
        .policy(&id)
        .await?
        .ok_or_else(|| not_found("policy", &id))?;
    if p.read_only {
        return Err(AppError::new(
            ErrorCode::PolicyReadOnly,
            format!("policy {} is a failback policy and is read-only", p.name),
        ));
    }
    if req.name != p.name {
        return Err(bad("a policy cannot be renamed"));
    }
    p.rpo_threshold_secs = req.rpo_threshold_secs;
    p.retention_secs = req.retention_secs;
    p.app_consistent_frequency_secs = req.app_consistent_frequency_secs;
    p.crash_consistent_frequency_secs = req.crash_consistent_frequency_secs;
    state.store.put_policy(&p).await?;
    Ok(Json(p))
}

// ------------------------------------------------------------------ items

/// What an answer adds to a stored item: the RPO now, and the capture path
/// of its agent from the agent's latest heartbeat (`agent` is the component
/// named by `item.agent_id`, if it exists).
fn decorate(item: &mut Item, agent: Option<&Component>) {
    item.rpo_seconds = item
        .last_point
        .as_ref()
        .and_then(|p| time::parse(&p.time))
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| d.as_secs());
    item.replication = agent
        .filter(|a| item.agent_id.as_deref() == Some(a.id.as_str()))
        .and_then(|a| a.agent.as_ref())
        .and_then(|f| f.replication.clone());
}

/// [`decorate`] for one item, looking its agent up.
async fn answer_item(state: &AppState, mut item: Item) -> AppResult<Item> {
    let agent = match &item.agent_id {
        Some(a) => state.store.component(a).await?,
        None => None,
    };
    decorate(&mut item, agent.as_ref());
    Ok(item)
}

#[utoipa::path(get, path = "/api/v1/items", tag = "items", security(("bearer" = [])),
    responses((status = 200, body = [Item]), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_items(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
) -> AppResult<Json<Vec<Item>>> {
    c.require_reader()?;
    let mut items = state.store.items().await?;
    // One read of the components for all items, not one per item.
    let agents: std::collections::HashMap<String, Component> = state
        .store
        .components()
        .await?
        .into_iter()
        .filter(|x| x.role == ComponentRole::Agent)
        .map(|x| (x.id.clone(), x))
        .collect();
    for item in &mut items {
        let agent = item.agent_id.as_ref().and_then(|a| agents.get(a));
        decorate(item, agent);
    }
    Ok(Json(items))
}

async fn load_item(state: &AppState, key: &str) -> AppResult<Item> {
    state.store.item(key).await?.ok_or_else(|| {
        AppError::new(
            ErrorCode::ItemUnknown,
            format!("the configuration server does not know the item {key:?}"),
        )
    })
}

#[utoipa::path(get, path = "/api/v1/items/{id}", tag = "items", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id or name")),
    responses((status = 200, body = Item), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn get_item(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> AppResult<Json<Item>> {
    c.require_reader_or_component()?;
    let item = load_item(&state, &id).await?;
    Ok(Json(answer_item(&state, item).await?))
}

/// Register a machine as a replicated item (unprotected until `enable_protection`).
#[utoipa::path(post, path = "/api/v1/items", tag = "items", security(("bearer" = [])), request_body = NewItem,
    responses((status = 201, body = Item), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create_item(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Json(req): Json<NewItem>,
) -> AppResult<Created<Item>> {
    c.require_operator()?;
    check_name(&req.name, "item")?;
    if req.disks.is_empty() || req.disks.len() > 256 {
        return Err(bad("an item has 1 to 256 disks"));
    }
    for d in &req.disks {
        check_name(&d.name, "disk")?;
        if d.size_bytes == 0 || d.uuid.is_empty() || d.uuid.len() > 64 {
            return Err(bad(format!(
                "disk {} needs a non-zero size and a UUID",
                d.name
            )));
        }
    }
    let _w = state.store.lock().await;
    let primary = state
        .store
        .site(&req.primary_site)
        .await?
        .ok_or_else(|| not_found("site", &req.primary_site))?;
    let recovery = state
        .store
        .site(&req.recovery_site)
        .await?
        .ok_or_else(|| not_found("site", &req.recovery_site))?;
    if primary.id == recovery.id {
        return Err(bad("the primary and recovery sites must differ"));
    }
    if let Some(a) = &req.agent_id {
        let comp = state
            .store
            .component(a)
            .await?
            .ok_or_else(|| not_found("agent", a))?;
        if comp.role != ComponentRole::Agent {
            return Err(bad(format!(
                "component {a} is a {}, not an agent",
                comp.role
            )));
        }
    }
    let born_at = req.born_at.unwrap_or(SiteRole::Primary);
    let direction = match born_at {
        SiteRole::Primary => Direction::Forward,
        SiteRole::Recovery => Direction::Reverse,
    };
    let now = time::now();
    let item = Item {
        id: new_id("item"),
        name: req.name,
        os: req.os,
        disks: req.disks,
        primary_site_id: primary.id,
        recovery_site_id: recovery.id,
        born_at,
        state: ItemState {
            phase: Phase::Unprotected,
            direction,
        },
        active_site: direction.source(),
        agent_id: req.agent_id,
        policy_id: None,
        group_id: None,
        process_server_id: None,
        master_target_id: None,
        datastore: None,
        retention_volume: None,
        last_point: None,
        rpo_seconds: None,
        detached: None,
        job_id: None,
        replication: None,
        replica_progress: None,
        created_at: now.clone(),
        updated_at: now,
    };
    state.store.insert_item(&item).await?;
    Ok((StatusCode::CREATED, Json(answer_item(&state, item).await?)))
}

/// Start an action on an item (a job), or cancel/complete its running job.
#[utoipa::path(post, path = "/api/v1/items/{id}/actions", tag = "items", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id or name")), request_body = ActionRequest,
    responses((status = 202, body = Job), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 422, body = ApiError)))]
pub async fn item_action(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Json(req): Json<ActionRequest>,
) -> AppResult<(StatusCode, Json<Job>)> {
    c.require_operator()?;
    if let Some(p) = &req.policy_id {
        let policy = state
            .store
            .policy(p)
            .await?
            .ok_or_else(|| not_found("policy", p))?;
        if policy.read_only && req.action == Action::EnableProtection {
            return Err(AppError::new(
                ErrorCode::PolicyReadOnly,
                format!(
                    "policy {} is a failback policy; protect with a replication policy",
                    policy.name
                ),
            ));
        }
    }
    let job = engine::submit(&state, &id, req).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

/// Record that an item was migrated, moved, deleted or unprotected outside
/// the lifecycle: it can no longer be failed back.
#[utoipa::path(post, path = "/api/v1/items/{id}/detach", tag = "items", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = DetachRequest,
    responses((status = 200, body = Item), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn detach_item(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Json(req): Json<DetachRequest>,
) -> AppResult<Json<Item>> {
    c.require_operator()?;
    if !matches!(
        req.reason.as_str(),
        "migrated" | "moved" | "deleted" | "unprotected"
    ) {
        return Err(bad(
            "reason is one of migrated, moved, deleted, unprotected",
        ));
    }
    let _w = state.store.lock().await;
    let mut item = load_item(&state, &id).await?;
    item.detached = Some(Detached {
        reason: req.reason,
        at: time::now(),
    });
    item.updated_at = time::now();
    state.store.put_item(&item).await?;
    Ok(Json(answer_item(&state, item).await?))
}

/// An agent that starts with a machine (after a failover or failback too)
/// becomes the item's agent when it runs at the item's active site, so the
/// next jobs and replication cycles address it.
#[utoipa::path(post, path = "/api/v1/items/{id}/agent", tag = "items", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id or name")),
    responses((status = 200, body = Item), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn attach_agent(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> AppResult<Json<Item>> {
    c.require(&[Scope::Agent])?;
    let Some(agent_id) = c.component_id.clone() else {
        return Err(AppError::new(
            ErrorCode::Forbidden,
            "only an enrolled agent's own token may attach to an item",
        ));
    };
    let _w = state.store.lock().await;
    let mut item = load_item(&state, &id).await?;
    let agent = state
        .store
        .component(&agent_id)
        .await?
        .ok_or_else(|| not_found("component", &agent_id))?;
    let site_id = |role| match role {
        rebound_api::SiteRole::Primary => &item.primary_site_id,
        rebound_api::SiteRole::Recovery => &item.recovery_site_id,
    };
    // While a failover's last steps start the machine at its target, the
    // new agent may attach at once: the next job must not find the stopped
    // source's agent.
    let starting_at_target = item.state.phase == rebound_api::Phase::FailingOver
        && &agent.site_id == site_id(item.state.direction.target());
    if &agent.site_id != site_id(item.active_site) && !starting_at_target {
        return Err(AppError::new(
            ErrorCode::ActionNotAllowed,
            format!(
                "item {} runs at its {} site, not at this agent's site",
                item.name, item.active_site
            ),
        ));
    }
    if item.agent_id.as_deref() != Some(agent_id.as_str()) {
        item.agent_id = Some(agent_id);
        item.updated_at = time::now();
        state.store.put_item(&item).await?;
        info!(item = %item.id, agent = ?item.agent_id, "agent attached");
    }
    Ok(Json(answer_item(&state, item).await?))
}

/// Whether `mt` may report on the item's replica: its assigned master target,
/// or the master target of a step of the item's running job (initial sync and
/// reprotect build the replica before the item records the new master target).
async fn replicates_to(state: &AppState, item: &Item, mt: Option<&str>) -> AppResult<bool> {
    let Some(mt) = mt else { return Ok(false) };
    if item.master_target_id.as_deref() == Some(mt) {
        return Ok(true);
    }
    let Some(job_id) = &item.job_id else {
        return Ok(false);
    };
    Ok(state.store.job(job_id).await?.is_some_and(|j| {
        !j.state.is_finished()
            && j.steps.iter().any(|s| {
                s.executor == Executor::MasterTarget && s.component_id.as_deref() == Some(mt)
            })
    }))
}

/// The longest gap reason kept (a master target's error text).
const GAP_REASON_MAX: usize = 1024;

/// A master target reports how far it has applied the item's change stream.
///
/// With a gap when the apply stopped at a missing, corrupt or out-of-order
/// changeset. The server stamps `updated_at`; for the same agent the applied
/// sequence never goes back (a late, older report only updates the gap); a
/// report for another agent (the machine started elsewhere) replaces it. Only
/// the item's master target (or the one of its running job) may report.
#[utoipa::path(put, path = "/api/v1/items/{id}/replica-progress", tag = "items", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id or name")), request_body = ReplicaProgress,
    responses((status = 200, body = Item), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn put_replica_progress(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Json(req): Json<ReplicaProgress>,
) -> AppResult<Json<Item>> {
    c.require(&[Scope::MasterTarget])?;
    if req.agent_id.is_empty() || req.agent_id.len() > 128 {
        return Err(bad(
            "agent_id is the agent's component id (1 to 128 characters)",
        ));
    }
    if let Some(g) = &req.gap
        && g.reason.len() > GAP_REASON_MAX
    {
        return Err(bad(format!(
            "a gap's reason has at most {GAP_REASON_MAX} bytes"
        )));
    }
    let _w = state.store.lock().await;
    let mut item = load_item(&state, &id).await?;
    if c.scope != Scope::Admin && !replicates_to(&state, &item, c.component_id.as_deref()).await? {
        return Err(AppError::new(
            ErrorCode::Forbidden,
            format!(
                "item {} does not replicate to this master target",
                item.name
            ),
        ));
    }
    let report = ReplicaProgress {
        updated_at: Some(time::now()),
        ..req
    };
    item.replica_progress = Some(match item.replica_progress.take() {
        // Reports may arrive out of order: keep the furthest apply, but a
        // gap (or its clearing) is always the latest word.
        Some(old) if old.agent_id == report.agent_id && report.applied_seq < old.applied_seq => {
            ReplicaProgress {
                gap: report.gap,
                updated_at: report.updated_at,
                ..old
            }
        }
        _ => report,
    });
    state.store.put_item(&item).await?;
    Ok(Json(answer_item(&state, item).await?))
}

#[utoipa::path(get, path = "/api/v1/items/{id}/points", tag = "items", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = [RecoveryPoint]), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn list_points(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> AppResult<Json<Vec<RecoveryPoint>>> {
    c.require_reader_or_component()?;
    let item = load_item(&state, &id).await?;
    Ok(Json(state.store.points(&item.id).await?))
}

/// A master target reports a recovery point of an item it holds.
#[utoipa::path(post, path = "/api/v1/items/{id}/points", tag = "items", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = NewRecoveryPoint,
    responses((status = 201, body = RecoveryPoint), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn report_point(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Json(req): Json<NewRecoveryPoint>,
) -> AppResult<Created<RecoveryPoint>> {
    c.require(&[Scope::MasterTarget])?;
    if req.id.is_empty() || req.id.len() > 128 {
        return Err(bad("a recovery point id has 1 to 128 characters"));
    }
    let _w = state.store.lock().await;
    let mut item = load_item(&state, &id).await?;
    if c.scope != Scope::Admin && item.master_target_id != c.component_id {
        return Err(AppError::new(
            ErrorCode::Forbidden,
            format!(
                "item {} does not replicate to this master target",
                item.name
            ),
        ));
    }
    let when = match &req.time {
        Some(t) => {
            time::format(time::parse(t).ok_or_else(|| bad(format!("time {t:?} is not RFC 3339")))?)
        }
        None => time::now(),
    };
    let point = RecoveryPoint {
        id: req.id,
        item_id: item.id.clone(),
        time: when,
        kind: req.kind,
        group_marker: req.group_marker,
        barrier_ns: req.barrier_ns,
    };
    state.store.insert_point(&point).await?;
    if item
        .last_point
        .as_ref()
        .is_none_or(|p| p.time <= point.time)
    {
        item.last_point = Some(point.clone());
        state.store.put_item(&item).await?;
    }
    Ok((StatusCode::CREATED, Json(point)))
}

// ------------------------------------------------------------------ groups, plans

#[utoipa::path(get, path = "/api/v1/groups", tag = "groups", security(("bearer" = [])),
    responses((status = 200, body = [Group]), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_groups(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
) -> AppResult<Json<Vec<Group>>> {
    c.require_reader()?;
    Ok(Json(state.store.groups().await?))
}

/// Create a replication group: members share recovery points, so they must
/// have one OS type and one master target.
#[utoipa::path(post, path = "/api/v1/groups", tag = "groups", security(("bearer" = [])), request_body = NewGroup,
    responses((status = 201, body = Group), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 422, body = ApiError)))]
pub async fn create_group(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Json(req): Json<NewGroup>,
) -> AppResult<Created<Group>> {
    c.require_operator()?;
    check_name(&req.name, "group")?;
    if req.items.is_empty() || req.items.len() > 1000 {
        return Err(bad("a group has 1 to 1000 items"));
    }
    let _w = state.store.lock().await;
    let mut items = Vec::new();
    for key in &req.items {
        let item = load_item(&state, key).await?;
        if let Some(g) = &item.group_id {
            return Err(AppError::new(
                ErrorCode::AlreadyExists,
                format!("item {} already belongs to group {g}", item.name),
            ));
        }
        if items.iter().any(|i: &Item| i.id == item.id) {
            return Err(bad(format!("item {} is named twice", item.name)));
        }
        items.push(item);
    }
    let mut failures = Vec::new();
    if let Some(x) = items.iter().find(|i| i.os != items[0].os) {
        failures.push(Failure::new(
            ErrorCode::GroupMixedOs,
            format!(
                "{} runs {}, {} runs {}",
                items[0].name, items[0].os, x.name, x.os
            ),
        ));
    }
    if let Some(x) = items
        .iter()
        .find(|i| i.master_target_id != items[0].master_target_id)
    {
        failures.push(Failure::new(
            ErrorCode::GroupMixedMasterTarget,
            format!(
                "{} and {} replicate to different master targets",
                items[0].name, x.name
            ),
        ));
    }
    if !failures.is_empty() {
        return Err(AppError::prechecks(failures));
    }
    let group = Group {
        id: new_id("grp"),
        name: req.name,
        item_ids: items.iter().map(|i| i.id.clone()).collect(),
        created_at: time::now(),
    };
    state.store.insert_group(&group).await?;
    for mut item in items {
        item.group_id = Some(group.id.clone());
        state.store.put_item(&item).await?;
    }
    Ok((StatusCode::CREATED, Json(group)))
}

#[utoipa::path(get, path = "/api/v1/plans", tag = "plans", security(("bearer" = [])),
    responses((status = 200, body = [Plan]), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_plans(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
) -> AppResult<Json<Vec<Plan>>> {
    c.require_reader()?;
    Ok(Json(state.store.plans().await?))
}

/// Create a recovery plan: ordered groups of items with script and
/// manual-action steps between them.
#[utoipa::path(post, path = "/api/v1/plans", tag = "plans", security(("bearer" = [])), request_body = NewPlan,
    responses((status = 201, body = Plan), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create_plan(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Json(req): Json<NewPlan>,
) -> AppResult<Created<Plan>> {
    c.require_operator()?;
    check_name(&req.name, "plan")?;
    if req.steps.is_empty() || req.steps.len() > 1000 {
        return Err(bad("a plan has 1 to 1000 steps"));
    }
    let _w = state.store.lock().await;
    let mut steps = Vec::new();
    for s in req.steps {
        match s.kind {
            PlanStepKind::Group => {
                if s.items.is_empty() {
                    return Err(bad("a group step names at least one item"));
                }
                let mut ids = Vec::new();
                for key in &s.items {
                    ids.push(load_item(&state, key).await?.id);
                }
                steps.push(PlanStep {
                    kind: s.kind,
                    items: ids,
                    text: None,
                    timeout_secs: None,
                });
            }
            PlanStepKind::Script | PlanStepKind::Manual => {
                let text = s
                    .text
                    .filter(|t| !t.trim().is_empty())
                    .ok_or_else(|| bad(format!("a {} step needs its text", s.kind)))?;
                let timeout_secs = match (s.kind, s.timeout_secs) {
                    (_, None) => None,
                    (PlanStepKind::Script, Some(t))
                        if (1..=PlanStep::MAX_SCRIPT_TIMEOUT_SECS).contains(&t) =>
                    {
                        Some(t)
                    }
                    (PlanStepKind::Script, Some(_)) => {
                        return Err(bad(format!(
                            "a script step's timeout_secs is 1 to {}",
                            PlanStep::MAX_SCRIPT_TIMEOUT_SECS
                        )));
                    }
                    (_, Some(_)) => return Err(bad("only script steps have a timeout_secs")),
                };
                steps.push(PlanStep {
                    kind: s.kind,
                    items: Vec::new(),
                    text: Some(text),
                    timeout_secs,
                });
            }
        }
    }
    let plan = Plan {
        id: new_id("plan"),
        name: req.name,
        steps,
        created_at: time::now(),
    };
    state.store.insert_plan(&plan).await?;
    Ok((StatusCode::CREATED, Json(plan)))
}

/// Run an action for a whole recovery plan: its groups in order, waiting for
/// the operator at manual and script steps. The request's values apply to
/// every item.
#[utoipa::path(post, path = "/api/v1/plans/{id}/actions", tag = "plans", security(("bearer" = [])),
    params(("id" = String, Path, description = "plan id or name")), request_body = ActionRequest,
    responses((status = 202, body = Job), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn plan_action(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Json(req): Json<ActionRequest>,
) -> AppResult<(StatusCode, Json<Job>)> {
    c.require_operator()?;
    let job = crate::plan::submit(&state, &id, req).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

// ------------------------------------------------------------------ jobs

#[derive(Debug, Deserialize, IntoParams)]
pub struct JobQuery {
    /// Item id or name.
    pub item: Option<String>,
    pub plan: Option<String>,
    pub state: Option<JobState>,
    /// RFC 3339: jobs created at or after.
    pub since: Option<String>,
    /// RFC 3339: jobs created at or before.
    pub until: Option<String>,
    /// At most this many (default 1000).
    pub limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", security(("bearer" = [])), params(JobQuery),
    responses((status = 200, body = [Job]), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_jobs(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<JobQuery>,
) -> AppResult<Json<Vec<Job>>> {
    c.require_reader_or_component()?;
    let norm = |t: &Option<String>| -> AppResult<Option<String>> {
        t.as_ref()
            .map(|s| {
                time::parse(s)
                    .map(time::format)
                    .ok_or_else(|| bad(format!("{s:?} is not an RFC 3339 time")))
            })
            .transpose()
    };
    let item_id = match &q.item {
        Some(key) => Some(
            state
                .store
                .item(key)
                .await?
                .map(|i| i.id)
                .unwrap_or_else(|| key.clone()),
        ),
        None => None,
    };
    let filter = JobFilter {
        item_id,
        plan_id: q.plan.clone(),
        state: q.state,
        since: norm(&q.since)?,
        until: norm(&q.until)?,
        limit: q.limit.map(i64::from),
    };
    Ok(Json(state.store.jobs(&filter).await?))
}

async fn load_job(state: &AppState, id: &str) -> AppResult<Job> {
    state
        .store
        .job(id)
        .await?
        .ok_or_else(|| AppError::new(ErrorCode::JobNotFound, format!("no job {id:?}")))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn get_job(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> AppResult<Json<Job>> {
    c.require_reader_or_component()?;
    Ok(Json(load_job(&state, &id).await?))
}

/// Cancel a job: the item returns to the state it had before the job.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn cancel_job(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> AppResult<Json<Job>> {
    c.require_operator()?;
    Ok(Json(engine::cancel(&state, &id).await?))
}

/// Finish the operator step a job waits at (complete failover, manual action).
#[utoipa::path(post, path = "/api/v1/jobs/{id}/continue", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn continue_job(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> AppResult<Json<Job>> {
    c.require_operator()?;
    Ok(Json(engine::continue_job(&state, &id).await?))
}

/// A component reports progress or the result of a step assigned to it.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/steps/{index}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path), ("index" = u32, Path)), request_body = StepReport,
    responses((status = 200, body = Job), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn report_step(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((id, index)): Path<(String, u32)>,
    Json(rep): Json<StepReport>,
) -> AppResult<Json<Job>> {
    c.require(&[Scope::Agent, Scope::ProcessServer, Scope::MasterTarget])?;
    Ok(Json(
        engine::report(
            &state,
            &id,
            index,
            c.component_id.as_deref(),
            c.scope == Scope::Admin,
            rep,
        )
        .await?,
    ))
}

/// The steps assigned to the calling component that are running now.
#[utoipa::path(get, path = "/api/v1/work", tag = "jobs", security(("bearer" = [])),
    responses((status = 200, body = [WorkItem]), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn work(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
) -> AppResult<Json<Vec<WorkItem>>> {
    c.require(&[Scope::Agent, Scope::ProcessServer, Scope::MasterTarget])?;
    let mut out = Vec::new();
    for job in state.store.open_jobs().await? {
        for s in &job.steps {
            if s.state == StepState::Running
                && (c.scope == Scope::Admin
                    || s.component_id.is_some() && s.component_id == c.component_id)
            {
                out.push(WorkItem {
                    job_id: job.id.clone(),
                    step_index: s.index,
                    step: s.name.clone(),
                    action: job.action,
                    item_id: job.item_id.clone(),
                    request: job.request.clone(),
                });
            }
        }
    }
    Ok(Json(out))
}
