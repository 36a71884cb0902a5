//! The watch cache: a mirror of the task records and claim keys in its scope at one revision, the
//! event diff that turns key changes into `TaskEvent`s (handed out by `fanout`), and the claims
//! this client holds (so it can tell a holder that its claim is gone). Pure state; the informer
//! feeds it.
//!
//! The scope is what the process's first subscription covers (an agent: its list and, at any
//! depth, what those tasks wait for), or every task. Keys outside it are not decoded nor kept, so
//! an agent's memory and work per event follow its list, not the board (issue 18). A blocker
//! named later, or a task this client claims outside the scope, joins it: until the informer
//! has read it at the cache's revision (`adopt`) it is *pending*, and the cache answers nothing
//! about it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::SystemTime;

use agent_core::interest::Covered;
use agent_core::{
    BackendEvent, CorruptRecord, FencingToken, Interest, Listing, SessionId, TaskEvent, TaskId,
    TaskStatus,
};

use crate::fanout::Outgoing;
use crate::record::{effective, effective_face, StoredClaim, StoredRecord};
use crate::view::View;

/// A claim this client won and has not released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held {
    pub session: SessionId,
    pub token: i64,
    pub lease: Option<i64>,
}

/// One key change from the watch (or a re-list).
#[derive(Debug, Clone)]
pub(crate) enum Change {
    Record(TaskId, Option<StoredRecord>),
    Claim(TaskId, Option<StoredClaim>),
}

/// A record left `claimed` under a lease whose claim key is gone: to be reset to `available`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Repair {
    pub task: TaskId,
    pub record_rev: i64,
}

/// What watchers are told of: the effective status and holder, and the blockers (a waiting
/// session must hear of a blocker edit, whose status may not change: issue 15 #4).
type Face = Option<(TaskStatus, Option<SessionId>, Vec<TaskId>)>;

#[derive(Debug, Default)]
pub(crate) struct Cache {
    pub synced: bool,
    pub revision: i64,
    records: HashMap<TaskId, StoredRecord>,
    claims: HashMap<TaskId, StoredClaim>,
    /// Events produced under the lock, handed out after it (see `fanout`).
    outbox: Vec<Outgoing>,
    held: HashMap<TaskId, Held>,
    /// What the cache mirrors (the default: every task).
    scope: Covered,
    /// Tasks that joined the scope and are not read yet, with the revision they joined at.
    pending: HashMap<TaskId, i64>,
}

impl Cache {
    /// What watchers see of a task: its effective status, holder and blockers.
    fn face(&self, id: &TaskId) -> Face {
        let stored = self.records.get(id)?;
        match effective_face(stored, self.claims.get(id)) {
            Ok((status, holder, _)) => {
                let blockers = stored
                    .record
                    .as_ref()
                    .map(|r| r.task.blocked_by.clone())
                    .unwrap_or_default();
                Some((status, holder, blockers))
            }
            // A corrupt record has no status to report; it reads as absent to watchers.
            Err(_) => None,
        }
    }

    /// Mirrors what `interest` covers, from the next list on (set before the first).
    pub fn set_scope(&mut self, interest: Interest) {
        self.scope = Covered::new(interest, std::iter::empty(), |_| None);
    }

    /// What the cache mirrors.
    pub fn scope(&self) -> &Interest {
        self.scope.interest()
    }

    /// Whether the cache mirrors everything `interest` covers.
    pub fn scope_holds(&self, interest: &Interest) -> bool {
        let scope = self.scope.interest();
        scope.is_all() || scope == interest
    }

    /// Mirrors every task from the next list on; until then the cache answers nothing.
    pub fn widen(&mut self) {
        self.scope = Covered::default();
        self.pending.clear();
        self.synced = false;
    }

    /// Whether the cache mirrors `id` (in its scope and read).
    pub fn tracks(&self, id: &TaskId) -> bool {
        self.scope.covers(id) && !self.pending.contains_key(id)
    }

    /// The pending tasks (to read at the cache's revision, then `adopt`).
    pub fn pending(&self) -> Vec<TaskId> {
        self.pending.keys().cloned().collect()
    }

    /// How many task records the cache mirrors.
    pub fn mirrored(&self) -> usize {
        self.records.len()
    }

    /// `ids` join the scope at `revision`, with what they wait for; those not mirrored yet
    /// become pending. Returns whether any did.
    fn extend_scope(&mut self, ids: &[TaskId], revision: i64) -> bool {
        let records = &self.records;
        let added = self
            .scope
            .add_blockers(ids, &|id: &TaskId| blockers_in(records, id));
        let before = self.pending.len();
        self.pending.extend(
            added
                .into_iter()
                .filter(|id| !self.records.contains_key(id))
                .map(|id| (id, revision)),
        );
        self.pending.len() > before
    }

