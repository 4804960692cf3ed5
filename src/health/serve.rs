//! The endpoint's connections: an accept loop over hyper's HTTP/1 rather than `axum::serve`, which
//! holds every connection for as long as the client likes. A client (a leaking scraper, a port
//! scanner, anyone on the host) cannot hold the port or the process's file descriptors: at most
//! `MAX_CONNECTIONS` are served at once (one more is closed as soon as it is accepted), and each
//! must send its request head within `HEADER_READ_TIMEOUT`, also the longest a kept-alive
//! connection idles. Must not: know the routes (`health`'s router is handed in).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connections served at once. A Prometheus scrape, a systemd or Docker health check and an
/// operator's curl need a handful; 64 leaves room for many scrapers and stays far below the 1,024
/// descriptors of systemd's default soft limit.
pub const MAX_CONNECTIONS: usize = 64;

/// The longest a client may take to send its request head (and a kept-alive connection may idle):
/// the endpoint's answers take milliseconds, and a local client sends its head at once.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a connection closed for the limit is logged at most (with the count since).
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// After an accept error (EMFILE: the process is out of descriptors), the pause before the next
/// accept, rather than a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `token` is cancelled, then lets each open connection finish the
/// request it is in (a head not yet sent ends within `HEADER_READ_TIMEOUT`).
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    token: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    let mut refused = Refused::default();
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "health endpoint cannot accept a connection");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: waiting in the kernel's queue it would still hold a descriptor.
            drop(stream);
            refused.count();
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let token = token.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            // A connection that fails (a head too slow, a reset) concerns its client only.
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = token.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = ended {
                tracing::debug!(error = %err, "health endpoint connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Connections closed for the limit, logged at most once every `REFUSED_LOG_INTERVAL`.
#[derive(Default)]
struct Refused {
    n_since_logged: u64,
    logged_at: Option<Instant>,
}

impl Refused {
    fn count(&mut self) {
        self.n_since_logged += 1;
        if self
            .logged_at
            .is_some_and(|at| at.elapsed() < REFUSED_LOG_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            n_closed = self.n_since_logged,
            max_connections = MAX_CONNECTIONS,
            "health endpoint at its connection limit: closing new connections (a client that opens many and never finishes them?)"
        );
        self.n_since_logged = 0;
        self.logged_at = Some(Instant::now());
    }
}
