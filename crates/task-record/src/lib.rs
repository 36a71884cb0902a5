//! The migration guide's JSON task record (`task_id`, `status`, `claimed_by`, `claimed_at`, plus
//! `blocked_by`, `title`), with unknown fields kept and ifc's own fields (the lease a claim was
//! made under, a lapsed claim, a copied claim): how the etcd and NATS stores read and write it,
//! and what importing a board row into either, or deleting a task from it, did.

use agent_core::{SessionId, Task, TaskId, TaskStatus};
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

/// Field naming the lease an ifc claim was made under. Only records carrying it expire by themselves.
const LEASE_FIELD: &str = "ifc_lease";
/// Field naming the last claim of a task whose lease ended, kept until the next write (see `Lapsed`).
const LAPSED_FIELD: &str = "ifc_lapsed";
/// Field keeping a claim's fencing token across later writes of the record (see `claim_rev`).
const CLAIM_REV_FIELD: &str = "ifc_claim_rev";
/// Field marking a claim written here from the git side, not won here (see `Task::copied`).
const COPIED_FIELD: &str = "ifc_copied";

/// What importing one task did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    Created,
    Updated,
    Unchanged,
    /// The store is ahead of the board (or holds a live claim): kept as it is.
    Kept {
        reason: String,
    },
}

/// What deleting one task did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    NotFound,
    /// Claimed: only its holder's release (or `force`) ends that.
    Held {
        holder: Option<SessionId>,
    },
    /// Tasks not complete yet wait for it: they would wait for ever.
    Blocks {
        dependents: Vec<TaskId>,
    },
}

/// Whether `want` (a transition carried from another store) ends a claim, its token, that
/// the record no longer shows: someone set the task's status after that claim (an operator
/// reopened it, another session completed it), so a completion or release of the old claim,
/// carried late from git, is not the task's word any more (seed 60000054: a reopened task was
/// marked complete again by the session that had done it before, returning from git).
/// `record` is the stored record (`Err`: unreadable), written at revision `rev`.
pub fn changed_since_claim(
    record: Result<&Record, &String>,
    rev: u64,
    want: &agent_core::Mirrored,
) -> bool {
    let Some(token) = want.token else {
        return false;
    };
    if !matches!(
        want.status,
        TaskStatus::Complete | TaskStatus::Available | TaskStatus::Blocked
    ) {
        return false;
    }
    let still_that_claim = record
        .is_ok_and(|r| r.task.status == TaskStatus::Claimed && r.task.claimed_by == want.holder);
    rev > token.0 && !still_that_claim
}

impl Imported {
    /// What writing the board's `want` over the store's `current` comes to: the task to write,
    /// or why nothing is written (`Kept`: the store is ahead, or another session holds it;
    /// `Unchanged`). Never backwards unless `force`; `leased`: the stored claim is bound to a
    /// lease, which a forced write ends even when the task reads the same. `store` names the
    /// store in a reason (`etcd`, `NATS`).
    pub fn plan(
        current: &Task,
        want: &Task,
        force: bool,
        leased: bool,
        store: &str,
    ) -> Result<Task, Imported> {
        if !force
            && agent_core::mirror::rank(current.status) > agent_core::mirror::rank(want.status)
        {
            return Err(Imported::Kept {
                reason: format!("{store} says {}, the board {}", current.status, want.status),
            });
        }
        let live_claim =
            current.status == TaskStatus::Claimed && current.claimed_by != want.claimed_by;
        if !force && live_claim {
            let holder = current
                .claimed_by
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or_default();
            return Err(Imported::Kept {
                reason: format!("claimed by {holder} in {store}"),
            });
        }
        let mut task = want.clone();
        task.extra = current.extra.clone();
        if task.claimed_at.is_none() && task.claimed_by == current.claimed_by {
            task.claimed_at = current.claimed_at;
        }
        if task == *current && !(force && leased) {
            return Err(Imported::Unchanged);
        }
        Ok(task)
    }
}

impl Deleted {
    /// The reason a corrupt record cannot be deleted without `--force`, saying so.
    pub fn corrupt_reason(id: &TaskId, reason: &str) -> String {
        format!("{reason} (`ifc delete {id} --force` removes it)")
    }
}

/// A task record as stored (its status may describe a claim whose lease is gone).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub task: Task,
    /// The lease of the ifc claim recorded here, if any.
    pub lease: Option<i64>,
    /// The claim that ended with its lease, while nothing was written since (see `Lapsed`).
    pub lapsed: Option<Lapsed>,
    /// The fencing token of the claim this record holds, when a later write (a title edit) moved
    /// the record past the claim's own revision (NATS, where the claim is the record itself).
    pub claim_rev: Option<i64>,
}

