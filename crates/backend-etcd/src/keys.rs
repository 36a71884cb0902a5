//! The key layout under the namespace prefix: `<prefix>tasks/<id>` (the guide's records) and
//! `<prefix>claims/<id>` (ifc's lease-bound ownership keys, outside `tasks/` so the guide's tools
//! that list `tasks/` see only tasks), `<prefix>sessions/<session>` (lease-bound presence) and
//! `<prefix>oneshot/<lease>` (bound to the lease of a one-shot `ifc claim --ttl`: no process
//! keeps that lease, so its session adopts the claim from anywhere), and `<prefix>archive/<id>`
//! (complete tasks `ifc archive` moved out of `tasks/`: the same record, outside every watch).

use agent_core::TaskId;

/// Builds and parses keys for one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    tasks: String,
    claims: String,
    sessions: String,
    oneshot: String,
    archive: String,
}

/// Which kind of key a watched key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Task(TaskId),
    Claim(TaskId),
}

impl KeyKind {
    /// The task the key belongs to.
    pub fn task(&self) -> &TaskId {
        match self {
            KeyKind::Task(id) | KeyKind::Claim(id) => id,
        }
    }
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            tasks: format!("{prefix}tasks/"),
            claims: format!("{prefix}claims/"),
            sessions: format!("{prefix}sessions/"),
            oneshot: format!("{prefix}oneshot/"),
            archive: format!("{prefix}archive/"),
        }
    }

    pub fn task(&self, id: &TaskId) -> String {
        format!("{}{id}", self.tasks)
    }

    /// Where `ifc archive` keeps a complete task's record.
    pub fn archived(&self, id: &TaskId) -> String {
        format!("{}{id}", self.archive)
    }

    pub fn claim(&self, id: &TaskId) -> String {
        format!("{}{id}", self.claims)
    }

    /// A running session's presence key (bound to its lease).
    pub fn session(&self, id: &agent_core::SessionId) -> String {
        format!("{}{id}", self.sessions)
    }

    /// The marker of a lease granted for a one-shot command's claims (bound to that lease).
    pub fn oneshot(&self, lease: i64) -> String {
        format!("{}{lease:x}", self.oneshot)
    }

    pub fn sessions_prefix(&self) -> &str {
        &self.sessions
    }

    pub fn tasks_prefix(&self) -> &str {
        &self.tasks
    }

    pub fn claims_prefix(&self) -> &str {
        &self.claims
    }

    /// The key range one watch covers: from `claims/` to the end of `tasks/` (keys in between
    /// that are neither are ignored).
    pub fn watch_range(&self) -> (Vec<u8>, Vec<u8>) {
        let mut end = self.tasks.clone().into_bytes();
        // `tasks/` + 1 on the last byte ('/' → '0'): the end of the prefix range.
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        (self.claims.clone().into_bytes(), end)
    }

    /// What `key` is, if it is one of ours with a valid id.
    pub fn parse(&self, key: &[u8]) -> Option<KeyKind> {
        let key = std::str::from_utf8(key).ok()?;
        if let Some(id) = key.strip_prefix(&self.tasks) {
            return TaskId::parse(id).ok().map(KeyKind::Task);
        }
        key.strip_prefix(&self.claims)
            .and_then(|id| TaskId::parse(id).ok())
            .map(KeyKind::Claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_parsing() {
        let keys = Keys::new("swarm-a/");
        let id = TaskId::parse("P0.1").expect("valid");
        assert_eq!(keys.task(&id), "swarm-a/tasks/P0.1");
        assert_eq!(
            keys.parse(b"swarm-a/claims/P0.1"),
            Some(KeyKind::Claim(id.clone()))
        );
        assert_eq!(keys.parse(b"swarm-a/tasks/P0.1"), Some(KeyKind::Task(id)));
        assert_eq!(keys.parse(b"swarm-a/tasks/bad id"), None);
        assert_eq!(keys.parse(b"other/tasks/P0.1"), None);
        let (start, end) = Keys::new("").watch_range();
        assert_eq!(
            (start.as_slice(), end.as_slice()),
            (&b"claims/"[..], &b"tasks0"[..])
        );
    }
}
