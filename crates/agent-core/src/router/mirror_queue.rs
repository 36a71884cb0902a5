//! The hybrid session's git mirror: transitions done on the coordinator are queued and recorded
//! in git by one background writer, off the claim path. Whatever queued while a write was in
//! flight goes in the next one (one commit for the batch, the latest state of each task), so git
//! lags by about one push. Failed writes are retried with backoff.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::backend::Backend;
use crate::mirror::{Mirrored, RecordOutcome};
use crate::retry::Backoff;

#[derive(Debug)]
pub(super) struct MirrorQueue {
    tx: mpsc::UnboundedSender<(u64, Mirrored)>,
    queued: AtomicU64,
    done: watch::Receiver<u64>,
    worker: JoinHandle<()>,
    conflicts: Arc<AtomicU64>,
}

impl MirrorQueue {
    /// Starts the writer over `git`; `name` is for logs.
    pub fn start(git: Arc<dyn Backend>, name: String) -> MirrorQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = watch::channel(0);
        let conflicts = Arc::new(AtomicU64::new(0));
        let worker = tokio::spawn(write_loop(git, name, rx, done_tx, Arc::clone(&conflicts)));
        MirrorQueue {
            tx,
            queued: AtomicU64::new(0),
            done,
            worker,
            conflicts,
        }
    }

    /// Conflicts the writer found (git had a task held by another session).
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    /// Queues one transition.
    pub fn push(&self, item: Mirrored) {
        let seq = self.queued.fetch_add(1, Ordering::SeqCst) + 1;
        // The writer only stops when the queue is dropped.
        let _ = self.tx.send((seq, item));
    }

    /// Whether something queued is not in git yet.
    pub fn pending(&self) -> bool {
        *self.done.borrow() < self.queued.load(Ordering::SeqCst)
    }

    /// Waits until everything queued before the call is in git (`false`: not within `limit`).
    pub async fn flush(&self, limit: Duration) -> bool {
        let target = self.queued.load(Ordering::SeqCst);
        let mut done = self.done.clone();
        tokio::time::timeout(limit, done.wait_for(|d| *d >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for MirrorQueue {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

/// Adds `item` to `batch`, replacing an older state of the same task.
fn coalesce(batch: &mut Vec<Mirrored>, item: Mirrored) {
    match batch.iter_mut().find(|m| m.task == item.task) {
        Some(old) => *old = item,
        None => batch.push(item),
    }
}

async fn write_loop(
    git: Arc<dyn Backend>,
    name: String,
    mut rx: mpsc::UnboundedReceiver<(u64, Mirrored)>,
    done: watch::Sender<u64>,
    conflicts: Arc<AtomicU64>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    while let Some((mut last, first)) = rx.recv().await {
        let mut batch = vec![first];
        loop {
            while let Ok((seq, item)) = rx.try_recv() {
                last = seq;
                coalesce(&mut batch, item);
            }
            match git.record(&batch).await {
                Ok(out) => {
                    for (item, outcome) in batch.iter().zip(&out) {
                        if let RecordOutcome::Conflict { holder } = outcome {
                            conflicts.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(session = %name, task = %item.task, git_holder = %crate::model::holder_name(holder.as_ref()), "conflict: git has this task claimed by another session; mirror left it alone");
                        }
                    }
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    let pause = backoff.next_delay();
                    tracing::warn!(session = %name, error = %e, retry_in = ?pause, "cannot mirror to git");
                    tokio::time::sleep(pause).await;
                }
            }
        }
        done.send_replace(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SessionId, TaskId, TaskStatus};

    #[test]
    fn the_latest_state_of_a_task_wins() {
        let item = |t: &str, status| Mirrored {
            task: TaskId::parse(t).expect("id"),
            status,
            holder: Some(SessionId::parse("s").expect("id")),
            token: None,
            read_as: None,
        };
        let mut batch = Vec::new();
        coalesce(&mut batch, item("A", TaskStatus::Claimed));
        coalesce(&mut batch, item("B", TaskStatus::Claimed));
        coalesce(&mut batch, item("A", TaskStatus::Complete));
        assert_eq!(
            batch,
            vec![
                item("A", TaskStatus::Complete),
                item("B", TaskStatus::Claimed)
            ]
        );
    }
}
