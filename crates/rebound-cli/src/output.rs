//! A command's result on stdout. When it is printed the outcome is already
//! decided (a sync done, disks verified) and the exit status tells it: a
//! reader that went away (`rebound sync … | head -0`) must not turn that
//! into a panic, so a closed stdout is ignored here.

use anyhow::Context;
use std::io::Write;

pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing the result to stdout"),
    }
}

/// Bytes in binary units, one decimal ("12.5 MiB"; "512 B").
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
