//! The agent's configuration files: the session file (`agents/<session>.yaml`: who it is, which
//! tasks it takes, what it runs) and the fleet file (`config/coordinator.yaml`: mode, etcd and git
//! settings). Unknown keys, wrong types and bad durations are errors naming file, line and key.
//! Reading only; the CLI layers its flags and `IFC_*` variables on top.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::duration::ConfigDuration;
use crate::ids::{SessionId, TaskId};
use crate::yaml::{self, YamlError};

/// Which store a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// etcd (IF.coordinator).
    Coordinator,
    /// The git task board.
    Git,
    /// etcd first, git when etcd is down.
    Hybrid,
}

/// One entry of a session's task list: an exact id or a glob (`P0.5.*`, `P0.?.1`).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPattern {
    text: String,
    matcher: wildmatch::WildMatch,
}

impl TaskPattern {
    /// Parses a pattern: id characters plus `*` and `?`.
    pub fn parse(text: &str) -> Result<TaskPattern, String> {
        if text.contains(['*', '?']) {
            let literal: String = text.chars().filter(|c| !matches!(c, '*' | '?')).collect();
            if !literal.is_empty() {
                TaskId::parse(&literal)
                    .map_err(|e| format!("task pattern {text:?}: {}", e.reason))?;
            }
        } else {
            TaskId::parse(text).map_err(|e| e.to_string())?;
        }
        Ok(TaskPattern {
            text: text.to_owned(),
            matcher: wildmatch::WildMatch::new(text),
        })
    }

    /// Whether `id` matches.
    pub fn matches(&self, id: &TaskId) -> bool {
        self.matcher.matches(id.as_str())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A glob's text before its first `*` or `?` (every id it matches starts so); `None` for an
    /// exact id.
    pub fn literal_prefix(&self) -> Option<&str> {
        self.text.find(['*', '?']).map(|at| &self.text[..at])
    }
}

impl<'de> Deserialize<'de> for TaskPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TaskPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `agents/<session>.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFile {
    /// The session's id.
    pub session_id: SessionId,
    /// Task ids and globs, in priority order.
    pub tasks: Vec<TaskPattern>,
    /// The program and its arguments (no shell); the task arrives in `IFC_TASK_ID`.
    pub command: Vec<String>,
    /// Where the command runs (default: the agent's directory).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Extra environment for the command.
    #[serde(default, deserialize_with = "crate::yaml::unique_map")]
    pub env: BTreeMap<String, String>,
    /// A task running longer is killed and given back.
    #[serde(default)]
    pub task_timeout: Option<ConfigDuration>,
    /// A task printing nothing for this long is treated as hung: killed and given back.
    #[serde(default)]
    pub stall_timeout: Option<ConfigDuration>,
    /// How often this session tries one task before leaving it to others (default 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// The session lease's TTL (default 10s).
    #[serde(default)]
    pub lease_ttl: Option<ConfigDuration>,
    /// Time a running task gets to finish on SIGTERM (default 30s).
    #[serde(default)]
    pub shutdown_grace: Option<ConfigDuration>,
    /// Overrides the fleet file's mode for this session.
    #[serde(default)]
    pub mode: Option<Mode>,
}

impl SessionFile {
    /// The keys of `newer` that differ from this file and that a running agent does not take
    /// up (all but `mode`, which switches live): said to the operator, who restarts the agent
    /// for them (issue 16: an edited task list was ignored without a word).
    pub fn changes_needing_restart(&self, newer: &SessionFile) -> Vec<&'static str> {
        let same =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
        let fields: [(&'static str, bool); 10] = [
            ("session_id", same(&self.session_id, &newer.session_id)),
            ("tasks", same(&self.tasks, &newer.tasks)),
            ("command", same(&self.command, &newer.command)),
            ("workdir", same(&self.workdir, &newer.workdir)),
            ("env", same(&self.env, &newer.env)),
            (
                "task_timeout",
                same(&self.task_timeout, &newer.task_timeout),
            ),
            (
                "stall_timeout",
                same(&self.stall_timeout, &newer.stall_timeout),
            ),
            (
                "max_attempts",
                same(&self.max_attempts, &newer.max_attempts),
            ),
            ("lease_ttl", same(&self.lease_ttl, &newer.lease_ttl)),
            (
                "shutdown_grace",
                same(&self.shutdown_grace, &newer.shutdown_grace),
            ),
        ];
        fields
            .into_iter()
            .filter(|(_, same)| !same)
            .map(|(key, _)| key)
            .collect()
    }
}

impl Mode {
    /// The name as written in files and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Coordinator => "coordinator",
            Mode::Git => "git",
            Mode::Hybrid => "hybrid",
        }
    }
}

/// `config/coordinator.yaml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// The fleet's default mode.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// `true`: every session runs on git now, whatever else says (the one-flag rollback).
    #[serde(default)]
    pub rollback: bool,
    /// Which sessions run in which mode.
    #[serde(default)]
    pub rollout: Rollout,
    /// Hybrid mode's fallback settings.
    #[serde(default)]
    pub hybrid: HybridSection,
    /// The bridge between etcd and git.
    #[serde(default)]
    pub bridge: BridgeSection,
    /// The coordinator store: `etcd` (the default) or `nats`.
    #[serde(default)]
    pub store: Option<StoreKind>,
    /// etcd settings.
    #[serde(default)]
    pub etcd: EtcdSection,
    /// NATS JetStream settings (with `store: nats`).
    #[serde(default)]
    pub nats: NatsSection,
    /// git settings.
    #[serde(default)]
    pub git: GitSection,
    /// The coordinator's service-level objective: a hybrid session whose claims breach it
    /// moves to git until the coordinator is within it again. Off when absent.
    #[serde(default)]
    pub slo: Option<SloSection>,
}

