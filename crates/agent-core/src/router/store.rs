//! The router as a `Backend`: each operation routed by mode (see `Shared::route`), claims
//! recorded where they live, releases made on every store a claim is asserted in.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::switch::Confirmed;
use super::{lock, missing, Held, Router, Shared, Side};
use crate::backend::{Backend, BackendEvent, Health, Subscription};
use crate::error::{BackendError, BackendResult};
use crate::ids::{SessionId, TaskId};
use crate::interest::Interest;
use crate::mirror::{Mirrored, RecordOutcome};
use crate::model::{
    ClaimOutcome, FencingToken, Listing, Presence, PutOutcome, ReleaseOutcome, ReleaseTo, TaskPatch,
};

/// How long closing waits for git to take the transitions still queued for it.
const CLOSE_FLUSH: Duration = Duration::from_secs(30);

#[async_trait]
impl Backend for Router {
    fn name(&self) -> &'static str {
        self.serving_name()
    }

    async fn get(&self, task: &TaskId) -> BackendResult<Option<crate::Task>> {
        let task = task.clone();
        let f = move |b: Arc<dyn Backend>| {
            let task = task.clone();
            async move { b.get(&task).await }
        };
        Ok(self.shared.route("get", f).await?.0)
    }

    async fn list(&self) -> BackendResult<Listing> {
        Ok(self
            .shared
            .route("list", |b: Arc<dyn Backend>| async move { b.list().await })
            .await?
            .0)
    }

    async fn list_of(&self, interest: &Interest) -> BackendResult<Listing> {
        let interest = interest.clone();
        let f = move |b: Arc<dyn Backend>| {
            let interest = interest.clone();
            async move { b.list_of(&interest).await }
        };
        Ok(self.shared.route("list", f).await?.0)
    }

    async fn put(&self, task: &TaskId, patch: &TaskPatch) -> BackendResult<PutOutcome> {
        // While the fleet has a git side, the board takes the same change, first: a task
        // reopened on etcd alone would be put back by the next claim's confirmation in git, and
        // an etcd claimer that saw the reopening before git had it would be told "complete".
        let me = &self.shared;
        let on_primary = lock(&me.state).serving == Side::Primary;
        let mut on_git = None;
        if let (true, true, Ok(git), Ok(etcd)) = (
            on_primary,
            me.config.claims_in_git,
            me.backend(Side::Fallback),
            me.backend(Side::Primary),
        ) {
            // Neither store changes unless both may: a status change of a task held in etcd is
            // refused before the board is touched (seed 7032: the board was reopened, etcd
            // refused, and the task ran again with the operator told "held").
            if patch.status.is_some() {
                if let Ok(Some(t)) = etcd.get(task).await {
                    if t.status == crate::TaskStatus::Claimed {
                        return Ok(PutOutcome::Held {
                            holder: t.claimed_by,
                        });
                    }
                }
            }
            match git.put(task, patch).await {
                Ok(PutOutcome::Held { holder }) => return Ok(PutOutcome::Held { holder }),
                Ok(outcome) => {
                    me.count("put", Side::Fallback);
                    on_git = Some(outcome);
                }
                Err(e) => {
                    tracing::warn!(%task, error = %e, "the change is not on the git board")
                }
            }
        }
        let (t, p) = (task.clone(), patch.clone());
        let f = move |b: Arc<dyn Backend>| {
            let (t, p) = (t.clone(), p.clone());
            async move { b.put(&t, &p).await }
        };
        let outcome = me.route("put", f).await?.0;
        // A change the board took is a change, though etcd already said so (seed 2000000032:
        // a reopening reached the board, was reported "unchanged", and so was not recorded).
        Ok(match (outcome, on_git) {
            (
                PutOutcome::Unchanged,
                Some(changed @ (PutOutcome::Updated | PutOutcome::Created)),
            ) => changed,
            (outcome, _) => outcome,
        })
    }

    async fn claim(&self, task: &TaskId, session: &SessionId) -> BackendResult<ClaimOutcome> {
        let me = &self.shared;
        // Whatever was done on git is written to the coordinator before anything new is claimed
        // there.
        let pending = !lock(&me.state).pending_up.is_empty();
        if pending && lock(&me.state).serving == Side::Primary {
            me.settle_pending().await;
        }
        if lock(&me.state).serving == Side::Primary {
            if let Some(answer) = me.refusal(task) {
                return Ok(answer);
            }
        }
        let (t, s) = (task.clone(), session.clone());
        let f = move |b: Arc<dyn Backend>| {
            let (t, s) = (t.clone(), s.clone());
            async move { b.claim(&t, &s).await }
        };
        let (outcome, side) = me.route("claim", f).await?;
        if let ClaimOutcome::Won(c) = &outcome {
            let mut held = Held {
                session: session.clone(),
                primary: (side == Side::Primary).then_some(c.token),
                fallback: (side == Side::Fallback).then_some(c.token),
            };
            match me.confirm(task, session, side, c.token).await {
                Confirmed::Refused(answer) => {
                    if side == Side::Primary {
                        lock(&me.state)
                            .refused
                            .insert(task.clone(), (answer.clone(), tokio::time::Instant::now()));
                    }
                    return Ok(answer);
                }
                Confirmed::Failed(e) => return Err(e),
                Confirmed::Also(other) if side == Side::Primary => held.fallback = Some(other),
                Confirmed::Also(other) => held.primary = Some(other),
                Confirmed::NotAsked => {}
            }
            let in_git = held.fallback.is_some();
            lock(&me.state).held.insert(task.clone(), held);
            if !in_git {
                if let Some(m) = &me.mirror {
                    m.push(Mirrored {
                        task: task.clone(),
                        status: crate::TaskStatus::Claimed,
                        holder: Some(session.clone()),
                        token: Some(c.token),
                        read_as: None,
                    });
                }
            }
        }
        Ok(outcome)
    }

    async fn release(
        &self,
        task: &TaskId,
        session: &SessionId,
        to: ReleaseTo,
        token: Option<FencingToken>,
    ) -> BackendResult<ReleaseOutcome> {
        let me = &self.shared;
        let held = lock(&me.state)
            .held
            .get(task)
            .filter(|h| &h.session == session)
            .cloned();
        let Some(held) = held else {
            // A claim this router did not make or no longer tracks (a one-shot command's, a run
            // a killed agent finished, a claim whose git side was lost): while the fleet has a
            // git side, git's word comes first. A task another session claimed or completed
            // there since is not ended here (seeds 280000026, 280000047: a lapsed etcd
            // completion landed after a git session had taken the task and run it).
            let serving = lock(&me.state).serving;
            if let (Side::Primary, true, Ok(git)) =
                (serving, me.config.claims_in_git, me.backend(Side::Fallback))
            {
                if let Some(refused) = taken_in_git(git, task, session).await? {
                    return Ok(refused);
                }
            }
            let (t, s) = (task.clone(), session.clone());
            let f = move |b: Arc<dyn Backend>| {
                let (t, s) = (t.clone(), s.clone());
                async move { b.release(&t, &s, to, token).await }
            };
            let (outcome, side) = me.route("release", f).await?;
            // A completion under the other store's token: the run a killed agent finished
            // under a claim it had made there, before a switch (seed 390000014: a git claim's
            // run, reported by the restarted agent to etcd, was refused there and ran again).
            // It lands where the claim was, and is carried to the serving store, unless
            // another session holds the task in the serving store.
            if let (ReleaseOutcome::NotHolder { holder }, Some(_), ReleaseTo::Complete) =
                (&outcome, token, to)
            {
                if holder.as_ref().is_some_and(|h| h != session) {
                    return Ok(outcome);
                }
                let other = side.other();
                if let (Ok(there), Ok(here)) = (me.backend(other), me.backend(side)) {
                    if let Ok(landed @ ReleaseOutcome::Released { .. }) =
                        there.release(task, session, to, token).await
                    {
                        me.count("release", other);
                        let done = Mirrored {
                            task: task.clone(),
                            status: to.status(),
                            holder: Some(session.clone()),
                            token,
                            read_as: None,
                        };
                        me.record_logged(here, std::slice::from_ref(&done), here.name())
                            .await;
                        return Ok(landed);
                    }
                }
            }
            // A claim this router did not make (a one-shot command's): while the fleet has a
            // git side it is in git too, and the release follows it there.
            if let (ReleaseOutcome::Released { token }, Side::Primary, true, Ok(git)) = (
                &outcome,
                side,
                me.config.claims_in_git,
                me.backend(Side::Fallback),
            ) {
                let done = Mirrored {
                    task: task.clone(),
                    status: to.status(),
                    holder: Some(session.clone()),
                    token: Some(*token),
                    read_as: None,
                };
                me.record_logged(git, std::slice::from_ref(&done), "git")
                    .await;
            }
            return Ok(outcome);
        };
        let done = Mirrored {
            task: task.clone(),
            status: to.status(),
            holder: Some(session.clone()),
            token: held.primary.or(held.fallback),
            read_as: None,
        };
        let (mut released, mut refused, mut error) = (None, None, None);
        if let Some(tok) = held.fallback {
            match me
                .backend(Side::Fallback)?
                .release(task, session, to, Some(tok))
                .await
            {
                Ok(o @ ReleaseOutcome::Released { .. }) => {
                    me.count("release", Side::Fallback);
                    released = Some(o);
                }
                Ok(o) => {
                    // Git gave the task to another session (this claim went stale there, and
                    // its loss is not yet heard): the etcd claim is given back, not completed.
                    if me.config.claims_in_git && held.primary.is_some() {
                        let git = me.backend(Side::Fallback)?;
                        if let Some(taken) = taken_in_git(git, task, session).await? {
                            lock(&me.state).held.remove(task);
                            let etcd = me.backend(Side::Primary)?;
                            if let Err(e) = etcd
                                .release(task, session, ReleaseTo::Available, held.primary)
                                .await
                            {
                                tracing::warn!(%task, %session, error = %e, "cannot give the etcd claim back; it ends with the session's lease");
                            }
                            tracing::warn!(%task, %session, "release refused: git gave the task to another session");
                            return Ok(taken);
                        }
                    }
                    refused = Some(o)
                }
                // While the fleet has a git side, git takes the release first or nobody does:
                // a completion on etcd alone would be redone by a git session once this claim
                // goes stale there (seed 6013: killed with the completion still queued for git).
                // The caller retries; the claim is still held in both stores.
                Err(e) if me.config.claims_in_git && held.primary.is_some() => return Err(e),
                Err(e) => error = Some(e),
            }
        }
        let mut on_coordinator = false;
        // Released in git while the breaker is open: the coordinator is told on the way back
        // (`pending_up`, below), not asked now at the cost of a deadline.
        let hybrid = lock(&me.state).mode == crate::config::Mode::Hybrid;
        let skip_coordinator = hybrid && released.is_some() && lock(&me.state).breaker.is_open();
        if let Some(tok) = held.primary.filter(|_| !skip_coordinator) {
            let etcd = me.backend(Side::Primary)?;
            let deadline = me.config.deadline;
            match tokio::time::timeout(deadline, etcd.release(task, session, to, Some(tok))).await {
                Ok(Ok(o @ ReleaseOutcome::Released { .. })) => {
                    me.count("release", Side::Primary);
                    on_coordinator = true;
                    released.get_or_insert(o);
                }
                Ok(Ok(o)) => {
                    refused.get_or_insert(o);
                }
                Ok(Err(e)) => {
                    if hybrid && e.is_transient() {
                        me.failed(&e.to_string(), false).await;
                    }
                    error = Some(e)
                }
                Err(_) => {
                    let e = BackendError::Timeout {
                        endpoint: etcd.name().into(),
                        operation: "release".into(),
                        after: deadline,
                    };
                    if hybrid {
                        me.failed(&e.to_string(), true).await;
                    }
                    error = Some(e)
                }
            }
        }
        let on_git = released.is_some() && !on_coordinator;
        let outcome = match (released, refused) {
            (Some(o), _) => {
                if on_coordinator && !(held.fallback.is_some() && on_git) {
                    // Done on etcd; git did not take the release (or never had the claim): the
                    // completion is recorded there behind.
                    if let Some(m) = &me.mirror {
                        m.push(done);
                    } else if let (true, Ok(git)) =
                        (held.fallback.is_some(), me.backend(Side::Fallback))
                    {
                        me.record_logged(git, std::slice::from_ref(&done), "git")
                            .await;
                    }
                } else if !on_coordinator && me.primary.get().is_some() {
                    // Done on git only: the coordinator is told before it serves a claim again,
                    // naming the etcd claim it ends (if there was one), so a task reopened there
                    // since is not ended by it (seed 60000054).
                    lock(&me.state).pending_up.push(Mirrored {
                        token: held.primary,
                        ..done
                    });
                }
                o
            }
            (None, Some(o)) => o,
            (None, None) => return Err(error.unwrap_or_else(|| missing(Side::Primary))),
        };
        lock(&me.state).held.remove(task);
        Ok(outcome)
    }

    async fn record(&self, items: &[Mirrored]) -> BackendResult<Vec<RecordOutcome>> {
        let items = items.to_vec();
        let f = move |b: Arc<dyn Backend>| {
            let items = items.clone();
            async move { b.record(&items).await }
        };
        Ok(self.shared.route("record", f).await?.0)
    }

    async fn subscribe(&self) -> BackendResult<Subscription> {
        self.subscribe_to(&Interest::all()).await
    }

    /// The router follows its stores with its first subscriber's interest (an agent's list); a
    /// later subscription must ask for the same.
    async fn subscribe_to(&self, interest: &Interest) -> BackendResult<Subscription> {
        let me = &self.shared;
        let (tx, rx) = mpsc::unbounded_channel();
        let first = {
            let mut s = lock(&me.state);
            match &s.interest {
                Some(followed) if followed != interest => {
                    return Err(BackendError::InvalidInput(format!(
                        "this router follows {followed:?}; a subscription to {interest:?} needs a router of its own"
                    )))
                }
                Some(_) => {}
                None => s.interest = Some(interest.clone()),
            }
            s.followed = true;
            s.subscribers.is_empty()
        };
        if first {
            let mut pumps = Vec::new();
            for side in [Side::Primary, Side::Fallback] {
                let Ok(b) = me.backend(side) else { continue };
                // A coordinator attached meanwhile is followed by whoever gets here first.
                if side == Side::Primary && !me.start_following_primary() {
                    continue;
                }
                match b.subscribe_to(interest).await {
                    Ok(sub) => pumps.push(tokio::spawn(Shared::pump(
                        Arc::downgrade(&self.shared),
                        side,
                        sub,
                    ))),
                    Err(e) if side == lock(&me.state).serving => {
                        lock(&me.state).following_primary = false;
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::warn!(session = %me.config.name, backend = b.name(), error = %e, "cannot follow this store's changes yet");
                        // Tried again until it answers.
                        let weak = Arc::downgrade(&self.shared);
                        if side == Side::Primary {
                            lock(&me.state).following_primary = false;
                            pumps.push(tokio::spawn(Shared::follow_primary(weak)));
                        } else {
                            pumps.push(tokio::spawn(Shared::follow_fallback(weak)));
                        }
                    }
                }
            }
            self.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(pumps);
        }
        // Registered before the snapshot is read: a change that came between the read and the
        // registration was heard by nobody (an agent started while others worked waited for
        // good for a completion it never heard). What the snapshot has already is dropped.
        lock(&me.state).subscribers.push(tx);
        let serving = lock(&me.state).serving;
        let snapshot = me.backend(serving)?.list_of(interest).await?;
        let events = after_snapshot(rx, snapshot.revision);
        Ok(Subscription::new(snapshot, events))
    }

    async fn announce(&self, presence: &Presence) -> BackendResult<()> {
        lock(&self.shared.state).announced = Some(presence.clone());
        let presence = presence.clone();
        let f = move |b: Arc<dyn Backend>| {
            let mut p = presence.clone();
            p.backend = b.name().into();
            async move { b.announce(&p).await }
        };
        let before = self.serving();
        let result = self.shared.route("announce", f).await.map(drop);
        let now = self.serving();
        if now != before {
            // A switch went by while this was on its way, and may have told the store written
            // here where the session went before this older word landed over it.
            if let Ok(b) = self.shared.backend(now) {
                self.shared.announce_switch(b.name()).await;
            }
        }
        result
    }

    /// Registers in every configured store that answers (the coordinator first), so a second
    /// process is refused whichever store it would be served by (a rollback, an outage).
    async fn register(
        &self,
        presence: &Presence,
        take_over: bool,
    ) -> BackendResult<Option<Presence>> {
        let me = &self.shared;
        {
            let mut s = lock(&me.state);
            s.registered = Some(presence.clone());
            s.take_over = take_over;
        }
        let (mut registered, mut failure) = (false, None);
        // Each store is told which one serves the session, so either lists it rightly.
        let serving = me
            .backend(lock(&me.state).serving)
            .map_or("none", |b| b.name());
        for side in [Side::Primary, Side::Fallback] {
            let Ok(b) = me.backend(side) else { continue };
            let mut p = presence.clone();
            p.backend = serving.into();
            match b.register(&p, take_over).await {
                Ok(None) => {
                    me.count("register", side);
                    lock(&me.state).unregistered.remove(&side);
                    registered = true;
                }
                Ok(Some(other)) => return Ok(Some(other)),
                Err(e) if e.is_transient() => {
                    tracing::warn!(session = %presence.session_id, backend = b.name(), error = %e, "cannot register the session in this store: registering again before working there");
                    lock(&me.state).unregistered.insert(side);
                    failure = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        match (registered, failure) {
            (true, _) => Ok(None),
            (false, Some(e)) => Err(e),
            (false, None) => Err(missing(Side::Primary)),
        }
    }

    async fn end_inherited(&self) -> BackendResult<()> {
        lock(&self.shared.state).inherited_ended = true;
        let mut failure = Ok(());
        for side in [Side::Primary, Side::Fallback] {
            if let Ok(b) = self.shared.backend(side) {
                if let Err(e) = b.end_inherited().await {
                    failure = Err(e);
                }
            }
        }
        failure
    }

    /// The sessions the serving store lists, and those only the other store does (a fleet with
    /// sessions on both); a session both list is shown as the store serving it says.
    async fn sessions(&self) -> BackendResult<Vec<Presence>> {
        let me = &self.shared;
        let (listed, side) = me
            .route("sessions", |b: Arc<dyn Backend>| async move {
                b.sessions().await
            })
            .await?;
        let other = side.other();
        let Ok(other) = me.backend(other).cloned() else {
            return Ok(listed);
        };
        match tokio::time::timeout(me.config.deadline, other.sessions()).await {
            Ok(Ok(more)) => Ok(merge_sessions(listed, more, other.name())),
            _ => Ok(listed),
        }
    }

    async fn health(&self) -> Health {
        let side = self.serving();
        match self.shared.backend(side) {
            Ok(b) => b.health().await,
            Err(e) => Health {
                reachable: false,
                detail: e.to_string(),
            },
        }
    }

    fn reconnects(&self) -> u64 {
        self.sum_over_stores(|b| b.reconnects())
    }

    fn resyncs(&self) -> u64 {
        self.sum_over_stores(|b| b.resyncs())
    }

    async fn close(&self) {
        if let Some(m) = &self.shared.mirror {
            // What git has not taken yet (a completion made while it was away) is waited for:
            // without it, a git session could run the task again once this session's claim
            // there goes stale.
            if !m.flush(CLOSE_FLUSH).await {
                tracing::error!(session = %self.shared.config.name, waited = ?CLOSE_FLUSH, "git has not taken every transition of this session: run `ifc bridge --once` when it answers, or a git session may redo those tasks");
            }
        }
        // What was done on git and not yet told to the coordinator is told now, if it answers.
        self.shared.settle_pending().await;
        for side in [Side::Primary, Side::Fallback] {
            if let Ok(b) = self.shared.backend(side) {
                b.close().await;
            }
        }
    }
}

/// `Some(refusal)` when git shows `task` claimed or completed by a session other than `session`:
/// a release by `session` must then change nothing, in either store.
async fn taken_in_git(
    git: &Arc<dyn Backend>,
    task: &TaskId,
    session: &SessionId,
) -> BackendResult<Option<ReleaseOutcome>> {
    let Some(there) = git.get(task).await? else {
        return Ok(None);
    };
    let other = there.claimed_by.as_ref().is_some_and(|s| s != session);
    Ok(match there.status {
        crate::TaskStatus::Claimed if other => Some(ReleaseOutcome::NotHolder {
            holder: there.claimed_by,
        }),
        crate::TaskStatus::Complete if other => Some(ReleaseOutcome::NotHolder { holder: None }),
        _ => None,
    })
}

/// `listed` (the serving store's sessions) with `more` (those of the store named `other`): a
/// session both list is taken from the store both entries name when they agree (a hybrid
/// session on git writes its current task only there), else from `listed`.
pub(super) fn merge_sessions(
    listed: Vec<Presence>,
    more: Vec<Presence>,
    other: &str,
) -> Vec<Presence> {
    let mut by_id: std::collections::BTreeMap<SessionId, Presence> = listed
        .into_iter()
        .map(|p| (p.session_id.clone(), p))
        .collect();
    for p in more {
        match by_id.get(&p.session_id) {
            Some(mine) if mine.backend == other && p.backend == other => {
                by_id.insert(p.session_id.clone(), p);
            }
            Some(_) => {}
            None => {
                by_id.insert(p.session_id.clone(), p);
            }
        }
    }
    by_id.into_values().collect()
}

/// The events of `rx` less the task changes older than a snapshot at `revision` (it has them;
/// one of that revision is the snapshot's own state, harmless again).
fn after_snapshot(
    mut rx: mpsc::UnboundedReceiver<BackendEvent>,
    revision: u64,
) -> mpsc::UnboundedReceiver<BackendEvent> {
    let (tx, out) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            if matches!(&event, BackendEvent::Task(e) if e.revision < revision) {
                continue;
            }
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    out
}
