//! An in-memory `Backend`: one `MemoryStore` shared by any number of `MemoryBackend` clients, with
//! the same semantics as etcd (revisions, lease-bound claims that expire, fenced releases, events).
//! For tests of pure logic and as the reference the conformance suite is checked against.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{Backend, BackendEvent, Health, Subscription};
use crate::error::BackendResult;
use crate::ids::{SessionId, TaskId};
use crate::mirror::{self, Decision, Mirrored, RecordOutcome};
use crate::model::{
    Claim, ClaimOutcome, Claimability, FencingToken, Listing, Patched, Presence, PutOutcome,
    ReleaseOutcome, ReleaseTo, Task, TaskEvent, TaskPatch, TaskStatus,
};

#[derive(Debug, Clone)]
struct Record {
    /// As stored; `status`/`claimed_by` may describe a claim whose lease is gone.
    task: Task,
    /// The lease the stored claim was made under, if any.
    lease: Option<u64>,
    /// The claim that ended with its lease, while nothing was written since: its holder (session,
    /// token, client) may still complete the task.
    lapsed: Option<(SessionId, u64, u64)>,
}

#[derive(Debug, Clone)]
struct ClaimKey {
    session: SessionId,
    lease: Option<u64>,
    token: u64,
}

#[derive(Debug)]
struct Lease {
    deadline: Instant,
    owner: u64,
}

#[derive(Debug)]
struct Subscriber {
    owner: u64,
    tx: mpsc::UnboundedSender<BackendEvent>,
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    tasks: BTreeMap<TaskId, Record>,
    claims: BTreeMap<TaskId, ClaimKey>,
    leases: HashMap<u64, Lease>,
    next_lease: u64,
    subscribers: Vec<Subscriber>,
    presences: BTreeMap<SessionId, (Presence, Option<u64>)>,
    /// Set by [`MemoryStore::set_reachable`]: every call fails as if the store were down.
    down: bool,
    /// Set by [`MemoryStore::set_silent`]: every call waits, as a paused or hung etcd keeps
    /// a caller waiting (until its deadline).
    silent: bool,
    /// Set by [`MemoryStore::set_list_delay`]: how long a list's answer takes to arrive.
    list_delay: Duration,
}

impl State {
    /// The task as readers see it: a leased claim whose claim key is gone reads available.
    fn effective(&self, id: &TaskId) -> Option<Task> {
        let rec = self.tasks.get(id)?;
        let mut task = rec.task.clone();
        if task.status == TaskStatus::Claimed
            && rec.lease.is_some()
            && !self.claims.contains_key(id)
        {
            task.status = TaskStatus::Available;
            task.claimed_by = None;
            task.claimed_at = None;
        }
        task.copied &= task.status == TaskStatus::Claimed;
        Some(task)
    }

    fn status_of(&self, id: &TaskId) -> Option<TaskStatus> {
        self.effective(id).map(|t| t.status)
    }

    /// Applies `change` as one revision and tells subscribers what it changed for `id`.
    fn mutate(&mut self, id: &TaskId, change: impl FnOnce(&mut State)) -> u64 {
        let before = self.effective(id);
        self.revision += 1;
        change(self);
        let after = self.effective(id);
        self.notify(id, before, after);
        self.revision
    }

    fn notify(&mut self, id: &TaskId, before: Option<Task>, after: Option<Task>) {
        // Blockers too: a waiting session must hear of a blocker edit (issue 15 #4).
        let key = |t: &Option<Task>| {
            t.as_ref()
                .map(|t| (t.status, t.claimed_by.clone(), t.blocked_by.clone()))
        };
        if key(&before) == key(&after) {
            return;
        }
        let event = BackendEvent::Task(TaskEvent {
            task: id.clone(),
            old_status: before.map(|t| t.status),
            new_status: after.as_ref().map(|t| t.status),
            blocked_by: after
                .as_ref()
                .map(|t| t.blocked_by.clone())
                .unwrap_or_default(),
            holder: after.and_then(|t| t.claimed_by),
            revision: self.revision,
            time: SystemTime::now(),
        });
        self.broadcast(None, event);
    }

