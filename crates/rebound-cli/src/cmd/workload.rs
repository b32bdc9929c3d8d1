//! `rebound workload` and `rebound verify` (DESIGN.md §9): write pattern
//! blocks through NBD with a durable log of every write, and check disks
//! against that log.

use crate::failure::{EXIT_MISMATCH, Failure};
use anyhow::Context;
use rebound_nbd::NbdUri;
use rebound_testkit::{
    Mode, StopReason, TestkitError, VerifyReport, WorkloadConfig, run_workload, verify_paths,
};
use rebound_types::{Coded, ErrorCode};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(clap::Args)]
pub struct WorkloadArgs {
    /// A disk of the machine as an NBD URI: nbd+unix:///EXPORT?socket=PATH
    /// or nbd://HOST:PORT/EXPORT. Repeat for every disk; the order gives the
    /// disk index.
    #[arg(long = "disk", required = true, value_name = "URI")]
    disks: Vec<String>,
    /// The write log (JSON lines); an existing log is continued. (`--log`
    /// is the global log filter.)
    #[arg(long, value_name = "FILE")]
    write_log: PathBuf,
    /// Writers, each with its own connection per disk (writes in flight).
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Stop after this many seconds.
    #[arg(long)]
    seconds: Option<f64>,
    /// Stop after this many writes (all writers together).
    #[arg(long)]
    writes: Option<u64>,
    /// Writes per second per writer (default: as fast as possible).
    #[arg(long, value_name = "W")]
    rate: Option<f64>,
    /// Largest write in 4 KiB blocks (1 to 256).
    #[arg(long, default_value_t = 8)]
    max_blocks: u32,
    /// The disks were rolled back to this point (ns since the UNIX epoch) by
    /// an unplanned failover: start a new epoch in which earlier writes
    /// issued after it never happened.
    #[arg(long, value_name = "T_NS")]
    after_point: Option<u64>,
    /// Each writer flushes its connections after this many writes (0: never).
    #[arg(long, default_value_t = 64)]
    flush_every: u64,
    /// Seconds one request may take before the server counts as gone (0:
    /// wait forever).
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    io_timeout: u64,
    /// A failing connection (export stopped, failed over) ends the workload
    /// with exit status 0 instead of an error.
    #[arg(long)]
    tolerate_disconnect: bool,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A disk: raw image, block device, or NBD URI. Repeat in the
    /// workload's --disk order.
    #[arg(long = "disk", required = true, value_name = "PATH_OR_URI")]
    disks: Vec<String>,
    /// The workload's write log.
    #[arg(long, value_name = "FILE")]
    write_log: PathBuf,
    /// The disks are an unplanned failover's point at this time (ns since
    /// the UNIX epoch): check crash consistency at it. Without it, check a
    /// planned operation's result.
    #[arg(long, value_name = "T_NS")]
    point_time: Option<u64>,
    /// `text` (default) or `json`.
    #[arg(long, default_value = "text")]
    output: String,
}

fn coded(e: TestkitError) -> anyhow::Error {
    Failure::new(e.code(), e.to_string()).into()
}

/// SIGTERM and SIGINT set `stop`; handlers are registered before returning.
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    let signalled = rt
        .block_on(async { crate::signals::shutdown_signal() })
        .context("installing signal handlers")?;
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(signalled);
            flag.store(true, Ordering::Relaxed);
        })
        .context("starting the signal thread")?;
    Ok(stop)
}

