//! Delivery of the watch cache's events to its subscribers, after the cache's lock is released:
//! the cache collects what a change produced, and whoever changed it hands that to every
//! subscriber once the lock is gone (`Inner::cache` returns a guard that does this on drop). A
//! claim waiting for the cache's lock never waits for thousands of deliveries, and an agent's
//! single subscriber is reached without a hop through another task.
//!
//! A subscriber joins under the cache's lock, at the cache's revision: an event of that revision
//! or older, applied before it joined but handed out after, is not given to it (its snapshot
//! already has it).
//!
//! Each subscriber has an interest (`agent_core::Interest`): a task event goes only to those
//! whose interest covers the task, found through an index by exact id and by the literal prefix
//! of each glob, so an event costs what it touches, not the number of subscribers. The fan-out
//! keeps every task's blockers (from the events it hands out) to cover the blockers a task
//! names later, with their own. Each queue holds at most a bound of events: a subscriber that
//! falls further behind is dropped and starts again from a fresh snapshot (counted).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use agent_core::backend::Queue;
use agent_core::interest::Covered;
use agent_core::{BackendEvent, Interest, TaskId};
use tokio::sync::mpsc;

/// An event and the revision it belongs to (`None`: not a change of the store, e.g. a lost claim).
pub(crate) type Outgoing = (Option<i64>, BackendEvent);

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::UnboundedSender<BackendEvent>,
    /// The revision of the snapshot it started from.
    since: i64,
    covered: Covered,
    queue: Arc<Queue>,
}

/// Every subscriber, and where to find the ones a task event is for.
#[derive(Debug, Default)]
struct Routing {
    next_key: u64,
    subscribers: HashMap<u64, Subscriber>,
    /// Subscribers of every task.
    everything: HashSet<u64>,
    /// Subscribers with a pattern that is an exact id.
    by_id: HashMap<TaskId, HashSet<u64>>,
    /// Subscribers with a glob, by the glob's literal prefix (`P0.5.` for `P0.5.*`).
    by_prefix: HashMap<String, HashSet<u64>>,
    /// Subscribers that cover a task as a blocker of theirs.
    by_blocker: HashMap<TaskId, HashSet<u64>>,
    /// Every task's blockers, as of `board_revision` (kept from the first interest on).
    board: Option<HashMap<TaskId, Vec<TaskId>>>,
    board_revision: i64,
}

#[derive(Debug)]
pub(crate) struct Fanout {
    routing: Mutex<Routing>,
    /// Most events a subscriber's queue holds before it starts again.
    bound: usize,
    resyncs: AtomicU64,
}

impl Default for Fanout {
    fn default() -> Self {
        Fanout::new(DEFAULT_QUEUE_BOUND)
    }
}

/// The default of `EtcdConfig::event_queue_bound`.
pub const DEFAULT_QUEUE_BOUND: usize = 10_000;

impl Fanout {
    pub fn new(bound: usize) -> Fanout {
        Fanout {
            routing: Mutex::new(Routing::default()),
            bound: bound.max(1),
            resyncs: AtomicU64::new(0),
        }
    }

    fn routing(&self) -> MutexGuard<'_, Routing> {
        // Inserts and removals only; a poisoned map is still a map.
        self.routing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many subscribers started again after falling behind.
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// A new subscriber of `interest` whose snapshot is at `since`; `blockers` gives every task
    /// of the cache with its blockers. Call with the cache's lock held.
    pub fn join<'a>(
        &self,
        since: i64,
        interest: &Interest,
        blockers: impl Fn() -> Vec<(&'a TaskId, &'a [TaskId])>,
    ) -> (mpsc::UnboundedReceiver<BackendEvent>, Arc<Queue>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Queue::default());
        let mut routing = self.routing();
        let covered = if interest.is_all() {
            Covered::new(Interest::all(), std::iter::empty(), |_| None)
        } else {
            let all = blockers();
            let of: HashMap<&TaskId, &[TaskId]> = all.iter().copied().collect();
            if routing.board.is_none() {
                routing.board = Some(
                    all.iter()
                        .map(|(id, bs)| ((*id).clone(), bs.to_vec()))
                        .collect(),
                );
                routing.board_revision = since;
            }
            Covered::new(interest.clone(), of.keys().copied(), |id| {
                of.get(id).copied()
            })
        };
        routing.add(
            Subscriber {
                tx,
                since,
                covered,
                queue: Arc::clone(&queue),
            },
            interest,
        );
        (rx, queue)
    }

    /// Hands `events` to every subscriber whose interest covers them and that has not seen
    /// them, in order; forgets the ones that went away or fell too far behind.
    pub fn deliver(&self, events: Vec<Outgoing>) {
        if events.is_empty() {
            return;
        }
        let mut routing = self.routing();
        let mut gone = Vec::new();
        for (revision, event) in events {
            let keys: Vec<u64> = match &event {
                BackendEvent::Task(e) => {
                    routing.note(
                        revision,
                        &e.task,
                        e.new_status.map(|_| e.blocked_by.as_slice()),
                    );
                    routing.for_task(&e.task)
                }
                _ => routing.subscribers.keys().copied().collect(),
            };
            for key in keys {
                let Some(s) = routing.subscribers.get(&key) else {
                    continue;
                };
                if revision.is_some_and(|r| r <= s.since) {
                    if s.tx.is_closed() {
                        gone.push(key);
                    }
                    continue;
                }
                if !s.queue.push(self.bound) {
                    self.resyncs.fetch_add(1, Ordering::Relaxed);
                    gone.push(key);
                    continue;
                }
                if s.tx.send(event.clone()).is_err() {
                    gone.push(key);
                    continue;
                }
                if let BackendEvent::Task(e) = &event {
                    routing.cover_blockers(key, &e.blocked_by);
                }
            }
            for key in gone.drain(..) {
                routing.remove(key);
            }
        }
    }
}

