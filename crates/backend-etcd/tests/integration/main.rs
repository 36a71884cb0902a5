//! Integration tests of the etcd backend against a real etcd started per test.

mod cluster;
mod compat;
mod conformance;
mod interest;
mod lease;
mod security;
mod watch;

use std::time::Duration;

use backend_etcd::testing::EtcdServer;
use backend_etcd::{EtcdBackend, EtcdConfig};

/// Lease TTL in tests: etcd's minimum is about 2 s.
pub const TTL: Duration = Duration::from_secs(2);

/// A backend on `server` with the test TTL, optionally with its watch cache running.
pub async fn backend(server: &EtcdServer, watch: bool) -> EtcdBackend {
    backend_with(
        EtcdConfig {
            lease_ttl: Some(TTL),
            ..server.config()
        },
        watch,
    )
    .await
}

pub async fn backend_with(config: EtcdConfig, watch: bool) -> EtcdBackend {
    let b = EtcdBackend::connect(config)
        .await
        .expect("connect to the test etcd");
    if watch {
        b.start_watch().await.expect("watch starts");
    }
    b
}

/// A raw etcd client, as another tool (the guide's Python scripts) would use.
pub async fn raw_client(server: &EtcdServer) -> etcd_client::Client {
    etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("raw client")
}

/// Writes `n` available tasks with the longest ids (and 100-byte titles) straight into etcd,
/// 128 to a transaction: a board of ~9 MB at 30,000. Their ids, in order.
pub async fn load_big_board(raw: &mut etcd_client::Client, n: usize) -> Vec<String> {
    let id = |i: usize| format!("{}{i:06}", "x".repeat(122));
    for chunk in (0..n).collect::<Vec<_>>().chunks(128) {
        let ops = chunk
            .iter()
            .map(|&i| {
                let value = format!(
                    r#"{{"task_id":"{}","status":"available","claimed_by":null,"title":"{}"}}"#,
                    id(i),
                    "t".repeat(100)
                );
                etcd_client::TxnOp::put(format!("tasks/{}", id(i)), value, None)
            })
            .collect::<Vec<_>>();
        raw.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("load tasks");
    }
    (0..n).map(id).collect()
}
