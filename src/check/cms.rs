//! The CMS probe of `check`: logs in (the one POST `check` sends: without a token nothing else can
//! be probed), then reads the account's permissions, chat from now on, and the grid.
//!
//! Must not: POST chat, write anything else to the CMS, or show the password or the token.

use crate::check::PROBE_TIMEOUT;
use crate::check::report::CheckReport;
use crate::cms::client::{CmsEndpoint, OwnAccount};
use crate::cms::{CmsClient, CmsError};
use crate::config::{ConfigError, Settings};

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

/// Probes the CMS named in `settings.cms` with the relay's account.
pub(super) async fn check_cms(settings: &Settings, report: &mut CheckReport) {
    let cms_settings = &settings.cms;
    let mut endpoint = match CmsEndpoint::from_settings(cms_settings) {
        Ok(endpoint) => endpoint,
        Err(err) => {
            let (key, fix) = match &err {
                ConfigError::Invalid {
                    key: "cms.ca_file", ..
                } => (
                    "cms.ca_file",
                    "point cms.ca_file at a readable PEM file of the CA (or the CMS's own certificate), or leave it empty",
                ),
                _ => (
                    "cms.password",
                    "make the file readable by the relay's user and put the password in it (under systemd: LoadCredential=cms-password:… and RELAY__CMS__PASSWORD_FILE=%d/cms-password)",
                ),
            };
            report.fail(key, err.to_string(), fix);
            return;
        }
    };
    endpoint.timeout = endpoint.timeout.min(PROBE_TIMEOUT);
    let client = match CmsClient::new(endpoint) {
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
    match crate::delivery::zone_disagreement(cms_settings.timezone, &client) {
        Some(disagreement) => report.warn(
            "cms.timezone",
            disagreement,
            "set cms.timezone to the CMS's PHP zone (its php.ini date.timezone, or config.php's date_default_timezone_set)",
        ),
        None if info.expires.is_some() => report.ok(
            "cms.timezone",
            format!(
                "{} agrees with the CMS's own clock (its login answer)",
                cms_settings.timezone
            ),
        ),
        None => {}
    }
    match crate::delivery::unknown_mapped_users(&settings.mapping.users, &client).await {
        (unknown, _) if !unknown.is_empty() => report.warn(
            "mapping.users",
            crate::delivery::describe_unknown_users(&unknown),
            "point each name at an existing CMS user id, or remove it (unmapped avatars are looked up, or go out anonymous)",
        ),
        (_, Some(err)) => report.warn(
            "mapping.users",
            format!("cannot look the users up: {err}"),
            "give the account user 4 (READ) so check can verify mapping.users",
        ),
        _ if settings.mapping.users.is_empty() => {}
        _ => report.ok(
            "mapping.users",
            format!(
                "the CMS has every user of mapping.users ({})",
                settings.mapping.users.len()
            ),
        ),
    }
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
