//! Clean stops for long-running commands (agent, configuration server).

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
