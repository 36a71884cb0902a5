//! `ifc ui`: the live board in a browser. One subscription to the store (through the router, so
//! etcd, git and hybrid alike) keeps a `Board`; every open page gets a snapshot and then each
//! change as a server-sent event, so a hundred tabs cost the store no more than one. Read-only,
//! the page's assets are built into the binary, and `/metrics` serves fleet-wide gauges (tasks by
//! status, live sessions by store).

mod board;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agent_core::{Backend, BackendEvent};
use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::cli::Output;
use board::Board;

/// How many messages a page may fall behind before it is sent a fresh snapshot instead.
const BEHIND: usize = 4096;
/// How often the live sessions are read.
const SESSIONS_EVERY: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabel {
    store: String,
}

/// The fleet-wide gauges of `/metrics`.
#[derive(Debug)]
struct Gauges {
    registry: Registry,
    tasks: Family<StatusLabel, Gauge>,
    sessions: Family<StoreLabel, Gauge>,
    viewers: Gauge,
    resyncs: Counter,
    unreadable: Gauge,
}

impl Gauges {
    fn new() -> Gauges {
        let mut g = Gauges {
            registry: Registry::default(),
            tasks: Family::default(),
            sessions: Family::default(),
            viewers: Gauge::default(),
            resyncs: Counter::default(),
            unreadable: Gauge::default(),
        };
        let r = &mut g.registry;
        r.register(
            "if_coordinator_board_tasks",
            "Tasks on the board by status (available, blocked, claimed, complete)",
            g.tasks.clone(),
        );
        r.register(
            "if_coordinator_board_sessions",
            "Live sessions by the store serving them (etcd, git)",
            g.sessions.clone(),
        );
        r.register(
            "if_coordinator_board_unreadable",
            "Stored records that are not valid tasks (named on the board's page; `ifc delete ID --force` removes one)",
            g.unreadable.clone(),
        );
        r.register(
            "if_coordinator_ui_viewers",
            "Pages of `ifc ui` open now",
            g.viewers.clone(),
        );
        r.register(
            "if_coordinator_ui_resyncs",
            "Times a page fell too far behind and was sent a fresh snapshot",
            g.resyncs.clone(),
        );
        g
    }
}

/// What the server shares: the board, the stream of its changes, the store and the gauges.
struct Live {
    board: Mutex<Board>,
    changes: broadcast::Sender<Arc<str>>,
    store: Arc<dyn Backend>,
    gauges: Gauges,
}

impl Live {
    fn new(store: Arc<dyn Backend>) -> Live {
        let (changes, _) = broadcast::channel(BEHIND);
        Live {
            board: Mutex::new(Board::new(store.name())),
            changes,
            store,
            gauges: Gauges::new(),
        }
    }

    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the board and sends the page message the change made, under one lock: every page
    /// sees the messages in the order the board took them.
    fn publish(&self, change: impl FnOnce(&mut Board) -> Option<Value>) {
        let mut board = self.board();
        if let Some(message) = change(&mut board) {
            // No page open is not an error.
            let _ = self.changes.send(Arc::from(message.to_string()));
        }
    }

    /// A page joining: the snapshot and the changes after it, neither missing nor repeating one.
    fn join(&self) -> (Arc<str>, broadcast::Receiver<Arc<str>>) {
        let board = self.board();
        let snapshot = Arc::from(board.snapshot(SystemTime::now()).to_string());
        (snapshot, self.changes.subscribe())
    }

