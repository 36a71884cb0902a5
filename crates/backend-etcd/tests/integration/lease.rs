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
        read_as: None,
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
    let presence = presence_of(&s);
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

/// The presence of an agent of session `s` in this process.
fn presence_of(s: &SessionId) -> agent_core::Presence {
    agent_core::Presence {
        session_id: s.clone(),
        state: "idle".into(),
        current_task: None,
        backend: "etcd".into(),
        started_at: chrono::Utc::now(),
        pid: std::process::id(),
        host: agent_core::process::hostname(),
        version: "test".into(),
        heartbeat: None,
        claim_p95_us: None,
    }
}

/// `holder` claims `task` for `s` under a lease; returns the claim's token.
async fn claimed(holder: &impl Backend, task: &TaskId, s: &SessionId) -> agent_core::FencingToken {
    holder.put(task, &TaskPatch::default()).await.expect("put");
    match holder.claim(task, s).await.expect("claim") {
        ClaimOutcome::Won(c) => c.token,
        other => panic!("claim: {other:?}"),
    }
}

/// `holder`'s completion of `task` under `token` lands, and the task reads complete by `s`.
async fn completes(
    holder: &impl Backend,
    t: &TaskId,
    s: &SessionId,
    token: agent_core::FencingToken,
) {
    use agent_core::{ReleaseOutcome, ReleaseTo, TaskStatus};
    let out = holder
        .release(t, s, ReleaseTo::Complete, Some(token))
        .await
        .expect("release");
    assert_eq!(out, ReleaseOutcome::Released { token });
    let done = holder.get(t).await.expect("get").expect("task");
    assert_eq!(
        (done.status, done.claimed_by.as_ref()),
        (TaskStatus::Complete, Some(s))
    );
}

