//! Script steps of recovery plans: a command run with `/bin/sh -c` on the
//! configuration server host, in its own process group, with the plan and the
//! action in its environment. Exit status 0 finishes the step; any other
//! status, a failure to start or its timeout fails it with
//! `plan-script-failed`. The last [`TAIL_BYTES`] of its output (stdout and
//! stderr, interleaved) become the step's message. Cancelling the plan job
//! kills the whole process group; a restart never runs a script again (the
//! engine's `recover` fails the step with `job-interrupted`).

use crate::AppState;
use crate::engine::load_job;
use rebound_api::{Failure, StepState};
use rebound_control::time;
use rebound_types::ErrorCode;
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Notify;
use tracing::{info, warn};

/// How much of a script's output is kept in its step's message.
pub const TAIL_BYTES: usize = 4096;

/// How long the output of a script that exited is still read (a background
/// process it left behind may keep its pipes open).
const DRAIN: Duration = Duration::from_secs(2);

struct Entry {
    kill: Arc<Notify>,
    /// The script's process (and process group) id, once started.
    pid: Option<u32>,
}

/// The scripts running now, by plan job id.
#[derive(Clone, Default)]
pub struct Running {
    scripts: Arc<Mutex<HashMap<String, Entry>>>,
    /// Set when the server stops: a script killed then is not recorded as
    /// failed; `recover` fails its step with `job-interrupted` at the next start.
    stopping: Arc<AtomicBool>,
}

impl Running {
    fn register(&self, job_id: &str) -> Arc<Notify> {
        let kill = Arc::new(Notify::new());
        if let Ok(mut m) = self.scripts.lock() {
            m.insert(
                job_id.to_string(),
                Entry {
                    kill: kill.clone(),
                    pid: None,
                },
            );
        }
        kill
    }

    fn started(&self, job_id: &str, pid: Option<u32>) {
        if let Ok(mut m) = self.scripts.lock()
            && let Some(e) = m.get_mut(job_id)
        {
            e.pid = pid;
        }
    }

    fn remove(&self, job_id: &str) {
        if let Ok(mut m) = self.scripts.lock() {
            m.remove(job_id);
        }
    }

    /// Kill the script of this plan job, if one runs.
    pub fn kill(&self, job_id: &str) {
        let e = self.scripts.lock().ok().and_then(|mut m| m.remove(job_id));
        if let Some(e) = e {
            info!(job = %job_id, pid = e.pid, "killing the plan's running script");
            kill_group(e.pid);
            // `notify_one` keeps a permit if the runner is not waiting yet.
            e.kill.notify_one();
        }
    }

