//! `rebound sync`, `rebound diff` and `rebound sync-server`.

use crate::failure::{EXIT_DIFFERENT, Failure};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rebound_delta::{Options, Progress, RemoteAddr, Report, SyncError};
use rebound_types::ErrorCode;
use rebound_wire::{Compression, Token};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Common {
    /// Source: a raw image, a block device, or rebound://HOST:PORT/NAME.
    src: String,
    /// Destination: a raw image (created sparse if missing), a block device, or rebound://HOST:PORT/NAME.
    dst: String,
    /// Token file for rebound:// peers (or REBOUND_TOKEN).
    #[arg(long, env = "REBOUND_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Allow the destination to be cut to the source's size.
    #[arg(long)]
    allow_shrink: bool,
    /// `text` (default) or `json`.
    #[arg(long, default_value = "text")]
    output: String,
}

#[derive(clap::Args)]
pub struct SyncArgs {
    #[command(flatten)]
    common: Common,
    /// Copy every non-zero block without comparing (failback's "full download"); holes are still skipped.
    #[arg(long)]
    full: bool,
    /// Compare and report, write nothing (same as `rebound diff`).
    #[arg(long)]
    dry_run: bool,
    /// Wire compression: lz4 (default), zstd or none.
    #[arg(long, default_value = "lz4")]
    compression: String,
    /// Where resume state is kept (default: $XDG_STATE_HOME/rebound or ~/.local/state/rebound).
    #[arg(long, env = "REBOUND_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Do not keep resume state (a killed sync then compares everything again).
    #[arg(long)]
    no_resume: bool,
}

#[derive(clap::Args)]
pub struct DiffArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
pub struct ServerArgs {
    /// Address to listen on, e.g. 127.0.0.1:7420.
    #[arg(long)]
    listen: String,
    /// Directory holding the disks; names in rebound:// addresses are relative to it.
    #[arg(long)]
    root: PathBuf,
    /// File holding the shared token (first line).
    #[arg(long)]
    token_file: PathBuf,
}

fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("rebound");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/state/rebound");
    }
    std::env::temp_dir().join("rebound-state")
}

fn token(path: Option<&Path>) -> anyhow::Result<Token> {
    if let Ok(t) = std::env::var("REBOUND_TOKEN") {
        return Token::new(&t).map_err(|e| {
            Failure::new(ErrorCode::TokenUnreadable, format!("REBOUND_TOKEN: {e}")).into()
        });
    }
    let Some(path) = path else {
        return Err(Failure::new(
            ErrorCode::TokenUnreadable,
            "a rebound:// peer needs --token-file or REBOUND_TOKEN",
        )
        .into());
    };
    Token::from_file(path).map_err(|e| Failure::new(ErrorCode::TokenUnreadable, e).into())
}

fn check_output(o: &str) -> anyhow::Result<bool> {
    match o {
        "json" => Ok(true),
        "text" => Ok(false),
        _ => Err(Failure::new(
            ErrorCode::InvalidArgument,
            format!("--output {o:?}: expected text or json"),
        )
        .into()),
    }
}

fn execute(c: &Common, opts: &Options, json: bool) -> anyhow::Result<Report> {
    let src = RemoteAddr::parse(&c.src).transpose()?;
    let dst = RemoteAddr::parse(&c.dst).transpose()?;
    let progress = Arc::new(Progress::default());
    let bar = (!json && std::io::stderr().is_terminal()).then(|| spawn_bar(progress.clone()));
    let p = Some(progress.clone());
    let result = match (src, dst) {
        (None, None) => rebound_delta::sync_local(Path::new(&c.src), Path::new(&c.dst), opts, p),
        (None, Some(d)) => rebound_delta::push(
            Path::new(&c.src),
            &d,
            &token(c.token_file.as_deref())?,
            opts,
            p,
        ),
        (Some(s), None) => rebound_delta::pull(
            &s,
            Path::new(&c.dst),
            &token(c.token_file.as_deref())?,
            opts,
            p,
        ),
        (Some(_), Some(_)) => Err(SyncError::Invalid(
            "at most one side may be a rebound:// address".into(),
        )),
    };
    if let Some((bar, stop)) = bar {
        stop.store(true, Ordering::Relaxed);
        let _ = bar.join();
    }
    result.context(format!("sync {} -> {}", c.src, c.dst))
}

