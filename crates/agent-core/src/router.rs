//! The router: one `Backend` over the coordinator (etcd, "primary") and the git board
//! ("fallback"), in mode `coordinator`, `git` or `hybrid`. In hybrid every operation goes to the
//! coordinator first under a deadline; an infrastructure failure sends that operation to git and
//! counts towards the circuit breaker, which keeps the session on git while the coordinator is down.
//! Switching sides (breaker, or a live mode change) moves the session's claims along, so a task
//! keeps running only where its claim is asserted, and writes what happened on the side it leaves
//! into the side it enters before anything new is claimed there. No etcd or git code here.

pub mod breaker;
mod mirror_queue;
pub mod objective;
mod store;
mod switch;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{Backend, BackendEvent, Subscription};
use crate::config::Mode;
use crate::error::{BackendError, BackendResult};
use crate::ids::{SessionId, TaskId};
use crate::interest::Interest;
use crate::mirror::Mirrored;
use crate::model::{FencingToken, Presence};
use breaker::{Breaker, Transition};
use mirror_queue::MirrorQueue;

/// How long git's refusal of a task is trusted without an event from git about it.
const REFUSAL_MEMORY: Duration = Duration::from_secs(30);

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
    /// The fleet still has a git side (sessions in git mode, or that may fall back to it): every
    /// claim won on the coordinator is recorded in git before it counts, in every mode, so a
    /// session on git never takes a task an etcd session runs. Off once the fleet declares git
    /// retired (`git.retired: true`).
    pub claims_in_git: bool,
    /// After a switch, for this long, each claim is also made in the store left behind (when it
    /// answers) before it counts: the other sessions of the fleet switch at their own moment
    /// (their next probe or file event), and until they have, some claim in one store and some
    /// in the other. Default: twice `probe_max` plus `check_interval`, the longest a peer can
    /// stay behind.
    pub confirm_window: Option<Duration>,
    /// Hybrid: the coordinator's service-level objective (the fleet file's `slo:`); breached,
    /// the session moves to git until the coordinator is within it again. Off when `None`.
    pub objective: Option<objective::Objective>,
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
            claims_in_git: true,
            confirm_window: None,
            objective: None,
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

impl Side {
    /// The other store.
    pub fn other(self) -> Side {
        match self {
            Side::Primary => Side::Fallback,
            Side::Fallback => Side::Primary,
        }
    }
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
    /// What the router follows in its stores: its first subscriber's interest.
    interest: Option<Interest>,
    served: BTreeMap<(&'static str, &'static str), u64>,
    /// Until then, claims are confirmed in the other store (see `RouterConfig::confirm_window`).
    confirm_until: Option<Instant>,
    /// Tasks git had otherwise when an etcd claim was confirmed there, with git's answer: asked
    /// again only once git's state of the task changes (or after `REFUSAL_MEMORY`), so a task a
    /// git session holds costs no claim storm on etcd.
    refused: HashMap<TaskId, (crate::model::ClaimOutcome, Instant)>,
    stats: RouterStats,
    /// Hybrid: the objective and the claims it is judged on (`RouterConfig::objective`).
    objective: Option<objective::ObjectiveWatch>,
    /// The presence registered (`Backend::register`): a coordinator attached later
    /// (`Router::attach_coordinator`) is told it too.
    registered: Option<Presence>,
    /// The presence last announced (`Backend::announce`), told to both stores at a switch.
    announced: Option<Presence>,
    /// Whether that registration takes the session over from a running process.
    take_over: bool,
    /// Stores whose registration did not land (they did not answer): registered again before
    /// this process acts in them, so it never works in a store that still names another live
    /// process of the session (seed 60000020: git's registration lost 64 push races, the agent
    /// worked there anyway, and the process it had taken over evicted it instead).
    unregistered: std::collections::BTreeSet<Side>,
    /// `end_inherited` was called: a store registered later ends what it took on at once.
    inherited_ended: bool,
    /// Someone follows the router's events (`subscribe` was called).
    followed: bool,
    /// A pump forwards the coordinator's events (set by whoever starts it, once).
    following_primary: bool,
    /// A return to the coordinator was put off because it holds no tasks (said once).
    told_etcd_empty: bool,
    /// The last `record_logged` failed (its warning is not repeated until one works).
    record_failing: bool,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Moves from the coordinator to git (breaker or mode).
    pub fallbacks: u64,
    /// Tasks found held or done by different sessions in the two stores.
    pub conflicts: u64,
    /// Moves to git because the coordinator breached the objective (also counted in
    /// `fallbacks`).
    pub slo_to_git: u64,
    /// Returns to the coordinator once it was within the objective again.
    pub slo_returns: u64,
    /// The session is kept on git by a breached objective now (read from the objective).
    pub slo_breached: bool,
    /// The p95 of the claims on the coordinator the objective is judging now, in microseconds
    /// (`None`: no objective, or no claim in its window).
    pub slo_claim_p95_us: Option<u64>,
    /// Times a subscription of the router's stores fell too far behind and started again.
    pub resyncs: u64,
}

