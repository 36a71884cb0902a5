//! Presence and registration: `sessions.<id>` holds a running session's presence under its
//! client's lease (it goes when the lease does). Registration is a compare-and-swap on that key,
//! so a session id is live in one process at a time.

use std::sync::Arc;

use agent_core::{process, BackendResult, Presence, SessionId};
use async_nats::jetstream::kv::{CreateErrorKind, Operation, UpdateErrorKind};

use crate::board::{decode_presence, encode_presence, StoredPresence};
use crate::inner::{lock, Inner};
use crate::keys;

/// How many times a registration reads and tries again when the key changed under it.
const TRIES: usize = 16;

enum Found {
    Nothing(Option<u64>),
    Presence(Box<StoredPresence>, u64),
}

impl Inner {
    async fn presence_of(&self, session: &SessionId) -> BackendResult<Found> {
        let entry = self
            .kv
            .entry(keys::session(session))
            .await
            .map_err(|e| self.error("read a presence", e))?;
        Ok(match entry {
            None => Found::Nothing(None),
            Some(e) if e.operation != Operation::Put => Found::Nothing(Some(e.revision)),
            Some(e) => match decode_presence(&e.value) {
                Some(p) => Found::Presence(Box::new(p), e.revision),
                None => Found::Nothing(Some(e.revision)),
            },
        })
    }

    /// Writes `presence` over revision `rev` (`None`: the key must not exist); `false` if it
    /// changed meanwhile.
    async fn write_presence(
        &self,
        presence: &Presence,
        lease: Option<i64>,
        rev: Option<u64>,
    ) -> BackendResult<bool> {
        let key = keys::session(&presence.session_id);
        let others: Vec<i64> = {
            let mut mine: Vec<i64> = lock(&self.mine)
                .iter()
                .copied()
                .filter(|&l| Some(l) != lease)
                .collect();
            mine.sort_unstable();
            mine
        };
        let value = encode_presence(presence, lease, &others);
        match rev {
            None => match self.kv.create(key, value).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(self.error("write a presence", e)),
            },
            Some(rev) => match self.kv.update(key, value, rev).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(self.error("write a presence", e)),
            },
        }
    }

    /// Whether presence `p` was written by this client (under `lease`, its lease now, or one it
    /// holds or took over).
    fn written_here(&self, p: &StoredPresence, lease: Option<i64>) -> bool {
        p.lease == lease || p.lease.is_some_and(|l| self.is_mine(l))
    }

    async fn alive(&self, p: &StoredPresence) -> BackendResult<bool> {
        match p.lease {
            Some(l) => self.lease_alive(l).await,
            None => Ok(process::may_be_alive(p.presence.pid, &p.presence.host)),
        }
    }

    pub async fn announce(self: &Arc<Self>, presence: &Presence) -> BackendResult<()> {
        let lease = self.session_lease().await?;
        let session = &presence.session_id;
        for _ in 0..TRIES {
            let rev = match self.presence_of(session).await? {
                Found::Nothing(rev) => rev,
                Found::Presence(p, rev) => {
                    let taken = lock(&self.registered).contains_key(session)
                        && !self.written_here(&p, lease)
                        && self.alive(&p).await?;
                    if taken {
                        // Another process runs this session now; it was told (`SessionTaken`).
                        return Ok(());
                    }
                    Some(rev)
                }
            };
            if self.write_presence(presence, lease, rev).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    pub async fn register(
        self: &Arc<Self>,
        presence: &Presence,
        take_over: bool,
    ) -> BackendResult<Option<Presence>> {
        let lease = self.session_lease().await?;
        let session = &presence.session_id;
        for _ in 0..TRIES {
            let rev = match self.presence_of(session).await? {
                Found::Nothing(rev) => rev,
                Found::Presence(p, rev) => {
                    if !self.written_here(&p, lease) {
                        match self.alive(&p).await? {
                            // Taken over alive: its claims stay its own until it stops.
                            true if take_over => {}
                            true if process::may_be_alive(p.presence.pid, &p.presence.host) => {
                                return Ok(Some(p.presence));
                            }
                            // Its process is gone: its claims become this process's until
                            // `end_inherited`, so that the runs it finished are reported first.
                            true => {
                                if let Some(l) = p.lease {
                                    self.inherit(l).await?;
                                }
                                self.adopt(&p);
                            }
                            // Its lease ended: a run it finished with nobody's write since is
                            // still this session's to report, under that lease.
                            false => self.adopt(&p),
                        }
                    }
                    Some(rev)
                }
            };
            if self.write_presence(presence, lease, rev).await? {
                lock(&self.registered).insert(session.clone(), lease);
                return Ok(None);
            }
        }
        Err(agent_core::BackendError::Unavailable {
            endpoint: self.endpoint(),
            reason: format!(
                "register {session}: the presence changed under {TRIES} tries in a row"
            ),
        })
    }

    /// Takes the leases of a gone process of the session as this process's to end claims under.
    fn adopt(&self, p: &StoredPresence) {
        let mut mine = lock(&self.mine);
        mine.extend(p.lease);
        mine.extend(p.inherited.iter().copied());
    }

    /// Revokes `lease` if it is the lease of `session`'s registered process and that process is
    /// known to be gone (it ran on this host and no such pid exists): `true` if revoked.
    pub async fn revoke_if_dead(&self, session: &SessionId, lease: i64) -> BackendResult<bool> {
        let Found::Presence(p, _) = self.presence_of(session).await? else {
            return Ok(false);
        };
        if p.lease != Some(lease) || process::may_be_alive(p.presence.pid, &p.presence.host) {
            return Ok(false);
        }
        self.kv
            .purge(keys::lease(lease))
            .await
            .map_err(|e| self.error("revoke a gone process's lease", e))?;
        Ok(true)
    }

    pub async fn end_inherited(&self) -> BackendResult<()> {
        let leases = std::mem::take(&mut *lock(&self.inherited));
        self.revoke(leases).await;
        Ok(())
    }

    pub async fn close(&self) {
        let current = self.lease.lock().await.take();
        let mut leases = std::mem::take(&mut *lock(&self.inherited));
        leases.extend(current);
        self.revoke(leases).await;
    }
}
