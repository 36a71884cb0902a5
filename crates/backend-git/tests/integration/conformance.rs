//! The backend conformance suite on git: each client is a separate clone of one bare remote; a
//! "lease" is the STATUS heartbeat, ended by making it stale.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_core::testing::Harness;
use agent_core::{Backend, SessionId, TaskId};
use backend_git::board::Board;
use backend_git::testing::BareRemote;

struct GitHarness {
    remote: BareRemote,
    clients: AtomicUsize,
}

#[async_trait::async_trait]
impl Harness for GitHarness {
    async fn client(&self) -> Arc<dyn Backend> {
        let n = self.clients.fetch_add(1, Ordering::Relaxed);
        Arc::new(crate::open(&self.remote, &format!("client-{n}")).await)
    }
    fn lease_ttl(&self) -> Duration {
        self.remote.config("x").stale_after
    }
    async fn end_lease(&self, task: &TaskId) {
        let config = self.remote.config("x");
        let text = self.remote.read(&config.board).expect("board");
        let board = Board::parse(&config.board, &text).expect("board parses");
        let owner: SessionId = board
            .tasks()
            .iter()
            .find(|t| &t.id == task)
            .and_then(|t| t.owner.clone())
            .expect("an owner");
        self.remote.make_stale(&config.status_path(&owner));
    }
    fn race_tasks(&self) -> usize {
        20
    }
}

async fn harness() -> GitHarness {
    GitHarness {
        remote: BareRemote::new(crate::EMPTY_BOARD),
        clients: AtomicUsize::new(0),
    }
}

agent_core::conformance_suite!(harness());
