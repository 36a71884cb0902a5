//! STATUS files: each session's `STATUS-SESSION-<n>.yaml` (session id, state, current task,
//! backend, `updated_at`, and the fencing tokens of the claims it holds). Its `updated_at` is the
//! session's heartbeat: a claim whose owner's STATUS is older than `stale_after` is free. The
//! branch's file changes with the session's state; the heartbeat itself moves a ref
//! (`repo::HEARTBEAT_REFS`), so idle sessions add no commits.

use std::collections::BTreeMap;

use agent_core::{SessionId, TaskId};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// What a session is doing, as its STATUS file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Polling,
    Working,
    Idle,
}

#[derive(Debug, Serialize)]
struct StatusOut<'a> {
    session_id: &'a str,
    state: SessionState,
    current_task: Option<&'a str>,
    backend: &'a str,
    updated_at: String,
    /// Each claim the session holds: its fencing token and when it was made.
    claims: BTreeMap<&'a str, ClaimRecord>,
    /// How long after `updated_at` the writer's claims last: readers with a shorter
    /// `--stale-after` wait this long anyway.
    stale_after: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
}

/// One held claim in a STATUS file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub token: u64,
    pub at: String,
    /// The agent process that holds it (`agent_core::process` id); absent for a claim made by a
    /// one-shot command, which its session may adopt from any process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// Held until released, whatever the heartbeat: a one-shot command's etcd claim recorded
    /// here (etcd holds it until it is released, so git must too).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub until_released: bool,
    /// Written here from etcd (by a bridge, or a router bringing git up to etcd), not won here:
    /// etcd has the word on it (see `agent_core::Task::copied`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copied: bool,
}

impl ClaimRecord {
    /// A claim made now with `token` by `process` (`None`: a one-shot command's).
    pub fn now(token: u64, process: Option<String>) -> ClaimRecord {
        ClaimRecord {
            token,
            at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            process,
            until_released: false,
            copied: false,
        }
    }

    /// Whether another live process holds this claim, so `process` (this one's, `None` for a
    /// one-shot command) may not take it over.
    pub fn held_by_other_process(&self, process: Option<&str>) -> bool {
        match &self.process {
            None => false,
            Some(p) if Some(p.as_str()) == process => false,
            Some(p) => agent_core::process::id_may_be_alive(p),
        }
    }
}

/// A STATUS file as read: lenient, since the proof of concept's files have other shapes.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StatusIn {
    pub session_id: Option<String>,
    pub updated_at: Option<String>,
    pub state: Option<String>,
    pub current_task: Option<String>,
    pub started_at: Option<String>,
    pub pid: Option<u32>,
    pub host: Option<String>,
    pub version: Option<String>,
    /// The store serving the session (`git`, or `etcd` for a hybrid session on etcd).
    pub backend: Option<String>,
    /// `None` in files not written by ifc (the proof of concept's), which record no claims.
    #[serde(default)]
    pub claims: Option<BTreeMap<String, ClaimRecord>>,
    /// The writer's `--stale-after` (`20s`), if it said.
    pub stale_after: Option<String>,
    /// Why the file could not be read (`file:line: problem`), if it could not: nothing in it
    /// is known, so nothing in it is taken as given up either.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

impl StatusIn {
    /// Parses a STATUS file; anything unreadable reads as an empty status (no heartbeat known)
    /// that says why in `unreadable`.
    pub fn parse(path: &str, bytes: &[u8]) -> StatusIn {
        let text = String::from_utf8_lossy(bytes);
        agent_core::yaml::from_str::<StatusIn>(std::path::Path::new(path), &text).unwrap_or_else(
            |e| StatusIn {
                unreadable: Some(e.to_string()),
                ..StatusIn::default()
            },
        )
    }

    /// The file on the branch brought up to date by its session's heartbeat ref (the same
    /// file as of the last heartbeat): the later `updated_at` counts, but only from the
    /// process the branch's file names (a process taken over keeps beating until it notices,
    /// and must not keep its successor's claims alive, nor its own). An unreadable file on
    /// the branch stays unreadable.
    pub fn refreshed_by(mut self, beat: Option<StatusIn>) -> StatusIn {
        let Some(beat) = beat.filter(|b| b.unreadable.is_none()) else {
            return self;
        };
        let same_writer = self.unreadable.is_none()
            && beat.session_id == self.session_id
            && (beat.pid, &beat.host, &beat.started_at) == (self.pid, &self.host, &self.started_at);
        if same_writer && beat.updated_at() > self.updated_at() {
            self.updated_at = beat.updated_at;
        }
        self
    }