/// The fleet file's `slo:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloSection {
    /// The claims' p95 latency on the coordinator must stay at or under this (e.g. 10ms).
    pub claim_p95: Option<ConfigDuration>,
    /// The share of claims answered (not errors or silences) must stay at or above this (0–1,
    /// e.g. 0.99).
    pub success_rate: Option<f64>,
    /// Judged over this much recent time (default 60s).
    pub window: Option<ConfigDuration>,
    /// Judged only once the window holds this many claims (default 20).
    pub min_claims: Option<usize>,
    /// Back to the coordinator after its health checks answered within `claim_p95` for this
    /// long (default: the window).
    pub recover_after: Option<ConfigDuration>,
}

impl SloSection {
    /// The objective the router holds the coordinator to, or what is wrong with the section.
    pub fn objective(&self) -> Result<crate::router::objective::Objective, String> {
        if self.claim_p95.is_none() && self.success_rate.is_none() {
            return Err("slo: needs claim_p95, success_rate or both".into());
        }
        if let Some(rate) = self
            .success_rate
            .filter(|r| !(0.0..=1.0).contains(r) || r.is_nan())
        {
            return Err(format!(
                "slo.success_rate: {rate} is not a share between 0 and 1 (0.99 is 99 %)"
            ));
        }
        let window = self
            .window
            .map_or(std::time::Duration::from_secs(60), |d| d.0);
        if window < std::time::Duration::from_secs(1) {
            return Err("slo.window: must be at least 1s".into());
        }
        if self.claim_p95.is_some_and(|d| d.0.is_zero()) {
            return Err("slo.claim_p95: must be more than 0".into());
        }
        Ok(crate::router::objective::Objective {
            claim_p95: self.claim_p95.map(|d| d.0),
            success_rate: self.success_rate,
            window,
            min_claims: self.min_claims.unwrap_or(20).max(1),
            recover_after: self.recover_after.map_or(window, |d| d.0),
        })
    }
}

/// The fleet file's `rollout:` section: per-session modes for a gradual migration. An explicit
/// entry (`sessions:` or the lists) wins over `percent`, which wins over `default`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// The mode of sessions not named below (default: the file's `mode`).
    pub default: Option<Mode>,
    /// `session id: mode`.
    #[serde(default, deserialize_with = "crate::yaml::unique_map")]
    pub sessions: BTreeMap<SessionId, Mode>,
    /// Sessions on the coordinator.
    #[serde(default)]
    pub coordinator: Vec<SessionId>,
    /// Sessions in hybrid mode.
    #[serde(default)]
    pub hybrid: Vec<SessionId>,
    /// Sessions on git.
    #[serde(default)]
    pub git: Vec<SessionId>,
    /// This share (0–100) of the other sessions, chosen by a stable hash of the session id, runs
    /// in `percent_mode`.
    pub percent: Option<u8>,
    /// The mode of the `percent` share (default hybrid).
    pub percent_mode: Option<Mode>,
}

