//! The router: one `Backend` over the coordinator (etcd, "primary") and the git board
//! ("fallback"), in mode `coordinator`, `git` or `hybrid`. In hybrid every operation goes to the
//! coordinator first under a deadline; an infrastructure failure sends that operation to git and
//! counts towards the circuit breaker, which keeps the session on git while the coordinator is down.
//! Switching sides (breaker, or a live mode change) moves the session's claims along, so a task
//! keeps running only where its claim is asserted, and writes what happened on the side it leaves
//! into the side it enters before anything new is claimed there. No etcd or git code here.

pub mod breaker;
mod mirror_queue;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{Backend, BackendEvent, Health, Subscription};
use crate::config::Mode;
use crate::error::{BackendError, BackendResult};
use crate::ids::{SessionId, TaskId};
use crate::mirror::{catch_up, Mirrored, RecordOutcome};
use crate::model::{
    ClaimOutcome, FencingToken, Listing, Presence, PutOutcome, ReleaseOutcome, ReleaseTo, TaskPatch,
};
use breaker::{Breaker, Transition};
use mirror_queue::MirrorQueue;

/// How the router behaves.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Who the router serves, for logs (a session id, or `ifc` for the CLI).
    pub name: String,
    /// The starting mode.
    pub mode: Mode,
    /// Hybrid: how long an operation may take on the coordinator before it goes to git.
    pub deadline: Duration,
    /// Hybrid: consecutive failures that open the breaker.
    pub failures_to_open: u32,
    /// Hybrid: first delay between probes while open (doubles, jittered, up to `probe_max`).
    pub probe_initial: Duration,
    pub probe_max: Duration,
    /// Hybrid: how often the coordinator's health is checked while it serves (a session that is
    /// busy with a task makes no calls that would notice an outage).
    pub check_interval: Duration,
    /// Hybrid: record this router's transitions in git, behind the claim path (off when a bridge
    /// runs for the fleet).
    pub mirror: bool,
    /// After a switch, for this long, each claim is also made in the store left behind (when it
    /// answers) before it counts: the other sessions of the fleet switch at their own moment
    /// (their next probe or file event), and until they have, some claim in one store and some
    /// in the other. Default: twice `probe_max` plus `check_interval`, the longest a peer can
    /// stay behind.
    pub confirm_window: Option<Duration>,
}

impl RouterConfig {
    /// The defaults: 500 ms deadline, open after 3 failures, probes from 500 ms up to 30 s, a
    /// health check every second, mirroring on.
    pub fn new(name: impl Into<String>, mode: Mode) -> RouterConfig {
        RouterConfig {
            name: name.into(),
            mode,
            deadline: Duration::from_millis(500),
            failures_to_open: 3,
            probe_initial: Duration::from_millis(500),
            probe_max: Duration::from_secs(30),
            check_interval: Duration::from_secs(1),
            mirror: true,
            confirm_window: None,
        }
    }
}

/// Which store serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// The coordinator (etcd).
    Primary,
    /// The git board.
    Fallback,
}

/// A claim the router's sessions hold, and where it is asserted (its token on each side).
#[derive(Debug, Clone)]
struct Held {
    session: SessionId,
    primary: Option<FencingToken>,
    fallback: Option<FencingToken>,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    serving: Side,
    breaker: Breaker,
    held: HashMap<TaskId, Held>,
    /// Releases done on git that the coordinator has not been told of yet.
    pending_up: Vec<Mirrored>,
    subscribers: Vec<mpsc::UnboundedSender<BackendEvent>>,
    served: BTreeMap<(&'static str, &'static str), u64>,
    /// Until then, claims are confirmed in the other store (see `RouterConfig::confirm_window`).
    confirm_until: Option<Instant>,
    stats: RouterStats,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Moves from the coordinator to git (breaker or mode).
    pub fallbacks: u64,
    /// Tasks found held or done by different sessions in the two stores.
    pub conflicts: u64,
}

#[derive(Debug)]
struct Shared {
    primary: Option<Arc<dyn Backend>>,
    fallback: Option<Arc<dyn Backend>>,
    config: RouterConfig,
    state: Mutex<State>,
    switching: tokio::sync::Mutex<()>,
    mirror: Option<MirrorQueue>,
}

