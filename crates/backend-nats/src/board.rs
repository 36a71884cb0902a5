//! A mirror of the bucket as one ordered consumer delivers it: the tasks' records, the live
//! leases and the presences, the *effective* task (a record claimed under a lease whose record is
//! gone reads `available`), and the task events each change makes.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use agent_core::{
    CorruptRecord, Listing, Presence, SessionId, Task, TaskEvent, TaskId, TaskStatus,
};
use task_record::Record;

use crate::keys::{self, Key};

/// A task record as stored, with the stream sequence it was written at.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub record: Result<Record, String>,
    pub rev: u64,
}

impl Stored {
    pub fn decode(id: &TaskId, value: &[u8], rev: u64) -> Stored {
        Stored {
            record: Record::decode(id, value),
            rev,
        }
    }

    /// The fencing token of the claim this record holds (when it is claimed): the claim's own
    /// revision, kept in the record once a later write moved it on.
    pub fn token(&self) -> Option<u64> {
        let record = self.record.as_ref().ok()?;
        (record.task.status == TaskStatus::Claimed)
            .then(|| record.claim_rev.map_or(self.rev, |r| r.max(0) as u64))
    }

    /// The task as readers see it, with its fencing token while it is claimed. A record
    /// claimed under a lease that is gone reads available with no holder; a claimed record
    /// without a lease (recorded from another store, or migrated) holds until released.
    pub fn effective(
        &self,
        lease_alive: impl Fn(i64) -> bool,
    ) -> Result<(Task, Option<u64>), String> {
        let record = self.record.as_ref().map_err(Clone::clone)?;
        let mut task = record.task.clone();
        if task.status != TaskStatus::Claimed {
            return Ok((task, None));
        }
        if record.lease.is_some_and(|l| !lease_alive(l)) {
            task.status = TaskStatus::Available;
            task.claimed_by = None;
            task.claimed_at = None;
            task.copied = false;
            return Ok((task, None));
        }
        Ok((task, self.token()))
    }
}

/// A presence as stored, with the lease it lives under.
#[derive(Debug, Clone)]
pub(crate) struct StoredPresence {
    pub presence: Presence,
    pub lease: Option<i64>,
    /// See `PRESENCE_INHERITED_FIELD`.
    pub inherited: Vec<i64>,
}

/// What one message of the bucket's stream says.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub key: String,
    /// `false`: the key was deleted or purged (a lease's TTL ran out, say).
    pub put: bool,
    pub value: bytes::Bytes,
    pub rev: u64,
    /// The message's own TTL (`Nats-TTL`), for a lease.
    pub ttl: Option<Duration>,
}

/// A live lease as a board saw it: when its last renewal arrived, and its TTL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseSeen {
    pub at: Instant,
    pub ttl: Duration,
}

/// The TTL assumed for a lease whose message does not say (the default lease TTL).
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// The bucket as of `revision`.
#[derive(Debug, Default)]
pub(crate) struct Board {
    pub revision: u64,
    /// When the bucket's stream this board was read from was created (unix nanoseconds): a
    /// bucket deleted and made again is another stream, whose sequences start over.
    pub stream_created: i128,
    pub tasks: BTreeMap<TaskId, Stored>,
    pub leases: HashMap<i64, LeaseSeen>,
    pub sessions: BTreeMap<SessionId, StoredPresence>,
}

/// What a subscriber compares to tell whether a task changed: status, holder, blockers.
type Face = (TaskStatus, Option<SessionId>, Vec<TaskId>);

impl Board {
    pub fn task(&self, id: &TaskId) -> Option<Result<(Task, Option<u64>), String>> {
        let stored = self.tasks.get(id)?;
        Some(stored.effective(|l| self.leases.contains_key(&l)))
    }

    fn face(&self, id: &TaskId) -> Option<Face> {
        let (task, _) = self.task(id)?.ok()?;
        Some((task.status, task.claimed_by, task.blocked_by))
    }

    /// The live claim on `id`: its holder and the lease it is under.
    pub fn claim_of(&self, id: &TaskId) -> Option<(SessionId, Option<i64>)> {
        let (task, _) = self.task(id)?.ok()?;
        let record = self.tasks.get(id)?.record.as_ref().ok()?;
        if task.status != TaskStatus::Claimed {
            return None;
        }
        Some((task.claimed_by?, record.lease))
    }

    /// Applies one message; the task events it makes, in order.
    pub fn apply(&mut self, change: &Change) -> Vec<TaskEvent> {
        self.revision = self.revision.max(change.rev);
        match keys::parse(&change.key) {
            Key::Task(id) => {
                let before = self.face(&id);
                if change.put {
                    self.tasks
                        .insert(id.clone(), Stored::decode(&id, &change.value, change.rev));
                } else {
                    self.tasks.remove(&id);
                }
                let after = self.face(&id);
                self.event(&id, before, after, change.rev)
                    .into_iter()
                    .collect()
            }
            Key::Lease(lease) => {
                let ttl = change.ttl.unwrap_or(DEFAULT_LEASE_TTL);
                let seen = LeaseSeen {
                    at: Instant::now(),
                    ttl,
                };
                // A renewal of a lease already alive changes no task: no scan of the board
                // (every client renews every third of a TTL, and every board hears it).
                if change.put {
                    if let Some(known) = self.leases.get_mut(&lease) {
                        *known = seen;
                        return Vec::new();
                    }
                }
                let under: Vec<TaskId> = self
                    .tasks
                    .iter()
                    .filter(|(_, s)| s.record.as_ref().is_ok_and(|r| r.lease == Some(lease)))
                    .map(|(id, _)| id.clone())
                    .collect();
                let before: Vec<Option<Face>> = under.iter().map(|id| self.face(id)).collect();
                if change.put {
                    self.leases.insert(lease, seen);
                } else {
                    self.leases.remove(&lease);
                    self.sessions.retain(|_, p| p.lease != Some(lease));
                }
                under
                    .iter()
                    .zip(before)
                    .filter_map(|(id, before)| {
                        let after = self.face(id);
                        self.event(id, before, after, change.rev)
                    })
                    .collect()
            }
            Key::Session(id) => {
                match change.put.then(|| decode_presence(&change.value)).flatten() {
                    Some(p) => {
                        self.sessions.insert(id, p);
                    }
                    None => {
                        self.sessions.remove(&id);
                    }
                }
                Vec::new()
            }
            Key::Other => Vec::new(),
        }
    }

