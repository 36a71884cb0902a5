//! The stored shape of a task in etcd: the guide's JSON record (`task_record`), the lease-bound
//! claim key beside it, and the *effective* task derived from both.

use agent_core::{SessionId, Task, TaskStatus};
use serde_json::Value;

pub(crate) use task_record::Record;

/// A record key's value with the revision it was last written at.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredRecord {
    pub record: Result<Record, String>,
    pub mod_rev: i64,
}

/// A claim key: who holds the task, under which lease (0: none), written at `mod_rev` (the token).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredClaim {
    pub session: Result<SessionId, String>,
    pub lease: i64,
    pub mod_rev: i64,
}

/// The claim key's value.
pub(crate) fn encode_claim(session: &SessionId) -> Vec<u8> {
    // Session ids are ASCII letters, digits and `.-_:` (validated): nothing to escape.
    format!(r#"{{"session":"{session}"}}"#).into_bytes()
}

/// Reads a claim key's value.
pub(crate) fn decode_claim(bytes: &[u8]) -> Result<SessionId, String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("claim key is not JSON: {e}"))?;
    let session = value
        .get("session")
        .and_then(Value::as_str)
        .ok_or("claim key has no session")?;
    SessionId::parse(session).map_err(|e| e.to_string())
}

/// The task as readers see it, and the fencing token of its live claim (if it is claimed).
///
/// A record that says `claimed` under an ifc lease whose claim key is gone (the lease expired) is
/// `available` with no holder. A `claimed` record without a lease (written by another tool or
/// migrated) is held by its `claimed_by` until released.
pub(crate) fn effective(
    stored: &StoredRecord,
    claim: Option<&StoredClaim>,
) -> Result<(Task, Option<i64>), String> {
    let (status, holder, token) = effective_face(stored, claim).map_err(Clone::clone)?;
    let record = stored.record.as_ref().map_err(Clone::clone)?;
    let mut task = record.task.clone();
    if task.status == TaskStatus::Claimed && status == TaskStatus::Available {
        task.claimed_at = None;
    }
    task.status = status;
    task.claimed_by = holder;
    task.copied &= status == TaskStatus::Claimed;
    Ok((task, token))
}

/// What `effective` says of a task's status, holder and fencing token, without copying the
/// task: the watch cache asks this of every task an event touches.
pub(crate) fn effective_face<'a>(
    stored: &'a StoredRecord,
    claim: Option<&StoredClaim>,
) -> Result<(TaskStatus, Option<SessionId>, Option<i64>), &'a String> {
    let record = stored.record.as_ref()?;
    let task = &record.task;
    if task.status != TaskStatus::Claimed {
        return Ok((task.status, task.claimed_by.clone(), None));
    }
    Ok(match claim {
        Some(StoredClaim {
            session: Ok(session),
            mod_rev,
            ..
        }) => (TaskStatus::Claimed, Some(session.clone()), Some(*mod_rev)),
        _ if record.lease.is_some() => (TaskStatus::Available, None, None),
        _ => (
            TaskStatus::Claimed,
            task.claimed_by.clone(),
            Some(stored.mod_rev),
        ),
    })
}
