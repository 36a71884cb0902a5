//! The bucket's key layout: `tasks.<id>` (the guide's JSON records), `leases.<n>` (a client's
//! lease record, kept alive by its per-message TTL) and `sessions.<id>` (presence). An id's
//! characters that a NATS key cannot hold as they are (`:`, and a `.` that would leave an empty
//! token) are written `=3A` and `=2E`; ids never contain `=`, so reading back is exact.

use agent_core::{SessionId, TaskId};

pub(crate) const TASKS: &str = "tasks.";
pub(crate) const LEASES: &str = "leases.";
pub(crate) const SESSIONS: &str = "sessions.";

/// A key of the bucket, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Key {
    Task(TaskId),
    Lease(i64),
    Session(SessionId),
    /// Anything else (left alone).
    Other,
}

/// An id as the tail of a key.
fn encode(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    let mut last = '.';
    for c in id.chars() {
        match c {
            ':' => out.push_str("=3A"),
            '.' if last == '.' => out.push_str("=2E"),
            c => out.push(c),
        }
        last = c;
    }
    if out.ends_with('.') {
        out.pop();
        out.push_str("=2E");
    }
    out
}

fn decode(tail: &str) -> String {
    tail.replace("=2E", ".").replace("=3A", ":")
}

pub(crate) fn task(id: &TaskId) -> String {
    format!("{TASKS}{}", encode(id.as_str()))
}

pub(crate) fn lease(id: i64) -> String {
    format!("{LEASES}{id}")
}

pub(crate) fn session(id: &SessionId) -> String {
    format!("{SESSIONS}{}", encode(id.as_str()))
}

/// Reads a key of the bucket.
pub(crate) fn parse(key: &str) -> Key {
    if let Some(tail) = key.strip_prefix(TASKS) {
        return TaskId::parse(&decode(tail)).map_or(Key::Other, Key::Task);
    }
    if let Some(tail) = key.strip_prefix(LEASES) {
        return tail.parse().map_or(Key::Other, Key::Lease);
    }
    if let Some(tail) = key.strip_prefix(SESSIONS) {
        return SessionId::parse(&decode(tail)).map_or(Key::Other, Key::Session);
    }
    Key::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_nats_key(k: &str) -> bool {
        !k.is_empty()
            && !k.starts_with('.')
            && !k.ends_with('.')
            && !k.contains("..")
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-/_=.".contains(c))
    }

    #[test]
    fn every_id_makes_a_valid_key_that_reads_back() {
        for raw in [
            "A.1",
            "P0.2.3",
            ".A",
            "A.",
            "A..1",
            "...",
            "ns:task-1",
            "x_y-z",
            "a:.:b.",
        ] {
            let id = TaskId::parse(raw).expect("valid id");
            let key = task(&id);
            assert!(valid_nats_key(&key), "{raw} -> {key}");
            assert_eq!(parse(&key), Key::Task(id), "{raw} -> {key}");
        }
        assert_eq!(task(&TaskId::parse("A.1").expect("id")), "tasks.A.1");
        let s = SessionId::parse("session-1:x").expect("id");
        assert_eq!(parse(&session(&s)), Key::Session(s));
        assert_eq!(parse(&lease(42)), Key::Lease(42));
        assert_eq!(parse("other.thing"), Key::Other);
    }
}