    fn event(
        &self,
        id: &TaskId,
        before: Option<Face>,
        after: Option<Face>,
        rev: u64,
    ) -> Option<TaskEvent> {
        if before == after {
            return None;
        }
        let (new_status, holder, blocked_by) = match after {
            Some((s, h, b)) => (Some(s), h, b),
            None => (None, None, Vec::new()),
        };
        Some(TaskEvent {
            task: id.clone(),
            old_status: before.map(|(s, _, _)| s),
            new_status,
            holder,
            blocked_by,
            revision: rev,
            time: SystemTime::now(),
        })
    }

    /// Leases whose renewals stopped arriving for twice their TTL: the server has let them go,
    /// unless this board's watch missed messages (a delete marker lives 1 s). Read them to know.
    pub fn overdue(&self) -> Vec<i64> {
        self.leases
            .iter()
            .filter(|(_, seen)| seen.at.elapsed() > seen.ttl * 2)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Lease `id` was read and lives: its renewals are late, not gone.
    pub fn lease_lives(&mut self, id: i64) {
        if let Some(seen) = self.leases.get_mut(&id) {
            seen.at = Instant::now();
        }
    }

    /// Every task as of `revision`; records that cannot be read are listed apart.
    pub fn listing(&self) -> Listing {
        let mut listing = Listing {
            tasks: Vec::with_capacity(self.tasks.len()),
            corrupt: Vec::new(),
            revision: self.revision,
        };
        for id in self.tasks.keys() {
            match self.task(id) {
                Some(Ok((task, _))) => listing.tasks.push(task),
                Some(Err(reason)) => listing.corrupt.push(CorruptRecord {
                    key: keys::task(id),
                    reason,
                }),
                None => {}
            }
        }
        listing
    }

    /// The presences whose lease lives (or that have none), sorted by session id.
    pub fn presences(&self) -> Vec<Presence> {
        self.sessions
            .values()
            .filter(|p| p.lease.is_none_or(|l| self.leases.contains_key(&l)))
            .map(|p| p.presence.clone())
            .collect()
    }
}

/// Field of a presence naming the lease it lives under.
pub(crate) const PRESENCE_LEASE_FIELD: &str = "ifc_lease";
/// Field of a presence naming the other leases its process may end claims under: its own
/// earlier ones and those it took over from the session's gone processes. The session's next
/// process takes them over in turn, so runs finished under any of them are reported, however
/// many times in a row the session's agent was killed.
pub(crate) const PRESENCE_INHERITED_FIELD: &str = "ifc_inherited_leases";

pub(crate) fn decode_presence(value: &[u8]) -> Option<StoredPresence> {
    let mut v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let map = v.as_object_mut()?;
    let lease = map.remove(PRESENCE_LEASE_FIELD).and_then(|l| l.as_i64());
    let inherited = map
        .remove(PRESENCE_INHERITED_FIELD)
        .and_then(|l| serde_json::from_value(l).ok())
        .unwrap_or_default();
    let presence = serde_json::from_value(v).ok()?;
    Some(StoredPresence {
        presence,
        lease,
        inherited,
    })
}

pub(crate) fn encode_presence(
    presence: &Presence,
    lease: Option<i64>,
    inherited: &[i64],
) -> bytes::Bytes {
    let mut v = serde_json::to_value(presence).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        if let Some(lease) = lease {
            map.insert(PRESENCE_LEASE_FIELD.into(), serde_json::Value::from(lease));
        }
        if !inherited.is_empty() {
            map.insert(
                PRESENCE_INHERITED_FIELD.into(),
                serde_json::json!(inherited),
            );
        }
    }
    serde_json::to_vec(&v).unwrap_or_default().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, put: bool, value: Vec<u8>, rev: u64) -> Change {
        Change {
            key: key.into(),
            put,
            value: value.into(),
            rev,
            ttl: Some(Duration::from_secs(2)),
        }
    }

    #[test]
    fn a_lease_renewal_changes_nothing_and_its_end_frees_its_claims() {
        let id = TaskId::parse("T").expect("id");
        let mut task = Task::new(id.clone(), TaskStatus::Claimed);
        task.claimed_by = Some(SessionId::parse("s").expect("id"));
        let record = Record {
            lease: Some(7),
            ..Record::plain(task)
        };
        let mut board = Board::default();
        assert!(board
            .apply(&change("leases.7", true, b"{}".to_vec(), 1))
            .is_empty());
        let events = board.apply(&change("tasks.T", true, record.encode(), 2));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].new_status, Some(TaskStatus::Claimed));
        for rev in 3..6 {
            let renewed = board.apply(&change("leases.7", true, b"{}".to_vec(), rev));
            assert!(renewed.is_empty(), "a renewal is no event: {renewed:?}");
        }
        let ended = board.apply(&change("leases.7", false, Vec::new(), 6));
        assert_eq!(
            ended
                .iter()
                .map(|e| (e.task.clone(), e.new_status, e.holder.clone()))
                .collect::<Vec<_>>(),
            [(id, Some(TaskStatus::Available), None)]
        );
    }
}
