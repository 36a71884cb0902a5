//! The claim loop's decisions, pure: `(state, input) -> outputs`, with time passed in. The async
//! driver (in the `ifc` binary) runs the outputs (claims, releases, processes, timers) and feeds
//! what happened back as inputs. No IO here, so every decision is unit-tested.
//!
//! One task at a time: the session claims the first claimable task of its list (the patterns in
//! the order written; a glob's tasks in an order of the session's own, see `view`), runs it, releases it `complete` on success or `available` on failure (retrying it itself after a
//! backoff, at most `max_attempts` times), and otherwise waits for the next event: it never polls.

mod view;

pub use view::spread;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::TaskPattern;
use crate::ids::{SessionId, TaskId};
use crate::model::{Claim, ClaimOutcome, ReleaseTo, Task, TaskStatus};

/// What the session is to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub session: SessionId,
    /// Task ids and globs in priority order.
    pub patterns: Vec<TaskPattern>,
    pub max_attempts: u32,
    /// First retry delay after a failure; doubles with each attempt.
    pub retry_backoff: Duration,
    /// Exit once every task of the list is complete.
    pub until_done: bool,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Every task, as the backend lists it (at start and after a re-sync).
    Snapshot(Vec<Task>),
    /// A task's status, holder or blockers changed.
    Changed {
        task: TaskId,
        status: Option<TaskStatus>,
        holder: Option<SessionId>,
        /// Its blockers now (`None`: not known, keep the view's).
        blocked_by: Option<Vec<TaskId>>,
    },
    /// A task fetched after `Output::Fetch`.
    Fetched(Task),
    /// `Output::Fetch` found no such task.
    Missing(TaskId),
    /// The answer to `Output::Claim`.
    Claimed { task: TaskId, outcome: ClaimOutcome },
    /// `Output::Claim` failed (backend unreachable): try again later.
    ClaimFailed { task: TaskId },
    /// The task's command ended.
    Exited { task: TaskId, success: bool },
    /// `Output::Release` was done (or found the session no longer holds the task).
    Released { task: TaskId },
    /// `Output::Release` failed (backend unreachable): try again later.
    ReleaseFailed { task: TaskId },
    /// The backend says the session's claim ended without a release.
    Lost { task: TaskId },
    /// A timer asked for with `Output::WakeAt` fired (or any time passed).
    Tick,
    /// SIGTERM/SIGINT: stop claiming, let the running task finish within the grace period.
    Shutdown,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Claim(TaskId),
    /// Run the task's command under this claim.
    Start(Claim),
    /// Kill the task's process group now.
    Kill {
        task: TaskId,
        reason: String,
    },
    /// Let the task finish within the shutdown grace period, then kill it.
    Drain {
        task: TaskId,
    },
    Release {
        task: TaskId,
        to: ReleaseTo,
        token: Option<crate::FencingToken>,
    },
    /// Read this task (its blockers are not known yet).
    Fetch(TaskId),
    /// Feed `Input::Tick` at this instant.
    WakeAt(Instant),
    /// Something worth a log line (a blocker cleared, a retry scheduled).
    Note(String),
    Exit(u8),
    /// Something the operator must hear about (logged as a warning).
    Warn(String),
    /// Why the session ends with exit 1 (logged as an error): it can never be done.
    Fatal(String),
}

/// How long an `--until-done` session waits for a pattern of its list that matches no task to
/// match one (tasks created after the agent started) before it gives up with exit 1.
pub const UNMATCHED_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Idle,
    Claiming(TaskId),
    Running {
        claim: Claim,
        fenced: bool,
    },
    Releasing {
        task: TaskId,
        to: ReleaseTo,
        token: Option<crate::FencingToken>,
    },
    Done,
}

