//! Session presence: `<prefix>sessions/<session_id>`, JSON bound to the session's lease, so a
//! session that dies disappears from `ifc status` by itself.

use std::sync::Arc;

use agent_core::{BackendResult, Presence};
use etcd_client::{GetOptions, PutOptions};

use crate::inner::Inner;

impl Inner {
    pub(crate) async fn announce(self: &Arc<Self>, presence: &Presence) -> BackendResult<()> {
        let lease = self.lease_for(&presence.session_id).await?;
        let key = self.keys.session(&presence.session_id);
        let value = serde_json::to_vec(presence).unwrap_or_default();
        let put = |mut c: etcd_client::Client| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, lease.map(|l| PutOptions::new().with_lease(l)))
                    .await
            }
        };
        self.conn.call("announce", put).await.map(drop)
    }

    pub(crate) async fn sessions(&self) -> BackendResult<Vec<Presence>> {
        let prefix = self.keys.sessions_prefix().to_owned();
        let get = |mut c: etcd_client::Client| {
            let prefix = prefix.clone();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        };
        let resp = self.conn.call("sessions", get).await?;
        let mut out: Vec<Presence> = resp
            .kvs()
            .iter()
            .filter_map(|kv| match serde_json::from_slice::<Presence>(kv.value()) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::debug!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable presence; skipped");
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        Ok(out)
    }
}
