//! The configuration server (DESIGN.md §4): REST API under `/api/v1`, bearer
//! auth with hashed tokens, enrolment of components with the registration
//! key, and the durable job engine. `rebound server init|run|backup|restore`
//! in the CLI are thin wrappers over [`init`], [`serve`], [`backup`] and
//! [`restore`].

pub mod api;
pub mod auth;
pub mod engine;
pub mod error;
pub mod plan;
pub mod script;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use error::AppError;
use rebound_api::Scope;
use rebound_store::{Store, StoreError};
use rebound_types::ErrorCode;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use utoipa::OpenApi;

/// Tunables of a running server.
#[derive(Clone, Debug)]
pub struct Config {
    /// Heartbeats older than this make a component unhealthy (95226 / 4029).
    pub heartbeat_limit: Duration,
    /// A running component step without a report for this long fails (4023).
    pub step_timeout: Duration,
    /// How often the job engine looks at open jobs.
    pub engine_tick: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            heartbeat_limit: Duration::from_secs(120),
            step_timeout: Duration::from_secs(600),
            engine_tick: Duration::from_secs(1),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub config: Arc<Config>,
    pub wake: Arc<Notify>,
    /// Plan script steps running now, to kill them on cancel.
    pub scripts: script::Running,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "rebound configuration server", description = "Site recovery for Linux and KVM workloads: the control plane's REST API. Every error answer is `{code, message, remedy}` with the stable codes of docs/errors.md."),
    paths(
        api::health, api::enrol,
        api::list_tokens, api::create_token, api::revoke_token,
        api::list_sites, api::create_site,
        api::list_components, api::get_component, api::heartbeat,
        api::list_policies, api::get_policy, api::create_policy, api::update_policy,
        api::list_items, api::get_item, api::create_item, api::item_action, api::detach_item, api::attach_agent, api::put_replica_progress,
        api::list_points, api::report_point,
        api::list_groups, api::create_group, api::list_plans, api::create_plan, api::plan_action,
        api::list_jobs, api::get_job, api::cancel_job, api::continue_job, api::report_step, api::work,
    ),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Every operation may answer any 4xx/5xx, always in the one error shape.
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = || {
            ResponseBuilder::new()
                .description("An error: `{code, message, remedy}` (docs/errors.md).")
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ApiError")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                for range in ["4XX", "5XX"] {
                    op.responses
                        .responses
                        .entry(range.to_string())
                        .or_insert_with(|| error().into());
                }
            }
        }
    }
}

/// The OpenAPI spec as checked in under `openapi/`.
pub fn openapi_json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

/// Answers that axum produces itself (unknown route, wrong method, a body
/// or parameter that does not parse) get the API's error shape too.
async fn error_shape(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (code, message) = match parts.status {
        StatusCode::NOT_FOUND => (ErrorCode::NotFound, "no such endpoint".to_string()),
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::InvalidRequest,
            "this endpoint does not accept that method".to_string(),
        ),
        s if s.is_server_error() => (
            ErrorCode::StoreUnavailable,
            format!("internal error: {text}"),
        ),
        _ => (
            ErrorCode::InvalidRequest,
            if text.is_empty() {
                "invalid request".into()
            } else {
                text
            },
        ),
    };
    let mut out = AppError::new(code, message).into_response();
    *out.status_mut() = parts.status;
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// The HTTP application.
pub fn app(state: AppState) -> Router {
    let authed = Router::new()
        .route("/tokens", get(api::list_tokens).post(api::create_token))
        .route("/tokens/{id}", axum::routing::delete(api::revoke_token))
        .route("/sites", get(api::list_sites).post(api::create_site))
        .route("/components", get(api::list_components))
        .route("/components/{id}", get(api::get_component))
        .route("/components/{id}/heartbeat", post(api::heartbeat))
        .route(
            "/policies",
            get(api::list_policies).post(api::create_policy),
        )
        .route(
            "/policies/{id}",
            get(api::get_policy).put(api::update_policy),
        )
        .route("/items", get(api::list_items).post(api::create_item))
        .route("/items/{id}", get(api::get_item))
        .route("/items/{id}/actions", post(api::item_action))
        .route("/items/{id}/detach", post(api::detach_item))
        .route("/items/{id}/agent", post(api::attach_agent))
        .route(
            "/items/{id}/replica-progress",
            put(api::put_replica_progress),
        )
        .route(
            "/items/{id}/points",
            get(api::list_points).post(api::report_point),
        )
        .route("/groups", get(api::list_groups).post(api::create_group))
        .route("/plans", get(api::list_plans).post(api::create_plan))
        .route("/plans/{id}/actions", post(api::plan_action))
        .route("/jobs", get(api::list_jobs))
        .route("/jobs/{id}", get(api::get_job))
        .route("/jobs/{id}/cancel", post(api::cancel_job))
        .route("/jobs/{id}/continue", post(api::continue_job))
        .route("/jobs/{id}/steps/{index}", post(api::report_step))
        .route("/work", get(api::work))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let open = Router::new()
        .route("/health", get(api::health))
        .route("/enrol", post(api::enrol));
    Router::new()
        .nest("/api/v1", open.merge(authed))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    Body::from(openapi_json()),
                )
            }),
        )
        .layer(middleware::from_fn(error_shape))
        .with_state(state)
}

