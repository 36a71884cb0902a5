//! Subscriptions across a nats-server killed with SIGKILL and restarted on the same store:
//! nothing missed, nothing twice, in order; a lease that ended while the watch was away is
//! found gone.

use std::time::Duration;

use agent_core::testing::{next_event_for, sid, tid};
use agent_core::{Backend, BackendEvent, ClaimOutcome, TaskPatch, TaskStatus};
use backend_nats::testing::NatsServer;
use backend_nats::NatsBackend;

const TTL: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(30);

async fn client(server: &NatsServer) -> NatsBackend {
    NatsBackend::connect(server.config(Some(TTL)))
        .await
        .expect("connect to nats-server")
}

async fn available(b: &NatsBackend, id: &str) {
    let patch = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    // The server may still be coming back: try again for a while.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match b.put(&tid(id), &patch).await {
            Ok(_) => return,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "put: retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put {id}: {e}"),
        }
    }
}

/// A client that reaches `server` through a proxy the test can cut.
async fn through_proxy(server: &NatsServer) -> (backend_etcd::testing::TcpProxy, NatsBackend) {
    let proxy = backend_etcd::testing::TcpProxy::start(server.addr()).await;
    let b = NatsBackend::connect(backend_nats::NatsConfig {
        servers: vec![format!("nats://{}", proxy.addr())],
        ..server.config(Some(TTL))
    })
    .await
    .expect("connect through the proxy");
    (proxy, b)
}

/// `other` puts T, `holder` subscribes and claims T: the holder's subscription.
async fn subscribed_holder_of_t(
    holder: &NatsBackend,
    other: &NatsBackend,
) -> agent_core::Subscription {
    available(other, "T").await;
    let sub = holder.subscribe().await.expect("subscribe");
    let won = holder
        .claim(&tid("T"), &sid("holder"))
        .await
        .expect("claim");
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    sub
}

