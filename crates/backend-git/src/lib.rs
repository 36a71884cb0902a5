//! backend-git: the markdown task board and STATUS files over git pull/commit/push. A claim is a
//! compare-and-swap on the branch (commit, then a push that only lands on the head it was made
//! on); a dedicated clone per session, never the user's working tree. Polling (and, for a remote
//! on this machine, a file watch on its refs) turns new commits into the same events the etcd
//! backend emits.

pub mod board;
pub mod config;
mod core;
mod repo;
pub mod status;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent_core::{
    Backend, BackendError, BackendResult, ClaimOutcome, FencingToken, Health, Listing, Mirrored,
    Presence, PutOutcome, RecordOutcome, ReleaseOutcome, ReleaseTo, SessionId, Subscription, Task,
    TaskId, TaskPatch,
};
use async_trait::async_trait;
use tokio::sync::mpsc;

pub use config::GitConfig;

use crate::core::Core;

/// A session's view of the coordination repo through its own clone. Share it as
/// `Arc<GitBackend>`; dropping it stops its polling and heartbeats (to others, a crash: its claims
/// go stale after `stale_after`).
#[derive(Debug)]
pub struct GitBackend {
    core: Arc<Mutex<Core>>,
    remote: String,
    background: tokio::task::JoinHandle<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    // Core is consistent between statements that touch git; a panic mid-operation leaves at worst
    // a clone that the next sync resets.
    core.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `op` on the core off the async runtime.
async fn blocking<T: Send + 'static>(
    core: &Arc<Mutex<Core>>,
    op: impl FnOnce(&mut Core) -> BackendResult<T> + Send + 'static,
) -> BackendResult<T> {
    let core = Arc::clone(core);
    tokio::task::spawn_blocking(move || {
        let mut core = lock(&core);
        // Other processes using the same clone wait for this operation (and it for theirs).
        let _clone = core.exclusive();
        op(&mut core)
    })
    .await
    .map_err(|e| BackendError::Unavailable {
        endpoint: "git worker".into(),
        reason: if e.is_cancelled() {
            SHUTTING_DOWN.into()
        } else {
            e.to_string()
        },
    })?
}

/// Why a git operation did not run: the process is ending (its runtime cancels what waits).
const SHUTTING_DOWN: &str = "the process is shutting down";

/// Whether `e` only says the process is ending (nothing to warn about).
fn shutting_down(e: &BackendError) -> bool {
    matches!(e, BackendError::Unavailable { reason, .. } if reason == SHUTTING_DOWN)
}

/// How many pushes a claim, release or put tries before reporting contention.
const MAX_ROUNDS: usize = 64;

/// Runs `round` until it lands (`Some`), pausing between rejected pushes with the lock released,
/// so heartbeats and polls of the same clone are not starved by a long contention.
async fn rounds<T: Send + 'static>(
    core: &Arc<Mutex<Core>>,
    remote: &str,
    what: String,
    round: impl Fn(&mut Core) -> BackendResult<Option<T>> + Clone + Send + 'static,
) -> BackendResult<T> {
    // A ref lock a killed writer left in a local remote is removed once it is STALE_LOCK old:
    // until then the operation waits for it rather than fail (the tester's report: agents
    // started just after a writer was killed exited 3 after ~8 s, and the lock went 22 s
    // later), and once it is gone the pushes have their full count again.
    let (mut left, mut waiting) = (MAX_ROUNDS, false);
    for attempt in 0.. {
        if let Some(done) = blocking(core, round.clone()).await? {
            return Ok(done);
        }
        left -= 1;
        match (attempt >= 8).then(|| left_ref_lock(remote)).flatten() {
            // (A writer holds the lock for milliseconds: one a second old was left.)
            Some((lock, age))
                if age >= Duration::from_secs(1)
                    && age < repo::STALE_LOCK + Duration::from_secs(5) =>
            {
                if !std::mem::replace(&mut waiting, true) {
                    tracing::warn!(lock = %lock.display(), age_s = age.as_secs(), "{what}: every push is refused by a ref lock in the remote (left by a writer killed mid-update, or one that is stuck); waiting until it is {} s old and removed", repo::STALE_LOCK.as_secs());
                }
                left = left.max(1);
            }
            None if waiting => (waiting, left) = (false, MAX_ROUNDS),
            _ => {}
        }
        if left == 0 {
            break;
        }
        // Growing, jittered pauses spread the racers out.
        let base = 2u64 << attempt.min(5);
        let jitter = rand::random::<u64>() % (base + 1);
        tokio::time::sleep(Duration::from_millis(base + jitter)).await;
    }
    // A ref lock a writer killed mid-update left in a local remote refuses every push as a lost
    // race would; said as what it is (the tester's report: "the branch kept moving", and the
    // branch had not moved).
    let reason = match left_ref_lock(remote) {
        Some((lock, age)) => format!(
            "{what}: pushes refused: {} exists, {}s old (left by a writer that was killed mid-update, or one that is stuck) and could not be removed",
            lock.display(),
            age.as_secs()
        ),
        None => format!("{what}: the branch kept moving; {MAX_ROUNDS} pushes rejected"),
    };
    Err(BackendError::Unavailable {
        endpoint: remote.to_owned(),
        reason,
    })
}

