//! `rebound node`: a site node with the process server and/or master target
//! roles, and `rebound machine`: machines of the `local` driver.

use crate::failure::Failure;
use anyhow::Context;
use rebound_api::OsType;
use rebound_node::machine::{self, DiskEntry, Machine, Manifest};
use rebound_node::node::{NodeConfig, run};
use rebound_types::ErrorCode;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
pub struct NodeArgs {
    /// The site this node belongs to (name or id).
    #[arg(long)]
    site: String,
    /// Roles, comma-separated: process-server, master-target.
    #[arg(long, default_value = "process-server,master-target")]
    roles: String,
    /// The configuration server, e.g. http://127.0.0.1:7443.
    #[arg(long, env = "REBOUND_SERVER")]
    server: String,
    /// The registration key printed by `rebound server init` (prefer the
    /// environment: command lines are visible to every user).
    #[arg(long, env = "REBOUND_REGISTRATION_KEY", hide_env_values = true)]
    registration_key: String,
    /// Where the node keeps its identity, data port files, staging and,
    /// by default, its host, datastore and retention volume.
    #[arg(long)]
    data_dir: PathBuf,
    /// Address of the data port (replication traffic).
    #[arg(long, default_value = "127.0.0.1:0")]
    data_listen: String,
    /// A datastore as NAME=DIR (repeatable); default data=DATA_DIR/datastore.
    #[arg(long, value_name = "NAME=DIR")]
    datastore: Vec<String>,
    /// A retention volume directory (repeatable); default DATA_DIR/retention.
    #[arg(long, value_name = "DIR")]
    retention_volume: Vec<PathBuf>,
    /// The host directory where machines of this site live (`local` driver).
    #[arg(long)]
    host_dir: Option<PathBuf>,
    /// Bound of the process server's cache.
    #[arg(long, default_value_t = 1 << 30)]
    cache_limit: u64,
    /// Disks the master target may attach.
    #[arg(long, default_value_t = 60)]
    disk_slots: u32,
    #[arg(long, default_value_t = 5)]
    heartbeat_secs: u64,
    /// Testing: report filesystem TYPE for DIR (as if statfs said so).
    #[arg(long, value_name = "DIR=TYPE", hide = true)]
    fault_fs_type: Vec<String>,
}

fn bad(msg: String) -> anyhow::Error {
    Failure::new(ErrorCode::InvalidArgument, msg).into()
}

pub fn run_node(a: NodeArgs) -> anyhow::Result<ExitCode> {
    let mut ps = false;
    let mut mt = false;
    for r in a.roles.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        match r {
            "process-server" | "ps" => ps = true,
            "master-target" | "mt" => mt = true,
            other => {
                return Err(bad(format!(
                    "unknown role {other:?}: use process-server and/or master-target"
                )));
            }
        }
    }
    if !ps && !mt {
        return Err(bad("a node needs at least one role".into()));
    }
    let mut datastores = Vec::new();
    for d in &a.datastore {
        let (n, p) = d
            .split_once('=')
            .ok_or_else(|| bad(format!("--datastore {d:?}: use NAME=DIR")))?;
        datastores.push((n.to_string(), PathBuf::from(p)));
    }
    let mut fs_type_overrides = Vec::new();
    for f in &a.fault_fs_type {
        let (p, t) = f
            .rsplit_once('=')
            .ok_or_else(|| bad(format!("--fault-fs-type {f:?}: use DIR=TYPE")))?;
        fs_type_overrides.push((PathBuf::from(p), t.to_string()));
    }
    let shutdown = crate::signals::shutdown_flag()?;
    run(
        NodeConfig {
            site: a.site,
            process_server: ps,
            master_target: mt,
            server: a.server,
            registration_key: a.registration_key,
            data_dir: a.data_dir,
            data_listen: a.data_listen,
            datastores,
            retention_volumes: a.retention_volume,
            host_dir: a.host_dir,
            cache_limit: a.cache_limit,
            disk_slot_limit: a.disk_slots,
            heartbeat: Duration::from_secs(a.heartbeat_secs.max(1)),
            fs_type_overrides,
        },
        shutdown,
    )?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Subcommand)]
