//! The bridge's rounds over two in-memory stores, one of which changes while the bridge writes.

use std::sync::Mutex;

use agent_core::memory::{MemoryBackend, MemoryStore};
use agent_core::{
    BackendResult, ClaimOutcome, Health, Listing, Presence, PutOutcome, ReleaseOutcome, ReleaseTo,
    Subscription,
};
use async_trait::async_trait;

use super::*;

/// A store that runs `during_record` (once) while its first `record` is under way: the other
/// store moving on in the middle of the bridge's write.
#[derive(Debug)]
struct MovesDuringRecord {
    inner: MemoryBackend,
    during_record: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    done: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

#[async_trait]
impl Backend for MovesDuringRecord {
    fn name(&self) -> &'static str {
        "git"
    }
    async fn get(&self, task: &TaskId) -> BackendResult<Option<Task>> {
        self.inner.get(task).await
    }
    async fn list(&self) -> BackendResult<Listing> {
        self.inner.list().await
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
        token: Option<agent_core::FencingToken>,
    ) -> BackendResult<ReleaseOutcome> {
        self.inner.release(task, session, to, token).await
    }
    async fn record(&self, items: &[Mirrored]) -> BackendResult<Vec<RecordOutcome>> {
        let go = self.during_record.lock().expect("lock").take();
        let done = self.done.lock().expect("lock").take();
        if let (Some(go), Some(done)) = (go, done) {
            let _ = go.send(());
            let _ = done.await;
        }
        self.inner.record(items).await
    }
    async fn subscribe(&self) -> BackendResult<Subscription> {
        self.inner.subscribe().await
    }
    async fn announce(&self, presence: &Presence) -> BackendResult<()> {
        self.inner.announce(presence).await
    }
    async fn sessions(&self) -> BackendResult<Vec<Presence>> {
        self.inner.sessions().await
    }
    async fn health(&self) -> Health {
        self.inner.health().await
    }
}

fn id(s: &str) -> TaskId {
    TaskId::parse(s).expect("task id")
}

fn sid(s: &str) -> SessionId {
    SessionId::parse(s).expect("session id")
}

#[tokio::test]
async fn a_claim_released_while_the_bridge_carries_it_is_released_in_git_too() {
    // Seed 50000068: a one-shot command's claim, released in etcd while the bridge wrote it to
    // git, stayed claimed in git (nobody would release it) and came back to etcd later.
    let (etcd_store, git_store) = (MemoryStore::new(), MemoryStore::new());
    let etcd = MemoryBackend::new(etcd_store.clone(), None);
    let plain_git = MemoryBackend::new(git_store.clone(), None);
    for b in [&etcd, &plain_git] {
        b.put(&id("A"), &TaskPatch::default()).await.expect("put");
    }
    let mut bridge = Bridge::default();
    assert_eq!(bridge.round(&etcd, &plain_git).await.expect("round"), 0);
    let claim = match etcd.claim(&id("A"), &sid("cli-x")).await.expect("claim") {
        ClaimOutcome::Won(c) => c,
        other => panic!("{other:?}"),
    };
    let (go, started) = tokio::sync::oneshot::channel();
    let (finish, done) = tokio::sync::oneshot::channel();
    let git = MovesDuringRecord {
        inner: MemoryBackend::new(git_store.clone(), None),
        during_record: Mutex::new(Some(go)),
        done: Mutex::new(Some(done)),
    };
    let releaser = async {
        started.await.expect("the bridge writes");
        let out = etcd
            .release(
                &id("A"),
                &sid("cli-x"),
                ReleaseTo::Available,
                Some(claim.token),
            )
            .await
            .expect("release");
        assert!(matches!(out, ReleaseOutcome::Released { .. }), "{out:?}");
        finish.send(()).expect("the bridge waits");
    };
    let (round, ()) = tokio::join!(bridge.round(&etcd, &git), releaser);
    round.expect("round");
    let in_git = plain_git.get(&id("A")).await.expect("get").expect("task");
    assert_eq!(
        (in_git.status, in_git.claimed_by),
        (TaskStatus::Available, None),
        "git is released within the same round"
    );
}
