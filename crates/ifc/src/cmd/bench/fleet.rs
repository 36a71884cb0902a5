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

use agent_core::config::TaskPattern;
use agent_core::{Backend, BackendEvent, Interest, Presence, SessionId, TaskId, TaskStatus};
use anyhow::{Context, Result};
use backend_etcd::{EtcdBackend, EtcdConfig};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use crate::cli::Lists;

/// Sessions set up at once (lease grant + presence put + subscription each).
const SETUP_IN_FLIGHT: usize = 512;

/// Not every event reached the sessions whose lists cover it: the bench's run fails (exit 1),
/// as a double claim does.
#[derive(Debug, thiserror::Error)]
#[error("the sessions heard {heard} events of {expected} and nothing more for a minute")]
pub struct Undelivered {
    pub heard: u64,
    pub expected: u64,
}

/// A claim heard by the observer session, and when.
pub type Heard = (TaskId, Instant);

#[derive(Debug)]
pub struct Fleet {
    /// The measured claimer's connection, the observer's (when there are two sessions or more),
    /// then the simulated sessions' shared ones.
    pub backends: Vec<Arc<EtcdBackend>>,
    measured: usize,
    pub sessions: Vec<SessionId>,
    /// Events delivered to all sessions' subscriptions so far.
    pub delivered: Arc<AtomicU64>,
    /// How many sessions hear every task event (the others hear none of the bench's tasks).
    pub hearing: usize,
    /// How long setting every session up took.
    pub setup: Duration,
    drains: Vec<AbortHandle>,
    runtime: tokio::runtime::Runtime,
}

async fn connect(config: EtcdConfig) -> Result<EtcdBackend> {
    let b = crate::settings::connect_etcd(config).await?;
    b.start_watch().await.context("cannot start the watch")?;
    Ok(b)
}

impl Fleet {
    /// Sets `sessions` sessions up. Session 0 (the claimer whose claims are timed) and the last
    /// one (the observer, whose hearing of them is timed; the claims it hears go to the returned
    /// channel) each have a connection of their own on this runtime, as separate agent processes
    /// would. The others share `connections` connections whose watches, fan-out and lease timers
    /// run on the sessions' runtime.
    pub async fn start(
        config: &EtcdConfig,
        sessions: usize,
        connections: usize,
        lists: Lists,
    ) -> Result<(Fleet, mpsc::UnboundedReceiver<Heard>)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-sessions")
            .enable_all()
            .build()
            .context("cannot start the sessions' runtime")?;
        let mut backends = vec![Arc::new(connect(config.clone()).await?)];
        if sessions > 1 {
            backends.push(Arc::new(connect(config.clone()).await?));
        }
        let measured = backends.len();
        if sessions > measured {
            for _ in 0..connections {
                let b = runtime
                    .spawn(connect(config.clone()))
                    .await
                    .context("a connection set-up crashed")??;
                backends.push(Arc::new(b));
            }
        }
        let ids: Vec<SessionId> = (0..sessions)
            .map(|k| SessionId::parse(&format!("bench-{k}")))
            .collect::<Result<_, _>>()?;
        let delivered = Arc::new(AtomicU64::new(0));
        let (observer_tx, observer_rx) = mpsc::unbounded_channel();
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let started = Instant::now();
        let bar = crate::output::progress(sessions, "setting sessions up");
        let mut drains = Vec::with_capacity(sessions);
        let mut setups = JoinSet::new();
        for (k, id) in ids.iter().enumerate() {
            if setups.len() >= SETUP_IN_FLIGHT {
                drains.push(join_one(&mut setups).await?);
                if let Some(b) = &bar {
                    b.inc(1);
                }
            }
            let at = slot(k, sessions, measured, backends.len());
            let backend = Arc::clone(&backends[at]);
            let presence = Presence {
                session_id: id.clone(),
                state: "idle".into(),
                current_task: None,
                backend: "etcd".into(),
                started_at: chrono::Utc::now(),
                pid: std::process::id(),
                host: host.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                heartbeat: None,
                claim_p95_us: None,
            };
            let delivered = Arc::clone(&delivered);
            let observer = (k + 1 == sessions).then(|| observer_tx.clone());
            let interest = match lists {
                Lists::Disjoint if at >= measured => {
                    Interest::tasks(vec![
                        TaskPattern::parse(&format!("{id}.*")).map_err(|e| anyhow::anyhow!(e))?
                    ])
                }
                _ => Interest::all(),
            };
            // A session's lease timer and its subscription's task run where its set-up does.
            let on = match at < measured {
                true => tokio::runtime::Handle::current(),
                false => runtime.handle().clone(),
            };
            setups.spawn_on(
                async move {
                    backend.announce(&presence).await?;
                    let mut sub = backend.subscribe_to(&interest).await?;
                    let drain = tokio::spawn(async move {
                        while let Some(ev) = sub.next().await {
                            delivered.fetch_add(1, Ordering::Relaxed);
                            if let (Some(tx), BackendEvent::Task(e)) = (&observer, &ev) {
                                if e.new_status == Some(TaskStatus::Claimed) {
                                    // The bench stops listening after the latency phase.
                                    let _ = tx.send((e.task.clone(), Instant::now()));
                                }
                            }
                        }
                    });
                    Ok::<_, agent_core::BackendError>(drain.abort_handle())
                },
                &on,
            );
        }
        while !setups.is_empty() {
            drains.push(join_one(&mut setups).await?);
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok((
            Fleet {
                backends,
                measured,
                sessions: ids,
                delivered,
                setup: started.elapsed(),
                drains,
                runtime,
                hearing: match lists {
                    Lists::Shared => sessions,
                    Lists::Disjoint => measured.min(sessions),
                },
            },
            observer_rx,
        ))
    }

