//! Persistence of the configuration server. One code path over sqlx's `Any`
//! driver serves SQLite (the default, a file in the data directory) and
//! PostgreSQL (`postgres://…`), with the migrations under `migrations/`.
//!
//! Objects are stored as JSON documents of the API types with the columns that
//! queries filter on beside them. Every write goes through one writer lock, so
//! read-check-write sequences (starting a job on an idle item, finishing a
//! step) are atomic on both databases without retry loops.

use rebound_api::{
    Component, Group, Item, Job, JobState, Plan, Policy, RecoveryPoint, Scope, Site, TokenInfo,
};
use rebound_types::{Coded, ErrorCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Row};
use std::path::Path;
use std::str::FromStr;
use tokio::sync::{Mutex, MutexGuard};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The SQLite file inside a data directory.
pub const DB_FILE: &str = "rebound.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored document is unreadable: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Backup(String),
}

impl Coded for StoreError {
    fn code(&self) -> ErrorCode {
        match self {
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::Conflict(_) => ErrorCode::AlreadyExists,
            StoreError::Unsupported(_) | StoreError::Backup(_) => ErrorCode::BackupFailed,
            _ => ErrorCode::StoreUnavailable,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Which database a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A new random id with a readable prefix, e.g. `job-3f9a1c2b7e4d`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", random_hex(6))
}

/// `n` random bytes from the OS, as hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    // The OS random source does not fail on Linux once booted; if it ever
    // does, refusing to run is right (ids and secrets must be random).
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut buf).expect("the OS random source is available");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// How secrets (tokens, the registration key) are kept: only their hash.
pub fn hash_secret(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// Filters of the job history.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub item_id: Option<String>,
    pub plan_id: Option<String>,
    pub state: Option<JobState>,
    /// RFC 3339 bounds on the creation time.
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<i64>,
}

pub struct Store {
    pool: AnyPool,
    backend: Backend,
    writer: Mutex<()>,
}

fn to_doc<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_doc<T: DeserializeOwned>(row: &AnyRow) -> Result<T> {
    let doc: String = row.try_get("doc")?;
    serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn docs<T: DeserializeOwned>(rows: &[AnyRow]) -> Result<Vec<T>> {
    rows.iter().map(from_doc).collect()
}

fn unique(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
    let what = what.into();
    move |e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(what),
        _ => StoreError::Db(e),
    }
}

/// What is written for an item: the active site always follows from the
/// state, and `replication` comes from the agent's latest heartbeat when the
/// item is read, so a copy of it is never kept (it would go stale).
fn stored_item(item: &Item) -> Item {
    let mut item = item.clone();
    item.active_site = rebound_control::machine::active_site(item.state);
    item.replication = None;
    item
}

impl Store {
    /// Open (creating if needed) the database at `url` and migrate it.
    /// `sqlite://PATH?mode=rwc` or `postgres://…`.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Store {
            pool,
            backend,
            writer: Mutex::new(()),
        })
    }

    /// The URL of the SQLite database of a data directory.
    pub fn sqlite_url(dir: &Path) -> String {
        format!("sqlite://{}?mode=rwc", dir.join(DB_FILE).display())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Take the writer lock: hold it across a read-check-write sequence.
    pub async fn lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().await
    }

    // ------------------------------------------------------------ meta

    pub async fn meta(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    /// Set a meta value (caller holds the writer lock).
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query("DELETE FROM meta WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2)")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ------------------------------------------------------------ tokens

    /// Store a token by its hash. Returns its info (without the secret).
    pub async fn insert_token(
        &self,
        name: &str,
        scope: Scope,
        secret: &str,
        component_id: Option<&str>,
    ) -> Result<TokenInfo> {
        let info = TokenInfo {
            id: new_id("tok"),
            name: name.to_string(),
            scope,
            created_at: rebound_control::time::now(),
            token: None,
        };
        sqlx::query(
            "INSERT INTO tokens (id, name, scope, hash, component_id, created_at, revoked) VALUES ($1, $2, $3, $4, $5, $6, 0)",
        )
        .bind(&info.id)
        .bind(&info.name)
        .bind(scope.as_str())
        .bind(hash_secret(secret))
        .bind(component_id)
        .bind(&info.created_at)
        .execute(&self.pool)
        .await
        .map_err(unique("token"))?;
        Ok(info)
    }

    /// The token with this secret, if any and not revoked: (info, component id).
    pub async fn token_by_secret(
        &self,
        secret: &str,
    ) -> Result<Option<(TokenInfo, Option<String>)>> {
        let row = sqlx::query(
            "SELECT id, name, scope, component_id, created_at FROM tokens WHERE hash = $1 AND revoked = 0",
        )
        .bind(hash_secret(secret))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let scope: String = row.try_get("scope")?;
        let scope = Scope::from_str(&scope).map_err(StoreError::Corrupt)?;
        Ok(Some((
            TokenInfo {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                scope,
                created_at: row.try_get("created_at")?,
                token: None,
            },
            row.try_get("component_id")?,
        )))
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        let rows = sqlx::query(
            "SELECT id, name, scope, created_at FROM tokens WHERE revoked = 0 ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let scope: String = row.try_get("scope")?;
                Ok(TokenInfo {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    scope: Scope::from_str(&scope).map_err(StoreError::Corrupt)?,
                    created_at: row.try_get("created_at")?,
                    token: None,
                })
            })
            .collect()
    }

    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        let done = sqlx::query("UPDATE tokens SET revoked = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("token {id}")));
        }
        Ok(())
    }

    // ------------------------------------------------------------ generic documents

    async fn get_doc<T: DeserializeOwned>(&self, table: &str, key: &str) -> Result<Option<T>> {
        let sql = format!("SELECT doc FROM {table} WHERE id = $1 OR name = $1");
        let row = sqlx::query(&sql)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_doc).transpose()
    }

    async fn list_docs<T: DeserializeOwned>(&self, table: &str) -> Result<Vec<T>> {
        let sql = format!("SELECT doc FROM {table} ORDER BY name");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        docs(&rows)
    }

    async fn insert_named<T: Serialize>(
        &self,
        table: &str,
        id: &str,
        name: &str,
        v: &T,
    ) -> Result<()> {
        let sql = format!("INSERT INTO {table} (id, name, doc) VALUES ($1, $2, $3)");
        sqlx::query(&sql)
            .bind(id)
            .bind(name)
            .bind(to_doc(v)?)
            .execute(&self.pool)
            .await
            .map_err(unique(format!("{name:?}")))?;
        Ok(())
    }

    async fn update_doc<T: Serialize>(&self, table: &str, id: &str, v: &T) -> Result<()> {
        let sql = format!("UPDATE {table} SET doc = $1 WHERE id = $2");
        let done = sqlx::query(&sql)
            .bind(to_doc(v)?)
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(id.to_string()));
        }
        Ok(())
    }

    // ------------------------------------------------------------ sites

    pub async fn insert_site(&self, site: &Site) -> Result<()> {
        self.insert_named("sites", &site.id, &site.name, site).await
    }
    pub async fn site(&self, key: &str) -> Result<Option<Site>> {
        self.get_doc("sites", key).await
    }
    pub async fn sites(&self) -> Result<Vec<Site>> {
        self.list_docs("sites").await
    }

    // ------------------------------------------------------------ components

    pub async fn insert_component(&self, c: &Component) -> Result<()> {
        sqlx::query(
            "INSERT INTO components (id, role, name, site_id, doc) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&c.id)
        .bind(c.role.as_str())
        .bind(&c.name)
        .bind(&c.site_id)
        .bind(to_doc(c)?)
        .execute(&self.pool)
        .await
        .map_err(unique(format!("{} {:?}", c.role, c.name)))?;
        Ok(())
    }
    pub async fn component(&self, key: &str) -> Result<Option<Component>> {
        self.get_doc("components", key).await
    }
    pub async fn components(&self) -> Result<Vec<Component>> {
        let rows = sqlx::query("SELECT doc FROM components ORDER BY role, name")
            .fetch_all(&self.pool)
            .await?;
        docs(&rows)
    }
    pub async fn put_component(&self, c: &Component) -> Result<()> {
        self.update_doc("components", &c.id, c).await
    }

    // ------------------------------------------------------------ policies, groups, plans

    pub async fn insert_policy(&self, p: &Policy) -> Result<()> {
        self.insert_named("policies", &p.id, &p.name, p).await
    }
    pub async fn policy(&self, key: &str) -> Result<Option<Policy>> {
        self.get_doc("policies", key).await
    }
    pub async fn policies(&self) -> Result<Vec<Policy>> {
        self.list_docs("policies").await
    }
    pub async fn put_policy(&self, p: &Policy) -> Result<()> {
        self.update_doc("policies", &p.id, p).await
    }

    pub async fn insert_group(&self, g: &Group) -> Result<()> {
        self.insert_named("replication_groups", &g.id, &g.name, g)
            .await
    }
    pub async fn group(&self, key: &str) -> Result<Option<Group>> {
        self.get_doc("replication_groups", key).await
    }
    pub async fn groups(&self) -> Result<Vec<Group>> {
        self.list_docs("replication_groups").await
    }

    pub async fn insert_plan(&self, p: &Plan) -> Result<()> {
        self.insert_named("plans", &p.id, &p.name, p).await
    }
    pub async fn plan(&self, key: &str) -> Result<Option<Plan>> {
        self.get_doc("plans", key).await
    }
    pub async fn plans(&self) -> Result<Vec<Plan>> {
        self.list_docs("plans").await
    }

    // ------------------------------------------------------------ items

    pub async fn insert_item(&self, item: &Item) -> Result<()> {
        let item = &stored_item(item);
        sqlx::query(
            "INSERT INTO items (id, name, phase, direction, group_id, job_id, doc) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&item.id)
        .bind(&item.name)
        .bind(item.state.phase.as_str())
        .bind(item.state.direction.as_str())
        .bind(item.group_id.as_deref())
        .bind(item.job_id.as_deref())
        .bind(to_doc(item)?)
        .execute(&self.pool)
        .await
        .map_err(unique(format!("item {:?}", item.name)))?;
        Ok(())
    }

    pub async fn item(&self, key: &str) -> Result<Option<Item>> {
        self.get_doc("items", key).await
    }

    pub async fn items(&self) -> Result<Vec<Item>> {
        self.list_docs("items").await
    }

    pub async fn items_in_group(&self, group_id: &str) -> Result<Vec<Item>> {
        let rows = sqlx::query("SELECT doc FROM items WHERE group_id = $1 ORDER BY name")
            .bind(group_id)
            .fetch_all(&self.pool)
            .await?;
        docs(&rows)
    }

    /// Write an item back (caller holds the writer lock).
    pub async fn put_item(&self, item: &Item) -> Result<()> {
        let item = &stored_item(item);
        let done = sqlx::query(
            "UPDATE items SET phase = $1, direction = $2, group_id = $3, job_id = $4, doc = $5 WHERE id = $6",
        )
        .bind(item.state.phase.as_str())
        .bind(item.state.direction.as_str())
        .bind(item.group_id.as_deref())
        .bind(item.job_id.as_deref())
        .bind(to_doc(item)?)
        .bind(&item.id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("item {}", item.id)));
        }
        Ok(())
    }

    // ------------------------------------------------------------ recovery points

    pub async fn insert_point(&self, p: &RecoveryPoint) -> Result<()> {
        sqlx::query("INSERT INTO points (item_id, id, time, doc) VALUES ($1, $2, $3, $4)")
            .bind(&p.item_id)
            .bind(&p.id)
            .bind(&p.time)
            .bind(to_doc(p)?)
            .execute(&self.pool)
            .await
            .map_err(unique(format!("recovery point {}", p.id)))?;
        Ok(())
    }

    /// The item's recovery points, newest first.
    pub async fn points(&self, item_id: &str) -> Result<Vec<RecoveryPoint>> {
        let rows =
            sqlx::query("SELECT doc FROM points WHERE item_id = $1 ORDER BY time DESC, id DESC")
                .bind(item_id)
                .fetch_all(&self.pool)
                .await?;
        docs(&rows)
    }

    pub async fn point(&self, item_id: &str, id: &str) -> Result<Option<RecoveryPoint>> {
        let row = sqlx::query("SELECT doc FROM points WHERE item_id = $1 AND id = $2")
            .bind(item_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_doc).transpose()
    }

    // ------------------------------------------------------------ jobs

    pub async fn insert_job(&self, job: &Job) -> Result<()> {
        sqlx::query(
            "INSERT INTO jobs (id, action, item_id, plan_id, state, created_at, doc) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&job.id)
        .bind(job.action.as_str())
        .bind(job.item_id.as_deref())
        .bind(job.plan_id.as_deref())
        .bind(job.state.as_str())
        .bind(&job.created_at)
        .bind(to_doc(job)?)
        .execute(&self.pool)
        .await
        .map_err(unique(format!("job {}", job.id)))?;
        Ok(())
    }

    /// Write a job back (caller holds the writer lock).
    pub async fn put_job(&self, job: &Job) -> Result<()> {
        let done = sqlx::query("UPDATE jobs SET state = $1, doc = $2 WHERE id = $3")
            .bind(job.state.as_str())
            .bind(to_doc(job)?)
            .bind(&job.id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("job {}", job.id)));
        }
        Ok(())
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>> {
        let row = sqlx::query("SELECT doc FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_doc).transpose()
    }

    /// Job history, newest first.
    pub async fn jobs(&self, f: &JobFilter) -> Result<Vec<Job>> {
        let mut sql = String::from("SELECT doc FROM jobs WHERE 1 = 1");
        let mut binds: Vec<String> = Vec::new();
        let mut add = |col: &str, op: &str, v: &Option<String>| {
            if let Some(v) = v {
                binds.push(v.clone());
                sql.push_str(&format!(" AND {col} {op} ${}", binds.len()));
            }
        };
        add("item_id", "=", &f.item_id);
        add("plan_id", "=", &f.plan_id);
        add("state", "=", &f.state.map(|s| s.as_str().to_string()));
        add("created_at", ">=", &f.since);
        add("created_at", "<=", &f.until);
        sql.push_str(" ORDER BY created_at DESC, id DESC");
        sql.push_str(&format!(
            " LIMIT {}",
            f.limit.unwrap_or(1000).clamp(1, 10_000)
        ));
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        docs(&rows)
    }

    /// Jobs not finished (queued, running, waiting), oldest first.
    pub async fn open_jobs(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT doc FROM jobs WHERE state IN ('queued', 'running', 'waiting') ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        docs(&rows)
    }

    // ------------------------------------------------------------ backup

    /// A consistent copy of the database while the server runs, written as a
    /// SQLite file with this schema (portable, readable with `sqlite3`).
    /// SQLite: `VACUUM INTO`, which reads one snapshot. PostgreSQL: every
    /// table of the schema read in one `REPEATABLE READ READ ONLY`
    /// transaction (one snapshot while writers go on) into a fresh SQLite
    /// file made by the same migrations. Either way the copy is written under
    /// a temporary name beside `dest`, synced, then renamed: a failed backup
    /// never leaves a partial file under `dest`.
    pub async fn backup_to(&self, dest: &Path) -> Result<()> {
        let tmp = partial_name(dest)?;
        let written = match self.backend {
            Backend::Sqlite => self.vacuum_into(&tmp).await,
            Backend::Postgres => self.copy_into_sqlite(&tmp).await,
        };
        let done = written.and_then(|()| {
            sync_file(&tmp)?;
            std::fs::rename(&tmp, dest).map_err(|e| {
                io_err(
                    format!("renaming {} to {}", tmp.display(), dest.display()),
                    e,
                )
            })?;
            sync_parent(dest)
        });
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }

    async fn vacuum_into(&self, tmp: &Path) -> Result<()> {
        let path = tmp.to_string_lossy().replace('\'', "''");
        sqlx::query(&format!("VACUUM INTO '{path}'"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn copy_into_sqlite(&self, tmp: &Path) -> Result<()> {
        let dst = open_sqlite_file(tmp, true).await?;
        let copied = async {
            let mut snap = self
                .pool
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?;
            check_tables(&mut snap, self.backend, "the database").await?;
            let mut out = dst.begin().await?;
            for t in TABLES {
                copy_table(&mut snap, &mut out, t).await?;
            }
            out.commit().await?;
            snap.commit().await?;
            Ok::<(), StoreError>(())
        }
        .await;
        dst.close().await;
        copied
    }

    /// Load a backup written by [`Store::backup_to`] into this store, which
    /// must be empty (a fresh database with the migrations applied): one
    /// transaction, all or nothing. Refuses a database that already holds a
    /// configuration server, and a file that is not a backup.
    pub async fn restore_from(&self, backup: &Path) -> Result<()> {
        let _w = self.lock().await;
        let src = open_sqlite_file(backup, false).await.map_err(|e| {
            StoreError::Backup(format!(
                "{} is not a readable backup: {e}",
                backup.display()
            ))
        })?;
        let restored = async {
            let mut input = src.begin().await?;
            check_tables(&mut input, Backend::Sqlite, &format!("the backup {}", backup.display()))
                .await?;
            let initialised = sqlx::query("SELECT value FROM meta WHERE key = 'initialised_at'")
                .fetch_optional(&mut *input)
                .await?;
            if initialised.is_none() {
                return Err(StoreError::Backup(format!(
                    "{} is not a configuration server backup (no initialised_at in its meta table)",
                    backup.display()
                )));
            }
            let mut tx = self.pool.begin().await?;
            for t in TABLES {
                let row = sqlx::query(&format!("SELECT COUNT(*) AS n FROM {}", t.name))
                    .fetch_one(&mut *tx)
                    .await?;
                let n: i64 = row.try_get("n")?;
                if n > 0 {
                    return Err(StoreError::Backup(format!(
                        "the target database is not empty (table {} has {n} rows{}); restore into a new, empty database",
                        t.name,
                        if t.name == "meta" { ": it already holds a configuration server" } else { "" }
                    )));
                }
            }
            for t in TABLES {
                copy_table(&mut input, &mut tx, t).await?;
            }
            tx.commit().await?;
            input.commit().await?;
            Ok(())
        }
        .await;
        src.close().await;
        restored
    }

    /// Every row of every table of the schema, tables in [`TABLES`] order,
    /// rows by primary key: to compare a restored database with its source.
    pub async fn dump(&self) -> Result<Vec<(String, Vec<Vec<(String, Cell)>>)>> {
        let mut conn = self.pool.acquire().await?;
        let mut out = Vec::new();
        for t in TABLES {
            let mut rows = Vec::new();
            let mut after: Option<Vec<String>> = None;
            loop {
                let page = read_page(&mut conn, t, after.as_deref()).await?;
                let Some(last) = page.last() else { break };
                after = Some(key_of(t, last)?);
                let full = page.len() < PAGE;
                rows.extend(page);
                if full {
                    break;
                }
            }
            out.push((t.name.to_string(), rows));
        }
        Ok(out)
    }

    /// Counts of the main objects (for restore checks and the dashboard).
    pub async fn count(&self, table: Table) -> Result<i64> {
        let sql = format!("SELECT COUNT(*) AS n FROM {}", table.name());
        let row = sqlx::query(&sql).fetch_one(&self.pool).await?;
        Ok(row.try_get("n")?)
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Table {
    Items,
    Jobs,
    Sites,
    Components,
    Policies,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Items => "items",
            Table::Jobs => "jobs",
            Table::Sites => "sites",
            Table::Components => "components",
            Table::Policies => "policies",
        }
    }
}

/// A table of the schema and its primary key (all key columns are text).
#[derive(Clone, Copy, Debug)]
pub struct TableSpec {
    pub name: &'static str,
    pub key: &'static [&'static str],
}

/// Every table the migrations create, parents before children (foreign
/// keys): what a backup copies. A backup refuses a database with a table
/// missing here, so a new migration cannot be silently left out.
pub const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "meta",
        key: &["key"],
    },
    TableSpec {
        name: "tokens",
        key: &["id"],
    },
    TableSpec {
        name: "sites",
        key: &["id"],
    },
    TableSpec {
        name: "components",
        key: &["id"],
    },
    TableSpec {
        name: "policies",
        key: &["id"],
    },
    TableSpec {
        name: "replication_groups",
        key: &["id"],
    },
    TableSpec {
        name: "plans",
        key: &["id"],
    },
    TableSpec {
        name: "items",
        key: &["id"],
    },
    TableSpec {
        name: "points",
        key: &["item_id", "id"],
    },
    TableSpec {
        name: "jobs",
        key: &["id"],
    },
];