/// The fleet file's `hybrid:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HybridSection {
    /// How long an operation may take on etcd before it goes to git (default 500ms).
    pub deadline: Option<ConfigDuration>,
    /// Consecutive etcd failures that move the session to git (default 3).
    pub failures_to_open: Option<u32>,
    /// First delay between probes of etcd while on git (default 500ms; doubles, jittered).
    pub probe_initial: Option<ConfigDuration>,
    /// Longest delay between probes (default 30s).
    pub probe_max: Option<ConfigDuration>,
}

/// The fleet file's `bridge:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSection {
    /// `true` when `ifc bridge` runs for this fleet: hybrid sessions then leave mirroring their
    /// transitions into git to it.
    #[serde(default)]
    pub enabled: bool,
    /// At most one git push per interval (default 1s).
    pub interval: Option<ConfigDuration>,
}

/// Where a session's mode came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeSource {
    /// `--mode` or `IFC_MODE`.
    Flag,
    /// The fleet file's `rollback: true`.
    Rollback,
    /// The session file's `mode:`.
    SessionFile,
    /// The fleet file's `rollout:`.
    Rollout,
    /// The fleet file's `mode:`.
    FleetDefault,
    /// Nothing said: coordinator.
    BuiltIn,
}

/// For logs: where the mode came from, in the words of the files and flags.
impl std::fmt::Display for ModeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModeSource::Flag => "--mode or IFC_MODE",
            ModeSource::Rollback => "the fleet file's rollback: true",
            ModeSource::SessionFile => "the session file's mode:",
            ModeSource::Rollout => "the fleet file's rollout:",
            ModeSource::FleetDefault => "the fleet file's mode:",
            ModeSource::BuiltIn => "the default",
        })
    }
}

/// A hash of `text` that is the same on every machine and version: FNV-1a.
pub fn stable_hash(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A stable share (0–99) of a session id.
pub fn stable_bucket(id: &SessionId) -> u8 {
    u8::try_from(stable_hash(id.as_str()) % 100).unwrap_or(0)
}

/// A session's mode: `rollback: true` > `--mode`/`IFC_MODE` > session file > fleet rollout >
/// fleet default > coordinator.
/// Without a session (`id` `None`, the CLI) only the rollout's default applies.
pub fn mode_for(
    id: Option<&SessionId>,
    flag: Option<Mode>,
    session: Option<&SessionFile>,
    fleet: Option<&FleetFile>,
) -> (Mode, ModeSource) {
    if fleet.is_some_and(|f| f.rollback) {
        return (Mode::Git, ModeSource::Rollback);
    }
    if let Some(m) = flag {
        return (m, ModeSource::Flag);
    }
    if let Some(m) = session.and_then(|s| s.mode) {
        return (m, ModeSource::SessionFile);
    }
    let Some(fleet) = fleet else {
        return (Mode::Coordinator, ModeSource::BuiltIn);
    };
    let r = &fleet.rollout;
    let listed = id.and_then(|id| {
        r.sessions.get(id).copied().or_else(|| {
            [
                (&r.coordinator, Mode::Coordinator),
                (&r.hybrid, Mode::Hybrid),
                (&r.git, Mode::Git),
            ]
            .into_iter()
            .find(|(ids, _)| ids.contains(id))
            .map(|(_, m)| m)
        })
    });
    let by_share = id
        .zip(r.percent)
        .filter(|(id, p)| stable_bucket(id) < *p)
        .map(|_| r.percent_mode.unwrap_or(Mode::Hybrid));
    if let Some(m) = listed.or(by_share).or(r.default) {
        return (m, ModeSource::Rollout);
    }
    match fleet.mode {
        Some(m) => (m, ModeSource::FleetDefault),
        None => (Mode::Coordinator, ModeSource::BuiltIn),
    }
}

/// The fleet file's `etcd:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub dial_timeout: Option<ConfigDuration>,
    pub request_timeout: Option<ConfigDuration>,
}

/// The fleet file's `store:`: which coordinator the fleet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Etcd,
    Nats,
}