pub fn run_workload_cmd(a: WorkloadArgs) -> anyhow::Result<ExitCode> {
    let mut disks = Vec::with_capacity(a.disks.len());
    for d in &a.disks {
        disks.push(
            d.parse::<NbdUri>()
                .map_err(|e| Failure::new(e.code(), e.to_string()))?,
        );
    }
    if let Some(s) = a.seconds
        && !(s.is_finite() && s >= 0.0)
    {
        return Err(Failure::new(ErrorCode::InvalidArgument, "--seconds must be >= 0").into());
    }
    let mut cfg = WorkloadConfig::new(disks, a.write_log.clone());
    cfg.inflight = a.inflight;
    cfg.duration = a.seconds.map(Duration::from_secs_f64);
    cfg.writes = a.writes;
    cfg.rate = a.rate;
    cfg.max_blocks = a.max_blocks;
    cfg.after_point = a.after_point;
    cfg.flush_every = a.flush_every;
    cfg.io_timeout = (a.io_timeout > 0).then(|| Duration::from_secs(a.io_timeout));
    let stop = stop_on_signals()?;
    let n = cfg.disks.len();
    let log = a.write_log.display().to_string();
    let summary = run_workload(&cfg, &stop, |s| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "workload: writing to {n} disk(s), log {log}");
        let _ = writeln!(
            out,
            "workload: epoch {}, first write id {}, {} writer(s), disk sizes {:?}",
            s.epoch, s.first_id, cfg.inflight, s.sizes
        );
        let _ = out.flush();
    })
    .map_err(coded)?;
    let reason = match summary.reason {
        StopReason::Signal => "signal",
        StopReason::Duration => "time",
        StopReason::Writes => "write count",
        StopReason::Disconnected => "disconnected",
        StopReason::NothingToDo => "nothing to write",
    };
    crate::output::print(&format!(
        "workload: stopped ({reason}): {} write(s) issued, {} acknowledged, ids {}..{}, epoch {}\n",
        summary.issued, summary.acked, summary.first_id, summary.last_id, summary.epoch
    ))?;
    if let Some(msg) = summary.disconnect {
        eprintln!("workload: the NBD server went away: {msg}");
        if !a.tolerate_disconnect {
            return Err(Failure::new(
                ErrorCode::WorkloadDisconnected,
                format!("the NBD server went away: {msg}"),
            )
            .into());
        }
    } else if summary.reason == StopReason::NothingToDo {
        return Err(Failure::new(
            ErrorCode::InvalidArgument,
            "no writer owns any block: the disks are smaller than one 1 MiB stripe per writer; lower --inflight",
        )
        .into());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(r: &VerifyReport, log: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "verify: mode {}{}",
        r.mode,
        r.point_time.map(|t| format!(" at {t}")).unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "verify: log {log}: {} write(s), {} acknowledged; {} required, {} voided, {} uncertain; {} epoch cut(s){}",
        r.writes_in_log,
        r.acked_writes,
        r.required_writes,
        r.voided_writes,
        r.uncertain_writes,
        r.epochs,
        if r.log_torn_tail {
            "; torn last record ignored"
        } else {
            ""
        }
    );
    for (i, d) in r.disks.iter().enumerate() {
        let _ = writeln!(
            out,
            "verify: disk {i} {}: {} block(s) checked, {} written",
            d.name, d.blocks_checked, d.written_blocks
        );
    }
    for c in &r.checks {
        let _ = writeln!(out, "checked: {c}");
    }
    if r.ok() {
        let _ = writeln!(
            out,
            "verify: OK: {} block(s) checked, {} written ({} at their last acknowledged write, {} newer)",
            r.blocks_checked, r.written_blocks, r.blocks_at_last_required, r.blocks_newer
        );
    } else {
        let _ = writeln!(
            out,
            "verify: FAILED: {} violation(s); first: {}",
            r.violations,
            violation_text(r)
        );
    }
}

fn violation_text(r: &VerifyReport) -> String {
    let Some(v) = &r.first_violation else {
        return String::new();
    };
    let name = r.disks.get(v.disk).map(|d| d.name.as_str()).unwrap_or("?");
    let expected = if v.expected.is_empty() {
        "zero (no write)".to_string()
    } else {
        let ids: Vec<String> = v.expected.iter().map(u64::to_string).collect();
        format!("write {}", ids.join(" or "))
    };
    let found = match v.found_write {
        Some(id) => format!("write {id}"),
        None => "no valid write".to_string(),
    };
    format!(
        "disk {} ({name}) block at offset {} (block {}): {}: expected {expected}, found {found}: {}",
        v.disk,
        v.offset,
        v.offset / 4096,
        v.kind.label(),
        v.message
    )
}

pub fn run_verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let json = match a.output.as_str() {
        "text" => false,
        "json" => true,
        o => {
            return Err(Failure::new(
                ErrorCode::InvalidArgument,
                format!("--output {o:?}: expected text or json"),
            )
            .into());
        }
    };
    let mode = match a.point_time {
        Some(t) => Mode::Point(t),
        None => Mode::Planned,
    };
    let report = verify_paths(&a.disks, &a.write_log, mode).map_err(coded)?;
    if json {
        let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
        crate::output::print(&(text + "\n"))?;
    } else {
        print_text(&report, &a.write_log.display().to_string());
    }
    if report.ok() {
        return Ok(ExitCode::SUCCESS);
    }
    let c = ErrorCode::WorkloadVerifyFailed;
    eprintln!(
        "error E{} ({}): {} violation(s); first: {}",
        c.number(),
        c.name(),
        report.violations,
        violation_text(&report)
    );
    eprintln!("remedy: {}", c.remedy());
    Ok(ExitCode::from(EXIT_MISMATCH))
}
