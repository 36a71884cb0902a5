//! Watch resilience: etcd restarted under a live subscriber, and compaction past a subscriber
//! that was cut off. No transition lost or delivered twice.

use std::time::Duration;

use agent_core::testing::{sid, tid};
use agent_core::{
    Backend, BackendEvent, ClaimOutcome, ReleaseTo, TaskEvent, TaskId, TaskPatch, TaskStatus,
};
use backend_etcd::testing::{EtcdServer, TcpProxy};
use backend_etcd::EtcdConfig;

/// Collects task events until `done` says the list is complete (or panics after `limit`).
async fn collect(
    sub: &mut agent_core::Subscription,
    limit: Duration,
    done: impl Fn(&[TaskEvent]) -> bool,
) -> Vec<TaskEvent> {
    let mut seen = Vec::new();
    let result = tokio::time::timeout(limit, async {
        while !done(&seen) {
            match sub.next().await {
                Some(BackendEvent::Task(e)) => seen.push(e),
                Some(_) => {}
                None => panic!("subscription ended"),
            }
        }
    })
    .await;
    assert!(result.is_ok(), "timed out; saw {seen:#?}");
    seen
}

/// A backend that reaches `server` only through a proxy the test controls, with frequent
/// progress requests.
async fn watcher_behind_proxy(server: &EtcdServer) -> (TcpProxy, backend_etcd::EtcdBackend) {
    let proxy = TcpProxy::start(server.addr()).await;
    let via_proxy = EtcdConfig {
        endpoints: vec![proxy.endpoint()],
        watch_progress_interval: Duration::from_millis(300),
        ..server.config()
    };
    let watcher = crate::backend_with(via_proxy, false).await;
    (proxy, watcher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_survives_an_etcd_restart_without_losing_or_repeating_events() {
    let mut server = EtcdServer::start();
    let watcher = crate::backend(&server, false).await;
    let mut sub = watcher.subscribe().await.expect("subscribe");
    let ids: Vec<TaskId> = (0..4).map(|i| tid(&format!("R-{i}"))).collect();
    {
        let writer = crate::backend(&server, false).await;
        writer
            .put(&ids[0], &TaskPatch::default())
            .await
            .expect("put");
    }
    let first = collect(&mut sub, Duration::from_secs(10), |s| !s.is_empty()).await;
    assert_eq!(first[0].task, ids[0]);

    server.restart();
    // Transitions after the restart, through a new client.
    let writer = crate::backend(&server, false).await;
    let s = sid("s");
    let expected = agent_core::testing::create_claim_complete(&writer, &ids[1..], &s).await;
    let n = expected.len();
    let seen = collect(&mut sub, Duration::from_secs(30), |s| s.len() >= n).await;
    let got: Vec<_> = seen
        .iter()
        .map(|e| (e.task.clone(), e.old_status, e.new_status))
        .collect();
    assert_eq!(got, expected, "every transition once, in order");
    assert!(seen.windows(2).all(|w| w[0].revision < w[1].revision));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sub.try_next().is_none(), "no duplicate after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_a_cut_off_subscriber_relists_and_emits_the_difference() {
    let server = EtcdServer::start();
    let (proxy, watcher) = watcher_behind_proxy(&server).await;
    let writer = crate::backend(&server, false).await;
    let s = sid("s");
    for i in 0..3 {
        writer
            .put(&tid(&format!("C-{i}")), &TaskPatch::default())
            .await
            .expect("put");
    }
    let mut sub = watcher.subscribe().await.expect("subscribe");
    assert_eq!(sub.snapshot.tasks.len(), 3);

    proxy.cut();
    // While it is cut off: C-0 claimed and completed, C-1 claimed, C-3 created; then compaction.
    let won = |o: ClaimOutcome| matches!(o, ClaimOutcome::Won(_));
    assert!(won(writer.claim(&tid("C-0"), &s).await.expect("claim")));
    writer
        .release(&tid("C-0"), &s, ReleaseTo::Complete, None)
        .await
        .expect("release");
    assert!(won(writer.claim(&tid("C-1"), &s).await.expect("claim")));
    writer
        .put(&tid("C-3"), &TaskPatch::default())
        .await
        .expect("put");
    let mut raw = crate::raw_client(&server).await;
    let rev = raw
        .get("tasks/C-3", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    raw.compact(rev, None).await.expect("compact");
    // Give the watcher time to notice the cut before restoring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();

    let seen = collect(&mut sub, Duration::from_secs(30), |s| s.len() >= 3).await;
    let mut got: Vec<_> = seen
        .iter()
        .map(|e| (e.task.to_string(), e.new_status, e.holder.clone()))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("C-0".into(), Some(TaskStatus::Complete), Some(s.clone())),
            ("C-1".into(), Some(TaskStatus::Claimed), Some(s.clone())),
            ("C-3".into(), Some(TaskStatus::Available), None),
        ]
    );
    // And the stream goes on normally after the re-list.
    writer
        .release(&tid("C-1"), &s, ReleaseTo::Available, None)
        .await
        .expect("release");
    let next = collect(&mut sub, Duration::from_secs(10), |s| !s.is_empty()).await;
    assert_eq!(
        (next[0].task.as_str(), next[0].new_status),
        ("C-1", Some(TaskStatus::Available))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_hung_stream_is_detected_and_replaced() {
    let server = EtcdServer::start();
    let (proxy, watcher) = watcher_behind_proxy(&server).await;
    let writer = crate::backend(&server, false).await;
    let mut sub = watcher.subscribe().await.expect("subscribe");
    writer
        .put(&tid("H-0"), &TaskPatch::default())
        .await
        .expect("put");
    assert_eq!(
        collect(&mut sub, Duration::from_secs(10), |s| !s.is_empty()).await[0].task,
        tid("H-0")
    );

    // The open connection goes silent without closing: no error ever reaches the stream.
    proxy.black_hole();
    writer
        .put(&tid("H-1"), &TaskPatch::default())
        .await
        .expect("put");
    assert!(matches!(
        writer.claim(&tid("H-1"), &sid("s")).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    let seen = collect(&mut sub, Duration::from_secs(60), |s| s.len() >= 2).await;
    let got: Vec<_> = seen
        .iter()
        .map(|e| (e.task.to_string(), e.new_status))
        .collect();
    assert_eq!(
        got,
        vec![
            ("H-1".into(), Some(TaskStatus::Available)),
            ("H-1".into(), Some(TaskStatus::Claimed))
        ]
    );
}

#[tokio::test]
async fn a_board_and_a_revision_larger_than_a_grpc_message_are_listed_and_heard() {
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    // 30,000 tasks with the longest ids: the list is ~9 MB, deleting them all is one revision
    // of ~5 MB of events (gRPC reads 4 MiB by default).
    let n = 30_000;
    crate::load_big_board(&mut raw, n).await;
    // A queue that holds the whole revision: every event of it is heard (with the default
    // bound, 10,000, the subscriber would start again from a fresh snapshot instead).
    let backend = crate::backend_with(
        EtcdConfig {
            event_queue_bound: n + 1,
            ..server.config()
        },
        true,
    )
    .await;
    let mut sub = backend.subscribe().await.expect("subscribe");
    assert_eq!(sub.snapshot.tasks.len(), n, "the whole board is listed");

    raw.delete(
        "tasks/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .expect("delete every task in one revision");
    let gone = collect(&mut sub, Duration::from_secs(60), |seen| seen.len() >= n).await;
    assert_eq!(gone.len(), n);
    assert!(
        gone.iter().all(|e| e.new_status.is_none()),
        "every task was removed"
    );
    let after = backend.list().await.expect("list");
    assert!(after.tasks.is_empty());
    assert_eq!(backend.resyncs(), 0);
}
