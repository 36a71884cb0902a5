//! Reading the bucket through one ordered consumer: the last value of every key (a consistent
//! snapshot, as of the last sequence delivered) and then every change after it, in stream order.
//! A list is a snapshot alone; a subscription keeps its consumer and turns changes into events.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};

use agent_core::backend::{Queue, Resubscribe};
use agent_core::{BackendError, BackendEvent, BackendResult, Subscription};
use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::board::{decode_presence, Board, Change};
use crate::inner::{lock, Inner};
use crate::keys::{self, Key};

type Messages = push::Ordered;

/// One message of the bucket's stream, read; `None` for one that is not a key of this bucket.
fn change(inner: &Inner, m: &async_nats::jetstream::Message) -> Option<(Change, u64)> {
    let info = m.info().ok()?;
    let key = m.subject.as_str().strip_prefix(&inner.prefix)?.to_owned();
    let deleted = m.headers.as_ref().is_some_and(|h| {
        h.get("KV-Operation")
            .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE")
            || h.get(async_nats::header::NATS_MARKER_REASON).is_some()
    });
    let ttl = m
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_TTL))
        .and_then(|v| v.as_str().trim_end_matches('s').parse::<u64>().ok())
        .map(std::time::Duration::from_secs);
    Some((
        Change {
            key,
            put: !deleted,
            value: m.payload.clone(),
            rev: info.stream_sequence,
            ttl,
        },
        info.pending,
    ))
}

/// A new consumer of every key's last value and what follows, drained up to the present: the
/// board as of its revision, and the consumer to read on from.
pub(crate) async fn open(inner: &Inner) -> BackendResult<(Board, Messages)> {
    let timeout = inner.config.request_timeout;
    let info = inner
        .stream
        .clone()
        .info()
        .await
        .map_err(|e| inner.error("read the bucket's state", e))?
        .clone();
    let last = info.state.last_sequence;
    let consumer = inner
        .stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: inner.client.new_inbox(),
            description: Some("ifc watch".into()),
            filter_subject: format!("{}>", inner.prefix),
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| inner.error("open a watch", e))?;
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| inner.error("open a watch", e))?;
    let mut board = Board {
        revision: last,
        stream_created: info.created.unix_timestamp_nanos(),
        ..Board::default()
    };
    while pending > 0 {
        let next = tokio::time::timeout(timeout, messages.next())
            .await
            .map_err(|_| inner.error("read the bucket", "timed out"))?;
        let m = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(inner.error("read the bucket", e)),
            None => return Err(inner.error("read the bucket", "the watch ended")),
        };
        if let Some((c, left)) = change(inner, &m) {
            board.apply(&c);
            pending = left;
        }
    }
    Ok((board, messages))
}

/// A subscription: a snapshot and, from a task of its own, the changes after it.
pub(crate) fn subscribe(
    inner: Arc<Inner>,
) -> Pin<Box<dyn Future<Output = BackendResult<Subscription>> + Send>> {
    Box::pin(async move {
        let (board, messages) = open(&inner).await?;
        let snapshot = board.listing();
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Queue::default());
        let board = Arc::new(Mutex::new(board));
        {
            let mut watched = lock(&inner.watched);
            if watched.as_ref().and_then(Weak::upgrade).is_none() {
                *watched = Some(Arc::downgrade(&board));
            }
        }
        let feed = Feed {
            tx,
            queue: Arc::clone(&queue),
            bound: inner.config.event_queue_bound,
        };
        // Weakly: once this feed's pump ends, the channel closes and the subscriber learns it.
        lock(&inner.subscribers).push(feed.downgrade());
        tokio::spawn(pump(Arc::downgrade(&inner), board, messages, feed));
        // Fallen behind, it starts again from a fresh snapshot.
        let again: Resubscribe = {
            let inner = Arc::downgrade(&inner);
            Arc::new(move || match inner.upgrade() {
                Some(inner) => {
                    inner
                        .resyncs
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    subscribe(inner)
                }
                None => Box::pin(async {
                    Err(BackendError::Unavailable {
                        endpoint: "nats".into(),
                        reason: "the client is closed".into(),
                    })
                }),
            })
        };
        Ok(Subscription::bounded(snapshot, rx, queue, again))
    })
}

/// Where a pump sends: the subscriber's channel and its bounded queue's count. Every event
/// goes through `send`, so the count is right (a `ClaimLost` sent past it made the count wrap
/// and the queue look overflowed for good).
pub(crate) struct Feed {
    tx: mpsc::UnboundedSender<BackendEvent>,
    queue: Arc<Queue>,
    bound: usize,
}

impl Feed {
    /// Sends `event`; `false` once the subscriber is gone or its queue overflowed (it then
    /// starts again from a fresh snapshot, and this feed ends).
    pub(crate) fn send(&self, event: BackendEvent) -> bool {
        self.queue.push(self.bound) && self.tx.send(event).is_ok()
    }

    fn downgrade(&self) -> WeakFeed {
        WeakFeed {
            tx: self.tx.downgrade(),
            queue: Arc::clone(&self.queue),
            bound: self.bound,
        }
    }
}

/// A feed as the client keeps it to send what no change delivers (`ClaimLost`,
/// `SessionTaken`): it does not keep the channel open.
#[derive(Debug)]
pub(crate) struct WeakFeed {
    tx: mpsc::WeakUnboundedSender<BackendEvent>,
    queue: Arc<Queue>,
    bound: usize,
}

