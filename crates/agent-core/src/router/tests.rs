//! The router's decisions over two in-memory stores, one of which can be set down: fallback per
//! operation, the breaker, claims carried across a switch, the return, live mode changes.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::memory::{MemoryBackend, MemoryStore};
use crate::testing::{eventually, sid, tid};
use crate::{ClaimOutcome, ReleaseOutcome, ReleaseTo, Task, TaskPatch, TaskStatus};

struct Fleet {
    etcd: MemoryStore,
    git: MemoryStore,
}

impl Fleet {
    async fn new(tasks: &[&str]) -> Fleet {
        let fleet = Fleet {
            etcd: MemoryStore::new(),
            git: MemoryStore::new(),
        };
        for store in [&fleet.etcd, &fleet.git] {
            let b = MemoryBackend::new(store.clone(), None);
            for t in tasks {
                b.put(&tid(t), &TaskPatch::default()).await.expect("put");
            }
        }
        fleet
    }

    fn router(&self, mode: Mode) -> Router {
        self.router_with(mode, true)
    }

    /// `mirror: false` is a hybrid session of a fleet whose bridge mirrors for it.
    fn router_with(&self, mode: Mode, mirror: bool) -> Router {
        self.router_configured(mode, mirror, true)
    }

    /// `claims_in_git: false`: a fleet that declared git retired.
    fn router_configured(&self, mode: Mode, mirror: bool, claims_in_git: bool) -> Router {
        self.router_on(self.etcd_client(), mode, mirror, claims_in_git)
    }

    /// A router over the given etcd client: two of them over one client are one session's
    /// agent and its successor that took the session's lease over.
    fn router_on(
        &self,
        etcd: Arc<dyn Backend>,
        mode: Mode,
        mirror: bool,
        claims_in_git: bool,
    ) -> Router {
        let mut config = RouterConfig::new("s1", mode);
        config.mirror = mirror;
        config.claims_in_git = claims_in_git;
        config.deadline = Duration::from_millis(200);
        config.failures_to_open = 2;
        config.probe_initial = Duration::from_millis(50);
        config.probe_max = Duration::from_millis(200);
        config.check_interval = Duration::from_millis(50);
        let git: Arc<dyn Backend> = Arc::new(MemoryBackend::new(self.git.clone(), None));
        Router::new(Some(etcd), Some(git), config).expect("router")
    }

    /// One process's etcd client (leases of 30 s).
    fn etcd_client(&self) -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new(
            self.etcd.clone(),
            Some(Duration::from_secs(30)),
        ))
    }

    async fn in_etcd(&self, t: &str) -> Task {
        self.read(&self.etcd, t).await
    }

    async fn in_git(&self, t: &str) -> Task {
        self.read(&self.git, t).await
    }

    async fn read(&self, store: &MemoryStore, t: &str) -> Task {
        MemoryBackend::new(store.clone(), None)
            .get(&tid(t))
            .await
            .expect("get")
            .expect("task exists")
    }
}

fn won(outcome: ClaimOutcome) -> crate::Claim {
    match outcome {
        ClaimOutcome::Won(c) => c,
        other => panic!("expected to win, got {other:?}"),
    }
}

fn face(t: &Task) -> (TaskStatus, Option<&str>) {
    (t.status, t.claimed_by.as_ref().map(|s| s.as_str()))
}

async fn wait_serving(r: &Router, side: Side) {
    eventually(Duration::from_secs(10), "the router to switch", || async {
        (r.serving() == side).then_some(())
    })
    .await;
}

