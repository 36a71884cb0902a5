//! Session presence: `<prefix>sessions/<session_id>`, JSON bound to the session's lease, so a
//! session that dies disappears from `ifc status` by itself. The key is also the session's
//! registration: it is created only if absent, and rewritten only under the lease that created
//! it, so a session id runs in one process at a time.

use std::sync::Arc;

use agent_core::{BackendError, BackendResult, Presence};
use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use crate::inner::Inner;

/// How many times a registration retries when the key changes under it.
const ROUNDS: usize = 8;

/// The field of the presence value listing the leases its process took on from gone
/// predecessors and has not ended yet: a restart after that process died too takes them on as
/// well (seed 390000023: an agent killed twice within its lease's TTL; the second restart knew
/// only the first restart's lease, the first process's claims ran out, and a finished run was
/// done again).
const INHERITED_FIELD: &str = "ifc_inherited_leases";

/// The leases a presence value lists as inherited.
fn inherited_in(kv: &KeyValue) -> Vec<i64> {
    serde_json::from_slice::<serde_json::Value>(kv.value())
        .ok()
        .and_then(|mut v| v.get_mut(INHERITED_FIELD).map(serde_json::Value::take))
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// What the presence key holds: who runs the session (unreadable: an unknown process).
fn holder(kv: &KeyValue, id: &agent_core::SessionId) -> Presence {
    serde_json::from_slice::<Presence>(kv.value()).unwrap_or_else(|_| Presence {
        session_id: id.clone(),
        state: "unknown".into(),
        current_task: None,
        backend: "etcd".into(),
        started_at: chrono::Utc::now(),
        pid: 0,
        host: String::new(),
        version: String::new(),
        heartbeat: None,
        claim_p95_us: None,
    })
}

impl Inner {
    /// The presence's value: the presence, and the leases this process inherited and has not
    /// ended.
    fn presence_value(&self, presence: &Presence) -> Vec<u8> {
        let inherited = self
            .inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut value = serde_json::to_value(presence).unwrap_or_default();
        if let (false, Some(fields)) = (inherited.is_empty(), value.as_object_mut()) {
            fields.insert(INHERITED_FIELD.into(), serde_json::json!(inherited));
        }
        serde_json::to_vec(&value).unwrap_or_default()
    }

    /// Writes the presence: created if absent, rewritten if ours (our lease); otherwise the
    /// current key (another process runs the session).
    async fn put_presence(
        self: &Arc<Self>,
        presence: &Presence,
    ) -> BackendResult<Result<(), KeyValue>> {
        let lease = self.lease_for(&presence.session_id).await?;
        let key = self.keys.session(&presence.session_id);
        let value = self.presence_value(presence);
        let put = TxnOp::put(
            key.clone(),
            value.clone(),
            lease.map(|l| PutOptions::new().with_lease(l)),
        );
        let lease_id = lease.unwrap_or(0);
        if self.presence_unchanged(&key, &value, lease_id).await? {
            return Ok(Ok(()));
        }
        let mut compare = Compare::lease(key.clone(), CompareOp::Equal, lease_id);
        for _ in 0..ROUNDS {
            let txn = Txn::new()
                .when(vec![compare])
                .and_then(vec![put.clone()])
                .or_else(vec![TxnOp::get(key.clone(), None)]);
            let resp = self.conn.txn("announce", txn).await?;
            if resp.succeeded() {
                let revision = resp.header().map_or(0, |h| h.revision());
                self.presence_written
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), (value.clone(), lease_id, revision));
                return Ok(Ok(()));
            }
            let current = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            compare = match current {
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                // Under a lease this client had before (it lost touch and got a new one).
                Some(kv) if self.granted_here(kv.lease()) => {
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())
                }
                Some(kv) => return Ok(Err(kv)),
            };
        }
        Err(BackendError::Unavailable {
            endpoint: self.conn.endpoints().to_owned(),
            reason: format!("{key}: changed during every attempt to write it"),
        })
    }

    /// Whether the presence key still holds what this client last wrote there, `value` under
    /// `lease`, untouched since: then a refresh (every few seconds, from every agent) is a read,
    /// not a write through etcd's log (100 idle agents made etcd spend 13 % of a core on them).
    async fn presence_unchanged(&self, key: &str, value: &[u8], lease: i64) -> BackendResult<bool> {
        let written = self
            .presence_written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        let Some((last, last_lease, revision)) = written else {
            return Ok(false);
        };
        if last != value || last_lease != lease {
            return Ok(false);
        }
        let got = self.conn.get("announce", key, None).await?;
        Ok(got
            .kvs()
            .first()
            .is_some_and(|kv| kv.lease() == lease && kv.mod_revision() == revision))
    }

    /// Writes `presence` (under this process's lease) over the presence key `current`, if it has
    /// not changed since; `false` if it had.
    async fn replace_presence(
        self: &Arc<Self>,
        presence: &Presence,
        current: &KeyValue,
    ) -> BackendResult<bool> {
        let lease = self.lease_for(&presence.session_id).await?;
        let key = self.keys.session(&presence.session_id);
        let value = self.presence_value(presence);
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                current.mod_revision(),
            )])
            .and_then(vec![TxnOp::put(
                key,
                value,
                lease.map(|l| PutOptions::new().with_lease(l)),
            )]);
        Ok(self.conn.txn("take over", txn).await?.succeeded())
    }

    /// Who runs `session`, if its presence is under a lease this client never had.
    pub(crate) async fn registered_elsewhere(
        &self,
        session: &agent_core::SessionId,
    ) -> BackendResult<Option<Presence>> {
        let key = self.keys.session(session);
        let resp = self.conn.get("read presence", &key, None).await?;
        Ok(resp
            .kvs()
            .first()
            .filter(|kv| !self.granted_here(kv.lease()))
            .map(|kv| holder(kv, session)))
    }

    /// Whether `lease` was granted for a one-shot command's claim (`ifc claim --ttl`): no
    /// process keeps it alive, so the claim is its session's to adopt (or end) from anywhere,
    /// as a claim without a lease is.
    pub(crate) async fn one_shot_lease(&self, lease: i64) -> BackendResult<bool> {
        let key = self.keys.oneshot(lease);
        let resp = self.conn.get("read one-shot lease", &key, None).await?;
        Ok(resp.kvs().first().is_some_and(|kv| kv.lease() == lease))
    }

    /// Revokes `lease` if it is the lease of `session`'s registered process and that process is
    /// known to be gone (it ran on this host and no such pid exists): `true` if revoked.
    pub(crate) async fn revoke_if_dead(
        &self,
        session: &agent_core::SessionId,
        lease: i64,
    ) -> BackendResult<bool> {
        let key = self.keys.session(session);
        let resp = self.conn.get("read presence", &key, None).await?;
        let Some(kv) = resp.kvs().first().filter(|kv| kv.lease() == lease) else {
            return Ok(false);
        };
        let p = holder(kv, session);
        if p.pid == 0 || agent_core::process::may_be_alive(p.pid, &p.host) {
            return Ok(false);
        }
        tracing::warn!(%session, pid = p.pid, host = %p.host, "the process holding the claim is gone: its lease is revoked");
        self.inherit(lease);
        self.revoke_lease(lease).await.map(|()| true)
    }

    /// A presence published here: what a lease loss publishes again.
    fn remember(&self, presence: &Presence) {
        self.presences
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(presence.session_id.clone(), presence.clone());
    }

    pub(crate) async fn announce(self: &Arc<Self>, presence: &Presence) -> BackendResult<()> {
        match self.put_presence(presence).await? {
            Ok(()) => {
                self.remember(presence);
                Ok(())
            }
            Err(kv) => {
                let other = holder(&kv, &presence.session_id);
                Err(BackendError::SessionElsewhere {
                    session: presence.session_id.to_string(),
                    elsewhere: agent_core::process::describe(&other),
                })
            }
        }
    }

    pub(crate) async fn register(
        self: &Arc<Self>,
        presence: &Presence,
        take_over: bool,
    ) -> BackendResult<Option<Presence>> {
        for _ in 0..ROUNDS {
            let kv = match self.put_presence(presence).await? {
                Ok(()) => {
                    self.registered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(presence.session_id.clone());
                    self.remember(presence);
                    return Ok(None);
                }
                Err(kv) => kv,
            };
            let other = holder(&kv, &presence.session_id);
            let gone = other.pid != 0 && !agent_core::process::may_be_alive(other.pid, &other.host);
            if !take_over && !gone {
                return Ok(Some(other));
            }
            if !gone {
                // A live process is told, not fenced: the presence becomes this process's, and
                // the other one learns at its next presence write (every few seconds) that it
                // is to stop. It finishes or gives back what it runs; until then its claims are
                // its own (this process's re-claims of them are refused), so no task runs twice.
                tracing::warn!(session = %presence.session_id, pid = other.pid, host = %other.host, "taking the session over from a running process: it is told to stop");
                if self.replace_presence(presence, &kv).await? {
                    self.registered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(presence.session_id.clone());
                    self.remember(presence);
                    return Ok(None);
                }
                continue;
            }
            if kv.lease() != 0 {
                // Its lease becomes this process's (so the presence key under it is replaced in
                // the next round); its claims are ended by `end_inherited`, once the runs it
                // finished are reported.
                tracing::warn!(session = %presence.session_id, pid = other.pid, host = %other.host, "taking the session over from a process that is gone: its claims are this process's until it has reported the runs that one finished");
                for lease in std::iter::once(kv.lease()).chain(inherited_in(&kv)) {
                    if self.granted_here(lease) {
                        continue;
                    }
                    self.inherit(lease);
                    self.keep_inherited(lease);
                    self.inherited
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(lease);
                }
            } else {
                tracing::warn!(session = %presence.session_id, pid = other.pid, host = %other.host, "taking the session over from a process that is gone");
                let key = self.keys.session(&presence.session_id);
                let txn = Txn::new()
                    .when(vec![Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then(vec![TxnOp::delete(key, None)]);
                self.conn.txn("take over", txn).await?;
            }
        }
        Err(BackendError::Unavailable {
            endpoint: self.conn.endpoints().to_owned(),
            reason: format!(
                "{}: the session's presence kept changing",
                self.keys.session(&presence.session_id)
            ),
        })
    }

    /// Revokes the leases `register` took on from gone processes (see `Backend::end_inherited`).
    pub(crate) async fn end_inherited(&self) -> BackendResult<()> {
        let leases = std::mem::take(&mut *self.inherited.lock().unwrap_or_else(|p| p.into_inner()));
        for (i, &id) in leases.iter().enumerate() {
            if let Err(e) = self.revoke_lease(id).await {
                // Tried again at the next call; meanwhile they end by their lease's TTL.
                self.inherited
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(&leases[i..]);
                return Err(e);
            }
            tracing::info!(
                lease = id,
                "the claims left by the session's previous process end now"
            );
        }
        Ok(())
    }

    pub(crate) async fn sessions(&self) -> BackendResult<Vec<Presence>> {
        let resp = self
            .conn
            .get(
                "sessions",
                self.keys.sessions_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let mut out: Vec<Presence> = resp
            .kvs()
            .iter()
            .filter_map(|kv| match serde_json::from_slice::<Presence>(kv.value()) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::debug!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable presence; skipped");
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        Ok(out)
    }
}
