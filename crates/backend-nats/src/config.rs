//! Connection settings of the NATS backend, with the defaults users expect from the `nats` CLI.

use std::path::PathBuf;
use std::time::Duration;

/// Where and how to reach NATS JetStream.
#[derive(Clone)]
pub struct NatsConfig {
    /// Server URLs, e.g. `nats://127.0.0.1:4222` (several for a cluster).
    pub servers: Vec<String>,
    /// The key-value bucket holding the tasks, leases and sessions (created when missing).
    pub bucket: String,
    /// How many replicas a bucket created here keeps (1 for a single server, 3 for a cluster).
    pub replicas: usize,
    /// Whether a missing bucket is created (a command that only reads says it is missing).
    pub create_bucket: bool,
    /// How long to wait for the first connection.
    pub connect_timeout: Duration,
    /// Deadline of every request.
    pub request_timeout: Duration,
    /// TTL of the lease record claims are bound to (whole seconds, at least 1); `None`: claims
    /// hold until released.
    pub lease_ttl: Option<Duration>,
    /// A NATS credentials file (`--creds`, as the `nats` CLI takes it).
    pub creds: Option<PathBuf>,
    /// User name and password.
    pub user: Option<(String, String)>,
    /// TLS material (PEM files): the CA to trust, and a client certificate and key.
    pub tls: Option<NatsTls>,
    /// Most events a subscriber's queue holds; one that falls further behind starts again from
    /// a fresh snapshot (a `Resync`), as on etcd.
    pub event_queue_bound: usize,
}

/// PEM files for TLS.
#[derive(Debug, Clone, Default)]
pub struct NatsTls {
    /// CA certificate bundle (`--tlsca`).
    pub ca: Option<PathBuf>,
    /// Client certificate (`--tlscert`).
    pub cert: Option<PathBuf>,
    /// Client key (`--tlskey`).
    pub key: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: vec!["nats://127.0.0.1:4222".into()],
            bucket: "ifc".into(),
            replicas: 1,
            create_bucket: true,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            lease_ttl: Some(Duration::from_secs(10)),
            creds: None,
            user: None,
            tls: None,
            event_queue_bound: 10_000,
        }
    }
}

impl NatsConfig {
    /// The servers, for error messages.
    pub fn endpoint(&self) -> String {
        self.servers.join(",")
    }
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is never printed.
        f.debug_struct("NatsConfig")
            .field("servers", &self.servers)
            .field("bucket", &self.bucket)
            .field("replicas", &self.replicas)
            .field("create_bucket", &self.create_bucket)
            .field("request_timeout", &self.request_timeout)
            .field("lease_ttl", &self.lease_ttl)
            .field("creds", &self.creds)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls)
            .field("event_queue_bound", &self.event_queue_bound)
            .finish()
    }
}