#[tokio::test]
async fn hybrid_claims_on_the_coordinator_and_mirrors_to_git() {
    let fleet = Fleet::new(&["A", "B"]).await;
    let r = fleet.router(Mode::Hybrid);
    let c = won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
    assert!(r.flush_mirror(Duration::from_secs(5)).await);
    assert_eq!(
        face(&fleet.in_etcd("A").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    assert_eq!(
        face(&fleet.in_git("A").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    let out = r
        .release(&tid("A"), &sid("s1"), ReleaseTo::Complete, Some(c.token))
        .await
        .expect("release");
    assert!(matches!(out, ReleaseOutcome::Released { .. }));
    assert!(r.flush_mirror(Duration::from_secs(5)).await);
    assert_eq!(
        face(&fleet.in_git("A").await),
        (TaskStatus::Complete, Some("s1"))
    );
    assert_eq!(r.served().get(&("claim", "memory")), Some(&1));
    assert_eq!(r.serving(), Side::Primary);
}

#[tokio::test]
async fn lost_races_never_open_the_breaker() {
    let fleet = Fleet::new(&["A"]).await;
    let other = MemoryBackend::new(fleet.etcd.clone(), None);
    won(other.claim(&tid("A"), &sid("s9")).await.expect("claim"));
    let r = fleet.router(Mode::Hybrid);
    for _ in 0..10 {
        let out = r.claim(&tid("A"), &sid("s1")).await.expect("claim");
        assert!(matches!(out, ClaimOutcome::Lost { .. }), "{out:?}");
    }
    assert_eq!(r.serving(), Side::Primary);
}

#[tokio::test]
async fn an_outage_moves_the_claim_to_git_and_the_return_writes_git_back() {
    let fleet = Fleet::new(&["A", "B", "C"]).await;
    let r = fleet.router(Mode::Hybrid);
    let mut sub = r.subscribe().await.expect("subscribe");
    let a = won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));

    fleet.etcd.set_reachable(false);
    wait_serving(&r, Side::Fallback).await;
    // The running claim is asserted in git with the coordinator's token.
    assert_eq!(
        face(&fleet.in_git("A").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    let resync = eventually(Duration::from_secs(5), "a resync", || {
        let got =
            std::iter::from_fn(|| sub.try_next()).find(|e| matches!(e, BackendEvent::Resync(_)));
        async move { got }
    })
    .await;
    assert!(matches!(resync, BackendEvent::Resync(l) if l.tasks.len() == 3));

    // Work goes on through git: the old claim completes there, a new one is made there.
    let done = r
        .release(&tid("A"), &sid("s1"), ReleaseTo::Complete, Some(a.token))
        .await
        .expect("release in git");
    assert!(matches!(done, ReleaseOutcome::Released { .. }));
    let b = won(r.claim(&tid("B"), &sid("s1")).await.expect("claim in git"));
    assert_eq!(
        face(&fleet.in_git("B").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    assert_eq!(r.served().get(&("claim", "memory")), Some(&2));

    fleet.etcd.set_reachable(true);
    wait_serving(&r, Side::Primary).await;
    // What was done on git is in etcd: A complete, B claimed by s1 (and held: others lose).
    assert_eq!(
        face(&fleet.in_etcd("A").await),
        (TaskStatus::Complete, Some("s1"))
    );
    assert_eq!(
        face(&fleet.in_etcd("B").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    let other = MemoryBackend::new(fleet.etcd.clone(), None);
    assert!(matches!(
        other.claim(&tid("B"), &sid("s2")).await.expect("claim"),
        ClaimOutcome::Lost { .. }
    ));
    // The release of B (claimed in git) lands in both stores.
    r.release(&tid("B"), &sid("s1"), ReleaseTo::Complete, Some(b.token))
        .await
        .expect("release");
    assert_eq!(
        face(&fleet.in_etcd("B").await),
        (TaskStatus::Complete, Some("s1"))
    );
    assert_eq!(
        face(&fleet.in_git("B").await),
        (TaskStatus::Complete, Some("s1"))
    );
}

#[tokio::test]
async fn a_hybrid_claim_is_in_git_before_it_counts() {
    let fleet = Fleet::new(&["A", "B"]).await;
    let r = fleet.router(Mode::Hybrid);
    // Another session holds A in git: the etcd claim is undone, not doubled.
    let git_session = MemoryBackend::new(fleet.git.clone(), None);
    won(git_session
        .claim(&tid("A"), &sid("s2"))
        .await
        .expect("claim"));
    assert_eq!(
        r.claim(&tid("A"), &sid("s1")).await.expect("claim"),
        ClaimOutcome::Lost {
            holder: Some(sid("s2"))
        }
    );
    assert_eq!(fleet.in_etcd("A").await.status, TaskStatus::Available);
    // A free task: held in both before the claim returns (no mirror lag to wait for).
    won(r.claim(&tid("B"), &sid("s1")).await.expect("claim"));
    assert_eq!(
        face(&fleet.in_git("B").await),
        (TaskStatus::Claimed, Some("s1"))
    );
}

#[tokio::test]
async fn a_claim_taken_in_git_meanwhile_is_lost_not_doubled() {
    let fleet = Fleet::new(&["A"]).await;
    // Without its own mirror (a bridge's fleet) and with git declared retired, the claim
    // reaches git only at the switch.
    let r = fleet.router_configured(Mode::Hybrid, false, false);
    let mut sub = r.subscribe().await.expect("subscribe");
    won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
    let git_session = MemoryBackend::new(fleet.git.clone(), None);
    won(git_session
        .claim(&tid("A"), &sid("s2"))
        .await
        .expect("claim"));
    fleet.etcd.set_reachable(false);
    wait_serving(&r, Side::Fallback).await;
    let lost = eventually(
        Duration::from_secs(5),
        "the claim to be reported lost",
        || {
            let got = std::iter::from_fn(|| sub.try_next())
                .find(|e| matches!(e, BackendEvent::ClaimLost { .. }));
            async move { got }
        },
    )
    .await;
    assert!(
        matches!(lost, BackendEvent::ClaimLost { task, session, .. } if task == tid("A") && session == sid("s1"))
    );
    assert_eq!(
        face(&fleet.in_git("A").await),
        (TaskStatus::Claimed, Some("s2"))
    );
}

#[tokio::test]
async fn switching_to_git_live_brings_git_up_to_the_coordinator_first() {
    let fleet = Fleet::new(&["A", "B", "C"]).await;
    // Another coordinator session completed A before any mirror existed.
    let elsewhere = MemoryBackend::new(fleet.etcd.clone(), None);
    let c = won(elsewhere.claim(&tid("A"), &sid("s2")).await.expect("claim"));
    elsewhere
        .release(&tid("A"), &sid("s2"), ReleaseTo::Complete, Some(c.token))
        .await
        .expect("release");
    let r = fleet.router(Mode::Coordinator);
    let b = won(r.claim(&tid("B"), &sid("s1")).await.expect("claim"));
    r.set_mode(Mode::Git).await.expect("to git");
    assert_eq!(r.serving(), Side::Fallback);
    assert_eq!(
        face(&fleet.in_git("A").await),
        (TaskStatus::Complete, Some("s2"))
    );
    assert_eq!(
        face(&fleet.in_git("B").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    // Finished after the switch: complete in git, and in etcd (reachable).
    r.release(&tid("B"), &sid("s1"), ReleaseTo::Complete, Some(b.token))
        .await
        .expect("release");
    assert_eq!(
        face(&fleet.in_git("B").await),
        (TaskStatus::Complete, Some("s1"))
    );
    assert_eq!(
        face(&fleet.in_etcd("B").await),
        (TaskStatus::Complete, Some("s1"))
    );
    // Claims now go to git.
    won(r.claim(&tid("C"), &sid("s1")).await.expect("claim"));
    assert_eq!(
        face(&fleet.in_git("C").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    // Right after a switch, a claim is confirmed in the store left behind (peers may still be
    // there), so C is held in etcd too.
    assert_eq!(
        face(&fleet.in_etcd("C").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    // And back: C's claim moves to etcd.
    r.set_mode(Mode::Coordinator).await.expect("back");
    assert_eq!(r.serving(), Side::Primary);
    assert_eq!(
        face(&fleet.in_etcd("C").await),
        (TaskStatus::Claimed, Some("s1"))
    );
}

#[tokio::test]
async fn one_failed_operation_goes_to_git_without_switching() {
    let mut config = RouterConfig::new("s1", Mode::Hybrid);
    config.failures_to_open = 5;
    config.check_interval = Duration::from_secs(60);
    let fleet = Fleet::new(&["A"]).await;
    let etcd: Arc<dyn Backend> = Arc::new(MemoryBackend::new(fleet.etcd.clone(), None));
    let git: Arc<dyn Backend> = Arc::new(MemoryBackend::new(fleet.git.clone(), None));
    let r = Router::new(Some(etcd), Some(git), config).expect("router");
    fleet.etcd.set_reachable(false);
    let t = r.get(&tid("A")).await.expect("served by git");
    assert!(t.is_some());
    assert_eq!(
        r.serving(),
        Side::Primary,
        "one failure does not open the breaker"
    );
    assert_eq!(r.served().get(&("get", "memory")), Some(&1));
}

#[tokio::test]
async fn a_silent_coordinator_is_left_at_the_first_deadline_and_told_on_the_way_back() {
    // Issue 15 #13: with etcd SIGSTOPped, hybrid agents took 2.6-3.6 s to claim on git with a
    // 500 ms deadline: the release, the announce and a health check each waited a deadline
    // (three failures to open), then the switch asked etcd for its state once more.
    let fleet = Fleet::new(&["A", "B"]).await;
    let mut config = RouterConfig::new("s1", Mode::Hybrid);
    config.deadline = Duration::from_millis(100);
    config.failures_to_open = 5;
    config.probe_initial = Duration::from_millis(50);
    config.probe_max = Duration::from_millis(100);
    config.check_interval = Duration::from_millis(50);
    let git: Arc<dyn Backend> = Arc::new(MemoryBackend::new(fleet.git.clone(), None));
    let r = Router::new(Some(fleet.etcd_client()), Some(git), config).expect("router");
    let a = won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
    fleet.etcd.set_silent(true);
    // The completion is taken by git, where the claim was recorded; etcd's silence is not
    // asked about again (the release neither waits for it nor fails).
    let released = r
        .release(&tid("A"), &sid("s1"), ReleaseTo::Complete, Some(a.token))
        .await
        .expect("released in git");
    assert!(
        matches!(released, ReleaseOutcome::Released { .. }),
        "{released:?}"
    );
    assert_eq!(
        r.serving(),
        Side::Fallback,
        "one silence opens the breaker, though five failures are configured"
    );
    assert_eq!(fleet.in_git("A").await.status, TaskStatus::Complete);
    won(r
        .claim(&tid("B"), &sid("s1"))
        .await
        .expect("claimed in git"));
    assert_eq!(
        face(&fleet.in_git("B").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    fleet.etcd.set_silent(false);
    wait_serving(&r, Side::Primary).await;
    assert_eq!(
        fleet.in_etcd("A").await.status,
        TaskStatus::Complete,
        "the completion etcd was not asked for reaches it on the way back"
    );
    assert_eq!(
        face(&fleet.in_etcd("B").await),
        (TaskStatus::Claimed, Some("s1"))
    );
}

#[tokio::test]
async fn a_mode_needing_an_unconfigured_store_is_refused() {
    let etcd: Arc<dyn Backend> = Arc::new(MemoryBackend::new(MemoryStore::new(), None));
    let r =
        Router::new(Some(etcd), None, RouterConfig::new("s1", Mode::Coordinator)).expect("router");
    let err = r.set_mode(Mode::Git).await.expect_err("no git configured");
    assert!(err.to_string().contains("git.remote"), "{err}");
    assert_eq!(r.mode(), Mode::Coordinator);
}

#[tokio::test]
async fn a_coordinator_sessions_claim_is_in_git_before_it_counts_while_the_fleet_has_a_git_side() {
    for mirror in [true, false] {
        let fleet = Fleet::new(&["A", "B"]).await;
        let r = fleet.router_with(Mode::Coordinator, mirror);
        // A: etcd first; git has it before the claim returns, so a git session loses it.
        won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
        assert_eq!(
            face(&fleet.in_git("A").await),
            (TaskStatus::Claimed, Some("s1"))
        );
        let git_session = MemoryBackend::new(fleet.git.clone(), None);
        assert!(matches!(
            git_session
                .claim(&tid("A"), &sid("s2"))
                .await
                .expect("claim"),
            ClaimOutcome::Lost { .. }
        ));
        // B: a git session has it: the coordinator session's etcd claim is undone, "lost".
        won(git_session
            .claim(&tid("B"), &sid("s2"))
            .await
            .expect("claim"));
        assert!(matches!(
            r.claim(&tid("B"), &sid("s1")).await.expect("claim"),
            ClaimOutcome::Lost { .. }
        ));
        assert_eq!(face(&fleet.in_etcd("B").await).0, TaskStatus::Available);
    }
    // Once the fleet declares git retired, coordinator claims stop paying for git.
    let fleet = Fleet::new(&["A"]).await;
    let r = fleet.router_configured(Mode::Coordinator, false, false);
    won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
    assert_eq!(face(&fleet.in_git("A").await).0, TaskStatus::Available);
}

#[tokio::test]
async fn falling_back_while_etcd_is_down_carries_what_it_saw_completed_into_git() {
    let fleet = Fleet::new(&["A", "B"]).await;
    // A bridge's fleet with git declared retired: nothing of etcd's reaches git by itself.
    let r = fleet.router_configured(Mode::Hybrid, false, false);
    let _sub = r.subscribe().await.expect("subscribe");
    let elsewhere = MemoryBackend::new(fleet.etcd.clone(), None);
    let c = won(elsewhere.claim(&tid("A"), &sid("s2")).await.expect("claim"));
    elsewhere
        .release(&tid("A"), &sid("s2"), ReleaseTo::Complete, Some(c.token))
        .await
        .expect("release");
    won(elsewhere.claim(&tid("B"), &sid("s2")).await.expect("claim"));
    assert_eq!(face(&fleet.in_git("A").await).0, TaskStatus::Available);
    fleet.etcd.set_reachable(false);
    wait_serving(&r, Side::Fallback).await;
    // A was complete on etcd: git has it complete before this session claims anything there.
    assert_eq!(
        face(&fleet.in_git("A").await),
        (TaskStatus::Complete, Some("s2"))
    );
    assert!(matches!(
        r.claim(&tid("A"), &sid("s1")).await.expect("claim"),
        ClaimOutcome::NotClaimable { .. }
    ));
    // Another session's claim is its own to assert: not written from a stale view.
    assert_eq!(face(&fleet.in_git("B").await).0, TaskStatus::Available);
}

#[tokio::test]
async fn while_the_fleet_has_a_git_side_an_etcd_claim_git_does_not_take_is_undone() {
    for mode in [Mode::Coordinator, Mode::Hybrid] {
        let fleet = Fleet::new(&["A"]).await;
        let r = fleet.router(mode);
        // git does not answer: nobody can tell whether a git session holds A.
        fleet.git.set_reachable(false);
        let err = r
            .claim(&tid("A"), &sid("s1"))
            .await
            .expect_err("no claim without git");
        assert!(err.is_transient(), "{err:?}");
        assert_eq!(face(&fleet.in_etcd("A").await).0, TaskStatus::Available);
        fleet.git.set_reachable(true);
        won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
        assert_eq!(
            face(&fleet.in_git("A").await),
            (TaskStatus::Claimed, Some("s1"))
        );
    }
}

#[tokio::test]
async fn a_task_git_has_otherwise_is_not_claimed_again_on_etcd_until_git_changes() {
    // Issue 15 #10: hybrid agents claimed such a task in etcd, saw git disagree, undid it and
    // claimed again, ~750 times a second each.
    let fleet = Fleet::new(&["B"]).await;
    let r = fleet.router(Mode::Coordinator);
    let mut sub = r.subscribe().await.expect("subscribe");
    let git_session = MemoryBackend::new(fleet.git.clone(), None);
    let c = won(git_session
        .claim(&tid("B"), &sid("s2"))
        .await
        .expect("claim"));
    assert!(matches!(
        r.claim(&tid("B"), &sid("s1")).await.expect("claim"),
        ClaimOutcome::Lost { .. }
    ));
    // Asked again while git is unchanged: git's answer, and etcd is not written at all.
    let reader = MemoryBackend::new(fleet.etcd.clone(), None);
    let before = reader.list().await.expect("list").revision;
    for _ in 0..20 {
        assert!(matches!(
            r.claim(&tid("B"), &sid("s1")).await.expect("claim"),
            ClaimOutcome::Lost { .. }
        ));
    }
    assert_eq!(
        reader.list().await.expect("list").revision,
        before,
        "no claim storm"
    );
    // The git session gives B back: the router's subscribers hear of B, and the claim wins.
    while sub.try_next().is_some() {}
    git_session
        .release(&tid("B"), &sid("s2"), ReleaseTo::Available, Some(c.token))
        .await
        .expect("release");
    eventually(Duration::from_secs(5), "B offered again", || {
        let got = std::iter::from_fn(|| sub.try_next()).any(|e| {
            matches!(e, BackendEvent::Task(t) if t.task == tid("B") && t.new_status == Some(TaskStatus::Available))
        });
        async move { got.then_some(()) }
    })
    .await;
    won(r.claim(&tid("B"), &sid("s1")).await.expect("claim"));
}

#[tokio::test]
async fn while_the_fleet_has_a_git_side_a_put_changes_the_board_too() {
    let fleet = Fleet::new(&["A"]).await;
    let r = fleet.router(Mode::Coordinator);
    let c = won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
    r.release(&tid("A"), &sid("s1"), ReleaseTo::Complete, Some(c.token))
        .await
        .expect("release");
    assert_eq!(face(&fleet.in_git("A").await).0, TaskStatus::Complete);
    // An operator reopens A: both stores take it (a reopening on etcd alone would be put back
    // by the next claim's confirmation in git).
    let reopen = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    r.put(&tid("A"), &reopen).await.expect("put");
    assert_eq!(face(&fleet.in_etcd("A").await).0, TaskStatus::Available);
    assert_eq!(face(&fleet.in_git("A").await).0, TaskStatus::Available);
    won(r.claim(&tid("A"), &sid("s2")).await.expect("claim"));
}

#[tokio::test]
async fn while_git_does_not_answer_a_completion_waits_for_it_and_lands_in_both_stores() {
    let fleet = Fleet::new(&["A"]).await;
    let r = fleet.router_with(Mode::Coordinator, false);
    let c = won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
    fleet.git.set_reachable(false);
    // Git first or nobody: etcd alone would let a git session redo it once the claim there
    // goes stale.
    let err = r
        .release(&tid("A"), &sid("s1"), ReleaseTo::Complete, Some(c.token))
        .await
        .expect_err("git does not answer");
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(
        face(&fleet.in_etcd("A").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    fleet.git.set_reachable(true);
    let done = r
        .release(&tid("A"), &sid("s1"), ReleaseTo::Complete, Some(c.token))
        .await
        .expect("release");
    assert!(matches!(done, ReleaseOutcome::Released { .. }), "{done:?}");
    assert_eq!(face(&fleet.in_git("A").await).0, TaskStatus::Complete);
    assert_eq!(face(&fleet.in_etcd("A").await).0, TaskStatus::Complete);
}

#[tokio::test]
async fn a_reopening_the_board_took_is_reported_as_a_change() {
    // Seed 2000000032: git had the task complete, etcd not yet; the reopening changed the board
    // but was reported "unchanged", so it was not recorded, and its second run looked like a
    // double run.
    let f = Fleet::new(&["A"]).await;
    let git = MemoryBackend::new(f.git.clone(), None);
    let patch = TaskPatch {
        status: Some(TaskStatus::Complete),
        ..TaskPatch::default()
    };
    git.put(&tid("A"), &patch).await.expect("complete on git");
    let r = f.router(Mode::Coordinator);
    let reopen = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    let out = r.put(&tid("A"), &reopen).await.expect("put");
    assert_eq!(out, crate::PutOutcome::Updated);
    assert_eq!(f.read(&f.git, "A").await.status, TaskStatus::Available);
}

fn presence_of(session: &str) -> crate::Presence {
    crate::Presence {
        session_id: sid(session),
        state: "idle".into(),
        current_task: None,
        backend: String::new(),
        started_at: chrono::Utc::now(),
        pid: 1,
        host: "h".into(),
        version: String::new(),
        heartbeat: None,
        claim_p95_us: None,
    }
}

async fn registered_in(store: &MemoryStore) -> Vec<SessionId> {
    MemoryBackend::new(store.clone(), None)
        .sessions()
        .await
        .expect("sessions")
        .into_iter()
        .map(|p| p.session_id)
        .collect()
}

#[tokio::test]
async fn a_store_the_registration_missed_is_registered_before_the_session_works_there() {
    // Seed 60000020: git's registration did not land (its pushes kept losing), the agent worked
    // on git anyway, and git still named the process it had taken over.
    let fleet = Fleet::new(&["A"]).await;
    let r = fleet.router(Mode::Git);
    fleet.git.set_reachable(false);
    assert_eq!(
        r.register(&presence_of("s1"), true)
            .await
            .expect("etcd took it"),
        None
    );
    fleet.git.set_reachable(true);
    assert!(registered_in(&fleet.git).await.is_empty());
    won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
    assert_eq!(
        registered_in(&fleet.git).await,
        [sid("s1")],
        "registered in git before its claim there"
    );
}

#[tokio::test]
async fn a_switch_registers_the_session_in_a_store_its_registration_missed() {
    // Seed 80000037: idle after a rollback to git, where its registration had failed at start,
    // the process never heard that another had taken the session over there.
    let fleet = Fleet::new(&["A"]).await;
    let r = fleet.router(Mode::Hybrid);
    fleet.git.set_reachable(false);
    assert_eq!(
        r.register(&presence_of("s1"), false).await.expect("etcd"),
        None
    );
    fleet.git.set_reachable(true);
    assert!(registered_in(&fleet.git).await.is_empty());
    r.set_mode(Mode::Git).await.expect("to git");
    assert_eq!(registered_in(&fleet.git).await, [sid("s1")]);
}

#[tokio::test]
async fn git_is_followed_once_it_answers_when_it_did_not_at_subscribe() {
    // Seed 260000011: an agent subscribed while the git remote was away never followed git:
    // moved there by a rollback, it never heard git's changes nor that it was taken over.
    let fleet = Fleet::new(&["B"]).await;
    fleet.git.set_reachable(false);
    let r = fleet.router(Mode::Coordinator);
    let mut sub = r.subscribe().await.expect("subscribe (etcd serves)");
    fleet.git.set_reachable(true);
    r.set_mode(Mode::Git).await.expect("mode");
    wait_serving(&r, Side::Fallback).await;
    let git_session = MemoryBackend::new(fleet.git.clone(), None);
    // Once the retry has subscribed, a change in git reaches the router's subscribers.
    eventually(Duration::from_secs(10), "git's change heard", || {
        let git_session = &git_session;
        let heard = std::iter::from_fn(|| sub.try_next()).any(|e| {
            matches!(e, BackendEvent::Task(t) if t.task == tid("B") && t.new_status == Some(TaskStatus::Blocked))
        });
        async move {
            if heard {
                return Some(());
            }
            // Toggled until heard: a change before the retry subscribed is not replayed.
            for status in [TaskStatus::Available, TaskStatus::Blocked] {
                let patch = TaskPatch {
                    status: Some(status),
                    ..TaskPatch::default()
                };
                git_session.put(&tid("B"), &patch).await.expect("put");
            }
            None
        }
    })
    .await;
}

/// `s1`'s claim of `t` (won through `r`) goes to `s2` in git: `s1`'s git claim went stale there
/// and a git session took the task.
async fn taken_in_git_by_s2(fleet: &Fleet, t: &str, token: crate::FencingToken) {
    let git_session = MemoryBackend::new(fleet.git.clone(), None);
    let out = git_session
        .release(&tid(t), &sid("s1"), ReleaseTo::Available, Some(token))
        .await
        .expect("lapse in git");
    assert!(matches!(out, ReleaseOutcome::Released { .. }), "{out:?}");
    won(git_session
        .claim(&tid(t), &sid("s2"))
        .await
        .expect("git claim"));
}

#[tokio::test]
async fn a_finished_run_is_not_completed_on_etcd_when_git_gave_the_task_to_another_session() {
    // Seeds 280000026, 280000047: a coordinator session's claim lapsed, a git session took the
    // task in git and ran it, and the first session's late completion landed on etcd: the
    // task completed twice, by two sessions. Git's word comes first, whether the router still
    // tracks the claim (its loss not yet heard) or not (a restarted agent reporting the run).
    for tracked in [true, false] {
        let fleet = Fleet::new(&["A"]).await;
        let etcd = fleet.etcd_client();
        let r = fleet.router_on(etcd.clone(), Mode::Coordinator, true, true);
        let c = won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
        assert_eq!(
            face(&fleet.in_git("A").await),
            (TaskStatus::Claimed, Some("s1"))
        );
        taken_in_git_by_s2(&fleet, "A", c.token).await;
        let reporter = if tracked {
            r
        } else {
            fleet.router_on(etcd, Mode::Coordinator, true, true)
        };
        let out = reporter
            .release(&tid("A"), &sid("s1"), ReleaseTo::Complete, Some(c.token))
            .await
            .expect("release");
        assert!(
            matches!(out, ReleaseOutcome::NotHolder { .. }),
            "tracked={tracked}: {out:?}"
        );
        assert_ne!(
            fleet.in_etcd("A").await.status,
            TaskStatus::Complete,
            "tracked={tracked}"
        );
        assert_eq!(
            face(&fleet.in_git("A").await),
            (TaskStatus::Claimed, Some("s2")),
            "tracked={tracked}"
        );
    }
}

#[tokio::test]
async fn a_finished_run_still_completes_on_both_when_git_has_nobody_else() {
    // The other side of the rule: a restarted agent's report of a run whose claim git still
    // shows as its own lands in both stores.
    let fleet = Fleet::new(&["A"]).await;
    let etcd = fleet.etcd_client();
    let r = fleet.router_on(etcd.clone(), Mode::Coordinator, true, true);
    let c = won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
    let restarted = fleet.router_on(etcd, Mode::Coordinator, true, true);
    let out = restarted
        .release(&tid("A"), &sid("s1"), ReleaseTo::Complete, Some(c.token))
        .await
        .expect("release");
    assert!(matches!(out, ReleaseOutcome::Released { .. }), "{out:?}");
    assert_eq!(
        face(&fleet.in_etcd("A").await),
        (TaskStatus::Complete, Some("s1"))
    );
    assert_eq!(
        face(&fleet.in_git("A").await),
        (TaskStatus::Complete, Some("s1"))
    );
}

#[tokio::test]
async fn a_finished_run_under_a_git_claim_is_completed_by_a_restart_that_serves_etcd() {
    // Seed 390000014: an agent on git claimed A there and ran it, was killed before reporting
    // it, and its restart (on etcd now) reported the run with git's token to etcd, which
    // refused it: A ran again. The completion lands in git, where the claim is, and is carried
    // into etcd.
    let fleet = Fleet::new(&["A"]).await;
    let on_git = MemoryBackend::new(fleet.git.clone(), None);
    let c = won(on_git
        .claim(&tid("A"), &sid("s1"))
        .await
        .expect("git claim"));
    let restarted = fleet.router(Mode::Hybrid);
    let out = restarted
        .release(&tid("A"), &sid("s1"), ReleaseTo::Complete, Some(c.token))
        .await
        .expect("release");
    assert!(matches!(out, ReleaseOutcome::Released { .. }), "{out:?}");
    for (store, task) in [
        ("git", fleet.in_git("A").await),
        ("etcd", fleet.in_etcd("A").await),
    ] {
        assert_eq!(face(&task), (TaskStatus::Complete, Some("s1")), "{store}");
    }
    // Another session holding the task in the serving store is not gone around.
    let fleet = Fleet::new(&["B"]).await;
    let on_git = MemoryBackend::new(fleet.git.clone(), None);
    let c = won(on_git
        .claim(&tid("B"), &sid("s1"))
        .await
        .expect("git claim"));
    let etcd = MemoryBackend::new(fleet.etcd.clone(), None);
    won(etcd.claim(&tid("B"), &sid("s2")).await.expect("etcd claim"));
    let out = fleet
        .router(Mode::Hybrid)
        .release(&tid("B"), &sid("s1"), ReleaseTo::Complete, Some(c.token))
        .await
        .expect("release");
    assert!(matches!(out, ReleaseOutcome::NotHolder { .. }), "{out:?}");
    assert_eq!(
        face(&fleet.in_git("B").await),
        (TaskStatus::Claimed, Some("s1"))
    );
}

#[tokio::test]
async fn a_claim_copied_into_etcd_ends_when_git_frees_the_task() {
    // Issue 15 #8: a git session's claim copied into etcd (catch-up, bridge) has no lease: once
    // the session let go of it in git (released, or its heartbeat went stale) etcd's copy held
    // the task for nobody until someone ran `ifc release`.
    let fleet = Fleet::new(&["A", "B", "C"]).await;
    let git_session = MemoryBackend::new(fleet.git.clone(), None);
    let a = won(git_session
        .claim(&tid("A"), &sid("s2"))
        .await
        .expect("claim"));
    won(git_session
        .claim(&tid("B"), &sid("s2"))
        .await
        .expect("claim"));
    let copier = MemoryBackend::new(fleet.etcd.clone(), None);
    let copies: Vec<Mirrored> = ["A", "B"]
        .iter()
        .map(|t| Mirrored {
            task: tid(t),
            status: TaskStatus::Claimed,
            holder: Some(sid("s2")),
            token: None,
            read_as: None,
        })
        .collect();
    copier.record(&copies).await.expect("copied");
    // C is held in etcd by a live session of another process, under its lease.
    let other_process = fleet.etcd_client();
    won(other_process
        .claim(&tid("C"), &sid("s3"))
        .await
        .expect("claim"));

    let r = fleet.router(Mode::Coordinator);
    let _sub = r.subscribe().await.expect("subscribe");
    // Git's word on C changes (a person toggles the row): the leased claim stays. Heard
    // before A's release below (one pump, in order).
    for status in [TaskStatus::Blocked, TaskStatus::Available] {
        let patch = TaskPatch {
            status: Some(status),
            ..TaskPatch::default()
        };
        git_session.put(&tid("C"), &patch).await.expect("put");
    }
    git_session
        .release(&tid("A"), &sid("s2"), ReleaseTo::Available, Some(a.token))
        .await
        .expect("release in git");
    eventually(
        Duration::from_secs(10),
        "etcd's copy of A to end",
        || async { (fleet.in_etcd("A").await.status == TaskStatus::Available).then_some(()) },
    )
    .await;
    assert_eq!(
        face(&fleet.in_etcd("B").await),
        (TaskStatus::Claimed, Some("s2")),
        "git still has B"
    );
    assert_eq!(
        face(&fleet.in_etcd("C").await),
        (TaskStatus::Claimed, Some("s3")),
        "a claim under a live lease is its holder's"
    );
    // The task is claimable again on etcd.
    won(r.claim(&tid("A"), &sid("s1")).await.expect("claim"));
}

#[tokio::test]
async fn a_completion_made_in_git_reaches_etcd() {
    // Issue 15 #11: a hybrid session on etcd waited for ever for a blocker another session
    // completed while on git: nothing carried a git-only completion into etcd.
    let fleet = Fleet::new(&["A", "B"]).await;
    let r = fleet.router(Mode::Hybrid);
    let _sub = r.subscribe().await.expect("subscribe");
    let git_session = MemoryBackend::new(fleet.git.clone(), None);
    let c = won(git_session
        .claim(&tid("A"), &sid("s2"))
        .await
        .expect("claim"));
    git_session
        .release(&tid("A"), &sid("s2"), ReleaseTo::Complete, Some(c.token))
        .await
        .expect("complete in git");
    eventually(
        Duration::from_secs(10),
        "git's completion of A in etcd",
        || async { (fleet.in_etcd("A").await.status == TaskStatus::Complete).then_some(()) },
    )
    .await;
    assert_eq!(
        face(&fleet.in_etcd("A").await),
        (TaskStatus::Complete, Some("s2"))
    );
    assert_eq!(fleet.in_etcd("B").await.status, TaskStatus::Available);
}

#[tokio::test]
async fn a_hybrid_session_stays_on_git_while_the_coordinator_holds_no_tasks() {
    // The tester's report: hybrid agents on git moved to an etcd that came up empty (not yet
    // migrated), found their list gone, and left the board's tasks undone.
    let fleet = Fleet::new(&[]).await;
    let r = fleet.router(Mode::Hybrid);
    let _sub = r.subscribe().await.expect("subscribe");
    fleet.etcd.set_reachable(false);
    wait_serving(&r, Side::Fallback).await;
    let git = MemoryBackend::new(fleet.git.clone(), None);
    git.put(&tid("A"), &TaskPatch::default())
        .await
        .expect("put");
    fleet.etcd.set_reachable(true);
    // Many probe intervals: the empty coordinator answers all along, and is not served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(r.serving(), Side::Fallback);
    won(r.claim(&tid("A"), &sid("s1")).await.expect("claim on git"));
    // Migrated: the session returns, its git claim carried along.
    let etcd = MemoryBackend::new(fleet.etcd.clone(), None);
    etcd.put(&tid("A"), &TaskPatch::default())
        .await
        .expect("migrate");
    wait_serving(&r, Side::Primary).await;
    assert_eq!(
        face(&fleet.in_etcd("A").await),
        (TaskStatus::Claimed, Some("s1"))
    );
}

#[tokio::test]
async fn a_breached_objective_keeps_a_hybrid_session_on_git_until_it_is_lifted() {
    let f = Fleet::new(&["A", "B"]).await;
    let r = f.router(Mode::Hybrid);
    let s = sid("s1");
    // Every claim breaches this one, and no health check is ever within it.
    let strict = objective::Objective {
        claim_p95: Some(Duration::from_nanos(1)),
        success_rate: None,
        window: Duration::from_secs(60),
        min_claims: 1,
        recover_after: Duration::from_secs(3600),
    };
    r.set_objective(Some(strict.clone())).await;
    let claim = won(r.claim(&tid("A"), &s).await.expect("claim"));
    wait_serving(&r, Side::Fallback).await;
    let stats = r.stats();
    assert!(stats.slo_breached && stats.slo_to_git == 1, "{stats:?}");
    // The claim that breached it was carried to git with its session.
    assert_eq!(
        face(&f.in_git("A").await),
        (TaskStatus::Claimed, Some("s1"))
    );
    // The same objective again changes nothing; lifting it brings the session back.
    r.set_objective(Some(strict)).await;
    assert_eq!(r.serving(), Side::Fallback);
    r.set_objective(None).await;
    wait_serving(&r, Side::Primary).await;
    assert!(!r.stats().slo_breached);
    let released = r
        .release(&tid("A"), &s, ReleaseTo::Complete, Some(claim.token))
        .await
        .expect("release");
    assert!(
        matches!(released, ReleaseOutcome::Released { .. }),
        "{released:?}"
    );
}

#[test]
fn a_session_both_stores_list_is_shown_as_the_store_serving_it_says() {
    let at = |session: &str, backend: &str, task: &str| crate::Presence {
        backend: backend.into(),
        current_task: Some(tid(task)),
        ..presence_of(session)
    };
    let etcd = vec![
        at("hybrid-on-git", "git", "OLD"),
        at("on-etcd", "etcd", "E1"),
        at("only-etcd", "etcd", "E2"),
    ];
    let git = vec![
        at("hybrid-on-git", "git", "NOW"),
        at("on-etcd", "etcd", "STALE"),
        at("only-git", "git", "G1"),
    ];
    let merged = super::store::merge_sessions(etcd, git, "git");
    let shown: Vec<(String, String, String)> = merged
        .iter()
        .map(|p| {
            (
                p.session_id.to_string(),
                p.backend.clone(),
                p.current_task
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            )
        })
        .collect();
    let row = |s: &str, b: &str, t: &str| (s.to_owned(), b.to_owned(), t.to_owned());
    assert_eq!(
        shown,
        vec![
            row("hybrid-on-git", "git", "NOW"),
            row("on-etcd", "etcd", "E1"),
            row("only-etcd", "etcd", "E2"),
            row("only-git", "git", "G1"),
        ]
    );
}

#[tokio::test]
async fn a_change_while_the_first_snapshot_is_on_its_way_is_heard() {
    // The router registered its subscriber only after the snapshot's list came back: a
    // completion in between was heard by nobody, and an --until-done agent waited for good
    // (CI: an agent of `three_agents_complete_thirty_chained_tasks_exactly_once` ran past 120 s).
    let fleet = Fleet::new(&["A"]).await;
    let r = fleet.router(Mode::Coordinator);
    fleet.etcd.set_list_delay(Duration::from_millis(300));
    let subscribing = tokio::spawn(async move {
        let sub = r.subscribe().await.expect("subscribe");
        (r, sub)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = MemoryBackend::new(fleet.etcd.clone(), None);
    let claim = won(other.claim(&tid("A"), &sid("s9")).await.expect("claim"));
    other
        .release(
            &tid("A"),
            &sid("s9"),
            ReleaseTo::Complete,
            Some(claim.token),
        )
        .await
        .expect("release");
    let (_r, mut sub) = subscribing.await.expect("join");
    let in_snapshot = sub
        .snapshot
        .tasks
        .iter()
        .any(|t| t.status == TaskStatus::Complete);
    assert!(!in_snapshot, "the snapshot was read before the completion");
    let heard = eventually(Duration::from_secs(5), "the completion", || {
        let got = std::iter::from_fn(|| sub.try_next()).find(
            |e| matches!(e, BackendEvent::Task(t) if t.new_status == Some(TaskStatus::Complete)),
        );
        async move { got }
    })
    .await;
    assert!(matches!(heard, BackendEvent::Task(t) if t.task == tid("A")));
}