fn spawn_bar(
    p: Arc<Progress>,
) -> (
    std::thread::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let bar = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style);
        }
        while !s.load(Ordering::Relaxed) {
            bar.set_length(p.total.load(Ordering::Relaxed));
            bar.set_position(p.done.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(100));
        }
        bar.finish_and_clear();
    });
    (h, stop)
}

use crate::output::human_bytes as human;

fn emit(r: &Report, json: bool) -> anyhow::Result<()> {
    let text = if json {
        serde_json::to_string_pretty(r)? + "\n"
    } else {
        report_text(r)
    };
    crate::output::print(&text)
}

fn report_text(r: &Report) -> String {
    let what = if r.dry_run { "would send" } else { "sent" };
    let mut t = format!(
        "{} leaves differ ({}): {what} {} of data and {} as holes\n",
        r.leaves_differing,
        human(r.bytes_differing),
        human(r.data_bytes),
        human(r.zero_bytes)
    );
    t += &format!(
        "read {} at the source, {} at the destination; wire {} out, {} in; {:.2} s, {}/s\n",
        human(r.source_bytes_read),
        human(r.dest_bytes_read),
        human(r.wire_bytes_sent),
        human(r.wire_bytes_received),
        r.elapsed_secs,
        human(r.throughput_bytes_per_sec as u64)
    );
    if r.chunks_resumed > 0 {
        t += &format!(
            "resumed after {} of {} chunks\n",
            r.chunks_resumed, r.chunks
        );
    }
    t += &if !r.dry_run {
        format!("verified: BLAKE3 roots equal ({})\n", r.source_root)
    } else if r.identical {
        "disks are identical\n".to_string()
    } else {
        "disks differ\n".to_string()
    };
    t
}

pub fn run_sync(a: SyncArgs) -> anyhow::Result<ExitCode> {
    let json = check_output(&a.common.output)?;
    let compression = Compression::parse(&a.compression).ok_or_else(|| {
        Failure::new(
            ErrorCode::InvalidArgument,
            format!(
                "--compression {:?}: expected lz4, zstd or none",
                a.compression
            ),
        )
    })?;
    if a.full && a.dry_run {
        return Err(Failure::new(
            ErrorCode::InvalidArgument,
            "--full and --dry-run exclude each other",
        )
        .into());
    }
    let opts = Options {
        full: a.full,
        dry_run: a.dry_run,
        allow_shrink: a.common.allow_shrink,
        compression,
        state_dir: (!a.no_resume).then(|| a.state_dir.clone().unwrap_or_else(default_state_dir)),
        ..Options::default()
    };
    let r = execute(&a.common, &opts, json)?;
    emit(&r, json)?;
    Ok(ExitCode::SUCCESS)
}

pub fn run_diff(a: DiffArgs) -> anyhow::Result<ExitCode> {
    let json = check_output(&a.common.output)?;
    let opts = Options {
        dry_run: true,
        allow_shrink: a.common.allow_shrink,
        ..Options::default()
    };
    let r = execute(&a.common, &opts, json)?;
    emit(&r, json)?;
    Ok(if r.identical && r.leaves_differing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERENT)
    })
}

pub fn run_server(a: ServerArgs) -> anyhow::Result<ExitCode> {
    let token =
        Token::from_file(&a.token_file).map_err(|e| Failure::new(ErrorCode::TokenUnreadable, e))?;
    if !a.root.is_dir() {
        return Err(Failure::new(
            ErrorCode::InvalidArgument,
            format!("--root {}: not a directory", a.root.display()),
        )
        .into());
    }
    let listener = std::net::TcpListener::bind(&a.listen).map_err(|e| {
        Failure::new(
            ErrorCode::InvalidArgument,
            format!("cannot listen on {}: {e}", a.listen),
        )
    })?;
    let local = listener.local_addr()?;
    // Scripts wait for this line to know the port (useful with port 0).
    eprintln!(
        "rebound sync-server listening on {local}, root {}",
        a.root.display()
    );
    tracing::info!(addr = %local, root = %a.root.display(), "sync-server listening");
    rebound_delta::serve(listener, a.root, token)?;
    Ok(ExitCode::SUCCESS)
}
