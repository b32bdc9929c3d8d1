//! `rebound workload` through `rebound agent export` onto two raw images,
//! then `rebound verify` on the images: planned mode holds, a flipped byte
//! is named, point mode catches a write issued after the point, and the
//! workload ends cleanly on SIGTERM and when the export goes away.
#![allow(clippy::unwrap_used)]

mod common;

use common::Agent;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 16 << 20;

fn rebound() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rebound"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Setup {
    dir: tempfile::TempDir,
    images: Vec<PathBuf>,
    log: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let images: Vec<PathBuf> = ["d0.img", "d1.img"]
            .iter()
            .map(|n| {
                let p = dir.path().join(n);
                std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
                p
            })
            .collect();
        let log = dir.path().join("workload.log");
        Setup { dir, images, log }
    }

    fn agent(&self) -> Agent {
        let disks: Vec<&Path> = self.images.iter().map(PathBuf::as_path).collect();
        Agent::start(
            self.dir.path(),
            &disks,
            &["--state-dir", &self.dir.path().display().to_string()],
        )
    }

    fn workload(&self, agent: &Agent, extra: &[&str]) -> Command {
        let mut cmd = rebound();
        cmd.arg("workload")
            .arg("--disk")
            .arg(agent.uri("d0.img"))
            .arg("--disk")
            .arg(agent.uri("d1.img"))
            .arg("--write-log")
            .arg(&self.log)
            .args(extra);
        cmd
    }

    fn verify(&self, extra: &[&str]) -> Output {
        let mut cmd = rebound();
        cmd.arg("verify");
        for i in &self.images {
            cmd.arg("--disk").arg(i);
        }
        cmd.arg("--write-log").arg(&self.log).args(extra);
        cmd.output().expect("run rebound verify")
    }

    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