/// Ends the lease of `task`'s claim from outside and waits until the expired-claim repairer has
/// rewritten the record (it then names the lapsed claim).
async fn lapse_and_repair(raw: &mut etcd_client::Client, task: &TaskId) {
    let key = format!("claims/{task}");
    let lease = raw.get(key, None).await.expect("get").kvs()[0].lease();
    raw.lease_revoke(lease).await.expect("revoke");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let resp = raw.get(format!("tasks/{task}"), None).await.expect("get");
        let text = resp.kvs()[0].value_str().expect("utf8").to_owned();
        if text.contains("ifc_lapsed") {
            assert!(text.contains(r#""status":"available""#), "{text}");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never repaired: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_run_that_finished_while_its_lease_lapsed_completes_if_nobody_claimed_it_since() {
    // Seeds of the random generator: a run that finished while etcd was away longer than the TTL
    // had its completion refused, and the task ran again in full.
    use agent_core::{ReleaseOutcome, ReleaseTo, TaskStatus};
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    let holder = crate::backend(&server, true).await;
    let s = SessionId::parse("lapsed").expect("id");

    // The repaired record still names the claim: its holder completes the task.
    let t = TaskId::parse("LAPSED-DONE").expect("id");
    let token = claimed(&holder, &t, &s).await;
    lapse_and_repair(&mut raw, &t).await;
    completes(&holder, &t, &s, token).await;
    let text = raw.get("tasks/LAPSED-DONE", None).await.expect("get").kvs()[0]
        .value_str()
        .expect("utf8")
        .to_owned();
    assert!(!text.contains("ifc_lapsed"), "{text}");

    // Another process of the same session id, with the same token: not the process that ran it.
    let t = TaskId::parse("LAPSED-ELSEWHERE").expect("id");
    let token = claimed(&holder, &t, &s).await;
    lapse_and_repair(&mut raw, &t).await;
    let other = crate::backend(&server, false).await;
    let out = other
        .release(&t, &s, ReleaseTo::Complete, Some(token))
        .await
        .expect("release");
    assert_eq!(out, ReleaseOutcome::NotHolder { holder: None });
    // Unless it is the session's registered agent now (a restart reporting the run its killed
    // predecessor finished, after that one's lease ran out): then nobody else runs the session.
    assert_eq!(
        other
            .register(&presence_of(&s), false)
            .await
            .expect("register"),
        None
    );
    completes(&other, &t, &s, token).await;

    // An operator's write since (a new title) is somebody's word on the task: refused.
    let t = TaskId::parse("LAPSED-EDITED").expect("id");
    let token = claimed(&holder, &t, &s).await;
    lapse_and_repair(&mut raw, &t).await;
    let retitle = TaskPatch {
        title: Some("edited".into()),
        ..TaskPatch::default()
    };
    holder.put(&t, &retitle).await.expect("put");
    let out = holder
        .release(&t, &s, ReleaseTo::Complete, Some(token))
        .await
        .expect("release");
    assert_eq!(out, ReleaseOutcome::NotHolder { holder: None });
    let t_now = holder.get(&t).await.expect("get").expect("task");
    assert_eq!(t_now.status, TaskStatus::Available);
}

#[tokio::test]
async fn a_claim_that_outlived_a_lost_keep_alive_is_still_its_process_to_complete() {
    // etcd down longer than the TTL, then back: the session's keep-alive gave up and the session
    // took a new lease (its presence is published again), while etcd, restarted, kept the old
    // lease and the claim under it. The finished run's completion was refused ("not holder":
    // another lease), and the task ran again.
    let mut server = EtcdServer::start();
    let holder = crate::backend(&server, true).await;
    let s = SessionId::parse("outlived").expect("id");
    let presence = presence_of(&s);
    assert_eq!(
        holder.register(&presence, false).await.expect("register"),
        None
    );
    let t = TaskId::parse("OUTLIVED").expect("id");
    let token = claimed(&holder, &t, &s).await;
    let mut raw = crate::raw_client(&server).await;
    let old = raw.get("claims/OUTLIVED", None).await.expect("get").kvs()[0].lease();
    server.kill();
    tokio::time::sleep(crate::TTL * 2).await;
    server.restart();
    let mut raw = crate::raw_client(&server).await;
    // The session takes a new lease for its presence; the claim stays under the old one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let kvs = raw.get("sessions/outlived", None).await.expect("get");
        if kvs.kvs().first().is_some_and(|kv| kv.lease() != old) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no new lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let claim = raw.get("claims/OUTLIVED", None).await.expect("get");
    assert_eq!(
        claim.kvs().first().map(|kv| kv.lease()),
        Some(old),
        "etcd kept the claim under its old lease"
    );
    completes(&holder, &t, &s, token).await;
}

/// The pid of a process that has exited (on this host).
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = child.id();
    child.wait().expect("reap");
    pid
}

#[tokio::test]
async fn a_restart_after_a_restart_that_died_too_takes_on_the_first_processs_claims() {
    // Seed 390000023: an agent killed, its restart killed too before it had reported the run the
    // first one finished. The second restart took on only the first restart's lease: the first
    // process's claim ran out, another session claimed the task and ran it again. A presence
    // lists the leases its process inherited, and the next registration takes them on too.
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    let s = SessionId::parse("twice-killed").expect("id");
    let with_pid = |pid| agent_core::Presence {
        pid,
        ..presence_of(&s)
    };
    let first = crate::backend(&server, false).await;
    assert_eq!(
        first
            .register(&with_pid(dead_pid()), false)
            .await
            .expect("register"),
        None
    );
    let t = TaskId::parse("TWICE").expect("id");
    let token = claimed(&first, &t, &s).await;
    let lease = raw.get("claims/TWICE", None).await.expect("get").kvs()[0].lease();

    let second = crate::backend(&server, false).await;
    assert_eq!(
        second
            .register(&with_pid(dead_pid()), false)
            .await
            .expect("register"),
        None
    );
    let text = raw
        .get("sessions/twice-killed", None)
        .await
        .expect("get")
        .kvs()[0]
        .value_str()
        .expect("utf8")
        .to_owned();
    assert!(
        text.contains(&lease.to_string()),
        "the presence lists the inherited lease: {text}"
    );

    let third = crate::backend(&server, false).await;
    assert_eq!(
        third
            .register(&presence_of(&s), false)
            .await
            .expect("register"),
        None
    );
    completes(&third, &t, &s, token).await;
    third.end_inherited().await.expect("end inherited");
    let ttl = raw.lease_time_to_live(lease, None).await.expect("ttl");
    assert!(ttl.ttl() <= 0, "the first process's lease ended: {ttl:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_refresh_that_changes_nothing_writes_nothing_and_one_that_does_writes() {
    // Every agent refreshes its presence every few seconds: written each time, 100 idle agents
    // kept etcd at 13 % of a core.
    let server = EtcdServer::start();
    let b = crate::backend(&server, false).await;
    let mut raw = crate::raw_client(&server).await;
    let s = agent_core::testing::sid("refresher");
    let mut presence = presence_of(&s);
    b.register(&presence, false).await.expect("register");
    let revision = |raw: &mut etcd_client::Client| {
        let mut raw = raw.clone();
        async move {
            raw.get("sessions/refresher", None)
                .await
                .expect("get")
                .kvs()[0]
                .mod_revision()
        }
    };
    let first = revision(&mut raw).await;
    for _ in 0..3 {
        b.announce(&presence).await.expect("announce");
    }
    assert_eq!(
        revision(&mut raw).await,
        first,
        "the same presence is not written again"
    );
    presence.state = "working".into();
    b.announce(&presence).await.expect("announce");
    let second = revision(&mut raw).await;
    assert!(second > first, "a changed presence is written");
    // Gone from etcd (an operator's delete): the next refresh writes it back.
    raw.delete("sessions/refresher", None)
        .await
        .expect("delete");
    b.announce(&presence).await.expect("announce");
    assert!(revision(&mut raw).await > second, "written back");
}
