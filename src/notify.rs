//! systemd's notification protocol (`sd_notify`): `READY=1`, `STOPPING=1`, `STATUS=…` and the
//! watchdog keep-alive `WATCHDOG=1`, written as datagrams to `$NOTIFY_SOCKET`.
//!
//! A dozen lines of `UnixDatagram` instead of a crate: the protocol is one datagram of `KEY=value`
//! lines to a path (or, with a leading `@`, an abstract socket name). Notifications are best effort:
//! a failure is logged once and never stops the relay. This module decides nothing about health:
//! the caller passes whether the loops are alive.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The socket could not be created or the datagram not sent.
    #[error("cannot notify systemd at {socket}: {source}")]
    Send {
        /// `$NOTIFY_SOCKET` as given.
        socket: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where notifications go, and how often the watchdog wants a keep-alive.
#[derive(Debug)]
pub struct Notifier {
    socket: String,
    watchdog: Option<Duration>,
    warned: AtomicBool,
}

impl Notifier {
    /// From systemd's environment: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` (ignored when
    /// `WATCHDOG_PID` names another process). `None` when not started by systemd with
    /// `Type=notify`.
    pub fn from_env() -> Option<Notifier> {
        let socket = std::env::var("NOTIFY_SOCKET").ok()?;
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us)
            .map(Duration::from_micros);
        Notifier::new(socket, watchdog)
    }

    /// To `socket` (a path, or `@name` for an abstract socket); `watchdog` is `WatchdogSec=`.
    /// `None` for an empty socket name.
    pub fn new(socket: impl Into<String>, watchdog: Option<Duration>) -> Option<Notifier> {
        let socket = socket.into();
        if socket.is_empty() {
            return None;
        }
        Some(Notifier {
            socket,
            watchdog,
            warned: AtomicBool::new(false),
        })
    }

    /// The watchdog timeout, when systemd set one.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one notification (`KEY=value` lines).
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        let failed = |source| NotifyError::Send {
            socket: self.socket.clone(),
            source,
        };
        let datagram = std::os::unix::net::UnixDatagram::unbound().map_err(failed)?;
        match self.socket.strip_prefix('@') {
            Some(name) => send_abstract(&datagram, name, state.as_bytes()).map_err(failed)?,
            None => {
                datagram
                    .send_to(state.as_bytes(), PathBuf::from(&self.socket))
                    .map_err(failed)?;
            }
        }
        Ok(())
    }

    /// Sends, logging the first failure only (systemd gone is not a reason to stop relaying).
    pub fn send_logged(&self, state: &str) {
        let Err(err) = self.send(state) else {
            return;
        };
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %err, "systemd notification failed; further failures are not logged");
        }
    }

    /// One watchdog turn: a keep-alive when `healthy`, nothing otherwise (systemd then restarts the
    /// relay once `WatchdogSec=` has passed). Returns whether a keep-alive was sent.
    pub fn keep_alive_if(&self, healthy: bool) -> bool {
        if healthy {
            self.send_logged("WATCHDOG=1");
        }
        healthy
    }

    /// Sends keep-alives every half watchdog period while `healthy()` holds, until `token` is
    /// cancelled. Returns at once when systemd set no watchdog.
    pub async fn run_watchdog(&self, healthy: impl Fn() -> bool, token: CancellationToken) {
        let Some(timeout) = self.watchdog else {
            return;
        };
        // Half the period, as sd_watchdog_enabled(3) advises: one late turn is not fatal.
        let mut interval = tokio::time::interval(timeout / 2);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut withholding = false;
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = interval.tick() => {}
            }
            let sent = self.keep_alive_if(healthy());
            if !sent && !withholding {
                tracing::error!(
                    watchdog = ?timeout,
                    "a relay loop has ended or has not come round; withholding the systemd watchdog keep-alive so the relay is restarted"
                );
            } else if sent && withholding {
                tracing::info!("relay loops healthy again; watchdog keep-alives resumed");
            }
            withholding = !sent;
        }
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(
    datagram: &std::os::unix::net::UnixDatagram,
    name: &str,
    payload: &[u8],
) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    datagram.send_to_addr(payload, &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(
    _datagram: &std::os::unix::net::UnixDatagram,
    _name: &str,
    _payload: &[u8],
) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (tempfile::TempDir, std::os::unix::net::UnixDatagram, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        socket.set_nonblocking(true).expect("nonblocking");
        (dir, socket, path.to_string_lossy().into_owned())
    }

    fn received(socket: &std::os::unix::net::UnixDatagram) -> Option<String> {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[test]
    fn a_notification_is_one_datagram_on_the_socket() {
        let (_dir, socket, path) = listener();
        let notifier = Notifier::new(path, None).expect("notifier");
        notifier.send("READY=1\nSTATUS=relaying").expect("send");
        assert_eq!(
            received(&socket).as_deref(),
            Some("READY=1\nSTATUS=relaying")
        );
    }

    #[test]
    fn no_keep_alive_is_sent_while_a_loop_is_unhealthy() {
        let (_dir, socket, path) = listener();
        let notifier = Notifier::new(path, Some(Duration::from_secs(1))).expect("notifier");
        assert!(!notifier.keep_alive_if(false));
        assert_eq!(received(&socket), None);
        assert!(notifier.keep_alive_if(true));
        assert_eq!(received(&socket).as_deref(), Some("WATCHDOG=1"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_at_sign_names_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("opensim-chat-relay-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind");
        socket.set_nonblocking(true).expect("nonblocking");
        let notifier = Notifier::new(format!("@{name}"), None).expect("notifier");
        notifier.send("STOPPING=1").expect("send");
        assert_eq!(received(&socket).as_deref(), Some("STOPPING=1"));
    }

    #[test]
    fn an_empty_socket_means_no_systemd() {
        assert!(Notifier::new("", None).is_none());
    }
}
