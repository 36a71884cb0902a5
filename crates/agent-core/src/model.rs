//! The task model shared by every backend: tasks, statuses, events, claims and the outcomes of
//! claim and release. Pure data and pure rules (what is claimable); no IO.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{SessionId, TaskId};

/// A task's status, as stored (`available`, `blocked`, `claimed`, `complete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Nobody holds it and nothing blocks it (if it lists blockers, they are all complete).
    Available,
    /// Waits for the tasks in `blocked_by`; claimable once they are all complete.
    Blocked,
    /// Held by `claimed_by`.
    Claimed,
    /// Done. Never claimable again.
    Complete,
}

impl TaskStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [TaskStatus; 4] = [
        TaskStatus::Available,
        TaskStatus::Blocked,
        TaskStatus::Claimed,
        TaskStatus::Complete,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Available => "available",
            TaskStatus::Blocked => "blocked",
            TaskStatus::Claimed => "claimed",
            TaskStatus::Complete => "complete",
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!("unknown status {s:?} (expected available, blocked, claimed or complete)")
            })
    }
}

/// The status a release leaves the task in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseTo {
    /// Done: the task is never claimable again; `claimed_by` keeps the session that did it.
    Complete,
    /// Given back: claimable again, `claimed_by` cleared.
    Available,
}

impl ReleaseTo {
    /// The status the task has after the release.
    pub fn status(self) -> TaskStatus {
        match self {
            ReleaseTo::Complete => TaskStatus::Complete,
            ReleaseTo::Available => TaskStatus::Available,
        }
    }
}

/// A task as every backend reports it. `status` and `claimed_by` are *effective*: a claim whose
/// lease has expired reads `available` with no holder, whatever the stored record still says.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The task's id.
    pub id: TaskId,
    /// Human-readable title, if any.
    pub title: Option<String>,
    /// Effective status.
    pub status: TaskStatus,
    /// The holder while `claimed`; the session that completed it when `complete`.
    pub claimed_by: Option<SessionId>,
    /// When the current (or completing) claim was made.
    pub claimed_at: Option<DateTime<Utc>>,
    /// Tasks that must be complete before this one is claimable.
    pub blocked_by: Vec<TaskId>,
    /// The claim was written here from the other store (by a bridge, or a router bringing one
    /// store up to the other), not won here: the store it came from has the word on it, and it
    /// is never carried back there. Only ever set on a `claimed` task.
    pub copied: bool,
    /// Fields this version of ifc does not know, kept verbatim through every write.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Task {
    /// A new task with the given status and nothing else set.
    pub fn new(id: TaskId, status: TaskStatus) -> Self {
        Task {
            id,
            title: None,
            status,
            claimed_by: None,
            claimed_at: None,
            blocked_by: Vec::new(),
            copied: false,
            extra: serde_json::Map::new(),
        }
    }

    /// Whether `session` may claim this task now, given the status of other tasks (`None` for a
    /// task that does not exist). A task is claimable when it is available or blocked, every task
    /// it is blocked by is complete, and nobody holds it; its own holder may claim it again.
    pub fn claimability(
        &self,
        session: &SessionId,
        status_of: impl Fn(&TaskId) -> Option<TaskStatus>,
    ) -> Claimability {
        match self.status {
            TaskStatus::Complete => Claimability::No(TaskStatus::Complete),
            TaskStatus::Claimed => match &self.claimed_by {
                Some(holder) if holder == session => Claimability::Yes,
                holder => Claimability::Held(holder.clone()),
            },
            TaskStatus::Available | TaskStatus::Blocked => {
                let unblocked = self
                    .blocked_by
                    .iter()
                    .all(|b| status_of(b) == Some(TaskStatus::Complete));
                if unblocked {
                    Claimability::Yes
                } else {
                    Claimability::No(TaskStatus::Blocked)
                }
            }
        }
    }
}

/// The answer of [`Task::claimability`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimability {
    /// The session may claim it.
    Yes,
    /// Another session holds it (`None`: a claimed record that names no holder).
    Held(Option<SessionId>),
    /// Not claimable for this status (`Blocked`: some blocker is not complete).
    No(TaskStatus),
}

/// The value a serving backend hands to the task's command: monotonically increasing per task
/// across successive claims (in etcd, the revision of the claim transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A claim that was won.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The claimed task.
    pub task: TaskId,
    /// The holder.
    pub session: SessionId,
    /// The fencing token of this claim.
    pub token: FencingToken,
    /// Whether the claim is bound to the session's lease (and so ends by itself if the session dies).
    pub leased: bool,
}

/// What a claim attempt came to. Losing is a normal answer, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The session holds the task.
    Won(Claim),
    /// Another session holds it.
    Lost {
        /// The holder (`None` if the stored record names none).
        holder: Option<SessionId>,
    },
    /// The task cannot be claimed in this status (`Blocked`: a blocker is not complete).
    NotClaimable {
        /// The task's effective status.
        status: TaskStatus,
    },
    /// There is no such task.
    NotFound,
}

