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
