//! The `Backend` contract every store implements (etcd, git, in-memory) and the event stream it
//! feeds. The contract is what the claim loop and the router rely on; the conformance suite in
//! `testing` checks it against every implementation.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::BackendResult;
use crate::ids::{SessionId, TaskId};
use crate::interest::Interest;
use crate::mirror::{Mirrored, RecordOutcome};
use crate::model::{
    ClaimOutcome, FencingToken, Listing, Presence, PutOutcome, ReleaseOutcome, ReleaseTo, Task,
    TaskEvent, TaskPatch,
};

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendEvent {
    /// A task's effective state changed.
    Task(TaskEvent),
    /// A claim this backend made for `session` has ended without a release: its lease expired or
    /// could not be kept alive, or another session took the task. The holder must stop the task
    /// and must not report it done.
    ClaimLost {
        /// The task.
        task: TaskId,
        /// The session that held it.
        session: SessionId,
        /// The fencing token of the lost claim.
        token: FencingToken,
    },
    /// A new instructions file for this backend's session appeared (git backend:
    /// `INSTRUCTIONS-SESSION-<n>-*.md`).
    Instructions {
        /// The session it is for.
        session: SessionId,
        /// Its path in the coordination repo.
        path: String,
    },
    /// Another process registered `session` over this one (`--take-over`): this process claims
    /// nothing more for it and stops, finishing or giving back what it runs.
    SessionTaken {
        /// The session.
        session: SessionId,
        /// The process that runs it now.
        by: Box<Presence>,
    },
    /// The store serving this subscription changed (the router switched between etcd and git):
    /// every task as the new store says, to replace what the subscriber knew.
    Resync(Listing),
}

/// How many events wait in a subscriber's queue, shared by the store that fills it and the
/// [`Subscription`] that drains it. A store that would queue more than its bound sets
/// `overflowed` and stops filling the queue; the subscription then starts again from a fresh
/// snapshot (`BackendEvent::Resync`), so a subscriber that falls behind costs bounded memory.
#[derive(Debug, Default)]
pub struct Queue {
    queued: AtomicUsize,
    overflowed: AtomicBool,
}

impl Queue {
    /// One more event queued; `false` when that makes more than `bound` waiting: the queue is
    /// then overflowed, and the store is to queue nothing more.
    pub fn push(&self, bound: usize) -> bool {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= bound {
            self.overflowed.store(true, Ordering::Release);
            return false;
        }
        true
    }

    fn pop(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }
}

/// Starts a subscription again, from a fresh snapshot (after its queue overflowed).
pub type Resubscribe = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = BackendResult<Subscription>> + Send>> + Send + Sync,
>;

/// A live stream of events that starts right after a consistent snapshot.
pub struct Subscription {
    /// Every task at `revision` (of the subscription's interest).
    pub snapshot: Listing,
    events: mpsc::UnboundedReceiver<BackendEvent>,
    /// A bounded queue: its depth, and how to start again when it overflows.
    bounded: Option<(Arc<Queue>, Resubscribe)>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("snapshot", &self.snapshot)
            .field("bounded", &self.bounded.as_ref().map(|(q, _)| q))
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// A subscription over `events`, which must carry exactly the changes after `snapshot.revision`.
    pub fn new(snapshot: Listing, events: mpsc::UnboundedReceiver<BackendEvent>) -> Self {
        Subscription {
            snapshot,
            events,
            bounded: None,
        }
    }

    /// A subscription whose store queues at most a bound of events (see [`Queue`]); once it
    /// has overflowed, the next event is a `Resync` with a fresh snapshot from `again`, and the
    /// changes after that follow.
    pub fn bounded(
        snapshot: Listing,
        events: mpsc::UnboundedReceiver<BackendEvent>,
        queue: Arc<Queue>,
        again: Resubscribe,
    ) -> Self {
        Subscription {
            snapshot,
            events,
            bounded: Some((queue, again)),
        }
    }

    fn overflowed(&self) -> bool {
        self.bounded.as_ref().is_some_and(|(q, _)| q.overflowed())
    }