/// For logs and messages: `won (token 36)`, `lost to s2`, `not claimable: complete`.
impl fmt::Display for ClaimOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Won(c) => write!(f, "won (token {})", c.token),
            Self::Lost { holder: Some(h) } => write!(f, "lost to {h}"),
            Self::Lost { holder: None } => f.write_str("lost"),
            Self::NotClaimable { status } => write!(f, "not claimable: {status}"),
            Self::NotFound => f.write_str("not found"),
        }
    }
}

/// For logs and messages: `released (token 36)`, `not the holder: s2 holds it`.
impl fmt::Display for ReleaseOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Released { token } => write!(f, "released (token {token})"),
            Self::NotHolder { holder: Some(h) } => write!(f, "not the holder: {h} holds it"),
            Self::NotHolder { holder: None } => f.write_str("not the holder: nobody holds it"),
            Self::NotFound => f.write_str("not found"),
        }
    }
}

/// Whether a release to `to` by `session` already happened: the task is complete and names
/// `session` as its completer (an earlier attempt landed but its answer was lost, e.g. to a
/// timeout). Such a retry is answered `Released` again and changes nothing.
pub fn already_completed_by(current: &Task, session: &SessionId, to: ReleaseTo) -> bool {
    to == ReleaseTo::Complete
        && current.status == TaskStatus::Complete
        && current.claimed_by.as_ref() == Some(session)
}

/// What a release attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The task now has the requested status; the claim is gone.
    Released {
        /// The fencing token of the claim that was released.
        token: FencingToken,
    },
    /// The caller does not hold the claim (it expired, was taken over or never existed). Nothing
    /// was changed.
    NotHolder {
        /// The current holder, if anyone holds it.
        holder: Option<SessionId>,
    },
    /// There is no such task.
    NotFound,
}

/// Fields for creating or updating a task record with [`crate::Backend::put`]. `None` keeps what is
/// stored (or, for a new task: no title, `available`, no blockers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskPatch {
    /// New title.
    pub title: Option<String>,
    /// New status: `available`, `blocked` or `complete` (claims go through `claim`).
    pub status: Option<TaskStatus>,
    /// New blocker list (replaces the old one).
    pub blocked_by: Option<Vec<TaskId>>,
}

/// What a [`TaskPatch`] makes of a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Patched {
    /// Nothing to write.
    Unchanged,
    /// The task as it is to be stored.
    Changed(Task),
    /// The patch would change the status of a task a session holds.
    Held(Option<SessionId>),
}

impl TaskPatch {
    /// Refuses what a put may not do (set `claimed`: claims go through `claim`).
    pub fn validate(&self, task: &TaskId) -> Result<(), crate::BackendError> {
        if self.status == Some(TaskStatus::Claimed) {
            return Err(crate::BackendError::InvalidInput(format!(
                "{task}: status claimed is set by claiming the task, not by put"
            )));
        }
        Ok(())
    }

    /// The task this patch creates (no title, `available`, no blockers unless it says).
    pub fn create(&self, id: TaskId) -> Task {
        let mut task = Task::new(id, self.status.unwrap_or(TaskStatus::Available));
        task.title = self.title.clone();
        task.blocked_by = self.blocked_by.clone().unwrap_or_default();
        task
    }

    /// What this patch makes of `current` (the task's effective state). Leaving a status other
    /// than `complete` clears the holder; the status of a held task is not changed.
    pub fn apply(&self, current: &Task) -> Patched {
        let mut next = current.clone();
        if let Some(title) = &self.title {
            next.title = Some(title.clone());
        }
        if let Some(blocked_by) = &self.blocked_by {
            next.blocked_by = blocked_by.clone();
        }
        if let Some(status) = self.status.filter(|s| *s != current.status) {
            if current.status == TaskStatus::Claimed {
                return Patched::Held(current.claimed_by.clone());
            }
            next.status = status;
            if status != TaskStatus::Complete {
                next.claimed_by = None;
                next.claimed_at = None;
            }
        }
        if &next == current {
            Patched::Unchanged
        } else {
            Patched::Changed(next)
        }
    }
}

/// What a put came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// The record did not exist and was created.
    Created,
    /// The record existed and was changed.
    Updated,
    /// The record already said this; nothing was written.
    Unchanged,
    /// The patch would change the status of a task a session holds; nothing was written.
    Held {
        /// The holder.
        holder: Option<SessionId>,
    },
}

/// One change of a task's effective state, as watchers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    /// The task.
    pub task: TaskId,
    /// Effective status before (`None`: the task did not exist).
    pub old_status: Option<TaskStatus>,
    /// Effective status after (`None`: the task was deleted).
    pub new_status: Option<TaskStatus>,
    /// The holder after the change (`claimed`), or the completer (`complete`).
    pub holder: Option<SessionId>,
    /// The task's blockers after the change (an edit of them alone is an event too: a waiting
    /// session must hear of it).
    pub blocked_by: Vec<TaskId>,
    /// The backend's revision of the change; strictly increasing along one subscription.
    pub revision: u64,
    /// When this process observed the change.
    pub time: SystemTime,
}