/// The `Backend` the agent and the CLI use: see the module docs.
#[derive(Debug)]
pub struct Router {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every critical section is a few assignments without await points: a poisoned lock still
    // holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn missing(side: Side) -> BackendError {
    BackendError::InvalidInput(match side {
        Side::Primary => "the coordinator (etcd) is not configured: set etcd.endpoints in the fleet file or --endpoints".into(),
        Side::Fallback => "the git board is not configured: set git.remote in the fleet file or --git-remote".into(),
    })
}

impl Router {
    /// A router over the coordinator and git (either may be absent, when not configured; the mode
    /// must not need it). Starts the health checks and the git mirror; must be called inside a
    /// tokio runtime.
    pub fn new(
        primary: Option<Arc<dyn Backend>>,
        fallback: Option<Arc<dyn Backend>>,
        config: RouterConfig,
    ) -> BackendResult<Router> {
        let mode = config.mode;
        let state = State {
            mode,
            serving: Side::Primary,
            breaker: Breaker::new(
                config.failures_to_open,
                config.probe_initial,
                config.probe_max,
            ),
            held: HashMap::new(),
            pending_up: Vec::new(),
            subscribers: Vec::new(),
            served: BTreeMap::new(),
            confirm_until: None,
            stats: RouterStats::default(),
        };
        let mirror = match (&fallback, mode) {
            (Some(git), Mode::Hybrid) if config.mirror && primary.is_some() => {
                Some(MirrorQueue::start(git.clone(), config.name.clone()))
            }
            _ => None,
        };
        let shared = Arc::new(Shared {
            primary,
            fallback,
            config,
            state: Mutex::new(state),
            switching: tokio::sync::Mutex::new(()),
            mirror,
        });
        let serving = shared.desired(&lock(&shared.state));
        shared.backend(serving)?;
        lock(&shared.state).serving = serving;
        let checks = tokio::spawn(Shared::health_checks(Arc::downgrade(&shared)));
        Ok(Router {
            shared,
            tasks: Mutex::new(vec![checks]),
        })
    }

    /// The mode now.
    pub fn mode(&self) -> Mode {
        lock(&self.shared.state).mode
    }

    /// The store that serves now.
    pub fn serving(&self) -> Side {
        lock(&self.shared.state).serving
    }

    /// The name of the store that serves now (`etcd`, `git`).
    pub fn serving_name(&self) -> &'static str {
        let side = self.serving();
        self.shared.backend(side).map_or("none", |b| b.name())
    }

    /// Fallbacks and conflicts so far (the git mirror's conflicts included).
    pub fn stats(&self) -> RouterStats {
        let mut stats = lock(&self.shared.state).stats;
        if let Some(m) = &self.shared.mirror {
            stats.conflicts += m.conflicts();
        }
        stats
    }

    /// How many operations each store served: `(operation, backend) -> count`.
    pub fn served(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        lock(&self.shared.state).served.clone()
    }

    /// Changes the mode live: the session's claims move to the store the new mode uses (or are
    /// reported lost if they cannot be asserted there), without a restart.
    pub async fn set_mode(&self, mode: Mode) -> BackendResult<()> {
        let target = match mode {
            Mode::Git => Side::Fallback,
            Mode::Coordinator | Mode::Hybrid => Side::Primary,
        };
        self.shared.backend(target)?;
        let old = std::mem::replace(&mut lock(&self.shared.state).mode, mode);
        if old != mode {
            tracing::warn!(session = %self.shared.config.name, from = ?old, to = ?mode, "mode changed");
        }
        self.shared.settle().await;
        Ok(())
    }

    /// Waits until the git mirror has written everything queued so far (at most `limit`).
    pub async fn flush_mirror(&self, limit: Duration) -> bool {
        match &self.shared.mirror {
            Some(m) => m.flush(limit).await,
            None => true,
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|p| p.into_inner());
        for t in tasks.drain(..) {
            t.abort();
        }
    }
}

impl Shared {
    fn backend(&self, side: Side) -> BackendResult<&Arc<dyn Backend>> {
        match side {
            Side::Primary => self.primary.as_ref(),
            Side::Fallback => self.fallback.as_ref(),
        }
        .ok_or_else(|| missing(side))
    }

    /// The side the mode and breaker call for (the configured one if only one is).
    fn desired(&self, state: &State) -> Side {
        let wanted = match state.mode {
            Mode::Coordinator => Side::Primary,
            Mode::Git => Side::Fallback,
            Mode::Hybrid if state.breaker.is_open() => Side::Fallback,
            Mode::Hybrid => Side::Primary,
        };
        match wanted {
            Side::Primary if self.primary.is_none() => Side::Fallback,
            Side::Fallback if self.fallback.is_none() => Side::Primary,
            side => side,
        }
    }