/// Rows are copied in pages of this many (bounded memory).
const PAGE: usize = 500;

/// One value of a row, whatever the database.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

fn io_err(what: String, e: std::io::Error) -> StoreError {
    StoreError::Backup(format!("{what}: {e}"))
}

/// `DIR/.NAME.partial-RANDOM` beside `dest`.
fn partial_name(dest: &Path) -> Result<std::path::PathBuf> {
    let name = dest
        .file_name()
        .ok_or_else(|| StoreError::Backup(format!("{} is not a file name", dest.display())))?;
    Ok(dest.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        random_hex(4)
    )))
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(format!("syncing {}", path.display()), e))
}

fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    sync_file(dir)
}

/// A pool of one connection on a SQLite file: a new one (created, migrated,
/// rollback journal so that the file is complete on its own) or an existing
/// one read only.
async fn open_sqlite_file(path: &Path, create: bool) -> Result<AnyPool> {
    use sqlx::ConnectOptions;
    use sqlx::sqlite::SqliteConnectOptions;
    sqlx::any::install_default_drivers();
    if !create && !path.is_file() {
        return Err(StoreError::Backup(format!(
            "{} is not a file",
            path.display()
        )));
    }
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(create)
        .read_only(!create);
    let url = opts.to_url_lossy();
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(url.as_str())
        .await?;
    if create {
        sqlx::query("PRAGMA journal_mode = DELETE")
            .execute(&pool)
            .await?;
        MIGRATOR.run(&pool).await?;
    }
    Ok(pool)
}

