//! Writing a task's state as *another* store recorded it (the router's git mirror, the bridge, the
//! return from a fallback): what a mirrored transition is and the pure rule for whether it may be
//! written over what this store says. Never backwards, never over another session's claim.

use serde::Serialize;

use crate::ids::{SessionId, TaskId};
use crate::model::{FencingToken, Task, TaskStatus};

/// One task's state in the store it happened in, to be recorded in another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mirrored {
    /// The task.
    pub task: TaskId,
    /// `claimed`, `complete` or `available` (a claim that ended without completing).
    pub status: TaskStatus,
    /// The holder (`claimed`), the completer (`complete`) or the session whose claim ended
    /// (`available`; `None` when nobody held it).
    pub holder: Option<SessionId>,
    /// The claim's fencing token in the store it happened in; written into git's trailers and
    /// STATUS file so the holder's release there is fenced by the same token.
    pub token: Option<FencingToken>,
    /// What the store being written said of the task when this transition was planned: it is
    /// written only while the store still says so, decided in the same compare-and-swap as the
    /// write (seeds 352000038, 430000020: a plan read a completion in one store, an operator
    /// reopened the task before the write reached the other, and the old completion was
    /// written over the reopen). `None`: whatever the store says now.
    pub read_as: Option<Face>,
}

/// What one store says of a task: status (blocked reads available) and holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Face {
    pub status: TaskStatus,
    pub holder: Option<SessionId>,
}

impl Face {
    /// The face of `t`: `blocked` is `available` (claimability then depends on blockers alone),
    /// and a free task has no holder.
    pub fn of(t: &Task) -> Face {
        let status = match t.status {
            TaskStatus::Blocked => TaskStatus::Available,
            s => s,
        };
        let holder = match status {
            TaskStatus::Available | TaskStatus::Blocked => None,
            _ => t.claimed_by.clone(),
        };
        Face { status, holder }
    }
}

/// What recording one transition came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RecordOutcome {
    /// Written.
    Written,
    /// This store already says so.
    Unchanged,
    /// This store is ahead (complete stays complete; a claim someone else made since is kept).
    Kept { reason: String },
    /// Both stores have the task claimed (or done) by different sessions: nothing was written.
    Conflict { holder: Option<SessionId> },
    /// No such task here.
    NotFound,
}

/// What [`decide`] says to do with a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write the task with this status and holder.
    Write,
    /// Write nothing; report this.
    Skip(RecordOutcome),
}

/// Whether `want` may be written over `current` (this store's effective state of the task).
///
/// - Nothing is written over a state other than the one the transition was planned from
///   ([`Mirrored::read_as`]).
/// - `claimed` by H: written over `available`/`blocked`; kept from `complete`; a conflict when
///   another session holds it.
/// - `complete` by H: written over anything but a claim of another session (a conflict) and
///   `complete` (unchanged).
/// - `available` after H's claim: written only while H still holds it here; otherwise nothing to
///   undo.
pub fn decide(current: &Task, want: &Mirrored) -> Decision {
    let moved = want
        .read_as
        .as_ref()
        .is_some_and(|f| *f != Face::of(current));
    match decide_on_state(current, want) {
        Decision::Write if moved => Decision::Skip(RecordOutcome::Kept {
            reason: "changed here since the transition was planned".into(),
        }),
        d => d,
    }
}

