//! The start-up both simulators share: bind the listen address, serve a handler on
//! `crate::sim::http` in a task of its own, and stop it (cancel its token, wait for the task).
//!
//! It must not know what a simulator serves or when it stops: the handler and the shutdown token
//! are the simulator's (the viewer cancels its token itself when it "crashes"), and so is the
//! choice of stopping when its handle is dropped.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sim::http::{self, Reply, Request};

/// A bound listen address whose server has not started yet: the simulator learns its address
/// (for its `Host` check or its URLs) before it builds the handler.
pub(crate) struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
}

/// Binds `listen` (port 0 picks a free one); `what` names the simulator in the errors.
pub(crate) async fn bind(listen: SocketAddr, what: &str) -> anyhow::Result<Bound> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not bind the {what} to {listen}"))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("could not read the {what}'s address"))?;
    Ok(Bound { listener, addr })
}

impl Bound {
    /// The address actually bound.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `handler` on a task until `shutdown` is cancelled.
    pub(crate) fn serve<H, F>(self, handler: H, shutdown: CancellationToken) -> Server
    where
        H: Fn(Request) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Reply> + Send + 'static,
    {
        let task = tokio::spawn(http::serve(self.listener, handler, shutdown.clone()));
        Server {
            addr: self.addr,
            shutdown,
            task: Some(task),
        }
    }
}

/// A simulator's running server.
pub(crate) struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    /// `None` once [`Server::stop`] has waited for it.
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// The address it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving without waiting: the listener and every connection close soon after.
    pub(crate) fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Stops serving (open connections are closed) and waits until the server task has ended.
    pub(crate) async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            // The server task panicked: there is nothing left to stop.
            tracing::warn!(error = %error, "simulator server task failed");
        }
    }
}