#[test]
fn workload_then_verify_planned_and_corruption() {
    let s = Setup::new();
    let agent = s.agent();
    let out = s
        .workload(&agent, &["--writes", "300", "--inflight", "4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "workload: writing to 2 disk(s), log {}\n",
            s.log.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("300 write(s) issued, 300 acknowledged"),
        "{stdout}"
    );
    // Verify reads NBD exports too.
    let out = rebound()
        .args([
            "verify",
            "--disk",
            &agent.uri("d0.img"),
            "--disk",
            &agent.uri("d1.img"),
        ])
        .arg("--write-log")
        .arg(&s.log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    agent.stop();

    let recs = s.records();
    let issued: Vec<&serde_json::Value> = recs.iter().filter(|r| r["type"] == "issued").collect();
    assert_eq!(issued.len(), 300);
    assert_eq!(recs.iter().filter(|r| r["type"] == "acked").count(), 300);
    assert!(issued.iter().any(|r| r["disk"] == 0) && issued.iter().any(|r| r["disk"] == 1));

    let out = s.verify(&[]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("verify: OK"), "{stdout}");

    let out = s.verify(&["--output", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["writes_in_log"], 300);
    assert_eq!(report["acked_writes"], 300);
    assert_eq!(report["violations"], 0);
    assert_eq!(report["blocks_checked"], 2 * SIZE / 4096);
    assert!(report["written_blocks"].as_u64().unwrap() > 300);

    // Flip one byte of the first written block of disk 1.
    let img = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&s.images[1])
        .unwrap();
    let mut block = vec![0u8; 4096];
    let mut offset = None;
    for b in 0..SIZE / 4096 {
        img.read_exact_at(&mut block, b * 4096).unwrap();
        if block.iter().any(|&x| x != 0) {
            offset = Some(b * 4096);
            break;
        }
    }
    let offset = offset.expect("no written block on disk 1");
    block[1234] ^= 0x40;
    img.write_all_at(&block, offset).unwrap();
    drop(img);

    let out = s.verify(&[]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains(&format!(
            "disk 1 ({}) block at offset {offset} ",
            s.images[1].display()
        )),
        "{all}"
    );
    assert!(all.contains("E5003"), "{all}");
    let out = s.verify(&["--output", "json"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["first_violation"]["disk"], 1);
    assert_eq!(report["first_violation"]["offset"], offset);
    assert_eq!(report["first_violation"]["kind"], "torn");
}

#[test]
fn point_time_catches_a_write_issued_after_the_point() {
    let s = Setup::new();
    let agent = s.agent();
    let out = s
        .workload(
            &agent,
            &["--seconds", "1.5", "--rate", "50", "--inflight", "2"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("stopped (time)"), "{stdout}");
    agent.stop();

    let recs = s.records();
    let issued: Vec<&serde_json::Value> = recs.iter().filter(|r| r["type"] == "issued").collect();
    assert!(issued.len() > 20, "only {} writes", issued.len());
    // The last write issued is visible (nothing later touched its blocks).
    // Last by issue time, not by id: two writers may take ids and
    // timestamps in different orders.
    let last = issued
        .iter()
        .max_by_key(|r| r["t_issued"].as_u64().unwrap())
        .unwrap();
    let t = last["t_issued"].as_u64().unwrap() - 1;
    let out = s.verify(&["--point-time", &t.to_string()]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("write issued after the point visible"),
        "{all}"
    );
    assert!(
        all.contains(&format!("found write {}", last["id"])),
        "{all}"
    );

    // After every acknowledgement, the point is the final state: it holds.
    let t_end = recs
        .iter()
        .filter_map(|r| r["t_acked"].as_u64())
        .max()
        .unwrap()
        + 1;
    let out = s.verify(&["--point-time", &t_end.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    // Planned mode holds too.
    let out = s.verify(&[]);
    assert!(out.status.success(), "{}", text(&out));

    // A new epoch after the point t_end (nothing voided: it is after every
    // write): epoch 1 writes follow, planned mode still holds, and the
    // point t_end now sees the epoch 1 writes as issued after it.
    let agent = s.agent();
    let out = s
        .workload(
            &agent,
            &["--after-point", &t_end.to_string(), "--writes", "50"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("workload: epoch 1,"),
        "{}",
        text(&out)
    );
    agent.stop();
    let recs = s.records();
    assert!(
        recs.iter()
            .any(|r| r["type"] == "epoch" && r["epoch"] == 1 && r["cut_ns"] == t_end)
    );
    assert_eq!(
        recs.iter()
            .filter(|r| r["type"] == "issued" && r["epoch"] == 1)
            .count(),
        50
    );
    let out = s.verify(&[]);
    assert!(out.status.success(), "{}", text(&out));
    let out = s.verify(&["--point-time", &t_end.to_string()]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
}

#[test]
fn workload_stops_on_sigterm_and_on_disconnect() {
    let s = Setup::new();
    let agent = s.agent();
    // SIGTERM: a clean stop, exit 0, the log continues on the next run.
    let mut child = s
        .workload(&agent, &["--rate", "100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(
        first.starts_with("workload: writing to 2 disk(s)"),
        "{first}"
    );
    std::thread::sleep(Duration::from_millis(700));
    let st = common::signal_and_wait(child, rustix::process::Signal::TERM);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(st.success(), "workload exited {st}: {rest}");
    assert!(rest.contains("stopped (signal)"), "{rest}");
    let before = s.records();
    let max_id = before
        .iter()
        .filter_map(|r| r["id"].as_u64())
        .max()
        .unwrap();

    // The export goes away while the workload runs: with
    // --tolerate-disconnect it ends with status 0, ids continuing.
    let child = s
        .workload(&agent, &["--rate", "100", "--tolerate-disconnect"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    agent.stop();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("stopped (disconnected)"), "{all}");
    assert!(all.contains("went away"), "{all}");
    let after = s.records();
    let first_new = after[before.len()..]
        .iter()
        .filter(|r| r["type"] == "issued")
        .filter_map(|r| r["id"].as_u64())
        .min()
        .unwrap();
    assert_eq!(first_new, max_id + 1);

    // What was acknowledged is on the images.
    let out = s.verify(&[]);
    assert!(out.status.success(), "{}", text(&out));

    // Without --tolerate-disconnect, a dead export is a coded error.
    let agent = s.agent();
    let uri = agent.uri("d0.img");
    drop(agent);
    let out = rebound()
        .args(["workload", "--disk", &uri, "--write-log"])
        .arg(s.dir.path().join("other.log"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
}

/// The workload and verify against qemu-nbd (skipped when it is missing).
#[test]
fn workload_against_qemu_nbd() {
    let Some(qemu) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("qemu-nbd"))
            .find(|p| p.is_file())
    }) else {
        eprintln!("skipping: qemu-nbd is not installed (Debian package qemu-utils)");
        return;
    };
    let s = Setup::new();
    let sock = s.dir.path().join("qemu.sock");
    let mut child = Command::new(qemu)
        .args(["-f", "raw", "-x", "d0", "--persistent", "-e", "8", "-k"])
        .arg(&sock)
        .arg(&s.images[0])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("qemu-nbd exited early: {st}");
        }
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///d0?socket={}", sock.display());
    let out = rebound()
        .args(["workload", "--disk", &uri, "--writes", "200", "--write-log"])
        .arg(&s.log)
        .output()
        .unwrap();
    let st = common::signal_and_wait(child, rustix::process::Signal::TERM);
    assert!(out.status.success(), "{}", text(&out));
    assert!(st.success() || st.code().is_none(), "qemu-nbd: {st}");
    let out = rebound()
        .args(["verify", "--disk"])
        .arg(&s.images[0])
        .arg("--write-log")
        .arg(&s.log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}
