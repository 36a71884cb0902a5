//! Reads and compare-and-swap writes of one task: a claim, a release, a `put` and a recorded
//! transition each read the task's record and write it back only if nothing was written since
//! (`Nats-Expected-Last-Subject-Sequence`), trying again when something was.

use std::collections::HashMap;

use agent_core::mirror::{self, Decision};
use agent_core::{
    BackendError, BackendResult, Claim, ClaimOutcome, Claimability, FencingToken, Mirrored,
    Patched, PutOutcome, RecordOutcome, ReleaseOutcome, ReleaseTo, SessionId, Task, TaskId,
    TaskPatch, TaskStatus,
};
use async_nats::jetstream::kv::{CreateErrorKind, Operation, UpdateErrorKind};
use chrono::Utc;
use task_record::{Deleted, Imported, Record};

use crate::board::Stored;
use crate::inner::{lock, Held, Inner};
use crate::keys;

/// How many times an operation reads and tries again when the record changed under it.
const TRIES: usize = 64;

/// A write that found the record changed since it was read.
pub(crate) enum Write {
    Done(u64),
    Moved,
}

impl Inner {
    /// The record of `id` and its revision; `None` if there is no such task.
    pub async fn read(&self, id: &TaskId) -> BackendResult<Option<Stored>> {
        let entry = self
            .kv
            .entry(keys::task(id))
            .await
            .map_err(|e| self.error("read a task", e))?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .map(|e| Stored::decode(id, &e.value, e.revision)))
    }

    /// The effective task of a record and its token, asking the store whether its lease lives.
    pub async fn effective(
        &self,
        id: &TaskId,
        stored: &Stored,
    ) -> BackendResult<(Task, Option<u64>)> {
        let lease = stored.record.as_ref().ok().and_then(|r| r.lease);
        let alive = match lease {
            Some(l) => self.lease_alive(l).await?,
            None => true,
        };
        stored
            .effective(|_| alive)
            .map_err(|reason| BackendError::Corrupt {
                key: keys::task(id),
                reason,
            })
    }

    pub async fn get(&self, id: &TaskId) -> BackendResult<Option<Task>> {
        match self.read(id).await? {
            Some(stored) => Ok(Some(self.effective(id, &stored).await?.0)),
            None => Ok(None),
        }
    }

    /// Writes `record` over revision `rev` (0: the key must not exist).
    async fn write(&self, id: &TaskId, record: &Record, rev: Option<u64>) -> BackendResult<Write> {
        let key = keys::task(id);
        let value = record.encode().into();
        match rev {
            None => match self.kv.create(key, value).await {
                Ok(seq) => Ok(Write::Done(seq)),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(Write::Moved),
                Err(e) => Err(self.error("create a task", e)),
            },
            Some(rev) => match self.kv.update(key, value, rev).await {
                Ok(seq) => Ok(Write::Done(seq)),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(Write::Moved),
                Err(e) => Err(self.error("write a task", e)),
            },
        }
    }

    fn too_busy(&self, what: &str, id: &TaskId) -> BackendError {
        BackendError::Unavailable {
            endpoint: self.endpoint(),
            reason: format!("{what} {id}: the record changed under {TRIES} tries in a row"),
        }
    }

    /// Whether the claim `stored` records is this client's to take again or end: made without a
    /// lease, under one of this client's, or under a one-shot command's (no process runs it).
    async fn ours(&self, stored: &Stored) -> BackendResult<bool> {
        match stored.record.as_ref().ok().and_then(|r| r.lease) {
            None => Ok(true),
            Some(l) if self.is_mine(l) => Ok(true),
            Some(l) => self.one_shot_lease(l).await,
        }
    }

    /// The effective status of each of `task`'s blockers (`None`: no such task).
    async fn blockers(&self, task: &Task) -> BackendResult<HashMap<TaskId, Option<TaskStatus>>> {
        let mut out = HashMap::new();
        for b in &task.blocked_by {
            let status = match self.read(b).await? {
                Some(s) => Some(self.effective(b, &s).await?.0.status),
                None => None,
            };
            out.insert(b.clone(), status);
        }
        Ok(out)
    }

    /// A claim decided from the watch's board, when this client has one and the board says the
    /// task may be claimed: one compare-and-swap on the revision the board holds. `None` when
    /// the board cannot decide (it lacks the task, says no, or the record moved on since): the
    /// caller reads the store. A "no" is never taken from the board, which may be behind.
    async fn claim_from_board(
        self: &std::sync::Arc<Self>,
        id: &TaskId,
        session: &SessionId,
    ) -> BackendResult<Option<ClaimOutcome>> {
        let Some(board) = lock(&self.watched)
            .as_ref()
            .and_then(std::sync::Weak::upgrade)
        else {
            return Ok(None);
        };
        let (rev, current) = {
            let b = lock(&board);
            let Some(Ok((current, _))) = b.task(id) else {
                return Ok(None);
            };
            let status_of = |x: &TaskId| b.task(x).and_then(Result::ok).map(|(t, _)| t.status);
            // A task its session holds already is decided from a read (whose lease it is under).
            if current.status == TaskStatus::Claimed
                || current.claimability(session, status_of) != Claimability::Yes
            {
                return Ok(None);
            }
            let Some(stored) = b.tasks.get(id) else {
                return Ok(None);
            };
            (stored.rev, current)
        };
        self.write_claim(id, session, current, rev).await
    }

    /// Writes the claim of `current` (the task as read at `rev`) for `session`: the outcome, or
    /// `None` if the record moved on since `rev`.
    async fn write_claim(
        self: &std::sync::Arc<Self>,
        id: &TaskId,
        session: &SessionId,
        current: Task,
        rev: u64,
    ) -> BackendResult<Option<ClaimOutcome>> {
        let lease = self.claim_lease().await?;
        let mut next = current;
        next.status = TaskStatus::Claimed;
        next.claimed_by = Some(session.clone());
        next.claimed_at = Some(Utc::now());
        next.copied = false;
        let record = Record {
            lease,
            ..Record::plain(next)
        };
        let Write::Done(token) = self.write(id, &record, Some(rev)).await? else {
            return Ok(None);
        };
        lock(&self.held).insert(
            id.clone(),
            Held {
                session: session.clone(),
                token,
                lease,
            },
        );
        Ok(Some(ClaimOutcome::Won(Claim {
            task: id.clone(),
            session: session.clone(),
            token: FencingToken(token),
            leased: lease.is_some(),
        })))
    }

    pub async fn claim(
        self: &std::sync::Arc<Self>,
        id: &TaskId,
        session: &SessionId,
    ) -> BackendResult<ClaimOutcome> {
        if let Some(outcome) = self.claim_from_board(id, session).await? {
            return Ok(outcome);
        }
        for _ in 0..TRIES {
            let Some(stored) = self.read(id).await? else {
                return Ok(ClaimOutcome::NotFound);
            };
            let (current, _) = self.effective(id, &stored).await?;
            let blockers = self.blockers(&current).await?;
            match current.claimability(session, |b| blockers.get(b).copied().flatten()) {
                Claimability::Held(holder) => return Ok(ClaimOutcome::Lost { holder }),
                Claimability::No(status) => return Ok(ClaimOutcome::NotClaimable { status }),
                Claimability::Yes => {}
            }
            // Held by this session under another process's lease: that process runs it (an
            // agent of the session), unless the lease is a one-shot command's, or that process
            // is known to be gone (its lease is revoked now, and so its claim).
            if current.status == TaskStatus::Claimed && !self.ours(&stored).await? {
                let lease = stored.record.as_ref().ok().and_then(|r| r.lease);
                if let Some(l) = lease {
                    if self.revoke_if_dead(session, l).await? {
                        continue;
                    }
                }
                return Ok(ClaimOutcome::Lost {
                    holder: Some(session.clone()),
                });
            }
            if let Some(outcome) = self.write_claim(id, session, current, stored.rev).await? {
                return Ok(outcome);
            }
        }
        Err(self.too_busy("claim", id))
    }

    pub async fn release(
        &self,
        id: &TaskId,
        session: &SessionId,
        to: ReleaseTo,
        token: Option<FencingToken>,
    ) -> BackendResult<ReleaseOutcome> {
        for _ in 0..TRIES {
            let Some(stored) = self.read(id).await? else {
                return Ok(ReleaseOutcome::NotFound);
            };
            let (current, live_token) = self.effective(id, &stored).await?;
            let record = stored
                .record
                .as_ref()
                .map_err(|reason| BackendError::Corrupt {
                    key: keys::task(id),
                    reason: reason.clone(),
                })?;
            let holder = (current.status == TaskStatus::Claimed)
                .then(|| current.claimed_by.clone())
                .flatten();
            // Under a lease of another client (the same session id run twice): not ours to end.
            let ours = self.ours(&stored).await?;
            let holds = holder.as_ref() == Some(session)
                && token.is_none_or(|t| Some(t.0) == live_token)
                && ours;
            if !holds {
                if agent_core::model::already_completed_by(&current, session, to) {
                    return Ok(ReleaseOutcome::Released {
                        token: token.unwrap_or(FencingToken(0)),
                    });
                }
                // Its lease ended and nobody wrote the task since: the run finished once.
                let lapsed = to == ReleaseTo::Complete
                    && record.task.status == TaskStatus::Claimed
                    && record.task.claimed_by.as_ref() == Some(session)
                    && ours
                    && record.claim_rev.is_none()
                    && token.is_some_and(|t| t.0 == stored.rev);
                if !lapsed {
                    return Ok(ReleaseOutcome::NotHolder { holder });
                }
            }
            let mut next = record.task.clone();
            next.status = to.status();
            next.copied = false;
            if to == ReleaseTo::Available {
                next.claimed_by = None;
                next.claimed_at = None;
            }
            let released = token.map_or(live_token.unwrap_or(stored.rev), |t| t.0);
            // Not the holder's loss: the holder ends it.
            let was = lock(&self.held).remove(id);
            match self.write(id, &Record::plain(next), Some(stored.rev)).await {
                Ok(Write::Done(_)) => {
                    return Ok(ReleaseOutcome::Released {
                        token: FencingToken(released),
                    })
                }
                Ok(Write::Moved) => {
                    if let Some(h) = was {
                        lock(&self.held).insert(id.clone(), h);
                    }
                    continue;
                }
                Err(e) => {
                    if let Some(h) = was {
                        lock(&self.held).insert(id.clone(), h);
                    }
                    return Err(e);
                }
            }
        }
        Err(self.too_busy("release", id))
    }

    pub async fn put(&self, id: &TaskId, patch: &TaskPatch) -> BackendResult<PutOutcome> {
        patch.validate(id)?;
        for _ in 0..TRIES {
            let Some(stored) = self.read(id).await? else {
                let record = Record::plain(patch.create(id.clone()));
                match self.write(id, &record, None).await? {
                    Write::Done(_) => return Ok(PutOutcome::Created),
                    Write::Moved => continue,
                }
            };
            let (current, token) = self.effective(id, &stored).await?;
            let next = match patch.apply(&current) {
                Patched::Unchanged => return Ok(PutOutcome::Unchanged),
                Patched::Held(holder) => return Ok(PutOutcome::Held { holder }),
                Patched::Changed(next) => next,
            };
            // A claim the edit keeps stays under its lease, with its token.
            let claimed = next.status == TaskStatus::Claimed && token.is_some();
            let lease = stored.record.as_ref().ok().and_then(|r| r.lease);
            let record = Record {
                lease: lease.filter(|_| claimed),
                claim_rev: token.filter(|_| claimed).map(|t| t as i64),
                ..Record::plain(next)
            };
            match self.write(id, &record, Some(stored.rev)).await? {
                Write::Done(_) => return Ok(PutOutcome::Updated),
                Write::Moved => continue,
            }
        }
        Err(self.too_busy("put", id))
    }

    pub async fn record(&self, items: &[Mirrored]) -> BackendResult<Vec<RecordOutcome>> {
        let mut out = Vec::with_capacity(items.len());
        for want in items {
            out.push(self.record_one(want).await?);
        }
        Ok(out)
    }

    async fn record_one(&self, want: &Mirrored) -> BackendResult<RecordOutcome> {
        let id = &want.task;
        for _ in 0..TRIES {
            let Some(stored) = self.read(id).await? else {
                return Ok(RecordOutcome::NotFound);
            };
            let (current, _) = self.effective(id, &stored).await?;
            // A claim under another client's live lease ends by its holder's release or by the
            // lease's end, not by another store's "available".
            let leased_elsewhere = current.status == TaskStatus::Claimed
                && stored
                    .record
                    .as_ref()
                    .ok()
                    .and_then(|r| r.lease)
                    .is_some_and(|l| !self.is_mine(l));
            let freeing = matches!(want.status, TaskStatus::Available | TaskStatus::Blocked);
            match mirror::decide(&current, want) {
                Decision::Skip(outcome) => return Ok(outcome),
                Decision::Write if leased_elsewhere && freeing => {
                    return Ok(RecordOutcome::Kept {
                        reason: "held under a live lease".into(),
                    })
                }
                Decision::Write
                    if task_record::changed_since_claim(
                        stored.record.as_ref(),
                        stored.rev,
                        want,
                    ) =>
                {
                    return Ok(RecordOutcome::Kept {
                        reason: "the task was reopened or changed hands here after that claim"
                            .into(),
                    })
                }
                Decision::Write => {
                    let next = mirror::applied(&current, want);
                    // A recorded claim is fenced by the token it had where it was made.
                    let claim_rev = want
                        .token
                        .filter(|_| next.status == TaskStatus::Claimed)
                        .map(|t| t.0 as i64);
                    let record = Record {
                        claim_rev,
                        ..Record::plain(next)
                    };
                    match self.write(id, &record, Some(stored.rev)).await? {
                        Write::Done(_) => return Ok(RecordOutcome::Written),
                        Write::Moved => continue,
                    }
                }
            }
        }
        Err(self.too_busy("record", id))
    }
}

