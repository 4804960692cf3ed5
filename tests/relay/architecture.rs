//! ARCHITECTURE.md's boundaries, read from the source as a reviewer would grep it: who imports whom,
//! who owns a dependency, and where the CMS password and the viewer's login password can be
//! reached. Code under `#[cfg(test)]` is left out (tests build their own clients).

use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, with its path relative to `src/` and its code before the first
/// `#[cfg(test)]`.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src is readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter(|path| !path.ends_with("tests.rs"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("source is readable");
            let code = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .to_owned();
            let name = path
                .strip_prefix(&root)
                .expect("under src")
                .to_string_lossy()
                .into_owned();
            (name, code)
        })
        .collect()
}

/// The module a file belongs to: `config/cms.rs` and `config/mod.rs` are `config`, `notice.rs` is
/// `notice`.
fn module_of(file: &str) -> &str {
    file.split('/')
        .next()
        .unwrap_or(file)
        .trim_end_matches(".rs")
}

/// The lines of `code` that name `crate::<module>` (a `use` or an inline path).
fn uses_of<'a>(code: &'a str, module: &str) -> Vec<&'a str> {
    let needle = format!("crate::{module}");
    code.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .filter(|line| {
            line.match_indices(&needle).any(|(at, _)| {
                !line[at + needle.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
            })
        })
        .collect()
}

#[test]
fn modules_import_only_what_the_code_map_allows() {
    // (module, what it must not import), from the code map's "must not" column.
    let forbidden: [(&str, &[&str]); 4] = [
        ("notice", &["inworld", "poller", "outbox"]),
        // In-world knows of presence only the signal it writes in `liveness::Readiness`.
        ("inworld", &["presence"]),
        (
            "config",
            &[
                "outbox", "poller", "delivery", "inworld", "notice", "health", "app", "cms",
            ],
        ),
        (
            "metrics",
            &["filter", "health", "poller", "delivery", "inworld"],
        ),
    ];
    let mut broken = Vec::new();
    for (file, code) in sources() {
        for (module, banned) in forbidden {
            if module_of(&file) != module {
                continue;
            }
            for target in banned {
                for line in uses_of(&code, target) {
                    broken.push(format!("{file}: {}", line.trim()));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports against ARCHITECTURE.md:\n{}",
        broken.join("\n")
    );
}

#[test]
fn each_dependency_has_its_one_owner() {
    let mut broken = Vec::new();
    for (file, code) in sources() {
        let sled = code.contains("sled::") && !file.starts_with("outbox/");
        let axum = code.contains("axum")
            && file != "health.rs"
            && !file.starts_with("health/")
            && !file.starts_with("sim/");
        if sled || axum {
            broken.push(file);
        }
    }
    assert!(
        broken.is_empty(),
        "sled or axum outside its owner: {broken:?}"
    );
}

/// A secret, where it may be reached (`config` loads it; one client sends it), and the names by
/// which code reaches it rather than another secret.
struct Secret {
    what: &'static str,
    homes: &'static [&'static str],
    names: &'static [&'static str],
}

/// The CMS password goes from `config` to `cms::client` (`CmsEndpoint::from_settings`); the
/// viewer's login password from `config` to the viewer client (`ViewerLogin::from_settings`,
/// which also sends the login form).
const SECRETS: [Secret; 2] = [
    Secret {
        what: "the cms password",
        homes: &["config/", "cms/client/"],
        names: &["crate::cms", "CmsSettings", "CmsEndpoint", ".cms."],
    },
    Secret {
        what: "the viewer login password",
        homes: &["config/", "lookingglass/client.rs"],
        names: &[
            "crate::lookingglass",
            "ViewerLogin",
            ".viewer.login",
            "password_file",
        ],
    },
];

/// Whether `file` is in one of `homes` (a folder ending in `/`, or a file).
fn is_in(file: &str, homes: &[&str]) -> bool {
    homes.iter().any(|home| file.starts_with(home))
}

/// Where a secret is reached outside its homes: the words that open or hold either password
/// anywhere but a home of a secret, `.cms.password` outside the CMS password's homes, and, in the
/// home of the other secret (the other client), the names that lead to it.
fn secrets_reached(sources: &[(String, String)]) -> Vec<String> {
    let mut broken = Vec::new();
    for (file, code) in sources {
        // The simulators keep their own accounts; the demo's password is a string it hands
        // `config`.
        if file.starts_with("sim/") {
            continue;
        }
        if !SECRETS.iter().any(|secret| is_in(file, secret.homes)) {
            // `: Settings` keeps the whole configuration, both passwords included, in a field or
            // a by-value argument; borrowing it to build a component is fine.
            for needle in [
                "expose_secret",
                "load_password",
                "SecretString",
                ".cms.password",
                ": Settings",
            ] {
                if code.contains(needle) {
                    broken.push(format!("{file}: {needle} (a password)"));
                }
            }
            continue;
        }
        // A comment in one client may name the other secret's key (`cms.password_file`).
        let code = code
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for secret in &SECRETS {
            if is_in(file, secret.homes) {
                continue;
            }
            for name in secret.names {
                if code.contains(name) {
                    broken.push(format!("{file}: {name} ({})", secret.what));
                }
            }
        }
    }
    broken
}

#[test]
fn each_password_is_reached_only_in_config_and_the_client_that_sends_it() {
    let broken = secrets_reached(&sources());
    assert!(broken.is_empty(), "a password reached from: {broken:?}");
}

#[test]
fn either_password_leaking_to_another_file_is_caught() {
    let file = |name: &str, code: &str| (name.to_owned(), code.to_owned());
    // Each client opening its own password is its job.
    let homes = [
        file(
            "cms/client/mod.rs",
            "cms.load_password()?; password.expose_secret()",
        ),
        file(
            "lookingglass/client.rs",
            "login.load_password()?; form(&login.password)",
        ),
        file("config/cms.rs", "SecretString::from(text)"),
    ];
    assert_eq!(secrets_reached(&homes), Vec::<String>::new());
    let leaks = [
        // The viewer client reaching the CMS password, the CMS client the viewer's.
        file("lookingglass/client.rs", "settings.cms.load_password()"),
        file(
            "cms/client/login.rs",
            "fn f(login: &ViewerLoginSettings) { login.load_password() }",
        ),
        // Either password anywhere else, even next to the viewer client.
        file("lookingglass/presence.rs", "login.load_password()"),
        file("presence/recovery.rs", "password: SecretString"),
        file("app.rs", "settings.cms.password"),
    ];
    let broken = secrets_reached(&leaks);
    for (name, _) in &leaks {
        assert!(
            broken
                .iter()
                .any(|line| line.starts_with(&format!("{name}:"))),
            "{name} not caught: {broken:?}"
        );
    }
}

#[test]
fn no_source_file_passes_700_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut too_long = Vec::new();
    for (file, _) in sources() {
        let n_lines = std::fs::read_to_string(root.join(&file))
            .expect("source")
            .lines()
            .count();
        if n_lines > 700 {
            too_long.push(format!("{file}: {n_lines} lines"));
        }
    }
    assert!(too_long.is_empty(), "split these by concern: {too_long:?}");
}