pub enum MachineCommand {
    /// Create a machine (a directory with a manifest and sparse raw disks).
    Create(CreateArgs),
    /// List the machines of a host directory.
    List {
        #[arg(long)]
        host: PathBuf,
        #[arg(long, default_value = "table")]
        output: String,
    },
    /// Suspend a machine: its agent holds every write (the machine stays
    /// up) and reports it suspended until `resume`.
    Suspend(MachineRef),
    /// Resume a suspended machine: held writes go on.
    Resume(MachineRef),
}

#[derive(clap::Args)]
pub struct MachineRef {
    /// The host directory (a node's `host` directory).
    #[arg(long)]
    host: PathBuf,
    #[arg(long)]
    name: String,
}

fn set_suspended(r: &MachineRef, suspended: bool) -> anyhow::Result<ExitCode> {
    let m = machine::list(&r.host)
        .into_iter()
        .find(|m| m.manifest().is_ok_and(|man| man.name == r.name))
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::NotFound,
                format!("no machine {} in {}", r.name, r.host.display()),
            )
        })?;
    m.set_suspended(suspended)?;
    println!(
        "machine {} {}",
        r.name,
        if suspended { "suspended" } else { "resumed" }
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// The host directory (a node's `host` directory).
    #[arg(long)]
    host: PathBuf,
    #[arg(long)]
    name: String,
    /// A disk as NAME=SIZE (SIZE in bytes, or with K/M/G suffix); repeatable.
    #[arg(long, required = true, value_name = "NAME=SIZE")]
    disk: Vec<String>,
    #[arg(long, default_value = "linux")]
    os: OsType,
    /// Mark the machine to run: its node starts its agent.
    #[arg(long)]
    start: bool,
    /// `rebound` arguments of the machine's workload; `{nbd:DISK}` becomes
    /// the disk's NBD URI. Everything after `--`.
    #[arg(last = true)]
    workload: Vec<String>,
}

pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

pub fn run_machine(c: MachineCommand) -> anyhow::Result<ExitCode> {
    match c {
        MachineCommand::Suspend(r) => set_suspended(&r, true),
        MachineCommand::Resume(r) => set_suspended(&r, false),
        MachineCommand::Create(a) => {
            let mut disks = Vec::new();
            for d in &a.disk {
                let (n, s) = d
                    .split_once('=')
                    .ok_or_else(|| bad(format!("--disk {d:?}: use NAME=SIZE")))?;
                let size = parse_size(s)
                    .filter(|&s| s > 0)
                    .ok_or_else(|| bad(format!("--disk {d:?}: {s:?} is not a size")))?;
                disks.push(DiskEntry {
                    name: n.to_string(),
                    uuid: machine::new_uuid(),
                    size_bytes: size,
                });
            }
            let m = machine::create(
                &a.host,
                &Manifest {
                    name: a.name.clone(),
                    os: a.os,
                    disks,
                    workload: (!a.workload.is_empty()).then_some(a.workload),
                    after_point_ns: None,
                },
            )
            .map_err(|e| Failure::new(ErrorCode::NameConflict, format!("{e:#}")))?;
            if a.start {
                rebound_disk::crashsafe::write_file_durable(&m.dir.join("want-running"), b"1\n")?;
            }
            println!("machine {} created in {}", a.name, m.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        MachineCommand::List { host, output } => {
            let ms: Vec<(Machine, Manifest)> = machine::list(&host)
                .into_iter()
                .filter_map(|m| m.manifest().ok().map(|man| (m, man)))
                .collect();
            if output == "json" {
                let v: Vec<serde_json::Value> = ms
                    .iter()
                    .map(|(m, man)| {
                        serde_json::json!({"name": man.name, "dir": m.dir, "running": m.is_running(), "suspended": m.is_suspended(), "disks": man.disks})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).context("json")?);
            } else {
                println!("{:<20} {:<9} {:>6}  DIR", "NAME", "RUNNING", "DISKS");
                for (m, man) in &ms {
                    println!(
                        "{:<20} {:<9} {:>6}  {}",
                        man.name,
                        match (m.is_running(), m.is_suspended()) {
                            (true, true) => "suspended",
                            (true, false) => "yes",
                            (false, _) => "no",
                        },
                        man.disks.len(),
                        m.dir.display()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
