//! The agent's and the bridge's numbers: Prometheus metrics at `GET /metrics` and the active
//! store's reachability at `GET /health` (`--metrics-addr HOST:PORT`; axum + prometheus-client).
//! Labels are only `backend`, `outcome` and `status`: never a task or session id.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_core::router::RouterStats;
use agent_core::Backend;
use anyhow::{Context, Result};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClaimLabels {
    backend: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MoveLabel {
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabels {
    backend: String,
    status: String,
}

/// How far back the guide's sliding-window gauges look.
const WINDOW: Duration = Duration::from_secs(300);
/// At most this many samples of each kind are kept for them.
const WINDOW_SAMPLES: usize = 10_000;

/// Recent samples for the sliding-window gauges.
#[derive(Debug, Default)]
struct Window {
    /// (when, seconds, won) of each claim attempt that got an answer or an error.
    claims: VecDeque<(Instant, f64, bool)>,
    /// (when, seconds) of each event latency.
    events: VecDeque<(Instant, f64)>,
}

/// The `q` quantile (0–1) of `values` by the nearest-rank method (`0` when there are none).
pub fn percentile(mut values: Vec<f64>, q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64) * q).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Every metric of one process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    claim_latency: Family<BackendLabel, Histogram>,
    claims: Family<ClaimLabels, Counter>,
    releases: Family<ReleaseLabels, Counter>,
    active_tasks: Gauge,
    event_bus_health: Gauge,
    event_latency: Histogram,
    reconnects: Counter,
    resyncs: Counter,
    fallbacks: Counter,
    conflicts: Counter,
    slo_breached: Gauge,
    slo_moves: Family<MoveLabel, Counter>,
    slo_claim_p95: Gauge<f64, AtomicU64>,
    claim_latency_p95: Gauge<f64, AtomicU64>,
    claim_success_rate: Gauge<f64, AtomicU64>,
    event_latency_p95: Gauge<f64, AtomicU64>,
    window: Mutex<Window>,
    won: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let latency_buckets = || Histogram::new(exponential_buckets(0.000_1, 2.0, 20));
        let mut m = Metrics {
            registry: Registry::default(),
            claim_latency: Family::new_with_constructor(latency_buckets),
            claims: Family::default(),
            releases: Family::default(),
            active_tasks: Gauge::default(),
            event_bus_health: Gauge::default(),
            event_latency: latency_buckets(),
            reconnects: Counter::default(),
            resyncs: Counter::default(),
            fallbacks: Counter::default(),
            conflicts: Counter::default(),
            slo_breached: Gauge::default(),
            slo_moves: Family::default(),
            slo_claim_p95: Gauge::default(),
            claim_latency_p95: Gauge::default(),
            claim_success_rate: Gauge::default(),
            event_latency_p95: Gauge::default(),
            window: Mutex::new(Window::default()),
            won: AtomicU64::new(0),
        };
        let r = &mut m.registry;
        r.register(
            "if_coordinator_claim_latency_seconds",
            "Time a claim took, by the store that answered",
            m.claim_latency.clone(),
        );
        // prometheus-client adds `_total` to counters.
        r.register(
            "if_coordinator_claims",
            "Claim attempts by store and outcome (won, lost, not_claimable, not_found, error)",
            m.claims.clone(),
        );
        r.register(
            "if_coordinator_releases",
            "Releases by store and resulting status",
            m.releases.clone(),
        );
        r.register(
            "if_coordinator_active_tasks",
            "Tasks this process is running now",
            m.active_tasks.clone(),
        );
        r.register(
            "if_coordinator_event_bus_health",
            "1 when the store this process uses answers, 0 when not",
            m.event_bus_health.clone(),
        );
        r.register(
            "if_coordinator_event_latency_seconds",
            "Time from this process's own claim or release to its event arriving on the watch",
            m.event_latency.clone(),
        );
        r.register(
            "if_coordinator_reconnects",
            "Times a watch stream to etcd broke and was resumed",
            m.reconnects.clone(),
        );
        r.register(
            "if_coordinator_resyncs",
            "Times a subscriber fell more than its queue's bound behind and started again from a fresh snapshot",
            m.resyncs.clone(),
        );
        r.register(
            "if_coordinator_fallbacks",
            "Times this process moved from etcd to git",
            m.fallbacks.clone(),
        );
        r.register(
            "if_coordinator_conflicts",
            "Tasks found held or done by different sessions in etcd and git",
            m.conflicts.clone(),
        );
        r.register(
            "if_coordinator_slo_breached",
            "1 while this hybrid session is on git because the coordinator breached the fleet's objective (slo:)",
            m.slo_breached.clone(),
        );
        r.register(
            "if_coordinator_slo_moves",
            "Moves because of the fleet's objective: to git on a breach, to the coordinator once it is within it again",
            m.slo_moves.clone(),
        );
        r.register(
            "if_coordinator_slo_claim_p95",
            "The p95 of this hybrid session's claims on the coordinator (its transaction alone) that the fleet's objective (slo:) judges, in milliseconds: over its window, or while breached the figure that breached it; 0 without claims",
            m.slo_claim_p95.clone(),
        );
        for to in ["git", "coordinator"] {
            let _ = m.slo_moves.get_or_create(&MoveLabel { to: to.into() });
        }
        r.register(
            "if_coordinator_claim_latency_p95",
            "95th percentile claim latency over the last 5 minutes, in milliseconds",
            m.claim_latency_p95.clone(),
        );
        r.register(
            "if_coordinator_claim_success_rate",
            "Share of claim attempts of the last 5 minutes that got an answer (won, lost or not claimable) rather than an error",
            m.claim_success_rate.clone(),
        );
        r.register(
            "if_coordinator_event_latency_p95",
            "95th percentile event latency over the last 5 minutes, in milliseconds",
            m.event_latency_p95.clone(),
        );
        m
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The samples of the last 5 minutes (older ones dropped).
    fn recent(&self) -> std::sync::MutexGuard<'_, Window> {
        let mut w = self.window();
        if let Some(cutoff) = Instant::now().checked_sub(WINDOW) {
            while w.claims.front().is_some_and(|(t, ..)| *t < cutoff) {
                w.claims.pop_front();
            }
            while w.events.front().is_some_and(|(t, _)| *t < cutoff) {
                w.events.pop_front();
            }
        }
        w
    }

    /// The claim latency p95 of the last 5 minutes (`None` without claims), which the session
    /// publishes with its presence.
    pub fn claim_p95(&self) -> Option<Duration> {
        let w = self.recent();
        (!w.claims.is_empty()).then(|| {
            Duration::from_secs_f64(percentile(
                w.claims.iter().map(|(_, s, _)| *s).collect(),
                0.95,
            ))
        })
    }

    /// A claim attempt: `outcome` is `won`, `lost`, `not_claimable`, `not_found` or `error`.
    pub fn claim(&self, backend: &str, outcome: &str, took: Duration) {
        let secs = took.as_secs_f64();
        self.claim_latency
            .get_or_create(&BackendLabel {
                backend: backend.into(),
            })
            .observe(secs);
        self.claims
            .get_or_create(&ClaimLabels {
                backend: backend.into(),
                outcome: outcome.into(),
            })
            .inc();
        if outcome == "won" {
            self.won.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut w = self.window();
        w.claims
            .push_back((Instant::now(), secs, outcome != "error"));
        if w.claims.len() > WINDOW_SAMPLES {
            w.claims.pop_front();
        }
    }

    pub fn release(&self, backend: &str, status: &str) {
        self.releases
            .get_or_create(&ReleaseLabels {
                backend: backend.into(),
                status: status.into(),
            })
            .inc();
    }

    pub fn set_active_tasks(&self, n: i64) {
        self.active_tasks.set(n);
    }

    pub fn event(&self, took: Duration) {
        let secs = took.as_secs_f64();
        self.event_latency.observe(secs);
        let mut w = self.window();
        w.events.push_back((Instant::now(), secs));
        if w.events.len() > WINDOW_SAMPLES {
            w.events.pop_front();
        }
    }

    /// Brings the counters kept elsewhere (router, bridge, etcd informer) up to their totals.
    pub fn totals(&self, reconnects: u64, router: &RouterStats) {
        let moves = |to: &str| {
            self.slo_moves
                .get_or_create(&MoveLabel { to: to.into() })
                .clone()
        };
        self.slo_breached.set(i64::from(router.slo_breached));
        self.slo_claim_p95
            .set(router.slo_claim_p95_us.map_or(0.0, |us| us as f64 / 1000.0));
        for (c, total) in [
            (&self.reconnects, reconnects),
            (&self.resyncs, router.resyncs),
            (&self.fallbacks, router.fallbacks),
            (&self.conflicts, router.conflicts),
            (&moves("git"), router.slo_to_git),
            (&moves("coordinator"), router.slo_returns),
        ] {
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        }
    }

    pub fn set_health(&self, up: bool) {
        self.event_bus_health.set(i64::from(up));
    }

    /// One line for the log: claims won, claim p50/p95 and event p95 (ms, last 5 minutes).
    pub fn summary(&self) -> String {
        let w = self.window();
        let claims: Vec<f64> = w.claims.iter().map(|(_, s, _)| s * 1e3).collect();
        let events: Vec<f64> = w.events.iter().map(|(_, s)| s * 1e3).collect();
        format!(
            "claims={} claim_p50_ms={:.3} claim_p95_ms={:.3} event_p95_ms={:.3}",
            self.won.load(std::sync::atomic::Ordering::Relaxed),
            percentile(claims.clone(), 0.5),
            percentile(claims, 0.95),
            percentile(events, 0.95),
        )
    }

    /// The text exposition, with the sliding-window gauges computed now.
    pub fn encode(&self) -> String {
        {
            let w = self.recent();
            let answered = w.claims.iter().filter(|(.., ok)| *ok).count();
            let rate = if w.claims.is_empty() {
                1.0
            } else {
                answered as f64 / w.claims.len() as f64
            };
            self.claim_success_rate.set(rate);
            self.claim_latency_p95
                .set(1000.0 * percentile(w.claims.iter().map(|(_, s, _)| *s).collect(), 0.95));
            self.event_latency_p95
                .set(1000.0 * percentile(w.events.iter().map(|(_, s)| *s).collect(), 0.95));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The totals kept elsewhere: watch reconnects, and the router's counts (a bridge has only
/// conflicts).
pub type Totals = Arc<dyn Fn() -> (u64, RouterStats) + Send + Sync>;

/// What `/health` and `/metrics` read: the store once the process has one, else why not yet
/// (an agent waiting for etcd at its start).
pub struct Source {
    ready: std::sync::OnceLock<(Arc<dyn Backend>, Totals)>,
    waiting: std::sync::Mutex<String>,
}

impl Source {
    /// A source without a store yet; `why` is `/health`'s reason until one is set.
    pub fn waiting(why: &str) -> Arc<Source> {
        Arc::new(Source {
            ready: std::sync::OnceLock::new(),
            waiting: std::sync::Mutex::new(why.to_owned()),
        })
    }

    /// A source with its store.
    pub fn ready(store: Arc<dyn Backend>, totals: Totals) -> Arc<Source> {
        let s = Source::waiting("");
        s.set(store, totals);
        s
    }

    /// Why there is no store yet.
    pub fn set_waiting(&self, why: &str) {
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = why.to_owned();
    }

    /// The store (once).
    pub fn set(&self, store: Arc<dyn Backend>, totals: Totals) {
        let _ = self.ready.set((store, totals));
    }

    /// The store's health within 2 s, or why there is none; with the store's name.
    async fn health(&self) -> (agent_core::Health, &'static str) {
        let Some((store, _)) = self.ready.get() else {
            let detail = self
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return (
                agent_core::Health {
                    reachable: false,
                    detail,
                },
                "none",
            );
        };
        (health_within(&**store).await, store.name())
    }

    fn totals(&self) -> (u64, RouterStats) {
        self.ready
            .get()
            .map_or((0, RouterStats::default()), |(_, totals)| totals())
    }
}

/// `store`'s health, or that it did not answer within 2 s.
pub async fn health_within(store: &dyn Backend) -> agent_core::Health {
    tokio::time::timeout(Duration::from_secs(2), store.health())
        .await
        .unwrap_or_else(|_| agent_core::Health {
            reachable: false,
            detail: format!("{}: no answer within 2s", store.name()),
        })
}

/// `GET /health`'s answer: 200 when the store answers, 503 when not, and why, as JSON.
pub fn health_reply(h: &agent_core::Health, store: &str) -> axum::response::Response {
    let body = serde_json::json!({
        "health": if h.reachable { "true" } else { "false" },
        "backend": store,
        "reason": h.detail,
    });
    let code = if h.reachable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Serves `/metrics` and `/health` on `addr` until the process ends; returns the bound address.
/// `source`'s store is the active store (its health is `event_bus_health` and `/health`).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    source: Arc<Source>,
) -> Result<SocketAddr> {
    let health = Arc::clone(&source);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --metrics-addr"))?;
    let bound = listener.local_addr().context("the metrics address")?;
    let m = Arc::clone(&metrics);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let (m, source) = (Arc::clone(&m), Arc::clone(&source));
                async move {
                    m.set_health(source.health().await.0.reachable);
                    let (reconnects, router) = source.totals();
                    m.totals(reconnects, &router);
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route(
            "/health",
            get(move || {
                let (metrics, source) = (Arc::clone(&metrics), Arc::clone(&health));
                async move {
                    let (h, name) = source.health().await;
                    metrics.set_health(h.reachable);
                    health_reply(&h, name)
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    tracing::info!(addr = %bound, "metrics on http://{bound}/metrics, health on http://{bound}/health");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_the_sample_below_which_95_percent_fall() {
        let p95 = |v| percentile(v, 0.95);
        assert_eq!(p95(vec![]), 0.0);
        assert_eq!(p95(vec![3.0]), 3.0);
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(p95(values), 95.0);
    }

    #[test]
    fn the_window_gauges_follow_the_samples() {
        let m = Metrics::new();
        for _ in 0..19 {
            m.claim("etcd", "won", Duration::from_millis(1));
        }
        m.claim("etcd", "error", Duration::from_millis(500));
        let text = m.encode();
        assert!(
            text.contains("if_coordinator_claim_success_rate 0.95"),
            "{text}"
        );
        assert!(
            text.contains("if_coordinator_claims_total{backend=\"etcd\",outcome=\"won\"} 19"),
            "{text}"
        );
        m.totals(2, &RouterStats::default());
        m.totals(3, &RouterStats::default());
        assert!(m.encode().contains("if_coordinator_reconnects_total 3"));
    }
}
