//! `ifc bench --store nats`: one session's claims against a bare key-value compare-and-swap, and
//! events against a bare key-value watch, interleaved one by one in one run; claims/s against
//! bare compare-and-swaps/s at each concurrency. Everything happens in a scratch bucket, deleted
//! at the end.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_core::{Backend, BackendEvent, ClaimOutcome, SessionId, TaskId, TaskPatch, TaskStatus};
use anyhow::{bail, Context, Result};
use backend_nats::{NatsBackend, NatsConfig};
use serde::Serialize;
use tokio::task::JoinSet;

use super::{verdict, Spread, THROUGHPUT_TARGET};
use crate::cli::{BenchArgs, Global, Output};
use crate::settings;

#[derive(Debug, Serialize)]
struct Level {
    concurrency: usize,
    claims_per_sec: f64,
    bare_update_per_sec: f64,
    ratio: f64,
    claim: Spread,
}

#[derive(Debug, Serialize)]
struct Report {
    store: &'static str,
    endpoint: String,
    lease_ttl_s: u64,
    samples: usize,
    claim: Spread,
    bare_update: Spread,
    claim_over_bare: Spread,
    event: Spread,
    bare_watch: Spread,
    event_over_bare: Spread,
    throughput: Vec<Level>,
    tasks: usize,
    tasks_won: usize,
    double_claims: usize,
}

fn tid(s: &str) -> Result<TaskId> {
    TaskId::parse(s).context("a bench task id")
}

async fn connect(config: &NatsConfig) -> Result<NatsBackend> {
    NatsBackend::connect(config.clone())
        .await
        .map_err(settings::nats_error)
}

/// Creates `ids`, available, and as many floor keys named `{floor}{i}`; their revisions.
async fn prepare(b: &NatsBackend, ids: &[TaskId], floor: &str) -> Result<Vec<u64>> {
    let patch = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    let mut revs = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        b.put(id, &patch).await?;
        revs.push(b.bare_prepare(&format!("{floor}{i}")).await?);
    }
    Ok(revs)
}

/// Drains a subscription this process holds only so that its client claims from its board.
fn drain(mut sub: agent_core::Subscription) {
    tokio::spawn(async move { while sub.next().await.is_some() {} });
}

pub async fn run(g: &Global, args: &BenchArgs, output: Output, out: &mut impl Write) -> Result<u8> {
    if args.peer {
        bail!("--peer runs the guide's etcd stack: it has no NATS counterpart here");
    }
    if args.sessions.is_some() || args.connections.is_some() || args.lists.is_some() {
        return Err(agent_core::BackendError::InvalidInput(
            "--sessions, --connections and --lists set up simulated sessions, which the NATS \
             bench does not have yet: leave them out with --store nats"
                .into(),
        )
        .into());
    }
    let fleet_file = settings::fleet(g)?;
    let mut config = settings::nats_config(g, fleet_file.as_ref(), Some(args.lease_ttl))?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
    config.bucket = format!("ifc-bench-{stamp}-{}", std::process::id());
    let scratch = connect(&config).await?;
    let measured = measure(&config, args).await;
    if let Err(e) = scratch.delete_bucket().await {
        tracing::warn!(bucket = %config.bucket, error = %e, "cannot delete the bench's scratch bucket");
    }
    scratch.close().await;
    let report = measured?;
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string(&report)?)?,
        Output::Table => table(&report, out)?,
    }
    let healthy = report.double_claims == 0 && report.tasks_won == report.tasks;
    Ok(if healthy { 0 } else { crate::exit::NO })
}

