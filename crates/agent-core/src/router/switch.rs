//! Moving between the stores: the switch itself (`settle`: leaving etcd asserts every held claim
//! in git, coming back writes git's progress into etcd first), the claims confirmed in the other
//! store around a switch, and what the router does when a store reports a claim lost.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{lock, Held, Shared, Side};
use crate::backend::{Backend, BackendEvent};
use crate::config::Mode;
use crate::ids::{SessionId, TaskId};
use crate::mirror::{catch_up, Mirrored, RecordOutcome};
use crate::model::{ClaimOutcome, FencingToken, ReleaseTo};

/// What confirming a claim in the other store came to.
pub(super) enum Confirmed {
    /// No confirmation was due (or the other store did not answer): the claim stands alone.
    NotAsked,
    /// The claim is held there too, with this token.
    Also(FencingToken),
    /// The other store has the task otherwise; the claim was undone and this is the answer.
    Refused(ClaimOutcome),
    /// The claim had to be recorded in git before it counts and git did not take it (it did
    /// not answer): the claim was undone.
    Failed(crate::BackendError),
}

impl Shared {
    /// Moves to the side the mode and breaker call for, carrying the claims along. Serialised.
    pub(super) async fn settle(&self) {
        let _one = self.switching.lock().await;
        let (target, serving) = {
            let s = lock(&self.state);
            (self.desired(&s), s.serving)
        };
        if target == serving {
            return;
        }
        let moved = match target {
            Side::Fallback => {
                self.enter_fallback().await;
                true
            }
            Side::Primary => self.enter_primary().await,
        };
        if !moved {
            return;
        }
        {
            let mut s = lock(&self.state);
            s.serving = target;
            if target == Side::Fallback {
                s.stats.fallbacks += 1;
            }
            let window = self
                .config
                .confirm_window
                .unwrap_or(self.config.probe_max * 2 + self.config.check_interval);
            s.confirm_until = Some(Instant::now() + window);
        }
        let Ok(backend) = self.backend(target) else {
            return;
        };
        tracing::warn!(session = %self.config.name, backend = backend.name(), "now served by {}", backend.name());
        // A store the registration missed is registered now, not at the next operation routed
        // there (an idle agent may route none): until then a take-over there would go unheard
        // (seed 80000037: taken over while idle on git, where it had never registered, the
        // process ran on for 60 s).
        if let Err(e) = self.ensure_registered(target).await {
            tracing::warn!(session = %self.config.name, backend = backend.name(), error = %e, "cannot register the session in the store now serving");
        }
        self.announce_switch(backend.name()).await;
        match backend.list_of(&self.interest()).await {
            Ok(listing) => self.broadcast(BackendEvent::Resync(listing)),
            Err(e) => {
                tracing::warn!(session = %self.config.name, error = %e, "cannot list the tasks after switching")
            }
        }
    }

    /// Tells both stores which one serves the session now (its presence's `backend`), so
    /// `ifc status` and `ifc ui` on either show where it went; a store that does not answer
    /// within the deadline hears it at the session's next announcement there.
    pub(super) async fn announce_switch(&self, serving: &str) {
        let presence = {
            let s = lock(&self.state);
            s.announced.clone().or_else(|| s.registered.clone())
        };
        let Some(mut presence) = presence else { return };
        presence.backend = serving.to_owned();
        for side in [Side::Primary, Side::Fallback] {
            let Ok(b) = self.backend(side) else { continue };
            if let Ok(Err(e)) =
                tokio::time::timeout(self.config.deadline, b.announce(&presence)).await
            {
                tracing::debug!(session = %self.config.name, backend = b.name(), error = %e, "cannot tell this store where the session went");
            }
        }
    }