    /// The backend (connection) session `k` uses.
    pub fn backend_of(&self, k: usize) -> &Arc<EtcdBackend> {
        &self.backends[slot(k, self.sessions.len(), self.measured, self.backends.len())]
    }

    /// How the sessions are spread over the connections, in words.
    pub fn multiplexing(&self) -> String {
        let shared = self.backends.len() - self.measured;
        format!(
            "{} sessions in this process, each with its own lease (kept alive by its own timer) and \
             its own subscription ({} of them to every task event, the others to a list of their \
             own): the measured claimer and observer on a connection each, the other {} over \
             {shared} shared connection(s) (one watch each), whose watches, fan-out and lease \
             timers run on a runtime of their own",
            self.sessions.len(),
            self.hearing,
            self.sessions.len().saturating_sub(self.measured),
        )
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
            if last.1.elapsed() >= Duration::from_secs(60) {
                return Err(Undelivered {
                    heard: now,
                    expected,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Ends every session: leases revoked (presence keys go with them), subscriptions dropped.
    pub async fn close(self) {
        let mut closes = JoinSet::new();
        for b in &self.backends {
            let b = Arc::clone(b);
            closes.spawn(async move { b.close().await });
        }
        while closes.join_next().await.is_some() {}
        for d in &self.drains {
            d.abort();
        }
        self.runtime.shutdown_background();
        // The watches end here, while the connections they read are still up.
        drop(self.backends);
        tokio::task::yield_now().await;
    }
}

async fn join_one(
    setups: &mut JoinSet<Result<AbortHandle, agent_core::BackendError>>,
) -> Result<AbortHandle> {
    let done = setups
        .join_next()
        .await
        .context("no session set-up was running")?;
    done.context("a session set-up crashed")?
        .context("cannot set a session up")
}

/// The connection of session `k` of `sessions`: the first `measured` are the claimer's and the
/// observer's, the rest shared round-robin.
fn slot(k: usize, sessions: usize, measured: usize, connections: usize) -> usize {
    match k {
        0 => 0,
        _ if k + 1 == sessions && measured > 1 => 1,
        _ => measured + k % (connections - measured).max(1),
    }
}