/// A consistent list of every task at one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    /// The tasks that could be read, sorted by id.
    pub tasks: Vec<Task>,
    /// Records that could not be read (bad JSON, wrong shape); listing goes on past them.
    pub corrupt: Vec<CorruptRecord>,
    /// The revision the listing reflects.
    pub revision: u64,
}

/// A stored record that is not a valid task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRecord {
    /// Where it is stored (an etcd key, a file and line).
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A running session as other sessions and operators see it (`ifc status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub session_id: SessionId,
    /// `idle`, `working` or `polling`.
    pub state: String,
    pub current_task: Option<TaskId>,
    /// The backend the session uses (`etcd`, `git`).
    pub backend: String,
    pub started_at: DateTime<Utc>,
    pub pid: u32,
    pub host: String,
    /// The ifc version the session runs.
    pub version: String,
    /// When the session last showed it is alive, where the store keeps that apart from the
    /// record (git: the STATUS heartbeat; etcd's presence lives as long as the session's lease,
    /// so it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<DateTime<Utc>>,
    /// The session's claim latency p95 over its last 5 minutes, in microseconds, as of its last
    /// announcement (`ifc ui` charts it; no extra write carries it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_p95_us: Option<u64>,
}

/// A holder for logs and messages: its id, or `nobody`.
pub fn holder_name(holder: Option<&SessionId>) -> String {
    holder.map_or_else(|| "nobody".to_owned(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).expect("valid id")
    }
    fn sid(s: &str) -> SessionId {
        SessionId::parse(s).expect("valid id")
    }

    #[test]
    fn status_names_round_trip() {
        for st in TaskStatus::ALL {
            assert_eq!(st.as_str().parse::<TaskStatus>(), Ok(st));
            assert_eq!(
                serde_json::to_string(&st).expect("ser"),
                format!("\"{st}\"")
            );
        }
        assert!("done".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn claimability_rules() {
        let me = sid("s1");
        let done = |_: &TaskId| Some(TaskStatus::Complete);
        let open = |_: &TaskId| Some(TaskStatus::Available);
        let missing = |_: &TaskId| None;

        let mut t = Task::new(id("T"), TaskStatus::Available);
        assert_eq!(t.claimability(&me, open), Claimability::Yes);

        t.blocked_by = vec![id("B")];
        assert_eq!(
            t.claimability(&me, open),
            Claimability::No(TaskStatus::Blocked)
        );
        assert_eq!(
            t.claimability(&me, missing),
            Claimability::No(TaskStatus::Blocked)
        );
        assert_eq!(t.claimability(&me, done), Claimability::Yes);

        t.status = TaskStatus::Blocked;
        assert_eq!(t.claimability(&me, done), Claimability::Yes);

        t.status = TaskStatus::Claimed;
        t.claimed_by = Some(sid("other"));
        assert_eq!(
            t.claimability(&me, done),
            Claimability::Held(Some(sid("other")))
        );
        t.claimed_by = Some(me.clone());
        assert_eq!(t.claimability(&me, done), Claimability::Yes);

        t.status = TaskStatus::Complete;
        assert_eq!(
            t.claimability(&me, done),
            Claimability::No(TaskStatus::Complete)
        );
    }

    #[test]
    fn patches_apply_by_the_put_rules() {
        let me = sid("s1");
        let mut t = Task::new(id("T"), TaskStatus::Available);
        let title = TaskPatch {
            title: Some("x".into()),
            ..TaskPatch::default()
        };
        let Patched::Changed(next) = title.apply(&t) else {
            panic!("a new title changes it")
        };
        assert_eq!(next.title.as_deref(), Some("x"));
        assert_eq!(title.apply(&next), Patched::Unchanged);
        t.status = TaskStatus::Claimed;
        t.claimed_by = Some(me.clone());
        let reset = TaskPatch {
            status: Some(TaskStatus::Available),
            ..TaskPatch::default()
        };
        assert_eq!(reset.apply(&t), Patched::Held(Some(me.clone())));
        assert!(
            matches!(title.apply(&t), Patched::Changed(n) if n.claimed_by == Some(me.clone())),
            "a title keeps the claim"
        );
        t.status = TaskStatus::Complete;
        let Patched::Changed(reopened) = reset.apply(&t) else {
            panic!("complete can be reopened")
        };
        assert_eq!(
            (reopened.status, reopened.claimed_by),
            (TaskStatus::Available, None)
        );
        assert!(TaskPatch {
            status: Some(TaskStatus::Claimed),
            ..TaskPatch::default()
        }
        .validate(&id("T"))
        .is_err());
        let created = TaskPatch {
            blocked_by: Some(vec![id("B")]),
            ..TaskPatch::default()
        }
        .create(id("N"));
        assert_eq!(
            (created.status, created.blocked_by),
            (TaskStatus::Available, vec![id("B")])
        );
    }
}