/// `code` without its comment lines.
fn without_comments(code: &str) -> String {
    code.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Each `fn` of `code` with its name and its text up to the next `fn`.
fn functions(code: &str) -> Vec<(&str, &str)> {
    let starts: Vec<usize> = code
        .match_indices("fn ")
        .map(|(at, _)| at)
        .filter(|at| !code[..*at].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(i, at)| {
            let text = &code[at + 3..starts.get(i + 1).copied().unwrap_or(code.len())];
            let name = text
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default();
            (name, text)
        })
        .collect()
}

/// Whether `code` calls a function or method `name` (`.name(` or `::name(`).
fn calls(code: &str, name: &str) -> bool {
    code.contains(&format!(".{name}(")) || code.contains(&format!("::{name}("))
}

/// The arguments of every `.matches(…)` call in `code`.
fn matches_calls(code: &str) -> Vec<&str> {
    code.match_indices(".matches(")
        .map(|(at, needle)| {
            let args = &code[at + needle.len()..];
            let mut depth = 0;
            let end = args
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '(' | '[' | '{' => depth += 1,
                        ')' | ']' | '}' if depth == 0 => return true,
                        ')' | ']' | '}' => depth -= 1,
                        _ => {}
                    }
                    false
                })
                .map_or(args.len(), |(end, _)| end);
            &args[..end]
        })
        .collect()
}

/// Whether `args` are two or more, outside any bracket.
fn has_two_args(args: &str) -> bool {
    let mut depth = 0;
    for c in args.chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => return true,
            _ => {}
        }
    }
    false
}