    fn metrics(&self) -> String {
        {
            let board = self.board();
            for (status, n) in board.tasks_by_status() {
                self.gauges
                    .tasks
                    .get_or_create(&StatusLabel {
                        status: status.into(),
                    })
                    .set(n);
            }
            self.gauges
                .unreadable
                .set(i64::try_from(board.unreadable()).unwrap_or(i64::MAX));
            for (store, n) in board.sessions_by_store() {
                self.gauges
                    .sessions
                    .get_or_create(&StoreLabel { store })
                    .set(n);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.gauges.registry);
        out
    }
}

/// Counts a page while its stream lives.
struct Viewer(Arc<Live>);

impl Viewer {
    fn new(live: Arc<Live>) -> Viewer {
        live.gauges.viewers.inc();
        Viewer(live)
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.0.gauges.viewers.dec();
    }
}

/// A page's messages: the snapshot, then every change; a page that fell `BEHIND` messages behind
/// is sent a fresh snapshot (its queue is bounded, never its memory).
fn page_stream(live: Arc<Live>) -> impl futures_util::Stream<Item = Arc<str>> {
    let (snapshot, changes) = live.join();
    let viewer = Viewer::new(live);
    futures_util::stream::unfold(
        (Some(snapshot), changes, viewer),
        |(next, mut changes, viewer)| async move {
            let message = match next {
                Some(m) => m,
                None => match changes.recv().await {
                    Ok(m) => m,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        viewer.0.gauges.resyncs.inc();
                        let (snapshot, fresh) = viewer.0.join();
                        changes = fresh;
                        snapshot
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            };
            Some((message, (None, changes, viewer)))
        },
    )
}

/// `GET /events`: a page's messages as server-sent events.
async fn events(
    State(live): State<Arc<Live>>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    use futures_util::StreamExt;
    let stream = page_stream(live).map(|m| Ok(Event::default().data(&*m)));
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The page's three files, built into the binary.
fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse + Clone {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:",
            ),
        ],
        body,
    )
}

async fn health(State(live): State<Arc<Live>>) -> axum::response::Response {
    let h = crate::metrics::health_within(&*live.store).await;
    crate::metrics::health_reply(&h, live.store.name())
}

fn routes(live: Arc<Live>) -> axum::Router {
    axum::Router::new()
        .route(
            "/",
            get(asset(
                "text/html; charset=utf-8",
                include_str!("page/index.html"),
            )),
        )
        .route(
            "/app.js",
            get(asset(
                "text/javascript; charset=utf-8",
                include_str!("page/app.js"),
            )),
        )
        .route(
            "/app.css",
            get(asset(
                "text/css; charset=utf-8",
                include_str!("page/app.css"),
            )),
        )
        .route("/events", get(events))
        .route(
            "/api/board",
            get(|State(live): State<Arc<Live>>| async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    live.join().0.to_string(),
                )
            }),
        )
        .route(
            "/metrics",
            get(|State(live): State<Arc<Live>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    live.metrics(),
                )
            }),
        )
        .route("/health", get(health))
        .with_state(live)
}

/// Reads the live sessions every `SESSIONS_EVERY` for as long as the server runs; a store that
/// stops answering is said once (in the log and on the page), and again when it is back.
async fn follow_sessions(live: Arc<Live>) {
    let mut tick = tokio::time::interval(SESSIONS_EVERY);
    let mut failing: Option<String> = None;
    loop {
        tick.tick().await;
        let why = match tokio::time::timeout(SESSIONS_EVERY, live.store.sessions()).await {
            Ok(Ok(sessions)) => {
                live.publish(|b| b.set_sessions(sessions));
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "{}: no answer within {SESSIONS_EVERY:?}",
                live.store.name()
            )),
        };
        if why.is_some() == failing.is_some() {
            failing = why.or(failing);
            continue;
        }
        match &why {
            Some(e) => {
                tracing::warn!(error = %e, "the store does not answer: the board shows what it last heard")
            }
            None => tracing::info!("the store answers again"),
        }
        live.publish(|b| b.set_reachable(why.as_deref()));
        failing = why;
    }
}

/// Serves the board on `addr` until Ctrl-C, over the store `connect` yields. The address is
/// taken first (a port in use is said at once) and printed; until the store answers, the page
/// says it is waiting and `/health` answers 503.
pub async fn serve<F>(addr: SocketAddr, output: Output, connect: F) -> Result<u8>
where
    F: std::future::Future<Output = Result<Arc<dyn Backend>>>,
{
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} for --addr (another ifc ui? --addr PORT picks another port)"
        )
    })?;
    let bound = listener.local_addr().context("the board's address")?;
    say_url(bound, output);
    let socket = listener.into_std().context("the board's address")?;
    let waiting =
        tokio::net::TcpListener::from_std(socket.try_clone().context("the board's address")?)
            .context("the board's address")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = axum::serve(waiting, waiting_routes())
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "the board's server stopped");
        }
    });
    let store = connect.await?;
    let _ = stop.send(());
    let listener = tokio::net::TcpListener::from_std(socket).context("the board's address")?;
    run(store, listener).await
}