/// A ref lock file in a local remote's `refs/heads`, with its age.
fn left_ref_lock(remote: &str) -> Option<(std::path::PathBuf, Duration)> {
    let heads = std::path::Path::new(remote.trim_start_matches("file://")).join("refs/heads");
    std::fs::read_dir(heads).ok()?.flatten().find_map(|e| {
        let path = e.path();
        let age = e.metadata().ok()?.modified().ok()?.elapsed().ok()?;
        path.extension()
            .is_some_and(|x| x == "lock")
            .then_some((path, age))
    })
}

impl GitBackend {
    /// The board's path in the coordination repo.
    pub async fn board_path(&self) -> String {
        let core = Arc::clone(&self.core);
        tokio::task::spawn_blocking(move || lock(&core).board_path().to_owned())
            .await
            .unwrap_or_default()
    }

    /// Rewrites one file of the coordination repo as `update` makes it from the file at the
    /// remote head (`None`: no such file), in one commit pushed as a compare-and-swap: if someone
    /// pushed first, the head is fetched and `update` runs again. `Ok(false)`: nothing to change.
    pub async fn update_file<F>(&self, path: &str, message: &str, update: F) -> BackendResult<bool>
    where
        F: Fn(Option<&str>) -> BackendResult<String> + Clone + Send + 'static,
    {
        let (path, message) = (path.to_owned(), message.to_owned());
        rounds(
            &self.core,
            &self.remote,
            format!("update {path}"),
            move |c| c.update_file(&path, &message, &update),
        )
        .await
    }

    /// A file of the coordination repo at the head last fetched (`None`: no such file), e.g. the
    /// fleet file committed there, so a committed `rollback: true` reaches every session. With
    /// `fetch`, the remote head is fetched first.
    pub async fn read_file(&self, path: &str, fetch: bool) -> BackendResult<Option<Vec<u8>>> {
        let path = path.to_owned();
        blocking(&self.core, move |c| {
            if fetch {
                c.sync()?;
            }
            c.read_file(&path)
        })
        .await
    }

    /// Opens (or clones) the session's clone and starts polling every `poll_interval`, at once
    /// when a local remote's refs change, and heartbeats for held claims every `stale_after / 4`.
    pub async fn open(config: GitConfig) -> BackendResult<GitBackend> {
        let remote = config.remote.clone();
        let (poll_interval, heartbeat) = (config.poll_interval, config.stale_after / 4);
        let local = config.local_remote().filter(|_| config.watch_remote);
        let core = tokio::task::spawn_blocking(move || Core::open(config))
            .await
            .map_err(|e| BackendError::Unavailable {
                endpoint: remote.clone(),
                reason: e.to_string(),
            })??;
        let core = Arc::new(Mutex::new(core));
        let (kick_tx, kick) = mpsc::unbounded_channel();
        let watcher = local.and_then(|path| watch_refs(&path, kick_tx));
        let background = tokio::spawn(run(Arc::downgrade(&core), poll_interval, heartbeat, kick));
        Ok(GitBackend {
            core,
            remote,
            background,
            _watcher: watcher,
        })
    }
}

/// Watches a local remote's refs; each change kicks the poller.
fn watch_refs(
    path: &std::path::Path,
    kick: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = kick.send(());
        }
    })
    .ok()?;
    let refs = path.join("refs");
    let watched = watcher
        .watch(&refs, notify::RecursiveMode::Recursive)
        .is_ok();
    let _ = watcher.watch(
        &path.join("packed-refs"),
        notify::RecursiveMode::NonRecursive,
    );
    if !watched {
        tracing::debug!(path = %refs.display(), "cannot watch the remote's refs; polling only");
        return None;
    }
    Some(watcher)
}

