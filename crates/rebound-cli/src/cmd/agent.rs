//! `rebound agent`: the agent (mobility service). `agent export` serves a
//! machine's raw disks over NBD with dirty tracking in the write path.

use crate::failure::Failure;
use anyhow::Context;
use rebound_agent::{DiskExport, ExportSpec, spawn_persister};
use rebound_nbd::{ListenAddr, Listener, Server, ServerConfig};
use rebound_types::ErrorCode;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(clap::Subcommand)]
enum AgentCommand {
    /// Serve raw disks (image files or block devices) over NBD, tracking
    /// every changed 4 KiB block persistently.
    Export(ExportArgs),
    /// Run a machine's agent: serve its disks over NBD, register and
    /// heartbeat, replicate continuously, run its workload. Nodes start it.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The machine directory (`local` driver).
    dir: PathBuf,
    #[arg(long, env = "REBOUND_SERVER")]
    server: String,
    /// The site where the machine runs.
    #[arg(long)]
    site: String,
    #[arg(long, env = "REBOUND_REGISTRATION_KEY", hide_env_values = true)]
    registration_key: String,
    /// Crash-consistent point interval in seconds, used only while the
    /// item's replication policy cannot be read (the policy's
    /// crash-consistent frequency wins).
    #[arg(long, env = "REBOUND_RPO_SECS", default_value_t = 5)]
    interval_secs: u64,
    #[arg(long, env = "REBOUND_HEARTBEAT_SECS", default_value_t = 5)]
    heartbeat_secs: u64,
    /// Address of the read-only data port.
    #[arg(long, default_value = "127.0.0.1:0")]
    data_listen: String,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Disks to serve: PATH (export name = file name) or NAME=PATH.
    #[arg(required = true, value_name = "DISK")]
    disks: Vec<String>,
    /// unix:PATH or tcp:HOST:PORT (port 0 picks a free port; the bound
    /// address is printed on stdout).
    #[arg(long)]
    listen: String,
    /// Refuse writes (no dirty tracking needed).
    #[arg(long)]
    read_only: bool,
    /// Directory of the dirty-tracking state files (`NAME.dirty`); default:
    /// beside each image as `IMAGE.dirty`. Required for block devices.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Seconds between background persists of the dirty state.
    #[arg(long, default_value_t = 5)]
    persist_every: u64,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        AgentCommand::Export(a) => export(a),
        AgentCommand::Run(a) => {
            let shutdown = crate::signals::shutdown_flag()?;
            rebound_node::agent::run(
                rebound_node::agent::AgentConfig {
                    dir: a.dir,
                    server: a.server,
                    site: a.site,
                    registration_key: a.registration_key,
                    interval: Duration::from_secs(a.interval_secs.max(1)),
                    heartbeat: Duration::from_secs(a.heartbeat_secs.max(1)),
                    data_listen: a.data_listen,
                },
                shutdown,
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_disk(arg: &str) -> (String, PathBuf) {
    // NAME=PATH only when the part before '=' looks like a name, so paths
    // containing '=' still work.
    if let Some((name, path)) = arg.split_once('=')
        && !name.is_empty()
        && !name.contains('/')
    {
        return (name.to_string(), PathBuf::from(path));
    }
    let path = PathBuf::from(arg);
    (ExportSpec::default_name(&path), path)
}

fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let addr: ListenAddr = a.listen.parse().map_err(|e: rebound_nbd::NbdError| {
        Failure::new(ErrorCode::InvalidArgument, e.to_string())
    })?;
    if let Some(dir) = &a.state_dir {
        rebound_disk::crashsafe::create_dir_all_durable(dir).map_err(|e| {
            Failure::new(ErrorCode::DirtyStateIo, format!("{}: {e}", dir.display()))
        })?;
    }
    let mut server = Server::new(ServerConfig::default());
    let mut exports = Vec::new();
    for arg in &a.disks {
        let (name, path) = parse_disk(arg);
        let spec = ExportSpec {
            name: name.clone(),
            path,
            read_only: a.read_only,
            state_dir: a.state_dir.clone(),
        };
        if exports.iter().any(|e: &Arc<DiskExport>| e.name() == name) {
            return Err(Failure::new(
                ErrorCode::NbdExportDuplicate,
                format!("export name {name:?} is used twice"),
            )
            .into());
        }
        let (export, report) = DiskExport::open(&spec).with_context(|| format!("opening {arg}"))?;
        if let Some(r) = report
            && r.unclean
        {
            eprintln!(
                "{name}: previous agent stopped uncleanly; {} region(s) of 64 MiB marked dirty",
                r.regions_recovered
            );
        }
        let export = Arc::new(export);
        server.add_export(&name, &spec.path.display().to_string(), export.clone())?;
        exports.push(export);
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let persister = spawn_persister(exports.clone(), Duration::from_secs(a.persist_every.max(1)));
    let served = rt.block_on(async {
        let listener = Listener::bind(&addr).await?;
        // Handlers first: a SIGTERM sent as soon as we say we listen must
        // stop us cleanly, not kill us.
        let stop = crate::signals::shutdown_signal()?;
        // The bound address and the exports, for scripts and tests.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", listener.local_addr());
        for e in &exports {
            let _ = writeln!(out, "export {}", e.name());
        }
        let _ = out.flush();
        drop(out);
        Arc::new(server).serve(listener, stop).await
    });
    persister.stop();
    // Wait for device calls still running on the blocking pool, then record
    // a clean stop in every tracker.
    rt.shutdown_timeout(Duration::from_secs(30));
    let mut failed = None;
    for e in &exports {
        if let Err(err) = e.close() {
            eprintln!("{}: closing dirty tracking failed: {err}", e.name());
            failed = Some(err);
        }
    }
    served?;
    if let Some(err) = failed {
        return Err(err.into());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_arguments() {
        assert_eq!(
            parse_disk("/a/b/disk0.img"),
            ("disk0.img".into(), PathBuf::from("/a/b/disk0.img"))
        );
        assert_eq!(
            parse_disk("root=/a/b.img"),
            ("root".into(), PathBuf::from("/a/b.img"))
        );
        assert_eq!(
            parse_disk("/a/x=y.img"),
            ("x=y.img".into(), PathBuf::from("/a/x=y.img"))
        );
    }
}
