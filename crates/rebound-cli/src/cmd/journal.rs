//! `rebound journal inspect|points|materialize|verify`: operator commands over
//! the replica journals of a retention volume. They open journals read-only
//! (no lock), so they run while the master target appends.

use crate::failure::Failure;
use rebound_journal::{Journal, Options, PointInfo, Target, volume};
use rebound_types::ErrorCode;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Space, items, disks and latest points of a retention volume.
    Inspect(Common),
    /// List the recovery points of an item with times, kinds and sizes.
    Points(Common),
    /// Write a recovery point of an item into raw disk images.
    Materialize(MaterializeArgs),
    /// Read every record and check every checksum.
    Verify(Common),
}

#[derive(clap::Args)]
pub struct Common {
    /// The retention volume (directory).
    #[arg(long)]
    volume: PathBuf,
    /// The replicated item; optional when the volume holds one item (inspect
    /// and verify cover every item when omitted).
    #[arg(long)]
    item: Option<String>,
    /// `table` (default) or `json`.
    #[arg(long, default_value = "table")]
    output: String,
}

#[derive(clap::Args)]
pub struct MaterializeArgs {
    #[command(flatten)]
    common: Common,
    /// Point id, or `latest`, `latest-processed`, `latest-app-consistent`,
    /// or `before:<unix seconds>` (latest point at or before that time).
    #[arg(long, default_value = "latest")]
    point: String,
    /// Write new sparse images `<name>.raw` for each disk into this directory.
    #[arg(long, conflicts_with = "in_place")]
    out: Option<PathBuf>,
    /// Update these existing disks in place (one per disk, in order), writing
    /// only the blocks that differ.
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    in_place: Vec<PathBuf>,
}

fn json(o: &Common) -> bool {
    o.output == "json"
}

fn items_of(c: &Common, all_by_default: bool) -> anyhow::Result<Vec<String>> {
    let items = volume::items(&c.volume)?;
    match &c.item {
        Some(i) => Ok(vec![i.clone()]),
        None if all_by_default => Ok(items),
        None if items.len() == 1 => Ok(items),
        None => Err(Failure::new(
            ErrorCode::InvalidArgument,
            format!(
                "{} items on {}: choose one with --item ({})",
                items.len(),
                c.volume.display(),
                items.join(", ")
            ),
        )
        .into()),
    }
}

fn open(c: &Common, item: &str) -> anyhow::Result<Journal> {
    Ok(Journal::open_read_only(
        &c.volume,
        item,
        Options::default(),
    )?)
}

/// `2026-11-24T20:11:24Z` from nanoseconds since the epoch.
fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A JSON scalar for a human: strings unquoted, null as "-".
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn point_json(p: &PointInfo, j: &Journal) -> serde_json::Value {
    serde_json::json!({
        "id": p.id,
        "time_ns": p.time_ns,
        "time": utc(p.time_ns),
        "kind": p.kind.name(),
        "group": p.group,
        "bytes": p.bytes,
        "usable": p.usable,
        "processed": p.processed,
        "pinned": j.pins().iter().any(|q| q.point == p.id),
    })
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Inspect(c) => inspect(c),
        Command::Points(c) => points(c),
        Command::Materialize(a) => materialize(a),
        Command::Verify(c) => verify(c),
    }
}

