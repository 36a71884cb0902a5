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