    /// Sends to every subscriber, or only to those of backend `owner`.
    fn broadcast(&mut self, owner: Option<u64>, event: BackendEvent) {
        self.subscribers.retain(|s| {
            if owner.is_some_and(|o| o != s.owner) {
                return !s.tx.is_closed();
            }
            s.tx.send(event.clone()).is_ok()
        });
    }

    /// Ends every lease past its deadline: its claim keys go, and the records read available again.
    fn expire(&mut self, now: Instant) {
        let dead: Vec<(u64, u64)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, l)| (*id, l.owner))
            .collect();
        for (lease, owner) in dead {
            self.leases.remove(&lease);
            self.presences.retain(|_, (_, l)| *l != Some(lease));
            let held: Vec<(TaskId, ClaimKey)> = self
                .claims
                .iter()
                .filter(|(_, c)| c.lease == Some(lease))
                .map(|(t, c)| (t.clone(), c.clone()))
                .collect();
            for (task, claim) in held {
                self.mutate(&task, |s| {
                    s.claims.remove(&task);
                });
                // Whoever sees the expiry first resets the record; here that is the store itself.
                self.mutate(&task, |s| {
                    if let Some(rec) = s.tasks.get_mut(&task) {
                        rec.task.status = TaskStatus::Available;
                        rec.task.claimed_by = None;
                        rec.task.claimed_at = None;
                        rec.lease = None;
                        rec.lapsed = Some((claim.session.clone(), claim.token, owner));
                    }
                });
                let lost = BackendEvent::ClaimLost {
                    task,
                    session: claim.session,
                    token: FencingToken(claim.token),
                };
                self.broadcast(Some(owner), lost);
            }
        }
    }

    fn listing(&self) -> Listing {
        Listing {
            tasks: self
                .tasks
                .keys()
                .filter_map(|id| self.effective(id))
                .collect(),
            corrupt: Vec::new(),
            revision: self.revision,
        }
    }
}

/// The shared store: what one etcd cluster is to many etcd clients.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    sweeper: Arc<JoinHandle<()>>,
}

