//! What NATS itself costs, through this backend's own connection: a bare key-value
//! compare-and-swap and a bare key-value watch, the floors `ifc bench --store nats` compares
//! claims and notifications with.

use agent_core::BackendResult;
use async_nats::jetstream::kv;
use futures_util::StreamExt;

use crate::NatsBackend;

/// A value the size of a claimed task's record (the guide's fields, a title, a time).
const RECORD_SIZED: &str = r#"{"task_id":"floor","status":"claimed","claimed_by":"floor-session","claimed_at":"2026-01-01T00:00:00.000000Z","blocked_by":[],"title":"a task of ordinary length","ifc_lease":1234567890123456}"#;

fn key(name: &str) -> String {
    format!("floor.{name}")
}

/// A bare watch of the `floor.` keys, on one client's connection.
pub struct BareWatch {
    watch: kv::Watch,
}

impl std::fmt::Debug for BareWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BareWatch").finish_non_exhaustive()
    }
}

impl BareWatch {
    /// Waits until the watch delivers a change of floor key `name`.
    pub async fn heard(&mut self, name: &str) -> BackendResult<()> {
        let want = key(name);
        while let Some(entry) = self.watch.next().await {
            match entry {
                Ok(e) if e.key == want => return Ok(()),
                Ok(_) => continue,
                Err(e) => {
                    return Err(agent_core::BackendError::Unavailable {
                        endpoint: "nats".into(),
                        reason: format!("bare watch: {e}"),
                    })
                }
            }
        }
        Err(agent_core::BackendError::Unavailable {
            endpoint: "nats".into(),
            reason: "bare watch ended".into(),
        })
    }
}

impl NatsBackend {
    /// Writes floor key `name` (record-sized), as a task is written before it is claimed; its
    /// revision, which `bare_update` compares.
    pub async fn bare_prepare(&self, name: &str) -> BackendResult<u64> {
        self.inner
            .kv
            .put(key(name), RECORD_SIZED.into())
            .await
            .map_err(|e| self.inner.error("bare put", e))
    }

    /// One bare compare-and-swap: rewrites floor key `name` if it is still at `rev`. Whether it
    /// did.
    pub async fn bare_update(&self, name: &str, rev: u64) -> BackendResult<bool> {
        match self
            .inner
            .kv
            .update(key(name), RECORD_SIZED.into(), rev)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(self.inner.error("bare update", e)),
        }
    }

    /// A bare watch of the floor keys, from now on.
    pub async fn bare_watch(&self) -> BackendResult<BareWatch> {
        let watch = self
            .inner
            .kv
            .watch("floor.>")
            .await
            .map_err(|e| self.inner.error("bare watch", e))?;
        Ok(BareWatch { watch })
    }

    /// Deletes this client's bucket with everything in it (the bench's scratch bucket).
    pub async fn delete_bucket(&self) -> BackendResult<()> {
        self.inner
            .js
            .delete_key_value(&self.inner.config.bucket)
            .await
            .map(|_| ())
            .map_err(|e| self.inner.error("delete the bucket", e))
    }
}
