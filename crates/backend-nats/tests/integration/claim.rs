//! Claims of a subscribed client, which are decided from its watch's board when it says the
//! task may be taken: a board that is behind the store never wins a task someone else holds.

use std::time::Duration;

use agent_core::testing::{sid, tid};
use agent_core::{Backend, ClaimOutcome, TaskPatch, TaskStatus};
use backend_nats::testing::NatsServer;
use backend_nats::NatsBackend;

const TTL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_behind_the_store_loses_to_the_claim_it_has_not_heard_of() {
    let server = NatsServer::start();
    let connect = || NatsBackend::connect(server.config(Some(TTL)));
    let (a, b) = (connect().await.expect("a"), connect().await.expect("b"));
    let patch = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    let ids: Vec<String> = (0..50).map(|i| format!("R.{i}")).collect();
    for id in &ids {
        b.put(&tid(id), &patch).await.expect("put");
    }
    // `a` holds a board of every task, each available.
    let sub = a.subscribe().await.expect("subscribe");
    assert_eq!(sub.snapshot.tasks.len(), ids.len());
    for id in &ids {
        let won = b.claim(&tid(id), &sid("b")).await.expect("claim");
        assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
        // At once: `a`'s board has most likely not heard of it yet.
        let out = a.claim(&tid(id), &sid("a")).await.expect("claim");
        assert_eq!(
            out,
            ClaimOutcome::Lost {
                holder: Some(sid("b"))
            },
            "{id}"
        );
    }
    drop(sub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribed_client_wins_free_tasks_and_its_tokens_rise() {
    let server = NatsServer::start();
    let a = NatsBackend::connect(server.config(Some(TTL)))
        .await
        .expect("connect");
    let patch = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    for i in 0..20 {
        a.put(&tid(&format!("F.{i}")), &patch).await.expect("put");
    }
    let _sub = a.subscribe().await.expect("subscribe");
    let mut last = 0;
    for i in 0..20 {
        let id = tid(&format!("F.{i}"));
        let ClaimOutcome::Won(claim) = a.claim(&id, &sid("a")).await.expect("claim") else {
            panic!("F.{i} was free");
        };
        assert!(claim.token.0 > last);
        last = claim.token.0;
        let stored = a.get(&id).await.expect("get").expect("there");
        assert_eq!(
            (stored.status, stored.claimed_by),
            (TaskStatus::Claimed, Some(sid("a")))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_completion_of_a_claim_is_not_written_over_a_reopen() {
    use agent_core::{Mirrored, RecordOutcome, ReleaseTo};
    let server = NatsServer::start();
    let a = NatsBackend::connect(server.config(Some(TTL)))
        .await
        .expect("connect");
    let t = tid("REOPENED");
    let available = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    a.put(&t, &available).await.expect("put");
    let ClaimOutcome::Won(claim) = a.claim(&t, &sid("s")).await.expect("claim") else {
        panic!("free task");
    };
    a.release(&t, &sid("s"), ReleaseTo::Complete, Some(claim.token))
        .await
        .expect("release");
    // An operator reopens it; then the completion of the old claim arrives from git, late.
    a.put(&t, &available).await.expect("reopen");
    let late = Mirrored {
        task: t.clone(),
        status: TaskStatus::Complete,
        holder: Some(sid("s")),
        token: Some(claim.token),
        read_as: None,
    };
    let out = a.record(&[late]).await.expect("record");
    assert!(matches!(out[..], [RecordOutcome::Kept { .. }]), "{out:?}");
    let now = a.get(&t).await.expect("get").expect("there");
    assert_eq!(now.status, TaskStatus::Available, "the reopen stands");
}

/// A renewal that landed but whose answer was lost leaves the client's idea of the lease's last
/// sequence behind; its next renewal must find the lease alive, not give its claims up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_answer_was_lost_does_not_end_the_lease() {
    use agent_core::BackendEvent;
    let server = NatsServer::start();
    let a = NatsBackend::connect(server.config(Some(TTL)))
        .await
        .expect("connect");
    let t = tid("KEPT");
    a.put(
        &t,
        &TaskPatch {
            status: Some(TaskStatus::Available),
            ..TaskPatch::default()
        },
    )
    .await
    .expect("put");
    let mut sub = a.subscribe().await.expect("subscribe");
    let won = a.claim(&t, &sid("a")).await.expect("claim");
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    let lease = a.lease_of(&t).await.expect("read").expect("leased");
    // What a's own renewal would write, written behind its back.
    let raw = async_nats::jetstream::new(async_nats::connect(server.url()).await.expect("raw"));
    let kv = raw.get_key_value("ifc").await.expect("bucket");
    let key = format!("leases.{lease}");
    let rev = kv
        .entry(&key)
        .await
        .expect("entry")
        .expect("there")
        .revision;
    kv.update(&key, "{}".into(), rev).await.expect("renew");
    // Two TTLs: a's keeper renews several times meanwhile, the first one from a stale sequence.
    let lost = tokio::time::timeout(TTL * 2, async {
        loop {
            match sub.next().await {
                Some(BackendEvent::ClaimLost { task, .. }) if task == t => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(!lost, "the claim was given up");
    let now = a.get(&t).await.expect("get").expect("there");
    assert_eq!(
        (now.status, now.claimed_by),
        (TaskStatus::Claimed, Some(sid("a")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_refuses_a_held_task_and_a_blocker_unless_forced() {
    use task_record::Deleted;
    let server = NatsServer::start();
    let a = NatsBackend::connect(server.config(Some(TTL)))
        .await
        .expect("connect");
    let put = |id: &'static str, blockers: Vec<&'static str>| {
        let a = &a;
        async move {
            let patch = TaskPatch {
                status: Some(TaskStatus::Available),
                blocked_by: Some(blockers.into_iter().map(tid).collect()),
                ..TaskPatch::default()
            };
            a.put(&tid(id), &patch).await.expect("put");
        }
    };
    put("B", vec![]).await;
    put("W", vec!["B"]).await;
    put("H", vec![]).await;
    assert!(matches!(
        a.claim(&tid("H"), &sid("s")).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    assert_eq!(
        a.delete(&tid("B"), false).await.expect("delete"),
        Deleted::Blocks {
            dependents: vec![tid("W")]
        }
    );
    assert_eq!(
        a.delete(&tid("H"), false).await.expect("delete"),
        Deleted::Held {
            holder: Some(sid("s"))
        }
    );
    assert!(a.get(&tid("B")).await.expect("get").is_some(), "kept");
    assert!(a.get(&tid("H")).await.expect("get").is_some(), "kept");
    assert_eq!(
        a.delete(&tid("W"), false).await.expect("delete"),
        Deleted::Deleted
    );
    assert_eq!(
        a.delete(&tid("B"), false).await.expect("delete"),
        Deleted::Deleted
    );
    assert_eq!(
        a.delete(&tid("H"), true).await.expect("delete"),
        Deleted::Deleted
    );
    assert_eq!(
        a.delete(&tid("H"), false).await.expect("delete"),
        Deleted::NotFound
    );
    assert!(a.list().await.expect("list").tasks.is_empty());
}

/// A one-shot command's claim (`ifc claim --ttl`: a client that registered no session) is its
/// session's to end from any later command, while its lease lives; an agent's is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_claim_is_released_by_a_later_command_of_its_session() {
    use agent_core::{Presence, ReleaseOutcome, ReleaseTo};
    let server = NatsServer::start();
    let connect = || NatsBackend::connect(server.config(Some(Duration::from_secs(30))));
    let setup = connect().await.expect("connect");
    for id in ["ONE", "AGENT"] {
        let patch = TaskPatch {
            status: Some(TaskStatus::Available),
            ..TaskPatch::default()
        };
        setup.put(&tid(id), &patch).await.expect("put");
    }
    {
        let one_shot = connect().await.expect("connect");
        let won = one_shot
            .claim(&tid("ONE"), &sid("me"))
            .await
            .expect("claim");
        assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    } // the command exits; its lease lives on for its TTL
    let later = connect().await.expect("connect");
    let out = later
        .release(&tid("ONE"), &sid("me"), ReleaseTo::Complete, None)
        .await
        .expect("release");
    assert!(matches!(out, ReleaseOutcome::Released { .. }), "{out:?}");
    // An agent's claim (its client registered the session) stays its own.
    let agent = connect().await.expect("connect");
    let presence = Presence {
        session_id: sid("agent"),
        state: "working".into(),
        current_task: None,
        backend: "nats".into(),
        started_at: chrono::Utc::now(),
        pid: std::process::id(),
        host: agent_core::process::hostname(),
        version: "test".into(),
        heartbeat: None,
        claim_p95_us: None,
    };
    assert_eq!(
        agent.register(&presence, false).await.expect("register"),
        None
    );
    let won = agent
        .claim(&tid("AGENT"), &sid("agent"))
        .await
        .expect("claim");
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    let out = later
        .release(&tid("AGENT"), &sid("agent"), ReleaseTo::Complete, None)
        .await
        .expect("release");
    assert!(matches!(out, ReleaseOutcome::NotHolder { .. }), "{out:?}");
}
