//! `opensim-chat-relay check`: probes both peers with the real configuration and says, one line per
//! check, what works and how to fix what does not; and `healthcheck`, the container probe of
//! `/healthz`.
//!
//! Must not: GET the viewer's chat URL (every GET drains the viewer's one chat queue, so a probe would
//! steal chat from the running relay), send HEAD or OPTIONS to the viewer (never answered), POST
//! anything to either peer, or print the password or the token.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::cms::client::{CmsEndpoint, OwnAccount};
use crate::cms::{CmsClient, CmsError};
use crate::config::{ConfigError, Settings};
use crate::lookingglass::{LookingGlassClient, ViewerError};

/// How long a probe waits for an answer. The viewer never answers an unknown path, so a wrong
/// status or avatars URL shows up as this timeout.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The CMS levels the relay's account needs (spec §2.4): module, level, why.
pub const NEEDED_PERMISSIONS: [(&str, i64, &str); 3] = [
    ("auth", 4, "to log in"),
    (
        "chat",
        5,
        "EXECUTE, to post chat (the CMS docs' WRITE is wrong)",
    ),
    ("user", 4, "READ, to map avatars to CMS users"),
];

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It works.
    Ok,
    /// It works, but something deserves a look (not counted as a failure).
    Warn,
    /// It does not work: the relay will not relay (or not fully).
    Fail,
}

/// One check's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    /// Short dotted name, e.g. `cms.login`.
    pub name: &'static str,
    /// How it came out.
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do about it (for failures and warnings).
    pub fix: Option<String>,
}

/// Every line of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// In the order the checks ran.
    pub lines: Vec<CheckLine>,
}

impl CheckReport {
    /// Whether nothing failed (warnings allowed).
    pub fn passed(&self) -> bool {
        self.lines.iter().all(|l| l.outcome != Outcome::Fail)
    }

    /// The line named `name`, if that check ran.
    pub fn line(&self, name: &str) -> Option<&CheckLine> {
        self.lines.iter().find(|l| l.name == name)
    }

    fn push(&mut self, name: &'static str, outcome: Outcome, detail: String, fix: Option<String>) {
        self.lines.push(CheckLine {
            name,
            outcome,
            detail,
            fix,
        });
    }

    fn ok(&mut self, name: &'static str, detail: impl Into<String>) {
        self.push(name, Outcome::Ok, detail.into(), None);
    }

    fn warn(&mut self, name: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Outcome::Warn, detail.into(), Some(fix.into()));
    }

    fn fail(&mut self, name: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Outcome::Fail, detail.into(), Some(fix.into()));
    }

    /// The report for a configuration that does not load: nothing else can be checked.
    pub fn config_failed(err: &ConfigError) -> CheckReport {
        let mut report = CheckReport::default();
        report.fail(
            "config",
            err.to_string(),
            "correct the key named above in the file or the RELAY__… variable (check-config shows the effective values)",
        );
        report
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.lines {
            let tag = match line.outcome {
                Outcome::Ok => "ok  ",
                Outcome::Warn => "WARN",
                Outcome::Fail => "FAIL",
            };
            write!(f, "{tag} {:<15} {}", line.name, line.detail)?;
            if let Some(fix) = &line.fix {
                write!(f, " | fix: {fix}")?;
            }
            writeln!(f)?;
        }
        let n_failed = self
            .lines
            .iter()
            .filter(|l| l.outcome == Outcome::Fail)
            .count();
        match n_failed {
            0 => write!(f, "all checks passed"),
            1 => write!(f, "1 check failed"),
            n => write!(f, "{n} checks failed"),
        }
    }
}

/// Runs every check against the peers named in `settings` (already loaded and validated).
pub async fn run(settings: &Settings) -> CheckReport {
    let mut report = CheckReport::default();
    report.ok("config", "loaded and valid");
    check_viewer(settings, &mut report).await;
    check_cms(settings, &mut report).await;
    report
}

// ---------------------------------------------------------------------------------------------
// Viewer
// ---------------------------------------------------------------------------------------------

