//! `rebound server init|run|backup|restore`: the configuration server.

use crate::failure::Failure;
use anyhow::Context;
use rebound_server::Config;
use rebound_store::Store;
use rebound_types::ErrorCode;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Create the database; print the admin token and the registration key once.
    Init(Location),
    /// Serve the REST API (and resume the jobs that were running).
    Run(RunArgs),
    /// Write a consistent copy of the database, while the server runs.
    Backup(BackupArgs),
    /// Restore a backup into an empty data directory or an empty PostgreSQL
    /// database (server stopped).
    Restore(RestoreArgs),
}

#[derive(clap::Args)]
struct Location {
    /// Directory of the SQLite database (created if missing).
    #[arg(long, env = "REBOUND_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A PostgreSQL URL instead of SQLite (`postgres://user@host/db`).
    #[arg(long, env = "DATABASE_URL", conflicts_with = "data_dir")]
    database_url: Option<String>,
}

impl Location {
    fn url(&self) -> anyhow::Result<String> {
        match (&self.data_dir, &self.database_url) {
            (_, Some(url)) => Ok(url.clone()),
            (Some(dir), None) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the data directory {}", dir.display()))
                    .map_err(|e| Failure::new(ErrorCode::StoreUnavailable, format!("{e:#}")))?;
                Ok(Store::sqlite_url(dir))
            }
            (None, None) => Err(Failure::new(
                ErrorCode::InvalidArgument,
                "give --data-dir DIR (or --database-url URL)",
            )
            .into()),
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    location: Location,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8470")]
    listen: String,
    /// Seconds after which a component without a heartbeat is unhealthy.
    #[arg(long, default_value_t = 120)]
    heartbeat_limit: u64,
    /// Seconds a component step may go without a progress report.
    #[arg(long, default_value_t = 600)]
    step_timeout: u64,
}

#[derive(clap::Args)]
struct BackupArgs {
    #[command(flatten)]
    location: Location,
    /// The backup file to write (must not exist).
    #[arg(long, short)]
    output: PathBuf,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The empty data directory to restore into.
    #[arg(long, required_unless_present = "database_url")]
    data_dir: Option<PathBuf>,
    /// An empty PostgreSQL database to restore into instead
    /// (`postgres://user@host/db`; created with `CREATE DATABASE`).
    #[arg(long, conflicts_with = "data_dir")]
    database_url: Option<String>,
    /// The backup file written by `rebound server backup`.
    #[arg(long, short)]
    input: PathBuf,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn coded(e: rebound_server::error::AppError) -> anyhow::Error {
    let code = e.0.error_code().unwrap_or(ErrorCode::StoreUnavailable);
    Failure::new(code, e.0.message).into()
}

fn store_err(e: rebound_store::StoreError) -> anyhow::Error {
    use rebound_types::Coded;
    Failure::new(e.code(), e.to_string()).into()
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async move {
        match args.command {
            Command::Init(loc) => {
                let store = Store::open(&loc.url()?).await.map_err(store_err)?;
                let done = rebound_server::init(&store).await.map_err(coded)?;
                store.close().await;
                // Printed once; only their hashes are stored. A closed
                // stdout (e.g. `| head -1`) is an error with a remedy, not a
                // panic.
                let text = format!(
                    "configuration server initialised\nadmin token:      {}\nregistration key: {}\nkeep both now: they are stored hashed and cannot be shown again\n",
                    done.admin_token, done.registration_key
                );
                let mut out = std::io::stdout().lock();
                std::io::Write::write_all(&mut out, text.as_bytes())
                    .and_then(|_| std::io::Write::flush(&mut out))
                    .map_err(|e| {
                        Failure::new(
                            ErrorCode::DataDirState,
                            format!(
                                "the database is initialised but its secrets could not be printed ({e}); remove it and run init again with stdout kept open"
                            ),
                        )
                    })?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Run(a) => {
                let store = rebound_server::open_initialised(&a.location.url()?)
                    .await
                    .map_err(coded)?;
                let listener = tokio::net::TcpListener::bind(&a.listen)
                    .await
                    .map_err(|e| {
                        Failure::new(
                            ErrorCode::InvalidArgument,
                            format!("listen on {}: {e}", a.listen),
                        )
                    })?;
                let addr = listener.local_addr()?;
                let stop = crate::signals::shutdown_signal()?;
                eprintln!("rebound configuration server listening on http://{addr}/api/v1");
                let config = Config {
                    heartbeat_limit: Duration::from_secs(a.heartbeat_limit),
                    step_timeout: Duration::from_secs(a.step_timeout),
                    ..Config::default()
                };
                rebound_server::serve(store, listener, config, stop).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Backup(a) => {
                let store = rebound_server::open_initialised(&a.location.url()?)
                    .await
                    .map_err(coded)?;
                rebound_server::backup(&store, &a.output)
                    .await
                    .map_err(coded)?;
                store.close().await;
                println!("backup written to {}", a.output.display());
                Ok(ExitCode::SUCCESS)
            }
            Command::Restore(a) => {
                let (store, target) = match (&a.data_dir, &a.database_url) {
                    (_, Some(url)) => (
                        rebound_server::restore_into_database(&a.input, url)
                            .await
                            .map_err(coded)?,
                        "the database".to_string(),
                    ),
                    (Some(dir), None) => (
                        rebound_server::restore(&a.input, dir)
                            .await
                            .map_err(coded)?,
                        dir.display().to_string(),
                    ),
                    (None, None) => {
                        return Err(Failure::new(
                            ErrorCode::InvalidArgument,
                            "give --data-dir DIR or --database-url URL",
                        )
                        .into());
                    }
                };
                let items = store
                    .count(rebound_store::Table::Items)
                    .await
                    .map_err(store_err)?;
                store.close().await;
                println!(
                    "restored {} into {target} ({items} items)",
                    a.input.display(),
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}
