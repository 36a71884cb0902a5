//! backend-etcd: the `Backend` on etcd. A claim is one compare-and-swap transaction (when the
//! watch cache is current), ownership is a lease-bound claim key, releases are fenced on that key,
//! and subscribers are fed by one list-then-watch informer per backend, which mirrors what its
//! first subscription covers.
//!
//! Key layout and record shape: see `keys` and `record`. Nothing here knows about git or the
//! claim loop.

mod cache;
mod config;
mod conn;
mod fanout;
mod floor;
mod import;
mod informer;
mod inner;
mod keys;
mod lease;
mod members;
mod ops;
mod presence;
mod record;
mod scoped;
mod view;

#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;

use agent_core::{
    Backend, BackendError, BackendResult, ClaimOutcome, FencingToken, Health, Interest, Listing,
    Mirrored, Presence, PutOutcome, RecordOutcome, ReleaseOutcome, ReleaseTo, SessionId,
    Subscription, Task, TaskId, TaskPatch, TaskStatus,
};
use async_trait::async_trait;
use tokio::sync::{mpsc, OnceCell};

pub use config::{EtcdConfig, TlsFiles};
pub use floor::BareWatch;
pub use import::{Archived, Restored};
pub use task_record::{Deleted, Imported};

use inner::Inner;

/// A subscription of `interest` from the watch cache: its snapshot and its place among the
/// subscribers, taken under the cache's lock at one revision. Fallen behind, it joins again.
fn join(inner: &Arc<Inner>, interest: &Interest) -> Subscription {
    let cache = inner.cache();
    let snapshot = interest.filter(cache.listing(&inner.keys));
    let (events, queue) = inner
        .fanout
        .join(cache.revision, interest, || cache.blockers());
    drop(cache);
    let again: agent_core::backend::Resubscribe = {
        let (inner, interest) = (Arc::downgrade(inner), interest.clone());
        Arc::new(move || {
            let (inner, interest) = (inner.clone(), interest.clone());
            Box::pin(async move {
                let inner = inner.upgrade().ok_or_else(|| BackendError::Unavailable {
                    endpoint: "etcd".into(),
                    reason: "the client was closed".into(),
                })?;
                Ok(join(&inner, &interest))
            })
        })
    };
    Subscription::bounded(snapshot, events, queue, again)
}

/// A client of one etcd cluster (one namespace). Share it as `Arc<EtcdBackend>`; dropping it stops
/// its background tasks without revoking its leases (to etcd, a crash: leased claims expire).
#[derive(Debug)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
    informer: OnceCell<()>,
}

