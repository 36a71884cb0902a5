//! The state one NATS client shares between its operations, its lease keeper and its
//! subscriptions: the connection, the bucket, the leases it owns, the claims it holds (to tell
//! their holder when one ends), and its subscribers.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard, Weak};

use agent_core::{BackendError, BackendEvent, FencingToken, SessionId, TaskId};
use async_nats::jetstream::{self, kv, stream::Stream};

use crate::board::Board;
use crate::config::NatsConfig;
use crate::lease::Lease;

/// How long a delete marker (a lease's TTL ran out) stays in the bucket. The server raises every
/// message TTL shorter than this to it (seen with nats-server 2.15), so it must not exceed the
/// shortest lease TTL: 1 s, the least it takes. A watcher away longer misses the marker; it
/// finds the lease gone by reading it once its renewals stop coming (`watch`).
const MARKER_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Versions kept per key, so a watch resumed after a disconnect finds the changes it missed.
const HISTORY: i64 = 64;

/// A claim this client won and holds, to tell its holder when it ends otherwise.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub session: SessionId,
    pub token: u64,
    pub lease: Option<i64>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub config: NatsConfig,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub kv: kv::Store,
    pub stream: Stream,
    /// The subject prefix of the bucket's keys: `$KV.<bucket>.`.
    pub prefix: String,
    /// The lease this client claims under now (granted at first need).
    pub lease: tokio::sync::Mutex<Option<Lease>>,
    /// Leases taken over from a gone process of a session this client registered, until
    /// `end_inherited`.
    pub inherited: Mutex<Vec<Lease>>,
    /// Every lease this client granted or inherited: claims under them are this client's to end.
    pub mine: Mutex<HashSet<i64>>,
    pub held: Mutex<HashMap<TaskId, Held>>,
    /// Sessions registered by this client, with the lease their presence lives under.
    pub registered: Mutex<HashMap<SessionId, Option<i64>>>,
    pub subscribers: Mutex<Vec<crate::watch::WeakFeed>>,
    /// The board of the first subscription, for `last_known`.
    pub watched: Mutex<Option<Weak<Mutex<Board>>>>,
    pub reconnects: AtomicU64,
    /// Subscriptions that fell behind and started again from a fresh snapshot.
    pub resyncs: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few assignments without await points: a poisoned lock still
    // holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bucket name NATS takes.