impl Inner {
    /// Writes a board row as the board states it: never moving the task backwards (complete
    /// stays complete, a live claim of another session stays) unless `force`; in a dry run,
    /// only says what it would do.
    pub async fn import(&self, want: &Task, force: bool, dry_run: bool) -> BackendResult<Imported> {
        let id = &want.id;
        for _ in 0..TRIES {
            let stored = self.read(id).await?;
            let (outcome, next, rev) = match &stored {
                None => (Imported::Created, Record::plain(want.clone()), None),
                Some(stored) => {
                    let (current, _) = self.effective(id, stored).await?;
                    let leased = stored.record.as_ref().is_ok_and(|r| r.lease.is_some());
                    let task = match Imported::plan(&current, want, force, leased, "NATS") {
                        Ok(task) => task,
                        Err(outcome) => return Ok(outcome),
                    };
                    (Imported::Updated, Record::plain(task), Some(stored.rev))
                }
            };
            if dry_run {
                return Ok(outcome);
            }
            match self.write(id, &next, rev).await? {
                Write::Done(_) => return Ok(outcome),
                Write::Moved => continue,
            }
        }
        Err(self.too_busy("import", id))
    }
}

impl Inner {
    /// An operator's delete of a task, by compare-and-swap: never a claimed task (its holder's
    /// run would be fenced) nor one that tasks not complete wait for, unless `force`.
    pub async fn delete(&self, id: &TaskId, force: bool) -> BackendResult<Deleted> {
        for _ in 0..TRIES {
            let Some(stored) = self.read(id).await? else {
                return Ok(Deleted::NotFound);
            };
            match self.effective(id, &stored).await {
                Ok((current, _)) if !force => {
                    if current.status == TaskStatus::Claimed {
                        return Ok(Deleted::Held {
                            holder: current.claimed_by,
                        });
                    }
                    let dependents: Vec<TaskId> = crate::watch::open(self)
                        .await?
                        .0
                        .listing()
                        .tasks
                        .into_iter()
                        .filter(|t| t.status != TaskStatus::Complete && t.blocked_by.contains(id))
                        .map(|t| t.id)
                        .collect();
                    if !dependents.is_empty() {
                        return Ok(Deleted::Blocks { dependents });
                    }
                }
                // Forced; an unreadable record holds nothing and nobody waits for it by name.
                Ok(_) => {}
                Err(BackendError::Corrupt { .. }) if force => {}
                Err(BackendError::Corrupt { key, reason }) => {
                    return Err(BackendError::Corrupt {
                        key,
                        reason: Deleted::corrupt_reason(id, &reason),
                    })
                }
                Err(e) => return Err(e),
            }
            match self
                .kv
                .delete_expect_revision(keys::task(id), Some(stored.rev))
                .await
            {
                Ok(()) => return Ok(Deleted::Deleted),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(self.error("delete a task", e)),
            }
        }
        Err(self.too_busy("delete", id))
    }
}
