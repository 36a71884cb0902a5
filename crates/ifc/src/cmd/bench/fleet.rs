//! The bench's simulated fleet: `sessions` sessions multiplexed over `connections` etcd
//! connections (one `EtcdBackend`, hence one watch cache and one etcd watcher, per connection).
//! Each session announces itself like an agent (its own lease, kept alive, and its presence key)
//! and holds its own subscription, drained by its own task: its own place in the fan-out. The
//! sessions' tasks run on a runtime of their own, as other processes' would: thousands of them
//! woken by one event do not queue in front of the claim being measured (they still share the
//! CPU with it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_core::{Backend, BackendEvent, Presence, SessionId, TaskId, TaskStatus};
use anyhow::{Context, Result};
use backend_etcd::{EtcdBackend, EtcdConfig};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Sessions set up at once (lease grant + presence put + subscription each).
const SETUP_IN_FLIGHT: usize = 512;

/// A claim heard by the observer session, and when.
pub type Heard = (TaskId, Instant);

#[derive(Debug)]
pub struct Fleet {
    pub backends: Vec<Arc<EtcdBackend>>,
    pub sessions: Vec<SessionId>,
    /// Events delivered to all sessions' subscriptions so far.
    pub delivered: Arc<AtomicU64>,
    /// How long setting every session up took.
    pub setup: Duration,
    drains: JoinSet<()>,
    runtime: tokio::runtime::Runtime,
}

impl Fleet {
    /// Connects `connections` backends, each with its watch cache, then sets every session up.
    /// The last session is the observer: the claims it hears go to the returned channel.
    pub async fn start(
        config: &EtcdConfig,
        sessions: usize,
        connections: usize,
    ) -> Result<(Fleet, mpsc::UnboundedReceiver<Heard>)> {
        let mut backends = Vec::with_capacity(connections);
        for _ in 0..connections {
            let b = EtcdBackend::connect(config.clone())
                .await
                .context("cannot connect to etcd")?;
            b.start_watch().await.context("cannot start the watch")?;
            backends.push(Arc::new(b));
        }
        let ids: Vec<SessionId> = (0..sessions)
            .map(|k| SessionId::parse(&format!("bench-{k}")))
            .collect::<Result<_, _>>()?;
        let delivered = Arc::new(AtomicU64::new(0));
        let (observer_tx, observer_rx) = mpsc::unbounded_channel();
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-sessions")
            .enable_all()
            .build()
            .context("cannot start the sessions' runtime")?;
        let started = Instant::now();
        let bar = crate::output::progress(sessions, "setting sessions up");
        let mut drains = JoinSet::new();
        let mut setups = JoinSet::new();
        for (k, id) in ids.iter().enumerate() {
            if setups.len() >= SETUP_IN_FLIGHT {
                join_one(&mut setups, &mut drains, runtime.handle()).await?;
                if let Some(b) = &bar {
                    b.inc(1);
                }
            }
            let backend = Arc::clone(&backends[k % connections]);
            let presence = Presence {
                session_id: id.clone(),
                state: "idle".into(),
                current_task: None,
                backend: "etcd".into(),
                started_at: chrono::Utc::now(),
                pid: std::process::id(),
                host: host.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
            };
            let delivered = Arc::clone(&delivered);
            let observer = (k + 1 == sessions).then(|| observer_tx.clone());
            setups.spawn(async move {
                backend.announce(&presence).await?;
                let mut sub = backend.subscribe().await?;
                Ok::<_, agent_core::BackendError>(async move {
                    while let Some(ev) = sub.next().await {
                        delivered.fetch_add(1, Ordering::Relaxed);
                        if let (Some(tx), BackendEvent::Task(e)) = (&observer, &ev) {
                            if e.new_status == Some(TaskStatus::Claimed) {
                                // The bench stops listening after the latency phase.
                                let _ = tx.send((e.task.clone(), Instant::now()));
                            }
                        }
                    }
                })
            });
        }
        while !setups.is_empty() {
            join_one(&mut setups, &mut drains, runtime.handle()).await?;
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok((
            Fleet {
                backends,
                sessions: ids,
                delivered,
                setup: started.elapsed(),
                drains,
                runtime,
            },
            observer_rx,
        ))
    }

    /// The backend (connection) session `k` uses.
    pub fn backend_of(&self, k: usize) -> &Arc<EtcdBackend> {
        &self.backends[k % self.backends.len()]
    }

    /// Waits until every backend's cache shows each of `tasks` as available (so a claim is
    /// answered from the cache, as in a running agent), for at most `limit`.
    pub async fn await_available(&self, tasks: &[TaskId], limit: Duration) -> Result<()> {
        let until = Instant::now() + limit;
        for b in &self.backends {
            for t in tasks {
                while b.cached_status(t) != Some(TaskStatus::Available) {
                    anyhow::ensure!(
                        Instant::now() < until,
                        "task {t} did not reach every watch cache within {limit:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        Ok(())
    }

    /// Waits until `expected` events in all were delivered to the sessions; fails after a
    /// minute without progress.
    pub async fn await_delivered(&self, expected: u64) -> Result<()> {
        let mut last = (self.delivered.load(Ordering::Relaxed), Instant::now());
        while last.0 < expected {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let now = self.delivered.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            }
            anyhow::ensure!(
                last.1.elapsed() < Duration::from_secs(60),
                "the sessions heard {now} events of {expected} and nothing more for a minute"
            );
        }
        Ok(())
    }

    /// Ends every session: leases revoked (presence keys go with them), subscriptions dropped.
    pub async fn close(mut self) {
        let mut closes = JoinSet::new();
        for b in &self.backends {
            let b = Arc::clone(b);
            closes.spawn(async move { b.close().await });
        }
        while closes.join_next().await.is_some() {}
        self.drains.abort_all();
        self.runtime.shutdown_background();
        // The watches end here, while the connections they read are still up.
        drop(self.backends);
        tokio::task::yield_now().await;
    }
}

async fn join_one<F>(
    setups: &mut JoinSet<Result<F, agent_core::BackendError>>,
    drains: &mut JoinSet<()>,
    runtime: &tokio::runtime::Handle,
) -> Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(done) = setups.join_next().await else {
        return Ok(());
    };
    let drain = done
        .context("a session set-up crashed")?
        .context("cannot set a session up")?;
    drains.spawn_on(drain, runtime);
    Ok(())
}
