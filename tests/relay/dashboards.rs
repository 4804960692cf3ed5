//! The alert rules (`deploy/prometheus/`) and the Grafana dashboard (`deploy/grafana/`) name only
//! metrics the relay exports, so a renamed metric cannot leave an alert that never fires or a panel
//! that stays empty. `promtool check rules` and `promtool test rules` (in `deploy/check`) check the
//! rules' syntax and behaviour; this checks their vocabulary against `/metrics`.

use std::collections::BTreeSet;
use std::path::Path;

use opensim_chat_relay::metrics::Stats;
use opensim_chat_relay::metrics::{Gauges, RegionStats, render_prometheus};
use regex::Regex;
use serde_json::Value;

/// Every series name `/metrics` can carry: each family, and for a histogram its `_bucket`, `_sum`
/// and `_count` series.
fn exported() -> BTreeSet<String> {
    let region = Stats::default();
    let regions = [RegionStats {
        name: "Welcome",
        stats: &region,
    }];
    let text = render_prometheus(&Stats::default(), &regions, &Gauges::default());
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// The relay's metric names a PromQL expression uses.
fn names_in(expr: &str) -> Vec<String> {
    let pattern = Regex::new(r"opensim_chat_relay_[a-z0-9_]+").expect("valid regex");
    pattern
        .find_iter(expr)
        .map(|m| m.as_str().to_owned())
        .collect()
}

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Every string value under a key named `expr` or `query`/`definition` (templating), anywhere.
fn expressions(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::Object(q)) => {
                        if let Some(Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => expressions(inner, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| expressions(item, out)),
        _ => {}
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_one_the_relay_exports() {
    // Arrange
    let exported = exported();
    let dashboard: Value =
        serde_json::from_str(&repo_file("deploy/grafana/opensim-chat-relay.json"))
            .expect("the dashboard is valid JSON");

    // Act
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| names_in(e)).collect();

    // Assert
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a dashboard with its panels");
    assert!(
        panels
            .iter()
            .all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())),
        "every panel queries something"
    );
    assert!(used.contains("opensim_chat_relay_ready"), "{used:?}");
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics the relay does not export: {unknown:?}"
    );
    let regions = exprs
        .iter()
        .filter(|e| e.contains(r#"region=~"$region""#))
        .count();
    assert!(regions >= 10, "the panels are per region: {regions}");
}

#[test]
fn every_metric_an_alert_rule_uses_is_one_the_relay_exports() {
    // Arrange
    let exported = exported();
    let rules = repo_file("deploy/prometheus/opensim-chat-relay.rules.yml");

    // Act
    let exprs: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("expr:"))
        .collect();
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| names_in(e)).collect();

    // Assert
    assert!(exprs.len() >= 10, "the rules hold their alerts: {exprs:?}");
    assert!(
        used.contains("opensim_chat_relay_lines_dropped_total"),
        "{used:?}"
    );
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "alert rules use metrics the relay does not export: {unknown:?}"
    );
    // The operations guide's table names every alerted metric, so an operator can look it up.
    let guide = repo_file("docs/OPERATIONS.md");
    let undocumented: Vec<&String> = used
        .iter()
        .filter(|name| {
            let short = name.trim_start_matches("opensim_chat_relay_");
            let family = short.strip_suffix("_bucket").unwrap_or(short);
            !guide.contains(family)
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "alerted metrics missing from docs/OPERATIONS.md: {undocumented:?}"
    );
}
