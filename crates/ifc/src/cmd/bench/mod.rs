//! `ifc bench`: every figure of the performance targets from one run against one etcd, each next
//! to its floor measured in that run. Sessions are simulated in this process (each its own lease
//! and subscription, multiplexed over a few connections); the phases are in `phases`, the
//! sessions in `fleet`, the Python peer in `peer`, memory in `probe`.

mod fleet;
mod nats;
mod peer;
mod phases;
mod probe;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_core::{Backend, TaskId, TaskPatch};
use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use crate::cli::{BenchArgs, Global, Output};
use crate::metrics::percentile;
use crate::settings;
use fleet::Fleet;

/// p50 / p95 / p99 in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Spread {
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
}

impl Spread {
    fn of(samples: &[Duration]) -> Spread {
        let v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Spread {
            p50_ms: round3(percentile(v.clone(), 0.50)),
            p95_ms: round3(percentile(v.clone(), 0.95)),
            p99_ms: round3(percentile(v, 0.99)),
        }
    }

    /// The heading of a table of spreads from `samples` samples.
    fn header(out: &mut dyn Write, samples: usize) -> std::io::Result<()> {
        writeln!(
            out,
            "{:<44} {:>8} {:>8} {:>8}",
            format!("{samples} sequential samples"),
            "p50 ms",
            "p95 ms",
            "p99 ms"
        )
    }

    /// One row of that table.
    fn row(out: &mut dyn Write, label: &str, s: &Spread) -> std::io::Result<()> {
        writeln!(
            out,
            "{label:<44} {:>8.3} {:>8.3} {:>8.3}",
            s.p50_ms, s.p95_ms, s.p99_ms
        )
    }

    /// A row of ratios, ending with whether its p95 meets the target (issue 16: no marker said
    /// so), judged on the figure as printed, so the table never contradicts itself.
    fn ratio_row(out: &mut dyn Write, label: &str, s: &Spread) -> std::io::Result<()> {
        writeln!(
            out,
            "{label:<44} {:>8.3} {:>8.3} {:>8.3}  {}",
            s.p50_ms,
            s.p95_ms,
            s.p99_ms,
            verdict((s.p95_ms * 1000.0).round() / 1000.0 <= RATIO_TARGET)
        )
    }

