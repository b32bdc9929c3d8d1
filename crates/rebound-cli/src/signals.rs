//! Clean stops for long-running commands (agent, configuration server), and
//! quiet ends for listing commands whose reader went away.

/// For commands whose output is meant for pipes (`rebound items | head -1`):
/// end quietly when the reader goes away, as Unix tools do, instead of
/// panicking in `println!` on EPIPE. Only for commands that write to no
/// socket with plain write(2) (TCP sends use MSG_NOSIGNAL): such a socket's
/// peer closing would kill the process instead of giving a coded error.
pub fn end_quietly_on_closed_stdout() {
    // SAFETY: called at the start of main, before any thread exists, and
    // SIG_DFL is a valid disposition for SIGPIPE; nothing else here sets it.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Register the SIGTERM and SIGINT handlers now, before the command says it is
/// ready: a signal sent as soon as it listens must stop it cleanly, not kill
/// it. The returned future ends when either signal arrives. Needs a tokio
/// runtime with signals enabled.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// For commands that run on threads: a flag set when SIGTERM or SIGINT
/// arrives. The handlers are registered before this returns.
pub fn shutdown_flag() -> std::io::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signal = {
        let _e = rt.enter();
        shutdown_signal()?
    };
    let f = flag.clone();
    std::thread::spawn(move || {
        rt.block_on(signal);
        f.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    Ok(flag)
}
