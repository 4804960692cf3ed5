//! Process signals: SIGINT and SIGTERM → a `CancellationToken`; SIGXFSZ is caught so that a write
//! past a file size limit fails like a full disk instead of killing the relay. Knows nothing of the
//! components.

use tokio_util::sync::CancellationToken;

/// A token cancelled at the first SIGINT or SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        cancel.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the relay");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Catches SIGXFSZ for the rest of the process's life. Its default action kills the process when a
/// write passes `RLIMIT_FSIZE` (systemd's `LimitFSIZE=`, a shell's `ulimit -f`); caught, the write
/// fails with EFBIG instead and the outbox treats it as a full disk (polling pauses, nothing read is
/// lost, writing resumes when the limit allows it). Needs a running tokio runtime.
pub fn catch_file_size_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
            Ok(mut xfsz) => {
                tokio::spawn(async move {
                    while xfsz.recv().await.is_some() {
                        tracing::debug!("SIGXFSZ received: a write passed the file size limit");
                    }
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot catch SIGXFSZ; a file size limit would kill the relay")
            }
        }
    }
}
