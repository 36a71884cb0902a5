//! The bridge's rounds over two in-memory stores, one of which changes while the bridge writes.

use std::sync::Mutex;

use agent_core::memory::{MemoryBackend, MemoryStore};
use agent_core::{
    BackendResult, ClaimOutcome, Health, Listing, Presence, PutOutcome, ReleaseOutcome, ReleaseTo,
    Subscription,
};
use async_trait::async_trait;

use super::*;

/// A store that lets the test change things (once) in the middle of a round: while its first
/// `record` is under way (the other store moving on during the bridge's write), or, with
/// `after_list`, right after its first `list` (this store moving on after the bridge read it).
#[derive(Debug)]
struct MovesDuringRecord {
    inner: MemoryBackend,
    during_record: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    done: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    after_list: bool,
}

impl MovesDuringRecord {
    /// Signals `during_record` and waits for `done`, the first time only.
    async fn pause(&self) {
        let go = self.during_record.lock().expect("lock").take();
        let done = self.done.lock().expect("lock").take();
        if let (Some(go), Some(done)) = (go, done) {
            let _ = go.send(());
            let _ = done.await;
        }
    }
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
        let listing = self.inner.list().await;
        if self.after_list {
            self.pause().await;
        }
        listing
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
        if !self.after_list {
            self.pause().await;
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
        after_list: false,
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

#[tokio::test]
async fn a_reopen_made_after_the_bridge_read_the_store_is_not_written_over() {
    // Seed 352000038: a round read etcd (A claimed by s), then git (A complete by s), and took
    // 3 s to get to its write; meanwhile an operator reopened A. The bridge wrote git's
    // completion over the reopen, git ran A again, and the stores ended in a conflict.
    let (etcd_store, git_store) = (MemoryStore::new(), MemoryStore::new());
    let plain_etcd = MemoryBackend::new(etcd_store.clone(), None);
    let git = MemoryBackend::new(git_store.clone(), None);
    for b in [&plain_etcd, &git] {
        b.put(&id("A"), &TaskPatch::default()).await.expect("put");
    }
    let claimed = Mirrored {
        task: id("A"),
        status: TaskStatus::Claimed,
        holder: Some(sid("s")),
        token: None,
        read_as: None,
    };
    for b in [&plain_etcd, &git] {
        b.record(std::slice::from_ref(&claimed))
            .await
            .expect("record");
    }
    let mut bridge = Bridge::default();
    assert_eq!(bridge.round(&plain_etcd, &git).await.expect("round"), 0);
    let complete = Mirrored {
        status: TaskStatus::Complete,
        ..claimed
    };
    git.record(std::slice::from_ref(&complete))
        .await
        .expect("record");
    let (go, listed) = tokio::sync::oneshot::channel();
    let (finish, done) = tokio::sync::oneshot::channel();
    let etcd = MovesDuringRecord {
        inner: MemoryBackend::new(etcd_store.clone(), None),
        during_record: Mutex::new(Some(go)),
        done: Mutex::new(Some(done)),
        after_list: true,
    };
    let operator = async {
        listed.await.expect("the bridge reads etcd");
        // A hybrid session carries git's completion into etcd, then the operator reopens A.
        plain_etcd
            .record(std::slice::from_ref(&complete))
            .await
            .expect("record");
        let reopen = TaskPatch {
            status: Some(TaskStatus::Available),
            ..TaskPatch::default()
        };
        assert_eq!(
            plain_etcd.put(&id("A"), &reopen).await.expect("reopen"),
            PutOutcome::Updated
        );
        finish.send(()).expect("the bridge waits");
    };
    let (round, ()) = tokio::join!(bridge.round(&etcd, &git), operator);
    round.expect("round");
    let in_etcd = plain_etcd.get(&id("A")).await.expect("get").expect("task");
    assert_eq!(
        (in_etcd.status, in_etcd.claimed_by),
        (TaskStatus::Available, None),
        "the operator's reopen stands"
    );
}

#[tokio::test]
async fn a_blocker_edit_in_either_store_reaches_the_other() {
    // The tester's report: `--mode git put PB2 --blocked-by ""` never reached etcd, whose
    // agent waited for PB0 for ever while audit and the bridge said the stores agreed.
    let (etcd, git) = (
        MemoryBackend::new(MemoryStore::new(), None),
        MemoryBackend::new(MemoryStore::new(), None),
    );
    let blocked = TaskPatch {
        blocked_by: Some(vec![id("P0")]),
        ..TaskPatch::default()
    };
    for b in [&etcd, &git] {
        for t in ["P0", "P1"] {
            b.put(&id(t), &TaskPatch::default()).await.expect("put");
        }
        b.put(&id("PB2"), &blocked).await.expect("put");
    }
    let mut bridge = Bridge::default();
    bridge.round(&etcd, &git).await.expect("round");
    let unblock = TaskPatch {
        blocked_by: Some(vec![]),
        ..TaskPatch::default()
    };
    git.put(&id("PB2"), &unblock).await.expect("edit in git");
    assert_eq!(bridge.round(&etcd, &git).await.expect("round"), 1);
    let in_etcd = etcd.get(&id("PB2")).await.expect("get").expect("task");
    assert_eq!(in_etcd.blocked_by, Vec::<TaskId>::new());
    // And the other way.
    let reblock = TaskPatch {
        blocked_by: Some(vec![id("P1")]),
        ..TaskPatch::default()
    };
    etcd.put(&id("PB2"), &reblock).await.expect("edit in etcd");
    assert_eq!(bridge.round(&etcd, &git).await.expect("round"), 1);
    let in_git = git.get(&id("PB2")).await.expect("get").expect("task");
    assert_eq!(in_git.blocked_by, [id("P1")]);
}

#[tokio::test]
async fn a_restarted_bridge_remembers_the_common_past_and_carries_a_blocker_edit() {
    // Seeds 470000022, 470000049: a blocker edit made in one store just before the bridge
    // stopped; the next bridge (a `--once` run) had no common past to tell which store made it,
    // and left the stores differing for good.
    let (etcd, git) = (
        MemoryBackend::new(MemoryStore::new(), None),
        MemoryBackend::new(MemoryStore::new(), None),
    );
    for t in ["A", "B"] {
        for b in [&etcd, &git] {
            b.put(&id(t), &TaskPatch::default()).await.expect("put");
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("bridge/state.json");
    let stores = "these two";
    let mut first = Bridge::remembering(&state, stores);
    assert_eq!(first.round(&etcd, &git).await.expect("round"), 0);
    first.remember(&state, stores, &mut None);
    drop(first);
    let blocked = TaskPatch {
        blocked_by: Some(vec![id("A")]),
        ..TaskPatch::default()
    };
    etcd.put(&id("B"), &blocked).await.expect("put");

    // Another pair of stores learns nothing from it.
    let mut other = Bridge::remembering(&state, "other stores");
    other.round(&etcd, &git).await.expect("round");
    assert!(git
        .get(&id("B"))
        .await
        .expect("get")
        .expect("B")
        .blocked_by
        .is_empty());

    let mut next = Bridge::remembering(&state, stores);
    next.round(&etcd, &git).await.expect("round");
    assert_eq!(
        git.get(&id("B")).await.expect("get").expect("B").blocked_by,
        vec![id("A")],
        "the edit made in etcd since the common past reaches git"
    );
}