/// Waits for the `ClaimLost` of `task` on `sub`, skipping other events.
async fn claim_lost(sub: &mut agent_core::Subscription, task: &str) {
    loop {
        match sub.next().await {
            Some(BackendEvent::ClaimLost { task: t, .. }) if t == tid(task) => return,
            Some(_) => continue,
            None => panic!("the subscription ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_after_a_server_restart_reach_a_subscriber_once_and_in_order() {
    let mut server = NatsServer::start();
    let (writer, observer) = (client(&server).await, client(&server).await);
    available(&writer, "BEFORE").await;
    let mut sub = observer.subscribe().await.expect("subscribe");
    assert!(sub.snapshot.tasks.iter().any(|t| t.id == tid("BEFORE")));
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart();
    let ids: Vec<String> = (0..5).map(|i| format!("AFTER.{i}")).collect();
    for id in &ids {
        available(&writer, id).await;
    }
    let mut heard = Vec::new();
    let mut last = 0;
    tokio::time::timeout(WAIT, async {
        while heard.len() < ids.len() {
            match sub.next().await.expect("the subscription goes on") {
                BackendEvent::Task(e) => {
                    assert!(
                        e.revision > last,
                        "revisions rise: {} after {last}",
                        e.revision
                    );
                    last = e.revision;
                    heard.push(e.task.to_string());
                }
                BackendEvent::Resync(listing) => {
                    // A fresh start is allowed; it must hold what was written so far.
                    last = listing.revision;
                    for t in listing.tasks {
                        if t.id.as_str().starts_with("AFTER") && !heard.contains(&t.id.to_string())
                        {
                            heard.push(t.id.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("heard only {heard:?} within {WAIT:?}"));
    assert_eq!(heard, ids, "each once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_ended_while_the_server_was_down_frees_its_task_for_subscribers() {
    let mut server = NatsServer::start();
    let observer = client(&server).await;
    available(&observer, "T").await;
    let mut sub = observer.subscribe().await.expect("subscribe");
    {
        let holder = client(&server).await;
        let won = holder
            .claim(&tid("T"), &sid("holder"))
            .await
            .expect("claim");
        assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
        let e = next_event_for(&mut sub, &tid("T"), WAIT).await;
        assert_eq!(e.new_status, Some(TaskStatus::Claimed));
        // The holder dies with the server: nobody renews its lease from now on.
        server.kill();
    }
    tokio::time::sleep(TTL * 2).await;
    server.restart();
    let e = next_event_for(&mut sub, &tid("T"), WAIT).await;
    assert_eq!(
        (e.new_status, e.holder),
        (Some(TaskStatus::Available), None),
        "the dead holder's task reads available to a subscriber that was away"
    );
    let t = observer.get(&tid("T")).await.expect("get").expect("kept");
    assert_eq!(t.status, TaskStatus::Available);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_ended_while_a_subscriber_was_cut_off_frees_its_task_for_it() {
    let server = NatsServer::start();
    let (proxy, observer) = through_proxy(&server).await;
    available(&observer, "T").await;
    let mut sub = observer.subscribe().await.expect("subscribe");
    let holder = client(&server).await;
    let won = holder
        .claim(&tid("T"), &sid("holder"))
        .await
        .expect("claim");
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    let e = next_event_for(&mut sub, &tid("T"), WAIT).await;
    assert_eq!(e.new_status, Some(TaskStatus::Claimed));
    proxy.cut();
    drop(holder); // the holder dies while the observer is away
                  // Its lease ends after the TTL, and the delete marker is gone a second later.
    tokio::time::sleep(TTL * 3).await;
    proxy.restore();
    let e = next_event_for(&mut sub, &tid("T"), WAIT).await;
    assert_eq!(
        (e.new_status, e.holder),
        (Some(TaskStatus::Available), None),
        "the dead holder's task reads available to the subscriber that was away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_starts_again_from_a_fresh_snapshot() {
    let server = NatsServer::start();
    let writer = client(&server).await;
    let slow = NatsBackend::connect(backend_nats::NatsConfig {
        event_queue_bound: 20,
        ..server.config(Some(TTL))
    })
    .await
    .expect("connect");
    let mut sub = slow.subscribe().await.expect("subscribe");
    for i in 0..60 {
        available(&writer, &format!("FLOOD.{i}")).await;
    }
    // Nothing read meanwhile: more than 20 waited, so the next event is a fresh snapshot.
    let deadline = tokio::time::Instant::now() + WAIT;
    let listing = loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(BackendEvent::Resync(listing))) => break listing,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!("no Resync within {WAIT:?}"),
        }
    };
    assert!(listing.tasks.len() >= 21, "{} tasks", listing.tasks.len());
    // And it goes on: a later change arrives as an event.
    available(&writer, "AFTER").await;
    let e = next_event_for(&mut sub, &tid("AFTER"), WAIT).await;
    assert_eq!(e.new_status, Some(TaskStatus::Available));
}

/// A holder cut off from the server is told its claim is lost before anyone else can win the
/// task: the server lets its lease go a TTL after the last renewal it took, and the holder ends
/// its claims once its next renewal would come too late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_holder_is_told_before_another_session_wins_its_task() {
    let server = NatsServer::start();
    let (proxy, holder) = through_proxy(&server).await;
    let other = client(&server).await;
    let mut sub = subscribed_holder_of_t(&holder, &other).await;
    let told = tokio::spawn(async move {
        claim_lost(&mut sub, "T").await;
        tokio::time::Instant::now()
    });
    proxy.black_hole();
    let won_at = loop {
        match other.claim(&tid("T"), &sid("other")).await.expect("claim") {
            ClaimOutcome::Won(_) => break tokio::time::Instant::now(),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let told_at = tokio::time::timeout(WAIT, told)
        .await
        .expect("the holder is told at all")
        .expect("the watcher task");
    assert!(
        told_at <= won_at,
        "the holder was told {:?} after the other session won",
        told_at - won_at
    );
    drop(holder);
}

/// A `ClaimLost` (sent by the client itself, not by a change) does not upset the subscription's
/// bounded queue: the changes after it still arrive (they stopped, and the agent waited for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_after_a_claim_lost_still_arrive() {
    let server = NatsServer::start();
    let (holder, other) = (client(&server).await, client(&server).await);
    let mut sub = subscribed_holder_of_t(&holder, &other).await;
    let lease = holder
        .lease_of(&tid("T"))
        .await
        .expect("read")
        .expect("leased");
    other.revoke_lease(lease).await.expect("revoke");
    tokio::time::timeout(WAIT, claim_lost(&mut sub, "T"))
        .await
        .expect("the holder is told its claim is lost");
    for i in 0..3 {
        let id = format!("LATER.{i}");
        available(&other, &id).await;
        let e = next_event_for(&mut sub, &tid(&id), WAIT).await;
        assert_eq!(e.new_status, Some(TaskStatus::Available));
    }
}

/// The bucket deleted and made again (an operator's reset, or a server restarted without its
/// store): a subscriber reads the new bucket from a fresh snapshot and hears its changes (it
/// heard nothing more, and an agent waited for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_made_again_is_read_afresh_by_its_subscribers() {
    let server = NatsServer::start();
    let observer = client(&server).await;
    available(&observer, "OLD").await;
    let mut sub = observer.subscribe().await.expect("subscribe");
    let raw = async_nats::jetstream::new(async_nats::connect(server.url()).await.expect("raw"));
    raw.delete_key_value("ifc")
        .await
        .expect("delete the bucket");
    // A new client makes the bucket again, with tasks of its own.
    let writer = client(&server).await;
    available(&writer, "NEW").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut heard = false;
    while !heard {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(BackendEvent::Resync(listing))) => {
                let ids: Vec<_> = listing.tasks.iter().map(|t| t.id.to_string()).collect();
                assert!(!ids.contains(&"OLD".to_owned()), "{ids:?}");
                heard = ids.contains(&"NEW".to_owned());
            }
            Ok(Some(BackendEvent::Task(e))) => heard = e.task == tid("NEW"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!("the new bucket's task was not heard within {WAIT:?}"),
        }
    }
    available(&writer, "LATER").await;
    let e = next_event_for(&mut sub, &tid("LATER"), WAIT).await;
    assert_eq!(e.new_status, Some(TaskStatus::Available));
}