/// The page and `/health` while the store has not answered yet.
fn waiting_routes() -> axum::Router {
    let page = "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=2><title>ifc board</title><p>ifc ui is waiting for the task store to answer (its log says what it tries). This page reloads by itself.";
    axum::Router::new()
        .route(
            "/health",
            get(|| async {
                let h = agent_core::Health {
                    reachable: false,
                    detail: "waiting for the task store to answer".into(),
                };
                crate::metrics::health_reply(&h, "none")
            }),
        )
        .fallback(get(move || async move {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                page,
            )
        }))
}

/// Prints where the board is.
fn say_url(bound: SocketAddr, output: Output) {
    let url = match bound.ip().is_unspecified() {
        // Every interface: this machine's own address is the one that surely works here.
        true => format!(
            "http://{}/",
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port())
        ),
        false => format!("http://{bound}/"),
    };
    match output {
        Output::Json => println!("{}", serde_json::json!({"url": url})),
        Output::Table if bound.ip().is_unspecified() => println!(
            "the board: {url} and this machine's other addresses, port {} (read-only; Ctrl-C stops)",
            bound.port()
        ),
        Output::Table => println!("the board: {url} (read-only; Ctrl-C stops)"),
    }
}

/// Runs the board server on `listener` until Ctrl-C.
async fn run(store: Arc<dyn Backend>, listener: tokio::net::TcpListener) -> Result<u8> {
    let mut sub = store.subscribe().await?;
    let live = Arc::new(Live::new(Arc::clone(&store)));
    live.publish(|b| {
        b.reset(&sub.snapshot, store.name(), SystemTime::now());
        None
    });
    let app = routes(Arc::clone(&live));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the board's server stopped");
        }
    });
    tokio::spawn(follow_sessions(Arc::clone(&live)));
    let mut points = tokio::time::interval(board::POINT_EVERY);
    points.tick().await;
    loop {
        tokio::select! {
            event = sub.next() => match event {
                Some(BackendEvent::Task(e)) => {
                    let known = live.board().has(&e.task);
                    let full = if known || e.new_status.is_none() {
                        None
                    } else {
                        // A task the board has not seen: its title, read once.
                        tokio::time::timeout(Duration::from_secs(2), store.get(&e.task))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .flatten()
                    };
                    // The watch reads a record that became unreadable as gone: say which.
                    let corrupt = match e.new_status {
                        None => match store.get(&e.task).await {
                            Err(agent_core::BackendError::Corrupt { key, reason }) => {
                                Some(format!("{key}: {reason}"))
                            }
                            _ => None,
                        },
                        Some(_) => None,
                    };
                    live.publish(|b| Some(b.apply(&e, full)));
                    live.publish(|b| b.set_corrupt(&e.task, corrupt));
                }
                Some(BackendEvent::Resync(listing)) => {
                    live.publish(|b| Some(b.reset(&listing, store.name(), SystemTime::now())));
                }
                Some(_) => {}
                None => anyhow::bail!("the store's event stream ended"),
            },
            _ = points.tick() => {
                live.publish(|b| Some(b.point(SystemTime::now(), board::POINT_EVERY)));
            }
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn a_page_that_falls_behind_is_sent_a_fresh_snapshot_not_a_growing_queue() {
        let store = agent_core::memory::MemoryBackend::new(Default::default(), None);
        let live = Arc::new(Live::new(Arc::new(store)));
        let mut page = Box::pin(page_stream(Arc::clone(&live)));
        let first = page.next().await.expect("the snapshot");
        assert!(first.contains("\"kind\":\"snapshot\""), "{first}");
        // More changes than the queue holds, the page reading none of them.
        for n in 0..BEHIND + 10 {
            live.publish(|_| Some(serde_json::json!({"kind": "test", "n": n})));
        }
        let next = page.next().await.expect("a message");
        assert!(next.contains("\"kind\":\"snapshot\""), "{next}");
        assert_eq!(live.gauges.resyncs.get(), 1);
        assert_eq!(live.gauges.viewers.get(), 1);
        // Then the changes after the fresh snapshot, in order.
        live.publish(|_| Some(serde_json::json!({"kind": "test", "n": "after"})));
        let after = page.next().await.expect("a message");
        assert!(after.contains("\"after\""), "{after}");
        drop(page);
        assert_eq!(live.gauges.viewers.get(), 0, "the page is gone");
    }
}