/// The tables of the database behind `conn` must be the ones of [`TABLES`].
async fn check_tables(conn: &mut AnyConnection, backend: Backend, what: &str) -> Result<()> {
    let sql = match backend {
        Backend::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_sqlx%'"
        }
        Backend::Postgres => {
            "SELECT CAST(table_name AS TEXT) AS name FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' AND table_name NOT LIKE '_sqlx%'"
        }
    };
    let rows = sqlx::query(sql).fetch_all(&mut *conn).await?;
    let mut found = rows
        .iter()
        .map(|r| r.try_get::<String, _>("name"))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    found.sort();
    let mut known: Vec<String> = TABLES.iter().map(|t| t.name.to_string()).collect();
    known.sort();
    if found != known {
        return Err(StoreError::Backup(format!(
            "{what} has the tables {found:?}, this release knows {known:?}; use the rebound release that wrote it"
        )));
    }
    Ok(())
}

fn cell(row: &AnyRow, i: usize) -> Result<Cell> {
    use sqlx::ValueRef;
    use sqlx::any::AnyTypeInfoKind as K;
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Cell::Null);
    }
    let kind = raw.type_info().kind();
    Ok(match kind {
        K::Null => Cell::Null,
        K::Bool => Cell::Int(i64::from(row.try_get::<bool, _>(i)?)),
        K::SmallInt | K::Integer | K::BigInt => Cell::Int(row.try_get(i)?),
        K::Real | K::Double => Cell::Real(row.try_get(i)?),
        K::Text => Cell::Text(row.try_get(i)?),
        K::Blob => Cell::Blob(row.try_get(i)?),
    })
}

