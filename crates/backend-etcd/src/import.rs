//! Writes that come from another store or an operator, by compare-and-swap: migration from the
//! board (one task as the board states it, never moving it backwards unless forced), `record`
//! (a transition mirrored from git, under `agent_core::mirror::decide`) and `delete` (an
//! operator removing a task: never a held one or one others wait for, unless forced).

use agent_core::mirror::{self, Decision, Mirrored, RecordOutcome};
use agent_core::{BackendError, BackendResult, Interest, Task, TaskId, TaskStatus};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::inner::Inner;
use crate::record::{effective, Record};
use crate::view::View;
use task_record::{Deleted, Imported};

/// What `archive` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Archived {
    Archived,
    NotFound,
    /// Only complete tasks are archived.
    NotComplete(TaskStatus),
}

/// What `restore` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Restored {
    Restored,
    /// Nothing of that id in the archive.
    NotArchived,
    /// A task of that id exists in `tasks/` again: kept, the archive too.
    Exists,
}

impl Inner {
    pub(crate) async fn import(
        &self,
        want: &Task,
        force: bool,
        dry_run: bool,
    ) -> BackendResult<Imported> {
        let id: &TaskId = &want.id;
        self.claimable_with(id, &want.blocked_by)?;
        for _ in 0..16 {
            let view = self.read_view(id, false).await?;
            let (outcome, next) = match &view.record {
                // Done and archived: created again, it would be done again (tester helper-9).
                None if view.archived_self.is_some() && !force => {
                    return Ok(Imported::Kept {
                        reason: format!(
                            "archived (complete); `ifc archive --restore {id}` puts it back"
                        ),
                    })
                }
                None => (Imported::Created, Record::plain(want.clone())),
                Some(stored) => {
                    let (current, _) =
                        effective(stored, view.claim.as_ref()).map_err(|reason| {
                            BackendError::Corrupt {
                                key: self.keys.task(id),
                                reason,
                            }
                        })?;
                    let task =
                        match Imported::plan(&current, want, force, view.claim.is_some(), "etcd") {
                            Ok(task) => task,
                            Err(outcome) => return Ok(outcome),
                        };
                    (Imported::Updated, Record::plain(task))
                }
            };
            if dry_run {
                return Ok(outcome);
            }
            // A claim key is only there to delete with --force.
            if self.replace(id, &view, Some(&next), "import").await? {
                return Ok(outcome);
            }
        }
        Err(BackendError::Unavailable {
            endpoint: self.conn.endpoints().to_owned(),
            reason: format!("{id}: kept changing during import"),
        })
    }

    /// Records one transition from another store: written (record + claim key removed) only if
    /// neither changed since they were read and `decide` allows it.
    pub(crate) async fn record(&self, want: &Mirrored) -> BackendResult<RecordOutcome> {
        let id = &want.task;
        for _ in 0..16 {
            let view = self.read_view(id, false).await?;
            let Some((current, _)) = self.current(id, &view)? else {
                return Ok(RecordOutcome::NotFound);
            };
            if let Decision::Skip(outcome) = mirror::decide(&current, want) {
                return Ok(outcome);
            }
            // A claim under another process's lease ends by its holder's release or by its
            // lease: another store's "available" is not that holder's word (seed 70014: git
            // read a mirrored claim as free, and a bridge ended the live etcd claim with it).
            let leased_elsewhere = view
                .claim
                .as_ref()
                .is_some_and(|c| c.lease != 0 && !self.granted_here(c.lease));
            if leased_elsewhere
                && matches!(want.status, TaskStatus::Available | TaskStatus::Blocked)
            {
                return Ok(RecordOutcome::Kept {
                    reason: "held under a live lease: only its holder's release or the lease's end frees it".into(),
                });
            }
            let changed = view.record.as_ref().is_some_and(|stored| {
                let rev = u64::try_from(stored.mod_rev).unwrap_or_default();
                task_record::changed_since_claim(stored.record.as_ref(), rev, want)
            });
            if changed {
                return Ok(RecordOutcome::Kept {
                    reason: "the task was reopened or changed hands here after that claim".into(),
                });
            }
            let next = Record::plain(mirror::applied(&current, want));
            if self.replace(id, &view, Some(&next), "record").await? {
                return Ok(RecordOutcome::Written);
            }
        }
        Err(BackendError::Unavailable {
            endpoint: self.conn.endpoints().to_owned(),
            reason: format!("{id}: kept changing while recording"),
        })
    }

