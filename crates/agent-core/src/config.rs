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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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
    #[serde(default)]
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

/// `config/coordinator.yaml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// The fleet's default mode.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// etcd settings.
    #[serde(default)]
    pub etcd: EtcdSection,
    /// git settings.
    #[serde(default)]
    pub git: GitSection,
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
        Ok(yaml::from_str(path, text)?)
    }
}

#[cfg(test)]
mod tests;