impl Routing {
    fn add(&mut self, s: Subscriber, interest: &Interest) {
        let key = self.next_key;
        self.next_key += 1;
        match interest.patterns() {
            None => {
                self.everything.insert(key);
            }
            Some(patterns) => {
                for p in patterns {
                    match p.literal_prefix() {
                        Some(prefix) => self
                            .by_prefix
                            .entry(prefix.to_owned())
                            .or_default()
                            .insert(key),
                        None => match TaskId::parse(p.as_str()) {
                            Ok(id) => self.by_id.entry(id).or_default().insert(key),
                            Err(_) => self.everything.insert(key),
                        },
                    };
                }
                for b in s.covered.blockers() {
                    self.by_blocker.entry(b.clone()).or_default().insert(key);
                }
            }
        }
        self.subscribers.insert(key, s);
    }

    fn remove(&mut self, key: u64) {
        let Some(_) = self.subscribers.remove(&key) else {
            return;
        };
        self.everything.remove(&key);
        for index in [&mut self.by_id, &mut self.by_blocker] {
            index.retain(|_, keys| {
                keys.remove(&key);
                !keys.is_empty()
            });
        }
        self.by_prefix.retain(|_, keys| {
            keys.remove(&key);
            !keys.is_empty()
        });
        if self.subscribers.is_empty() {
            self.board = None;
        }
    }

    /// The subscribers whose interest covers `task`: those of every task, of its id, of a glob
    /// whose literal prefix is a prefix of it (then matched), and of it as a blocker.
    fn for_task(&self, task: &TaskId) -> Vec<u64> {
        let mut keys: Vec<u64> = self.everything.iter().copied().collect();
        keys.extend(self.by_id.get(task).into_iter().flatten());
        keys.extend(self.by_blocker.get(task).into_iter().flatten());
        let id = task.as_str();
        for end in (0..=id.len()).filter(|i| id.is_char_boundary(*i)) {
            keys.extend(self.by_prefix.get(&id[..end]).into_iter().flatten());
        }
        keys.sort_unstable();
        keys.dedup();
        keys.retain(|k| {
            self.subscribers
                .get(k)
                .is_some_and(|s| s.covered.covers(task))
        });
        keys
    }

    /// A task event at `revision`: the board keeps its blockers (`None`: it was deleted).
    fn note(&mut self, revision: Option<i64>, task: &TaskId, blockers: Option<&[TaskId]>) {
        let Some(board) = self.board.as_mut() else {
            return;
        };
        // Older than the board: it has the task as of a later revision. The same revision is
        // not older: a transaction (or a re-list) changes several tasks at one revision.
        let Some(r) = revision.filter(|r| *r >= self.board_revision) else {
            return;
        };
        self.board_revision = r;
        match blockers {
            Some(bs) => {
                board.insert(task.clone(), bs.to_vec());
            }
            None => {
                board.remove(task);
            }
        }
    }

    /// The subscriber `key` was handed an event naming `blockers`: they are covered from now
    /// on, with their own.
    fn cover_blockers(&mut self, key: u64, blockers: &[TaskId]) {
        if blockers.is_empty() {
            return;
        }
        let Some(s) = self.subscribers.get_mut(&key) else {
            return;
        };
        if blockers.iter().all(|b| s.covered.covers(b)) {
            return;
        }
        let board = self.board.as_ref();
        let added = s.covered.add_blockers(blockers, &|id: &TaskId| {
            board.and_then(|b| b.get(id)).map(Vec::as_slice)
        });
        for b in added {
            self.by_blocker.entry(b).or_default().insert(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_core::config::TaskPattern;
    use agent_core::{FencingToken, SessionId, TaskEvent, TaskStatus};

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).expect("id")
    }

    fn lost(task: &str) -> BackendEvent {
        BackendEvent::ClaimLost {
            task: id(task),
            session: SessionId::parse("s").expect("id"),
            token: FencingToken(1),
        }
    }

    fn changed(task: &str, blocked_by: &[&str], revision: i64) -> Outgoing {
        let e = TaskEvent {
            task: id(task),
            old_status: Some(TaskStatus::Available),
            new_status: Some(TaskStatus::Claimed),
            holder: None,
            blocked_by: blocked_by.iter().map(|b| id(b)).collect(),
            revision: u64::try_from(revision).expect("positive"),
            time: std::time::SystemTime::now(),
        };
        (Some(revision), BackendEvent::Task(e))
    }

    fn task_of(e: &BackendEvent) -> String {
        match e {
            BackendEvent::ClaimLost { task, .. } => task.to_string(),
            BackendEvent::Task(e) => e.task.to_string(),
            other => format!("{other:?}"),
        }
    }

    fn got(rx: &mut mpsc::UnboundedReceiver<BackendEvent>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| task_of(&e))
            .collect()
    }

