//! The Backend conformance suite against a real nats-server with JetStream.

use std::sync::Arc;
use std::time::Duration;

use agent_core::testing::Harness;
use agent_core::{Backend, TaskId};
use backend_nats::testing::NatsServer;
use backend_nats::NatsBackend;

const TTL: Duration = Duration::from_secs(2);

struct NatsHarness {
    server: NatsServer,
}

#[async_trait::async_trait]
impl Harness for NatsHarness {
    async fn client(&self) -> Arc<dyn Backend> {
        Arc::new(
            NatsBackend::connect(self.server.config(Some(TTL)))
                .await
                .expect("connect to nats-server"),
        )
    }
    fn lease_ttl(&self) -> Duration {
        TTL
    }
    async fn end_lease(&self, task: &TaskId) {
        let raw = NatsBackend::connect(self.server.config(None))
            .await
            .expect("connect");
        let lease = raw
            .lease_of(task)
            .await
            .expect("read the record")
            .expect("the claim is leased");
        raw.revoke_lease(lease).await.expect("revoke");
    }
    fn race_tasks(&self) -> usize {
        300
    }
}

async fn harness() -> NatsHarness {
    NatsHarness {
        server: NatsServer::start(),
    }
}

agent_core::conformance_suite!(harness());
