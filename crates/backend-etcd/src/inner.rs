//! The state one `EtcdBackend` shares with its background tasks: the connection, the key layout,
//! the watch cache, the session leases, and the handles of every task it spawned.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use agent_core::{SessionId, TaskId};
use tokio::sync::{mpsc, Notify, OnceCell};
use tokio::task::AbortHandle;

use crate::cache::{Cache, Held, Repair};
use crate::config::EtcdConfig;
use crate::conn::Conn;
use crate::fanout::Fanout;
use crate::keys::Keys;

/// A presence key as this client last wrote it: value, lease, revision.
pub(crate) type PresenceWritten = (Vec<u8>, i64, i64);

#[derive(Debug)]
pub(crate) struct Inner {
    pub conn: Conn,
    pub keys: Keys,
    pub config: EtcdConfig,
    cache: Mutex<Cache>,
    /// The subscribers, handed the cache's events after its lock is released.
    pub fanout: Fanout,
    /// Signalled each time the cache (re)syncs with a list.
    pub synced: Notify,
    /// Signalled when the cache's scope widened or has tasks to read (the informer follows).
    pub scope_changed: Notify,
    /// Whether the watch stream is currently open and answering.
    pub watching: AtomicBool,
    /// Times the watch stream broke and was resumed.
    pub reconnects: std::sync::atomic::AtomicU64,
    /// Each session's live lease (granted on its first leased claim or announce). The map lock
    /// is never held across a call to etcd: sessions are granted their leases in parallel.
    pub leases: Mutex<HashMap<SessionId, Arc<OnceCell<i64>>>>,
    /// Every lease this client was granted: a claim under one of them is this process's own
    /// (a re-claim after a lease was replaced is not a claim of another process).
    pub granted: Mutex<std::collections::HashSet<i64>>,
    /// Leases of this client's sessions' gone processes, taken on at registration and revoked
    /// by `end_inherited` (their claims are this process's until then).
    pub inherited: Mutex<Vec<i64>>,
    /// Each presence key this client last wrote: its value, lease and revision (`presence`:
    /// a refresh that would write the same again only reads the key).
    pub presence_written: Mutex<HashMap<String, PresenceWritten>>,
    /// Sessions this process registered (agents): a new lease for one of them is granted only
    /// while no other process has taken the session over.
    pub registered: Mutex<std::collections::HashSet<SessionId>>,
    /// The presence each session last published here: published again under a new lease when
    /// its lease is lost (else an idle agent vanished from `ifc status` until its next claim).
    pub presences: Mutex<HashMap<SessionId, agent_core::Presence>>,
    pub repairs: mpsc::UnboundedSender<Repair>,
    /// Sessions whose lease was lost: their presence is to be published again (by the task
    /// `EtcdBackend::connect` starts, outside the lease keeper).
    pub republish: mpsc::UnboundedSender<SessionId>,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Why the watch cache's last list failed (`None`: it did not): what a wait for its first
    /// list reports, rather than only that it timed out.
    list_failure: Mutex<Option<String>>,
}

impl Inner {
    pub fn new(
        conn: Conn,
        config: EtcdConfig,
        repairs: mpsc::UnboundedSender<Repair>,
        republish: mpsc::UnboundedSender<SessionId>,
    ) -> Self {
        let bound = config.event_queue_bound;
        Inner {
            keys: Keys::new(&config.prefix),
            conn,
            config,
            cache: Mutex::new(Cache::default()),
            fanout: Fanout::new(bound),
            synced: Notify::new(),
            scope_changed: Notify::new(),
            watching: AtomicBool::new(false),
            reconnects: std::sync::atomic::AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            granted: Mutex::new(Default::default()),
            inherited: Mutex::new(Vec::new()),
            presence_written: Mutex::new(HashMap::new()),
            registered: Mutex::new(Default::default()),
            presences: Mutex::new(HashMap::new()),
            repairs,
            republish,
            tasks: Mutex::new(Vec::new()),
            list_failure: Mutex::new(None),
        }
    }

    /// The watch cache. Never held across an await. The events a change produced reach the
    /// subscribers when the guard is dropped, after the lock is released.
    pub fn cache(&self) -> CacheGuard<'_> {
        // Cache updates do not leave it half-changed on panic (no early returns between paired
        // writes), so a poisoned lock is still consistent.
        CacheGuard {
            guard: Some(self.cache.lock().unwrap_or_else(|p| p.into_inner())),
            fanout: &self.fanout,
        }
    }

    /// Remembers a claim this client holds (see `Cache::hold`).
    pub fn hold(&self, task: TaskId, held: Held) {
        if self.cache().hold(task, held) {
            self.scope_changed.notify_one();
        }
    }

    /// The cache mirrors every task from now on: its scope widens and it lists again.
    pub fn widen_scope(&self) {
        self.cache().widen();
        self.scope_changed.notify_one();
    }

    /// Why the watch cache's last list failed, if it did.
    pub fn list_failure(&self) -> MutexGuard<'_, Option<String>> {
        self.list_failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a background task so it ends with the backend.
    pub fn adopt(&self, handle: AbortHandle) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    /// Ends every background task (watch, keep-alives, repairs). Leases are not revoked: to
    /// etcd this looks like a crash, and claims expire after their TTL.
    pub fn abort_all(&self) {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for t in tasks.iter() {
            t.abort();
        }
    }

    /// Whether the watch stream is open and answering.
    pub fn is_watching(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }
}

/// The cache's lock; on drop, the lock goes first, then the events go out.
pub(crate) struct CacheGuard<'a> {
    guard: Option<MutexGuard<'a, Cache>>,
    fanout: &'a Fanout,
}

impl std::ops::Deref for CacheGuard<'_> {
    type Target = Cache;
    fn deref(&self) -> &Cache {
        self.guard.as_ref().expect("the guard is held until drop")
    }
}

impl std::ops::DerefMut for CacheGuard<'_> {
    fn deref_mut(&mut self) -> &mut Cache {
        self.guard.as_mut().expect("the guard is held until drop")
    }
}

impl Drop for CacheGuard<'_> {
    fn drop(&mut self) {
        let Some(mut cache) = self.guard.take() else {
            return;
        };
        let events = cache.take_outbox();
        drop(cache);
        self.fanout.deliver(events);
    }
}
