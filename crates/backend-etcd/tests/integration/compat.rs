//! Compatibility with other clients of the same keys (the migration guide's Python tools) and the
//! handling of records ifc did not write.

use agent_core::testing::{sid, tid};
use agent_core::{
    Backend, ClaimOutcome, PutOutcome, ReleaseOutcome, ReleaseTo, TaskPatch, TaskStatus,
};
use backend_etcd::testing::EtcdServer;
use serde_json::Value;

async fn read_json(raw: &mut etcd_client::Client, key: &str) -> Value {
    let resp = raw.get(key, None).await.expect("get");
    let kv = resp.kvs().first().expect("key exists");
    serde_json::from_slice(kv.value()).expect("JSON")
}

#[tokio::test]
async fn a_guide_shaped_record_is_claimable_and_reads_back_for_the_other_client() {
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    raw.put("tasks/X", r#"{"task_id":"X","status":"available","claimed_by":null,"claimed_at":null,"owner_note":"keep me"}"#, None)
        .await
        .expect("put");
    let backend = crate::backend(&server, false).await;
    let out = backend
        .claim(&tid("X"), &sid("session-1-ndi"))
        .await
        .expect("claim");
    assert!(matches!(out, ClaimOutcome::Won(_)), "{out:?}");
    let seen = read_json(&mut raw, "tasks/X").await;
    assert_eq!(seen["status"], "claimed");
    assert_eq!(seen["claimed_by"], "session-1-ndi");
    assert!(
        seen["claimed_at"].as_str().is_some_and(|t| t.contains('T')),
        "ISO 8601: {seen}"
    );
    assert_eq!(
        seen["owner_note"], "keep me",
        "unknown fields survive a claim"
    );
    backend
        .release(&tid("X"), &sid("session-1-ndi"), ReleaseTo::Complete, None)
        .await
        .expect("release");
    let seen = read_json(&mut raw, "tasks/X").await;
    assert_eq!(
        (seen["status"].as_str(), seen["claimed_by"].as_str()),
        (Some("complete"), Some("session-1-ndi"))
    );
    assert_eq!(
        seen["owner_note"], "keep me",
        "unknown fields survive a release"
    );
    let patch = TaskPatch {
        title: Some("renamed".into()),
        ..TaskPatch::default()
    };
    assert_eq!(
        backend.put(&tid("X"), &patch).await.expect("put"),
        PutOutcome::Updated
    );
    assert_eq!(
        read_json(&mut raw, "tasks/X").await["owner_note"],
        "keep me",
        "unknown fields survive a put"
    );
}

#[tokio::test]
async fn the_guide_test_records_without_task_id_work() {
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    raw.put(
        "tasks/TEST-CLAIM",
        r#"{"status": "available", "claimed_by": null}"#,
        None,
    )
    .await
    .expect("put");
    let backend = crate::backend(&server, true).await;
    let out = backend
        .claim(&tid("TEST-CLAIM"), &sid("test-session"))
        .await
        .expect("claim");
    assert!(matches!(out, ClaimOutcome::Won(_)), "{out:?}");
    assert_eq!(
        read_json(&mut raw, "tasks/TEST-CLAIM").await["task_id"],
        "TEST-CLAIM"
    );
}

#[tokio::test]
async fn a_foreign_claim_without_lease_is_held_until_released() {
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    raw.put(
        "tasks/P0.5.4",
        r#"{"task_id":"P0.5.4","status":"claimed","claimed_by":"session-1-ndi","claimed_at":null}"#,
        None,
    )
    .await
    .expect("put");
    let backend = crate::backend(&server, true).await;
    tokio::time::sleep(crate::TTL * 2).await; // no lease can have expired it
    let task = backend
        .get(&tid("P0.5.4"))
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        (task.status, task.claimed_by),
        (TaskStatus::Claimed, Some(sid("session-1-ndi")))
    );
    let out = backend
        .claim(&tid("P0.5.4"), &sid("session-2"))
        .await
        .expect("claim");
    assert_eq!(
        out,
        ClaimOutcome::Lost {
            holder: Some(sid("session-1-ndi"))
        }
    );
    // The named owner adopts it under its own lease, then completes it.
    let ClaimOutcome::Won(claim) = backend
        .claim(&tid("P0.5.4"), &sid("session-1-ndi"))
        .await
        .expect("claim")
    else {
        panic!("the owner adopts its claim");
    };
    assert!(claim.leased);
    let out = backend
        .release(
            &tid("P0.5.4"),
            &sid("session-1-ndi"),
            ReleaseTo::Complete,
            Some(claim.token),
        )
        .await;
    assert_eq!(
        out.expect("release"),
        ReleaseOutcome::Released { token: claim.token }
    );
}

