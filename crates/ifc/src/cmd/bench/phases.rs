//! The bench's measurements, each next to its floor in the same run: claims against bare
//! transactions and events against a bare watch, interleaved one by one; claims per second
//! against bare transactions per second at the same concurrency.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_core::{Backend, ClaimOutcome, SessionId, TaskId, TaskStatus};
use anyhow::{bail, Context, Result};
use backend_etcd::EtcdBackend;
use rand::seq::SliceRandom;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::fleet::{Fleet, Heard};

/// Who won each task, over the whole run.
pub type Winners = BTreeMap<TaskId, Vec<SessionId>>;

/// Sequential samples: one session's claims, a bare transaction and a claim-shaped one on the same
/// connection, rotating which goes first; each claim timed until another session (the last one in the
/// fan-out) hears it, and the bare transaction until a bare watch on that session's connection
/// does. Each sample starts once every session has heard the previous claim, so a sample is not
/// measured while the fan-out of the one before still runs (that is the event figure).
#[derive(Debug, Default)]
pub struct Latency {
    pub claim: Vec<Duration>,
    pub bare_txn: Vec<Duration>,
    /// A transaction of the claim's shape (two keys, one leased) without ifc.
    pub shaped_txn: Vec<Duration>,
    pub event: Vec<Duration>,
    pub bare_watch: Vec<Duration>,
}