    /// When the session last wrote it, if it says.
    pub fn updated_at(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(self.updated_at.as_deref()?)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// How old its heartbeat is (`None`: it has none; a time ahead of this clock is age 0).
    pub fn age(&self) -> Option<std::time::Duration> {
        let at = self.updated_at()?;
        Some(
            Utc::now()
                .signed_duration_since(at)
                .to_std()
                .unwrap_or_default(),
        )
    }

    /// The session this file describes as a presence, if it names a valid session.
    /// Whether the heartbeat is older than the longer of `reader`'s staleness horizon and the
    /// writer's own (seed 80010: a bridge at the default 2 s took over a claim whose holder, at
    /// 20 s, still ran it). No heartbeat at all is not stale.
    pub fn stale(&self, reader: std::time::Duration) -> bool {
        let writer = self
            .stale_after
            .as_deref()
            .and_then(|d| agent_core::duration::parse_duration(d).ok())
            .unwrap_or_default();
        self.age().is_some_and(|age| age > reader.max(writer))
    }

    pub fn presence(&self) -> Option<agent_core::Presence> {
        let session_id = SessionId::parse(self.session_id.as_deref()?).ok()?;
        let updated = self.updated_at()?;
        let started_at = self
            .started_at
            .as_deref()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map_or(updated, |t| t.with_timezone(&Utc));
        Some(agent_core::Presence {
            session_id,
            state: self.state.clone().unwrap_or_else(|| "polling".into()),
            current_task: self
                .current_task
                .as_deref()
                .and_then(|t| TaskId::parse(t).ok()),
            backend: self.backend.clone().unwrap_or_else(|| "git".into()),
            started_at,
            pid: self.pid.unwrap_or_default(),
            host: self.host.clone().unwrap_or_default(),
            version: self.version.clone().unwrap_or_default(),
            heartbeat: Some(updated),
            claim_p95_us: None,
        })
    }

    /// Whether the file says its session does not hold `task` (ifc's files list every claim the
    /// session holds; other files say nothing either way).
    pub fn disowns(&self, task: &TaskId) -> bool {
        self.claims
            .as_ref()
            .is_some_and(|c| !c.contains_key(task.as_str()))
    }

    /// The token of the session's claim on `task`, if it records one.
    pub fn token(&self, task: &TaskId) -> Option<u64> {
        self.claims.as_ref()?.get(task.as_str()).map(|c| c.token)
    }

    /// The session's claim on `task`, if the file records one.
    pub fn claim(&self, task: &TaskId) -> Option<&ClaimRecord> {
        self.claims.as_ref()?.get(task.as_str())
    }

    /// When the session's claim on `task` was made, if it records it.
    pub fn claimed_at(&self, task: &TaskId) -> Option<DateTime<Utc>> {
        let at = &self.claims.as_ref()?.get(task.as_str())?.at;
        DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// The STATUS file of `session` holding `claims`, written now.
pub fn render(
    session: &SessionId,
    state: SessionState,
    current: Option<&TaskId>,
    claims: &BTreeMap<TaskId, ClaimRecord>,
    presence: Option<&agent_core::Presence>,
    stale_after: std::time::Duration,
    heartbeat: Option<&str>,
) -> Vec<u8> {
    let out = StatusOut {
        stale_after: format!("{}ms", stale_after.as_millis()),
        started_at: presence.map(|p| p.started_at.to_rfc3339_opts(SecondsFormat::Millis, true)),
        pid: presence.map(|p| p.pid),
        host: presence.map(|p| p.host.as_str()),
        version: presence.map(|p| p.version.as_str()),
        session_id: session.as_str(),
        state,
        current_task: current.map(TaskId::as_str),
        backend: presence.map_or("git", |p| p.backend.as_str()),
        updated_at: heartbeat.map_or_else(
            || Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            str::to_owned,
        ),
        claims: claims
            .iter()
            .map(|(t, c)| (t.as_str(), c.clone()))
            .collect(),
    };
    agent_core::yaml::to_string(&out)
        .unwrap_or_default()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_lenient_reading() {
        let s = SessionId::parse("session-1-ndi").expect("valid");
        let t = TaskId::parse("P0.1").expect("valid");
        let bytes = render(
            &s,
            SessionState::Working,
            Some(&t),
            &BTreeMap::from([(t.clone(), ClaimRecord::now(7, None))]),
            None,
            std::time::Duration::from_secs(20),
            None,
        );
        let text = String::from_utf8(bytes.clone()).expect("utf8");
        assert!(
            text.contains("session_id: session-1-ndi") && text.contains("state: working"),
            "{text}"
        );
        let read = StatusIn::parse("S.yaml", &bytes);
        assert_eq!(read.token(&t), Some(7));
        assert!(read.claimed_at(&t).is_some());
        assert!(read.updated_at().is_some());
        // The proof of concept's file: no heartbeat known, no error.
        let old = StatusIn::parse("S.yaml", b"status: polling\n");
        assert!(old.updated_at().is_none());
        assert!(StatusIn::parse("S.yaml", b"\0\xff: [")
            .updated_at()
            .is_none());
    }
}
