//! Connection settings of the etcd backend, with the defaults users expect from etcdctl.

use std::path::PathBuf;
use std::time::Duration;

/// Where and how to reach etcd.
#[derive(Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379` (several for a cluster).
    pub endpoints: Vec<String>,
    /// Namespace prepended to every key (`""`: the guide's `tasks/<id>` keys).
    pub prefix: String,
    /// How long to wait for the first answer when connecting.
    pub dial_timeout: Duration,
    /// Deadline of every request.
    pub request_timeout: Duration,
    /// TTL of the session lease claims are bound to; `None`: claims hold until released.
    pub lease_ttl: Option<Duration>,
    /// How often the watch asks for a progress report; a stream silent for two intervals is
    /// considered dead and re-opened.
    pub watch_progress_interval: Duration,
    /// TLS material (PEM files).
    pub tls: Option<TlsFiles>,
    /// User name and password for etcd authentication.
    pub user: Option<(String, String)>,
    /// Most events a subscriber's queue holds; one that falls further behind starts again from
    /// a fresh snapshot of its interest (a `Resync`).
    pub event_queue_bound: usize,
}

/// PEM files for TLS: the CA to trust, and optionally a client certificate and key.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA certificate bundle (`--cacert`).
    pub ca: Option<PathBuf>,
    /// Client certificate (`--cert`).
    pub cert: Option<PathBuf>,
    /// Client key (`--key`).
    pub key: Option<PathBuf>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: String::new(),
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(1),
            lease_ttl: Some(Duration::from_secs(10)),
            watch_progress_interval: Duration::from_secs(5),
            tls: None,
            user: None,
            event_queue_bound: crate::fanout::DEFAULT_QUEUE_BOUND,
        }
    }
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is never printed.
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("dial_timeout", &self.dial_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("lease_ttl", &self.lease_ttl)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("event_queue_bound", &self.event_queue_bound)
            .finish()
    }
}
