//! What a claim, release or put decides on: one task's record and claim key plus its blockers'
//! records, read together in one transaction (or taken from the watch cache), with the revisions
//! the compare-and-swap then checks.

use std::collections::{BTreeMap, BTreeSet};

use agent_core::{TaskId, TaskStatus};
use etcd_client::{KeyValue, TxnOp, TxnOpResponse};

use crate::keys::Keys;
use crate::record::{decode_claim, Record, StoredClaim, StoredRecord};

/// A consistent picture of one task.
#[derive(Debug, Clone, Default)]
pub(crate) struct View {
    pub record: Option<StoredRecord>,
    pub claim: Option<StoredClaim>,
    /// Each blocker's record (`None`: not in `tasks/`).
    pub blockers: BTreeMap<TaskId, Option<StoredRecord>>,
    /// The blockers not in `tasks/` but archived (complete, `ifc archive`).
    pub archived: BTreeSet<TaskId>,
    /// The task's own archived record, if it has one.
    pub archived_self: Option<StoredRecord>,
}

impl View {
    /// A blocker's stored status (`None` if missing or unreadable).
    pub fn blocker_status(&self, id: &TaskId) -> Option<TaskStatus> {
        if self.archived.contains(id) {
            return Some(TaskStatus::Complete);
        }
        let stored = self.blockers.get(id)?.as_ref()?;
        stored.record.as_ref().ok().map(|r| r.task.status)
    }

    /// The blockers the record names that this view has not read.
    pub fn missing_blockers(&self) -> Vec<TaskId> {
        let Some(Ok(rec)) = self.record.as_ref().map(|s| s.record.as_ref()) else {
            return Vec::new();
        };
        rec.task
            .blocked_by
            .iter()
            .filter(|b| !self.blockers.contains_key(*b))
            .cloned()
            .collect()
    }

    /// The revision the record was last written at (0: absent).
    pub fn record_rev(&self) -> i64 {
        self.record.as_ref().map_or(0, |r| r.mod_rev)
    }

    /// The revision the claim key was last written at (0: absent).
    pub fn claim_rev(&self) -> i64 {
        self.claim.as_ref().map_or(0, |c| c.mod_rev)
    }
}

pub(crate) fn stored_record(id: &TaskId, kv: &KeyValue) -> StoredRecord {
    StoredRecord {
        record: Record::decode(id, kv.value()),
        mod_rev: kv.mod_revision(),
    }
}

pub(crate) fn stored_claim(kv: &KeyValue) -> StoredClaim {
    StoredClaim {
        session: decode_claim(kv.value()),
        lease: kv.lease(),
        mod_rev: kv.mod_revision(),
    }
}

/// The reads that make a view: the record, the claim key, the archived record, then each
/// blocker's record and its archive key.
pub(crate) fn read_ops(keys: &Keys, id: &TaskId, blockers: &[TaskId]) -> Vec<TxnOp> {
    let mut ops = vec![
        TxnOp::get(keys.task(id), None),
        TxnOp::get(keys.claim(id), None),
        TxnOp::get(keys.archived(id), None),
    ];
    for b in blockers {
        ops.push(TxnOp::get(keys.task(b), None));
        ops.push(TxnOp::get(keys.archived(b), None));
    }
    ops
}

/// The key the next of a transaction's responses read (`None`: no such key, or no get).
pub(crate) fn next_kv(responses: &mut impl Iterator<Item = TxnOpResponse>) -> Option<KeyValue> {
    match responses.next() {
        Some(TxnOpResponse::Get(get)) => get.kvs().first().cloned(),
        _ => None,
    }
}

/// Builds a view from the responses of [`read_ops`] (the same `blockers`, in order).
pub(crate) fn parse_view(id: &TaskId, blockers: &[TaskId], responses: Vec<TxnOpResponse>) -> View {
    let mut responses = responses.into_iter();
    let mut view = View {
        record: next_kv(&mut responses).map(|kv| stored_record(id, &kv)),
        claim: next_kv(&mut responses).map(|kv| stored_claim(&kv)),
        archived_self: next_kv(&mut responses).map(|kv| stored_record(id, &kv)),
        ..View::default()
    };
    view.add_blockers(blockers, responses);
    view
}

impl View {
    /// Takes in `blockers` from reads of each one's record and archive key, in that order.
    pub fn add_blockers(
        &mut self,
        blockers: &[TaskId],
        responses: impl IntoIterator<Item = TxnOpResponse>,
    ) {
        let mut responses = responses.into_iter();
        for b in blockers {
            let stored = next_kv(&mut responses).map(|kv| stored_record(b, &kv));
            let archived = next_kv(&mut responses);
            if stored.is_none() && archived.is_some() {
                self.archived.insert(b.clone());
            }
            self.blockers.insert(b.clone(), stored);
        }
    }
}
