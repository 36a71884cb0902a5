//! Claim latency against a bare etcd transaction, measured in one run on a private etcd:
//! `cargo run --release -p backend-etcd --features testing --example etcd_claim_latency [N]`.
//! A quick check until `ifc bench` exists; prints p50/p95/p99 in milliseconds.

use std::time::{Duration, Instant};

use agent_core::{Backend, ClaimOutcome, SessionId, TaskId, TaskPatch};
use backend_etcd::testing::EtcdServer;
use backend_etcd::{EtcdBackend, EtcdConfig};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e3
    };
    format!(
        "p50 {:.3} ms  p95 {:.3} ms  p99 {:.3} ms",
        at(0.50),
        at(0.95),
        at(0.99)
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let server = EtcdServer::start();
    let mut raw = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("connect");

    // Bare: the guide's claim as one compare-and-swap on a fresh key.
    let mut bare = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("bare/{i}");
        let txn = Txn::new()
            .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(
                key,
                r#"{"status":"claimed","claimed_by":"s"}"#,
                None,
            )]);
        let start = Instant::now();
        let resp = raw.txn(txn).await.expect("txn");
        bare.push(start.elapsed());
        assert!(resp.succeeded());
    }

    for (label, watch) in [
        ("ifc claim, watch cache", true),
        ("ifc claim, no cache (read + CAS)", false),
    ] {
        let config = EtcdConfig {
            lease_ttl: Some(Duration::from_secs(10)),
            ..server.config()
        };
        let backend = EtcdBackend::connect(config).await.expect("connect");
        let prefix = if watch { "C" } else { "U" };
        let ids: Vec<TaskId> = (0..n)
            .map(|i| TaskId::parse(&format!("{prefix}-{i}")).expect("id"))
            .collect();
        for id in &ids {
            backend.put(id, &TaskPatch::default()).await.expect("put");
        }
        if watch {
            backend.start_watch().await.expect("watch");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let session = SessionId::parse("bench").expect("id");
        backend
            .claim(&ids[0], &session)
            .await
            .expect("warm-up (grants the lease)");
        let mut samples = Vec::with_capacity(n);
        for id in &ids[1..] {
            let start = Instant::now();
            let out = backend.claim(id, &session).await.expect("claim");
            samples.push(start.elapsed());
            assert!(matches!(out, ClaimOutcome::Won(_)));
        }
        println!("{label:<34} {}", percentiles(samples));
    }
    println!("{:<34} {}", "bare etcd transaction", percentiles(bare));
}