impl MemoryStore {
    /// A new empty store. Must be called inside a tokio runtime: a background sweeper ends expired
    /// leases (every 20 ms) so that subscribers hear of them without anyone asking.
    pub fn new() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let weak: Weak<Mutex<State>> = Arc::downgrade(&state);
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade() else { return };
                lock(&state).expire(Instant::now());
            }
        });
        MemoryStore {
            state,
            sweeper: Arc::new(sweeper),
        }
    }

    /// Ends, now, the lease behind the current claim on `task` (as if its holder had stopped
    /// keeping it alive). For tests.
    pub fn end_lease_of(&self, task: &TaskId) {
        let mut state = lock(&self.state);
        let lease = state.claims.get(task).and_then(|c| c.lease);
        if let Some(l) = lease.and_then(|l| state.leases.get_mut(&l)) {
            l.deadline = Instant::now();
        }
        state.expire(Instant::now());
    }

    /// Makes every call of every client fail with `Unavailable` (`false`) or work again (`true`),
    /// as an etcd outage would. For tests of what sits above a backend (the router).
    pub fn set_reachable(&self, reachable: bool) {
        lock(&self.state).down = !reachable;
    }

    /// Makes every call of every client wait without an answer (`true`) until set `false`, as
    /// a SIGSTOPped or black-holed etcd would. For tests of deadlines above a backend.
    pub fn set_silent(&self, silent: bool) {
        lock(&self.state).silent = silent;
    }

    /// Makes a list's answer arrive `delay` after it was read (changes meanwhile are not in
    /// it), as a big board's list over a network does. For tests of what sits above a backend.
    pub fn set_list_delay(&self, delay: Duration) {
        lock(&self.state).list_delay = delay;
    }

    /// Waits while the store is set silent.
    async fn answer(&self) {
        while lock(&self.state).silent {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut state = lock(&self.state);
        state.expire(Instant::now());
        state
    }

    /// The state, or `Unavailable` while the store is set down.
    fn up(&self) -> BackendResult<MutexGuard<'_, State>> {
        let state = self.lock();
        if state.down {
            return Err(crate::BackendError::Unavailable {
                endpoint: "memory".into(),
                reason: "the store is set down".into(),
            });
        }
        Ok(state)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        if Arc::strong_count(&self.sweeper) == 1 {
            self.sweeper.abort();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves consistent data (every mutation is one assignment
    // sequence without await points), so a poisoned lock is still usable.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

static NEXT_BACKEND: AtomicU64 = AtomicU64::new(1);

/// One client of a `MemoryStore`. Claims it makes are bound to one lease per session (when
/// `lease_ttl` is set), kept alive in the background while this client lives; dropping the client
/// without releasing is how a test simulates a crashed session.
#[derive(Debug)]
pub struct MemoryBackend {
    store: MemoryStore,
    id: u64,
    lease_ttl: Option<Duration>,
    leases: Mutex<HashMap<SessionId, (u64, JoinHandle<()>)>>,
}

impl MemoryBackend {
    /// A client of `store`; claims are leased with `lease_ttl` (`None`: held until released).
    pub fn new(store: MemoryStore, lease_ttl: Option<Duration>) -> Self {
        MemoryBackend {
            store,
            id: NEXT_BACKEND.fetch_add(1, Ordering::Relaxed),
            lease_ttl,
            leases: Mutex::new(HashMap::new()),
        }
    }

    /// The live lease of `session` for this client, granting one (and its keep-alive) if needed.
    fn session_lease(&self, state: &mut State, session: &SessionId) -> Option<u64> {
        let ttl = self.lease_ttl?;
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((lease, _)) = leases.get(session) {
            if state.leases.contains_key(lease) {
                return Some(*lease);
            }
        }
        state.next_lease += 1;
        let lease = state.next_lease;
        state.leases.insert(
            lease,
            Lease {
                deadline: Instant::now() + ttl,
                owner: self.id,
            },
        );
        let weak = Arc::downgrade(&self.store.state);
        let keeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                let Some(state) = weak.upgrade() else { return };
                let mut state = lock(&state);
                match state.leases.get_mut(&lease) {
                    Some(l) => l.deadline = Instant::now() + ttl,
                    None => return,
                }
            }
        });
        if let Some((_, old)) = leases.insert(session.clone(), (lease, keeper)) {
            old.abort();
        }
        Some(lease)
    }
}

impl MemoryBackend {
    /// The store's state once it answers, or `Unavailable` while it is set down.
    async fn up(&self) -> BackendResult<MutexGuard<'_, State>> {
        self.store.answer().await;
        self.store.up()
    }
}

impl Drop for MemoryBackend {
    fn drop(&mut self) {
        let leases = self.leases.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, keeper) in leases.values() {
            keeper.abort();
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, task: &TaskId) -> BackendResult<Option<Task>> {
        Ok(self.up().await?.effective(task))
    }