/// The session's state.
#[derive(Debug, Clone)]
pub struct ClaimLoop {
    plan: Plan,
    view: view::View,
    phase: Phase,
    attempts: HashMap<TaskId, u32>,
    not_before: HashMap<TaskId, Instant>,
    release_retry: Option<Instant>,
    stopping: bool,
    /// Tasks this loop completed, until the store's own event says so: the event of the claim
    /// (older) can arrive after the release returned, and must not make the view show the task
    /// held by this session again (which reads as "adopt it" and costs a useless claim).
    completed: HashSet<TaskId>,
    /// Tasks asked for with `Output::Fetch` and not answered yet: not known to be missing.
    fetching: HashSet<TaskId>,
    /// Whether the store's list has come (`Input::Snapshot`): an empty board is a board too (the
    /// tester's report: `--until-done` on an empty board, a mistyped prefix, waited silently).
    listed: bool,
    /// The globs of the list that have matched a task at some time.
    globs_matched: HashSet<String>,
    /// Since when each pattern of the list has matched no task (warned about once).
    unmatched_since: HashMap<String, Instant>,
    /// Without `--until-done`: the task of the list that can never be claimed, as last said
    /// (said again only when it changes).
    said_impossible: Impossible,
    /// Why nothing of the list is claimable, as last said, and when (said again when it
    /// changes, at most every [`WAITING_SAID_EVERY`]): an idle agent says what it waits for.
    said_waiting: Option<(String, Instant)>,
    /// Changes of `fetching` (what is unknown rather than missing).
    fetches: u64,
    /// What `impossible` found, and at which view shape and `fetches`: worked out again only
    /// when either has changed (it walks every open task's chain of blockers).
    impossible_memo: Option<((u64, u64), Impossible)>,
}