fn valid_bucket(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Opens the bucket, creating it when missing and `config.create_bucket`.
async fn open_bucket(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> Result<kv::Store, BackendError> {
    let endpoint = config.endpoint();
    let bucket = &config.bucket;
    if !valid_bucket(bucket) {
        return Err(BackendError::InvalidInput(format!(
            "bucket {bucket:?}: a NATS bucket name is letters, digits, '-' and '_' (--bucket)"
        )));
    }
    // Whether JetStream answers at all, apart from whether the bucket exists.
    if let Err(e) = js.query_account().await {
        let reason = e.to_string();
        return Err(if reason.contains("timed out") {
            BackendError::Timeout {
                endpoint,
                operation: "ask JetStream".into(),
                after: config.request_timeout,
            }
        } else {
            BackendError::Unavailable {
                endpoint,
                reason: format!(
                    "JetStream does not answer ({reason}): start nats-server with -js (--jetstream)"
                ),
            }
        });
    }
    if let Ok(kv) = js.get_key_value(bucket).await {
        return Ok(kv);
    }
    if !config.create_bucket {
        return Err(BackendError::InvalidInput(format!(
            "no key-value bucket {bucket:?} on {endpoint}: `ifc put`, `ifc migrate` or an agent \
             creates it (or check --bucket, IFC_BUCKET)"
        )));
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: bucket.clone(),
            description: "ifc: tasks, leases and sessions".into(),
            history: HISTORY,
            num_replicas: config.replicas,
            storage: jetstream::stream::StorageType::File,
            limit_markers: Some(MARKER_TTL),
            ..Default::default()
        })
        .await;
    match created {
        Ok(kv) => Ok(kv),
        // Another client created it meanwhile.
        Err(create) => js.get_key_value(bucket).await.map_err(|_| {
            BackendError::InvalidInput(format!(
                "cannot create the key-value bucket {bucket:?} with {} replica(s) on {endpoint}: {create}",
                config.replicas
            ))
        }),
    }
}

impl Inner {
    /// Connects and opens (or creates) the bucket.
    pub async fn connect(config: NatsConfig) -> Result<Inner, BackendError> {
        let endpoint = config.endpoint();
        let unavailable = |reason: String| BackendError::Unavailable {
            endpoint: endpoint.clone(),
            reason,
        };
        if let Some(ttl) = config.lease_ttl {
            if ttl.as_secs() == 0 {
                return Err(BackendError::InvalidInput(format!(
                    "lease TTL {ttl:?}: NATS message TTLs are whole seconds, at least 1s"
                )));
            }
        }
        let mut servers = Vec::new();
        for s in &config.servers {
            servers.push(
                async_nats::ServerAddr::from_str(s)
                    .map_err(|e| BackendError::InvalidInput(format!("NATS server {s:?}: {e}")))?,
            );
        }
        let mut options = async_nats::ConnectOptions::new()
            .name("ifc")
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.request_timeout));
        if let Some(path) = &config.creds {
            options = options.credentials_file(path).await.map_err(|e| {
                BackendError::InvalidInput(format!("NATS credentials file {}: {e}", path.display()))
            })?;
        }
        if let Some((user, password)) = &config.user {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(tls) = &config.tls {
            if let Some(ca) = &tls.ca {
                options = options.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            options = options.require_tls(true);
        }
        let client = options.connect(servers).await.map_err(|e| {
            let reason = e.to_string();
            if matches!(
                e.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication
            ) {
                BackendError::Rejected {
                    endpoint: endpoint.clone(),
                    reason,
                }
            } else {
                unavailable(reason)
            }
        })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.request_timeout);
        let kv = open_bucket(&js, &config).await?;
        let mut stream = js
            .get_stream(format!("KV_{}", config.bucket))
            .await
            .map_err(|e| unavailable(format!("bucket {:?}: {e}", config.bucket)))?;
        let info = stream
            .info()
            .await
            .map_err(|e| unavailable(format!("bucket {:?}: {e}", config.bucket)))?;
        if config.lease_ttl.is_some() && !info.config.allow_message_ttl {
            return Err(BackendError::InvalidInput(format!(
                "the key-value bucket {:?} on {endpoint} does not allow per-message TTLs, which \
                 ifc's leases need (NATS 2.11 or newer, a bucket created by ifc or with \
                 `nats kv add --marker-ttl`)",
                config.bucket
            )));
        }
        let prefix = format!("$KV.{}.", config.bucket);
        Ok(Inner {
            config,
            client,
            js,
            kv,
            stream,
            prefix,
            lease: tokio::sync::Mutex::new(None),
            inherited: Mutex::new(Vec::new()),
            mine: Mutex::new(HashSet::new()),
            held: Mutex::new(HashMap::new()),
            registered: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(Vec::new()),
            watched: Mutex::new(None),
            reconnects: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
        })
    }

    pub fn endpoint(&self) -> String {
        self.config.endpoint()
    }

    /// An error of the store, as the contract names it (`what`: the operation).
    pub fn error(&self, what: &str, e: impl std::fmt::Display) -> BackendError {
        let reason = e.to_string();
        if reason.contains("timed out") {
            return BackendError::Timeout {
                endpoint: self.endpoint(),
                operation: what.into(),
                after: self.config.request_timeout,
            };
        }
        BackendError::Unavailable {
            endpoint: self.endpoint(),
            reason: format!("{what}: {reason}"),
        }
    }

    pub fn is_mine(&self, lease: i64) -> bool {
        lock(&self.mine).contains(&lease)
    }

    /// Sends `event` to every subscriber of this client.
    pub fn broadcast(&self, event: BackendEvent) {
        lock(&self.subscribers).retain(|feed| feed.send(event.clone()));
    }

    /// The claim on `task` ended otherwise than by this client's release: its holder is told.
    pub fn claim_ended(&self, task: &TaskId) {
        let Some(held) = lock(&self.held).remove(task) else {
            return;
        };
        tracing::info!(task = %task, session = %held.session, token = held.token, "claim lost");
        self.broadcast(BackendEvent::ClaimLost {
            task: task.clone(),
            session: held.session,
            token: FencingToken(held.token),
        });
    }

    /// Every claim held under `lease` ended (the lease is gone).
    pub fn lease_ended(&self, lease: i64) {
        let tasks: Vec<TaskId> = lock(&self.held)
            .iter()
            .filter(|(_, h)| h.lease == Some(lease))
            .map(|(t, _)| t.clone())
            .collect();
        for t in tasks {
            self.claim_ended(&t);
        }
    }

    /// After a change the board shows: whether each claim this client holds on `tasks` goes on.
    pub fn check_held(&self, board: &Board, tasks: impl Iterator<Item = TaskId>) {
        for task in tasks {
            let goes_on = {
                let held = lock(&self.held);
                let Some(h) = held.get(&task) else { continue };
                board.claim_of(&task) == Some((h.session.clone(), h.lease))
            };
            if !goes_on {
                self.claim_ended(&task);
            }
        }
    }

    /// A presence of `session` was written under `lease`: if this client registered it under
    /// another, it was taken over.
    pub fn presence_written(&self, session: &SessionId, by: &crate::board::StoredPresence) {
        let mut registered = lock(&self.registered);
        let Some(ours) = registered.get(session) else {
            return;
        };
        if *ours == by.lease || by.lease.is_some_and(|l| self.is_mine(l)) {
            return;
        }
        registered.remove(session);
        drop(registered);
        self.broadcast(BackendEvent::SessionTaken {
            session: session.clone(),
            by: Box::new(by.presence.clone()),
        });
    }
}