/// A claim whose lease ended (etcd away longer than the TTL) with nobody's write since: its
/// holder may still report the task done, the work was done once and nobody else started it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lapsed {
    pub session: SessionId,
    /// The claim's fencing token.
    pub token: i64,
    /// The lease it was made under (only the process granted it may complete it).
    pub lease: i64,
}

impl Record {
    /// Reads a record stored under `key` for task `id`.
    pub fn decode(id: &TaskId, bytes: &[u8]) -> Result<Record, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(mut map) = value else {
            return Err(format!("expected a JSON object, found {}", kind(&value)));
        };
        if let Some(v) = map.remove("task_id") {
            match v.as_str() {
                Some(s) if s == id.as_str() => {}
                _ => {
                    return Err(format!(
                        "task_id {v} does not match the key's id {:?}",
                        id.as_str()
                    ))
                }
            }
        }
        let status = match map.remove("status") {
            Some(Value::String(s)) => s.parse::<TaskStatus>()?,
            Some(v) => return Err(format!("status must be a string, found {v}")),
            None => return Err("missing field status".into()),
        };
        let claimed_by = match map.remove("claimed_by") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                Some(SessionId::parse(&s).map_err(|e| format!("claimed_by: {e}"))?)
            }
            Some(v) => return Err(format!("claimed_by must be a string or null, found {v}")),
        };
        let claimed_at = match map.remove("claimed_at") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                parse_time(&v).ok_or_else(|| format!("claimed_at {v} is not an ISO 8601 time"))?,
            ),
        };
        let title = match map.remove("title") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(v) => return Err(format!("title must be a string, found {v}")),
        };
        let blocked_by = match map.remove("blocked_by") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| format!("blocked_by holds {v}, not a task id"))
                        .and_then(|s| TaskId::parse(s).map_err(|e| format!("blocked_by: {e}")))
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(format!("blocked_by must be a list of task ids, found {v}")),
        };
        let lease = match map.remove(LEASE_FIELD) {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_i64()
                    .ok_or_else(|| format!("{LEASE_FIELD} must be an integer, found {v}"))?,
            ),
        };
        let lapsed = match map.remove(LAPSED_FIELD) {
            None | Some(Value::Null) => None,
            Some(v) => Some(decode_lapsed(&v).ok_or_else(|| {
                format!("{LAPSED_FIELD} must be {{\"session\", \"token\", \"lease\"}}, found {v}")
            })?),
        };
        let claim_rev = match map.remove(CLAIM_REV_FIELD) {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_i64()
                    .ok_or_else(|| format!("{CLAIM_REV_FIELD} must be an integer, found {v}"))?,
            ),
        };
        let copied = match map.remove(COPIED_FIELD) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(v) => return Err(format!("{COPIED_FIELD} must be true or false, found {v}")),
        };
        if status == TaskStatus::Claimed && claimed_by.is_none() {
            return Err("status is claimed but claimed_by is empty".into());
        }
        let task = Task {
            id: id.clone(),
            title,
            status,
            claimed_by,
            claimed_at,
            blocked_by,
            copied: copied && status == TaskStatus::Claimed,
            extra: map,
        };
        Ok(Record {
            task,
            lease,
            lapsed,
            claim_rev,
        })
    }

    /// A plain record: no lease, no lapsed claim.
    pub fn plain(task: Task) -> Record {
        Record {
            task,
            lease: None,
            lapsed: None,
            claim_rev: None,
        }
    }

    /// The claim that ended with its lease, for a record stored at `mod_rev` whose claim key is
    /// gone: a `claimed` record under a lease written by the claim itself (nothing since: the
    /// token is the record's revision), or what the repairer kept of it.
    pub fn lapsed_claim(&self, mod_rev: i64) -> Option<Lapsed> {
        match (self.task.status, self.lease, &self.task.claimed_by) {
            (TaskStatus::Claimed, Some(lease), Some(session)) => Some(Lapsed {
                session: session.clone(),
                token: mod_rev,
                lease,
            }),
            (TaskStatus::Available, _, _) => self.lapsed.clone(),
            _ => None,
        }
    }

    /// The JSON stored for this record: the guide's fields first, then ifc's, then unknown ones.
    pub fn encode(&self) -> Vec<u8> {
        let t = &self.task;
        let mut map = Map::new();
        map.insert("task_id".into(), Value::from(t.id.as_str()));
        map.insert("status".into(), Value::from(t.status.as_str()));
        map.insert(
            "claimed_by".into(),
            t.claimed_by
                .as_ref()
                .map_or(Value::Null, |s| Value::from(s.as_str())),
        );
        map.insert(
            "claimed_at".into(),
            t.claimed_at.map_or(Value::Null, |at| {
                Value::from(at.to_rfc3339_opts(SecondsFormat::Micros, true))
            }),
        );
        if !t.blocked_by.is_empty() {
            map.insert(
                "blocked_by".into(),
                t.blocked_by
                    .iter()
                    .map(|b| Value::from(b.as_str()))
                    .collect(),
            );
        }
        if let Some(title) = &t.title {
            map.insert("title".into(), Value::from(title.as_str()));
        }
        if let Some(lease) = self.lease {
            map.insert(LEASE_FIELD.into(), Value::from(lease));
        }
        if let Some(rev) = self.claim_rev {
            map.insert(CLAIM_REV_FIELD.into(), Value::from(rev));
        }
        if t.copied && t.status == TaskStatus::Claimed {
            map.insert(COPIED_FIELD.into(), Value::Bool(true));
        }
        if let Some(l) = &self.lapsed {
            map.insert(
                LAPSED_FIELD.into(),
                serde_json::json!({"session": l.session.as_str(), "token": l.token, "lease": l.lease}),
            );
        }
        for (k, v) in &t.extra {
            map.entry(k.clone()).or_insert_with(|| v.clone());
        }
        // Serialising a map of JSON values cannot fail.
        serde_json::to_vec(&Value::Object(map)).unwrap_or_default()
    }
}

