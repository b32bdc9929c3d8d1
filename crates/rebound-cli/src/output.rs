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