    /// Removes a task's record and claim key, if neither changed since they were read; a claimed
    /// task, or one that tasks not complete wait for, only with `force`.
    pub(crate) async fn delete(&self, id: &TaskId, force: bool) -> BackendResult<Deleted> {
        for _ in 0..16 {
            let view = self.read_view(id, false).await?;
            let current = match self.current(id, &view) {
                Ok(Some((current, _))) => current,
                Ok(None) => return Ok(Deleted::NotFound),
                // An unreadable record holds nothing and nobody can wait for it by name.
                Err(BackendError::Corrupt { .. }) if force => {
                    if self.replace(id, &view, None, "delete").await? {
                        return Ok(Deleted::Deleted);
                    }
                    continue;
                }
                Err(BackendError::Corrupt { key, reason }) => {
                    return Err(BackendError::Corrupt {
                        key,
                        reason: Deleted::corrupt_reason(id, &reason),
                    })
                }
                Err(e) => return Err(e),
            };
            if !force && current.status == TaskStatus::Claimed {
                return Ok(Deleted::Held {
                    holder: current.claimed_by,
                });
            }
            if !force {
                let dependents: Vec<TaskId> = self
                    .list_of(&Interest::all())
                    .await?
                    .tasks
                    .into_iter()
                    .filter(|t| t.status != TaskStatus::Complete && t.blocked_by.contains(id))
                    .map(|t| t.id)
                    .collect();
                if !dependents.is_empty() {
                    return Ok(Deleted::Blocks { dependents });
                }
            }
            if self.replace(id, &view, None, "delete").await? {
                return Ok(Deleted::Deleted);
            }
        }
        Err(BackendError::Unavailable {
            endpoint: self.conn.endpoints().to_owned(),
            reason: format!("{id}: kept changing during delete"),
        })
    }

    /// Moves a complete task's record from `tasks/` to `archive/` (and its claim key, if any,
    /// away), if neither changed since they were read: it leaves every watch and list, and
    /// nothing is lost. Which tasks may go (not one that tasks not complete wait for) is the
    /// caller's to decide, from one list.
    pub(crate) async fn archive(&self, id: &TaskId) -> BackendResult<Archived> {
        for _ in 0..16 {
            let view = self.read_view(id, false).await?;
            let current = match self.current(id, &view)? {
                Some((current, _)) => current,
                None => return Ok(Archived::NotFound),
            };
            if current.status != TaskStatus::Complete {
                return Ok(Archived::NotComplete(current.status));
            }
            let Some(record) = view.record.as_ref().and_then(|r| r.record.as_ref().ok()) else {
                return Ok(Archived::NotFound);
            };
            let keep = TxnOp::put(self.keys.archived(id), record.encode(), None);
            if self
                .replace_and(id, &view, None, Some(keep), "archive")
                .await?
            {
                return Ok(Archived::Archived);
            }
        }
        Err(BackendError::Unavailable {
            endpoint: self.conn.endpoints().to_owned(),
            reason: format!("{id}: kept changing while archiving"),
        })
    }

    /// Puts an archived task back in `tasks/`, unless a task of that id exists again.
    pub(crate) async fn restore(&self, id: &TaskId) -> BackendResult<Restored> {
        let (task_key, archived) = (self.keys.task(id), self.keys.archived(id));
        let got = self.conn.get("restore", &archived, None).await?;
        let Some(kv) = got.kvs().first() else {
            return Ok(Restored::NotArchived);
        };
        let txn = Txn::new()
            .when(vec![
                Compare::create_revision(task_key.clone(), CompareOp::Equal, 0),
                Compare::mod_revision(archived.clone(), CompareOp::Equal, kv.mod_revision()),
            ])
            .and_then(vec![
                TxnOp::put(task_key, kv.value().to_vec(), None),
                TxnOp::delete(archived, None),
            ]);
        Ok(match self.conn.txn("restore", txn).await?.succeeded() {
            true => Restored::Restored,
            false => Restored::Exists,
        })
    }

    /// Writes `next` as the task's record (`None`: deletes it) and removes its claim key, if
    /// neither changed since `view` was read. `false`: one did (read again and decide again).
    async fn replace(
        &self,
        id: &TaskId,
        view: &View,
        next: Option<&Record>,
        what: &str,
    ) -> BackendResult<bool> {
        self.replace_and(id, view, next, None, what).await
    }

    /// [`Inner::replace`], with one more write in the same transaction.
    async fn replace_and(
        &self,
        id: &TaskId,
        view: &View,
        next: Option<&Record>,
        also: Option<TxnOp>,
        what: &str,
    ) -> BackendResult<bool> {
        let (task_key, claim_key) = (self.keys.task(id), self.keys.claim(id));
        let mut ops = vec![match next {
            Some(record) => TxnOp::put(task_key.clone(), record.encode(), None),
            None => TxnOp::delete(task_key.clone(), None),
        }];
        ops.extend(also);
        if view.claim.is_some() {
            ops.push(TxnOp::delete(claim_key.clone(), None));
        }
        let txn = Txn::new()
            .when(vec![
                Compare::mod_revision(task_key, CompareOp::Equal, view.record_rev()),
                Compare::mod_revision(claim_key, CompareOp::Equal, view.claim_rev()),
            ])
            .and_then(ops);
        Ok(self.conn.txn(what, txn).await?.succeeded())
    }
}