#[derive(Debug)]
struct Shared {
    /// The coordinator: set at the start, or later when it was unreachable then
    /// (`Router::attach_coordinator`).
    primary: OnceLock<Arc<dyn Backend>>,
    /// A coordinator is being connected in the background (`Router::attach_coordinator`).
    awaiting_primary: std::sync::atomic::AtomicBool,
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
            interest: None,
            served: BTreeMap::new(),
            confirm_until: None,
            refused: HashMap::new(),
            stats: RouterStats::default(),
            objective: config.objective.clone().map(objective::ObjectiveWatch::new),
            registered: None,
            announced: None,
            take_over: false,
            unregistered: Default::default(),
            inherited_ended: false,
            followed: false,
            following_primary: false,
            told_etcd_empty: false,
            record_failing: false,
        };
        // The git mirror: a hybrid session's (unless a bridge mirrors for it), and, while the
        // fleet has a git side, every session's, so a completion git could not take at once
        // reaches it as soon as it answers.
        let wanted = (mode == Mode::Hybrid && config.mirror) || config.claims_in_git;
        let mirror = match &fallback {
            Some(git) if wanted => Some(MirrorQueue::start(git.clone(), config.name.clone())),
            _ => None,
        };
        let cell = OnceLock::new();
        if let Some(p) = primary {
            let _ = cell.set(p);
        }
        let shared = Arc::new(Shared {
            primary: cell,
            awaiting_primary: std::sync::atomic::AtomicBool::new(false),
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
        let (mut stats, p95) = {
            let s = lock(&self.shared.state);
            let mut stats = s.stats;
            stats.slo_breached = s.objective.as_ref().is_some_and(|o| o.breached());
            let p95 = s
                .objective
                .as_ref()
                .and_then(|o| o.claim_p95(Instant::now()));
            (stats, p95)
        };
        stats.slo_claim_p95_us = p95.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        if let Some(m) = &self.shared.mirror {
            stats.conflicts += m.conflicts();
        }
        stats.resyncs = self.resyncs();
        stats
    }

    /// A count summed over both stores.
    fn sum_over_stores(&self, count: impl Fn(&dyn Backend) -> u64) -> u64 {
        [Side::Primary, Side::Fallback]
            .into_iter()
            .filter_map(|side| self.shared.backend(side).ok())
            .map(|b| count(b.as_ref()))
            .sum()
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
        // Hybrid serves git until a coordinator still being connected answers.
        if !(mode == Mode::Hybrid && self.shared.awaiting()) {
            self.shared.backend(target)?;
        }
        let old = std::mem::replace(&mut lock(&self.shared.state).mode, mode);
        if old != mode {
            tracing::warn!(session = %self.shared.config.name, from = old.as_str(), to = mode.as_str(), "mode changed");
        }
        self.shared.settle().await;
        Ok(())
    }

    /// Holds the coordinator to `objective` from now on (the fleet file's `slo:` was edited): a
    /// changed objective starts with an empty window, so a session kept on git by the old one
    /// returns (and leaves again if the coordinator breaches the new one).
    pub async fn set_objective(&self, objective: Option<objective::Objective>) {
        {
            let mut s = lock(&self.shared.state);
            if s.objective
                .as_ref()
                .map(objective::ObjectiveWatch::objective)
                == objective.as_ref()
            {
                return;
            }
            s.objective = objective.map(objective::ObjectiveWatch::new);
        }
        tracing::info!(session = %self.shared.config.name, "the fleet's objective (slo:) changed: judging from now on by the new one");
        self.shared.settle().await;
    }

    /// Attaches the coordinator once `connect` yields it, for a router made without one because
    /// it did not answer at the start: it is told the registered presence, its events are
    /// followed, and a hybrid session moves to it by the usual return (git's progress written
    /// into etcd first, `switch.rs`). A second coordinator is ignored.
    pub fn attach_coordinator<F>(&self, connect: F)
    where
        F: Future<Output = Arc<dyn Backend>> + Send + 'static,
    {
        let weak = Arc::downgrade(&self.shared);
        self.shared
            .awaiting_primary
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let task = tokio::spawn(async move {
            let etcd = connect.await;
            let Some(me) = weak.upgrade() else { return };
            if me.primary.set(etcd.clone()).is_err() {
                return;
            }
            tracing::info!(session = %me.config.name, backend = etcd.name(), "the coordinator answers: attached");
            let registered = lock(&me.state).registered.clone();
            if let Some(p) = registered {
                let mut p = p.clone();
                p.backend = etcd.name().into();
                let take_over = lock(&me.state).take_over;
                match etcd.register(&p, take_over).await {
                    Ok(None) => me.end_inherited_late(&*etcd).await,
                    // Another process runs the session there: this one yields.
                    Ok(Some(other)) => me.broadcast(BackendEvent::SessionTaken {
                        session: p.session_id.clone(),
                        by: Box::new(other),
                    }),
                    Err(e) => {
                        lock(&me.state).unregistered.insert(Side::Primary);
                        tracing::warn!(session = %me.config.name, error = %e, "cannot register the session with the coordinator yet")
                    }
                }
            }
            drop(me);
            Shared::follow_primary(weak).await;
        });
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Whether the git mirror still holds transitions git has not taken.
    pub fn mirror_pending(&self) -> bool {
        self.shared.mirror.as_ref().is_some_and(|m| m.pending())
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
            Side::Primary => self.primary.get(),
            Side::Fallback => self.fallback.as_ref(),
        }
        .ok_or_else(|| match side {
            Side::Primary if self.awaiting() => BackendError::Unavailable {
                endpoint: "etcd".into(),
                reason:
                    "the coordinator has not answered since this process started (still trying)"
                        .into(),
            },
            _ => missing(side),
        })
    }

    /// A coordinator is being connected and has not answered yet.
    fn awaiting(&self) -> bool {
        self.primary.get().is_none()
            && self
                .awaiting_primary
                .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The side the mode and breaker call for (the configured one if only one is).
    fn desired(&self, state: &State) -> Side {
        let wanted = match state.mode {
            Mode::Coordinator => Side::Primary,
            Mode::Git => Side::Fallback,
            Mode::Hybrid if state.breaker.is_open() => Side::Fallback,
            Mode::Hybrid if state.objective.as_ref().is_some_and(|o| o.breached()) => {
                Side::Fallback
            }
            Mode::Hybrid => Side::Primary,
        };
        match wanted {
            Side::Primary if self.primary.get().is_none() => Side::Fallback,
            Side::Fallback if self.fallback.is_none() => Side::Primary,
            side => side,
        }
    }

    fn count(&self, op: &'static str, side: Side) {
        let name = self.backend(side).map_or("none", |b| b.name());
        *lock(&self.state).served.entry((op, name)).or_default() += 1;
        tracing::debug!(session = %self.config.name, op, backend = name, "served");
    }

    /// What the router follows in its stores (every task until someone subscribed).
    fn interest(&self) -> Interest {
        lock(&self.state).interest.clone().unwrap_or_default()
    }

    fn broadcast(&self, event: BackendEvent) {
        lock(&self.state)
            .subscribers
            .retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Reports a coordinator failure to the breaker (`silent`: it did not answer within the
    /// deadline, which opens the breaker at once); switches to git if it opened.
    async fn failed(&self, why: &str, silent: bool) {
        let t = {
            let mut s = lock(&self.state);
            if silent {
                s.breaker.trip(Instant::now())
            } else {
                s.breaker.failure(Instant::now())
            }
        };
        if t == Transition::Opened {
            tracing::warn!(session = %self.config.name, reason = why, "coordinator unreachable: continuing on git");
            self.settle().await;
        }
    }

    /// A claim on the coordinator, for the objective. A breach is acted on by the health checks
    /// (within `check_interval`): the claim that breached it is not held yet, and a move now
    /// would not carry it to git.
    fn judge_claim(&self, took: Duration, answered: bool) {
        let mut s = lock(&self.state);
        let Some(why) = s
            .objective
            .as_mut()
            .and_then(|o| o.claim(Instant::now(), took, answered))
        else {
            return;
        };
        s.stats.slo_to_git += 1;
        drop(s);
        tracing::warn!(session = %self.config.name, reason = %why, "the coordinator breached the fleet's objective (slo:): moving to git until it is within it again");
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
        let (mode, mut serving, open) = {
            let s = lock(&self.state);
            (s.mode, s.serving, s.breaker.is_open())
        };
        if mode == Mode::Hybrid && serving == Side::Primary && open && self.fallback.is_some() {
            // The breaker opened and the move to git is under way (or was cut short): this
            // operation waits for it rather than for the coordinator's deadline.
            self.settle().await;
            serving = lock(&self.state).serving;
        }
        if mode != Mode::Hybrid || serving == Side::Fallback || self.fallback.is_none() {
            self.ensure_registered(serving).await?;
            let out = f(self.backend(serving)?.clone()).await?;
            self.count(op, serving);
            return Ok((out, serving));
        }
        let primary = self.backend(Side::Primary)?.clone();
        let attempt = async {
            self.ensure_registered(Side::Primary).await?;
            f(primary).await
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.deadline, attempt).await;
        if op == "claim" {
            let answered = match &result {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => !e.is_transient(),
                Err(_) => false,
            };
            self.judge_claim(started.elapsed(), answered);
        }
        let (why, silent) = match result {
            Ok(Ok(out)) => {
                self.succeeded().await;
                self.count(op, Side::Primary);
                return Ok((out, Side::Primary));
            }
            Ok(Err(e)) if !e.is_transient() => return Err(e),
            Ok(Err(e)) => (e.to_string(), matches!(e, BackendError::Timeout { .. })),
            Err(_) => (format!("no answer within {:?}", self.config.deadline), true),
        };
        tracing::warn!(session = %self.config.name, op, reason = %why, "coordinator failed: this operation goes to git");
        self.failed(&why, silent).await;
        if let Some(m) = &self.mirror {
            m.flush(Duration::from_secs(5)).await;
        }
        self.ensure_registered(Side::Fallback).await?;
        let out = f(self.backend(Side::Fallback)?.clone()).await?;
        self.count(op, Side::Fallback);
        Ok((out, Side::Fallback))
    }

    /// A store registered after the agent reported its previous process's finished runs ends
    /// the claims it took on from that process at once (see `Backend::end_inherited`).
    async fn end_inherited_late(&self, b: &dyn Backend) {
        if !lock(&self.state).inherited_ended {
            return;
        }
        if let Err(e) = b.end_inherited().await {
            tracing::warn!(backend = b.name(), error = %e, "cannot end the claims left by the session's previous process: they end when their lease does");
        }
    }

    /// Registers the session again in `side` if its registration there did not land: an
    /// answer that another live process runs the session there is `SessionElsewhere` (and the
    /// subscribers are told), a store that still does not answer fails the operation.
    async fn ensure_registered(&self, side: Side) -> BackendResult<()> {
        let (mut presence, take_over) = {
            let s = lock(&self.state);
            match &s.registered {
                Some(p) if s.unregistered.contains(&side) => (p.clone(), s.take_over),
                _ => return Ok(()),
            }
        };
        let b = self.backend(side)?.clone();
        presence.backend = b.name().into();
        match b.register(&presence, take_over).await? {
            None => {
                lock(&self.state).unregistered.remove(&side);
                tracing::info!(session = %presence.session_id, backend = b.name(), "registered the session in this store");
                self.end_inherited_late(&*b).await;
                Ok(())
            }
            Some(other) => {
                let elsewhere = crate::process::describe(&other);
                self.broadcast(BackendEvent::SessionTaken {
                    session: presence.session_id.clone(),
                    by: Box::new(other),
                });
                Err(BackendError::SessionElsewhere {
                    session: presence.session_id.to_string(),
                    elsewhere,
                })
            }
        }
    }

    /// git's state of `task` changed: a refusal it gave is forgotten, and the subscribers are
    /// told the coordinator's state of the task again, so a session waiting for it claims now.
    async fn git_changed(&self, task: &TaskId) {
        if lock(&self.state).refused.remove(task).is_none() {
            return;
        }
        let Ok(etcd) = self.backend(Side::Primary) else {
            return;
        };
        if let Ok(Some(t)) = etcd.get(task).await {
            self.broadcast(BackendEvent::Task(crate::model::TaskEvent {
                task: t.id.clone(),
                old_status: None,
                new_status: Some(t.status),
                holder: t.claimed_by.clone(),
                blocked_by: t.blocked_by.clone(),
                revision: 0,
                time: std::time::SystemTime::now(),
            }));
        }
    }

    /// What git says of `task` now that etcd must hear while this session works there (issue
    /// 15 #8, #11), as a bridge would carry it:
    /// - git freed it (its holder released it, or its holder's heartbeat went stale): a copy of
    ///   that claim in etcd (carried there by a catch-up or a bridge, without a lease) would
    ///   hold the task for nobody, so it ends too. Etcd keeps a claim under a live lease (only
    ///   its holder or the lease's end frees that).
    /// - git has it complete (a session did it while on git): etcd's sessions waiting for it as
    ///   a blocker would wait for ever. Etcd keeps another session's claim (a conflict).
    ///
    /// Git is asked again first: the event may be old news.
    async fn carry_from_git(&self, task: &TaskId, status: crate::TaskStatus) {
        use crate::TaskStatus::{Available, Blocked, Claimed, Complete};
        if !self.config.claims_in_git
            || !matches!(status, Available | Blocked | Complete)
            || lock(&self.state).held.contains_key(task)
        {
            return;
        }
        let (Ok(etcd), Ok(git)) = (self.backend(Side::Primary), self.backend(Side::Fallback))
        else {
            return;
        };
        let Ok(Some(here)) = etcd.get(task).await else {
            return;
        };
        // This session's own claims end by its own release.
        let own = here
            .claimed_by
            .as_ref()
            .is_some_and(|h| h.as_str() == self.config.name);
        let behind = match status {
            Complete => here.status != Complete,
            _ => here.status == Claimed,
        };
        if !behind || (here.status == Claimed && own) {
            return;
        }
        let Ok(Some(there)) = git.get(task).await else {
            return;
        };
        let item = match there.status {
            Available | Blocked if status != Complete => crate::mirror::Mirrored {
                task: task.clone(),
                status: there.status,
                holder: here.claimed_by.clone(),
                token: None,
                read_as: None,
            },
            Complete if status == Complete => crate::mirror::Mirrored {
                task: task.clone(),
                status: Complete,
                holder: there.claimed_by.clone(),
                token: None,
                read_as: None,
            },
            _ => return,
        };
        if let Ok(out) = etcd.record(std::slice::from_ref(&item)).await {
            if out.first() == Some(&crate::mirror::RecordOutcome::Written) {
                tracing::info!(%task, status = %item.status, holder = %crate::model::holder_name(item.holder.as_ref()), "carried git's word on the task into etcd");
            }
        }
    }

    /// git's earlier answer for `task`, if it still stands.
    fn refusal(&self, task: &TaskId) -> Option<crate::model::ClaimOutcome> {
        let mut s = lock(&self.state);
        match s.refused.get(task) {
            Some((answer, at)) if at.elapsed() < REFUSAL_MEMORY => Some(answer.clone()),
            Some(_) => {
                s.refused.remove(task);
                None
            }
            None => None,
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
            if mode != Mode::Hybrid || me.primary.get().is_none() || me.fallback.is_none() {
                continue;
            }
            if open && !lock(&me.state).breaker.probe_due(Instant::now()) {
                continue;
            }
            let Ok(etcd) = me.backend(Side::Primary).cloned() else {
                continue;
            };
            let asked = Instant::now();
            let health = tokio::time::timeout(me.config.deadline, etcd.health()).await;
            let reachable = health.as_ref().is_ok_and(|h| h.reachable);
            me.judge_probe(reachable.then(|| asked.elapsed())).await;
            if reachable {
                if open {
                    tracing::info!(session = %me.config.name, "coordinator answers again: returning to it");
                }
                me.succeeded().await;
                // A return that could not be completed is retried by the next check.
                me.settle().await;
                me.catch_up_stragglers().await;
            } else {
                match health {
                    Err(_) => me.failed("no answer to the health check", true).await,
                    Ok(_) => me.failed("health check failed", false).await,
                }
            }
        }
    }

    /// A health check of the coordinator, for the objective: while it is breached, returns to
    /// the coordinator once it has been within it for long enough; while it is breached and the
    /// coordinator still serves, moves to git.
    async fn judge_probe(&self, took: Option<Duration>) {
        let (returned, leave) = {
            let mut s = lock(&self.state);
            let serving = s.serving;
            let Some(o) = s.objective.as_mut() else {
                return;
            };
            let returned = o.probe(Instant::now(), took);
            let leave = o.breached() && serving == Side::Primary;
            if returned {
                s.stats.slo_returns += 1;
            }
            (returned, leave)
        };
        if returned {
            tracing::info!(session = %self.config.name, "the coordinator is within the fleet's objective again (slo:): returning to it");
        }
        if returned || leave {
            self.settle().await;
        }
    }

    /// Whether this caller is the one to start forwarding the coordinator's events (once).
    fn start_following_primary(&self) -> bool {
        let mut s = lock(&self.state);
        let start = s.followed && !s.following_primary && self.primary.get().is_some();
        s.following_primary |= start;
        start
    }

    /// Follows a coordinator attached after the start, once someone follows the router: its
    /// subscription is retried until it answers, then its events are pumped.
    async fn follow_primary(weak: std::sync::Weak<Shared>) {
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let Some(me) = weak.upgrade() else { return };
            if me.start_following_primary() {
                loop {
                    let Ok(etcd) = me.backend(Side::Primary).cloned() else {
                        return;
                    };
                    match etcd.subscribe_to(&me.interest()).await {
                        Ok(sub) => {
                            drop(me);
                            return Shared::pump(weak, Side::Primary, sub).await;
                        }
                        Err(e) => {
                            tracing::warn!(session = %me.config.name, error = %e, "cannot follow the coordinator's changes yet");
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                    }
                }
            }
            // Nobody follows yet (or a pump runs already, started by `subscribe`).
            if lock(&me.state).following_primary {
                return;
            }
            drop(me);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Follows git when its first subscription failed (the remote was away when the agent
    /// started): retried until it answers, then its events are pumped. Without it, the agent
    /// never heard git's changes, nor that another process took the session over there (seed
    /// 260000011: a taken-over agent idled on for good after a rollback moved it to git).
    pub(super) async fn follow_fallback(weak: std::sync::Weak<Shared>) {
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let Some(me) = weak.upgrade() else { return };
            let Ok(git) = me.backend(Side::Fallback).cloned() else {
                return;
            };
            match git.subscribe_to(&me.interest()).await {
                Ok(sub) => {
                    tracing::info!(session = %me.config.name, backend = git.name(), "following this store's changes");
                    drop(me);
                    return Shared::pump(weak, Side::Fallback, sub).await;
                }
                Err(e) => {
                    tracing::debug!(session = %me.config.name, error = %e, "cannot follow git's changes yet");
                    drop(me);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
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
                // Whichever store learnt it: the process is to stop.
                taken @ BackendEvent::SessionTaken { .. } => me.broadcast(taken),
                BackendEvent::Task(e) if side == Side::Fallback => {
                    let serving = lock(&me.state).serving;
                    if serving == side {
                        me.broadcast(BackendEvent::Task(e));
                    } else {
                        if let Some(status) = e.new_status {
                            me.carry_from_git(&e.task, status).await;
                        }
                        me.git_changed(&e.task).await;
                    }
                }
                // A `Resync` among them: the serving store started this subscription again (it
                // fell behind), and its snapshot replaces the subscribers' view.
                other if lock(&me.state).serving == side => me.broadcast(other),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