    /// Each percentile of `self` over the same of `floor`.
    fn over(&self, floor: &Spread) -> Spread {
        let r = |a: f64, b: f64| if b > 0.0 { round3(a / b) } else { 0.0 };
        Spread {
            p50_ms: r(self.p50_ms, floor.p50_ms),
            p95_ms: r(self.p95_ms, floor.p95_ms),
            p99_ms: r(self.p99_ms, floor.p99_ms),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn mb(bytes: Option<f64>) -> Option<f64> {
    bytes.map(|b| round3(b / (1024.0 * 1024.0)))
}

#[derive(Debug, Serialize)]
struct Memory {
    etcd_before_mb: Option<f64>,
    etcd_after_setup_mb: Option<f64>,
    etcd_end_mb: Option<f64>,
    ifc_before_mb: Option<f64>,
    ifc_after_setup_mb: Option<f64>,
    ifc_end_mb: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Level {
    concurrency: usize,
    claims_per_sec: f64,
    bare_txn_per_sec: f64,
    ratio: f64,
    claim_shaped_txn_per_sec: f64,
    claim_attempts: usize,
    claim: Spread,
}

#[derive(Debug, Serialize)]
struct Report {
    endpoint: String,
    sessions: usize,
    connections: usize,
    multiplexing: String,
    lease_ttl_s: u64,
    setup_s: f64,
    memory: Memory,
    etcd_watchers: Option<f64>,
    samples: usize,
    claim: Spread,
    bare_txn: Spread,
    claim_over_bare: Spread,
    claim_shaped_txn: Spread,
    event: Spread,
    bare_watch: Spread,
    event_over_bare: Spread,
    throughput: Vec<Level>,
    /// The most concurrent sessions on one shared list: claim calls per win.
    shared_list: Option<phases::SharedList>,
    peer: Option<Value>,
    tasks: usize,
    tasks_won: usize,
    double_claims: usize,
    events_expected: u64,
    events_delivered: u64,
    fanout_drain_s: f64,
}

/// The target of the latency ratios (ifc over bare etcd, p95).
const RATIO_TARGET: f64 = 1.15;
/// The target of claims/s over bare transactions/s at the same concurrency.
const THROUGHPUT_TARGET: f64 = 0.8;
/// Claim calls per win, sessions sharing one list (issue 18).
const SHARED_LIST_TARGET: f64 = 1.5;

/// How a figure compares with its target, in the table.
fn verdict(met: bool) -> &'static str {
    if met {
        "ok"
    } else {
        "MISSED"
    }
}

pub async fn run(g: &Global, args: &BenchArgs, output: Output, out: &mut impl Write) -> Result<u8> {
    if settings::store(g, settings::fleet(g)?.as_ref()) == crate::cli::Store::Nats {
        return nats::run(g, args, output, out).await;
    }
    let sessions = args.sessions.unwrap_or(100) as usize;
    // One connection per 1,000 sessions unless told: each connection is a watch cache decoding
    // every event in this process, which on a small machine competes with what is measured.
    let connections = args
        .connections
        .map_or(sessions.div_ceil(1000), |c| c as usize)
        .clamp(1, sessions);
    // Only a level the user asked for may be an error (issue 16: `--sessions 10` failed on the
    // default level 100).
    let concurrency: Vec<u32> = match &args.concurrency {
        Some(levels) => {
            if let Some(&c) = levels.iter().find(|&&c| c as usize > sessions) {
                anyhow::bail!(
                    "--concurrency {c} needs at least {c} sessions (--sessions {sessions})"
                );
            }
            levels.clone()
        }
        None => [1, 10, 100]
            .into_iter()
            .filter(|&c| c as usize <= sessions)
            .collect(),
    };
    let fleet_file = settings::fleet(g)?;
    let mut config = settings::etcd_config(g, fleet_file.as_ref(), Some(args.lease_ttl))?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f");
    config.prefix = format!("{}ifc-bench-{stamp}-{}/", config.prefix, std::process::id());
    let endpoint = config.endpoints.first().cloned().unwrap_or_default();
    let etcd_before = probe::etcd(&endpoint).await;
    let ifc_before = probe::own_rss();
    tracing::info!(sessions, connections, "setting sessions up");
    // Its own connection, without a watch: it removes the scratch prefix after the sessions' are
    // closed, whatever happened.
    let scratch = crate::settings::connect_etcd(config.clone()).await?;
    let lists = args.lists.unwrap_or(crate::cli::Lists::Shared);
    let started = Fleet::start(&config, sessions, connections, lists).await;
    let measured = match started {
        Ok((fleet, heard)) => {
            let measured = measure(&fleet, heard, args, &concurrency, &config, &endpoint).await;
            fleet.close().await;
            measured
        }
        Err(e) => Err(e),
    };
    if let Err(e) = scratch.purge_prefix().await {
        tracing::warn!(prefix = %config.prefix, error = %e, "cannot remove the bench's scratch prefix");
    }
    let mut report = match measured {
        Ok(report) => report,
        Err(e) if e.downcast_ref::<fleet::Undelivered>().is_some() => {
            tracing::error!("{e}");
            return Ok(crate::exit::NO);
        }
        Err(e) => return Err(e),
    };
    report.memory.etcd_before_mb = mb(etcd_before.rss_bytes);
    report.memory.ifc_before_mb = mb(ifc_before);
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string(&report)?)?,
        Output::Table => table(&report, out)?,
    }
    let healthy = report.double_claims == 0
        && report.tasks_won == report.tasks
        && report.events_delivered == report.events_expected;
    Ok(if healthy { 0 } else { crate::exit::NO })
}

async fn measure(
    fleet: &Fleet,
    mut heard: tokio::sync::mpsc::UnboundedReceiver<fleet::Heard>,
    args: &BenchArgs,
    concurrency: &[u32],
    config: &backend_etcd::EtcdConfig,
    endpoint: &str,
) -> Result<Report> {
    let after_setup = probe::etcd(endpoint).await;
    let ifc_after_setup = probe::own_rss();
    let samples = args.samples as usize;
    let ids = |tag: &str, n: usize| {
        (0..n)
            .map(|i| TaskId::parse(&format!("{tag}{i:07}")))
            .collect::<Result<Vec<_>, _>>()
    };
    let latency_tasks = ids("L", samples)?;
    let levels: Vec<(usize, Vec<TaskId>)> = concurrency
        .iter()
        .map(|&c| Ok((c as usize, ids(&format!("C{c}-"), args.tasks as usize)?)))
        .collect::<Result<_>>()?;
    // One list shared by the most concurrent sessions, claimed in their own orders, then the
    // same again in one order for all.
    let shared = match concurrency.iter().max() {
        Some(&c) if c > 1 => Some((
            c as usize,
            ids("S-", args.tasks as usize)?,
            ids("H-", args.tasks as usize)?,
        )),
        _ => None,
    };
    let all: Vec<TaskId> = latency_tasks
        .iter()
        .chain(levels.iter().flat_map(|(_, t)| t))
        .chain(shared.iter().flat_map(|(_, s, h)| s.iter().chain(h)))
        .cloned()
        .collect();
    create(fleet, &all).await?;
    fleet
        .await_available(&all, Duration::from_secs(120))
        .await?;
    // Every session hears each task's creation before anything is measured.
    let per_task = (fleet.hearing * all.len()) as u64;
    fleet.await_delivered(per_task).await?;

    let mut winners = phases::Winners::new();
    let latency = phases::latency(fleet, &latency_tasks, &mut heard, &mut winners).await?;
    drop(heard);
    let claim = Spread::of(&latency.claim);
    let peer = match args.peer {
        false => None,
        true => {
            let mut figures = peer::run(&args.peer_cmd, endpoint, &config.prefix, samples).await?;
            let theirs = figures["claim_p50_ms"].as_f64().unwrap_or_default();
            let txn = figures["txn_p50_ms"].as_f64().unwrap_or_default();
            if let Value::Object(m) = &mut figures {
                let ratio = |x: f64| {
                    if x > 0.0 {
                        round3(claim.p50_ms / x)
                    } else {
                        0.0
                    }
                };
                m.insert(
                    "ifc_claim_p50_over_peer_claim_p50".into(),
                    ratio(theirs).into(),
                );
                m.insert("ifc_claim_p50_over_peer_txn_p50".into(), ratio(txn).into());
            }
            Some(figures)
        }
    };
    let mut throughput = Vec::new();
    for (c, tasks) in &levels {
        let t = phases::throughput(fleet, *c, tasks, &mut winners).await?;
        throughput.push(Level {
            concurrency: t.concurrency,
            claims_per_sec: round3(t.claims_per_sec),
            bare_txn_per_sec: round3(t.bare_per_sec),
            ratio: round3(t.claims_per_sec / t.bare_per_sec.max(1e-9)),
            claim_shaped_txn_per_sec: round3(t.shaped_per_sec),
            claim_attempts: t.attempts,
            claim: Spread::of(&t.claim),
        });
    }
    let shared_list = match &shared {
        Some((c, tasks, same_order)) => {
            Some(phases::shared_list(fleet, *c, tasks, same_order, &mut winners).await?)
        }
        None => None,
    };
    // Every session hears each task's creation and its claim.
    let expected = 2 * per_task;
    let drain = Instant::now();
    let complete = fleet.await_delivered(expected).await;
    let drain = drain.elapsed();
    let delivered = fleet.delivered.load(std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = complete {
        tracing::error!(error = %e, "not every session heard every event");
    }
    let end = probe::etcd(endpoint).await;
    let bare_txn = Spread::of(&latency.bare_txn);
    let event = Spread::of(&latency.event);
    let bare_watch = Spread::of(&latency.bare_watch);
    Ok(Report {
        endpoint: endpoint.to_owned(),
        sessions: fleet.sessions.len(),
        connections: fleet.backends.len(),
        multiplexing: fleet.multiplexing(),
        lease_ttl_s: args.lease_ttl.as_secs(),
        setup_s: round3(fleet.setup.as_secs_f64()),
        memory: Memory {
            etcd_before_mb: None,
            etcd_after_setup_mb: mb(after_setup.rss_bytes),
            etcd_end_mb: mb(end.rss_bytes),
            ifc_before_mb: None,
            ifc_after_setup_mb: mb(ifc_after_setup),
            ifc_end_mb: mb(probe::own_rss()),
        },
        etcd_watchers: after_setup.watchers,
        samples,
        claim,
        bare_txn,
        claim_over_bare: claim.over(&bare_txn),
        claim_shaped_txn: Spread::of(&latency.shaped_txn),
        event,
        bare_watch,
        event_over_bare: event.over(&bare_watch),
        throughput,
        shared_list,
        peer,
        tasks: all.len(),
        tasks_won: winners.len(),
        double_claims: winners.values().filter(|w| w.len() > 1).count(),
        events_expected: expected,
        events_delivered: delivered,
        fanout_drain_s: round3(drain.as_secs_f64()),
    })
}

/// Creates `tasks`, 64 at a time.
async fn create(fleet: &Fleet, tasks: &[TaskId]) -> Result<()> {
    phases::in_chunks(tasks.len(), |i| {
        let (b, id) = (Arc::clone(fleet.backend_of(0)), tasks[i].clone());
        async move { b.put(&id, &TaskPatch::default()).await }
    })
    .await
    .map(drop)
}

fn table(r: &Report, out: &mut impl Write) -> Result<()> {
    let opt = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.1}"));
    writeln!(
        out,
        "ifc bench against {} ({}).",
        r.endpoint, r.multiplexing
    )?;
    writeln!(
        out,
        "setup: {} sessions in {:.2} s, lease TTL {} s; memory MB before / after setup / end: etcd {} / {} / {}, ifc {} / {} / {}; etcd watchers {}",
        r.sessions,
        r.setup_s,
        r.lease_ttl_s,
        opt(r.memory.etcd_before_mb),
        opt(r.memory.etcd_after_setup_mb),
        opt(r.memory.etcd_end_mb),
        opt(r.memory.ifc_before_mb),
        opt(r.memory.ifc_after_setup_mb),
        opt(r.memory.ifc_end_mb),
        opt(r.etcd_watchers),
    )?;
    writeln!(out)?;
    Spread::header(out, r.samples)?;
    let row = Spread::row;
    let ratio_row = Spread::ratio_row;
    row(out, "ifc claim, one session", &r.claim)?;
    row(out, "bare etcd txn, same connection", &r.bare_txn)?;
    ratio_row(out, "  ratio (target p95 <= 1.15)", &r.claim_over_bare)?;
    row(
        out,
        "claim-shaped txn (2 keys, 1 leased), no ifc",
        &r.claim_shaped_txn,
    )?;
    row(out, "ifc event: claim -> another session hears", &r.event)?;
    row(
        out,
        "bare txn -> bare watch, same connection",
        &r.bare_watch,
    )?;
    ratio_row(out, "  ratio (target p95 <= 1.15)", &r.event_over_bare)?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<12} {:>10} {:>12} {:>7} {:>16} {:>10} {:>10}  ratio target >= {THROUGHPUT_TARGET}",
        "concurrent", "claims/s", "bare txn/s", "ratio", "claim-shaped/s", "claim p50", "claim p99"
    )?;
    for l in &r.throughput {
        writeln!(
            out,
            "{:<12} {:>10.0} {:>12.0} {:>7.2} {:>16.0} {:>10.3} {:>10.3}  {}",
            l.concurrency,
            l.claims_per_sec,
            l.bare_txn_per_sec,
            l.ratio,
            l.claim_shaped_txn_per_sec,
            l.claim.p50_ms,
            l.claim.p99_ms,
            verdict((l.ratio * 100.0).round() / 100.0 >= THROUGHPUT_TARGET)
        )?;
    }
    if let Some(l) = &r.shared_list {
        writeln!(out)?;
        writeln!(
            out,
            "{} sessions on one shared list of {} tasks: {:.2} claim calls per win, each in its own order (target <= {SHARED_LIST_TARGET}) {}; {:.2} all in one order",
            l.sessions,
            l.tasks,
            l.attempts_per_win,
            verdict((l.attempts_per_win * 100.0).round() / 100.0 <= SHARED_LIST_TARGET),
            l.same_order_attempts_per_win,
        )?;
    }
    if let Some(p) = &r.peer {
        let f = |k: &str| p[k].as_f64().unwrap_or_default();
        writeln!(out)?;
        writeln!(
            out,
            "peer ({}): claim (get + txn) p50 {:.3} ms, txn alone p50 {:.3} ms, watch p95 {:.3} ms; ifc claim p50 / peer claim p50 = {:.2} (target <= 0.75), / peer txn p50 = {:.2}",
            p["stack"].as_str().unwrap_or("?"),
            f("claim_p50_ms"),
            f("txn_p50_ms"),
            f("watch_p95_ms"),
            f("ifc_claim_p50_over_peer_claim_p50"),
            f("ifc_claim_p50_over_peer_txn_p50"),
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{} of {} tasks won, {} double claims; {} of {} events delivered to the sessions ({:.2} s after the last claim)",
        r.tasks_won, r.tasks, r.double_claims, r.events_delivered, r.events_expected, r.fanout_drain_s
    )?;
    Ok(())
}
