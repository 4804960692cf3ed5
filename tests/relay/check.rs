//! `opensim-chat-relay check` against the simulators: all good, then each failure with its message
//! and fix, the exit code, that the viewer's chat queue is never drained, and no secret in the output.

use std::process::Stdio;

use opensim_chat_relay::sim::cms::Permissions;

use crate::helpers::{RELAY_PASSWORD, RELAY_USER, TestEnv};

/// What `check` printed and how it exited.
struct Checked {
    code: Option<i32>,
    stdout: String,
}

impl Checked {
    /// The line of check `name` (the tag, the name padded, the detail and any fix).
    fn line(&self, name: &str) -> &str {
        self.stdout
            .lines()
            .find(|line| {
                line.get(5..)
                    .is_some_and(|rest| rest.starts_with(&format!("{name} ")))
            })
            .unwrap_or_else(|| panic!("no line for {name} in:\n{}", self.stdout))
    }
}

/// The simulators' URLs and the relay account, with `extra` TOML appended; each key appears once.
fn config(env: &TestEnv, host: &str, username: &str, password: &str, extra: &str) -> String {
    let viewer = |url: String| url.replace("127.0.0.1", host);
    format!(
        "[viewer]\nchat_url = \"{}\"\nstatus_url = \"{}\"\navatars_url = \"{}\"\n\
         [cms]\nbase_url = \"{}\"\nusername = \"{username}\"\npassword = \"{password}\"\n{extra}",
        viewer(env.viewer.chat_url()),
        viewer(env.viewer.status_url()),
        viewer(env.viewer.avatars_url()),
        env.cms.base_url(),
    )
}

