//! backend-nats: the `Backend` on NATS JetStream key-value. A claim is one compare-and-swap of
//! the task's record (the claim lives in the record, so the two cannot disagree), ownership is a
//! lease record kept alive with a per-message TTL (NATS 2.11+), the fencing token is the stream
//! sequence of the claim, and subscribers are fed by an ordered consumer of the bucket.
//!
//! Key layout: see `keys`; record shape: the guide's JSON (`task_record`). Nothing here knows
//! about git or the claim loop.

mod board;
mod config;
mod floor;
mod inner;
mod keys;
mod lease;
mod ops;
mod presence;
mod watch;

#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;

use agent_core::{
    Backend, BackendResult, ClaimOutcome, FencingToken, Health, Listing, Mirrored, Presence,
    PutOutcome, RecordOutcome, ReleaseOutcome, ReleaseTo, SessionId, Subscription, Task, TaskId,
    TaskPatch,
};
use async_trait::async_trait;

pub use config::{NatsConfig, NatsTls};
pub use floor::BareWatch;

use inner::{lock, Inner};

/// A client of a NATS JetStream key-value bucket.
#[derive(Debug, Clone)]
pub struct NatsBackend {
    inner: Arc<Inner>,
}

impl NatsBackend {
    /// Connects to `config.servers` and opens the bucket, creating it if missing.
    pub async fn connect(config: NatsConfig) -> BackendResult<NatsBackend> {
        Ok(NatsBackend {
            inner: Arc::new(Inner::connect(config).await?),
        })
    }

    /// The settings this client was made with.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// The key of a task's record in the bucket (`tasks.<id>`).
    pub fn task_key(id: &TaskId) -> String {
        keys::task(id)
    }

    /// The lease a task's stored record names, if any (for tests and operators).
    pub async fn lease_of(&self, id: &TaskId) -> BackendResult<Option<i64>> {
        Ok(self
            .inner
            .read(id)
            .await?
            .and_then(|s| s.record.ok())
            .and_then(|r| r.lease))
    }

    /// Writes a board row into the bucket (`ifc migrate`): never moving a task backwards unless
    /// `force`; a dry run only says what it would do.
    pub async fn import(
        &self,
        task: &Task,
        force: bool,
        dry_run: bool,
    ) -> BackendResult<task_record::Imported> {
        self.inner.import(task, force, dry_run).await
    }

    /// Deletes a task (`ifc delete`): never a claimed one or one that tasks not complete wait
    /// for, unless `force`.
    pub async fn delete(&self, id: &TaskId, force: bool) -> BackendResult<task_record::Deleted> {
        self.inner.delete(id, force).await
    }

    /// Ends lease `id` now, as its TTL running out would (for tests and operators).
    pub async fn revoke_lease(&self, id: i64) -> BackendResult<()> {
        self.inner
            .kv
            .purge(keys::lease(id))
            .await
            .map_err(|e| self.inner.error("revoke a lease", e))
    }
}

#[async_trait]
impl Backend for NatsBackend {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn get(&self, task: &TaskId) -> BackendResult<Option<Task>> {
        self.inner.get(task).await
    }

    async fn list(&self) -> BackendResult<Listing> {
        Ok(watch::open(&self.inner).await?.0.listing())
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
        self.inner.record(items).await
    }

    async fn subscribe(&self) -> BackendResult<Subscription> {
        watch::subscribe(Arc::clone(&self.inner)).await
    }

    async fn announce(&self, presence: &Presence) -> BackendResult<()> {
        self.inner.announce(presence).await
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
        Ok(watch::open(&self.inner).await?.0.presences())
    }

    async fn health(&self) -> Health {
        let endpoint = self.inner.endpoint();
        match tokio::time::timeout(
            self.inner.config.request_timeout,
            self.inner.js.query_account(),
        )
        .await
        {
            Ok(Ok(_)) => Health {
                reachable: true,
                detail: format!("{endpoint}: JetStream answers"),
            },
            Ok(Err(e)) => Health {
                reachable: false,
                detail: format!("{endpoint}: {e}"),
            },
            Err(_) => Health {
                reachable: false,
                detail: format!(
                    "{endpoint}: no answer within {:?}",
                    self.inner.config.request_timeout
                ),
            },
        }
    }

    fn last_known(&self) -> Option<Listing> {
        let board = lock(&self.inner.watched).as_ref()?.upgrade()?;
        let listing = lock(&board).listing();
        Some(listing)
    }

    fn reconnects(&self) -> u64 {
        self.inner
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn resyncs(&self) -> u64 {
        self.inner
            .resyncs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}
