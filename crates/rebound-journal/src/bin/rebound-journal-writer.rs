//! Test helper for the SIGKILL crash test: appends deterministic changesets
//! to one item's journal in a loop, one crash-consistent point each, and
//! prints `acked <i> <point>` once each point is durable. Resumes after the
//! last complete changeset when restarted. Usage: VOLUME ITEM COUNT SEGMENT_BYTES

use rebound_journal::{Changeset, DiskSpec, Journal, Options, PointKind};
use std::io::Write;
use std::path::PathBuf;

/// Content of changeset `i`: 1 to 3 blocks at a pseudo-random place.
pub fn changeset(i: u64) -> Changeset {
    let blocks = 1 + (i % 3) as usize;
    let at = (i * 37) % (64 - 3);
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = vec![0u8; blocks * 4096];
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    Changeset::new()
        .write(0, at * 4096, data)
        .at(1_000_000_000 * (i + 1))
        .point(PointKind::CrashConsistent)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: rebound-journal-writer VOLUME ITEM COUNT SEGMENT_BYTES".into());
    }
    let volume = PathBuf::from(&args[1]);
    let count: u64 = args[3].parse()?;
    let opts = Options {
        segment_bytes: args[4].parse()?,
        ..Options::default()
    };
    let mut j = match Journal::open(&volume, &args[2], opts.clone()) {
        Ok(j) => j,
        Err(rebound_journal::JournalError::Missing { .. }) => {
            let disk = DiskSpec {
                name: "d0".into(),
                size: 64 * 4096,
                base: None,
            };
            Journal::create(&volume, &args[2], &[disk], opts)?
        }
        Err(e) => return Err(e.into()),
    };
    // Every changeset is one write record and one commit: point of i is 2i+2.
    let start = j.last_seq() / 2;
    let mut out = std::io::stdout().lock();
    for i in start..start + count {
        let a = j.append(&changeset(i))?;
        if i % 40 == 39 {
            // Retention: keep the last 20 changesets' worth of time.
            j.fold(1_000_000_000 * (i + 1), 20_000_000_000)?;
        }
        writeln!(out, "acked {i} {}", a.point.unwrap_or(0))?;
        out.flush()?;
    }
    Ok(())
}