    /// The next event; `None` once the backend has shut down.
    pub async fn next(&mut self) -> Option<BackendEvent> {
        if self.overflowed() {
            return self.start_again().await;
        }
        match self.events.recv().await {
            Some(e) => {
                if let Some((q, _)) = &self.bounded {
                    q.pop();
                }
                Some(e)
            }
            None if self.overflowed() => self.start_again().await,
            None => None,
        }
    }

    /// An event that is already waiting, if any (none after an overflow: `next` starts again).
    pub fn try_next(&mut self) -> Option<BackendEvent> {
        if self.overflowed() {
            return None;
        }
        let e = self.events.try_recv().ok()?;
        if let Some((q, _)) = &self.bounded {
            q.pop();
        }
        Some(e)
    }

    /// After an overflow: a fresh subscription replaces this one's queue, and its snapshot is
    /// handed out as a `Resync`.
    async fn start_again(&mut self) -> Option<BackendEvent> {
        let again = Arc::clone(&self.bounded.as_ref()?.1);
        match again().await {
            Ok(fresh) => {
                self.events = fresh.events;
                self.bounded = fresh.bounded;
                Some(BackendEvent::Resync(fresh.snapshot))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a subscription again after it fell behind");
                None
            }
        }
    }
}

/// Health of the backend's connection, for `/health` and the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Whether the store answered.
    pub reachable: bool,
    /// What was tried and what went wrong, when it did not.
    pub detail: String,
}