    async fn list(&self) -> BackendResult<Listing> {
        let (listing, delay) = {
            let state = self.up().await?;
            (state.listing(), state.list_delay)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(listing)
    }

    /// Like a watch cache that saw every change: the store's state, even while it is set down.
    fn last_known(&self) -> Option<Listing> {
        Some(self.store.lock().listing())
    }

    async fn put(&self, task: &TaskId, patch: &TaskPatch) -> BackendResult<PutOutcome> {
        patch.validate(task)?;
        let mut state = self.up().await?;
        let Some(current) = state.effective(task) else {
            let new = patch.create(task.clone());
            state.mutate(task, |s| {
                s.tasks.insert(
                    task.clone(),
                    Record {
                        task: new,
                        lease: None,
                        lapsed: None,
                    },
                );
            });
            return Ok(PutOutcome::Created);
        };
        match patch.apply(&current) {
            Patched::Unchanged => Ok(PutOutcome::Unchanged),
            Patched::Held(holder) => Ok(PutOutcome::Held { holder }),
            Patched::Changed(next) => {
                state.mutate(task, |s| {
                    if let Some(rec) = s.tasks.get_mut(task) {
                        rec.task = next;
                        rec.lapsed = None;
                    }
                });
                Ok(PutOutcome::Updated)
            }
        }
    }

    async fn claim(&self, task: &TaskId, session: &SessionId) -> BackendResult<ClaimOutcome> {
        let mut state = self.up().await?;
        let Some(current) = state.effective(task) else {
            return Ok(ClaimOutcome::NotFound);
        };
        match current.claimability(session, |b| state.status_of(b)) {
            Claimability::Held(holder) => return Ok(ClaimOutcome::Lost { holder }),
            Claimability::No(status) => return Ok(ClaimOutcome::NotClaimable { status }),
            Claimability::Yes => {}
        }
        let lease = self.session_lease(&mut state, session);
        let revision = state.revision + 1;
        let mut next = current;
        next.status = TaskStatus::Claimed;
        next.claimed_by = Some(session.clone());
        next.claimed_at = Some(Utc::now());
        next.copied = false;
        state.mutate(task, |s| {
            s.tasks.insert(
                task.clone(),
                Record {
                    task: next,
                    lease,
                    lapsed: None,
                },
            );
            s.claims.insert(
                task.clone(),
                ClaimKey {
                    session: session.clone(),
                    lease,
                    token: revision,
                },
            );
        });
        Ok(ClaimOutcome::Won(Claim {
            task: task.clone(),
            session: session.clone(),
            token: FencingToken(revision),
            leased: lease.is_some(),
        }))
    }

    async fn release(
        &self,
        task: &TaskId,
        session: &SessionId,
        to: ReleaseTo,
        token: Option<FencingToken>,
    ) -> BackendResult<ReleaseOutcome> {
        let mut state = self.up().await?;
        let Some(current) = state.effective(task) else {
            return Ok(ReleaseOutcome::NotFound);
        };
        let holder = (current.status == TaskStatus::Claimed)
            .then(|| current.claimed_by.clone())
            .flatten();
        let claim = state.claims.get(task).cloned();
        // The claim's token: the claim key's, or (for a claim made without one) the record's.
        let held_token = claim.as_ref().map(|c| c.token).unwrap_or(state.revision);
        let holds = holder.as_ref() == Some(session)
            && token.is_none_or(|t| t.0 == held_token)
            // Under a lease of another client (the same session id run twice): not ours to end.
            && claim.as_ref().and_then(|c| c.lease).is_none_or(|l| {
                state.leases.get(&l).is_some_and(|lease| lease.owner == self.id)
            });
        if !holds {
            if crate::model::already_completed_by(&current, session, to) {
                return Ok(ReleaseOutcome::Released {
                    token: token.unwrap_or(FencingToken(0)),
                });
            }
            let lapsed_here = token.filter(|_| to == ReleaseTo::Complete).filter(|t| {
                state.tasks.get(task).and_then(|r| r.lapsed.as_ref())
                    == Some(&(session.clone(), t.0, self.id))
            });
            if let Some(t) = lapsed_here {
                // Its lease ended and nobody wrote the task since: the run finished once.
                let mut done = current;
                done.status = TaskStatus::Complete;
                done.claimed_by = Some(session.clone());
                state.mutate(task, |s| {
                    s.tasks.insert(
                        task.clone(),
                        Record {
                            task: done,
                            lease: None,
                            lapsed: None,
                        },
                    );
                });
                return Ok(ReleaseOutcome::Released { token: t });
            }
            return Ok(ReleaseOutcome::NotHolder { holder });
        }
        let mut next = current;
        next.status = to.status();
        if to == ReleaseTo::Available {
            next.claimed_by = None;
            next.claimed_at = None;
        }
        state.mutate(task, |s| {
            s.claims.remove(task);
            s.tasks.insert(
                task.clone(),
                Record {
                    task: next,
                    lease: None,
                    lapsed: None,
                },
            );
        });
        Ok(ReleaseOutcome::Released {
            token: FencingToken(held_token),
        })
    }

    async fn record(&self, items: &[Mirrored]) -> BackendResult<Vec<RecordOutcome>> {
        let mut state = self.up().await?;
        let mut out = Vec::with_capacity(items.len());
        for want in items {
            let Some(current) = state.effective(&want.task) else {
                out.push(RecordOutcome::NotFound);
                continue;
            };
            // As etcd: a claim under another client's live lease ends by its holder's release
            // or by the lease's end, not by another store's "available".
            let leased_elsewhere = state.claims.get(&want.task).is_some_and(|c| {
                c.lease
                    .is_some_and(|l| state.leases.get(&l).is_some_and(|l| l.owner != self.id))
            });
            let freeing = matches!(want.status, TaskStatus::Available | TaskStatus::Blocked);
            match mirror::decide(&current, want) {
                Decision::Skip(outcome) => out.push(outcome),
                Decision::Write if leased_elsewhere && freeing => out.push(RecordOutcome::Kept {
                    reason: "held under a live lease".into(),
                }),
                Decision::Write => {
                    let next = mirror::applied(&current, want);
                    // A recorded claim is fenced by the token it had where it was made.
                    let token = want.token.map_or(state.revision + 1, |t| t.0);
                    let key = next
                        .claimed_by
                        .clone()
                        .filter(|_| next.status == TaskStatus::Claimed)
                        .map(|session| ClaimKey {
                            session,
                            lease: None,
                            token,
                        });
                    state.mutate(&want.task, |s| {
                        s.claims.remove(&want.task);
                        if let Some(key) = key {
                            s.claims.insert(want.task.clone(), key);
                        }
                        s.tasks.insert(
                            want.task.clone(),
                            Record {
                                task: next,
                                lease: None,
                                lapsed: None,
                            },
                        );
                    });
                    out.push(RecordOutcome::Written);
                }
            }
        }
        Ok(out)
    }

    async fn subscribe(&self) -> BackendResult<Subscription> {
        let mut state = self.up().await?;
        let (tx, rx) = mpsc::unbounded_channel();
        state.subscribers.push(Subscriber { owner: self.id, tx });
        Ok(Subscription::new(state.listing(), rx))
    }

    async fn close(&self) {
        let mine: Vec<u64> = {
            let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            leases.values().map(|(l, _)| *l).collect()
        };
        let mut state = self.store.lock();
        let now = Instant::now();
        for lease in mine {
            if let Some(l) = state.leases.get_mut(&lease) {
                l.deadline = now;
            }
        }
        state.expire(now);
    }

    async fn announce(&self, presence: &Presence) -> BackendResult<()> {
        let mut state = self.up().await?;
        let lease = self.session_lease(&mut state, &presence.session_id);
        state
            .presences
            .insert(presence.session_id.clone(), (presence.clone(), lease));
        Ok(())
    }

    async fn sessions(&self) -> BackendResult<Vec<Presence>> {
        Ok(self
            .up()
            .await?
            .presences
            .values()
            .map(|(p, _)| p.clone())
            .collect())
    }

    async fn health(&self) -> Health {
        self.store.answer().await;
        let reachable = !self.store.lock().down;
        Health {
            reachable,
            detail: if reachable {
                "in-memory store"
            } else {
                "the store is set down"
            }
            .into(),
        }
    }
}