fn named_cells(row: &AnyRow) -> Result<Vec<(String, Cell)>> {
    use sqlx::Column;
    row.columns()
        .iter()
        .enumerate()
        .map(|(i, c)| Ok((c.name().to_string(), cell(row, i)?)))
        .collect()
}

fn key_of(t: &TableSpec, row: &[(String, Cell)]) -> Result<Vec<String>> {
    t.key
        .iter()
        .map(|k| match row.iter().find(|(n, _)| n == k) {
            Some((_, Cell::Text(v))) => Ok(v.clone()),
            _ => Err(StoreError::Corrupt(format!(
                "{}: key column {k} is missing or not text",
                t.name
            ))),
        })
        .collect()
}

/// The next page of `t` after the key `after`, in key order.
async fn read_page(
    conn: &mut AnyConnection,
    t: &TableSpec,
    after: Option<&[String]>,
) -> Result<Vec<Vec<(String, Cell)>>> {
    let key = t.key.join(", ");
    let mut sql = format!("SELECT * FROM {}", t.name);
    if after.is_some() {
        let params: Vec<String> = (1..=t.key.len()).map(|i| format!("${i}")).collect();
        sql.push_str(&format!(" WHERE ({key}) > ({})", params.join(", ")));
    }
    sql.push_str(&format!(" ORDER BY {key} LIMIT {PAGE}"));
    let mut q = sqlx::query(&sql);
    for v in after.unwrap_or_default() {
        q = q.bind(v.as_str());
    }
    let rows = q.fetch_all(&mut *conn).await?;
    rows.iter().map(named_cells).collect()
}

