//! What etcd itself costs, measured through this backend's own client: a bare compare-and-swap
//! transaction and a bare put-to-watch-event, the floors `ifc bench` compares claims and
//! notifications with; and the removal of a scratch namespace afterwards.

use std::time::{Duration, Instant};

use agent_core::{BackendError, BackendResult};
use etcd_client::{Compare, CompareOp, DeleteOptions, EventType, Txn, TxnOp, WatchOptions};

use crate::EtcdBackend;

impl EtcdBackend {
    /// `n` bare claims, each one transaction creating a fresh key under `<prefix>floor/txn/`
    /// (`version == 0` → put): how long each took.
    pub async fn raw_txn_floor(&self, n: usize) -> BackendResult<Vec<Duration>> {
        let conn = &self.inner.conn;
        let base = format!("{}floor/txn/", self.inner.config.prefix);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let key = format!("{base}{i}");
            let txn = Txn::new()
                .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::put(
                    key,
                    r#"{"status":"claimed","claimed_by":"floor"}"#,
                    None,
                )]);
            let start = Instant::now();
            conn.txn("floor txn", txn).await?;
            out.push(start.elapsed());
        }
        Ok(out)
    }

    /// `n` bare puts under `<prefix>floor/watch/`, each timed until a watch on that prefix (on
    /// the same client) delivers it.
    pub async fn raw_watch_floor(&self, n: usize) -> BackendResult<Vec<Duration>> {
        let conn = &self.inner.conn;
        let base = format!("{}floor/watch/", self.inner.config.prefix);
        let stream = conn
            .call("floor watch", |mut c| {
                let base = base.clone();
                async move { c.watch(base, Some(WatchOptions::new().with_prefix())).await }
            })
            .await?;
        let (_requests, mut stream) = stream.split();
        let deadline = conn.request_timeout() * 5;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let key = format!("{base}{i}");
            let start = Instant::now();
            conn.call("floor put", |mut c| {
                let key = key.clone();
                async move { c.put(key, "x", None).await }
            })
            .await?;
            loop {
                let next = tokio::time::timeout(deadline, stream.message())
                    .await
                    .map_err(|_| BackendError::Timeout {
                        endpoint: conn.endpoints().to_owned(),
                        operation: "floor watch event".into(),
                        after: deadline,
                    })?
                    .map_err(|e| conn.error(e))?;
                let Some(resp) = next else {
                    return Err(BackendError::Unavailable {
                        endpoint: conn.endpoints().to_owned(),
                        reason: "the watch stream ended".into(),
                    });
                };
                let seen = resp.events().iter().any(|e| {
                    e.event_type() == EventType::Put
                        && e.kv().is_some_and(|kv| kv.key() == key.as_bytes())
                });
                if seen {
                    out.push(start.elapsed());
                    break;
                }
            }
        }
        Ok(out)
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
        self.inner
            .conn
            .call("purge", |mut c| {
                let prefix = prefix.clone();
                async move {
                    c.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        Ok(())
    }
}