fn decode_lapsed(v: &Value) -> Option<Lapsed> {
    Some(Lapsed {
        session: SessionId::parse(v.get("session")?.as_str()?).ok()?,
        token: v.get("token")?.as_i64()?,
        lease: v.get("lease")?.as_i64()?,
    })
}

fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    if let Some(secs) = v.as_f64() {
        return DateTime::from_timestamp_micros((secs * 1e6) as i64);
    }
    let s = v.as_str()?;
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    // Python's datetime.isoformat() without a zone: taken as UTC.
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|n| n.and_utc())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).expect("valid")
    }

    #[test]
    fn reads_the_guide_shape_and_keeps_unknown_fields() {
        let raw = br#"{"task_id":"X","status":"available","claimed_by":null,"claimed_at":null,"priority":3,"notes":{"a":1}}"#;
        let rec = Record::decode(&id("X"), raw).expect("valid");
        assert_eq!(rec.task.status, TaskStatus::Available);
        assert_eq!(rec.task.extra.get("priority"), Some(&Value::from(3)));
        let again = Record::decode(&id("X"), &rec.encode()).expect("round trip");
        assert_eq!(again, rec);
        let text = String::from_utf8(rec.encode()).expect("utf8");
        assert!(
            text.starts_with(
                r#"{"task_id":"X","status":"available","claimed_by":null,"claimed_at":null"#
            ),
            "{text}"
        );
    }

    #[test]
    fn reads_records_without_task_id_and_python_times() {
        let rec = Record::decode(
            &id("T"),
            br#"{"status":"claimed","claimed_by":"s1","claimed_at":"2025-11-12T10:00:00.123456"}"#,
        )
        .expect("valid");
        assert_eq!(
            rec.task.claimed_by.map(|s| s.to_string()).as_deref(),
            Some("s1")
        );
        assert!(rec.task.claimed_at.is_some());
    }

    #[test]
    fn rejects_bad_shapes_with_a_reason() {
        for (raw, why) in [
            (&b"not json"[..], "not JSON"),
            (b"[1,2]", "expected a JSON object"),
            (br#"{"status":"done"}"#, "unknown status"),
            (br#"{"task_id":"Y","status":"available"}"#, "does not match"),
            (br#"{"claimed_by":null}"#, "missing field status"),
            (
                br#"{"status":"claimed","claimed_by":null}"#,
                "claimed_by is empty",
            ),
            (
                br#"{"status":"available","blocked_by":"A"}"#,
                "blocked_by must be a list",
            ),
        ] {
            let err = Record::decode(&id("X"), raw).expect_err(why);
            assert!(err.contains(why), "{err} should mention {why}");
        }
    }
}
