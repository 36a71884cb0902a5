//! Subscriptions to an interest on a real etcd: a subscriber hears exactly what its interest
//! covers, and one that falls more than its queue's bound behind starts again from a fresh
//! snapshot, then hears what follows.

use std::time::Duration;

use agent_core::config::TaskPattern;
use agent_core::testing::{sid, tid};
use agent_core::{Backend, BackendEvent, Interest, TaskPatch, TaskStatus};
use backend_etcd::testing::EtcdServer;
use backend_etcd::EtcdConfig;

const WAIT: Duration = Duration::from_secs(10);

fn interest(patterns: &[&str]) -> Interest {
    Interest::tasks(
        patterns
            .iter()
            .map(|p| TaskPattern::parse(p).expect("valid"))
            .collect(),
    )
}

fn status(s: TaskStatus) -> TaskPatch {
    TaskPatch {
        status: Some(s),
        ..TaskPatch::default()
    }
}

/// Reads `sub` until an event of `task` (every task event before it returned, in order).
async fn until(sub: &mut agent_core::Subscription, task: &str) -> Vec<String> {
    until_event(sub, task, |e| e.task.as_str() == task).await
}

/// Reads `sub` until a task event that is `wanted` (the task events up to it, in order).
async fn until_event(
    sub: &mut agent_core::Subscription,
    task: &str,
    wanted: impl Fn(&agent_core::TaskEvent) -> bool,
) -> Vec<String> {
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match sub.next().await {
                Some(BackendEvent::Task(e)) => {
                    seen.push(e.task.to_string());
                    if wanted(&e) {
                        return;
                    }
                }
                Some(_) => {}
                None => panic!("subscription ended"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no such event of {task}; saw {seen:?}"));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_hears_exactly_what_its_interest_covers() {
    let server = EtcdServer::start();
    let writer = crate::backend(&server, false).await;
    let client = crate::backend(&server, false).await;
    let blocked_by = |b: &str| TaskPatch {
        blocked_by: Some(vec![tid(b)]),
        ..TaskPatch::default()
    };
    writer
        .put(&tid("A.1"), &blocked_by("B.1"))
        .await
        .expect("put");
    writer
        .put(&tid("B.1"), &status(TaskStatus::Available))
        .await
        .expect("put");
    writer
        .put(&tid("X.1"), &status(TaskStatus::Available))
        .await
        .expect("put");
    let mut mine = client
        .subscribe_to(&interest(&["A.*"]))
        .await
        .expect("subscribe");
    let mut all = client.subscribe().await.expect("subscribe");
    let listed: Vec<&str> = mine.snapshot.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(listed, ["A.1", "B.1"]);
    let s = sid("s1");
    for t in ["X.1", "B.1", "A.2", "X.2"] {
        if t.ends_with(".1") {
            client.claim(&tid(t), &s).await.expect("claim");
        } else {
            writer
                .put(&tid(t), &status(TaskStatus::Available))
                .await
                .expect("put");
        }
    }
    // A.1 now also waits for X.2: X.2 is covered from then on, X.1 never.
    writer
        .put(
            &tid("A.1"),
            &TaskPatch {
                blocked_by: Some(vec![tid("B.1"), tid("X.2")]),
                ..TaskPatch::default()
            },
        )
        .await
        .expect("put");
    writer
        .put(&tid("X.2"), &status(TaskStatus::Complete))
        .await
        .expect("put");
    client
        .release(&tid("X.1"), &s, agent_core::ReleaseTo::Available, None)
        .await
        .expect("release");
    writer
        .put(&tid("Z.END"), &status(TaskStatus::Available))
        .await
        .expect("put");
    let everything = until(&mut all, "Z.END").await;
    assert_eq!(everything.len(), 8, "{everything:?}");
    assert_eq!(until(&mut mine, "X.2").await, ["B.1", "A.2", "A.1", "X.2"]);
    // Everything after was heard by the other subscriber of this client: none of it is here.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(mine.try_next().is_none(), "X.1 and Z.END are not covered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_starts_again_from_a_fresh_snapshot() {
    let server = EtcdServer::start();
    let writer = crate::backend(&server, false).await;
    let client = crate::backend_with(
        EtcdConfig {
            event_queue_bound: 20,
            ..server.config()
        },
        false,
    )
    .await;
    let mut slow = client
        .subscribe_to(&interest(&["S.*"]))
        .await
        .expect("subscribe");
    // Another subscriber reads as the events come, and keeps up.
    let mut keeping_up = client
        .subscribe_to(&interest(&["S.*"]))
        .await
        .expect("subscribe");
    let reader = tokio::spawn(async move {
        let seen = until(&mut keeping_up, "S.49").await;
        (seen, keeping_up)
    });
    for i in 0..50 {
        writer
            .put(&tid(&format!("S.{i:02}")), &status(TaskStatus::Available))
            .await
            .expect("put");
    }
    let (seen, mut keeping_up) = reader.await.expect("reader");
    assert_eq!(seen.len(), 50, "{seen:?}");
    assert_eq!(client.resyncs(), 1, "the slow one, once");
    // The slow subscriber: the 20 events it had, nothing of what it missed, then the board.
    let mut events = Vec::new();
    let snapshot = tokio::time::timeout(WAIT, async {
        loop {
            match slow.next().await {
                Some(BackendEvent::Resync(listing)) => return listing,
                Some(BackendEvent::Task(e)) => events.push(e.task.to_string()),
                Some(_) => {}
                None => panic!("subscription ended"),
            }
        }
    })
    .await
    .expect("a resync");
    assert!(events.len() <= 20, "{events:?}");
    assert_eq!(snapshot.tasks.len(), 50);
    // And what comes after it.
    client.claim(&tid("S.07"), &sid("s1")).await.expect("claim");
    assert_eq!(until(&mut slow, "S.07").await, ["S.07"]);
    assert_eq!(until(&mut keeping_up, "S.07").await, ["S.07"]);
}

/// Reads `sub` until `task` is heard `complete` (returns the task events before, in order).
async fn until_complete(sub: &mut agent_core::Subscription, task: &str) -> Vec<String> {
    until_event(sub, task, |e| {
        e.task.as_str() == task && e.new_status == Some(TaskStatus::Complete)
    })
    .await
}

/// A new client, subscribed to `patterns`.
async fn subscribed(
    server: &EtcdServer,
    patterns: &[&str],
) -> (backend_etcd::EtcdBackend, agent_core::Subscription) {
    let client = crate::backend(server, false).await;
    let sub = client
        .subscribe_to(&interest(patterns))
        .await
        .expect("subscribe");
    (client, sub)
}

fn record(id: &str, status: &str, blocked_by: &[&str]) -> String {
    serde_json::json!({
        "task_id": id, "status": status, "claimed_by": null, "claimed_at": null,
        "blocked_by": blocked_by,
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_mirrors_what_its_subscription_covers_and_blockers_that_join_it() {
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    let writer = crate::backend(&server, false).await;
    let available = status(TaskStatus::Available);
    for i in 0..200 {
        let id = tid(&format!("X.{i:03}"));
        writer.put(&id, &available).await.expect("put");
    }
    for (id, blocked_by) in [
        ("A.1", &["B.1"][..]),
        ("B.1", &["C.1"]),
        ("C.1", &[]),
        ("Y.1", &["Y.2"]),
        ("Y.2", &[]),
    ] {
        raw.put(
            format!("tasks/{id}"),
            record(id, "available", blocked_by),
            None,
        )
        .await
        .expect("put");
    }
    let (client, mut sub) = subscribed(&server, &["A.*"]).await;
    assert_eq!(client.cached_tasks(), 3, "A.1 and its chain, none of X.*");

    // A.1 names Y.1 in the transaction that completes Y.1: the informer hears Y.1's change
    // before Y.1 is in its scope, and must not lose it. Y.2 joins with Y.1, and completes next.
    let txn = etcd_client::Txn::new().and_then([
        etcd_client::TxnOp::put(
            "tasks/A.1",
            record("A.1", "available", &["B.1", "Y.1"]),
            None,
        ),
        etcd_client::TxnOp::put("tasks/Y.1", record("Y.1", "complete", &["Y.2"]), None),
    ]);
    raw.txn(txn).await.expect("txn");
    writer
        .put(&tid("Y.2"), &status(TaskStatus::Complete))
        .await
        .expect("put");
    let heard = until_complete(&mut sub, "Y.1").await;
    assert!(heard.contains(&"A.1".to_owned()), "{heard:?}");
    until_complete(&mut sub, "Y.2").await;

    // The chain clears; the client's claim of A.1 is decided on what it mirrors.
    for t in ["C.1", "B.1"] {
        writer
            .put(&tid(t), &status(TaskStatus::Complete))
            .await
            .expect("put");
    }
    until_complete(&mut sub, "B.1").await;
    let won = client.claim(&tid("A.1"), &sid("s1")).await.expect("claim");
    assert!(matches!(won, agent_core::ClaimOutcome::Won(_)), "{won:?}");

    // The board grows elsewhere; what the client keeps does not.
    for i in 200..300 {
        let id = tid(&format!("X.{i:03}"));
        writer.put(&id, &available).await.expect("put");
    }
    writer.put(&tid("A.2"), &available).await.expect("put");
    until(&mut sub, "A.2").await;
    assert_eq!(client.cached_tasks(), 6, "A.1, A.2, B.1, C.1, Y.1, Y.2");
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Some(e) = sub.try_next() {
        if let BackendEvent::Task(e) = e {
            assert!(!e.task.as_str().starts_with('X'), "{e:?}");
        }
    }

    // Another subscription of every task: the cache widens to the board.
    let all = client.subscribe().await.expect("subscribe");
    assert_eq!(all.snapshot.tasks.len(), 306);
    assert_eq!(client.cached_tasks(), 306);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_outside_what_the_client_mirrors_is_still_watched_for_its_loss() {
    let server = EtcdServer::start();
    let writer = crate::backend(&server, false).await;
    for t in ["A.1", "X.1"] {
        writer
            .put(&tid(t), &status(TaskStatus::Available))
            .await
            .expect("put");
    }
    let (client, mut sub) = subscribed(&server, &["A.*"]).await;
    assert_eq!(client.cached_tasks(), 1);
    let won = client.claim(&tid("X.1"), &sid("s1")).await.expect("claim");
    assert!(matches!(won, agent_core::ClaimOutcome::Won(_)), "{won:?}");
    // An operator deletes the claimed task: its holder is told.
    let deleted = writer.delete(&tid("X.1"), true).await.expect("delete");
    assert_eq!(deleted, backend_etcd::Deleted::Deleted);
    let lost = tokio::time::timeout(WAIT, async {
        loop {
            match sub.next().await {
                Some(BackendEvent::ClaimLost { task, .. }) => return task,
                Some(_) => {}
                None => panic!("subscription ended"),
            }
        }
    })
    .await
    .expect("the holder hears that its claim is gone");
    assert_eq!(lost, tid("X.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_waits_for_many_tasks_outside_it_is_read_within_etcds_limits() {
    // etcd refuses a transaction of more than 128 operations: an agent whose list waited for
    // 70 tasks outside it never started (tester helper-9).
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    let outside: Vec<String> = (0..100).map(|i| format!("B.{i:03}")).collect();
    for b in &outside {
        raw.put(format!("tasks/{b}"), record(b, "complete", &[]), None)
            .await
            .expect("put");
    }
    for (i, b) in outside.iter().take(70).enumerate() {
        let a = format!("A.{i:03}");
        raw.put(format!("tasks/{a}"), record(&a, "available", &[b]), None)
            .await
            .expect("put");
    }
    let all: Vec<&str> = outside.iter().map(String::as_str).collect();
    raw.put("tasks/C.1", record("C.1", "available", &all), None)
        .await
        .expect("put");
    let (client, sub) = subscribed(&server, &["A.*", "C.*"]).await;
    assert_eq!(sub.snapshot.tasks.len(), 171);
    assert_eq!(client.cached_tasks(), 171);
    for t in ["A.069", "C.1"] {
        let won = client.claim(&tid(t), &sid("s1")).await.expect("claim");
        assert!(
            matches!(won, agent_core::ClaimOutcome::Won(_)),
            "{t}: {won:?}"
        );
    }
    // A claim decided on a fresh read (another client, no cache) reads them too.
    let other = crate::backend(&server, false).await;
    let lost = other.claim(&tid("C.1"), &sid("s2")).await.expect("claim");
    assert!(
        matches!(lost, agent_core::ClaimOutcome::Lost { .. }),
        "{lost:?}"
    );
    let won = other.claim(&tid("A.000"), &sid("s2")).await.expect("claim");
    assert!(matches!(won, agent_core::ClaimOutcome::Won(_)), "{won:?}");
    // More blockers than a claim's one transaction can compare are refused up front.
    let mut too_many: Vec<_> = outside.iter().map(|b| tid(b)).collect();
    too_many.push(tid("A.000"));
    let refused = other
        .put(
            &tid("C.2"),
            &TaskPatch {
                blocked_by: Some(too_many),
                ..TaskPatch::default()
            },
        )
        .await;
    assert!(
        matches!(&refused, Err(agent_core::BackendError::InvalidInput(m)) if m.contains("at most 100")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_list_that_etcd_refuses_says_why_not_only_that_it_timed_out() {
    // With `--max-txn-ops 1` etcd refuses the read of a blocker outside the list.
    let server = EtcdServer::start_with(&["--max-txn-ops", "1"]);
    let mut raw = crate::raw_client(&server).await;
    raw.put("tasks/A.1", record("A.1", "available", &["B.1"]), None)
        .await
        .expect("put");
    raw.put("tasks/B.1", record("B.1", "available", &[]), None)
        .await
        .expect("put");
    let client = crate::backend(&server, false).await;
    let failed = client.subscribe_to(&interest(&["A.*"])).await;
    let Err(e) = failed else {
        panic!("the list cannot succeed")
    };
    assert!(
        e.to_string().contains("too many operations in txn request"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waiting_for_a_hundred_archived_tasks_is_claimable() {
    // An archived blocker cost a claim two compares: 64 of them overflowed etcd's 128 (tester
    // helper-10).
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    let client = crate::backend(&server, false).await;
    let done: Vec<String> = (0..100).map(|i| format!("H.{i:03}")).collect();
    for h in &done {
        raw.put(format!("tasks/{h}"), record(h, "complete", &[]), None)
            .await
            .expect("put");
        let archived = client.archive(&tid(h)).await.expect("archive");
        assert_eq!(archived, backend_etcd::Archived::Archived);
    }
    client
        .put(
            &tid("N.1"),
            &TaskPatch {
                blocked_by: Some(done.iter().map(|h| tid(h)).collect()),
                ..TaskPatch::default()
            },
        )
        .await
        .expect("put");
    let won = client.claim(&tid("N.1"), &sid("s1")).await.expect("claim");
    assert!(matches!(won, agent_core::ClaimOutcome::Won(_)), "{won:?}");
}
