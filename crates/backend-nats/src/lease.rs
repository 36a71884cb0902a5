//! Leases: a client's `leases.<n>` record, written with a per-message TTL (NATS 2.11+) and
//! renewed by compare-and-swap on its last sequence, so a lease whose TTL ran out (the server
//! removes it and leaves a delete marker every watcher sees) can never be renewed again. Claims
//! name the lease they were made under; a claim whose lease is gone reads available.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use agent_core::{BackendError, BackendResult};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::HeaderMap;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::inner::{lock, Inner};
use crate::keys;

/// A lease this client keeps alive.
#[derive(Debug)]
pub(crate) struct Lease {
    pub id: i64,
    /// When a renewal last succeeded.
    renewed: Arc<Mutex<Instant>>,
    keeper: JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Why a renewal failed.
enum Renewal {
    /// The lease is gone (its TTL ran out, or it was revoked): it can never be renewed.
    Gone,
    Failed(String),
}

/// Field of a lease record marking the lease of a one-shot command (`ifc claim --ttl`): no
/// process keeps it alive after the command, so its claims are their session's to adopt or end
/// from any command, as claims without a lease are.
const ONE_SHOT_FIELD: &str = "oneshot";

fn lease_value(one_shot: bool) -> bytes::Bytes {
    let mut v =
        serde_json::json!({"host": agent_core::process::hostname(), "pid": std::process::id()});
    if one_shot {
        v[ONE_SHOT_FIELD] = serde_json::Value::Bool(true);
    }
    v.to_string().into()
}

async fn renew(
    inner: &Inner,
    id: i64,
    seq: u64,
    ttl: Duration,
    value: bytes::Bytes,
) -> Result<u64, Renewal> {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        seq.to_string().as_str(),
    );
    headers.insert(
        async_nats::header::NATS_MESSAGE_TTL,
        ttl.as_secs().to_string().as_str(),
    );
    let subject = format!("{}{}", inner.prefix, keys::lease(id));
    let ack = match inner.js.publish_with_headers(subject, headers, value).await {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    match ack {
        Ok(ack) => Ok(ack.sequence),
        // Either the lease is gone, or an earlier renewal landed whose answer was lost (this
        // client is the lease's only writer): the record says which.
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
            match inner.kv.entry(keys::lease(id)).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(e.revision),
                Ok(_) => Err(Renewal::Gone),
                Err(e) => Err(Renewal::Failed(e.to_string())),
            }
        }
        Err(e) => Err(Renewal::Failed(e.to_string())),
    }
}

/// Renews lease `id` every third of its TTL until it is gone, or might be: the server lets a
/// lease go a TTL after the last renewal it took (no earlier than when that renewal was sent),
/// so once the next try would come too late, its claims end here first. A renewal that does not
/// answer within a third of the TTL counts as failed.
async fn keep(
    inner: Weak<Inner>,
    (id, seq, value): (i64, u64, bytes::Bytes),
    ttl: Duration,
    renewed: Arc<Mutex<Instant>>,
) {
    let seq = AtomicU64::new(seq);
    let step = ttl / 3;
    loop {
        tokio::time::sleep(step).await;
        let Some(inner) = inner.upgrade() else { return };
        let sent = Instant::now();
        let renewal = renew(&inner, id, seq.load(Ordering::Acquire), ttl, value.clone());
        let outcome = tokio::time::timeout(step, renewal)
            .await
            .unwrap_or_else(|_| Err(Renewal::Failed(format!("no answer within {step:?}"))));
        match outcome {
            Ok(s) => {
                seq.store(s, Ordering::Release);
                *lock(&renewed) = sent;
            }
            Err(Renewal::Gone) => {
                tracing::warn!(lease = id, "lease gone: its claims have ended");
                inner.lease_gone(id).await;
                return;
            }
            Err(Renewal::Failed(e)) => {
                let since = lock(&renewed).elapsed();
                if since + step >= ttl {
                    tracing::warn!(lease = id, error = %e, ?since, "lease not renewed in time: its claims have ended");
                    inner.lease_gone(id).await;
                    return;
                }
                tracing::warn!(lease = id, error = %e, "lease renewal failed; retrying");
            }
        }
    }
}

impl Inner {
    /// Keeps lease `id` (last written at `seq` with `value`, sent at `sent`) alive from now on.
    fn keep(
        self: &Arc<Self>,
        (id, seq, value): (i64, u64, bytes::Bytes),
        ttl: Duration,
        sent: Instant,
    ) -> Lease {
        let renewed = Arc::new(Mutex::new(sent));
        lock(&self.mine).insert(id);
        let keeper = tokio::spawn(keep(
            Arc::downgrade(self),
            (id, seq, value),
            ttl,
            Arc::clone(&renewed),
        ));
        Lease {
            id,
            renewed,
            keeper,
        }
    }