    /// The blockers a tracked record names join the scope at `revision`.
    fn follow_blockers(&mut self, id: &TaskId, revision: i64) {
        let named = match self.records.get(id).map(|s| &s.record) {
            Some(Ok(r)) if !r.task.blocked_by.is_empty() => r.task.blocked_by.clone(),
            _ => return,
        };
        self.extend_scope(&named, revision);
    }

    /// Takes in the pending tasks read at `revision` (the cache's): each is mirrored from
    /// now on. One that changed since it joined the scope is told of (an event at `revision`):
    /// the watch passed that change by, and a subscriber covering it must hear it. Ignored if
    /// the cache moved on meanwhile (read them again). Returns the repairs it calls for.
    pub fn adopt(&mut self, revision: i64, fetched: crate::scoped::Stored) -> Vec<Repair> {
        if revision != self.revision || !self.synced {
            return Vec::new();
        }
        let (mut records, mut claims) = fetched;
        let joined: Vec<(TaskId, i64)> = self.pending.drain().collect();
        let mut before: BTreeMap<TaskId, Face> = BTreeMap::new();
        for (id, at) in &joined {
            let record = records.remove(id);
            let claim = claims.remove(id);
            let changed = record.as_ref().is_some_and(|r| r.mod_rev >= *at)
                || claim.as_ref().is_some_and(|c| c.mod_rev >= *at);
            if let Some(r) = record {
                self.records.insert(id.clone(), r);
            }
            if let Some(c) = claim {
                self.claims.insert(id.clone(), c);
            }
            let old = if changed { None } else { self.face(id) };
            before.insert(id.clone(), old);
        }
        for (id, at) in &joined {
            self.follow_blockers(id, *at);
        }
        self.after_change(revision, before)
    }

    /// Applies the changes of one revision; returns the repairs it calls for. Changes of tasks
    /// outside the scope are ignored.
    pub fn apply(&mut self, revision: i64, mut changes: Vec<Change>) -> Vec<Repair> {
        changes.retain(|c| match c {
            Change::Record(id, _) | Change::Claim(id, _) => self.tracks(id),
        });
        let touched: BTreeSet<TaskId> = changes
            .iter()
            .map(|c| match c {
                Change::Record(id, _) | Change::Claim(id, _) => id.clone(),
            })
            .collect();
        let before: BTreeMap<TaskId, Face> = touched
            .iter()
            .map(|id| (id.clone(), self.face(id)))
            .collect();
        for change in changes {
            match change {
                Change::Record(id, Some(r)) => {
                    self.records.insert(id, r);
                }
                Change::Record(id, None) => {
                    self.records.remove(&id);
                }
                Change::Claim(id, Some(c)) => {
                    self.claims.insert(id, c);
                }
                Change::Claim(id, None) => {
                    self.claims.remove(&id);
                }
            }
        }
        self.revision = self.revision.max(revision);
        for id in &touched {
            self.follow_blockers(id, revision);
        }
        self.after_change(revision, before)
    }

    /// Replaces the whole mirror (after a list of every task); keeps what the scope covers and
    /// emits the difference as events at `revision`.
    pub fn replace(
        &mut self,
        revision: i64,
        mut records: HashMap<TaskId, StoredRecord>,
        mut claims: HashMap<TaskId, StoredClaim>,
    ) -> Vec<Repair> {
        if !self.scope.interest().is_all() {
            let of = |id: &TaskId| blockers_in(&records, id);
            let mut scope = Covered::new(self.scope.interest().clone(), records.keys(), of);
            // The claims this client holds stay in sight.
            let held: Vec<TaskId> = self.held.keys().cloned().collect();
            scope.add_blockers(&held, &of);
            records.retain(|id, _| scope.covers(id));
            claims.retain(|id, _| scope.covers(id));
            self.scope = scope;
        }
        self.pending.clear();
        let touched: BTreeSet<TaskId> = self
            .records
            .keys()
            .chain(records.keys())
            .chain(self.claims.keys())
            .chain(claims.keys())
            .cloned()
            .collect();
        let before: BTreeMap<TaskId, Face> = touched
            .iter()
            .map(|id| (id.clone(), self.face(id)))
            .collect();
        self.records = records;
        self.claims = claims;
        self.revision = revision;
        self.synced = true;
        self.after_change(revision, before)
    }

    fn after_change(&mut self, revision: i64, before: BTreeMap<TaskId, Face>) -> Vec<Repair> {
        let mut repairs = Vec::new();
        for (id, old) in before {
            let new = self.face(&id);
            if old != new {
                let event = TaskEvent {
                    task: id.clone(),
                    old_status: old.map(|(s, _, _)| s),
                    new_status: new.as_ref().map(|(s, _, _)| *s),
                    holder: new.as_ref().and_then(|(_, h, _)| h.clone()),
                    blocked_by: new.as_ref().map(|(_, _, b)| b.clone()).unwrap_or_default(),
                    revision: u64::try_from(revision).unwrap_or_default(),
                    time: SystemTime::now(),
                };
                self.broadcast(Some(revision), BackendEvent::Task(event));
            }
            self.check_held(&id);
            if let Some(stored) = self.records.get(&id) {
                let dead_claim = matches!(&stored.record, Ok(r) if r.task.status == TaskStatus::Claimed && r.lease.is_some())
                    && !self.claims.contains_key(&id);
                if dead_claim {
                    repairs.push(Repair {
                        task: id.clone(),
                        record_rev: stored.mod_rev,
                    });
                }
            }
        }
        repairs
    }