    fn count(&self, op: &'static str, side: Side) {
        let name = self.backend(side).map_or("none", |b| b.name());
        *lock(&self.state).served.entry((op, name)).or_default() += 1;
        tracing::debug!(session = %self.config.name, op, backend = name, "served");
    }

    fn broadcast(&self, event: BackendEvent) {
        lock(&self.state)
            .subscribers
            .retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Reports a coordinator failure to the breaker; switches to git if it opened.
    async fn failed(&self, why: &str) {
        let t = lock(&self.state).breaker.failure(Instant::now());
        if t == Transition::Opened {
            tracing::warn!(session = %self.config.name, reason = why, "coordinator unreachable: continuing on git");
            self.settle().await;
        }
    }

    async fn succeeded(&self) {
        let t = lock(&self.state).breaker.success();
        if t == Transition::Closed {
            self.settle().await;
        }
    }

    /// One operation, routed by mode: hybrid tries the coordinator under the deadline and sends
    /// an infrastructure failure to git.
    async fn route<T, F, Fut>(&self, op: &'static str, f: F) -> BackendResult<(T, Side)>
    where
        F: Fn(Arc<dyn Backend>) -> Fut,
        Fut: Future<Output = BackendResult<T>>,
    {
        let (mode, serving) = {
            let s = lock(&self.state);
            (s.mode, s.serving)
        };
        if mode != Mode::Hybrid || serving == Side::Fallback || self.fallback.is_none() {
            let out = f(self.backend(serving)?.clone()).await?;
            self.count(op, serving);
            return Ok((out, serving));
        }
        let primary = self.backend(Side::Primary)?.clone();
        let why = match tokio::time::timeout(self.config.deadline, f(primary)).await {
            Ok(Ok(out)) => {
                self.succeeded().await;
                self.count(op, Side::Primary);
                return Ok((out, Side::Primary));
            }
            Ok(Err(e)) if !e.is_transient() => return Err(e),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.config.deadline),
        };
        tracing::warn!(session = %self.config.name, op, reason = %why, "coordinator failed: this operation goes to git");
        self.failed(&why).await;
        if let Some(m) = &self.mirror {
            m.flush(Duration::from_secs(5)).await;
        }
        let out = f(self.backend(Side::Fallback)?.clone()).await?;
        self.count(op, Side::Fallback);
        Ok((out, Side::Fallback))
    }

    /// Moves to the side the mode and breaker call for, carrying the claims along. Serialised.
    async fn settle(&self) {
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
        match backend.list().await {
            Ok(listing) => self.broadcast(BackendEvent::Resync(listing)),
            Err(e) => {
                tracing::warn!(session = %self.config.name, error = %e, "cannot list the tasks after switching")
            }
        }
    }

    /// Leaving the coordinator: the mirror is flushed; if the coordinator still answers, git is
    /// brought up to its state; every claim held there is asserted in git with the same token, and
    /// the holder is told `ClaimLost` where that fails.
    async fn enter_fallback(&self) {
        let Ok(git) = self.backend(Side::Fallback).cloned() else {
            return;
        };
        if let Some(m) = &self.mirror {
            m.flush(Duration::from_secs(5)).await;
        }
        if let Ok(etcd) = self.backend(Side::Primary) {
            let both = tokio::time::timeout(self.config.deadline * 4, etcd.list()).await;
            if let Ok(Ok(ahead)) = both {
                match git.list().await {
                    Ok(behind) => {
                        // This router's own claims are asserted below, with their tokens.
                        let mut plan = catch_up(&ahead.tasks, &behind.tasks);
                        {
                            let state = lock(&self.state);
                            plan.retain(|m| !state.held.contains_key(&m.task));
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
    async fn enter_primary(&self) -> bool {
        let (Ok(etcd), Ok(git)) = (
            self.backend(Side::Primary).cloned(),
            self.backend(Side::Fallback).cloned(),
        ) else {
            return true;
        };
        let pending = std::mem::take(&mut lock(&self.state).pending_up);
        let mut plan = pending.clone();
        match (git.list().await, etcd.list().await) {
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
                    tracing::warn!(session = %held.session, %task, outcome = ?other, "conflict: the coordinator has this task otherwise; the claim stays in git")
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
    async fn record_logged(&self, to: &Arc<dyn Backend>, plan: &[Mirrored], name: &str) -> bool {
        match to.record(plan).await {
            Ok(out) => {
                for (item, outcome) in plan.iter().zip(&out) {
                    if let RecordOutcome::Conflict { holder } = outcome {
                        lock(&self.state).stats.conflicts += 1;
                        tracing::warn!(session = %self.config.name, task = %item.task, here = ?holder, there = ?item.holder, "conflict: claimed by different sessions in {name} and the other store");
                    }
                }
                true
            }
            Err(e) => {
                tracing::warn!(session = %self.config.name, error = %e, "cannot write what happened elsewhere into {name}");
                false
            }
        }
    }

    /// Hybrid: checks the coordinator while it serves, probes it while the breaker is open.
    async fn health_checks(weak: std::sync::Weak<Shared>) {
        loop {
            let Some(me) = weak.upgrade() else { return };
            let (mode, open, next_probe) = {
                let s = lock(&me.state);
                (s.mode, s.breaker.is_open(), s.breaker.next_probe())
            };
            let now = Instant::now();
            let wait = match next_probe {
                Some(at) if open => at.saturating_duration_since(now),
                _ => me.config.check_interval,
            };
            let interval = me.config.check_interval;
            drop(me);
            tokio::time::sleep(wait.min(interval)).await;
            let Some(me) = weak.upgrade() else { return };
            if mode != Mode::Hybrid || me.primary.is_none() || me.fallback.is_none() {
                continue;
            }
            if open && !lock(&me.state).breaker.probe_due(Instant::now()) {
                continue;
            }
            let Ok(etcd) = me.backend(Side::Primary).cloned() else {
                continue;
            };
            let reachable = tokio::time::timeout(me.config.deadline, etcd.health())
                .await
                .is_ok_and(|h| h.reachable);
            if reachable {
                if open {
                    tracing::info!(session = %me.config.name, "coordinator answers again: returning to it");
                }
                me.succeeded().await;
                // A return that could not be completed is retried by the next check.
                me.settle().await;
                me.catch_up_stragglers().await;
            } else {
                me.failed("health check failed").await;
            }
        }
    }

    /// Forwards a backend's events to the router's subscribers: the serving side's task events,
    /// and `ClaimLost` for claims that were asserted only on that side.
    async fn pump(weak: std::sync::Weak<Shared>, side: Side, mut sub: Subscription) {
        while let Some(event) = sub.next().await {
            let Some(me) = weak.upgrade() else { return };
            match event {
                BackendEvent::ClaimLost {
                    task,
                    session,
                    token,
                } => me.claim_lost(side, task, session, token).await,
                BackendEvent::Resync(_) => {}
                other if lock(&me.state).serving == side => me.broadcast(other),
                _ => {}
            }
        }
    }

    async fn claim_lost(&self, side: Side, task: TaskId, session: SessionId, token: FencingToken) {
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
        if held.primary.is_some() || held.fallback.is_some() {
            tracing::info!(%task, %session, side = ?side, "claim ended on one store; still asserted on the other");
            return;
        }
        // The lease ran out while the coordinator was unreachable: in hybrid the claim is asserted
        // in git (if no one took it there), as when the breaker opens.
        if side == Side::Primary && mode == Mode::Hybrid && self.fallback.is_some() {
            let reachable = match &self.primary {
                Some(etcd) => tokio::time::timeout(self.config.deadline, etcd.health())
                    .await
                    .is_ok_and(|h| h.reachable),
                None => false,
            };
            if !reachable {
                self.failed("the session's lease ended").await;
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
    async fn assert_in_git(&self, task: &TaskId, session: &SessionId, token: FencingToken) -> bool {
        let Ok(git) = self.backend(Side::Fallback).cloned() else {
            return false;
        };
        let item = Mirrored {
            task: task.clone(),
            status: crate::TaskStatus::Claimed,
            holder: Some(session.clone()),
            token: Some(token),
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
}

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

    async fn put(&self, task: &TaskId, patch: &TaskPatch) -> BackendResult<PutOutcome> {
        let (task, patch) = (task.clone(), patch.clone());
        let f = move |b: Arc<dyn Backend>| {
            let (task, patch) = (task.clone(), patch.clone());
            async move { b.put(&task, &patch).await }
        };
        Ok(self.shared.route("put", f).await?.0)
    }

    async fn claim(&self, task: &TaskId, session: &SessionId) -> BackendResult<ClaimOutcome> {
        let me = &self.shared;
        // Whatever was done on git is written to the coordinator before anything new is claimed
        // there.
        let pending = !lock(&me.state).pending_up.is_empty();
        if pending && lock(&me.state).serving == Side::Primary {
            me.settle_pending().await;
        }
        let (t, s) = (task.clone(), session.clone());
        let f = move |b: Arc<dyn Backend>| {
            let (t, s) = (t.clone(), s.clone());
            async move { b.claim(&t, &s).await }
        };
        let (mut outcome, side) = me.route("claim", f).await?;
        if let ClaimOutcome::Won(c) = &outcome {
            if let Some(refused) = me.confirm(task, session, side, c.token).await {
                return Ok(refused);
            }
        }
        if let ClaimOutcome::Won(c) = &mut outcome {
            let confirmed = lock(&me.state).held.get(task).cloned();
            let mut held = Held {
                session: session.clone(),
                primary: (side == Side::Primary).then_some(c.token),
                fallback: (side == Side::Fallback).then_some(c.token),
            };
            // Confirmed in the other store: the claim lives in both.
            if let Some(other) = confirmed.filter(|h| &h.session == session) {
                held.primary = held.primary.or(other.primary);
                held.fallback = held.fallback.or(other.fallback);
            }
            let mirrored = held.fallback.is_some();
            lock(&me.state).held.insert(task.clone(), held);
            if side == Side::Primary && !mirrored {
                if let Some(m) = &me.mirror {
                    m.push(Mirrored {
                        task: task.clone(),
                        status: crate::TaskStatus::Claimed,
                        holder: Some(session.clone()),
                        token: Some(c.token),
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
            let (t, s) = (task.clone(), session.clone());
            let f = move |b: Arc<dyn Backend>| {
                let (t, s) = (t.clone(), s.clone());
                async move { b.release(&t, &s, to, token).await }
            };
            return Ok(me.route("release", f).await?.0);
        };
        let done = Mirrored {
            task: task.clone(),
            status: to.status(),
            holder: Some(session.clone()),
            token: held.primary.or(held.fallback),
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
                Ok(o) => refused = Some(o),
                Err(e) => error = Some(e),
            }
        }
        let mut on_coordinator = false;
        if let Some(tok) = held.primary {
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
                Ok(Err(e)) => error = Some(e),
                Err(_) => {
                    error = Some(BackendError::Timeout {
                        endpoint: etcd.name().into(),
                        operation: "release".into(),
                        after: deadline,
                    })
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
                } else if !on_coordinator && me.primary.is_some() {
                    // Done on git only: the coordinator is told before it serves a claim again.
                    lock(&me.state).pending_up.push(done);
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
        let me = &self.shared;
        let (tx, rx) = mpsc::unbounded_channel();
        let first = lock(&me.state).subscribers.is_empty();
        if first {
            let mut pumps = Vec::new();
            for side in [Side::Primary, Side::Fallback] {
                let Ok(b) = me.backend(side) else { continue };
                match b.subscribe().await {
                    Ok(sub) => pumps.push(tokio::spawn(Shared::pump(
                        Arc::downgrade(&self.shared),
                        side,
                        sub,
                    ))),
                    Err(e) if side == lock(&me.state).serving => return Err(e),
                    Err(e) => {
                        tracing::warn!(session = %me.config.name, backend = b.name(), error = %e, "cannot follow this store's changes")
                    }
                }
            }
            self.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(pumps);
        }
        let serving = lock(&me.state).serving;
        let snapshot = me.backend(serving)?.list().await?;
        lock(&me.state).subscribers.push(tx);
        Ok(Subscription::new(snapshot, rx))
    }

    async fn announce(&self, presence: &Presence) -> BackendResult<()> {
        let presence = presence.clone();
        let f = move |b: Arc<dyn Backend>| {
            let mut p = presence.clone();
            p.backend = b.name().into();
            async move { b.announce(&p).await }
        };
        self.shared.route("announce", f).await.map(drop)
    }

    async fn sessions(&self) -> BackendResult<Vec<Presence>> {
        Ok(self
            .shared
            .route("sessions", |b: Arc<dyn Backend>| async move {
                b.sessions().await
            })
            .await?
            .0)
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
        [Side::Primary, Side::Fallback]
            .into_iter()
            .filter_map(|side| self.shared.backend(side).ok())
            .map(|b| b.reconnects())
            .sum()
    }

    async fn close(&self) {
        if let Some(m) = &self.shared.mirror {
            m.flush(Duration::from_secs(5)).await;
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

impl Shared {
    /// Within the confirm window after a return to the coordinator, what sessions still on git
    /// did there (they return at their own next probe, or exit first) is written into etcd.
    async fn catch_up_stragglers(&self) {
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
    async fn confirm(
        &self,
        task: &TaskId,
        session: &SessionId,
        side: Side,
        token: FencingToken,
    ) -> Option<ClaimOutcome> {
        let (confirming, open) = {
            let s = lock(&self.state);
            let window = s.confirm_until.is_some_and(|t| Instant::now() < t);
            // A hybrid session's etcd claims are in git before their task starts: should etcd
            // go down, the sessions that fall back find them there, and no mirror lag can let
            // one of them run the task again.
            let hybrid = s.mode == Mode::Hybrid && self.mirror.is_some() && side == Side::Primary;
            (window || hybrid, s.breaker.is_open())
        };
        if !confirming {
            return None;
        }
        let refused = match side {
            Side::Primary => {
                let git = self.backend(Side::Fallback).ok()?;
                let item = Mirrored {
                    task: task.clone(),
                    status: crate::TaskStatus::Claimed,
                    holder: Some(session.clone()),
                    token: Some(token),
                };
                let limit = self.config.deadline * 4;
                let answer = tokio::time::timeout(limit, git.record(std::slice::from_ref(&item)))
                    .await
                    .unwrap_or_else(|_| {
                        Err(crate::BackendError::Timeout {
                            endpoint: git.name().into(),
                            operation: "record the claim".into(),
                            after: limit,
                        })
                    });
                match answer {
                    Ok(out) => match out.into_iter().next() {
                        Some(RecordOutcome::Written | RecordOutcome::Unchanged) => {
                            self.note_held(task, session, None, Some(token));
                            None
                        }
                        Some(RecordOutcome::Conflict { holder }) => {
                            Some(ClaimOutcome::Lost { holder })
                        }
                        Some(RecordOutcome::Kept { .. }) => Some(ClaimOutcome::NotClaimable {
                            status: crate::TaskStatus::Complete,
                        }),
                        _ => None,
                    },
                    Err(e) => {
                        tracing::warn!(%task, %session, error = %e, "cannot confirm the claim in git");
                        None
                    }
                }
            }
            Side::Fallback if open => None,
            Side::Fallback => {
                let etcd = self.backend(Side::Primary).ok()?;
                match tokio::time::timeout(self.config.deadline, etcd.claim(task, session)).await {
                    Ok(Ok(ClaimOutcome::Won(c))) => {
                        self.note_held(task, session, Some(c.token), None);
                        None
                    }
                    Ok(Ok(other)) => Some(other),
                    Ok(Err(_)) | Err(_) => None,
                }
            }
        };
        if let Some(other) = &refused {
            if matches!(other, ClaimOutcome::Lost { .. }) {
                lock(&self.state).stats.conflicts += 1;
            }
            tracing::warn!(%task, %session, outcome = ?other, "the other store has this task otherwise: claim undone");
            let store = self.backend(side).ok()?;
            if let Err(e) = store
                .release(task, session, ReleaseTo::Available, Some(token))
                .await
            {
                tracing::warn!(%task, %session, error = %e, "cannot undo the claim; it ends with the session's lease");
            }
            if matches!(
                other,
                ClaimOutcome::NotClaimable {
                    status: crate::TaskStatus::Complete
                }
            ) {
                self.carry_completion(task, side).await;
            }
        }
        refused
    }

    /// The other store has `task` complete and `side` does not: `side` is told, so nobody waits
    /// there for a task that is done.
    async fn carry_completion(&self, task: &TaskId, side: Side) {
        let other = match side {
            Side::Primary => Side::Fallback,
            Side::Fallback => Side::Primary,
        };
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
                };
                self.record_logged(to, &[item], to.name()).await;
            }
        }
    }

    /// Records where a confirmed claim also lives.
    fn note_held(
        &self,
        task: &TaskId,
        session: &SessionId,
        primary: Option<FencingToken>,
        fallback: Option<FencingToken>,
    ) {
        let mut s = lock(&self.state);
        let h = s.held.entry(task.clone()).or_insert_with(|| Held {
            session: session.clone(),
            primary: None,
            fallback: None,
        });
        h.session = session.clone();
        h.primary = primary.or(h.primary);
        h.fallback = fallback.or(h.fallback);
    }

    /// Writes the releases done on git into the coordinator (before a claim there).
    async fn settle_pending(&self) {
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

#[cfg(test)]
mod tests;