#[tokio::test]
async fn corrupt_records_are_reported_with_their_key_and_listing_goes_on() {
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    raw.put("tasks/GOOD", r#"{"status":"available"}"#, None)
        .await
        .expect("put");
    raw.put("tasks/BAD-JSON", "{not json", None)
        .await
        .expect("put");
    raw.put("tasks/BAD-SHAPE", r#"{"status":"maybe"}"#, None)
        .await
        .expect("put");
    raw.put("tasks/bad id", r#"{"status":"available"}"#, None)
        .await
        .expect("put");
    let backend = crate::backend(&server, true).await;
    let listing = backend.list().await.expect("list");
    assert_eq!(
        listing
            .tasks
            .iter()
            .map(|t| t.id.to_string())
            .collect::<Vec<_>>(),
        ["GOOD"]
    );
    let keys: Vec<&str> = listing.corrupt.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["tasks/BAD-JSON", "tasks/BAD-SHAPE", "tasks/bad id"]);
    assert!(
        listing.corrupt[1].reason.contains("unknown status"),
        "{:?}",
        listing.corrupt[1]
    );
    let err = backend
        .claim(&tid("BAD-JSON"), &sid("s"))
        .await
        .expect_err("corrupt");
    assert!(err.to_string().contains("tasks/BAD-JSON"), "{err}");
    let err = backend
        .put(&tid("BAD-SHAPE"), &TaskPatch::default())
        .await
        .expect_err("corrupt is not overwritten");
    assert!(
        matches!(err, agent_core::BackendError::Corrupt { .. }),
        "{err}"
    );
    let resp = raw.get("tasks/BAD-SHAPE", None).await.expect("get");
    assert_eq!(resp.kvs()[0].value(), br#"{"status":"maybe"}"#);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_timeout_or_unavailable_naming_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let config = backend_etcd::EtcdConfig {
        endpoints: vec![endpoint.clone()],
        dial_timeout: std::time::Duration::from_millis(500),
        ..backend_etcd::EtcdConfig::default()
    };
    let err = backend_etcd::EtcdBackend::connect(config)
        .await
        .expect_err("nothing listens there");
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains(&endpoint), "{err}");
}

#[tokio::test]
async fn an_expired_claim_reads_available_and_the_record_is_reset_not_deleted() {
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    let (watcher, holder) = (
        crate::backend(&server, true).await,
        crate::backend(&server, false).await,
    );
    watcher
        .put(&tid("T"), &TaskPatch::default())
        .await
        .expect("put");
    assert!(matches!(
        holder
            .claim(&tid("T"), &sid("doomed"))
            .await
            .expect("claim"),
        ClaimOutcome::Won(_)
    ));
    drop(holder);
    // The watcher sees the claim key expire and resets the record by compare-and-swap.
    agent_core::testing::eventually(crate::TTL * 10, "the record to be reset", || {
        let mut raw = raw.clone();
        async move {
            let resp = raw.get("tasks/T", None).await.ok()?;
            let v: Value = serde_json::from_slice(resp.kvs().first()?.value()).ok()?;
            (v["status"] == "available"
                && v["claimed_by"].is_null()
                && v.get("ifc_lease").is_none())
            .then_some(())
        }
    })
    .await;
    assert!(raw
        .get("claims/T", None)
        .await
        .expect("get")
        .kvs()
        .is_empty());
}

#[tokio::test]
async fn a_session_whose_lease_etcd_ended_claims_again_under_a_new_one() {
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    let backend = crate::backend(&server, false).await;
    let s = sid("s");
    for t in ["L-1", "L-2"] {
        backend
            .put(&tid(t), &TaskPatch::default())
            .await
            .expect("put");
    }
    assert!(matches!(
        backend.claim(&tid("L-1"), &s).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    let lease = raw.get("claims/L-1", None).await.expect("get").kvs()[0].lease();
    raw.lease_revoke(lease).await.expect("revoke");
    // At once, before the keep-alive loop can have noticed.
    let out = backend
        .claim(&tid("L-2"), &s)
        .await
        .expect("claim under a fresh lease");
    assert!(matches!(out, ClaimOutcome::Won(_)), "{out:?}");
    let new_lease = raw.get("claims/L-2", None).await.expect("get").kvs()[0].lease();
    assert!(new_lease != 0 && new_lease != lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_times_out_leaves_etcd_running() {
    // etcd before 3.5.5 panics when the client of a read-only transaction goes away while etcd
    // applies it (etcd-io/etcd#14110): a list of a big board as one, cut off by the request
    // deadline, took the test's etcd 3.5.1 down.
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    crate::load_big_board(&mut raw, 30_000).await;
    let hasty = crate::backend_with(
        backend_etcd::EtcdConfig {
            request_timeout: std::time::Duration::from_millis(2),
            ..server.config()
        },
        false,
    )
    .await;
    for _ in 0..10 {
        let err = hasty.list().await.expect_err("a 9 MB list within 2 ms");
        assert!(err.to_string().contains("timed out"), "{err}");
    }
    drop(hasty);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let listed = crate::backend(&server, false)
        .await
        .list()
        .await
        .expect("etcd still answers");
    assert_eq!(listed.tasks.len(), 30_000);
}