/// [`decide`] by the two states alone.
fn decide_on_state(current: &Task, want: &Mirrored) -> Decision {
    let held_by =
        |h: &Option<SessionId>| current.status == TaskStatus::Claimed && &current.claimed_by == h;
    let other_holder = current.status == TaskStatus::Claimed && current.claimed_by != want.holder;
    match want.status {
        TaskStatus::Claimed => {
            if held_by(&want.holder) {
                Decision::Skip(RecordOutcome::Unchanged)
            } else if other_holder {
                Decision::Skip(RecordOutcome::Conflict {
                    holder: current.claimed_by.clone(),
                })
            } else if current.status == TaskStatus::Complete {
                Decision::Skip(RecordOutcome::Kept {
                    reason: "already complete".into(),
                })
            } else {
                Decision::Write
            }
        }
        TaskStatus::Complete => {
            if current.status == TaskStatus::Complete {
                Decision::Skip(RecordOutcome::Unchanged)
            } else if other_holder {
                Decision::Skip(RecordOutcome::Conflict {
                    holder: current.claimed_by.clone(),
                })
            } else {
                Decision::Write
            }
        }
        TaskStatus::Available | TaskStatus::Blocked => match current.status {
            TaskStatus::Available | TaskStatus::Blocked => Decision::Skip(RecordOutcome::Unchanged),
            TaskStatus::Claimed if held_by(&want.holder) => Decision::Write,
            TaskStatus::Claimed => Decision::Skip(RecordOutcome::Kept {
                reason: "claimed again since".into(),
            }),
            TaskStatus::Complete => Decision::Skip(RecordOutcome::Kept {
                reason: "already complete".into(),
            }),
        },
    }
}

/// `current` with `want` applied (the caller has checked [`decide`]). A claim keeps its time,
/// and is marked a copy (see [`Task::copied`]).
pub fn applied(current: &Task, want: &Mirrored) -> Task {
    let mut next = current.clone();
    next.copied = want.status == TaskStatus::Claimed;
    next.status = match want.status {
        TaskStatus::Blocked => TaskStatus::Available,
        s => s,
    };
    match want.status {
        TaskStatus::Claimed | TaskStatus::Complete => {
            if next.claimed_by != want.holder || next.claimed_at.is_none() {
                next.claimed_at = Some(chrono::Utc::now());
            }
            next.claimed_by = want.holder.clone();
        }
        TaskStatus::Available | TaskStatus::Blocked => {
            next.claimed_by = None;
            next.claimed_at = None;
        }
    }
    next
}

/// How far along a status is (available/blocked < claimed < complete).
pub fn rank(status: TaskStatus) -> u8 {
    match status {
        TaskStatus::Available | TaskStatus::Blocked => 0,
        TaskStatus::Claimed => 1,
        TaskStatus::Complete => 2,
    }
}

