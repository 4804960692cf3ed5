//! `opensim-chat-relay healthcheck`: the container probe of the relay's own `/healthz`. Must not:
//! talk to either peer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Why `healthcheck` failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    /// `http.listen` is empty.
    #[error("http.listen is empty: the health endpoint is off")]
    Off,
    /// No answer, or not 200.
    #[error("GET http://{addr}/healthz: {reason}")]
    Unhealthy {
        /// Where.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
}

/// `GET /healthz` on the relay's own endpoint (for Docker's `HEALTHCHECK`: slim images have no curl).
/// A wildcard `http.listen` (0.0.0.0, ::) is probed on loopback.
pub async fn healthcheck(listen: Option<SocketAddr>) -> Result<(), HealthcheckError> {
    let Some(mut addr) = listen else {
        return Err(HealthcheckError::Off);
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let unhealthy = |reason: String| HealthcheckError::Unhealthy { addr, reason };
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| unhealthy(e.to_string()))?;
    let response = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .map_err(|e| unhealthy(e.without_url().to_string()))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(unhealthy(format!("HTTP {}", response.status().as_u16())))
    }
}