fn inspect(c: Common) -> anyhow::Result<ExitCode> {
    if !c.volume.is_dir() {
        return Err(Failure::new(
            ErrorCode::JournalMissing,
            format!("{}: not a directory", c.volume.display()),
        )
        .into());
    }
    let usage = volume::usage(&c.volume)?;
    let mut items = Vec::new();
    for item in items_of(&c, true)? {
        let j = open(&c, &item)?;
        let id = |p: Option<&PointInfo>| p.map(|p| p.id);
        items.push(serde_json::json!({
            "item": item,
            "disks": j.disks(),
            "usage": j.usage(),
            "base_seq": j.base_seq(),
            "last_seq": j.last_seq(),
            "points": j.points().len(),
            "latest": id(j.latest()),
            "latest_processed": id(j.latest_processed()),
            "latest_app_consistent": id(j.latest_app_consistent()),
            "oldest": j.points().first().map(|p| utc(p.time_ns)),
            "newest": j.points().last().map(|p| utc(p.time_ns)),
            "pins": j.pins(),
            "problems": j.problems(),
        }));
    }
    let doc = serde_json::json!({
        "volume": c.volume,
        "total_bytes": usage.total_bytes,
        "free_bytes": usage.free_bytes,
        "items": items,
    });
    if json(&c) {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "retention volume {}: {} MiB free of {} MiB",
        c.volume.display(),
        usage.free_bytes >> 20,
        usage.total_bytes >> 20
    );
    for it in &items {
        println!("item {}", it["item"].as_str().unwrap_or(""));
        if let Some(disks) = it["disks"].as_array() {
            for d in disks {
                println!(
                    "  disk {:<12} {:>12} bytes  base {}",
                    d["name"].as_str().unwrap_or(""),
                    d["size"],
                    d["base"].as_str().unwrap_or("")
                );
            }
        }
        let u = &it["usage"];
        println!(
            "  journal {} segments, {} bytes (+{} index); base allocated {} bytes",
            u["segments"], u["journal_bytes"], u["index_bytes"], u["base_allocated_bytes"]
        );
        println!(
            "  {} points ({} .. {}); latest {}, latest processed {}, latest app-consistent {}",
            it["points"],
            text(&it["oldest"]),
            text(&it["newest"]),
            text(&it["latest"]),
            text(&it["latest_processed"]),
            text(&it["latest_app_consistent"])
        );
        if let Some(pins) = it["pins"].as_array().filter(|p| !p.is_empty()) {
            println!("  pins: {}", serde_json::to_string(pins)?);
        }
        if let Some(pr) = it["problems"].as_array().filter(|p| !p.is_empty()) {
            println!("  PROBLEMS: {}", serde_json::to_string(pr)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn points(c: Common) -> anyhow::Result<ExitCode> {
    let item = items_of(&c, false)?.remove(0);
    let j = open(&c, &item)?;
    if json(&c) {
        let v: Vec<_> = j.points().iter().map(|p| point_json(p, &j)).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>12}  {:<20}  {:<16}  {:>12}  {:<9} group",
        "id", "time", "kind", "bytes", "state"
    );
    for p in j.points() {
        let state = if !p.usable {
            "UNUSABLE"
        } else if j.pins().iter().any(|q| q.point == p.id) {
            "pinned"
        } else if p.processed {
            "processed"
        } else {
            "latest"
        };
        println!(
            "{:>12}  {:<20}  {:<16}  {:>12}  {:<9} {}",
            p.id,
            utc(p.time_ns),
            p.kind.name(),
            p.bytes,
            state,
            p.group.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn choose(j: &Journal, spec: &str) -> anyhow::Result<u64> {
    let none = || {
        Failure::new(
            ErrorCode::PointNotFound,
            format!("no recovery point matches {spec:?}"),
        )
    };
    let p = match spec {
        "latest" => j.latest().map(|p| p.id),
        "latest-processed" => j.latest_processed().map(|p| p.id),
        "latest-app-consistent" => j.latest_app_consistent().map(|p| p.id),
        s => {
            if let Some(t) = s.strip_prefix("before:") {
                let t: u64 = t.parse().map_err(|_| {
                    Failure::new(ErrorCode::InvalidArgument, format!("bad time {t:?}"))
                })?;
                j.latest_at_or_before(t.saturating_mul(1_000_000_000))
                    .map(|p| p.id)
            } else {
                Some(s.parse().map_err(|_| {
                    Failure::new(
                        ErrorCode::InvalidArgument,
                        format!("--point {s:?}: give an id, latest, latest-processed, latest-app-consistent or before:<secs>"),
                    )
                })?)
            }
        }
    };
    Ok(p.ok_or_else(none)?)
}

fn materialize(a: MaterializeArgs) -> anyhow::Result<ExitCode> {
    let item = items_of(&a.common, false)?.remove(0);
    let j = open(&a.common, &item)?;
    let id = choose(&j, &a.point)?;
    let target = match (&a.out, a.in_place.is_empty()) {
        (Some(dir), true) => {
            std::fs::create_dir_all(dir)?;
            Target::NewFiles(
                j.disks()
                    .iter()
                    .map(|d| dir.join(format!("{}.raw", d.name)))
                    .collect(),
            )
        }
        (None, false) => Target::InPlace(a.in_place.clone()),
        _ => {
            return Err(Failure::new(
                ErrorCode::InvalidArgument,
                "give --out DIR or --in-place DISK[,DISK...]",
            )
            .into());
        }
    };
    let start = std::time::Instant::now();
    let stats = j.materialise(id, &target)?;
    let secs = start.elapsed().as_secs_f64();
    let paths = match &target {
        Target::NewFiles(p) | Target::InPlace(p) => p.clone(),
    };
    if json(&a.common) {
        let doc = serde_json::json!({"item": item, "point": id, "disks": paths, "stats": stats, "seconds": secs});
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "materialised point {id} of {item}: {} blocks ({} bytes) written{} in {secs:.2}s",
            stats.blocks_written,
            stats.bytes_written,
            if stats.blocks_compared > 0 {
                format!(", {} compared", stats.blocks_compared)
            } else {
                String::new()
            }
        );
        for p in paths {
            println!("  {}", p.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(c: Common) -> anyhow::Result<ExitCode> {
    let mut reports = Vec::new();
    let mut bad = 0usize;
    for item in items_of(&c, true)? {
        let mut j = open(&c, &item)?;
        let rep = j.verify()?;
        bad += rep.problems.len();
        if !json(&c) {
            println!(
                "item {item}: {} segments, {} records, {} bytes checked, {} problem(s)",
                rep.segments,
                rep.records,
                rep.bytes,
                rep.problems.len()
            );
            for p in &rep.problems {
                println!("  {} at byte {}: {}", p.segment, p.offset, p.what);
            }
            if let Some(u) = rep.usable_through {
                println!("  points after {u} are unusable");
            }
        }
        reports.push(serde_json::json!({"item": item, "report": rep}));
    }
    if json(&c) {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    if bad > 0 {
        return Err(Failure::new(
            ErrorCode::JournalCorrupt,
            format!("{bad} corrupt record(s) found"),
        )
        .into());
    }
    Ok(ExitCode::SUCCESS)
}