async fn check_viewer(settings: &Settings, report: &mut CheckReport) {
    let viewer = &settings.viewer;
    let client = match LookingGlassClient::new(
        viewer.chat_url.clone(),
        viewer.avatars_url.clone(),
        viewer.status_url.clone(),
        PROBE_TIMEOUT,
    ) {
        Ok(client) => client,
        Err(err) => {
            report.fail(
                "viewer",
                format!("cannot build an HTTP client: {err}"),
                "this is a bug or a broken TLS setup; report it",
            );
            return;
        }
    };
    let chat_origin = host_port(&viewer.chat_url);
    // Whether a probe reached the chat URL's host and port and the viewer accepted the Host header.
    let mut origin_answered = None;
    if let Some(url) = &viewer.status_url {
        match client.own_name().await {
            Ok(Some(name)) => {
                report.ok(
                    "viewer.status",
                    format!("{url} answers; the viewer is logged in as {name:?} (its own lines are not relayed)"),
                );
            }
            Ok(None) => report.warn(
                "viewer.status",
                format!("{url} answers, but the viewer is not logged in to a region"),
                "log the viewer's avatar in; until then there is no chat to relay",
            ),
            Err(err) => fail_viewer(report, "viewer.status", url, &err),
        }
        let answered = report
            .line("viewer.status")
            .is_some_and(|l| l.outcome != Outcome::Fail);
        if host_port(url) == chat_origin {
            origin_answered = Some(answered || origin_answered.unwrap_or(false));
        }
    }
    if let Some(url) = &viewer.avatars_url {
        match client.avatars().await {
            Ok(avatars) => report.ok(
                "viewer.avatars",
                format!("{url} answers; {} avatars in view", avatars.len()),
            ),
            Err(err) => fail_viewer(report, "viewer.avatars", url, &err),
        }
        let answered = report
            .line("viewer.avatars")
            .is_some_and(|l| l.outcome != Outcome::Fail);
        if host_port(url) == chat_origin {
            origin_answered = Some(answered || origin_answered.unwrap_or(false));
        }
    }
    let not_fetched = format!(
        "{} not fetched: every GET drains the viewer's one chat queue, so a probe would take chat away from the running relay",
        viewer.chat_url
    );
    match origin_answered {
        Some(true) => report.ok(
            "viewer.chat",
            format!(
                "{not_fetched}; its host and port answered the probes above with the Host header accepted"
            ),
        ),
        Some(false) => report.fail(
            "viewer.chat",
            format!("{not_fetched}; its host and port failed the probes above"),
            "fix the viewer failures above: the chat URL shares their host and port",
        ),
        None => chat_by_tcp(&viewer.chat_url, &not_fetched, report).await,
    }
}

/// No status or avatars URL on the chat URL's host and port: only a TCP connection can be tried.
async fn chat_by_tcp(chat_url: &str, not_fetched: &str, report: &mut CheckReport) {
    let Some((host, port)) = host_port(chat_url) else {
        report.fail(
            "viewer.chat",
            format!("{chat_url} has no host"),
            "set viewer.chat_url to http://127.0.0.1:9144/api/chat",
        );
        return;
    };
    let connect = tokio::net::TcpStream::connect((host.as_str(), port));
    match tokio::time::timeout(PROBE_TIMEOUT, connect).await {
        Ok(Ok(_)) => report.warn(
            "viewer.chat",
            format!("{not_fetched}; {host}:{port} accepts connections"),
            "set viewer.status_url on the same host and port (…/api/LLLP/status) so check can verify the Host header too",
        ),
        Ok(Err(err)) => report.fail(
            "viewer.chat",
            format!("{not_fetched}; nothing accepts connections on {host}:{port}: {err}"),
            "start the viewer; check RestManager.Port in the viewer's LookingGlass.json against viewer.chat_url",
        ),
        Err(_) => report.fail(
            "viewer.chat",
            format!("{not_fetched}; no connection to {host}:{port} within {PROBE_TIMEOUT:?}"),
            "check the host in viewer.chat_url and any firewall between the relay and the viewer",
        ),
    }
}

fn fail_viewer(report: &mut CheckReport, name: &'static str, url: &str, err: &ViewerError) {
    let host = host_port(url).map_or_else(String::new, |(h, p)| format!("{h}:{p}"));
    match err {
        ViewerError::Status { status: 400, .. } if err.to_string().contains("Invalid host") => {
            report.fail(
                name,
                format!("{url}: the viewer answered 400 \"Invalid host\": it accepts only the host it listens on, not {host}"),
                "use http://127.0.0.1:9144 (the viewer's RestManager.BaseURL and Port), not localhost or the machine's name, in viewer.chat_url, viewer.status_url and viewer.avatars_url",
            )
        }
        ViewerError::Transport(source) if is_timeout(source) => report.fail(
            name,
            format!("{url}: no answer within {PROBE_TIMEOUT:?}: the viewer never answers a path it does not serve"),
            "check the path (LookingGlass: /api/LLLP/status and /api/avatars); a viewer in Radegast plugin mode serves no chat API",
        ),
        ViewerError::Transport(_) => report.fail(
            name,
            format!("{url}: nothing answers on {host}: {err}"),
            "start the viewer (LookingGlass) on this machine; check RestManager.Port in its LookingGlass.json against the URL",
        ),
        ViewerError::Status { .. } | ViewerError::Decode { .. } => report.fail(
            name,
            format!("{url}: {err}"),
            "check that the URL points at a LookingGlass viewer's REST interface",
        ),
    }
}