    fn all(fanout: &Fanout, since: i64) -> mpsc::UnboundedReceiver<BackendEvent> {
        fanout.join(since, &Interest::all(), Vec::new).0
    }

    #[test]
    fn a_subscriber_gets_only_what_its_snapshot_has_not_and_in_order() {
        let fanout = Fanout::default();
        let mut early = all(&fanout, 4);
        let mut late = all(&fanout, 5);
        fanout.deliver(vec![
            (Some(5), lost("R5")),
            (None, lost("NONE")),
            (Some(6), lost("R6")),
        ]);
        assert_eq!(got(&mut early), ["R5", "NONE", "R6"]);
        assert_eq!(
            got(&mut late),
            ["NONE", "R6"],
            "revision 5 is in its snapshot"
        );
    }

    #[test]
    fn a_subscriber_that_went_away_is_forgotten() {
        let fanout = Fanout::default();
        let gone = all(&fanout, 0);
        let mut kept = all(&fanout, 0);
        drop(gone);
        fanout.deliver(vec![(Some(1), lost("T"))]);
        assert_eq!(fanout.routing().subscribers.len(), 1);
        assert!(kept.try_recv().is_ok());
    }

    #[test]
    fn a_task_event_goes_to_the_subscribers_whose_interest_covers_it_only() {
        let fanout = Fanout::default();
        let board: Vec<(TaskId, Vec<TaskId>)> = vec![
            (id("A.1"), vec![id("B.1")]),
            (id("B.1"), vec![id("C.1")]),
            (id("C.1"), vec![]),
            (id("D.1"), vec![]),
            (id("E.1"), vec![id("F.1")]),
            (id("F.1"), vec![]),
        ];
        let blockers = || {
            board
                .iter()
                .map(|(t, b)| (t, b.as_slice()))
                .collect::<Vec<_>>()
        };
        let interest = |ps: &[&str]| {
            Interest::tasks(
                ps.iter()
                    .map(|p| TaskPattern::parse(p).expect("valid"))
                    .collect(),
            )
        };
        let (mut a, _) = fanout.join(1, &interest(&["A.*"]), blockers);
        let (mut d, _) = fanout.join(1, &interest(&["D.1"]), blockers);
        let (mut a_or_d, _) = fanout.join(1, &interest(&["?.1"]), blockers);
        let mut everything = all(&fanout, 1);
        fanout.deliver(vec![
            changed("C.1", &[], 2),
            changed("D.1", &[], 3),
            changed("A.10", &[], 4),
            // A.1 now waits for E.1 too: E.1 and what it waits for (F.1) are A's from now on.
            changed("A.1", &["B.1", "E.1"], 5),
            changed("F.1", &[], 6),
            changed("AX", &[], 7),
        ]);
        assert_eq!(got(&mut a), ["C.1", "A.10", "A.1", "F.1"]);
        assert_eq!(got(&mut d), ["D.1"]);
        assert_eq!(got(&mut a_or_d), ["C.1", "D.1", "A.1", "F.1"]);
        assert_eq!(got(&mut everything).len(), 6);
    }

    #[test]
    fn a_subscriber_that_falls_behind_its_bound_is_dropped_and_counted_and_others_go_on() {
        let fanout = Fanout::new(3);
        let (mut slow, queue) = fanout.join(0, &Interest::all(), Vec::new);
        let (rx, fast_queue) = fanout.join(0, &Interest::all(), Vec::new);
        let never: agent_core::backend::Resubscribe =
            Arc::new(|| Box::pin(async { unreachable!("the fast subscriber keeps up") }));
        // Read through a subscription, which tells the queue what it took.
        let mut fast = agent_core::Subscription::bounded(Default::default(), rx, fast_queue, never);
        let mut fast_got = || std::iter::from_fn(|| fast.try_next()).count();
        for r in 1..=3 {
            fanout.deliver(vec![changed("T", &[], r)]);
            assert_eq!(fast_got(), 1);
        }
        fanout.deliver(vec![changed("T", &[], 4)]);
        assert_eq!(fanout.resyncs(), 1);
        assert!(
            !queue.push(3),
            "the slow queue is overflowed: its subscription starts again"
        );
        assert_eq!(got(&mut slow).len(), 3, "what was queued before the bound");
        assert!(slow.try_recv().is_err());
        assert_eq!(fanout.routing().subscribers.len(), 1);
        fanout.deliver(vec![changed("T", &[], 5)]);
        assert_eq!(fast_got(), 2, "revisions 4 and 5");
    }
}