impl WeakFeed {
    /// Sends `event` while the feed's pump runs; `false` once it is gone.
    pub(crate) fn send(&self, event: BackendEvent) -> bool {
        let Some(tx) = self.tx.upgrade() else {
            return false;
        };
        Feed {
            tx,
            queue: Arc::clone(&self.queue),
            bound: self.bound,
        }
        .send(event)
    }
}

/// Sends a change's events and tells the holders of claims it ended; `false` once the
/// subscriber is gone.
fn deliver(inner: &Inner, board: &Board, events: Vec<agent_core::TaskEvent>, feed: &Feed) -> bool {
    let touched: Vec<_> = events.iter().map(|e| e.task.clone()).collect();
    for e in events {
        if !feed.send(BackendEvent::Task(e)) {
            return false;
        }
    }
    inner.check_held(board, touched.into_iter());
    true
}

/// Reads the leases whose renewals stopped arriving; one that is gone is applied as gone (its
/// delete marker was missed while the watch was away). `false` once the subscriber is gone.
async fn sweep_leases(inner: &Inner, board: &Mutex<Board>, feed: &Feed) -> bool {
    let overdue = lock(board).overdue();
    for lease in overdue {
        match inner.lease_alive(lease).await {
            Ok(true) => lock(board).lease_lives(lease),
            Ok(false) => {
                let mut board = lock(board);
                let change = Change {
                    key: keys::lease(lease),
                    put: false,
                    value: bytes::Bytes::new(),
                    rev: board.revision,
                    ttl: None,
                };
                let events = board.apply(&change);
                if !deliver(inner, &board, events, feed) {
                    return false;
                }
            }
            Err(e) => tracing::debug!(lease, error = %e, "cannot read an overdue lease"),
        }
    }
    true
}

/// Feeds a subscriber the changes its consumer delivers. If the consumer ends (the server lost
/// it), or the bucket is not the one the board was read from (deleted and made again, or a
/// server restarted without its store), a new consumer starts and the subscriber gets its
/// snapshot as a `Resync`.
async fn pump(inner: Weak<Inner>, board: Arc<Mutex<Board>>, mut messages: Messages, feed: Feed) {
    let tx = &feed.tx;
    let mut sweep = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut ticks = 0u64;
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            () = tx.closed() => return,
            _ = sweep.tick() => {
                let Some(inner) = inner.upgrade() else { return };
                if !sweep_leases(&inner, &board, &feed).await {
                    return;
                }
                ticks += 1;
                if !ticks.is_multiple_of(STREAM_CHECK_TICKS) || !replaced(&inner, &board).await {
                    continue;
                }
                tracing::warn!("the bucket was made again since it was read; starting again from a fresh snapshot");
                None
            }
        };
        let Some(inner) = inner.upgrade() else { return };
        match next {
            Some(Ok(m)) => {
                let Some((c, _)) = change(&inner, &m) else {
                    continue;
                };
                let mut board = lock(&board);
                let events = board.apply(&c);
                match keys::parse(&c.key) {
                    Key::Session(s) if c.put => {
                        if let Some(p) = decode_presence(&c.value) {
                            inner.presence_written(&s, &p);
                        }
                    }
                    _ => {}
                }
                if !deliver(&inner, &board, events, &feed) {
                    return;
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "watch hiccup; the ordered consumer goes on");
            }
            None => {
                inner
                    .reconnects
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match restart(&inner, &board, &feed).await {
                    Some(m) => messages = m,
                    None => return,
                }
            }
        }
    }
}

/// How many sweeps (seconds) apart a subscription checks that its bucket is the one it read.
const STREAM_CHECK_TICKS: u64 = 5;

/// Whether the bucket's stream is not the one `board` was read from: made again since (its
/// creation time differs), or behind the board (a server restarted without its store).
async fn replaced(inner: &Inner, board: &Mutex<Board>) -> bool {
    match inner.stream.clone().info().await {
        Ok(info) => {
            let board = lock(board);
            info.created.unix_timestamp_nanos() != board.stream_created
                || info.state.last_sequence < board.revision
        }
        Err(e) => {
            // Gone (deleted, or a server without it): read again once it is back.
            let gone = e.to_string().contains("not found");
            tracing::debug!(error = %e, gone, "cannot read the bucket's state");
            gone
        }
    }
}

/// Starts a subscription's consumer again from a fresh snapshot, handed to the subscriber as a
/// `Resync`; retried until the bucket answers. `None` once the subscriber is gone.
async fn restart(inner: &Inner, board: &Mutex<Board>, feed: &Feed) -> Option<Messages> {
    tracing::warn!("watch ended; starting again from a fresh snapshot");
    let mut backoff = agent_core::retry::Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(5),
    );
    loop {
        match open(inner).await {
            Ok((fresh, m)) => {
                let listing = fresh.listing();
                let all: Vec<_> = fresh.tasks.keys().cloned().collect();
                *lock(board) = fresh;
                if !feed.send(BackendEvent::Resync(listing)) {
                    return None;
                }
                inner.check_held(&lock(board), all.into_iter());
                return Some(m);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the watch again; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                if feed.tx.is_closed() {
                    return None;
                }
            }
        }
    }
}
