//! `ifc bench`: the migration guide's latency test done properly. N tasks under a scratch prefix,
//! M concurrent sessions (each its own connection, lease and watch cache) claiming until every
//! task is taken; claim latency, claims per second and event latency (claim issued → a separate
//! watcher hears of it), next to the floor measured in the same run with the same client: a bare
//! etcd transaction and a bare put → watch event. Checks that no task was won twice.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_core::{Backend, BackendEvent, ClaimOutcome, SessionId, TaskId, TaskPatch, TaskStatus};
use anyhow::{Context, Result};
use backend_etcd::EtcdBackend;
use rand::seq::SliceRandom;
use serde_json::json;

use crate::cli::{BenchArgs, Global, Output};
use crate::metrics::percentile;
use crate::settings;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (p50, p95, p99) in milliseconds.
fn spread(samples: &[Duration]) -> (f64, f64, f64) {
    let v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
    (
        percentile(v.clone(), 0.50),
        percentile(v.clone(), 0.95),
        percentile(v, 0.99),
    )
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub async fn run(g: &Global, args: &BenchArgs, output: Output, out: &mut impl Write) -> Result<u8> {
    let fleet = settings::fleet(g)?;
    let mut config = settings::etcd_config(g, fleet.as_ref(), Some(Duration::from_secs(10)))?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f");
    config.prefix = format!("{}ifc-bench-{stamp}-{}/", config.prefix, std::process::id());
    let connect = |c| async move {
        EtcdBackend::connect(c)
            .await
            .context("cannot connect to etcd")
    };
    let setup = Arc::new(connect(config.clone()).await?);
    let outcome = measure(&setup, &config, args, connect).await;
    // The scratch prefix goes whatever happened.
    if let Err(e) = setup.purge_prefix().await {
        tracing::warn!(prefix = %config.prefix, error = %e, "cannot remove the bench's scratch prefix");
    }
    let report = outcome?;
    match output {
        Output::Json => writeln!(out, "{report}")?,
        Output::Table => {
            let f = |k: &str| report[k].as_f64().unwrap_or_default();
            writeln!(
                out,
                "{} tasks, {} sessions: {} claims won, {} double claims, {:.0} claims/s",
                args.tasks,
                args.sessions,
                report["claims"],
                report["double_claims"],
                f("claims_per_sec")
            )?;
            writeln!(
                out,
                "{:<22} {:>9} {:>9} {:>9}",
                "", "p50 ms", "p95 ms", "p99 ms"
            )?;
            for (label, key) in [
                ("ifc claim (attempts)", "claim"),
                ("bare etcd txn", "raw_txn"),
            ] {
                writeln!(
                    out,
                    "{label:<22} {:>9.3} {:>9.3} {:>9.3}",
                    f(&format!("{key}_p50_ms")),
                    f(&format!("{key}_p95_ms")),
                    f(&format!("{key}_p99_ms"))
                )?;
            }
            writeln!(
                out,
                "{:<22} {:>9.3} {:>9.3} {:>9}",
                "ifc claim (wins)",
                f("won_claim_p50_ms"),
                f("won_claim_p95_ms"),
                "-"
            )?;
            writeln!(
                out,
                "{:<22} {:>9.3} {:>9.3} {:>9}",
                "ifc event",
                f("event_p50_ms"),
                f("event_p95_ms"),
                "-"
            )?;
            writeln!(
                out,
                "{:<22} {:>9} {:>9.3} {:>9}",
                "bare put → watch",
                "-",
                f("raw_watch_p95_ms"),
                "-"
            )?;
            writeln!(out, "claim p95 / bare txn p95: {:.2}", f("ratio_p95"))?;
        }
    }
    let doubles = report["double_claims"].as_u64().unwrap_or(1);
    Ok(if doubles == 0 { 0 } else { crate::exit::NO })
}

async fn measure<F, Fut>(
    setup: &Arc<EtcdBackend>,
    config: &backend_etcd::EtcdConfig,
    args: &BenchArgs,
    connect: F,
) -> Result<serde_json::Value>
where
    F: Fn(backend_etcd::EtcdConfig) -> Fut,
    Fut: std::future::Future<Output = Result<EtcdBackend>>,
{
    let n = args.tasks as usize;
    let ids: Vec<TaskId> = (0..n)
        .map(|i| TaskId::parse(&format!("B{i:07}")))
        .collect::<Result<_, _>>()?;
    // Create the tasks, 16 at a time.
    let bar = crate::output::progress(ids.len(), "creating tasks");
    for chunk in ids.chunks(16) {
        if let Some(b) = &bar {
            b.inc(chunk.len() as u64);
        }
        let mut puts = tokio::task::JoinSet::new();
        for id in chunk {
            let (b, id) = (Arc::clone(setup), id.clone());
            puts.spawn(async move { b.put(&id, &TaskPatch::default()).await });
        }
        while let Some(r) = puts.join_next().await {
            r.context("a task creation crashed")??;
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // A watcher that notes when it hears of each claim.
    let watcher = connect(config.clone()).await?;
    let mut sub = watcher.subscribe().await?;
    let heard: Arc<Mutex<HashMap<TaskId, Instant>>> = Arc::default();
    let heard_w = Arc::clone(&heard);
    let listen = tokio::spawn(async move {
        while let Some(ev) = sub.next().await {
            if let BackendEvent::Task(e) = ev {
                if e.new_status == Some(TaskStatus::Claimed) {
                    heard_w
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(e.task)
                        .or_insert_with(Instant::now);
                }
            }
        }
    });
    let mut claimers = Vec::with_capacity(args.sessions as usize);
    for k in 0..args.sessions {
        let b = connect(config.clone()).await?;
        b.start_watch().await?;
        claimers.push((SessionId::parse(&format!("bench-{k}"))?, Arc::new(b)));
    }
    let started = Instant::now();
    let mut handles = Vec::new();
    for (session, b) in &claimers {
        let (session, b) = (session.clone(), Arc::clone(b));
        let mut order = ids.clone();
        order.shuffle(&mut rand::rng());
        handles.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(order.len());
            let mut wins = Vec::new();
            for id in order {
                let t0 = Instant::now();
                match b.claim(&id, &session).await {
                    Ok(ClaimOutcome::Won(_)) => {
                        samples.push(t0.elapsed());
                        wins.push((id, t0, t0.elapsed()));
                    }
                    Ok(_) => samples.push(t0.elapsed()),
                    Err(e) => return Err(e),
                }
            }
            Ok::<_, agent_core::BackendError>((session, samples, wins))
        }));
    }
    let mut samples = Vec::new();
    let mut won_by: BTreeMap<TaskId, Vec<SessionId>> = BTreeMap::new();
    let mut issued: HashMap<TaskId, Instant> = HashMap::new();
    let mut won_samples = Vec::new();
    for h in handles {
        let (session, s, wins) = h.await.context("a claimer crashed")??;
        samples.extend(s);
        for (id, t0, took) in wins {
            won_by.entry(id.clone()).or_default().push(session.clone());
            issued.insert(id, t0);
            won_samples.push(took);
        }
    }
    let wall = started.elapsed();
    // Every claim's event, or 10 s at most.
    let wait_until = Instant::now() + Duration::from_secs(10);
    while heard.lock().unwrap_or_else(|p| p.into_inner()).len() < won_by.len()
        && Instant::now() < wait_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listen.abort();
    let events: Vec<Duration> = {
        let heard = heard.lock().unwrap_or_else(|p| p.into_inner());
        issued
            .iter()
            .filter_map(|(id, t0)| heard.get(id).map(|t| t.saturating_duration_since(*t0)))
            .collect()
    };
    for (_, b) in &claimers {
        b.close().await;
    }
    let claims: usize = won_by.values().map(Vec::len).sum();
    let double_claims = won_by.values().filter(|w| w.len() > 1).count();
    let raw = setup.raw_txn_floor(n.min(1000)).await?;
    let raw_watch = setup.raw_watch_floor(n.min(200)).await?;
    let (c50, c95, c99) = spread(&samples);
    let (won50, won95, _) = spread(&won_samples);
    let (e50, e95, _) = spread(&events);
    let (r50, r95, r99) = spread(&raw);
    let (_, w95, _) = spread(&raw_watch);
    Ok(json!({
        "tasks": n,
        "sessions": args.sessions,
        "claims": claims,
        "double_claims": double_claims,
        "unclaimed": n - won_by.len(),
        "claim_attempts": samples.len(),
        "claim_p50_ms": round3(c50),
        "claim_p95_ms": round3(c95),
        "claim_p99_ms": round3(c99),
        "won_claim_p50_ms": round3(won50),
        "won_claim_p95_ms": round3(won95),
        "claims_per_sec": round3(claims as f64 / wall.as_secs_f64().max(1e-9)),
        "event_p50_ms": round3(e50),
        "event_p95_ms": round3(e95),
        "events_heard": events.len(),
        "raw_txn_p50_ms": round3(r50),
        "raw_txn_p95_ms": round3(r95),
        "raw_txn_p99_ms": round3(r99),
        "raw_watch_p95_ms": round3(w95),
        "ratio_p95": round3(if r95 > 0.0 { c95 / r95 } else { 0.0 }),
    }))
}
