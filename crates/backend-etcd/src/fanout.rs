//! Delivery of the watch cache's events to its subscribers, after the cache's lock is released:
//! the cache collects what a change produced, and whoever changed it hands that to every
//! subscriber once the lock is gone (`Inner::cache` returns a guard that does this on drop). A
//! claim waiting for the cache's lock never waits for thousands of deliveries, and an agent's
//! single subscriber is reached without a hop through another task.
//!
//! A subscriber joins under the cache's lock, at the cache's revision: an event of that revision
//! or older, applied before it joined but handed out after, is not given to it (its snapshot
//! already has it).

use std::sync::{Mutex, MutexGuard};

use agent_core::BackendEvent;
use tokio::sync::mpsc;

/// An event and the revision it belongs to (`None`: not a change of the store, e.g. a lost claim).
pub(crate) type Outgoing = (Option<i64>, BackendEvent);

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::UnboundedSender<BackendEvent>,
    /// The revision of the snapshot it started from.
    since: i64,
}

#[derive(Debug, Default)]
pub(crate) struct Fanout {
    subscribers: Mutex<Vec<Subscriber>>,
}

impl Fanout {
    fn subscribers(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        // Pushes and retains only; a poisoned list is still a list.
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new subscriber whose snapshot is at `since`. Call with the cache's lock held.
    pub fn join(&self, since: i64) -> mpsc::UnboundedReceiver<BackendEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers().push(Subscriber { tx, since });
        rx
    }

    /// Hands `events` to every subscriber that has not seen them, in order; forgets the ones
    /// that went away.
    pub fn deliver(&self, events: Vec<Outgoing>) {
        if events.is_empty() {
            return;
        }
        let mut subscribers = self.subscribers();
        for (revision, event) in events {
            subscribers.retain(|s| {
                if revision.is_some_and(|r| r <= s.since) {
                    return !s.tx.is_closed();
                }
                s.tx.send(event.clone()).is_ok()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_core::{FencingToken, SessionId, TaskId};

    fn lost(task: &str) -> BackendEvent {
        BackendEvent::ClaimLost {
            task: TaskId::parse(task).expect("id"),
            session: SessionId::parse("s").expect("id"),
            token: FencingToken(1),
        }
    }

    fn task_of(e: &BackendEvent) -> String {
        match e {
            BackendEvent::ClaimLost { task, .. } => task.to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn a_subscriber_gets_only_what_its_snapshot_has_not_and_in_order() {
        let fanout = Fanout::default();
        let mut early = fanout.join(4);
        let mut late = fanout.join(5);
        fanout.deliver(vec![
            (Some(5), lost("R5")),
            (None, lost("NONE")),
            (Some(6), lost("R6")),
        ]);
        let got = |rx: &mut mpsc::UnboundedReceiver<BackendEvent>| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|e| task_of(&e))
                .collect::<Vec<_>>()
        };
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
        let gone = fanout.join(0);
        let mut kept = fanout.join(0);
        drop(gone);
        fanout.deliver(vec![(Some(1), lost("T"))]);
        assert_eq!(fanout.subscribers().len(), 1);
        assert!(kept.try_recv().is_ok());
    }
}