async fn check(env: &TestEnv, toml: &str) -> Checked {
    let file = env.dir.path().join("check.toml");
    std::fs::write(&file, toml).expect("write config");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"))
        .args(["check", "--config"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("check runs");
    Checked {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("utf-8"),
    }
}

#[tokio::test]
async fn everything_passes_against_good_peers_and_the_chat_queue_is_left_alone() {
    let env = TestEnv::start().await;
    env.lg.say("Alice Resident", "said before the check");

    let checked = check(
        &env,
        &config(&env, "127.0.0.1", RELAY_USER, RELAY_PASSWORD, ""),
    )
    .await;

    assert_eq!(checked.code, Some(0), "{}", checked.stdout);
    for name in [
        "config",
        "viewer.status",
        "viewer.avatars",
        "viewer.chat",
        "cms.login",
        "cms.timezone",
        "cms.permissions",
        "cms.chat",
        "cms.grid",
    ] {
        assert!(checked.line(name).starts_with("ok "), "{}", checked.stdout);
    }
    let chat = checked.line("viewer.chat");
    assert!(chat.contains("not fetched"), "{chat}");
    assert!(
        chat.contains("drains the viewer's one chat queue"),
        "{chat}"
    );
    assert!(checked.line("cms.permissions").contains("chat 5"));
    assert!(checked.stdout.ends_with("all checks passed\n"));
    // The line is still waiting for the relay: check never sent a chat GET.
    assert_eq!(env.lg.n_gets(), 0);
    assert_eq!(env.lg.queue_len(), 1);
    assert!(!checked.stdout.contains(RELAY_PASSWORD));
}

#[tokio::test]
async fn a_cms_timezone_that_disagrees_with_the_cms_clock_is_named_with_both_offsets() {
    // The simulated CMS runs in Europe/Amsterdam; its login answer's expires (now + 30 min in its
    // zone) shows it.
    let env = TestEnv::start().await;

    let checked = check(
        &env,
        &config(
            &env,
            "127.0.0.1",
            RELAY_USER,
            RELAY_PASSWORD,
            "timezone = \"UTC\"\n",
        ),
    )
    .await;

    let line = checked.line("cms.timezone");
    assert!(line.starts_with("WARN"), "{line}");
    assert!(line.contains("cms.timezone = UTC is UTC+00:00"), "{line}");
    assert!(line.contains("but the cms's own clock is UTC+0"), "{line}");
    assert!(line.contains("fix: set cms.timezone"), "{line}");
}

#[tokio::test]
async fn a_mapping_users_id_the_cms_does_not_have_is_named() {
    let env = TestEnv::start().await;

    let checked = check(
        &env,
        &format!(
            "{}[mapping]\nusers = {{ \"Bob Builder\" = 99 }}\n",
            config(&env, "127.0.0.1", RELAY_USER, RELAY_PASSWORD, "")
        ),
    )
    .await;

    let line = checked.line("mapping.users");
    assert!(line.starts_with("WARN"), "{line}");
    assert!(line.contains("\"Bob Builder\" = 99"), "{line}");
}

#[tokio::test]
async fn a_wrong_password_fails_the_login_with_the_cms_message_and_a_fix() {
    let env = TestEnv::start().await;

    let checked = check(
        &env,
        &config(&env, "127.0.0.1", RELAY_USER, "wrong-password-77", ""),
    )
    .await;

    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    let login = checked.line("cms.login");
    assert!(login.starts_with("FAIL"), "{login}");
    assert!(
        login.contains("Invalid username/password combination used"),
        "{login}"
    );
    assert!(login.contains("fix: check cms.password"), "{login}");
    assert!(!checked.stdout.contains("wrong-password-77"));
    assert!(checked.line("viewer.status").starts_with("ok "));
}

#[tokio::test]
async fn an_account_without_chat_execute_fails_the_permission_check() {
    let env = TestEnv::start().await;
    env.db.add_user(
        "readonly",
        "readonly-password",
        "Read",
        "Only",
        Permissions {
            chat: 4,
            ..Permissions::relay()
        },
    );

    let checked = check(
        &env,
        &config(&env, "127.0.0.1", "readonly", "readonly-password", ""),
    )
    .await;

    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    let permissions = checked.line("cms.permissions");
    assert!(permissions.starts_with("FAIL"), "{permissions}");
    assert!(
        permissions.contains("chat is 4, needs ≥ 5"),
        "{permissions}"
    );
    assert!(
        permissions.contains("fix: raise them in the CMS"),
        "{permissions}"
    );
    assert!(checked.line("cms.login").starts_with("ok "));
}

#[tokio::test]
async fn an_account_without_user_read_cannot_read_itself_and_is_told_why() {
    let env = TestEnv::start().await;
    env.db.add_user(
        "nouser",
        "nouser-password",
        "No",
        "User",
        Permissions {
            user: 0,
            ..Permissions::relay()
        },
    );

    let checked = check(
        &env,
        &config(&env, "127.0.0.1", "nouser", "nouser-password", ""),
    )
    .await;

    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    let permissions = checked.line("cms.permissions");
    assert!(permissions.starts_with("FAIL"), "{permissions}");
    assert!(permissions.contains("lacks user ≥ 4"), "{permissions}");
    assert!(permissions.contains("bound the token to"), "{permissions}");
    // Reading chat works, which rules out the address binding for this account.
    assert!(checked.line("cms.chat").starts_with("ok "));
}

#[tokio::test]
async fn an_unknown_grid_fails_with_the_grid_id() {
    let env = TestEnv::start().await;

    let checked = check(
        &env,
        &config(
            &env,
            "127.0.0.1",
            RELAY_USER,
            RELAY_PASSWORD,
            "grid_id = 7\n",
        ),
    )
    .await;

    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    let grid = checked.line("cms.grid");
    assert!(grid.starts_with("FAIL"), "{grid}");
    assert!(grid.contains("grid 7 does not exist"), "{grid}");
    assert!(grid.contains("fix: set cms.grid_id"), "{grid}");
}

#[tokio::test]
async fn the_wrong_viewer_host_is_reported_as_invalid_host_with_the_fix() {
    let env = TestEnv::start().await;

    let checked = check(
        &env,
        &config(&env, "localhost", RELAY_USER, RELAY_PASSWORD, ""),
    )
    .await;

    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    let status = checked.line("viewer.status");
    assert!(status.starts_with("FAIL"), "{status}");
    assert!(status.contains("400 \"Invalid host\""), "{status}");
    assert!(
        status.contains("fix: use http://127.0.0.1:9144"),
        "{status}"
    );
    assert!(checked.line("viewer.chat").starts_with("FAIL"));
    assert!(checked.line("cms.login").starts_with("ok "));
    assert_eq!(env.lg.n_gets(), 0);
}

#[tokio::test]
async fn a_viewer_that_is_not_running_is_reported_with_the_port_to_check() {
    let env = TestEnv::start().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let toml = format!(
        "[viewer]\nchat_url = \"http://127.0.0.1:{port}/api/chat\"\nstatus_url = \"http://127.0.0.1:{port}/api/LLLP/status\"\navatars_url = \"\"\n\
         [cms]\nbase_url = \"{}\"\nusername = \"{RELAY_USER}\"\npassword = \"{RELAY_PASSWORD}\"\n",
        env.cms.base_url()
    );

    let checked = check(&env, &toml).await;

    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    let status = checked.line("viewer.status");
    assert!(status.contains("nothing answers"), "{status}");
    assert!(status.contains("RestManager.Port"), "{status}");
}

#[tokio::test]
async fn an_invalid_configuration_fails_before_probing_anything() {
    let env = TestEnv::start().await;

    let checked = check(&env, "[viewer]\npoll_interval = \"0s\"\n").await;

    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    let config = checked.line("config");
    assert!(config.starts_with("FAIL"), "{config}");
    assert!(config.contains("viewer.poll_interval"), "{config}");
    assert_eq!(env.db.requests().len(), 0);
}

#[tokio::test]
async fn with_two_regions_each_regions_viewer_is_probed_and_named() {
    // Arrange: Welcome's viewer runs (logged in to Welcome); Sandbox's viewer does not.
    let env = TestEnv::start().await;
    env.lg.start_in_region("Welcome");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let toml = format!(
        "[cms]\nbase_url = \"{}\"\nusername = \"{RELAY_USER}\"\npassword = \"{RELAY_PASSWORD}\"\n\
         [[regions]]\nname = \"Welcome\"\nchat_url = \"{}\"\nstatus_url = \"{}\"\navatars_url = \"{}\"\n\
         [[regions]]\nname = \"Sandbox\"\nchat_url = \"http://127.0.0.1:{port}/api/chat\"\nstatus_url = \"http://127.0.0.1:{port}/api/LLLP/status\"\navatars_url = \"\"\n",
        env.cms.base_url(),
        env.viewer.chat_url(),
        env.viewer.status_url(),
        env.viewer.avatars_url(),
    );

    // Act
    let checked = check(&env, &toml).await;

    // Assert: Welcome's probes pass and say so; Sandbox's status fails naming the region and the
    // port to check; the exit code says a check failed; the chat queue was left alone.
    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    let status: Vec<&str> = checked
        .stdout
        .lines()
        .filter(|line| {
            line.get(5..)
                .is_some_and(|rest| rest.starts_with("viewer.status "))
        })
        .collect();
    assert_eq!(status.len(), 2, "{}", checked.stdout);
    assert!(
        status[0].starts_with("ok ") && status[0].contains("Welcome"),
        "{}",
        checked.stdout
    );
    assert!(
        status[1].starts_with("FAIL") && status[1].contains("Sandbox"),
        "{}",
        checked.stdout
    );
    assert!(status[1].contains("nothing answers"), "{}", status[1]);
    let region = checked.line("viewer.region");
    assert!(
        region.starts_with("ok ") && region.contains("Welcome"),
        "{region}"
    );
    assert_eq!(env.lg.n_gets(), 0);
}
