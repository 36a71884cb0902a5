//! Session leases: a live session keeps its claims however long it holds them; only a session
//! that stops renewing loses them.

use std::time::Duration;

use agent_core::{Backend, BackendEvent, ClaimOutcome, SessionId, TaskId, TaskPatch};
use backend_etcd::testing::EtcdServer;

#[tokio::test]
async fn a_live_session_keeps_its_claim_for_many_ttls_under_one_lease() {
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    let holder = crate::backend(&server, true).await;
    let other = crate::backend(&server, true).await;
    let (task, s) = (
        TaskId::parse("KEEP").expect("id"),
        SessionId::parse("keeper").expect("id"),
    );
    holder.put(&task, &TaskPatch::default()).await.expect("put");
    let mut sub = holder.subscribe().await.expect("subscribe");
    assert!(matches!(
        holder.claim(&task, &s).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    let lease = raw.get("claims/KEEP", None).await.expect("get").kvs()[0].lease();
    tokio::time::sleep(crate::TTL * 4).await;

    let kvs = raw.get("claims/KEEP", None).await.expect("get");
    let now = kvs.kvs().first().map(|kv| kv.lease());
    assert_eq!(
        now,
        Some(lease),
        "the claim key is still there, under the same lease"
    );
    let ttl = raw.lease_time_to_live(lease, None).await.expect("ttl");
    assert!(ttl.ttl() > 0, "etcd still has the lease: {ttl:?}");
    let out = other
        .claim(&task, &SessionId::parse("other").expect("id"))
        .await
        .expect("claim");
    assert!(matches!(out, ClaimOutcome::Lost { .. }), "{out:?}");
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
        assert!(
            !matches!(ev, BackendEvent::ClaimLost { .. }),
            "the holder was told its claim is lost: {ev:?}"
        );
    }
}

#[tokio::test]
async fn a_completion_of_an_old_claim_carried_late_does_not_end_a_reopening() {
    // Seed 60000054: a session completed its etcd claim on git during an outage; an operator
    // reopened the task in etcd; the session's return carried its old completion over the
    // reopening, and the task read complete by it again although another session had redone it.
    use agent_core::{FencingToken, Mirrored, RecordOutcome, TaskStatus};
    let server = EtcdServer::start();
    let b = crate::backend(&server, true).await;
    let (task, s) = (
        TaskId::parse("REOPENED").expect("id"),
        SessionId::parse("returning").expect("id"),
    );
    b.put(&task, &TaskPatch::default()).await.expect("put");
    let token = match b.claim(&task, &s).await.expect("claim") {
        ClaimOutcome::Won(c) => c.token,
        other => panic!("{other:?}"),
    };
    let late = |token: Option<FencingToken>| Mirrored {
        task: task.clone(),
        status: TaskStatus::Complete,
        holder: Some(s.clone()),
        token,
    };
    // The bridge carries the completion from git first, then the operator reopens the task.
    let out = b.record(&[late(None)]).await.expect("record");
    assert_eq!(out, [RecordOutcome::Written]);
    let reopen = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    assert_eq!(
        b.put(&task, &reopen).await.expect("reopen"),
        agent_core::PutOutcome::Updated
    );
    let out = b.record(&[late(Some(token))]).await.expect("record");
    assert!(matches!(out[..], [RecordOutcome::Kept { .. }]), "{out:?}");
    assert_eq!(
        b.get(&task).await.expect("get").expect("task").status,
        TaskStatus::Available
    );
    // A completion that names no etcd claim (done on git alone) is carried as before.
    let out = b.record(&[late(None)]).await.expect("record");
    assert_eq!(out, [RecordOutcome::Written]);
}

#[tokio::test]
async fn an_idle_session_whose_lease_was_lost_is_listed_again() {
    // Issue 15 #7: an idle agent whose lease lapsed (etcd paused past the TTL) vanished from
    // `ifc status` until its next claim, though it ran.
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    let b = crate::backend(&server, true).await;
    let observer = crate::backend(&server, true).await;
    let s = SessionId::parse("idle-one").expect("id");
    let presence = agent_core::Presence {
        session_id: s.clone(),
        state: "idle".into(),
        current_task: None,
        backend: "etcd".into(),
        started_at: chrono::Utc::now(),
        pid: std::process::id(),
        host: agent_core::process::hostname(),
        version: "test".into(),
    };
    assert_eq!(b.register(&presence, false).await.expect("register"), None);
    let lease = raw.get("sessions/idle-one", None).await.expect("get").kvs()[0].lease();
    raw.lease_revoke(lease).await.expect("revoke");
    let listed = || async {
        observer
            .sessions()
            .await
            .expect("sessions")
            .iter()
            .any(|p| p.session_id == s)
    };
    assert!(!listed().await, "gone with its lease");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !listed().await {
        assert!(tokio::time::Instant::now() < deadline, "never listed again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = raw.get("sessions/idle-one", None).await.expect("get").kvs()[0].lease();
    assert_ne!(now, lease, "under a new lease");
}
