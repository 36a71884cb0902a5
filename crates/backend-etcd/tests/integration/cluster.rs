//! A three-member cluster given as an endpoint list: claims keep working when a member dies.

use std::time::Duration;

use agent_core::{Backend, BackendError, ClaimOutcome, SessionId, TaskId, TaskPatch, TaskStatus};
use backend_etcd::testing::EtcdCluster;
use backend_etcd::EtcdConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_go_on_when_a_cluster_member_dies() {
    let mut cluster = EtcdCluster::start(3);
    let config = EtcdConfig {
        lease_ttl: Some(crate::TTL),
        ..cluster.config()
    };
    let backend = crate::backend_with(config, true).await;
    let session = SessionId::parse("s").expect("valid");
    let ids: Vec<TaskId> = (0..10)
        .map(|i| TaskId::parse(&format!("K-{i}")).expect("valid"))
        .collect();
    for id in &ids {
        backend.put(id, &TaskPatch::default()).await.expect("put");
    }
    assert!(matches!(
        backend.claim(&ids[0], &session).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));

    cluster.members[0].kill();
    for id in &ids[1..] {
        // While the cluster notices (and maybe elects a new leader) a call may fail as
        // unavailable; the caller retries. Never a wrong answer.
        let mut tries = 0;
        loop {
            match backend.claim(id, &session).await {
                Ok(ClaimOutcome::Won(_)) => break,
                Ok(other) => panic!("{id}: {other:?}"),
                Err(e @ (BackendError::Unavailable { .. } | BackendError::Timeout { .. })) => {
                    tries += 1;
                    assert!(tries < 100, "{id}: still failing: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{id}: {e}"),
            }
        }
    }
    let listing = backend.list().await.expect("list");
    assert!(listing
        .tasks
        .iter()
        .all(|t| t.status == TaskStatus::Claimed && t.claimed_by.as_ref() == Some(&session)));
}