fn is_timeout(err: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(cause) = source {
        if cause.to_string().contains("timed out") {
            return true;
        }
        source = cause.source();
    }
    err.is_timeout()
}

fn host_port(url: &str) -> Option<(String, u16)> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?.to_owned();
    Some((host, parsed.port_or_known_default()?))
}

// ---------------------------------------------------------------------------------------------
// CMS
// ---------------------------------------------------------------------------------------------

async fn check_cms(settings: &Settings, report: &mut CheckReport) {
    let cms_settings = &settings.cms;
    let password = match cms_settings.load_password() {
        Ok(password) => password,
        Err(err) => {
            report.fail(
                "cms.password",
                err.to_string(),
                "make the file readable by the relay's user and put the password in it (under systemd: LoadCredential=cms-password:… and RELAY__CMS__PASSWORD_FILE=%d/cms-password)",
            );
            return;
        }
    };
    let ca_certificates = match cms_settings.load_ca_certificates() {
        Ok(certificates) => certificates,
        Err(err) => {
            report.fail(
                "cms.ca_file",
                err.to_string(),
                "point cms.ca_file at a readable PEM file of the CA (or the CMS's own certificate), or leave it empty",
            );
            return;
        }
    };
    let client = match CmsClient::new(CmsEndpoint {
        base_url: cms_settings.base_url.clone(),
        grid_id: cms_settings.grid_id,
        username: cms_settings.username.clone(),
        password,
        timeout: cms_settings.request_timeout.min(PROBE_TIMEOUT),
        max_response_bytes: cms_settings.max_response_bytes,
        ca_certificates,
    }) {
        Ok(client) => client,
        Err(err) => {
            report.fail(
                "cms",
                format!("cannot build an HTTP client: {err}"),
                "this is a bug or a broken TLS setup; report it",
            );
            return;
        }
    };
    let base_url = crate::health::without_userinfo(&cms_settings.base_url);
    let username = &cms_settings.username;
    if let Err(err) = client.login().await {
        let fix = login_fix(&err, &base_url);
        report.fail(
            "cms.login",
            format!("as {username:?} at {base_url}: {err}"),
            fix,
        );
        return;
    }
    let info = client.login_info();
    let bound = info
        .ip
        .as_deref()
        .map_or_else(String::new, |ip| format!("; the token is bound to {ip}"));
    let user_id = info
        .user_id
        .map_or_else(String::new, |id| format!(" (user id {id})"));
    report.ok(
        "cms.login",
        format!("logged in as {username:?}{user_id} at {base_url}{bound}"),
    );
    let ip_hint = match &info.ip {
        Some(ip) => format!(
            "or the CMS bound the token to {ip} and saw this request come from another address (NAT, IPv4 vs IPv6: give cms.base_url a literal IP)"
        ),
        None => {
            "or the token is bound to another address (give cms.base_url a literal IP)".to_owned()
        }
    };
    match client.own_permissions().await {
        Ok(account) => check_permissions(&account, report),
        Err(CmsError::Unauthorized) => report.fail(
            "cms.permissions",
            format!(
                "the CMS refused GET /user/<id>/ even with a fresh token: the account lacks user ≥ 4, {ip_hint}"
            ),
            "give the account user 4 (READ), chat 5 (EXECUTE), auth 4 in the CMS user's permissions (or PUT /user/<id>/ as an admin)",
        ),
        Err(err) => report.fail(
            "cms.permissions",
            format!("cannot read the account's permissions: {err}"),
            "check that cms.base_url points at OpenSim-CMS 1.1's API",
        ),
    }
    // Reading from now on is cheap (usually no rows) and proves the token works from this address.
    match client.chats_since(chrono::Utc::now().timestamp()).await {
        Ok(_) => report.ok(
            "cms.chat",
            format!(
                "GET /grid/{}/chats/<now>/ works: the token is accepted from this address",
                cms_settings.grid_id
            ),
        ),
        Err(CmsError::Unauthorized) => report.fail(
            "cms.chat",
            format!("the CMS refused to read chat with a fresh token: the account lacks chat ≥ 4, {ip_hint}"),
            "give the account chat 5 (EXECUTE); if it has it, make the relay's source address stable (a literal IP in cms.base_url)",
        ),
        Err(err) => report.fail(
            "cms.chat",
            format!("reading chat failed: {err}"),
            "check the CMS's error log; the relay cannot read back batches without this",
        ),
    }
    let grid_id = cms_settings.grid_id;
    match client.grid_exists().await {
        Ok(true) => report.ok("cms.grid", format!("grid {grid_id} exists")),
        Ok(false) => report.fail(
            "cms.grid",
            format!("grid {grid_id} does not exist in the CMS"),
            "set cms.grid_id to the id of the region's grid (the CMS's Grids page, or GET /grids/)",
        ),
        Err(CmsError::Unauthorized) => report.warn(
            "cms.grid",
            format!("cannot verify that grid {grid_id} exists: the account lacks grid ≥ 4"),
            "optional: give the account grid 4 (READ) so check can verify cms.grid_id; relaying does not need it",
        ),
        Err(err) => report.fail(
            "cms.grid",
            format!("cannot read grid {grid_id}: {err}"),
            "check cms.grid_id and the CMS's error log",
        ),
    }
}