/// Where a module other than `privacy` reaches the opt-out records or decides on an opt-out:
/// - a call of an outbox function that reads or writes the `privacy` tree (where the opt-outs
///   are kept), or of one that calls such a function (outbox's own calls included: the outbox
///   reading the opt-outs to drop lines is deciding), found in the source whatever it is named;
/// - `OptOut::matches` (`.matches(` with two arguments; `str::matches` takes one);
/// - the outbox naming `crate::privacy` (its types are privacy's decisions).
fn opt_outs_reached(sources: &[(String, String)]) -> Vec<String> {
    let sources: Vec<(&str, String)> = sources
        .iter()
        .map(|(file, code)| (file.as_str(), without_comments(code)))
        .collect();
    let outbox_fns: Vec<(&str, &str)> = sources
        .iter()
        .filter(|(file, _)| file.starts_with("outbox/"))
        .flat_map(|(_, code)| functions(code))
        .collect();
    let mut tree_fns: Vec<&str> = outbox_fns
        .iter()
        .filter(|(_, text)| text.contains(".privacy."))
        .map(|(name, _)| *name)
        .collect();
    loop {
        let callers: Vec<&str> = outbox_fns
            .iter()
            .filter(|(name, text)| {
                !tree_fns.contains(name) && tree_fns.iter().any(|tree_fn| calls(text, tree_fn))
            })
            .map(|(name, _)| *name)
            .collect();
        if callers.is_empty() {
            break;
        }
        tree_fns.extend(callers);
    }
    let mut broken = Vec::new();
    for (file, code) in &sources {
        if file.starts_with("privacy/") || *file == "privacy.rs" {
            continue;
        }
        for tree_fn in &tree_fns {
            if calls(code, tree_fn) {
                broken.push(format!("{file}: calls {tree_fn} (the opt-out records)"));
            }
        }
        for args in matches_calls(code) {
            if has_two_args(args) {
                broken.push(format!("{file}: .matches({args}) (OptOut::matches)"));
            }
        }
        if file.starts_with("outbox/") && !uses_of(code, "privacy").is_empty() {
            broken.push(format!("{file}: names crate::privacy"));
        }
    }
    broken
}

#[test]
fn only_privacy_reaches_the_opt_out_records_and_decides_whose_line_they_cover() {
    let broken = opt_outs_reached(&sources());
    assert!(
        broken.is_empty(),
        "opt-outs decided outside privacy (ask `Privacy`):\n{}",
        broken.join("\n")
    );
}

#[test]
fn reaching_the_opt_outs_outside_privacy_is_caught() {
    let file = |name: &str, code: &str| (name.to_owned(), code.to_owned());
    // The outbox keeps the records as bytes and removes what privacy picks; privacy reads them.
    let storage = [
        file(
            "outbox/erasure.rs",
            "pub fn records(&self) { store.privacy.iter() }\n\
             pub async fn erase(&self, doomed: impl Fn(&CapturedLine) -> bool) { self.remove(k) }",
        ),
        file(
            "privacy/store.rs",
            "fn stored(&self) { self.outbox.records() } \
             fn covered(o: &OptOut, l: &CapturedLine) -> bool { o.matches(&l.speaker, None) }",
        ),
        file("delivery/step.rs", "self.deps.outbox.erase(|line| true)"),
        file("config/syntax.rs", "text[..at].matches('\\n').count()"),
    ];
    assert_eq!(opt_outs_reached(&storage), Vec::<String>::new());
    let leaks = [
        // The outbox reading the records to decide whose lines to drop.
        file(
            "outbox/privacy.rs",
            "use crate::privacy::OptOut;\n\
             pub fn opt_outs(&self) { store.privacy.iter() }\n\
             pub async fn withhold(&self) { for o in self.opt_outs()? { o.matches(s, u) } }",
        ),
        // Delivery, the poller or the admin subcommand reaching them directly.
        file("delivery/step.rs", "self.deps.outbox.withhold(batch)"),
        file("admin.rs", "outbox.opt_outs()?"),
        file(
            "poller.rs",
            "ahead.iter().any(|(at, o)| o.matches(speaker, uuid))",
        ),
    ];
    let broken = opt_outs_reached(&leaks);
    for (name, _) in &leaks {
        assert!(
            broken
                .iter()
                .any(|line| line.starts_with(&format!("{name}:"))),
            "{name} not caught: {broken:?}"
        );
    }
}
