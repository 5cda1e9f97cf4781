//! Reading declared variables from one snapshot of the environment: each read parses by the variable's kind,
//! falls back to its default, notes a problem naming the variable when the value is wrong, and records what
//! `/_admin/config` shows for it (secrets only as set or unset).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::Secret;
use super::vars::{Kind, Var};

pub(super) struct Env {
    vars: BTreeMap<String, String>,
    pub(super) problems: Vec<String>,
    pub(super) shown: BTreeMap<&'static str, String>,
}

impl Env {
    pub(super) fn new(vars: BTreeMap<String, String>) -> Self {
        Self {
            vars,
            problems: Vec::new(),
            shown: BTreeMap::new(),
        }
    }

    /// A variable set to an empty string counts as unset, as shells and compose files often leave them.
    fn raw_named(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// The value as given, if any.
    pub(super) fn raw(&self, var: &Var) -> Option<&str> {
        self.raw_named(var.name)
    }

    /// Every set variable whose name starts with `prefix`, for variable families like `CONNECTOR_KEK_V<n>`.
    pub(super) fn family(&self, prefix: &str) -> Vec<(String, String)> {
        self.vars
            .iter()
            .filter(|(k, v)| k.starts_with(prefix) && !v.trim().is_empty())
            .map(|(k, v)| (k.clone(), v.trim().to_owned()))
            .collect()
    }

    /// Says what `/_admin/config` shows for `var`, replacing what the read recorded.
    pub(super) fn show(&mut self, var: &Var, shown: impl Into<String>) {
        self.shown.insert(var.shown_as, shown.into());
    }

    pub(super) fn problem(&mut self, problem: impl Into<String>) {
        self.problems.push(problem.into());
    }

    fn record(&mut self, var: &Var, value: Option<String>) {
        let shown = match (var.kind, value) {
            (Kind::Secret, Some(_)) => "<set>".to_owned(),
            (_, Some(value)) => value,
            (_, None) if var.unset.is_empty() => "<unset>".to_owned(),
            (_, None) => format!("<unset: {}>", var.unset),
        };
        self.shown.insert(var.shown_as, shown);
    }

    /// Parses the given value, else the default; a bad value is a problem and gives the default.
    fn parsed<T: std::str::FromStr>(&mut self, var: &Var) -> T {
        let default = || {
            var.default
                .and_then(|d| d.parse().ok())
                .unwrap_or_else(|| panic!("{}: its declared default does not parse", var.name))
        };
        match self.raw(var).map(|v| (v.to_owned(), v.parse::<T>())) {
            None => default(),
            Some((_, Ok(value))) => value,
            Some((raw, Err(_))) => {
                self.problem(format!(
                    "{}={raw:?} is not valid: expected {}",
                    var.name,
                    var.kind.expected()
                ));
                default()
            }
        }
    }

    /// A whole number within the variable's bounds.
    pub(super) fn number(&mut self, var: &Var) -> u32 {
        let Kind::Number { min, max } = var.kind else {
            unreachable!("{} is not declared as a number", var.name)
        };
        let value = self.parsed::<u32>(var);
        self.within(var, value, (min..=max).contains(&value), min)
    }

    /// Seconds within the variable's bounds.
    pub(super) fn seconds(&mut self, var: &Var) -> Duration {
        let Kind::Seconds { min, max } = var.kind else {
            unreachable!("{} is not declared as seconds", var.name)
        };
        let value = self.parsed::<f64>(var);
        let value = self.within(
            var,
            value,
            value.is_finite() && (min..=max).contains(&value),
            min,
        );
        Duration::from_secs_f64(value)
    }

    /// `value` when `fits`; otherwise a problem naming the bounds, and the default (else `min`).
    fn within<T>(&mut self, var: &Var, value: T, fits: bool, min: T) -> T
    where
        T: std::str::FromStr + std::fmt::Display,
    {
        let value = if fits {
            value
        } else {
            self.problem(format!(
                "{}={value} is out of range: expected {}",
                var.name,
                var.kind.expected()
            ));
            var.default.and_then(|d| d.parse().ok()).unwrap_or(min)
        };
        self.record(var, Some(value.to_string()));
        value
    }

    /// A flag.
    pub(super) fn flag(&mut self, var: &Var) -> bool {
        let default = var.default == Some("true");
        let value = match self.raw(var).map(str::to_ascii_lowercase).as_deref() {
            None => default,
            Some("1" | "true" | "yes" | "on") => true,
            Some("0" | "false" | "no" | "off") => false,
            Some(other) => {
                self.problem(format!(
                    "{}={other:?} is not valid: expected {}",
                    var.name,
                    var.kind.expected()
                ));
                default
            }
        };
        self.record(var, Some(value.to_string()));
        value
    }

    /// Text as given; `None` when unset and without a default. URLs must be http(s).
    pub(super) fn text(&mut self, var: &Var) -> Option<String> {
        let value = self
            .raw(var)
            .map(str::to_owned)
            .or_else(|| var.default.map(str::to_owned));
        if var.kind == Kind::Url
            && let Some(url) = &value
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            self.problem(format!("{}={url:?} is not an http(s) URL", var.name));
        }
        self.record(var, value.clone());
        value
    }

