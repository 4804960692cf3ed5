//! The `check` report: one line per check (ok, warn or fail, what was found, how to fix it) and
//! its text. Must not: probe anything (the probes in `viewer` and `cms` fill it in).

use std::fmt;

use crate::config::ConfigError;

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

    pub(super) fn ok(&mut self, name: &'static str, detail: impl Into<String>) {
        self.push(name, Outcome::Ok, detail.into(), None);
    }

    pub(super) fn warn(
        &mut self,
        name: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(name, Outcome::Warn, detail.into(), Some(fix.into()));
    }

    pub(super) fn fail(
        &mut self,
        name: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
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
