//! The backend conformance suite on etcd. Half the clients run the watch cache (one-transaction
//! claims), half do not (read, then compare-and-swap), so races mix both paths.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_core::testing::Harness;
use agent_core::{Backend, TaskId};
use backend_etcd::testing::EtcdServer;

struct EtcdHarness {
    server: EtcdServer,
    clients: AtomicUsize,
}

#[async_trait::async_trait]
impl Harness for EtcdHarness {
    async fn client(&self) -> Arc<dyn Backend> {
        let n = self.clients.fetch_add(1, Ordering::Relaxed);
        Arc::new(crate::backend(&self.server, n.is_multiple_of(2)).await)
    }
    fn lease_ttl(&self) -> Duration {
        crate::TTL
    }
    async fn end_lease(&self, task: &TaskId) {
        let mut raw = crate::raw_client(&self.server).await;
        let resp = raw
            .get(format!("claims/{task}"), None)
            .await
            .expect("read claim key");
        let lease = resp
            .kvs()
            .first()
            .map(|kv| kv.lease())
            .expect("the task has a claim key");
        assert_ne!(lease, 0, "the claim is leased");
        raw.lease_revoke(lease).await.expect("revoke");
    }
    fn race_tasks(&self) -> usize {
        1000
    }
}

async fn harness() -> EtcdHarness {
    EtcdHarness {
        server: EtcdServer::start(),
        clients: AtomicUsize::new(0),
    }
}

agent_core::conformance_suite!(harness());