pub async fn latency(
    fleet: &Fleet,
    tasks: &[TaskId],
    heard: &mut mpsc::UnboundedReceiver<Heard>,
    winners: &mut Winners,
) -> Result<Latency> {
    let mut delivered = fleet.delivered.load(std::sync::atomic::Ordering::Relaxed);
    let claimer = &fleet.sessions[0];
    let backend = fleet.backend_of(0);
    let observer_backend = fleet.backend_of(fleet.sessions.len() - 1);
    let mut bare_watch = observer_backend.bare_watch().await?;
    let shaped = prepare_shaped(backend, "shaped", tasks.len()).await?;
    let mut out = Latency::default();
    for (i, task) in tasks.iter().enumerate() {
        let mut order = [Kind::Bare, Kind::Shaped, Kind::Claim];
        order.rotate_left(i % 3);
        for kind in order {
            match kind {
                Kind::Shaped => {
                    let t0 = Instant::now();
                    if !backend
                        .bare_claim_txn(&format!("shaped/{i}"), shaped[i], claimer)
                        .await?
                    {
                        bail!("claim-shaped transaction shaped/{i} found its keys changed");
                    }
                    out.shaped_txn.push(t0.elapsed());
                }
                Kind::Bare => {
                    let name = format!("latency/{i}");
                    let t0 = Instant::now();
                    if !backend.bare_txn(&name).await? {
                        bail!("bare transaction {name} found its key already there");
                    }
                    out.bare_txn.push(t0.elapsed());
                    bare_watch.heard(&name).await?;
                    out.bare_watch.push(t0.elapsed());
                }
                Kind::Claim => {
                    let t0 = Instant::now();
                    let outcome = backend.claim(task, claimer).await?;
                    out.claim.push(t0.elapsed());
                    let ClaimOutcome::Won(_) = outcome else {
                        bail!("the only claimer of {task} did not win it: {outcome:?}");
                    };
                    winners
                        .entry(task.clone())
                        .or_default()
                        .push(claimer.clone());
                    loop {
                        let (id, at) = tokio::time::timeout(Duration::from_secs(30), heard.recv())
                            .await
                            .with_context(|| {
                                format!("no session heard the claim of {task} in 30 s")
                            })?
                            .context("the observer session stopped")?;
                        if &id == task {
                            out.event.push(at.saturating_duration_since(t0));
                            break;
                        }
                    }
                    delivered += fleet.hearing as u64;
                    fleet.await_delivered(delivered).await?;
                }
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Bare,
    Shaped,
    Claim,
}

/// One concurrency level: claims won per second by `concurrency` sessions taking `tasks`
/// between them, and bare transactions per second by as many workers on the same connections.
#[derive(Debug)]
pub struct Throughput {
    pub concurrency: usize,
    pub claims_per_sec: f64,
    pub bare_per_sec: f64,
    pub shaped_per_sec: f64,
    /// Claim calls made (wins, and losses to a session that got there first).
    pub attempts: usize,
    pub claim: Vec<Duration>,
}

pub async fn throughput(
    fleet: &Fleet,
    concurrency: usize,
    tasks: &[TaskId],
    winners: &mut Winners,
) -> Result<Throughput> {
    let bare_per_sec = bare_rate(fleet, concurrency, tasks.len(), false).await?;
    let shaped_per_sec = bare_rate(fleet, concurrency, tasks.len(), true).await?;
    // One shuffled order cut in `concurrency` parts, one per session (bare workers do not
    // contend either). Races between sessions are the subject of the race tests, not of this
    // figure.
    let mut order = tasks.to_vec();
    order.shuffle(&mut rand::rng());
    let order: Arc<[TaskId]> = order.into();
    let started = Instant::now();
    let mut claimers = JoinSet::new();
    for k in 0..concurrency {
        let (session, backend) = (fleet.sessions[k].clone(), Arc::clone(fleet.backend_of(k)));
        let order = Arc::clone(&order);
        let part = k * order.len() / concurrency..(k + 1) * order.len() / concurrency;
        claimers.spawn(async move {
            let mut won = Vec::new();
            let mut took = Vec::new();
            for id in &order[part] {
                let t0 = Instant::now();
                let outcome = backend.claim(id, &session).await?;
                took.push(t0.elapsed());
                if let ClaimOutcome::Won(_) = outcome {
                    won.push(id.clone());
                }
            }
            Ok::<_, agent_core::BackendError>((session, won, took))
        });
    }
    let (mut wins, mut claim) = (0, Vec::new());
    while let Some(done) = claimers.join_next().await {
        let (session, won, took) = done.context("a claimer crashed")??;
        wins += won.len();
        claim.extend(took);
        for id in won {
            winners.entry(id).or_default().push(session.clone());
        }
    }
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    Ok(Throughput {
        concurrency,
        claims_per_sec: wins as f64 / wall,
        bare_per_sec,
        shaped_per_sec,
        attempts: claim.len(),
        claim,
    })
}

/// Bare transactions per second: `workers` workers (worker k on session k's connection)
/// creating `total` fresh keys between them; `shaped`: claim-shaped transactions under session
/// k's lease.
async fn bare_rate(fleet: &Fleet, workers: usize, total: usize, shaped: bool) -> Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let tag = format!("shaped-{workers}");
    let revs: Arc<[i64]> = match shaped {
        true => prepare_shaped(fleet.backend_of(0), &tag, total)
            .await?
            .into(),
        false => Arc::new([]),
    };
    let started = Instant::now();
    let mut set = JoinSet::new();
    for k in 0..workers {
        let (backend, next) = (Arc::clone(fleet.backend_of(k)), Arc::clone(&next));
        let (session, revs, tag) = (fleet.sessions[k].clone(), Arc::clone(&revs), tag.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, agent_core::BackendError>(());
                }
                match shaped {
                    true => {
                        backend
                            .bare_claim_txn(&format!("{tag}/{i}"), revs[i], &session)
                            .await?
                    }
                    false => backend.bare_txn(&format!("rate-{workers}/{i}")).await?,
                };
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.context("a bare worker crashed")??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// Writes the records of `n` claim-shaped transactions `<tag>/<i>` (64 at a time), like tasks
/// created before they are claimed; their mod revisions.
async fn prepare_shaped(backend: &Arc<EtcdBackend>, tag: &str, n: usize) -> Result<Vec<i64>> {
    in_chunks(n, |i| {
        let (backend, name) = (Arc::clone(backend), format!("{tag}/{i}"));
        async move { backend.bare_claim_prepare(&name).await }
    })
    .await
}

/// Runs `op(0..n)` 64 at a time; the results in order. Set-up writes, not measured.
pub async fn in_chunks<T, F, Fut>(n: usize, op: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = agent_core::BackendResult<T>> + Send + 'static,
{
    let mut out = Vec::with_capacity(n);
    let bar = crate::output::progress(n, "writing tasks");
    for start in (0..n).step_by(64) {
        let mut set = JoinSet::new();
        for i in start..(start + 64).min(n) {
            let fut = op(i);
            set.spawn(async move { (i, fut.await) });
        }
        let mut chunk = Vec::with_capacity(set.len());
        while let Some(done) = set.join_next().await {
            let (i, r) = done.context("a set-up write crashed")?;
            chunk.push((i, r?));
        }
        chunk.sort_by_key(|(i, _)| *i);
        if let Some(b) = &bar {
            b.inc(chunk.len() as u64);
        }
        out.extend(chunk.into_iter().map(|(_, r)| r));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(out)
}

/// How sessions sharing one list fare: claim calls per task won.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SharedList {
    pub sessions: usize,
    pub tasks: usize,
    /// Each session in its own order (the claim loop's, for a glob).
    pub attempts_per_win: f64,
    /// Every session in the same order (the board's), as before issue 18.
    pub same_order_attempts_per_win: f64,
}

/// `concurrency` sessions claim from one list of `tasks` as agents do: each the first task, in
/// its order, that its watch cache shows available, until none is; once in each session's own
/// order (`agent_core::claim_loop::spread`, what the claim loop uses for a glob) on `tasks`,
/// once all in the board's order on `same_order` (the herd: every session chases the same task).
pub async fn shared_list(
    fleet: &Fleet,
    concurrency: usize,
    tasks: &[TaskId],
    same_order: &[TaskId],
    winners: &mut Winners,
) -> Result<SharedList> {
    let spread = race_one_list(fleet, concurrency, tasks, true, winners).await?;
    let herd = race_one_list(fleet, concurrency, same_order, false, winners).await?;
    Ok(SharedList {
        sessions: concurrency,
        tasks: tasks.len(),
        attempts_per_win: spread,
        same_order_attempts_per_win: herd,
    })
}

/// Claim calls per win of `concurrency` sessions racing through `tasks`.
async fn race_one_list(
    fleet: &Fleet,
    concurrency: usize,
    tasks: &[TaskId],
    own_order: bool,
    winners: &mut Winners,
) -> Result<f64> {
    let mut claimers = JoinSet::new();
    for k in 0..concurrency {
        let (session, backend) = (fleet.sessions[k].clone(), Arc::clone(fleet.backend_of(k)));
        let mut order = tasks.to_vec();
        if own_order {
            order.sort_by_cached_key(|t| (agent_core::claim_loop::spread(&session, t), t.clone()));
        }
        claimers.spawn(async move {
            // The first task of its order its cache shows available, again and again: a task
            // passed over (taken) is never available again here, so one pass does it.
            let (mut attempts, mut won) = (0usize, Vec::new());
            for id in &order {
                if backend.cached_status(id) != Some(TaskStatus::Available) {
                    continue;
                }
                attempts += 1;
                if let ClaimOutcome::Won(_) = backend.claim(id, &session).await? {
                    won.push(id.clone());
                }
            }
            Ok::<_, agent_core::BackendError>((session, attempts, won))
        });
    }
    let (mut attempts, mut wins) = (0, 0);
    while let Some(done) = claimers.join_next().await {
        let (session, tried, won) = done.context("a claimer crashed")??;
        attempts += tried;
        wins += won.len();
        for id in won {
            winners.entry(id).or_default().push(session.clone());
        }
    }
    Ok(attempts as f64 / wins.max(1) as f64)
}