/// The fleet file's `nats:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSection {
    /// Server URLs (`nats://HOST:4222`).
    pub endpoints: Option<Vec<String>>,
    /// The key-value bucket.
    pub bucket: Option<String>,
    /// Replicas of the bucket when ifc creates it.
    pub replicas: Option<u8>,
    /// A NATS credentials file.
    pub creds: Option<std::path::PathBuf>,
    pub dial_timeout: Option<ConfigDuration>,
    pub request_timeout: Option<ConfigDuration>,
}

/// The fleet file's `git:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitSection {
    pub remote: Option<String>,
    pub branch: Option<String>,
    pub board: Option<String>,
    pub poll_interval: Option<ConfigDuration>,
    pub stale_after: Option<ConfigDuration>,
    pub status_dir: Option<String>,
    /// `true` once no session of the fleet runs on git any more: coordinator sessions stop
    /// recording their claims there (until then every etcd claim is in git before it counts).
    #[serde(default)]
    pub retired: bool,
}

/// A config file that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Could not be read at all.
    #[error("cannot read {file}: {reason}")]
    Unreadable { file: String, reason: String },
    /// Not valid YAML of the right shape (names file, line and key).
    #[error(transparent)]
    Invalid(#[from] YamlError),
    /// Valid YAML, but a value that cannot work.
    #[error("{file}: {message}")]
    Value { file: String, message: String },
}

/// Files larger than this are refused before parsing.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn read(path: &Path) -> Result<String, ConfigError> {
    let unreadable = |reason: String| ConfigError::Unreadable {
        file: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| unreadable(e.to_string()))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(unreadable(format!(
            "{} bytes is too large for a config file (limit 1 MiB)",
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))
}

impl SessionFile {
    /// Reads and checks a session file.
    pub fn load(path: &Path) -> Result<SessionFile, ConfigError> {
        Self::parse(path, &read(path)?)
    }

    /// Parses a session file's text (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<SessionFile, ConfigError> {
        let file: SessionFile = yaml::from_str(path, text)?;
        let value = |message: &str| ConfigError::Value {
            file: path.display().to_string(),
            message: message.to_owned(),
        };
        if file.command.is_empty() || file.command[0].trim().is_empty() {
            return Err(value(
                "command: must name a program (a list: [program, arg, …])",
            ));
        }
        if file.tasks.is_empty() {
            return Err(value("tasks: must list at least one task id or pattern"));
        }
        if file.max_attempts == Some(0) {
            return Err(value("max_attempts: must be at least 1"));
        }
        Ok(file)
    }
}

impl FleetFile {
    /// Reads and checks a fleet file.
    pub fn load(path: &Path) -> Result<FleetFile, ConfigError> {
        Self::parse(path, &read(path)?)
    }

    /// Parses a fleet file's text (`path` names it in errors). An empty file is all defaults.
    pub fn parse(path: &Path, text: &str) -> Result<FleetFile, ConfigError> {
        if text.trim().is_empty() {
            return Ok(FleetFile::default());
        }
        let file: FleetFile = yaml::from_str(path, text)?;
        if file.rollout.percent.is_some_and(|p| p > 100) {
            return Err(ConfigError::Value {
                file: path.display().to_string(),
                message: "rollout.percent: must be between 0 and 100".into(),
            });
        }
        if let Some(Err(message)) = file.slo.as_ref().map(SloSection::objective) {
            // `slo.window: …` is said at the key's line; `slo: needs …` at the section's.
            let key = message
                .strip_prefix("slo.")
                .and_then(|rest| rest.split(':').next());
            let line = section_line(text, "slo", key);
            return Err(ConfigError::Value {
                file: match line {
                    Some(n) => format!("{}:{n}", path.display()),
                    None => path.display().to_string(),
                },
                message,
            });
        }
        Ok(file)
    }
}

/// The line (from 1) of top-level `section:` in a YAML text, or of its `key:` when given.
fn section_line(text: &str, section: &str, key: Option<&str>) -> Option<usize> {
    let mut lines = text.lines().enumerate();
    let (at, _) = lines.by_ref().find(|(_, l)| {
        l.trim_end()
            .strip_prefix(section)
            .is_some_and(|r| r.starts_with(':'))
    })?;
    let Some(key) = key else {
        return Some(at + 1);
    };
    lines
        .take_while(|(_, l)| l.is_empty() || l.starts_with([' ', '\t', '#']))
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|r| r.starts_with(':'))
        })
        .map_or(Some(at + 1), |(n, _)| Some(n + 1))
}

#[cfg(test)]
mod tests;