    /// Leaving the coordinator: the mirror is flushed; if the coordinator still answers, git is
    /// brought up to its state; every claim held there is asserted in git with the same token, and
    /// the holder is told `ClaimLost` where that fails.
    pub(super) async fn enter_fallback(&self) {
        let Ok(git) = self.backend(Side::Fallback).cloned() else {
            return;
        };
        if let Some(m) = &self.mirror {
            m.flush(Duration::from_secs(5)).await;
        }
        if let Ok(etcd) = self.backend(Side::Primary) {
            // Left because it failed: asking it again would only hold up the fallback (the
            // issue-15 #13 seconds); left by a mode change: it likely answers.
            let now = if lock(&self.state).breaker.is_open() {
                None
            } else {
                tokio::time::timeout(self.config.deadline * 4, etcd.list())
                    .await
                    .ok()
            };
            // etcd does not answer: what this session last saw of it. Its completions are
            // final, so they are carried into git (nobody re-runs finished work there); its
            // claims are asserted by their own sessions.
            let ahead = match now {
                Some(Ok(listing)) => Some((listing, true)),
                _ => etcd.last_known().map(|listing| (listing, false)),
            };
            if let Some((ahead, answered)) = ahead {
                match git.list().await {
                    Ok(behind) => {
                        // This router's own claims are asserted below, with their tokens.
                        let mut plan = catch_up(&ahead.tasks, &behind.tasks);
                        {
                            let state = lock(&self.state);
                            plan.retain(|m| {
                                !state.held.contains_key(&m.task)
                                    && (answered || m.status == crate::TaskStatus::Complete)
                            });
                        }
                        if !plan.is_empty() {
                            self.record_logged(&git, &plan, "git").await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(session = %self.config.name, error = %e, "cannot read the git board to bring it up to date")
                    }
                }
            }
        }
        let to_assert: Vec<(TaskId, Held)> = lock(&self.state)
            .held
            .iter()
            .filter(|(_, h)| h.primary.is_some() && h.fallback.is_none())
            .map(|(t, h)| (t.clone(), h.clone()))
            .collect();
        for (task, held) in to_assert {
            let token = held.primary.unwrap_or(FencingToken(0));
            if !self.assert_in_git(&task, &held.session, token).await {
                tracing::warn!(session = %held.session, %task, "claim could not be asserted in git: stopping the task");
                lock(&self.state).held.remove(&task);
                self.broadcast(BackendEvent::ClaimLost {
                    task,
                    session: held.session,
                    token,
                });
            }
        }
    }

    /// Returning to the coordinator: git's progress (everyone's) and this router's releases are
    /// written into etcd, then the claims held in git are claimed there, before anything new is
    /// claimed. `false` (stay on git) if the coordinator does not take it.
    pub(super) async fn enter_primary(&self) -> bool {
        let (Ok(etcd), Ok(git)) = (
            self.backend(Side::Primary).cloned(),
            self.backend(Side::Fallback).cloned(),
        ) else {
            return true;
        };
        let pending = std::mem::take(&mut lock(&self.state).pending_up);
        let mut plan = pending.clone();
        match (git.list().await, etcd.list().await) {
            // An etcd with no tasks at all has not been migrated yet (the tester's report: two
            // hybrid agents moved to an empty etcd that came up, found their list empty, and
            // left the board's tasks undone): the session stays on git.
            (Ok(ahead), Ok(behind)) if behind.tasks.is_empty() && !ahead.tasks.is_empty() => {
                if !std::mem::replace(&mut lock(&self.state).told_etcd_empty, true) {
                    tracing::warn!(session = %self.config.name, tasks_in_git = ahead.tasks.len(), "the coordinator answers but holds no tasks: staying on git (`ifc migrate --from-git` copies the board into etcd)");
                }
                lock(&self.state).pending_up.extend(pending);
                return false;
            }
            (Ok(ahead), Ok(behind)) => plan.extend(catch_up(&ahead.tasks, &behind.tasks)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(session = %self.config.name, error = %e, "cannot compare git with the coordinator");
                if e.is_transient() && !etcd.health().await.reachable {
                    lock(&self.state).pending_up.extend(pending);
                    return false;
                }
            }
        }
        if !plan.is_empty() && !self.record_logged(&etcd, &plan, "etcd").await {
            lock(&self.state).pending_up.extend(pending);
            return false;
        }
        let to_claim: Vec<(TaskId, Held)> = lock(&self.state)
            .held
            .iter()
            .filter(|(_, h)| h.primary.is_none())
            .map(|(t, h)| (t.clone(), h.clone()))
            .collect();
        for (task, held) in to_claim {
            match etcd.claim(&task, &held.session).await {
                Ok(ClaimOutcome::Won(c)) => {
                    if let Some(h) = lock(&self.state).held.get_mut(&task) {
                        h.primary = Some(c.token);
                    }
                }
                Ok(other) => {
                    tracing::warn!(session = %held.session, %task, outcome = %other, "conflict: the coordinator has this task otherwise; the claim stays in git")
                }
                Err(e) => {
                    tracing::warn!(session = %held.session, %task, error = %e, "cannot claim the task back on the coordinator");
                    return false;
                }
            }
        }
        true
    }

    /// Records `plan` into `to`, logging conflicts; `false` on an error.
    pub(super) async fn record_logged(
        &self,
        to: &Arc<dyn Backend>,
        plan: &[Mirrored],
        name: &str,
    ) -> bool {
        match to.record(plan).await {
            Ok(out) => {
                if std::mem::take(&mut lock(&self.state).record_failing) {
                    tracing::info!(session = %self.config.name, "writing what happened elsewhere into {name} works again");
                }
                for (item, outcome) in plan.iter().zip(&out) {
                    if let RecordOutcome::Conflict { holder } = outcome {
                        lock(&self.state).stats.conflicts += 1;
                        tracing::warn!(session = %self.config.name, task = %item.task, here = %crate::model::holder_name(holder.as_ref()), there = %crate::model::holder_name(item.holder.as_ref()), "conflict: claimed by different sessions in {name} and the other store");
                    }
                }
                true
            }
            Err(e) => {
                // Said once per outage, not at every attempt (the tester counted 17 a second).
                if std::mem::replace(&mut lock(&self.state).record_failing, true) {
                    tracing::debug!(session = %self.config.name, error = %e, "cannot write what happened elsewhere into {name}");
                } else {
                    tracing::warn!(session = %self.config.name, error = %e, "cannot write what happened elsewhere into {name}; retrying (said again once it works)");
                }
                false
            }
        }
    }

    pub(super) async fn claim_lost(
        &self,
        side: Side,
        task: TaskId,
        session: SessionId,
        token: FencingToken,
    ) {
        let (mode, held) = {
            let mut s = lock(&self.state);
            let mode = s.mode;
            let Some(h) = s.held.get_mut(&task) else {
                // Released already (a store that lost touch reports it late): nothing runs.
                tracing::debug!(%task, %session, side = ?side, "claim ended after its release");
                return;
            };
            match side {
                Side::Primary => h.primary = None,
                Side::Fallback => h.fallback = None,
            }
            (mode, h.clone())
        };
        if side == Side::Fallback && self.config.claims_in_git && held.primary.is_some() {
            // While the fleet has a git side a claim counts only while git has it: once git
            // lost it (its heartbeat went stale, another process took it) a git session may take
            // the task, so it stops here too and the etcd claim is given back.
            tracing::warn!(%task, %session, "claim lost in git: stopping the task (it counts only while git has it)");
            lock(&self.state).held.remove(&task);
            if let Ok(etcd) = self.backend(Side::Primary) {
                if let Err(e) = etcd
                    .release(&task, &session, ReleaseTo::Available, held.primary)
                    .await
                {
                    tracing::warn!(%task, %session, error = %e, "cannot give the etcd claim back; it ends with the session's lease");
                }
            }
            self.broadcast(BackendEvent::ClaimLost {
                task,
                session,
                token,
            });
            return;
        }
        if held.primary.is_some() || held.fallback.is_some() {
            tracing::info!(%task, %session, side = ?side, "claim ended on one store; still asserted on the other");
            return;
        }
        // The lease ran out while the coordinator was unreachable: in hybrid the claim is asserted
        // in git (if no one took it there), as when the breaker opens.
        if side == Side::Primary && mode == Mode::Hybrid && self.fallback.is_some() {
            let reachable = match self.primary.get() {
                Some(etcd) => tokio::time::timeout(self.config.deadline, etcd.health())
                    .await
                    .is_ok_and(|h| h.reachable),
                None => false,
            };
            if !reachable {
                self.failed("the session's lease ended", false).await;
                if self.assert_in_git(&task, &session, token).await {
                    return;
                }
            }
        }
        lock(&self.state).held.remove(&task);
        self.broadcast(BackendEvent::ClaimLost {
            task,
            session,
            token,
        });
    }

    /// Asserts `session`'s claim of `task` in git with the coordinator's `token`; on success the
    /// claim is recorded as held there.
    pub(super) async fn assert_in_git(
        &self,
        task: &TaskId,
        session: &SessionId,
        token: FencingToken,
    ) -> bool {
        let Ok(git) = self.backend(Side::Fallback).cloned() else {
            return false;
        };
        let item = Mirrored {
            task: task.clone(),
            status: crate::TaskStatus::Claimed,
            holder: Some(session.clone()),
            token: Some(token),
            read_as: None,
        };
        let asserted = match git.record(std::slice::from_ref(&item)).await {
            Ok(out) => matches!(
                out.first(),
                Some(RecordOutcome::Written | RecordOutcome::Unchanged)
            ),
            Err(e) => {
                tracing::warn!(%session, %task, error = %e, "cannot assert the claim in git");
                false
            }
        };
        if asserted {
            tracing::warn!(%session, %task, %token, "claim asserted in git: the task keeps running");
            if let Some(h) = lock(&self.state).held.get_mut(task) {
                h.fallback = Some(token);
            }
        }
        asserted
    }

    /// Within the confirm window after a return to the coordinator, what sessions still on git
    /// did there (they return at their own next probe, or exit first) is written into etcd.
    pub(super) async fn catch_up_stragglers(&self) {
        let confirming = {
            let s = lock(&self.state);
            s.serving == Side::Primary && s.confirm_until.is_some_and(|t| Instant::now() < t)
        };
        let (Ok(etcd), Ok(git)) = (self.backend(Side::Primary), self.backend(Side::Fallback))
        else {
            return;
        };
        if !confirming {
            return;
        }
        if let (Ok(ahead), Ok(behind)) = (git.list().await, etcd.list().await) {
            let mut plan = catch_up(&ahead.tasks, &behind.tasks);
            {
                let state = lock(&self.state);
                plan.retain(|m| !state.held.contains_key(&m.task));
            }
            if !plan.is_empty() {
                self.record_logged(etcd, &plan, "etcd").await;
            }
        }
    }

    /// Within the confirm window after a switch (and for every etcd claim of a mirroring hybrid
    /// session), makes a claim won on `side` in the other store too. `Some(outcome)`: the other store has the task otherwise, so the claim was undone and
    /// this is the answer. A store that does not answer (an outage) is not waited for.
    pub(super) async fn confirm(
        &self,
        task: &TaskId,
        session: &SessionId,
        side: Side,
        token: FencingToken,
    ) -> Confirmed {
        let (confirming, open, strict) = {
            let s = lock(&self.state);
            let window = s.confirm_until.is_some_and(|t| Instant::now() < t);
            // A hybrid session's etcd claims are in git before their task starts: should etcd
            // go down, the sessions that fall back find them there, and no mirror lag can let
            // one of them run the task again.
            let hybrid = s.mode == Mode::Hybrid && self.mirror.is_some();
            // While the fleet has a git side, every etcd claim, whatever the mode, counts only
            // once git has it: git sessions on overlapping lists, and hybrid sessions that fell
            // back, claim there, and only git can say whether one of them holds the task. If
            // git does not answer, the claim is undone (a retry comes later).
            let strict = side == Side::Primary && self.config.claims_in_git;
            let in_git = side == Side::Primary && (hybrid || strict);
            (window || in_git, s.breaker.is_open(), strict)
        };
        if !confirming {
            return Confirmed::NotAsked;
        }
        let refused = match side {
            Side::Primary => {
                let Ok(git) = self.backend(Side::Fallback) else {
                    return Confirmed::NotAsked;
                };
                let item = Mirrored {
                    task: task.clone(),
                    status: crate::TaskStatus::Claimed,
                    holder: Some(session.clone()),
                    token: Some(token),
                    read_as: None,
                };
                let limit = self.config.deadline * 4;
                let record = git.record(std::slice::from_ref(&item));
                // Strict: the answer is waited for (a record that timed out may still land, and
                // would then hold the task in git for nobody); the git backend bounds its rounds.
                let answer = if strict {
                    record.await
                } else {
                    tokio::time::timeout(limit, record)
                        .await
                        .unwrap_or_else(|_| {
                            Err(crate::BackendError::Timeout {
                                endpoint: git.name().into(),
                                operation: "record the claim".into(),
                                after: limit,
                            })
                        })
                };
                match answer {
                    Ok(out) => match out.into_iter().next() {
                        Some(RecordOutcome::Written | RecordOutcome::Unchanged) => {
                            return Confirmed::Also(token);
                        }
                        Some(RecordOutcome::Conflict { holder }) => {
                            Some(ClaimOutcome::Lost { holder })
                        }
                        Some(RecordOutcome::Kept { .. }) => Some(ClaimOutcome::NotClaimable {
                            status: crate::TaskStatus::Complete,
                        }),
                        _ => None,
                    },
                    Err(e) if strict => {
                        tracing::warn!(%task, %session, error = %e, "git did not take the claim: undone (it counts only once git has it)");
                        self.undo(task, session, side, token).await;
                        return Confirmed::Failed(e);
                    }
                    Err(e) => {
                        tracing::warn!(%task, %session, error = %e, "cannot confirm the claim in git");
                        None
                    }
                }
            }
            Side::Fallback if open => None,
            Side::Fallback => {
                let Ok(etcd) = self.backend(Side::Primary) else {
                    return Confirmed::NotAsked;
                };
                match tokio::time::timeout(self.config.deadline, etcd.claim(task, session)).await {
                    Ok(Ok(ClaimOutcome::Won(c))) => return Confirmed::Also(c.token),
                    Ok(Ok(other)) => Some(other),
                    Ok(Err(_)) | Err(_) => None,
                }
            }
        };
        let Some(other) = refused else {
            return Confirmed::NotAsked;
        };
        if matches!(other, ClaimOutcome::Lost { .. }) {
            lock(&self.state).stats.conflicts += 1;
        }
        tracing::info!(%task, %session, outcome = %other, "the other store has this task otherwise: claim undone");
        self.undo(task, session, side, token).await;
        if matches!(
            other,
            ClaimOutcome::NotClaimable {
                status: crate::TaskStatus::Complete
            }
        ) {
            self.carry_completion(task, side).await;
        }
        Confirmed::Refused(other)
    }

    /// Gives back a claim won on `side` that does not count.
    async fn undo(&self, task: &TaskId, session: &SessionId, side: Side, token: FencingToken) {
        if let Ok(store) = self.backend(side) {
            if let Err(e) = store
                .release(task, session, ReleaseTo::Available, Some(token))
                .await
            {
                tracing::warn!(%task, %session, error = %e, "cannot undo the claim; it ends with the session's lease");
            }
        }
    }

    /// The other store has `task` complete and `side` does not: `side` is told, so nobody waits
    /// there for a task that is done.
    pub(super) async fn carry_completion(&self, task: &TaskId, side: Side) {
        let other = side.other();
        let (Ok(from), Ok(to)) = (self.backend(other), self.backend(side)) else {
            return;
        };
        if let Ok(Some(done)) = from.get(task).await {
            if done.status == crate::TaskStatus::Complete {
                let item = Mirrored {
                    task: task.clone(),
                    status: crate::TaskStatus::Complete,
                    holder: done.claimed_by,
                    token: None,
                    read_as: None,
                };
                self.record_logged(to, &[item], to.name()).await;
            }
        }
    }

    /// Writes the releases done on git into the coordinator (before a claim there).
    pub(super) async fn settle_pending(&self) {
        let Ok(etcd) = self.backend(Side::Primary).cloned() else {
            return;
        };
        let pending = std::mem::take(&mut lock(&self.state).pending_up);
        if pending.is_empty() {
            return;
        }
        let ok = tokio::time::timeout(
            self.config.deadline * 4,
            self.record_logged(&etcd, &pending, "etcd"),
        )
        .await
        .unwrap_or(false);
        if !ok {
            lock(&self.state).pending_up.extend(pending);
        }
    }
}
