//! `rebound`: a thin binary over the library crates. Each command lives in
//! `cmd/<name>.rs` with its own clap arguments and a `run` function.

mod cmd;
mod failure;
mod output;
mod signals;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rebound",
    version,
    about = "Site recovery for Linux and KVM workloads"
)]
struct Cli {
    /// Log filter (e.g. `info`, `rebound_delta=debug`); also RUST_LOG.
    #[arg(long, global = true, env = "REBOUND_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every error code with its meaning and remedy.
    Errors(cmd::errors::Args),
    /// Inspect, list, materialise and verify replica journals on a retention volume.
    #[command(subcommand)]
    Journal(cmd::journal::Command),
    /// The agent: serve a machine's disks over NBD with dirty tracking.
    #[command(subcommand_required = true)]
    Agent(cmd::agent::Args),
    /// Make a destination disk byte-identical to a source disk, sending only what differs.
    Sync(cmd::sync::SyncArgs),
    /// Count exactly the leaves and bytes a sync would send, writing nothing.
    Diff(cmd::sync::DiffArgs),
    /// Receive syncs: serve the disks under a directory to token holders.
    SyncServer(cmd::sync::ServerArgs),
    /// The configuration server: init, run, backup, restore.
    Server(cmd::server::Args),
    /// The whole lifecycle on this machine: two sites, a live workload,
    /// failover → commit → reprotect → failback → commit → reverse replicate.
    Demo(cmd::demo::DemoArgs),
    /// Run a site node (process server and/or master target roles).
    Node(cmd::node::NodeArgs),
    /// Machines of the `local` driver.
    #[command(subcommand)]
    Machine(cmd::node::MachineCommand),
    #[command(flatten)]
    Client(cmd::client::Command),
    /// Write pattern blocks through NBD, several in flight, logging every write.
    Workload(cmd::workload::WorkloadArgs),
    /// Check disks against a workload log (torn, lost or resurrected writes).
    Verify(cmd::workload::VerifyArgs),
}

/// Components allocate and free many multi-MiB buffers on many threads
/// (changeset pushes, the capture queue). glibc's allocator would raise its
/// mmap threshold after the first such free and keep the freed buffers in
/// per-thread arenas, so resident memory creeps far above what is in use: a
/// fixed threshold gives large buffers back to the kernel at once, and two
/// arenas bound the rest.
fn bound_allocator_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    bound_allocator_memory();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Errors(_) | Command::Journal(_) | Command::Client(_) | Command::Machine(_)
    ) {
        signals::end_quietly_on_closed_stdout();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        Command::Errors(args) => cmd::errors::run(args),
        Command::Journal(args) => cmd::journal::run(args),
        Command::Agent(args) => cmd::agent::run(args),
        Command::Sync(args) => cmd::sync::run_sync(args),
        Command::Diff(args) => cmd::sync::run_diff(args),
        Command::SyncServer(args) => cmd::sync::run_server(args),
        Command::Server(args) => cmd::server::run(args),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Node(args) => cmd::node::run_node(args),
        Command::Machine(c) => cmd::node::run_machine(c),
        Command::Client(c) => cmd::client::run(c),
        Command::Workload(args) => cmd::workload::run_workload_cmd(args),
        Command::Verify(args) => cmd::workload::run_verify(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => failure::report(&err),
    }
}
