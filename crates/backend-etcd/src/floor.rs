//! What etcd itself costs, measured through this backend's own connection: a bare
//! compare-and-swap transaction and a bare watch, the floors `ifc bench` compares claims and
//! notifications with; and the removal of a scratch namespace afterwards.

use std::time::Duration;

use agent_core::{BackendError, BackendResult, SessionId};
use etcd_client::{
    Compare, CompareOp, DeleteOptions, EventType, PutOptions, Txn, TxnOp, WatchOptions,
    WatchRequestSender, WatchResponseStream,
};

use crate::EtcdBackend;

/// The value every bare claim writes: the size of a small task record.
const BARE_VALUE: &str = r#"{"task_id":"floor","status":"claimed","claimed_by":"floor-session"}"#;

/// A value the size of a claimed task's record (the guide's fields, a title, a time).
const RECORD_SIZED: &str = r#"{"task_id":"floor","status":"claimed","claimed_by":"floor-session","claimed_at":"2026-01-01T00:00:00.000000Z","blocked_by":[],"title":"a task of ordinary length","ifc_lease":1234567890123456789}"#;
const BARE_CLAIM: &str = r#"{"session":"floor-session"}"#;

impl EtcdBackend {
    /// One bare claim: a transaction creating `<prefix>floor/<name>` if it does not exist
    /// (`version == 0` → put), on this backend's connection. Whether it created the key.
    pub async fn bare_txn(&self, name: &str) -> BackendResult<bool> {
        let key = self.bare_key(name);
        let txn = Txn::new()
            .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key, BARE_VALUE, None)]);
        Ok(self.inner.conn.txn("bare txn", txn).await?.succeeded())
    }

    /// Writes the record key a later `bare_claim_txn(name, ..)` claims, like a task created
    /// before it is claimed; its mod revision, which that transaction compares.
    pub async fn bare_claim_prepare(&self, name: &str) -> BackendResult<i64> {
        let record = self.bare_key(&format!("{name}/record"));
        let put = |mut c: etcd_client::Client| {
            let record = record.clone();
            async move { c.put(record, RECORD_SIZED, None).await }
        };
        let resp = self.inner.conn.call("bare claim prepare", put).await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// A transaction of an ifc claim's shape without ifc around it: compares the existing
    /// record's mod revision (`record_rev`, from `bare_claim_prepare`) and the absent claim key's,
    /// then rewrites the record and puts the claim bound to `session`'s lease. The difference
    /// between this and `bare_txn` is what etcd charges for ifc's key layout; the rest is the
    /// runtime's.
    pub async fn bare_claim_txn(
        &self,
        name: &str,
        record_rev: i64,
        session: &SessionId,
    ) -> BackendResult<bool> {
        let lease = self.inner.lease_for(session).await?;
        let (record, claim) = (
            self.bare_key(&format!("{name}/record")),
            self.bare_key(&format!("{name}/claim")),
        );
        let txn = Txn::new()
            .when(vec![
                Compare::mod_revision(record.clone(), CompareOp::Equal, record_rev),
                Compare::mod_revision(claim.clone(), CompareOp::Equal, 0),
            ])
            .and_then(vec![
                TxnOp::put(record, RECORD_SIZED, None),
                TxnOp::put(
                    claim,
                    BARE_CLAIM,
                    lease.map(|l| PutOptions::new().with_lease(l)),
                ),
            ]);
        Ok(self
            .inner
            .conn
            .txn("bare claim txn", txn)
            .await?
            .succeeded())
    }

    /// A bare watch on `<prefix>floor/`, on this backend's connection: it hears every
    /// `bare_txn`.
    pub async fn bare_watch(&self) -> BackendResult<BareWatch> {
        let base = self.bare_key("");
        let (_requests, stream) = self
            .inner
            .conn
            .call("bare watch", |mut c| {
                let base = base.clone();
                async move { c.watch(base, Some(WatchOptions::new().with_prefix())).await }
            })
            .await?
            .split();
        Ok(BareWatch {
            _requests,
            stream,
            base,
            endpoints: self.endpoints().to_owned(),
            deadline: self.inner.conn.request_timeout() * 5,
        })
    }

    /// Deletes every key under this backend's prefix. Only for a scratch namespace of its own
    /// (`ifc bench`); refused for the empty prefix.
    pub async fn purge_prefix(&self) -> BackendResult<()> {
        let prefix = self.inner.config.prefix.clone();
        if prefix.is_empty() {
            return Err(BackendError::InvalidInput(
                "refusing to delete every key: purge needs a scratch prefix".into(),
            ));
        }
        // Tens of thousands of keys take etcd longer than one ordinary request.
        let deadline = self
            .inner
            .conn
            .request_timeout()
            .max(Duration::from_secs(60));
        self.inner
            .conn
            .within("purge", deadline, |mut c| {
                let prefix = prefix.clone();
                async move {
                    c.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        Ok(())
    }

    fn bare_key(&self, name: &str) -> String {
        format!("{}floor/{name}", self.inner.config.prefix)
    }
}

/// A raw etcd watch on the bare floor's keys.
pub struct BareWatch {
    /// Keeps the watch open.
    _requests: WatchRequestSender,
    stream: WatchResponseStream,
    base: String,
    endpoints: String,
    deadline: Duration,
}

impl std::fmt::Debug for BareWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BareWatch")
            .field("base", &self.base)
            .finish()
    }
}

impl BareWatch {
    /// Waits until the watch delivers the creation of `bare_txn(name)`'s key.
    pub async fn heard(&mut self, name: &str) -> BackendResult<()> {
        let key = format!("{}{name}", self.base);
        loop {
            let next = tokio::time::timeout(self.deadline, self.stream.message())
                .await
                .map_err(|_| BackendError::Timeout {
                    endpoint: self.endpoints.clone(),
                    operation: "bare watch event".into(),
                    after: self.deadline,
                })?
                .map_err(|e| BackendError::Unavailable {
                    endpoint: self.endpoints.clone(),
                    reason: format!("bare watch: {e}"),
                })?;
            let Some(resp) = next else {
                return Err(BackendError::Unavailable {
                    endpoint: self.endpoints.clone(),
                    reason: "the bare watch stream ended".into(),
                });
            };
            let seen = resp.events().iter().any(|e| {
                e.event_type() == EventType::Put
                    && e.kv().is_some_and(|kv| kv.key() == key.as_bytes())
            });
            if seen {
                return Ok(());
            }
        }
    }
}