    /// The lease to claim under (`None` when claims are not leased): the current one, or a new
    /// one when there is none or it ended. A lease granted before this client registered a
    /// session is a one-shot command's (see `ONE_SHOT_FIELD`).
    pub async fn claim_lease(self: &Arc<Self>) -> BackendResult<Option<i64>> {
        let one_shot = lock(&self.registered).is_empty();
        self.lease_for(one_shot).await
    }

    /// The lease of a client that is registering a session (never a one-shot command's).
    pub async fn session_lease(self: &Arc<Self>) -> BackendResult<Option<i64>> {
        self.lease_for(false).await
    }

    async fn lease_for(self: &Arc<Self>, one_shot: bool) -> BackendResult<Option<i64>> {
        let Some(ttl) = self.config.lease_ttl else {
            return Ok(None);
        };
        let mut current = self.lease.lock().await;
        if let Some(lease) = current.as_ref() {
            let since = lock(&lease.renewed).elapsed();
            if since < ttl / 2 {
                return Ok(Some(lease.id));
            }
            // Not renewed for half its TTL: a claim under it might outlive it unseen.
            return Err(BackendError::Unavailable {
                endpoint: self.endpoint(),
                reason: format!("lease {} not renewed for {since:?}", lease.id),
            });
        }
        let id = loop {
            let id = (rand::random::<u64>() >> 12) as i64;
            if id != 0 {
                break id;
            }
        };
        let sent = Instant::now();
        let value = lease_value(one_shot);
        let seq = self
            .kv
            .create_with_ttl(keys::lease(id), value.clone(), ttl)
            .await
            .map_err(|e| self.error("grant a lease", e))?;
        *current = Some(self.keep((id, seq, value), ttl, sent));
        Ok(Some(id))
    }

    /// Lease `id` is gone: claims under it end, and the next claim grants a new one.
    pub async fn lease_gone(&self, id: i64) {
        let gone = {
            let mut current = self.lease.lock().await;
            match current.as_ref() {
                Some(l) if l.id == id => current.take(),
                _ => None,
            }
        };
        self.lease_ended(id);
        drop(gone);
    }

    /// Keeps alive, as this client's, the lease of a session's process that is gone, until
    /// `end_inherited` (its claims become this client's: their runs' reports land first).
    pub async fn inherit(self: &Arc<Self>, id: i64) -> BackendResult<()> {
        let Some(ttl) = self.config.lease_ttl else {
            return Ok(());
        };
        let Some(e) = self.live_lease(id).await? else {
            return Ok(());
        };
        // Its last renewal was the gone process's, up to a TTL ago: renewed at once, it is ours.
        let sent = Instant::now();
        let value = lease_value(false);
        match renew(self, id, e.revision, ttl, value.clone()).await {
            Ok(seq) => {
                let lease = self.keep((id, seq, value), ttl, sent);
                lock(&self.inherited).push(lease);
                Ok(())
            }
            Err(Renewal::Gone) => Ok(()),
            Err(Renewal::Failed(reason)) => Err(BackendError::Unavailable {
                endpoint: self.endpoint(),
                reason: format!("take over lease {id}: {reason}"),
            }),
        }
    }

    /// Lease `id`'s record while the lease lives.
    async fn live_lease(&self, id: i64) -> BackendResult<Option<kv::Entry>> {
        let entry = self
            .kv
            .entry(keys::lease(id))
            .await
            .map_err(|e| self.error("read a lease", e))?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put))
    }

    /// Whether lease `id` lives and is a one-shot command's (see `ONE_SHOT_FIELD`).
    pub async fn one_shot_lease(&self, id: i64) -> BackendResult<bool> {
        Ok(self
            .live_lease(id)
            .await?
            .and_then(|e| serde_json::from_slice::<serde_json::Value>(&e.value).ok())
            .is_some_and(|v| v[ONE_SHOT_FIELD] == serde_json::Value::Bool(true)))
    }

    /// Whether lease `id` lives (its record is there).
    pub async fn lease_alive(&self, id: i64) -> BackendResult<bool> {
        Ok(self.live_lease(id).await?.is_some())
    }

    /// Ends `leases` now: their records are purged, so their claims free and their presence goes.
    pub async fn revoke(&self, leases: Vec<Lease>) {
        for lease in leases {
            let id = lease.id;
            drop(lease);
            if let Err(e) = self.kv.purge(keys::lease(id)).await {
                tracing::warn!(lease = id, error = %e, "cannot revoke a lease; it ends with its TTL");
            }
        }
    }
}