/// What brings `to` up to `from`: every task that `from` has further along (claimed or complete
/// where `to` is behind). Never backwards; whether each may be written is `decide`'s to say (a
/// claim by another session there is a conflict, reported by `record`). A claim `from` holds as
/// a copy of `to`'s is not carried back (seeds 361000041, 362000029: a one-shot claim, copied
/// from git into etcd, bounced back into git after its release there, and was copied into etcd
/// again: both stores held the task for a session that had gone).
pub fn catch_up(from: &[Task], to: &[Task]) -> Vec<Mirrored> {
    let there: std::collections::HashMap<&TaskId, &Task> = to.iter().map(|t| (&t.id, t)).collect();
    from.iter()
        .filter(|t| !(t.copied && t.status == TaskStatus::Claimed))
        .filter(|t| {
            there.get(&t.id).is_some_and(|other| {
                rank(t.status) > rank(other.status)
                    || (t.status == TaskStatus::Claimed
                        && other.status == TaskStatus::Claimed
                        && t.claimed_by != other.claimed_by)
            })
        })
        .map(|t| Mirrored {
            task: t.id.clone(),
            status: t.status,
            holder: t.claimed_by.clone(),
            token: None,
            read_as: there.get(&t.id).map(|other| Face::of(other)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(status: TaskStatus, holder: Option<&str>) -> Task {
        let mut t = Task::new(TaskId::parse("T").expect("id"), status);
        t.claimed_by = holder.map(|h| SessionId::parse(h).expect("id"));
        t
    }
    fn want(status: TaskStatus, holder: &str) -> Mirrored {
        Mirrored {
            task: TaskId::parse("T").expect("id"),
            status,
            holder: Some(SessionId::parse(holder).expect("id")),
            token: None,
            read_as: None,
        }
    }
    use TaskStatus::{Available as A, Claimed as C, Complete as D};

    #[test]
    fn claims_are_written_over_free_tasks_only() {
        assert_eq!(decide(&task(A, None), &want(C, "s1")), Decision::Write);
        assert_eq!(
            decide(&task(C, Some("s1")), &want(C, "s1")),
            Decision::Skip(RecordOutcome::Unchanged)
        );
        assert!(matches!(
            decide(&task(C, Some("s2")), &want(C, "s1")),
            Decision::Skip(RecordOutcome::Conflict { holder: Some(h) }) if h.as_str() == "s2"
        ));
        assert!(matches!(
            decide(&task(D, Some("s2")), &want(C, "s1")),
            Decision::Skip(RecordOutcome::Kept { .. })
        ));
    }

    #[test]
    fn completions_never_overwrite_another_claim() {
        assert_eq!(decide(&task(A, None), &want(D, "s1")), Decision::Write);
        assert_eq!(
            decide(&task(C, Some("s1")), &want(D, "s1")),
            Decision::Write
        );
        assert!(matches!(
            decide(&task(C, Some("s2")), &want(D, "s1")),
            Decision::Skip(RecordOutcome::Conflict { .. })
        ));
        assert_eq!(
            decide(&task(D, Some("s2")), &want(D, "s1")),
            Decision::Skip(RecordOutcome::Unchanged)
        );
    }

    #[test]
    fn catching_up_never_goes_backwards() {
        let mut ahead = vec![task(D, Some("s1")), task(C, Some("s2")), task(A, None)];
        ahead[1].id = TaskId::parse("U").expect("id");
        ahead[2].id = TaskId::parse("V").expect("id");
        let mut behind = vec![task(C, Some("s1")), task(A, None), task(D, Some("s3"))];
        behind[1].id = TaskId::parse("U").expect("id");
        behind[2].id = TaskId::parse("V").expect("id");
        let plan = catch_up(&ahead, &behind);
        let got: Vec<(&str, TaskStatus)> =
            plan.iter().map(|m| (m.task.as_str(), m.status)).collect();
        assert_eq!(got, vec![("T", D), ("U", C)]);
        let back = catch_up(&behind, &ahead);
        let back: Vec<(&str, TaskStatus)> =
            back.iter().map(|m| (m.task.as_str(), m.status)).collect();
        assert_eq!(back, vec![("V", D)], "only where the other side is ahead");
    }

    #[test]
    fn releases_undo_only_the_same_claim() {
        assert_eq!(
            decide(&task(C, Some("s1")), &want(A, "s1")),
            Decision::Write
        );
        assert!(matches!(
            decide(&task(C, Some("s2")), &want(A, "s1")),
            Decision::Skip(RecordOutcome::Kept { .. })
        ));
        assert!(matches!(
            decide(&task(D, Some("s1")), &want(A, "s1")),
            Decision::Skip(RecordOutcome::Kept { .. })
        ));
        let next = applied(&task(C, Some("s1")), &want(A, "s1"));
        assert_eq!((next.status, next.claimed_by), (A, None));
        let done = applied(&task(C, Some("s1")), &want(D, "s1"));
        assert_eq!(done.status, D);
        assert_eq!(
            done.claimed_by.map(|s| s.to_string()).as_deref(),
            Some("s1")
        );
    }

    #[test]
    fn a_copy_is_never_carried_back_to_where_it_came_from() {
        let claim = applied(&task(A, None), &want(C, "cli"));
        assert!(claim.copied, "a recorded claim is a copy");
        let mut other = claim.clone();
        other.id = TaskId::parse("U").expect("id");
        other.copied = false;
        let behind = vec![task(A, None), {
            let mut t = task(A, None);
            t.id = TaskId::parse("U").expect("id");
            t
        }];
        let plan = catch_up(&[claim.clone(), other], &behind);
        let got: Vec<&str> = plan.iter().map(|m| m.task.as_str()).collect();
        assert_eq!(got, ["U"], "the copy stays where it was copied to");
        let done = applied(&claim, &want(D, "cli"));
        assert!(!done.copied, "only a claim is a copy");
        let freed = applied(&claim, &want(A, "cli"));
        assert!(!freed.copied);
    }
}