async fn measure(config: &NatsConfig, args: &BenchArgs) -> Result<Report> {
    let samples = args.samples as usize;
    let (claimer, observer) = (connect(config).await?, connect(config).await?);
    let session = SessionId::parse("bench-claimer").context("session id")?;
    let ids: Vec<TaskId> = (0..samples)
        .map(|i| tid(&format!("lat.{i}")))
        .collect::<Result<_>>()?;
    let revs = prepare(&claimer, &ids, "lat").await?;
    // An agent holds a subscription: its claims are decided from its board.
    drain(claimer.subscribe().await?);
    let mut sub = observer.subscribe().await?;
    let mut bare = observer.bare_watch().await?;
    let (mut claim, mut bare_update, mut event, mut bare_watch) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, task) in ids.iter().enumerate() {
        for first in [i % 2 == 0, i % 2 == 1] {
            if first {
                let name = format!("lat{i}");
                let t0 = Instant::now();
                if !claimer.bare_update(&name, revs[i]).await? {
                    bail!("bare update of {name} found it changed");
                }
                bare_update.push(t0.elapsed());
                tokio::time::timeout(Duration::from_secs(30), bare.heard(&name))
                    .await
                    .context("the bare watch heard nothing in 30 s")??;
                bare_watch.push(t0.elapsed());
            } else {
                let t0 = Instant::now();
                let outcome = claimer.claim(task, &session).await?;
                claim.push(t0.elapsed());
                let ClaimOutcome::Won(_) = outcome else {
                    bail!("the only claimer of {task} did not win it: {outcome:?}");
                };
                let heard = tokio::time::timeout(Duration::from_secs(30), async {
                    loop {
                        match sub.next().await {
                            Some(BackendEvent::Task(e))
                                if &e.task == task && e.new_status == Some(TaskStatus::Claimed) =>
                            {
                                return Ok(());
                            }
                            Some(_) => continue,
                            None => bail!("the observer's subscription ended"),
                        }
                    }
                })
                .await
                .with_context(|| format!("no event for the claim of {task} in 30 s"))?;
                heard?;
                event.push(t0.elapsed());
            }
        }
    }
    let (claim, bare_update, event, bare_watch) = (
        Spread::of(&claim),
        Spread::of(&bare_update),
        Spread::of(&event),
        Spread::of(&bare_watch),
    );
    let levels: Vec<usize> = match &args.concurrency {
        Some(levels) => levels.iter().map(|&c| c as usize).collect(),
        None => vec![1, 10, 100],
    };
    let (mut throughput, mut tasks) = (Vec::new(), samples);
    // Every win of the run: the latency phase's (its claimer won each) and each level's.
    let mut wins: BTreeMap<TaskId, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    for c in levels {
        let (level, won) = level(config, args.tasks as usize, c).await?;
        tasks += args.tasks as usize;
        for id in won {
            *wins.entry(id).or_default() += 1;
        }
        throughput.push(level);
    }
    claimer.close().await;
    observer.close().await;
    Ok(Report {
        store: "nats",
        endpoint: config.endpoint(),
        lease_ttl_s: config.lease_ttl.map_or(0, |t| t.as_secs()),
        samples,
        claim_over_bare: claim.over(&bare_update),
        claim,
        bare_update,
        event_over_bare: event.over(&bare_watch),
        event,
        bare_watch,
        throughput,
        tasks,
        tasks_won: wins.len(),
        double_claims: wins.values().filter(|&&n| n > 1).count(),
    })
}

/// Sessions per connection at a concurrency level, as the etcd bench multiplexes its simulated
/// sessions: each connection holds one subscription, which every session on it claims from.
const SESSIONS_PER_CONNECTION: usize = 25;

