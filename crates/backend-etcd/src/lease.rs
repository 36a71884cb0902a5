//! Session leases: one per session, granted on its first leased claim and kept alive every TTL/3
//! by our own loop (one short keep-alive stream per renewal). When the lease cannot be renewed
//! before its deadline, or etcd says it is gone, every claim under it is reported lost.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use agent_core::retry::Backoff;
use agent_core::{BackendError, BackendResult, SessionId};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::inner::Inner;

impl Inner {
    /// The lease `session`'s claims are bound to (granting it on first use); `None` when claims
    /// are not leased.
    pub(crate) async fn lease_for(
        self: &Arc<Self>,
        session: &SessionId,
    ) -> BackendResult<Option<i64>> {
        let Some(ttl) = self.config.lease_ttl else {
            return Ok(None);
        };
        let cell = Arc::clone(self.lease_map().entry(session.clone()).or_default());
        let id = cell.get_or_try_init(|| self.grant(session, ttl)).await?;
        Ok(Some(*id))
    }

    /// Grants `session` a lease and starts keeping it alive.
    async fn grant(self: &Arc<Self>, session: &SessionId, ttl: Duration) -> BackendResult<i64> {
        if self.registered_here(session) {
            // The lease this process had is gone: if another process took the session over
            // meanwhile, this one must not claim anything more for it.
            if let Some(other) = self.registered_elsewhere(session).await? {
                return Err(BackendError::SessionElsewhere {
                    session: session.to_string(),
                    elsewhere: agent_core::process::describe(&other),
                });
            }
        }
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted_at = Instant::now();
        let grant = |mut c: etcd_client::Client| async move { c.lease_grant(secs, None).await };
        let resp = self.conn.call("lease grant", grant).await?;
        let id = resp.id();
        self.granted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        let ttl = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(1));
        let inner = Arc::clone(self);
        let session = session.clone();
        let keeper = tokio::spawn(async move {
            inner.keep_alive(id, ttl, granted_at + ttl).await;
            if !inner.forget_lease(&session, id) {
                return; // revoked by `close`: not a loss
            }
            inner.cache().lease_lost(id);
            tracing::warn!(%session, lease = id, "session lease lost; its claims are gone");
            let _ = inner.republish.send(session);
            // Not revoked: if etcd still has it (it restarted, or we only lost touch), it ends
            // by its TTL, and a release already under way for a task that finished before the
            // loss can still land with its fencing token instead of the work being done again.
        });
        self.adopt(keeper.abort_handle());
        Ok(id)
    }

    /// After a lease loss: the session's presence (gone with the lease) is published again
    /// under a new one, retried until etcd answers (issue 15 #7: an idle agent whose lease
    /// lapsed vanished from `ifc status` though it ran). Not if another process took the
    /// session over meanwhile: this one hears so at its next claim.
    pub(crate) async fn publish_presence_again(self: &Arc<Self>, session: &SessionId) {
        let last = self
            .presences
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session)
            .cloned();
        let Some(presence) = last else { return };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.announce(&presence).await {
                Ok(()) => {
                    tracing::info!(%session, "presence published again under a new lease");
                    return;
                }
                Err(BackendError::SessionElsewhere { .. }) => return,
                Err(e) => {
                    tracing::debug!(%session, error = %e, "cannot publish the presence yet");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    fn lease_map(&self) -> MutexGuard<'_, HashMap<SessionId, Arc<OnceCell<i64>>>> {
        // Only inserts and removes happen under this lock; a poisoned map is still consistent.
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops using `lease` for `session` (etcd no longer has it); the next claim grants a new one.
    /// Whether it was still in use.
    pub(crate) fn forget_lease(&self, session: &SessionId, lease: i64) -> bool {
        let mut map = self.lease_map();
        let current = map.get(session).is_some_and(|c| c.get() == Some(&lease));
        if current {
            map.remove(session);
        }
        current
    }

    /// Revokes every session lease this backend holds (clean shutdown).
    pub(crate) async fn revoke_all(&self) {
        let leases: Vec<i64> = self
            .lease_map()
            .drain()
            .filter_map(|(_, cell)| cell.get().copied())
            .collect();
        for id in leases {
            let revoke = |mut c: etcd_client::Client| async move { c.lease_revoke(id).await };
            if let Err(e) = self.conn.call("lease revoke", revoke).await {
                tracing::debug!(lease = id, error = %e, "lease revoke failed; it will expire");
            }
        }
    }

    /// Takes on `lease` of this session's process that died on this host, as if granted here: a
    /// run that process finished but could not report (killed between the exit and the report)
    /// may then be completed by this one under its token, while nobody claimed the task since
    /// (`complete_lapsed`).
    pub(crate) fn inherit(&self, lease: i64) {
        self.granted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(lease);
    }

    /// Keeps `lease`, inherited from a gone process of a session registered here, alive until
    /// `end_inherited` revokes it: its claims are this process's meanwhile, so a run that
    /// process finished is reported before another session can claim the task (the tester's
    /// report: a registration held up in git let the lease run out first, and the task ran
    /// again).
    pub(crate) fn keep_inherited(self: &Arc<Self>, lease: i64) {
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let ask =
                |mut c: etcd_client::Client| async move { c.lease_time_to_live(lease, None).await };
            let Ok(resp) = inner.conn.call("lease time-to-live", ask).await else {
                return;
            };
            let secs = |s: i64| Duration::from_secs(u64::try_from(s).unwrap_or(0));
            let (granted, left) = (secs(resp.granted_ttl()), secs(resp.ttl()));
            if left.is_zero() {
                return;
            }
            inner
                .keep_alive(
                    lease,
                    granted.max(Duration::from_secs(1)),
                    Instant::now() + left,
                )
                .await;
        });
    }

    /// Whether an agent of `session` registered through this client (`Backend::register`).
    pub(crate) fn registered_here(&self, session: &SessionId) -> bool {
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(session)
    }

    /// Revokes `lease`; one etcd no longer has (expired, revoked) is revoked already.
    pub(crate) async fn revoke_lease(&self, lease: i64) -> BackendResult<()> {
        let revoke = |mut c: etcd_client::Client| async move { c.lease_revoke(lease).await };
        match self.conn.call("lease revoke", revoke).await {
            Err(e) if !lease_gone(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether `lease` was granted to this client (0, no lease, is nobody's).
    pub(crate) fn granted_here(&self, lease: i64) -> bool {
        lease != 0
            && self
                .granted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&lease)
    }

    /// Renews `lease` until it cannot be: returns when etcd says it is gone or `deadline` passes
    /// without a renewal. Each renewal opens its own keep-alive stream and closes it: a process
    /// hosting many sessions holds no stream per idle lease (etcd keeps two goroutines per open
    /// stream), at the price of one stream set-up per renewal.
    async fn keep_alive(&self, lease: i64, ttl: Duration, mut deadline: Instant) {
        let period = ttl / 3;
        let mut backoff = Backoff::new(
            Duration::from_millis(100),
            period.max(Duration::from_millis(200)),
        );
        let mut next = Instant::now() + period;
        loop {
            tokio::time::sleep_until(next.min(deadline)).await;
            if Instant::now() >= deadline {
                return;
            }
            let sent = Instant::now();
            // Opening the stream sends one renewal and waits for its answer. The stream closes
            // when dropped.
            let renew = |mut c: etcd_client::Client| async move {
                c.lease_keep_alive(lease).await.map(drop)
            };
            // Boxed: an idle keeper then holds a pointer, not the whole call's state (a process
            // hosting many sessions holds one keeper per session).
            match Box::pin(self.conn.call("lease keep-alive", renew)).await {
                Ok(()) => {
                    // A renewal restarts the lease's full TTL.
                    deadline = sent + ttl;
                    next = sent + period;
                    backoff.reset();
                }
                Err(e) if lease_gone(&e) => return,
                Err(e) => {
                    tracing::debug!(lease, error = %e, "lease keep-alive failed; retrying");
                    next = Instant::now() + backoff.next_delay();
                }
            }
        }
    }
}

/// Whether etcd said the lease does not exist (expired or revoked): "requested lease not found"
/// from a write under it, "lease not found" from etcd-client's keep-alive.
pub(crate) fn lease_gone(e: &BackendError) -> bool {
    e.to_string().contains("lease not found")
}