fn check_permissions(account: &OwnAccount, report: &mut CheckReport) {
    let mut missing = Vec::new();
    let mut have = Vec::new();
    for (module, needed, why) in NEEDED_PERMISSIONS {
        let level = account.permissions.get(module).copied().unwrap_or(0);
        have.push(format!("{module} {level}"));
        if level < needed {
            missing.push(format!("{module} is {level}, needs ≥ {needed} ({why})"));
        }
    }
    if missing.is_empty() {
        report.ok(
            "cms.permissions",
            format!(
                "user {} has {} (needs auth ≥ 4, chat ≥ 5, user ≥ 4)",
                account.user_id,
                have.join(", ")
            ),
        );
    } else {
        report.fail(
            "cms.permissions",
            format!("user {}: {}", account.user_id, missing.join("; ")),
            "raise them in the CMS (Users → the relay's account → permissions, or PUT /user/<id>/ as an admin); use a dedicated account, not OpenSim",
        );
    }
}

fn login_fix(err: &CmsError, base_url: &str) -> String {
    let text = err.to_string();
    let fix = if text.contains("Invalid username/password") {
        "check cms.password (or the file named by cms.password_file): the CMS does not accept it for this account"
    } else if text.contains("User not found") {
        "check cms.username: it is the CMS account's username (or e-mail), not an avatar name"
    } else if text.contains("permission to use the API") {
        "give the account auth 4 (READ) in the CMS"
    } else if text.contains("OpenSim outside the Grid") {
        "use a dedicated CMS account for the relay, not OpenSim"
    } else {
        match err {
            CmsError::Transport(_) => {
                return format!(
                    "check cms.base_url ({base_url}) and that the CMS web server is up and reachable from here"
                );
            }
            CmsError::Http { status: 404, .. } => {
                "cms.base_url must be the API root, e.g. http://cms.example.org/OpenSim-CMS/api (the .htaccess RewriteBase)"
            }
            CmsError::Http { status: 400, .. } => {
                "the CMS has no such route: check the path of cms.base_url and that mod_rewrite is on"
            }
            CmsError::Decode { .. } => {
                "the answer is not the CMS's JSON: check that cms.base_url points at OpenSim-CMS's api/, and turn SERVER_PHP_ERRORS off if PHP errors are printed"
            }
            _ => "check the CMS's error log",
        }
    };
    fix.to_owned()
}

// ---------------------------------------------------------------------------------------------
// Container health probe
// ---------------------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_ok_warn_fail_with_the_fix_on_the_same_line() {
        let mut report = CheckReport::default();
        report.ok("config", "loaded and valid");
        report.warn("cms.grid", "cannot verify", "grant grid 4");
        report.fail("cms.login", "wrong password", "check cms.password");
        let text = report.to_string();
        assert!(
            text.contains("ok   config          loaded and valid\n"),
            "{text}"
        );
        assert!(
            text.contains("FAIL cms.login       wrong password | fix: check cms.password\n"),
            "{text}"
        );
        assert!(text.ends_with("1 check failed"), "{text}");
        assert!(!report.passed());
    }

    #[test]
    fn warnings_alone_pass() {
        let mut report = CheckReport::default();
        report.warn("cms.grid", "cannot verify", "grant grid 4");
        assert!(report.passed());
    }
}