    /// Text that always has a value (declared with a default).
    pub(super) fn text_or_default(&mut self, var: &Var) -> String {
        self.text(var)
            .unwrap_or_else(|| unreachable!("{} is declared without a default", var.name))
    }

    /// A secret, shown only as set or unset.
    pub(super) fn secret(&mut self, var: &Var) -> Option<Secret> {
        debug_assert_eq!(var.kind, Kind::Secret, "{}", var.name);
        let value = self.raw(var).map(Secret::new);
        self.record(var, value.as_ref().map(|_| String::new()));
        value
    }

    /// A socket address.
    pub(super) fn address(&mut self, var: &Var) -> SocketAddr {
        let value = self.parsed::<SocketAddr>(var);
        self.record(var, Some(value.to_string()));
        value
    }

    /// A port.
    pub(super) fn port(&mut self, var: &Var) -> u16 {
        let value = self.parsed::<u16>(var);
        self.record(var, Some(value.to_string()));
        value
    }

    /// Comma-separated items (empty when unset).
    pub(super) fn list(&mut self, var: &Var) -> Vec<String> {
        let items: Vec<String> = self
            .raw(var)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        self.record(var, (!items.is_empty()).then(|| items.join(",")));
        items
    }

    /// One of the declared words.
    pub(super) fn choice(&mut self, var: &Var) -> &'static str {
        let Kind::Choice(words) = var.kind else {
            unreachable!("{} is not declared as a choice", var.name)
        };
        let default = var.default.and_then(|d| words.iter().find(|w| **w == d));
        let value = match self.raw(var).map(str::to_ascii_lowercase) {
            None => default,
            Some(given) => match words.iter().find(|w| **w == given) {
                Some(word) => Some(word),
                None => {
                    self.problem(format!(
                        "{}={given:?} is not valid: expected {}",
                        var.name,
                        var.kind.expected()
                    ));
                    default
                }
            },
        };
        let value = *value.unwrap_or_else(|| unreachable!("{}: its default is a choice", var.name));
        self.record(var, Some(value.to_owned()));
        value
    }

    /// A cron expression.
    pub(super) fn cron(&mut self, var: &Var) -> crate::domain::CronExpr {
        let default = || {
            var.default
                .and_then(|d| d.parse().ok())
                .unwrap_or_else(|| panic!("{}: its declared default does not parse", var.name))
        };
        let value: crate::domain::CronExpr = match self.raw(var).map(str::parse) {
            None => default(),
            Some(Ok(cron)) => cron,
            Some(Err(e)) => {
                self.problem(format!("{}: {e}", var.name));
                default()
            }
        };
        self.record(var, Some(value.source().to_owned()));
        value
    }
}
