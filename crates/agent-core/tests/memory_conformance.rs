//! Runs the backend conformance suite against the in-memory backend.

use std::sync::Arc;
use std::time::Duration;

use agent_core::memory::{MemoryBackend, MemoryStore};
use agent_core::testing::Harness;
use agent_core::{Backend, TaskId};

struct MemoryHarness {
    store: MemoryStore,
}

const TTL: Duration = Duration::from_millis(600);

#[async_trait::async_trait]
impl Harness for MemoryHarness {
    async fn client(&self) -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new(self.store.clone(), Some(TTL)))
    }
    fn lease_ttl(&self) -> Duration {
        TTL
    }
    async fn end_lease(&self, task: &TaskId) {
        self.store.end_lease_of(task);
    }
    fn race_tasks(&self) -> usize {
        1000
    }
}

async fn harness() -> MemoryHarness {
    MemoryHarness {
        store: MemoryStore::new(),
    }
}

agent_core::conformance_suite!(harness());
