//! The operations as compare-and-swap transactions: claim (one transaction when the cache is
//! current), release (fenced on the claim key), put (read-modify-write), get and list.

use std::collections::HashMap;
use std::sync::Arc;

use agent_core::{
    BackendError, BackendResult, Claim, ClaimOutcome, Claimability, FencingToken, Interest,
    Listing, Patched, PutOutcome, ReleaseOutcome, ReleaseTo, SessionId, Task, TaskId, TaskPatch,
    TaskStatus,
};
use chrono::Utc;
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::cache::{listing, Held};
use crate::inner::Inner;
use crate::record::{effective, encode_claim, Record};
use crate::scoped::TASKS_PER_READ;
use crate::view::{parse_view, read_ops, stored_claim, stored_record, View};

/// Every task record and claim key at one revision, as stored.
pub(crate) struct RawListing {
    pub revision: i64,
    pub records: HashMap<TaskId, crate::record::StoredRecord>,
    pub claims: HashMap<TaskId, crate::record::StoredClaim>,
    /// Keys under `tasks/` whose id is not valid.
    pub bad_keys: Vec<agent_core::CorruptRecord>,
}

/// Whether a read at a revision failed because etcd compacted that revision away.
pub(crate) fn compacted(e: &BackendError) -> bool {
    matches!(e, BackendError::Rejected { reason, .. } if reason.contains("compacted"))
}

/// Most blockers a task on etcd may name (see `Inner::claimable_with`).
pub(crate) const MAX_BLOCKERS: usize = 100;

/// How many compare-and-swap rounds an operation tries before reporting contention.
const MAX_ROUNDS: usize = 16;

/// The claim of `view`'s task that ended with its lease, with nobody's write since.
fn lapsed_in(view: &View) -> Option<task_record::Lapsed> {
    let stored = view.record.as_ref().filter(|_| view.claim.is_none())?;
    let record = stored.record.as_ref().ok()?;
    record.lapsed_claim(stored.mod_rev)
}

fn token(rev: i64) -> FencingToken {
    FencingToken(u64::try_from(rev).unwrap_or_default())
}