/// Why a task of the list cannot be claimed now (see `ClaimLoop::waiting`).
enum Waiting<'a> {
    /// The session gave up on it after this many failed attempts.
    GaveUp(u32),
    /// Claimed (by whom, the task says).
    Held(&'a Task),
    /// These of its blockers are not complete.
    Blockers(Vec<&'a TaskId>),
}

/// A task of the list that can never be claimed, and why.
type Impossible = Option<(TaskId, String)>;

/// How often at most an idle agent says again why it has nothing to claim.
pub const WAITING_SAID_EVERY: Duration = Duration::from_secs(30);

impl ClaimLoop {
    pub fn new(plan: Plan) -> ClaimLoop {
        ClaimLoop {
            view: view::View::new(plan.session.clone(), plan.patterns.clone()),
            plan,
            phase: Phase::Idle,
            attempts: HashMap::new(),
            not_before: HashMap::new(),
            release_retry: None,
            stopping: false,
            completed: HashSet::new(),
            fetching: HashSet::new(),
            globs_matched: HashSet::new(),
            listed: false,
            unmatched_since: HashMap::new(),
            said_impossible: None,
            said_waiting: None,
            fetches: 0,
            impossible_memo: None,
        }
    }

    /// The task running now, if any.
    pub fn running(&self) -> Option<&Claim> {
        match &self.phase {
            Phase::Running { claim, .. } => Some(claim),
            _ => None,
        }
    }

    /// The session's tasks in its order (as far as the view knows them).
    pub fn my_tasks(&self) -> Vec<TaskId> {
        self.view.mine().cloned().collect()
    }

    fn status_of(&self, id: &TaskId) -> Option<TaskStatus> {
        self.view.status_of(id)
    }

    /// Whether the session may claim `id` now: the view says it may, and it is neither given up
    /// nor waiting for a retry.
    fn claimable(&self, id: &TaskId, now: Instant) -> bool {
        self.view.is_ready(id) && self.may_try(id, now)
    }

    /// Whether `id` is neither given up nor waiting for a retry.
    fn may_try(&self, id: &TaskId, now: Instant) -> bool {
        let exhausted = self
            .attempts
            .get(id)
            .is_some_and(|n| *n >= self.plan.max_attempts);
        let waiting = self.not_before.get(id).is_some_and(|t| *t > now);
        !exhausted && !waiting
    }

    /// The first task of the list the session may claim now, in its order.
    fn first_claimable(&self, now: Instant) -> Option<TaskId> {
        self.view.ready().find(|id| self.may_try(id, now)).cloned()
    }

    /// Feeds one input; returns what to do.
    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Snapshot(tasks) => {
                self.listed = true;
                self.view.replace(tasks);
                // A blocker the list does not hold may exist where lists do not look (etcd's
                // archive keeps complete tasks out of them): it is read once before it counts
                // as missing.
                let unlisted: std::collections::BTreeSet<TaskId> = self
                    .view
                    .open()
                    .filter_map(|id| self.view.get(id))
                    .flat_map(|t| t.blocked_by.iter())
                    .filter(|b| !self.view.contains(b) && !self.fetching.contains(*b))
                    .cloned()
                    .collect();
                for b in unlisted {
                    self.fetch(b, &mut out);
                }
            }
            Input::Fetched(task) => {
                self.fetching.remove(&task.id);
                self.fetched_or_not();
                // Blockers it names that the view does not know yet (a blocker edit).
                self.fetch_unknown(&task.blocked_by, &mut out);
                self.view.insert(task);
            }
            Input::Missing(task) => {
                self.fetching.remove(&task);
                self.fetched_or_not();
                self.view.remove(&task);
            }
            Input::Changed {
                task,
                status,
                holder,
                blocked_by,
            } => self.changed(task, status, holder, blocked_by, now, &mut out),
            Input::Claimed { task, outcome } => {
                if self.phase != Phase::Claiming(task.clone()) {
                    return out;
                }
                self.phase = Phase::Idle;
                match outcome {
                    ClaimOutcome::Won(claim) => {
                        self.view.set_state(
                            &task,
                            TaskStatus::Claimed,
                            Some(self.plan.session.clone()),
                        );
                        if self.stopping {
                            self.release(task, ReleaseTo::Available, Some(claim.token), &mut out);
                        } else {
                            self.phase = Phase::Running {
                                claim: claim.clone(),
                                fenced: false,
                            };
                            out.push(Output::Start(claim));
                        }
                    }
                    ClaimOutcome::Lost { holder } => {
                        if holder.as_ref() == Some(&self.plan.session) {
                            // Held by this session in another process (its own lease): that
                            // process runs it. Asked again after the backoff, or when it ends.
                            out.push(Output::Note(format!(
                                "{task} is held by this session in another process: not taken over"
                            )));
                            self.not_before
                                .insert(task.clone(), now + self.plan.retry_backoff);
                        }
                        self.view.set_state(&task, TaskStatus::Claimed, holder);
                    }
                    ClaimOutcome::NotClaimable { status } => {
                        let holder = self.view.get(&task).and_then(|t| t.claimed_by.clone());
                        self.view.set_state(&task, status, holder);
                        if status == TaskStatus::Blocked {
                            // The store knows a blocker the view thinks is done is not: read the
                            // blockers again, and do not retry before the backoff either way.
                            let blockers = self
                                .view
                                .get(&task)
                                .map(|t| t.blocked_by.clone())
                                .unwrap_or_default();
                            for b in blockers {
                                self.fetch(b, &mut out);
                            }
                            self.not_before
                                .insert(task.clone(), now + self.plan.retry_backoff);
                        }
                    }
                    ClaimOutcome::NotFound => self.view.remove(&task),
                }
            }
            Input::ClaimFailed { task } => {
                if self.phase == Phase::Claiming(task.clone()) {
                    self.phase = Phase::Idle;
                    self.not_before.insert(task, now + self.plan.retry_backoff);
                }
            }
            Input::Exited { task, success } => {
                let Phase::Running { claim, fenced } = &self.phase else {
                    return out;
                };
                if claim.task != task {
                    return out;
                }
                let (token, fenced) = (claim.token, *fenced);
                self.phase = Phase::Idle;
                if fenced && success {
                    // It finished before the kill reached it: the store decides whether the
                    // completion still lands (it does while nobody claimed the task since),
                    // rather than the work being done twice.
                    out.push(Output::Note(format!(
                        "{task}: finished although its claim was lost; reporting it done, which lands only if nobody claimed it since"
                    )));
                    self.release(task, ReleaseTo::Complete, Some(token), &mut out);
                } else if fenced {
                    // Not the task's fault, so no attempt is used; but the session backs off, so a
                    // session that keeps losing its lease does not grab the task straight back.
                    self.not_before
                        .insert(task.clone(), now + self.plan.retry_backoff * 4);
                    out.push(Output::Note(format!(
                        "{task}: stopped after its claim was lost; not reported done"
                    )));
                } else if success {
                    self.release(task, ReleaseTo::Complete, Some(token), &mut out);
                } else {
                    let n = self.attempts.entry(task.clone()).or_insert(0);
                    *n += 1;
                    let delay = self.plan.retry_backoff * 2u32.saturating_pow(n.saturating_sub(1));
                    let note = if *n >= self.plan.max_attempts {
                        format!(
                            "{task}: failed {n} time{}; leaving it to other sessions",
                            if *n == 1 { "" } else { "s" }
                        )
                    } else {
                        format!(
                            "{task}: failed (attempt {n} of {}); retrying after {delay:?}",
                            self.plan.max_attempts
                        )
                    };
                    out.push(Output::Note(note));
                    self.not_before.insert(task.clone(), now + delay);
                    self.release(task, ReleaseTo::Available, Some(token), &mut out);
                }
            }
            Input::Released { task } => {
                if let Phase::Releasing { task: t, to, .. } = &self.phase {
                    if *t == task {
                        let holder = match to {
                            ReleaseTo::Available => None,
                            ReleaseTo::Complete => {
                                self.view.get(&task).and_then(|t| t.claimed_by.clone())
                            }
                        };
                        self.view.set_state(&task, to.status(), holder);
                        if *to == ReleaseTo::Complete {
                            self.completed.insert(task.clone());
                        }
                        self.phase = Phase::Idle;
                        self.release_retry = None;
                    }
                }
            }
            Input::ReleaseFailed { task } => {
                if matches!(&self.phase, Phase::Releasing { task: t, .. } if *t == task) {
                    self.release_retry = Some(now + self.plan.retry_backoff);
                }
            }
            Input::Lost { task } => {
                if let Phase::Running { claim, fenced } = &mut self.phase {
                    if claim.task == task && !*fenced {
                        *fenced = true;
                        out.push(Output::Kill {
                            task,
                            reason: "the session's claim was lost".into(),
                        });
                    }
                }
            }
            Input::Tick => {
                if let (Some(at), Phase::Releasing { task, to, token }) =
                    (self.release_retry, &self.phase)
                {
                    if at <= now {
                        self.release_retry = None;
                        out.push(Output::Release {
                            task: task.clone(),
                            to: *to,
                            token: *token,
                        });
                    }
                }
            }
            Input::Shutdown => {
                self.stopping = true;
                if let Phase::Running {
                    claim,
                    fenced: false,
                } = &self.phase
                {
                    out.push(Output::Drain {
                        task: claim.task.clone(),
                    });
                }
            }
        }
        self.next(now, &mut out);
        out
    }

    fn changed(
        &mut self,
        task: TaskId,
        status: Option<TaskStatus>,
        holder: Option<SessionId>,
        blocked_by: Option<Vec<TaskId>>,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        if self.completed.contains(&task) {
            let stale =
                status == Some(TaskStatus::Claimed) && holder.as_ref() == Some(&self.plan.session);
            if stale {
                return;
            }
            self.completed.remove(&task);
        }
        let Some(status) = status else {
            self.view.remove(&task);
            return;
        };
        if !self.view.contains(&task) {
            if !self.view.matches(&task) && !self.view.is_blocker(&task) {
                return;
            }
            match blocked_by {
                // The event says all the loop needs: no read.
                Some(blockers) => {
                    self.fetch_unknown(&blockers, out);
                    let mut t = Task::new(task, status);
                    t.claimed_by = holder;
                    t.blocked_by = blockers;
                    self.view.insert(t);
                }
                None => self.fetch(task, out),
            }
            return;
        }
        if let Some(blockers) =
            blocked_by.filter(|b| self.view.get(&task).is_some_and(|t| t.blocked_by != *b))
        {
            // An operator's `put --blocked-by` while this session waits for the task.
            self.fetch_unknown(&blockers, out);
            self.view.set_blockers(&task, blockers);
        }
        let was = self.status_of(&task);
        self.view.set_state(&task, status, holder);
        if status == TaskStatus::Complete && was != Some(TaskStatus::Complete) {
            let mut unblocked: Vec<String> = self
                .view
                .dependents(&task)
                .filter(|id| self.view.matches(id) && self.claimable(id, now))
                .map(|id| id.to_string())
                .collect();
            unblocked.sort();
            if !unblocked.is_empty() {
                out.push(Output::Note(format!(
                    "blocker {task} cleared: {} claimable",
                    unblocked.join(", ")
                )));
            }
        }
    }

    fn fetch(&mut self, task: TaskId, out: &mut Vec<Output>) {
        self.fetching.insert(task.clone());
        self.fetched_or_not();
        out.push(Output::Fetch(task));
    }

    /// The set of tasks being read changed: what is unknown and what is missing may have.
    fn fetched_or_not(&mut self) {
        self.fetches += 1;
    }

    /// Fetches those of `tasks` the view does not hold.
    fn fetch_unknown(&mut self, tasks: &[TaskId], out: &mut Vec<Output>) {
        for t in tasks {
            if !self.view.contains(t) {
                self.fetch(t.clone(), out);
            }
        }
    }

    fn release(
        &mut self,
        task: TaskId,
        to: ReleaseTo,
        token: Option<crate::FencingToken>,
        out: &mut Vec<Output>,
    ) {
        self.phase = Phase::Releasing {
            task: task.clone(),
            to,
            token,
        };
        out.push(Output::Release { task, to, token });
    }

    /// When idle: claim the first claimable task, or finish, or wait.
    fn next(&mut self, now: Instant, out: &mut Vec<Output>) {
        if self.phase != Phase::Idle {
            if let Some(at) = self.release_retry {
                out.push(Output::WakeAt(at));
            }
            return;
        }
        // Claimable work is done first, whatever the list lacks (the tester's report: a pattern
        // that matched nothing ended `--until-done` with claimable tasks never tried).
        let first = self.first_claimable(now);
        if self.listed {
            let unmatched: Vec<String> = self.view.unmatched().map(str::to_owned).collect();
            // A glob that matched tasks before and none now: they left the store (archived,
            // deleted), so it is done, not a typo (tester helper-10: `ifc archive` ended the
            // --until-done agents whose globs it emptied).
            for p in self.view.patterns() {
                if p.contains(['*', '?']) && !unmatched.iter().any(|u| u == p) {
                    self.globs_matched.insert(p.to_owned());
                }
            }
            let unmatched: Vec<String> = unmatched
                .into_iter()
                .filter(|p| !self.globs_matched.contains(p))
                .collect();
            if self.unmatched(&unmatched, first.is_some(), now, out) {
                return;
            }
        }
        self.decide_next(first, now, out);
    }

    /// Warns once about each pattern of the list that matches no task; an `--until-done`
    /// session whose pattern has matched nothing for [`UNMATCHED_GRACE`] can never be done, and
    /// exits 1 once nothing of its list is claimable (`true`: it did).
    fn unmatched(
        &mut self,
        unmatched: &[String],
        claimable_now: bool,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> bool {
        self.unmatched_since
            .retain(|p, _| unmatched.iter().any(|u| u == p));
        for p in unmatched {
            if !self.unmatched_since.contains_key(p) {
                self.unmatched_since.insert(p.clone(), now);
                // An exact id that no list holds is read once: an archived task is complete
                // there (tester helper-10: such a list exited 1 under --until-done).
                if let Ok(id) = TaskId::parse(p) {
                    if !p.contains(['*', '?']) && !self.fetching.contains(&id) {
                        self.fetch(id, out);
                    }
                }
                let what = if p.contains(['*', '?']) {
                    format!("the pattern {p} of the session's list matches no task")
                } else {
                    format!("{p} of the session's list is no task of the store (not on the board, not in etcd)")
                };
                out.push(Output::Warn(if self.plan.until_done {
                    format!(
                        "{what}: --until-done gives up in {UNMATCHED_GRACE:?} unless it appears"
                    )
                } else {
                    what
                }));
            }
        }
        if !self.plan.until_done || self.stopping {
            return false;
        }
        let oldest = self
            .unmatched_since
            .iter()
            .min_by_key(|(_, since)| **since)
            .map(|(p, since)| (p.clone(), *since));
        match oldest {
            Some((_, since)) if now >= since + UNMATCHED_GRACE && claimable_now => false,
            Some((p, since)) if now >= since + UNMATCHED_GRACE => {
                self.phase = Phase::Done;
                out.push(Output::Fatal(format!(
                    "{p} matched no task for {UNMATCHED_GRACE:?}: the session's list can never be done"
                )));
                out.push(Output::Exit(1));
                true
            }
            Some((_, since)) => {
                out.push(Output::WakeAt(since + UNMATCHED_GRACE));
                false
            }
            None => false,
        }
    }

    fn decide_next(&mut self, first: Option<TaskId>, now: Instant, out: &mut Vec<Output>) {
        if self.stopping {
            self.phase = Phase::Done;
            out.push(Output::Exit(0));
            return;
        }
        if let Some(id) = first {
            self.phase = Phase::Claiming(id.clone());
            out.push(Output::Claim(id));
            return;
        }
        if self.plan.until_done && self.listed {
            // A pattern that matches nothing yet is not done (see `unmatched`).
            if self.view.has_mine() && self.unmatched_since.is_empty() && self.view.all_complete() {
                self.phase = Phase::Done;
                out.push(Output::Note(
                    "every task of the session's list is complete".into(),
                ));
                out.push(Output::Exit(0));
                return;
            }
            // What is not complete, this session gave up on (max_attempts): it can do no more.
            let given_up: Vec<&TaskId> = self.view.open().collect();
            if !given_up.is_empty()
                && self.unmatched_since.is_empty()
                && given_up.iter().all(|id| {
                    self.attempts
                        .get(*id)
                        .is_some_and(|n| *n >= self.plan.max_attempts)
                })
            {
                self.phase = Phase::Done;
                let ids: Vec<&str> = given_up.iter().map(|id| id.as_str()).collect();
                out.push(Output::Fatal(format!(
                    "the session gave up on {} after {} failed attempt(s) each; everything else of its list is complete",
                    ids.join(", "),
                    self.plan.max_attempts
                )));
                out.push(Output::Exit(1));
                return;
            }
            if let Some((id, why)) = self.impossible() {
                self.phase = Phase::Done;
                out.push(Output::Fatal(format!("{id} can never be claimed: {why}")));
                out.push(Output::Exit(1));
                return;
            }
        } else if self.listed {
            // A long-running agent waits for the edit that fixes it, and says so once (the
            // tester's report: only `--until-done` said why a task was never claimed).
            let found = self.impossible();
            if found != self.said_impossible {
                if let Some((id, why)) = &found {
                    out.push(Output::Warn(format!(
                        "{id} can never be claimed: {why}; waiting for its blockers to be fixed"
                    )));
                }
                self.said_impossible = found;
            }
        }
        if self.listed {
            self.say_why_waiting(now, out);
        }
        // Wake for the earliest retry that is still pending; otherwise wait for events.
        if let Some(at) = self
            .not_before
            .iter()
            .filter(|(id, t)| **t > now && self.view.matches(id))
            .map(|(_, t)| *t)
            .min()
        {
            out.push(Output::WakeAt(at));
        }
    }

    /// Says (once, and again when it changes, at most every [`WAITING_SAID_EVERY`]) why nothing
    /// of the list is claimable: the tester's report, an agent whose tasks were all held by
    /// one-shot claims of a session nobody runs idled without a word.
    ///
    /// Within [`WAITING_SAID_EVERY`] of the last look it looks again only then: working it out
    /// walks the list's open tasks, too much for every event an idle session hears on a busy
    /// board (issue 18: an idle agent spun at 100 % CPU).
    fn say_why_waiting(&mut self, now: Instant, out: &mut Vec<Output>) {
        if let Some((_, at)) = &self.said_waiting {
            if now < *at + WAITING_SAID_EVERY {
                out.push(Output::WakeAt(*at + WAITING_SAID_EVERY));
                return;
            }
        }
        let Some(why) = self.why_waiting(now) else {
            self.said_waiting = None;
            return;
        };
        match &mut self.said_waiting {
            Some((said, at)) if *said == why => *at = now,
            _ => {
                out.push(Output::Note(format!("nothing to claim: {why}")));
                self.said_waiting = Some((why, now));
            }
        }
    }

    /// Why the list's tasks that are not complete cannot be claimed now (the first few named,
    /// the others counted).
    fn why_waiting(&self, now: Instant) -> Option<String> {
        const SHOWN: usize = 3;
        let mut all = self
            .view
            .open()
            .filter_map(|id| Some((id, self.waiting(id, now)?)));
        let waiting: Vec<(&TaskId, Waiting<'_>)> = all.by_ref().take(SHOWN).collect();
        let more = all.count();
        if waiting.is_empty() {
            return None;
        }
        let holder = |t: &Task| crate::model::holder_name(t.claimed_by.as_ref());
        let mut why = waiting
            .iter()
            .map(|(id, w)| match w {
                Waiting::GaveUp(n) => format!("{id}: given up after {n} failed attempts"),
                Waiting::Held(t) => format!("{id} is claimed by {}", holder(t)),
                Waiting::Blockers(pending) => {
                    let said: Vec<String> = pending
                        .iter()
                        .map(|b| match self.view.get(b) {
                            Some(bt) if bt.status == TaskStatus::Claimed => {
                                format!("{b} (claimed by {})", holder(bt))
                            }
                            Some(bt) => format!("{b} ({})", bt.status),
                            None => format!("{b} (not known yet)"),
                        })
                        .collect();
                    format!("{id} waits for {}", said.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        if more > 0 {
            why.push_str(&format!("; and {more} more"));
        }
        Some(why)
    }

    /// Why `id` (of the list) cannot be claimed now, if it waits for something; `None` when
    /// it is complete, claimable, or retried shortly.
    fn waiting(&self, id: &TaskId, now: Instant) -> Option<Waiting<'_>> {
        let t = self.view.get(id)?;
        if t.status == TaskStatus::Complete || self.not_before.get(id).is_some_and(|at| *at > now) {
            return None;
        }
        if let Some(n) = self
            .attempts
            .get(id)
            .filter(|n| **n >= self.plan.max_attempts)
        {
            return Some(Waiting::GaveUp(*n));
        }
        if t.status == TaskStatus::Claimed {
            return Some(Waiting::Held(t));
        }
        let pending: Vec<&TaskId> = t
            .blocked_by
            .iter()
            .filter(|b| self.status_of(b) != Some(TaskStatus::Complete))
            .collect();
        (!pending.is_empty()).then_some(Waiting::Blockers(pending))
    }

    /// A task of the list that can never become claimable: a blocker (or a blocker's blocker)
    /// that does not exist, or a cycle anywhere in its chain of blockers.
    fn impossible(&mut self) -> Impossible {
        let key = (self.view.shape(), self.fetches);
        if let Some((at, found)) = &self.impossible_memo {
            if *at == key {
                return found.clone();
            }
        }
        let found = self.find_impossible();
        self.impossible_memo = Some((key, found.clone()));
        found
    }

    fn find_impossible(&self) -> Impossible {
        use crate::blockers::{path, stuck_among, Known, Stuck};
        // Tasks whose chains were walked and found sound, shared across the list's tasks: one
        // look at each task, not one per task that waits for it.
        let mut sound = std::collections::BTreeSet::new();
        for id in self.view.open() {
            let Some(task) = self.view.get(id) else {
                continue;
            };
            let lookup = |b: &TaskId| match self.view.get(b) {
                Some(t) => Known::Task(t.status, &t.blocked_by),
                None if self.fetching.contains(b) => Known::Unknown,
                None => Known::Missing,
            };
            if let Some(s) = stuck_among(id, &task.blocked_by, lookup, &mut sound) {
                let why = match &s {
                    Stuck::Cycle(c) => format!("its blockers form a cycle ({})", path(c)),
                    Stuck::Missing(chain) => format!(
                        "its blocker {} does not exist ({})",
                        chain.last().unwrap_or(id),
                        path(chain)
                    ),
                };
                return Some((id.clone(), why));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