/// `c` sessions, over one connection (and subscription) per 25 of them, take `n` tasks between
/// them; then `c` workers on the same connections make `n` bare compare-and-swaps. The level,
/// and the tasks won (once per win).
async fn level(config: &NatsConfig, n: usize, c: usize) -> Result<(Level, Vec<TaskId>)> {
    let mut clients = Vec::new();
    for _ in 0..c.div_ceil(SESSIONS_PER_CONNECTION) {
        clients.push(Arc::new(connect(config).await?));
    }
    let ids: Arc<Vec<TaskId>> = Arc::new(
        (0..n)
            .map(|i| tid(&format!("tp{c}.{i}")))
            .collect::<Result<_>>()?,
    );
    let floor = format!("tp{c}-");
    let revs = Arc::new(prepare(&clients[0], &ids, &floor).await?);
    for b in &clients {
        drain(b.subscribe().await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = JoinSet::new();
    for k in 0..c {
        let b = &clients[k % clients.len()];
        let (b, ids, next) = (Arc::clone(b), Arc::clone(&ids), Arc::clone(&next));
        let session = SessionId::parse(&format!("bench-{c}-{k}")).context("session id")?;
        workers.spawn(async move {
            let (mut won, mut times) = (Vec::new(), Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else {
                    return Ok::<_, anyhow::Error>((won, times));
                };
                let t = Instant::now();
                if let ClaimOutcome::Won(_) = b.claim(id, &session).await? {
                    won.push(id.clone());
                }
                times.push(t.elapsed());
            }
        });
    }
    let (mut won, mut times) = (Vec::new(), Vec::new());
    while let Some(r) = workers.join_next().await {
        let (w, t) = r.context("a claimer panicked")??;
        won.extend(w);
        times.extend(t);
    }
    let claims_per_sec = won.len() as f64 / t0.elapsed().as_secs_f64();
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = JoinSet::new();
    for k in 0..c {
        let b = &clients[k % clients.len()];
        let (b, revs, next, floor) = (
            Arc::clone(b),
            Arc::clone(&revs),
            Arc::clone(&next),
            floor.clone(),
        );
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(rev) = revs.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                b.bare_update(&format!("{floor}{i}"), *rev).await?;
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.context("a bare worker panicked")??;
    }
    let bare_update_per_sec = n as f64 / t0.elapsed().as_secs_f64();
    for b in &clients {
        b.close().await;
    }
    let ratio = if bare_update_per_sec > 0.0 {
        claims_per_sec / bare_update_per_sec
    } else {
        0.0
    };
    Ok((
        Level {
            concurrency: c,
            claims_per_sec,
            bare_update_per_sec,
            ratio,
            claim: Spread::of(&times),
        },
        won,
    ))
}

fn table(r: &Report, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "ifc bench against NATS JetStream at {} (scratch bucket, lease TTL {} s; at each concurrency, one connection and subscription per {SESSIONS_PER_CONNECTION} sessions).",
        r.endpoint, r.lease_ttl_s
    )?;
    writeln!(out)?;
    Spread::header(out, r.samples)?;
    let row = Spread::row;
    let ratio_row = Spread::ratio_row;
    row(out, "ifc claim, one session", &r.claim)?;
    row(out, "bare KV update (CAS), same connection", &r.bare_update)?;
    ratio_row(out, "  ratio (target p95 <= 1.15)", &r.claim_over_bare)?;
    row(out, "ifc event: claim -> another session hears", &r.event)?;
    row(out, "bare KV update -> bare KV watch", &r.bare_watch)?;
    ratio_row(out, "  ratio (target p95 <= 1.15)", &r.event_over_bare)?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<12} {:>10} {:>14} {:>7} {:>10} {:>10}  ratio target >= {THROUGHPUT_TARGET}",
        "concurrent", "claims/s", "bare CAS/s", "ratio", "claim p50", "claim p99"
    )?;
    for l in &r.throughput {
        writeln!(
            out,
            "{:<12} {:>10.0} {:>14.0} {:>7.2} {:>10.3} {:>10.3}  {}",
            l.concurrency,
            l.claims_per_sec,
            l.bare_update_per_sec,
            l.ratio,
            l.claim.p50_ms,
            l.claim.p99_ms,
            verdict((l.ratio * 100.0).round() / 100.0 >= THROUGHPUT_TARGET)
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{} of {} tasks won, {} double claims",
        r.tasks_won, r.tasks, r.double_claims
    )?;
    Ok(())
}
