//! The end-to-end test equal to the README's main job: `rebound demo` runs a
//! configuration server and two site nodes as real processes, a machine with
//! a live workload, and the whole lifecycle; `rebound verify` checks the
//! failed-over disks at the recovery point and the failed-back disks for
//! every acknowledged write.

use std::process::Command;

#[test]
fn demo_runs_the_whole_lifecycle_without_losing_a_write() {
    let lab = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_rebound"))
        .args(["demo", "--disk-size", "16M", "--rpo-secs", "1", "--dir"])
        .arg(lab.path())
        .output()
        .expect("running rebound demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let kept = lab.keep();
        panic!(
            "demo failed (lab kept in {}):\n{stdout}\n{stderr}",
            kept.display()
        );
    }
    for step in [
        "enable protection",
        "unplanned failover",
        "commit",
        "reprotect",
        "failback phase 1",
        "failback complete",
        "commit failback",
        "reverse replicate",
    ] {
        assert!(
            stdout.lines().any(|l| l.contains(&format!("✓ {step}"))),
            "no step {step:?} in:\n{stdout}"
        );
    }
    // Crash consistency at the failover point, then zero loss after failback.
    assert_eq!(
        stdout.matches("OK:").count(),
        2,
        "two verifications expected:\n{stdout}"
    );
    assert!(stdout.contains("downtime"), "{stdout}");
    // Nothing is left running.
    let left = Command::new("pgrep")
        .args(["-f", &lab.path().display().to_string()])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