    /// Tells the holder if the cache, at or past its claim's revision, no longer shows the claim.
    fn check_held(&mut self, id: &TaskId) {
        let Some(held) = self.held.get(id) else {
            return;
        };
        if self.revision < held.token {
            return; // the cache has not caught up with the claim yet
        }
        let still = self
            .records
            .get(id)
            .and_then(|s| effective(s, self.claims.get(id)).ok())
            .is_some_and(|(task, token)| {
                task.claimed_by.as_ref() == Some(&held.session) && token == Some(held.token)
            });
        if !still {
            self.lose(id);
        }
    }

    fn lose(&mut self, id: &TaskId) {
        if let Some(held) = self.held.remove(id) {
            let token = FencingToken(u64::try_from(held.token).unwrap_or_default());
            self.broadcast(
                None,
                BackendEvent::ClaimLost {
                    task: id.clone(),
                    session: held.session,
                    token,
                },
            );
        }
    }

    /// Every claim held under `lease` is lost (the lease ended).
    pub fn lease_lost(&mut self, lease: i64) {
        let ids: Vec<TaskId> = self
            .held
            .iter()
            .filter(|(_, h)| h.lease == Some(lease))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.lose(&id);
        }
    }

    /// Remembers a claim this client holds; a task outside the scope joins it (so the cache can
    /// tell when the claim is gone). Returns whether the informer has tasks to read.
    pub fn hold(&mut self, task: TaskId, held: Held) -> bool {
        self.held.insert(task.clone(), held);
        self.extend_scope(&[task], self.revision)
    }

    /// Forgets the claim on `task` (returned, so it can be put back).
    pub fn unhold(&mut self, task: &TaskId) -> Option<Held> {
        self.held.remove(task)
    }

    fn broadcast(&mut self, revision: Option<i64>, event: BackendEvent) {
        self.outbox.push((revision, event));
    }

    /// The events produced since the last call, for `Fanout::deliver`.
    pub fn take_outbox(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outbox)
    }

    /// The effective status of one task in the mirror (`None`: unknown, corrupt, or not synced).
    pub fn status(&self, id: &TaskId) -> Option<TaskStatus> {
        if !self.synced || !self.tracks(id) {
            return None;
        }
        self.face(id).map(|(status, _, _)| status)
    }

    /// The view of one task, if the cache is synced and mirrors it and its blockers.
    pub fn view(&self, id: &TaskId) -> Option<View> {
        if !self.synced || !self.tracks(id) {
            return None;
        }
        let record = self.records.get(id).cloned();
        let mut view = View {
            record,
            claim: self.claims.get(id).cloned(),
            ..View::default()
        };
        for b in view.missing_blockers() {
            if !self.tracks(&b) {
                return None;
            }
            let stored = self.records.get(&b).cloned();
            view.blockers.insert(b, stored);
        }
        Some(view)
    }

    /// Every readable task's blockers.
    pub fn blockers(&self) -> Vec<(&TaskId, &[TaskId])> {
        self.records
            .iter()
            .filter_map(|(id, stored)| {
                let r = stored.record.as_ref().ok()?;
                Some((id, r.task.blocked_by.as_slice()))
            })
            .collect()
    }

    pub fn listing(&self, keys: &crate::keys::Keys) -> Listing {
        listing(keys, self.revision, &self.records, &self.claims)
    }
}

/// What the readable record of `id` in `records` waits for.
fn blockers_in<'a>(
    records: &'a HashMap<TaskId, StoredRecord>,
    id: &TaskId,
) -> Option<&'a [TaskId]> {
    let stored = records.get(id)?;
    stored
        .record
        .as_ref()
        .ok()
        .map(|r| r.task.blocked_by.as_slice())
}

/// Effective tasks (sorted by id) and corrupt records from raw records and claim keys.
pub(crate) fn listing(
    keys: &crate::keys::Keys,
    revision: i64,
    records: &HashMap<TaskId, StoredRecord>,
    claims: &HashMap<TaskId, StoredClaim>,
) -> Listing {
    let mut out = Listing {
        revision: u64::try_from(revision).unwrap_or_default(),
        ..Listing::default()
    };
    for (id, stored) in records {
        match effective(stored, claims.get(id)) {
            Ok((task, _)) => out.tasks.push(task),
            Err(reason) => out.corrupt.push(CorruptRecord {
                key: keys.task(id),
                reason,
            }),
        }
    }
    out.tasks.sort_by(|a, b| a.id.cmp(&b.id));
    out.corrupt.sort_by(|a, b| a.key.cmp(&b.key));
    out
}
