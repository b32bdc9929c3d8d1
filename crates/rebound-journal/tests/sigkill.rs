//! Real crash test: a child process appends in a loop and is killed with
//! SIGKILL at random moments; the journal must reopen with every acknowledged
//! point intact and every listed point exactly equal to the model.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use rebound_journal::Journal;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[path = "../src/bin/rebound-journal-writer.rs"]
#[allow(dead_code)]
mod writer;

fn replay(upto: u64) -> Vec<u8> {
    let mut disk = vec![0u8; 64 * 4096];
    for i in 0..=upto {
        for w in writer::changeset(i).writes {
            disk[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
        }
    }
    disk
}

#[test]
fn sigkill_while_appending() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path();
    let mut last_acked = 0u64;
    for round in 0..4u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rebound-journal-writer"))
            .args([vol.to_str().unwrap(), "vm", "100000", "65536"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Kill after a varying number of acknowledgements.
        let want = 60 + round * 37;
        let mut seen = 0;
        while seen < want {
            let line = lines.next().expect("child ended early").unwrap();
            let mut it = line.split_whitespace().skip(1);
            let i: u64 = it.next().unwrap().parse().unwrap();
            let p: u64 = it.next().unwrap().parse().unwrap();
            assert_eq!(p, 2 * i + 2);
            last_acked = p;
            seen += 1;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let j = Journal::open(vol, "vm", common::real(65536)).unwrap();
        assert!(j.problems().is_empty(), "{:?}", j.problems());
        assert!(
            j.last_seq() >= last_acked,
            "acknowledged point {last_acked} lost (last {})",
            j.last_seq()
        );
        assert!(j.point(last_acked).is_ok());
        assert!(j.points().iter().all(|p| p.usable));
        let pts: Vec<u64> = j.points().iter().map(|p| p.id).collect();
        // Contiguous: every changeset after the base is there.
        for w in pts.windows(2) {
            assert_eq!(w[1], w[0] + 2);
        }
        // The oldest, the newest and a sample in between match the model.
        let mut check: Vec<u64> = pts.iter().step_by(7).copied().collect();
        check.push(*pts.last().unwrap());
        for id in check {
            let v = j.view(id).unwrap();
            assert!(
                common::read_view(&v, 0) == replay(id / 2 - 1),
                "point {id} differs from the model"
            );
        }
    }
}