impl EtcdBackend {
    /// Connects and checks that etcd answers within `config.dial_timeout`.
    pub async fn connect(config: EtcdConfig) -> BackendResult<Self> {
        let conn = conn::Conn::connect(&config).await?;
        let (repairs_tx, mut repairs) = mpsc::unbounded_channel();
        let (republish_tx, mut republish) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner::new(conn, config, repairs_tx, republish_tx));
        let republisher = {
            let inner = Arc::clone(&inner);
            tokio::spawn(async move {
                while let Some(session) = republish.recv().await {
                    inner.publish_presence_again(&session).await;
                }
            })
        };
        inner.adopt(republisher.abort_handle());
        let repairer = {
            let inner = Arc::clone(&inner);
            tokio::spawn(async move {
                while let Some(r) = repairs.recv().await {
                    match inner.repair(&r.task, r.record_rev).await {
                        Ok(true) => {
                            tracing::info!(task = %r.task, "reset a claim whose lease expired to available")
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(task = %r.task, error = %e, "expired-claim reset failed; another client will do it")
                        }
                    }
                }
            })
        };
        inner.adopt(repairer.abort_handle());
        Ok(EtcdBackend {
            inner,
            informer: OnceCell::new(),
        })
    }

    /// Starts the watch cache of every task (once) and waits until it has listed them. Claims and
    /// releases use the cache for their compare values from then on.
    pub async fn start_watch(&self) -> BackendResult<()> {
        self.watch_for(&Interest::all()).await
    }

    /// Starts the watch cache (once) for what `interest` covers, or widens it to every task if
    /// it follows another interest, and waits until it has listed. The first subscription's
    /// interest is the cache's: an agent mirrors its list, not the board.
    async fn watch_for(&self, interest: &Interest) -> BackendResult<()> {
        self.informer
            .get_or_init(|| async {
                self.inner.cache().set_scope(interest.clone());
                let inner = Arc::clone(&self.inner);
                let handle = tokio::spawn(inner.inform());
                self.inner.adopt(handle.abort_handle());
            })
            .await;
        if !self.inner.cache().scope_holds(interest) {
            tracing::debug!(?interest, "the watch cache now mirrors every task");
            self.inner.widen_scope();
        }
        let deadline = self.inner.config.dial_timeout + self.inner.config.request_timeout;
        let wait = async {
            loop {
                let synced = self.inner.synced.notified();
                if self.inner.cache().synced {
                    return;
                }
                synced.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.map_err(|_| {
            // Why the list failed says more than that the wait ended (tester helper-9: a
            // refused list read only "timed out after 3s" in `/health`).
            let operation = match self.inner.list_failure().as_deref() {
                Some(why) => format!("initial list of tasks (its last try: {why})"),
                None => "initial list of tasks".into(),
            };
            BackendError::Timeout {
                endpoint: self.inner.conn.endpoints().to_owned(),
                operation,
                after: deadline,
            }
        })
    }

    /// Writes `task` as a board states it (migration): created, updated, unchanged, or kept when
    /// etcd is ahead (complete stays complete, a live claim stays) unless `force`. A `claimed`
    /// task becomes a claim without a lease, held by its `claimed_by` until released (its owner
    /// adopts it by claiming it). `dry_run` decides without writing.
    pub async fn import(&self, task: &Task, force: bool, dry_run: bool) -> BackendResult<Imported> {
        self.inner.import(task, force, dry_run).await
    }

    /// Deletes `task` (an operator's `ifc delete`): refused while it is claimed or tasks not
    /// complete wait for it, unless `force`.
    pub async fn delete(&self, task: &TaskId, force: bool) -> BackendResult<Deleted> {
        self.inner.delete(task, force).await
    }

    /// Moves a complete task out of `tasks/` into `archive/` (see `ifc archive`).
    pub async fn archive(&self, task: &TaskId) -> BackendResult<Archived> {
        self.inner.archive(task).await
    }

    /// Whether a task may name `blockers` here (see `ifc put`): at most 100, the most a claim's
    /// one transaction can compare.
    pub fn claimable_with(&self, task: &TaskId, blockers: &[TaskId]) -> BackendResult<()> {
        self.inner.claimable_with(task, blockers)
    }

    /// Puts an archived task back.
    pub async fn restore(&self, task: &TaskId) -> BackendResult<Restored> {
        self.inner.restore(task).await
    }

    /// The status this backend's watch cache shows for `task` (`None`: unknown, or the cache is
    /// not running). No call to etcd.
    pub fn cached_status(&self, task: &TaskId) -> Option<TaskStatus> {
        self.inner.cache().status(task)
    }

    /// How many task records the watch cache mirrors (0 before it starts): the tasks its
    /// first subscription covers, or every task.
    pub fn cached_tasks(&self) -> usize {
        self.inner.cache().mirrored()
    }

    /// The endpoints this backend talks to, comma-separated.
    pub fn endpoints(&self) -> &str {
        self.inner.conn.endpoints()
    }
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        self.inner.abort_all();
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, task: &TaskId) -> BackendResult<Option<Task>> {
        self.inner.get(task).await
    }

    async fn list(&self) -> BackendResult<Listing> {
        self.inner.list_of(&Interest::all()).await
    }

    async fn list_of(&self, interest: &Interest) -> BackendResult<Listing> {
        self.inner.list_of(interest).await
    }

    async fn put(&self, task: &TaskId, patch: &TaskPatch) -> BackendResult<PutOutcome> {
        self.inner.put(task, patch).await
    }

    async fn claim(&self, task: &TaskId, session: &SessionId) -> BackendResult<ClaimOutcome> {
        self.inner.claim(task, session).await
    }

    async fn release(
        &self,
        task: &TaskId,
        session: &SessionId,
        to: ReleaseTo,
        token: Option<FencingToken>,
    ) -> BackendResult<ReleaseOutcome> {
        self.inner.release(task, session, to, token).await
    }

    async fn record(&self, items: &[Mirrored]) -> BackendResult<Vec<RecordOutcome>> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(self.inner.record(item).await?);
        }
        Ok(out)
    }

    async fn subscribe(&self) -> BackendResult<Subscription> {
        self.subscribe_to(&Interest::all()).await
    }

    async fn subscribe_to(&self, interest: &Interest) -> BackendResult<Subscription> {
        self.watch_for(interest).await?;
        Ok(join(&self.inner, interest))
    }

    fn resyncs(&self) -> u64 {
        self.inner.fanout.resyncs()
    }

    async fn announce(&self, presence: &Presence) -> BackendResult<()> {
        self.inner.announce(presence).await
    }

    fn last_known(&self) -> Option<agent_core::Listing> {
        let cache = self.inner.cache();
        cache.synced.then(|| cache.listing(&self.inner.keys))
    }

    async fn register(
        &self,
        presence: &Presence,
        take_over: bool,
    ) -> BackendResult<Option<Presence>> {
        self.inner.register(presence, take_over).await
    }

    async fn end_inherited(&self) -> BackendResult<()> {
        self.inner.end_inherited().await
    }

    async fn sessions(&self) -> BackendResult<Vec<Presence>> {
        self.inner.sessions().await
    }

    async fn close(&self) {
        self.inner.revoke_all().await;
        if let Err(e) = self.inner.end_inherited().await {
            tracing::debug!(error = %e, "inherited leases not revoked; they expire");
        }
    }

    fn reconnects(&self) -> u64 {
        self.inner
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn health(&self) -> Health {
        let conn = &self.inner.conn;
        let tasks = self.inner.keys.tasks_prefix();
        match conn.probe(tasks, "health", conn.request_timeout()).await {
            Ok(_) => {
                let watch = match self.informer.initialized() {
                    false => "",
                    true if self.inner.is_watching() => ", watch stream open",
                    true => ", watch stream reconnecting",
                };
                Health {
                    reachable: true,
                    detail: format!("{}: ok{watch}", self.endpoints()),
                }
            }
            Err(e) => Health {
                reachable: false,
                detail: e.to_string(),
            },
        }
    }
}