/// A task store that sessions coordinate through.
///
/// Every method takes `&self` and may be called concurrently from many tasks; implementations are
/// shared as `Arc<dyn Backend>`. Ids are validated before they get here.
///
/// # Correctness
///
/// Across every client of the same store (other processes and machines included):
/// - at most one session holds a task at a time, and every win gets a fencing token greater than
///   every earlier claim's token of that task;
/// - a release by anyone but the current holder changes nothing;
/// - every change is visible to every subscriber, once, in revision order (changes made together
///   share a revision);
/// - a claim made under a lease ends when the lease ends; the task then reads `available` and the
///   record itself is kept.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// A short name for logs and metrics (`etcd`, `git`, `memory`).
    fn name(&self) -> &'static str;

    /// One task's effective state, or `None` if there is no such task.
    ///
    /// # Correctness
    /// Linearizable: reflects every operation that returned before the call. A claim whose lease has
    /// expired reads `available` with no holder.
    async fn get(&self, task: &TaskId) -> BackendResult<Option<Task>>;

    /// Every task at one revision. Records that cannot be read are listed in `corrupt`, not fatal.
    ///
    /// # Correctness
    /// A consistent snapshot: all tasks as of `revision`.
    async fn list(&self) -> BackendResult<Listing>;

    /// The tasks `interest` covers (`Interest::filter` of a list), at one revision. A store may
    /// read only those: an agent's start reads its list, not the board.
    ///
    /// # Correctness
    /// The same as `interest.filter(self.list())`: every task it covers as of `revision`.
    async fn list_of(&self, interest: &Interest) -> BackendResult<Listing> {
        Ok(interest.filter(self.list().await?))
    }

    /// Creates a task or updates its title, status or blockers, keeping every other stored field.
    ///
    /// # Correctness
    /// Atomic read-modify-write: nothing written concurrently is lost. A status change of a task a
    /// session holds is refused (`Held`) and changes nothing.
    async fn put(&self, task: &TaskId, patch: &TaskPatch) -> BackendResult<PutOutcome>;

    /// Tries to take `task` for `session`.
    ///
    /// # Correctness
    /// Atomic compare-and-swap: of any number of concurrent claimers, across processes, at most
    /// one gets `Won`; the others get `Lost` with the winner. When it returns `Won`, the claim is
    /// durable and visible to every later `get`, `list` and subscriber. A holder claiming its own
    /// task again gets `Won` with a new token that supersedes the old one.
    async fn claim(&self, task: &TaskId, session: &SessionId) -> BackendResult<ClaimOutcome>;

    /// Ends `session`'s claim on `task`, leaving it `complete` or `available`.
    ///
    /// # Correctness
    /// Fenced: succeeds only while `session` still holds the claim (and, when `token` is given, only
    /// for the claim with that token). Otherwise returns `NotHolder` and changes nothing. When it
    /// returns `Released`, the new status is durable and the claim is gone. Completing is
    /// idempotent: a retry of a completion that already landed (its answer was lost) is answered
    /// `Released` and changes nothing.
    async fn release(
        &self,
        task: &TaskId,
        session: &SessionId,
        to: ReleaseTo,
        token: Option<FencingToken>,
    ) -> BackendResult<ReleaseOutcome>;

    /// Records transitions that happened in another store (mirroring, bridging, catching up after
    /// a fallback), each by compare-and-swap under the rule of [`crate::mirror::decide`]: never
    /// backwards, never over another session's claim. Returns one outcome per item, in order.
    ///
    /// # Correctness
    /// Each item is checked against the current state and written atomically with that check
    /// (git: all items in one commit). A recorded claim is not bound to a lease: it is held until a
    /// later record or its holder releases it.
    async fn record(&self, items: &[Mirrored]) -> BackendResult<Vec<RecordOutcome>>;

    /// A snapshot of every task and the stream of changes after it.
    ///
    /// # Correctness
    /// No change after the snapshot is missed or delivered twice, across reconnects; events come
    /// in revision order.
    async fn subscribe(&self) -> BackendResult<Subscription>;

    /// A snapshot of the tasks `interest` covers and the stream of their changes after it: the
    /// tasks its patterns match and, at any depth, the tasks those are blocked by (a blocker
    /// named later is covered from then on). A store may deliver more than that (git and the
    /// in-memory store deliver everything), never less.
    ///
    /// # Correctness
    /// As [`Backend::subscribe`], for every task covered: nothing missed or twice, in order. A
    /// subscriber that falls too far behind is handed a `Resync` with a fresh snapshot of its
    /// interest, and the changes after it.
    async fn subscribe_to(&self, interest: &Interest) -> BackendResult<Subscription> {
        let _ = interest;
        self.subscribe().await
    }

    /// Publishes a running session's presence (state, current task, host, pid).
    ///
    /// # Correctness
    /// The presence lives as long as the session: it goes when the session's lease ends (or its
    /// heartbeat goes stale), without anyone deleting it.
    async fn announce(&self, presence: &Presence) -> BackendResult<()>;

    /// Makes this process the one that runs `presence.session_id` and publishes its presence. A
    /// session id is live in one process at a time: if another process that may be alive runs
    /// it, nothing is written and its presence is returned, unless `take_over`, which takes the
    /// id (that process is told to stop; its claims stay its own until it does). A presence whose
    /// process is known to be gone (same host, no such pid) is taken over without asking: its
    /// claims become this process's until `end_inherited`.
    ///
    /// # Correctness
    /// Compare-and-swap: of two processes registering one session id at once, one gets `None`.
    async fn register(
        &self,
        presence: &Presence,
        take_over: bool,
    ) -> BackendResult<Option<Presence>> {
        let _ = take_over;
        self.announce(presence).await.map(|()| None)
    }

    /// Ends the claims `register` took on from this session's process that is gone. `register`
    /// leaves them held, this process's, so that the runs that process finished (noted, not yet
    /// reported: killed between a task's exit and its release) are reported under their tokens
    /// first; freed at once, another session could claim such a task in between and run it
    /// again. The agent reports its notes, then calls this. Left uncalled, an etcd claim ends
    /// with the gone process's lease.
    async fn end_inherited(&self) -> BackendResult<()> {
        Ok(())
    }

    /// The sessions whose presence is live, sorted by session id.
    async fn sessions(&self) -> BackendResult<Vec<Presence>>;

    /// Whether the store answers now (one round trip, bounded by the request deadline).
    async fn health(&self) -> Health;

    /// The last state this client saw, without asking the store (a watch cache), for when it
    /// does not answer; `None` when the client keeps none.
    fn last_known(&self) -> Option<Listing> {
        None
    }

    /// How many times this client's event stream broke and was resumed (for metrics).
    fn reconnects(&self) -> u64 {
        0
    }

    /// How many times a subscriber fell too far behind and started again from a fresh snapshot
    /// (for metrics).
    fn resyncs(&self) -> u64 {
        0
    }

    /// Ends this client's sessions on a clean shutdown: their leases are revoked at once (so their
    /// presence goes and any claim still held is free now, not after the TTL). Best effort.
    async fn close(&self) {}
}