    /// The server stops: kill every running script, and record nothing.
    pub fn kill_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let all: Vec<String> = match self.scripts.lock() {
            Ok(m) => m.keys().cloned().collect(),
            Err(_) => return,
        };
        for job_id in all {
            self.kill(&job_id);
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// What a script step runs.
#[derive(Clone, Debug)]
pub struct Spec {
    pub job_id: String,
    pub index: usize,
    pub command: String,
    pub timeout: Duration,
    pub plan_id: String,
    pub plan_name: String,
    pub action: String,
}

/// Start a script step in the background; its result is written to the job
/// row and the engine is woken.
pub fn spawn(state: &AppState, spec: Spec) {
    let kill = state.scripts.register(&spec.job_id);
    let state = state.clone();
    tokio::spawn(async move {
        let job_id = spec.job_id.clone();
        let outcome = execute(&state.scripts, &spec, kill).await;
        state.scripts.remove(&job_id);
        if state.scripts.is_stopping() {
            info!(job = %job_id, "script killed as the server stops; its step is failed at the next start");
            return;
        }
        if let Err(e) = record(&state, &spec, outcome).await {
            warn!(job = %job_id, code = e.0.code, message = %e.0.message, "cannot record a script's result");
        }
        state.wake.notify_one();
    });
}

struct Outcome {
    output: String,
    /// `None` when the script succeeded, else why it failed.
    failure: Option<String>,
}

async fn record(state: &AppState, spec: &Spec, out: Outcome) -> crate::error::AppResult<()> {
    let _w = state.store.lock().await;
    let mut job = load_job(state, &spec.job_id).await?;
    if job.state.is_finished() {
        return Ok(());
    }
    let Some(step) = job.steps.get_mut(spec.index) else {
        return Ok(());
    };
    if step.state != StepState::Running {
        return Ok(());
    }
    let now = time::now();
    step.message = (!out.output.is_empty()).then_some(out.output);
    step.ended_at = Some(now.clone());
    step.updated_at = Some(now);
    match out.failure {
        None => {
            step.state = StepState::Done;
            step.percent = 100.0;
            info!(job = %spec.job_id, step = spec.index, "plan script succeeded");
        }
        Some(why) => {
            warn!(job = %spec.job_id, step = spec.index, %why, "plan script failed");
            step.state = StepState::Failed;
            step.error = Some(Failure::new(ErrorCode::PlanScriptFailed, why));
        }
    }
    state.store.put_job(&job).await?;
    Ok(())
}

#[derive(Default)]
struct Tail {
    buf: Vec<u8>,
    cut: bool,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > TAIL_BYTES {
            let extra = self.buf.len() - TAIL_BYTES;
            self.buf.drain(..extra);
            self.cut = true;
        }
    }

    fn text(&self) -> String {
        let s = String::from_utf8_lossy(&self.buf);
        let s = s.trim_end();
        if self.cut {
            format!("…{s}")
        } else {
            s.to_string()
        }
    }
}

fn read_into(
    mut r: impl AsyncRead + Unpin + Send + 'static,
    tail: Arc<Mutex<Tail>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if let Ok(mut t) = tail.lock() {
                        t.push(&chunk[..n]);
                    }
                }
            }
        }
    })
}

/// Kill every process of the script's process group.
fn kill_group(pid: Option<u32>) {
    let Some(pgid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // the group id is the script's own (it was started in a new group).
    let rc = unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            warn!(pgid, error = %e, "cannot kill a script's process group");
        }
    }
}

enum End {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    Killed,
}

async fn execute(running: &Running, spec: &Spec, kill: Arc<Notify>) -> Outcome {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&spec.command)
        .env("REBOUND_PLAN_ID", &spec.plan_id)
        .env("REBOUND_PLAN_NAME", &spec.plan_name)
        .env("REBOUND_ACTION", &spec.action)
        .env("REBOUND_JOB_ID", &spec.job_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                output: String::new(),
                failure: Some(format!("the script could not be started with /bin/sh: {e}")),
            };
        }
    };
    let pid = child.id();
    running.started(&spec.job_id, pid);
    info!(job = %spec.job_id, step = spec.index, pid, "plan script started");
    let tail = Arc::new(Mutex::new(Tail::default()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(read_into(out, tail.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(read_into(err, tail.clone()));
    }
    let end = tokio::select! {
        s = child.wait() => End::Exited(s),
        _ = tokio::time::sleep(spec.timeout) => End::TimedOut,
        _ = kill.notified() => End::Killed,
    };
    if !matches!(end, End::Exited(_)) {
        kill_group(pid);
        let _ = child.kill().await;
    }
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout(DRAIN, r).await.is_err() {
            abort.abort();
        }
    }
    let output = tail.lock().map(|t| t.text()).unwrap_or_default();
    let failure = match end {
        End::Exited(Ok(s)) if s.success() => None,
        End::Exited(Ok(s)) => Some(match s.code() {
            Some(c) => format!("the script exited with status {c}"),
            None => format!("the script was ended by a signal ({s})"),
        }),
        End::Exited(Err(e)) => Some(format!("waiting for the script failed: {e}")),
        End::TimedOut => Some(format!(
            "the script ran past its timeout of {} s and was killed",
            spec.timeout.as_secs()
        )),
        End::Killed => Some("the script was killed: its plan job was cancelled".to_string()),
    };
    Outcome { output, failure }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut t = Tail::default();
        t.push(b"hello\n");
        assert_eq!(t.text(), "hello");
        t.push(&vec![b'x'; TAIL_BYTES]);
        t.push(b"end\n");
        let s = t.text();
        assert!(s.starts_with('…'));
        assert!(s.ends_with("xend"));
        assert!(!s.contains("hello"));
    }
}