/// Polls and heartbeats until the backend is dropped.
async fn run(
    core: std::sync::Weak<Mutex<Core>>,
    poll_interval: Duration,
    heartbeat: Duration,
    mut kick: mpsc::UnboundedReceiver<()>,
) {
    let mut poll = tokio::time::interval(poll_interval);
    let mut beat = tokio::time::interval(heartbeat.max(Duration::from_millis(50)));
    let mut failures = 0u32;
    let mut backoff = agent_core::retry::Backoff::new(
        Duration::from_millis(100),
        poll_interval.max(Duration::from_millis(200)),
    );
    loop {
        let heartbeat_due = tokio::select! {
            _ = poll.tick() => false,
            Some(()) = kick.recv() => {
                // Coalesce a burst of file events into one poll.
                tokio::time::sleep(Duration::from_millis(10)).await;
                while kick.try_recv().is_ok() {}
                false
            }
            _ = beat.tick() => true,
        };
        let Some(core) = core.upgrade() else { return };
        let result = if heartbeat_due {
            beat_until_landed(&core).await
        } else {
            let beat_now = blocking(&core, |c| {
                let r = c.sync().map(|snap| c.after_poll(&snap));
                c.fence_if_silent();
                r
            })
            .await;
            match beat_now {
                Ok(true) => beat_until_landed(&core).await,
                other => other.map(drop),
            }
        };
        match result {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!("git remote reachable again");
                }
                failures = 0;
                backoff.reset();
            }
            // A one-shot command ending: not a failure of the remote (it printed a warning
            // after its output).
            Err(e) if shutting_down(&e) => return,
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(error = %e, "git poll failed; retrying with backoff");
                }
                failures += 1;
                drop(core);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// A heartbeat, tried again at once (a few times) when another session's push got in first.
async fn beat_until_landed(core: &Arc<Mutex<Core>>) -> BackendResult<()> {
    for _ in 0..8 {
        if blocking(core, |c| c.heartbeat()).await? {
            return Ok(());
        }
        let jitter = 5 + rand::random::<u64>() % 35;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
    }
    Ok(())
}

impl Drop for GitBackend {
    fn drop(&mut self) {
        self.background.abort();
    }
}

#[async_trait]
impl Backend for GitBackend {
    fn name(&self) -> &'static str {
        "git"
    }

    async fn get(&self, task: &TaskId) -> BackendResult<Option<Task>> {
        let task = task.clone();
        blocking(&self.core, move |c| c.get(&task)).await
    }

    async fn list(&self) -> BackendResult<Listing> {
        blocking(&self.core, |c| c.list()).await
    }

    async fn put(&self, task: &TaskId, patch: &TaskPatch) -> BackendResult<PutOutcome> {
        let (task, patch) = (task.clone(), patch.clone());
        rounds(&self.core, &self.remote, format!("put {task}"), move |c| {
            c.put(&task, &patch)
        })
        .await
    }

    async fn claim(&self, task: &TaskId, session: &SessionId) -> BackendResult<ClaimOutcome> {
        let (task, session) = (task.clone(), session.clone());
        rounds(
            &self.core,
            &self.remote,
            format!("claim {task}"),
            move |c| c.claim(&task, &session),
        )
        .await
    }

    async fn release(
        &self,
        task: &TaskId,
        session: &SessionId,
        to: ReleaseTo,
        token: Option<FencingToken>,
    ) -> BackendResult<ReleaseOutcome> {
        let (task, session) = (task.clone(), session.clone());
        let what = format!("release {task}");
        rounds(&self.core, &self.remote, what, move |c| {
            c.release(&task, &session, to, token)
        })
        .await
    }

    async fn record(&self, items: &[Mirrored]) -> BackendResult<Vec<RecordOutcome>> {
        let items = items.to_vec();
        let what = format!("record {} transition(s)", items.len());
        rounds(&self.core, &self.remote, what, move |c| c.record(&items)).await
    }

    async fn subscribe(&self) -> BackendResult<Subscription> {
        let (snapshot, events) = blocking(&self.core, |c| c.subscribe()).await?;
        Ok(Subscription::new(snapshot, events))
    }

    async fn announce(&self, presence: &Presence) -> BackendResult<()> {
        let presence = presence.clone();
        let what = format!("announce {}", presence.session_id);
        rounds(&self.core, &self.remote, what, move |c| {
            c.announce(&presence)
        })
        .await
    }

    async fn register(
        &self,
        presence: &Presence,
        take_over: bool,
    ) -> BackendResult<Option<Presence>> {
        let presence = presence.clone();
        let what = format!("register {}", presence.session_id);
        rounds(&self.core, &self.remote, what, move |c| {
            c.register(&presence, take_over)
        })
        .await
    }

    async fn end_inherited(&self) -> BackendResult<()> {
        rounds(
            &self.core,
            &self.remote,
            "end inherited claims".into(),
            |c| c.end_inherited(),
        )
        .await
    }

    async fn sessions(&self) -> BackendResult<Vec<Presence>> {
        blocking(&self.core, |c| c.sessions()).await
    }

    async fn health(&self) -> Health {
        match blocking(&self.core, |c| c.sync().map(drop)).await {
            Ok(()) => Health {
                reachable: true,
                detail: format!("{}: ok", self.remote),
            },
            Err(e) => Health {
                reachable: false,
                detail: e.to_string(),
            },
        }
    }
}