impl Inner {
    /// Reads a fresh view of `id`: its record and claim key, then (`with_blockers`) the
    /// blockers the record names at the same revision, [`TASKS_PER_READ`] per read.
    pub(crate) async fn read_view(&self, id: &TaskId, with_blockers: bool) -> BackendResult<View> {
        'again: for _ in 0..MAX_ROUNDS {
            let txn = Txn::new().and_then(read_ops(&self.keys, id, &[]));
            let resp = self.conn.read_txn("read", txn).await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            let mut view = parse_view(id, &[], resp.op_responses());
            let blockers = if with_blockers {
                view.missing_blockers()
            } else {
                Vec::new()
            };
            for chunk in blockers.chunks(TASKS_PER_READ) {
                let at = Some(GetOptions::new().with_revision(revision));
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .flat_map(|b| {
                        [
                            TxnOp::get(self.keys.task(b), at.clone()),
                            TxnOp::get(self.keys.archived(b), at.clone()),
                        ]
                    })
                    .collect();
                let read = match self.conn.read_txn("read", Txn::new().and_then(ops)).await {
                    Ok(read) => read,
                    Err(e) if compacted(&e) => continue 'again,
                    Err(e) => return Err(e),
                };
                view.add_blockers(chunk, read.op_responses());
            }
            return Ok(view);
        }
        Err(self.contention(id))
    }

    /// The cached view if the cache is synced, else a fresh read. The flag says which.
    async fn view(&self, id: &TaskId) -> BackendResult<(View, bool)> {
        let cached = self.cache().view(id);
        match cached {
            Some(view) => Ok((view, false)),
            None => Ok((self.read_view(id, true).await?, true)),
        }
    }

    /// Completes `view` after a failed compare: the else branch read the same keys.
    async fn refreshed(
        &self,
        id: &TaskId,
        blockers: &[TaskId],
        responses: Vec<TxnOpResponse>,
    ) -> BackendResult<View> {
        let mut view = parse_view(id, blockers, responses);
        if !view.missing_blockers().is_empty() {
            view = self.read_view(id, true).await?;
        }
        Ok(view)
    }

    fn corrupt(&self, id: &TaskId, reason: String) -> BackendError {
        BackendError::Corrupt {
            key: self.keys.task(id),
            reason,
        }
    }

    /// Refuses more blockers than a claim can compare: a claim checks every blocker in its one
    /// transaction, and etcd takes at most 128 comparisons in one (`--max-txn-ops`). Stored,
    /// such a task could never be claimed.
    pub(crate) fn claimable_with(&self, id: &TaskId, blockers: &[TaskId]) -> BackendResult<()> {
        if blockers.len() > MAX_BLOCKERS {
            return Err(BackendError::InvalidInput(format!(
                "{id} names {} blockers; a task on etcd may wait for at most {MAX_BLOCKERS} (a claim compares each in one transaction): chain them through intermediate tasks",
                blockers.len()
            )));
        }
        Ok(())
    }

    /// `id` is in the archive: it is not created again.
    pub(crate) fn archived_already(&self, id: &TaskId) -> BackendError {
        BackendError::InvalidInput(format!(
            "{id} is archived (complete, moved out of {}): `ifc archive --restore {id}` puts it back",
            self.keys.tasks_prefix()
        ))
    }

    fn contention(&self, id: &TaskId) -> BackendError {
        BackendError::Unavailable {
            endpoint: self.conn.endpoints().to_owned(),
            reason: format!(
                "{}: still changing after {MAX_ROUNDS} compare-and-swap rounds",
                self.keys.task(id)
            ),
        }
    }

    /// The effective task in `view` and the token of its live claim; `None`: no such task.
    pub(crate) fn current(
        &self,
        id: &TaskId,
        view: &View,
    ) -> BackendResult<Option<(Task, Option<i64>)>> {
        let Some(stored) = &view.record else {
            return Ok(None);
        };
        effective(stored, view.claim.as_ref())
            .map(Some)
            .map_err(|r| self.corrupt(id, r))
    }

    /// A task, from `tasks/` or, if it is not there, from the archive (`ifc archive`: a
    /// complete task kept out of lists and watches; tasks may still name it as a blocker).
    pub(crate) async fn get(&self, id: &TaskId) -> BackendResult<Option<Task>> {
        let view = self.read_view(id, false).await?;
        let Some(stored) = &view.record else {
            return match view.archived_self.map(|s| s.record) {
                Some(Ok(r)) => Ok(Some(r.task)),
                Some(Err(reason)) => Err(BackendError::Corrupt {
                    key: self.keys.archived(id),
                    reason,
                }),
                None => Ok(None),
            };
        };
        effective(stored, view.claim.as_ref())
            .map(|(t, _)| Some(t))
            .map_err(|r| self.corrupt(id, r))
    }

    /// The tasks `interest` covers (every task: the whole list) and the records that cannot
    /// be read among what was read.
    pub(crate) async fn list_of(&self, interest: &Interest) -> BackendResult<Listing> {
        let raw = self.list_in(interest).await?;
        let mut out = listing(&self.keys, raw.revision, &raw.records, &raw.claims);
        out.corrupt.extend(raw.bad_keys);
        out.corrupt.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(interest.filter(out))
    }

    /// Every task record and claim key, read at one revision: two range reads, the second at
    /// the first's revision. Not a read-only transaction: etcd before 3.5.5 panics when the
    /// client of one goes away while etcd applies it (etcd-io/etcd#14110), and a list of a big
    /// board takes long enough to apply that a request deadline, or a CLI exiting after it,
    /// lands in the middle (`ifc --request-timeout 3ms status` on 30,000 tasks took etcd 3.5.1
    /// down). A range read that loses its client just ends.
    pub(crate) async fn list_raw(&self) -> BackendResult<RawListing> {
        for _ in 0..MAX_ROUNDS {
            let tasks = self.range("list", self.keys.tasks_prefix(), None).await?;
            let revision = tasks.header().map_or(0, |h| h.revision());
            let claims = match self
                .range("list", self.keys.claims_prefix(), Some(revision))
                .await
            {
                Ok(claims) => claims,
                // Compacted in between (etcd: out of range): both again, at a newer revision.
                Err(e) if compacted(&e) => continue,
                Err(e) => return Err(e),
            };
            let (records, claims, bad_keys) = self.split_kvs([tasks.kvs(), claims.kvs()]);
            return Ok(RawListing {
                revision,
                records,
                claims,
                bad_keys,
            });
        }
        Err(self.compacted_under_every_read())
    }

    /// A list whose revision was compacted away each time it was tried.
    pub(crate) fn compacted_under_every_read(&self) -> BackendError {
        BackendError::Unavailable {
            endpoint: self.conn.endpoints().to_owned(),
            reason: "the list was compacted away under every read of it".into(),
        }
    }

    /// Every key under `prefix` (at `revision`, or the newest).
    async fn range(
        &self,
        what: &str,
        prefix: &str,
        revision: Option<i64>,
    ) -> BackendResult<etcd_client::GetResponse> {
        let mut options = GetOptions::new().with_prefix();
        if let Some(r) = revision {
            options = options.with_revision(r);
        }
        self.conn.get(what, prefix, Some(options)).await
    }

    /// Sorts list responses into records and claim keys; keys with invalid ids are reported.
    pub(crate) fn split_kvs<'a>(
        &self,
        responses: impl IntoIterator<Item = &'a [etcd_client::KeyValue]>,
    ) -> (
        HashMap<TaskId, crate::record::StoredRecord>,
        HashMap<TaskId, crate::record::StoredClaim>,
        Vec<agent_core::CorruptRecord>,
    ) {
        let (mut records, mut claims, mut bad) = (HashMap::new(), HashMap::new(), Vec::new());
        for kvs in responses {
            for kv in kvs {
                match self.keys.parse(kv.key()) {
                    Some(crate::keys::KeyKind::Task(id)) => {
                        records.insert(id.clone(), stored_record(&id, kv));
                    }
                    Some(crate::keys::KeyKind::Claim(id)) => {
                        claims.insert(id, stored_claim(kv));
                    }
                    None if kv.key().starts_with(self.keys.tasks_prefix().as_bytes()) => {
                        bad.push(agent_core::CorruptRecord {
                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                            reason: "the key is not a valid task id".into(),
                        });
                    }
                    None => {}
                }
            }
        }
        (records, claims, bad)
    }

    pub(crate) async fn claim(
        self: &Arc<Self>,
        id: &TaskId,
        session: &SessionId,
    ) -> BackendResult<ClaimOutcome> {
        let mut lease = self.lease_for(session).await?;
        let (mut view, mut fresh) = self.view(id).await?;
        for _ in 0..MAX_ROUNDS {
            let (current, _) = match self.current(id, &view) {
                Ok(Some(seen)) => seen,
                // A missing or corrupt record in the cache is confirmed by a read.
                _ if !fresh => {
                    (view, fresh) = (self.read_view(id, true).await?, true);
                    continue;
                }
                Ok(None) => return Ok(ClaimOutcome::NotFound),
                Err(e) => return Err(e),
            };
            let mut verdict = current.claimability(session, |b| view.blocker_status(b));
            // The session holds it already under a lease of another process (a second agent
            // with the same session id, a CLI command while the agent runs it): that process
            // runs it; only it may claim it again. A claim without a lease (a CLI claim, a
            // migrated row) is the session's to adopt from anywhere.
            let elsewhere = current.status == TaskStatus::Claimed
                && view
                    .claim
                    .as_ref()
                    .is_some_and(|c| c.lease != 0 && !self.granted_here(c.lease));
            if verdict == Claimability::Yes && elsewhere {
                let lease = view.claim.as_ref().map_or(0, |c| c.lease);
                if fresh && self.revoke_if_dead(session, lease).await? {
                    // Its process died on this host: its lease is gone now, and so its claim.
                    (view, fresh) = (self.read_view(id, true).await?, true);
                    continue;
                }
                // A one-shot `claim --ttl`'s lease: no process runs the task; adopted as a
                // claim without a lease is.
                if !(fresh && self.one_shot_lease(lease).await?) {
                    verdict = Claimability::Held(Some(session.clone()));
                }
            }
            if verdict != Claimability::Yes {
                // A "no" from the cache is confirmed by a read before it is reported.
                if !fresh {
                    (view, fresh) = (self.read_view(id, true).await?, true);
                    continue;
                }
                return Ok(match verdict {
                    Claimability::Held(holder) => ClaimOutcome::Lost { holder },
                    Claimability::No(status) => ClaimOutcome::NotClaimable { status },
                    Claimability::Yes => unreachable!("handled above"),
                });
            }
            self.leave_lapsed_claim_a_while(id, session, &view)?;
            let mut next = current.clone();
            next.status = TaskStatus::Claimed;
            next.claimed_by = Some(session.clone());
            next.claimed_at = Some(Utc::now());
            next.copied = false;
            let record = Record {
                task: next,
                lease,
                lapsed: None,
                claim_rev: None,
            };
            let (task_key, claim_key) = (self.keys.task(id), self.keys.claim(id));
            let mut compares = vec![
                Compare::mod_revision(task_key.clone(), CompareOp::Equal, view.record_rev()),
                Compare::mod_revision(claim_key.clone(), CompareOp::Equal, view.claim_rev()),
            ];
            for b in &current.blocked_by {
                let rev = view
                    .blockers
                    .get(b)
                    .and_then(|s| s.as_ref())
                    .map_or(0, |s| s.mod_rev);
                compares.push(Compare::mod_revision(
                    self.keys.task(b),
                    CompareOp::Equal,
                    rev,
                ));
                // An archived blocker (complete, read from `archive/`) is compared by its
                // absence from `tasks/` alone: a restore writes it there (and `put` does not
                // create an archived id), so one compare per blocker keeps a claim within
                // etcd's 128 (tester helper-10: 64 archived blockers overflowed it).
            }
            let claim_opts = lease.map(|l| PutOptions::new().with_lease(l));
            let mut puts = vec![
                TxnOp::put(task_key, record.encode(), None),
                TxnOp::put(claim_key, encode_claim(session), claim_opts.clone()),
            ];
            if let Some(l) = lease.filter(|_| !self.registered_here(session)) {
                // No agent of the session keeps this lease: a one-shot command's (`--ttl`).
                puts.push(TxnOp::put(
                    self.keys.oneshot(l),
                    session.as_str(),
                    claim_opts,
                ));
            }
            // What changed is read back in the failure branch, within etcd's limit of
            // operations per transaction; more blockers are read afterwards.
            let read_back = match current.blocked_by.len() < TASKS_PER_READ {
                true => current.blocked_by.as_slice(),
                false => &[],
            };
            let txn = Txn::new()
                .when(compares)
                .and_then(puts)
                .or_else(read_ops(&self.keys, id, read_back));
            let resp = match self.conn.txn("claim", txn).await {
                // etcd ended the lease before our keep-alive loop noticed: take a new one.
                Err(e) if lease.is_some() && crate::lease::lease_gone(&e) => {
                    if let Some(gone) = lease {
                        self.forget_lease(session, gone);
                    }
                    lease = self.lease_for(session).await?;
                    continue;
                }
                other => other?,
            };
            if resp.succeeded() {
                let rev = resp.header().map_or(0, |h| h.revision());
                self.hold(
                    id.clone(),
                    Held {
                        session: session.clone(),
                        token: rev,
                        lease,
                    },
                );
                return Ok(ClaimOutcome::Won(Claim {
                    task: id.clone(),
                    session: session.clone(),
                    token: token(rev),
                    leased: lease.is_some(),
                }));
            }
            view = self.refreshed(id, read_back, resp.op_responses()).await?;
            fresh = true;
        }
        Err(self.contention(id))
    }

    pub(crate) async fn release(
        &self,
        id: &TaskId,
        session: &SessionId,
        to: ReleaseTo,
        want: Option<FencingToken>,
    ) -> BackendResult<ReleaseOutcome> {
        let (mut view, mut fresh) = self.view(id).await?;
        for _ in 0..MAX_ROUNDS {
            let (current, live_token) = match self.current(id, &view) {
                Ok(Some(seen)) => seen,
                _ if !fresh => {
                    (view, fresh) = (self.read_view(id, false).await?, true);
                    continue;
                }
                Ok(None) => return Ok(ReleaseOutcome::NotFound),
                Err(e) => return Err(e),
            };
            let holder = if current.status == TaskStatus::Claimed {
                current.claimed_by.clone()
            } else {
                None
            };
            // Under a lease of another process (the same session id run twice), not ours to
            // end. Any lease this client was granted is ours: after a lost keep-alive the session
            // has a new one, and the claim made under the old one (still alive in etcd, which
            // restarted or only lost touch) is still this process's to complete.
            let foreign_lease = view
                .claim
                .as_ref()
                .map(|c| c.lease)
                .filter(|&l| l != 0 && !self.granted_here(l));
            // ... unless it is a one-shot `claim --ttl`'s: no process runs the task then.
            let lease_ok = match foreign_lease {
                None => true,
                Some(l) => {
                    fresh && holder.as_ref() == Some(session) && self.one_shot_lease(l).await?
                }
            };
            let holds = holder.as_ref() == Some(session)
                && want.is_none_or(|t| Some(t) == live_token.map(token))
                && lease_ok;
            if !holds {
                if !fresh {
                    (view, fresh) = (self.read_view(id, false).await?, true);
                    continue;
                }
                if agent_core::model::already_completed_by(&current, session, to) {
                    return Ok(ReleaseOutcome::Released {
                        token: want.unwrap_or(FencingToken(0)),
                    });
                }
                if let Some(w) = want.filter(|_| to == ReleaseTo::Complete) {
                    match self.complete_lapsed(id, session, w, &view).await? {
                        Some(true) => return Ok(ReleaseOutcome::Released { token: w }),
                        Some(false) => {
                            (view, fresh) = (self.read_view(id, false).await?, true);
                            continue;
                        }
                        None => {}
                    }
                }
                return Ok(ReleaseOutcome::NotHolder { holder });
            }
            let mut next = current.clone();
            next.status = to.status();
            if to == ReleaseTo::Available {
                next.claimed_by = None;
                next.claimed_at = None;
            }
            let record = Record::plain(next);
            let (task_key, claim_key) = (self.keys.task(id), self.keys.claim(id));
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(task_key.clone(), CompareOp::Equal, view.record_rev()),
                    Compare::mod_revision(claim_key.clone(), CompareOp::Equal, view.claim_rev()),
                ])
                .and_then(vec![
                    TxnOp::put(task_key, record.encode(), None),
                    TxnOp::delete(claim_key, None),
                ])
                .or_else(read_ops(&self.keys, id, &[]));
            // Our own release must not read as a lost claim if the watch sees it before this
            // call returns: the claim is set aside while the release is in flight.
            let aside = self.cache().unhold(id);
            let resp = match self.conn.txn("release", txn).await {
                Ok(resp) if resp.succeeded() => {
                    return Ok(ReleaseOutcome::Released {
                        token: token(live_token.unwrap_or_default()),
                    });
                }
                other => {
                    if let Some(held) = aside {
                        self.hold(id.clone(), held);
                    }
                    other?
                }
            };
            view = parse_view(id, &[], resp.op_responses());
            fresh = true;
        }
        Err(self.contention(id))
    }

    pub(crate) async fn put(&self, id: &TaskId, patch: &TaskPatch) -> BackendResult<PutOutcome> {
        patch.validate(id)?;
        if let Some(blockers) = &patch.blocked_by {
            self.claimable_with(id, blockers)?;
        }
        for _ in 0..MAX_ROUNDS {
            let view = self.read_view(id, false).await?;
            let (record, outcome) = match &view.record {
                // Complete and moved out of the live prefix: created again, it would be done
                // again (tester helper-9).
                None if view.archived_self.is_some() => return Err(self.archived_already(id)),
                None => (Record::plain(patch.create(id.clone())), PutOutcome::Created),
                Some(stored) => {
                    let (current, _) =
                        effective(stored, view.claim.as_ref()).map_err(|r| self.corrupt(id, r))?;
                    let next = match patch.apply(&current) {
                        Patched::Unchanged => return Ok(PutOutcome::Unchanged),
                        Patched::Held(holder) => return Ok(PutOutcome::Held { holder }),
                        Patched::Changed(next) => next,
                    };
                    // A live ifc claim keeps its lease; a title change must not free it.
                    let lease = stored
                        .record
                        .as_ref()
                        .ok()
                        .and_then(|r| r.lease)
                        .filter(|_| next.status == TaskStatus::Claimed);
                    (
                        Record {
                            task: next,
                            lease,
                            lapsed: None,
                            claim_rev: None,
                        },
                        PutOutcome::Updated,
                    )
                }
            };
            let task_key = self.keys.task(id);
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(task_key.clone(), CompareOp::Equal, view.record_rev()),
                    Compare::mod_revision(self.keys.claim(id), CompareOp::Equal, view.claim_rev()),
                    // Not archived since it was read.
                    Compare::mod_revision(
                        self.keys.archived(id),
                        CompareOp::Equal,
                        view.archived_self.as_ref().map_or(0, |s| s.mod_rev),
                    ),
                ])
                .and_then(vec![TxnOp::put(task_key, record.encode(), None)]);
            if self.conn.txn("put", txn).await?.succeeded() {
                return Ok(outcome);
            }
        }
        Err(self.contention(id))
    }

    /// Right after etcd answered this process again, a claim that ended with its lease most
    /// likely ended because its holder could not reach etcd either, not because it died: its
    /// holder gets one lease TTL to report the run it may have finished (`complete_lapsed`)
    /// before another session takes the task, else the finished work is done again.
    fn leave_lapsed_claim_a_while(
        &self,
        id: &TaskId,
        session: &SessionId,
        view: &View,
    ) -> BackendResult<()> {
        let Some(grace) = self.config.lease_ttl else {
            return Ok(());
        };
        let Some(back) = self.conn.back_in_touch().filter(|b| *b < grace) else {
            return Ok(());
        };
        match lapsed_in(view) {
            Some(l) if &l.session != session => Err(BackendError::Unavailable {
                endpoint: self.conn.endpoints().to_owned(),
                reason: format!(
                    "{id}: etcd is back after not answering; {}'s claim ended with its lease meanwhile and is left to it for {:?} more",
                    l.session,
                    grace.saturating_sub(back)
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Completes a task whose claim by `session` (token `want`) ended with its lease while nobody
    /// wrote it since: the run finished once and nobody else started it, so it is not run again.
    /// `None`: not such a claim (or not this process's); `Some(false)`: the task changed under us.
    async fn complete_lapsed(
        &self,
        id: &TaskId,
        session: &SessionId,
        want: FencingToken,
        view: &View,
    ) -> BackendResult<Option<bool>> {
        // The process whose lease it was, or the session's registered agent now (which took
        // over from a process that is gone: seed 390000008, an agent killed right after its
        // task's exit and restarted after its lease had run out, had the finished run refused
        // and ran it again). Not a one-shot command: a live agent of the session may run it.
        let ours = lapsed_in(view).is_some_and(|l| {
            &l.session == session
                && token(l.token) == want
                && (self.granted_here(l.lease) || self.registered_here(session))
        });
        let (Some(stored), true) = (view.record.as_ref(), ours) else {
            return Ok(None);
        };
        let Ok(record) = &stored.record else {
            return Ok(None);
        };
        let mut done = record.task.clone();
        done.status = TaskStatus::Complete;
        done.claimed_by = Some(session.clone());
        let task_key = self.keys.task(id);
        let txn = Txn::new()
            .when(vec![
                Compare::mod_revision(task_key.clone(), CompareOp::Equal, stored.mod_rev),
                Compare::mod_revision(self.keys.claim(id), CompareOp::Equal, 0),
            ])
            .and_then(vec![TxnOp::put(
                task_key,
                Record::plain(done).encode(),
                None,
            )]);
        let landed = self.conn.txn("release", txn).await?.succeeded();
        if landed {
            tracing::info!(task = %id, %session, token = want.0, "completed after its lease ended: nobody claimed it since");
        }
        Ok(Some(landed))
    }

    /// Resets a record left `claimed` under a lease that is gone, if nothing changed since.
    pub(crate) async fn repair(&self, id: &TaskId, record_rev: i64) -> BackendResult<bool> {
        let view = self.read_view(id, false).await?;
        let Some(stored) = &view.record else {
            return Ok(false);
        };
        if stored.mod_rev != record_rev || view.claim.is_some() {
            return Ok(false);
        }
        let Ok((task, _)) = effective(stored, None) else {
            return Ok(false);
        };
        // Its holder may still complete it while nobody else claims it (`complete_lapsed`).
        let lapsed = stored
            .record
            .as_ref()
            .ok()
            .and_then(|r| r.lapsed_claim(record_rev));
        let task_key = self.keys.task(id);
        let txn = Txn::new()
            .when(vec![
                Compare::mod_revision(task_key.clone(), CompareOp::Equal, record_rev),
                Compare::mod_revision(self.keys.claim(id), CompareOp::Equal, 0),
            ])
            .and_then(vec![TxnOp::put(
                task_key,
                Record {
                    task,
                    lease: None,
                    lapsed,
                    claim_rev: None,
                }
                .encode(),
                None,
            )]);
        Ok(self.conn.txn("repair", txn).await?.succeeded())
    }
}
