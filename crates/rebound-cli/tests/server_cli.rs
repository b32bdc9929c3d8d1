#![allow(clippy::unwrap_used)]
//! `rebound server …` and the client commands, through the real binary
//! against a real server process on loopback.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

fn rebound(args: &[&str], server: &str, token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rebound"));
    cmd.args(args)
        .env("REBOUND_SERVER", server)
        .env_remove("REBOUND_TOKEN")
        .env_remove("REBOUND_TOKEN_FILE")
        .env_remove("DATABASE_URL");
    if let Some(t) = token {
        cmd.env("REBOUND_TOKEN", t);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `server init`: (admin token, registration key) from its output.
fn init(dir: &Path) -> (String, String) {
    let o = rebound(
        &["server", "init", "--data-dir", dir.to_str().unwrap()],
        "",
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let field = |label: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(label))
            .map(|v| v.trim().to_string())
            .unwrap()
    };
    (field("admin token:"), field("registration key:"))
}

struct Running(Child, String);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(dir: &Path) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rebound"))
        .args([
            "server",
            "run",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("DATABASE_URL")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("server printed its address").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().trim_end_matches("/api/v1").to_string();
        }
    };
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    Running(child, url)
}

#[test]
fn server_init_run_and_client_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (admin, key) = init(dir.path());
    assert!(admin.starts_with("rbt_") && key.starts_with("rbk_"));
    // A second init refuses, with its code.
    let o = rebound(
        &["server", "init", "--data-dir", dir.path().to_str().unwrap()],
        "",
        None,
    );
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("E4028"), "{}", stderr(&o));

    let srv = run(dir.path());
    let url_owned = srv.1.clone();
    let url = url_owned.as_str();

    // No token, a wrong token: coded errors, exit 3.
    let o = rebound(&["items"], url, None);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("E1008"), "{}", stderr(&o));
    let o = rebound(&["items"], url, Some("rbt_wrong"));
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("E4001"), "{}", stderr(&o));
    assert!(stderr(&o).contains("remedy:"), "{}", stderr(&o));

    let t = Some(admin.as_str());
    for (name, role) in [("onprem", "primary"), ("cloud", "recovery")] {
        let o = rebound(&["sites", "add", name, "--role", role], url, t);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = rebound(&["sites", "--output", "json"], url, t);
    assert!(o.status.success(), "{}", stderr(&o));
    let sites: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(sites.as_array().unwrap().len(), 2);

    // Tokens: a viewer token reads but cannot act; revoked, it is refused.
    let o = rebound(
        &[
            "tokens", "--output", "json", "create", "auditor", "--scope", "viewer",
        ],
        url,
        t,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let tok: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let viewer = tok["token"].as_str().unwrap().to_string();
    let viewer_id = tok["id"].as_str().unwrap().to_string();
    let o = rebound(&["sites"], url, Some(&viewer));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = rebound(
        &["sites", "add", "x", "--role", "primary"],
        url,
        Some(&viewer),
    );
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("E4002"), "{}", stderr(&o));
    let o = rebound(&["tokens"], url, t);
    assert!(stdout(&o).contains("auditor"), "{}", stdout(&o));
    let o = rebound(&["tokens", "revoke", &viewer_id], url, t);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = rebound(&["sites"], url, Some(&viewer));
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("E4001"), "{}", stderr(&o));

    let o = rebound(
        &[
            "policies",
            "add",
            "gold",
            "--rpo",
            "300",
            "--retention",
            "86400",
            "--app-consistent",
            "3600",
        ],
        url,
        t,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("gold-failback") && table.contains("900s"),
        "{table}"
    );

    let o = rebound(
        &[
            "items",
            "add",
            "vm1",
            "--disk",
            "root:1073741824:uuid-1",
            "--primary-site",
            "onprem",
            "--recovery-site",
            "cloud",
        ],
        url,
        t,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = rebound(&["items"], url, t);
    assert!(
        stdout(&o).contains("vm1") && stdout(&o).contains("unprotected"),
        "{}",
        stdout(&o)
    );
    let o = rebound(&["items", "show", "vm1"], url, t);
    assert!(
        stdout(&o).contains("allowed: enable_protection"),
        "{}",
        stdout(&o)
    );

    // Actions the state refuses, items the server does not know.
    let o = rebound(&["commit", "vm1"], url, t);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("E4008"), "{}", stderr(&o));
    let o = rebound(&["failback", "ghost"], url, t);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("E4005"), "{}", stderr(&o));
    // Prechecks: every failure listed (no agent, no such master target…).
    let o = rebound(
        &[
            "protect",
            "vm1",
            "--policy",
            "gold",
            "--process-server",
            "ps-x",
            "--master-target",
            "mt-x",
            "--datastore",
            "ds1",
            "--retention-volume",
            "/srv/retention",
        ],
        url,
        t,
    );
    assert_eq!(o.status.code(), Some(3));
    let err = stderr(&o);
    assert!(err.contains("E4021") && err.contains("E95226"), "{err}");

    let o = rebound(&["jobs", "--state", "failed", "--output", "json"], url, t);
    assert!(o.status.success(), "{}", stderr(&o));
    let jobs: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    let o = rebound(&["jobs", "watch", "job-none"], url, t);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("E4007"), "{}", stderr(&o));

    // Backup while running, restore elsewhere.
    let backup = dir.path().join("backup.db");
    let o = rebound(
        &[
            "server",
            "backup",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "-o",
            backup.to_str().unwrap(),
        ],
        "",
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let dir2 = tempfile::tempdir().unwrap();
    let o = rebound(
        &[
            "server",
            "restore",
            "--data-dir",
            dir2.path().to_str().unwrap(),
            "-i",
            backup.to_str().unwrap(),
        ],
        "",
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("(1 items)"), "{}", stdout(&o));
    drop(srv);

    // The server is unreachable now: a connection error with its code.
    let o = rebound(&["items"], url, t);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("E1106"), "{}", stderr(&o));
}

#[test]
fn listing_into_a_closed_pipe_ends_quietly() {
    // `rebound errors | head -0`: the reader is gone before the first line.
    use std::os::unix::process::ExitStatusExt;
    let out = common::output_with_closed_stdout(
        Command::new(env!("CARGO_BIN_EXE_rebound")).arg("errors"),
    );
    const SIGPIPE: i32 = 13; // on Linux
    assert_eq!(out.status.signal(), Some(SIGPIPE), "{:?}", out.status);
}