/// Copy every row and column of `t` from `src` to `dst`, page by page.
async fn copy_table(
    src: &mut AnyConnection,
    dst: &mut AnyConnection,
    t: &TableSpec,
) -> Result<u64> {
    let mut after: Option<Vec<String>> = None;
    let mut n = 0u64;
    loop {
        let page = read_page(src, t, after.as_deref()).await?;
        let Some(last) = page.last() else { break };
        after = Some(key_of(t, last)?);
        for row in &page {
            insert_row(dst, t.name, row).await?;
            n += 1;
        }
        if page.len() < PAGE {
            break;
        }
    }
    Ok(n)
}

/// NULLs are written as literals, so that no parameter type has to be
/// guessed for them.
async fn insert_row(dst: &mut AnyConnection, table: &str, row: &[(String, Cell)]) -> Result<()> {
    let cols: Vec<&str> = row.iter().map(|(n, _)| n.as_str()).collect();
    let mut vals = Vec::with_capacity(row.len());
    let mut p = 0;
    for (_, c) in row {
        if *c == Cell::Null {
            vals.push("NULL".to_string());
        } else {
            p += 1;
            vals.push(format!("${p}"));
        }
    }
    let sql = format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        cols.join(", "),
        vals.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for (_, c) in row {
        q = match c {
            Cell::Null => q,
            Cell::Int(v) => q.bind(*v),
            Cell::Real(v) => q.bind(*v),
            Cell::Text(v) => q.bind(v.as_str()),
            Cell::Blob(v) => q.bind(v.as_slice()),
        };
    }
    q.execute(&mut *dst).await?;
    Ok(())
}