/// What `init` prints once.
#[derive(Debug)]
pub struct Initialised {
    pub admin_token: String,
    pub registration_key: String,
}

/// Create the database with its schema, an admin token and the registration
/// key. Refuses a database that is already initialised.
pub async fn init(store: &Store) -> Result<Initialised, AppError> {
    let _w = store.lock().await;
    if store.meta("initialised_at").await?.is_some() {
        return Err(AppError::new(
            ErrorCode::DataDirState,
            "this configuration server is already initialised",
        ));
    }
    let admin_token = format!("rbt_{}", rebound_store::random_hex(24));
    let registration_key = format!("rbk_{}", rebound_store::random_hex(24));
    store
        .insert_token("admin", Scope::Admin, &admin_token, None)
        .await?;
    store
        .set_meta(
            "registration_key_hash",
            &rebound_store::hash_secret(&registration_key),
        )
        .await?;
    store
        .set_meta("initialised_at", &rebound_control::time::now())
        .await?;
    Ok(Initialised {
        admin_token,
        registration_key,
    })
}

/// Open an initialised store (refusing an empty one).
pub async fn open_initialised(url: &str) -> Result<Store, AppError> {
    let store = Store::open(url).await?;
    if store.meta("initialised_at").await?.is_none() {
        return Err(AppError::new(
            ErrorCode::DataDirState,
            "the database is not initialised; run `rebound server init` first",
        ));
    }
    Ok(store)
}

/// Serve the API on `listener` until `shutdown` resolves. Resumes open jobs first.
pub async fn serve(
    store: Store,
    listener: TcpListener,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState {
        store: Arc::new(store),
        config: Arc::new(config),
        wake: Arc::new(Notify::new()),
        scripts: script::Running::default(),
    };
    if let Err(e) = engine::recover(&state).await {
        tracing::error!(code = e.0.code, message = %e.0.message, "resuming jobs after restart failed");
    }
    let engine = tokio::spawn(engine::run(state.clone()));
    let result = axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    engine.abort();
    // A script must not outlive its server unnoticed: kill it; the next
    // start fails its step (it is never run again by itself).
    state.scripts.kill_all();
    state.store.close().await;
    result
}

/// A consistent copy of a running server's database (SQLite or PostgreSQL),
/// written as a SQLite file that [`restore`] and [`restore_into_database`]
/// load.
pub async fn backup(store: &Store, dest: &Path) -> Result<(), AppError> {
    if dest.exists() {
        return Err(AppError::new(
            ErrorCode::BackupFailed,
            format!("{} exists; choose a new file", dest.display()),
        ));
    }
    store.backup_to(dest).await.map_err(|e| match e {
        StoreError::Db(_) | StoreError::Migrate(_) | StoreError::Corrupt(_) => {
            AppError::new(ErrorCode::BackupFailed, format!("backup failed: {e}"))
        }
        other => AppError::from(other),
    })
}

/// Restore a backup into an empty PostgreSQL (or SQLite) database at `url`
/// (server stopped): the migrations are applied, then every row of the
/// backup is loaded in one transaction. Refuses a database that already
/// holds a configuration server, or any data.
pub async fn restore_into_database(backup_file: &Path, url: &str) -> Result<Store, AppError> {
    let failed = |msg: String| AppError::new(ErrorCode::BackupFailed, msg);
    if !backup_file.is_file() {
        return Err(failed(format!("{} is not a file", backup_file.display())));
    }
    let store = Store::open(url).await?;
    if let Err(e) = store.restore_from(backup_file).await {
        store.close().await;
        return Err(failed(format!("restoring {}: {e}", backup_file.display())));
    }
    if store.meta("initialised_at").await?.is_none() {
        store.close().await;
        return Err(failed(format!(
            "{} is not a configuration server backup",
            backup_file.display()
        )));
    }
    Ok(store)
}

/// Restore a backup into an empty data directory (server stopped), and check
/// that the copy opens and is initialised.
pub async fn restore(backup_file: &Path, data_dir: &Path) -> Result<Store, AppError> {
    let db = data_dir.join(rebound_store::DB_FILE);
    if db.exists() {
        return Err(AppError::new(
            ErrorCode::BackupFailed,
            format!(
                "{} exists; restore into an empty data directory",
                db.display()
            ),
        ));
    }
    std::fs::create_dir_all(data_dir)
        .and_then(|_| std::fs::copy(backup_file, &db))
        .map_err(|e| {
            AppError::new(
                ErrorCode::BackupFailed,
                format!("copying {}: {e}", backup_file.display()),
            )
        })?;
    match open_initialised(&Store::sqlite_url(data_dir)).await {
        Ok(s) => Ok(s),
        Err(e) => {
            let _ = std::fs::remove_file(&db);
            Err(AppError::new(
                ErrorCode::BackupFailed,
                format!(
                    "{} is not a configuration server backup: {}",
                    backup_file.display(),
                    e.0.message
                ),
            ))
        }
    }
}
