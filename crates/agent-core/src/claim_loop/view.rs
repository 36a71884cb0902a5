//! The claim loop's view of the store: the tasks it knows, and what it derives from them, kept
//! up to date change by change (the session's tasks in its order, which of them are not complete,
//! which are claimable as far as statuses go, who waits for each task), so that an event costs
//! what it touches, not the size of the board.
//!
//! The session's order: the list's patterns in the order written; among the tasks one glob
//! matches, an order of the session's own (a hash of session and task id), the same at every
//! start. Sessions that share a glob then try different tasks first instead of all chasing the
//! same one (issue 18: ~110 claim calls for 9–15 wins in the demo).

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::config::TaskPattern;
use crate::ids::{SessionId, TaskId};
use crate::model::{Claimability, Task, TaskStatus};

/// A task's place in the session's order: its first pattern, its spread among that pattern's
/// tasks, its id.
type Rank = (usize, u64, TaskId);

#[derive(Debug, Clone)]
pub(super) struct View {
    session: SessionId,
    patterns: Vec<TaskPattern>,
    tasks: HashMap<TaskId, Task>,
    /// The list's tasks and their ranks.
    rank: HashMap<TaskId, Rank>,
    /// The list's tasks, in the session's order.
    order: BTreeSet<Rank>,
    /// Of those, the ones not complete.
    open: BTreeSet<Rank>,
    /// Of those, the ones the session may claim as far as statuses go (see
    /// [`Task::claimability`]); retries and attempts are the loop's to check.
    ready: BTreeSet<Rank>,
    /// The tasks that name each task as a blocker.
    dependents: HashMap<TaskId, HashSet<TaskId>>,
    /// How many tasks each pattern matches.
    matched: Vec<usize>,
    /// Counts every change that can make a task of the list claimable some day or never: a
    /// task added or removed, a blocker edit, a completion.
    shape: u64,
}

impl View {
    pub fn new(session: SessionId, patterns: Vec<TaskPattern>) -> View {
        let matched = vec![0; patterns.len()];
        View {
            session,
            patterns,
            tasks: HashMap::new(),
            rank: HashMap::new(),
            order: BTreeSet::new(),
            open: BTreeSet::new(),
            ready: BTreeSet::new(),
            dependents: HashMap::new(),
            matched,
            shape: 0,
        }
    }

    /// Replaces everything with `tasks` (a snapshot).
    pub fn replace(&mut self, tasks: Vec<Task>) {
        let mut fresh = View::new(self.session.clone(), std::mem::take(&mut self.patterns));
        fresh.shape = self.shape + 1;
        fresh.tasks = tasks.into_iter().map(|t| (t.id.clone(), t)).collect();
        for task in fresh.tasks.values() {
            for b in &task.blocked_by {
                fresh
                    .dependents
                    .entry(b.clone())
                    .or_default()
                    .insert(task.id.clone());
            }
        }
        let ids: Vec<TaskId> = fresh.tasks.keys().cloned().collect();
        for id in ids {
            fresh.place(&id);
            fresh.refresh(&id);
        }
        *self = fresh;
    }

    pub fn get(&self, id: &TaskId) -> Option<&Task> {
        self.tasks.get(id)
    }

    pub fn contains(&self, id: &TaskId) -> bool {
        self.tasks.contains_key(id)
    }

    pub fn status_of(&self, id: &TaskId) -> Option<TaskStatus> {
        self.tasks.get(id).map(|t| t.status)
    }

    /// Whether a pattern of the list matches `id`.
    pub fn matches(&self, id: &TaskId) -> bool {
        self.patterns.iter().any(|p| p.matches(id))
    }

    /// Whether some known task names `id` as a blocker.
    pub fn is_blocker(&self, id: &TaskId) -> bool {
        self.dependents.get(id).is_some_and(|d| !d.is_empty())
    }

    /// The tasks that name `id` as a blocker.
    pub fn dependents(&self, id: &TaskId) -> impl Iterator<Item = &TaskId> {
        self.dependents.get(id).into_iter().flatten()
    }

    /// Adds `task`, or replaces what the view had of it.
    pub fn insert(&mut self, task: Task) {
        let id = task.id.clone();
        if self.tasks.contains_key(&id) {
            self.set_blockers(&id, task.blocked_by.clone());
            self.set_state(&id, task.status, task.claimed_by.clone());
            if let Some(t) = self.tasks.get_mut(&id) {
                *t = task;
            }
            return;
        }
        for b in &task.blocked_by {
            self.dependents
                .entry(b.clone())
                .or_default()
                .insert(id.clone());
        }
        self.tasks.insert(id.clone(), task);
        self.shape += 1;
        self.place(&id);
        self.refresh_around(&id);
    }

    /// Forgets `id` (deleted, or not found).
    pub fn remove(&mut self, id: &TaskId) {
        let Some(task) = self.tasks.remove(id) else {
            return;
        };
        self.shape += 1;
        for b in &task.blocked_by {
            if let Some(d) = self.dependents.get_mut(b) {
                d.remove(id);
                if d.is_empty() {
                    self.dependents.remove(b);
                }
            }
        }
        if let Some(rank) = self.rank.remove(id) {
            if let Some(p) = self.matched.get_mut(rank.0) {
                *p = p.saturating_sub(1);
            }
            self.order.remove(&rank);
            self.open.remove(&rank);
            self.ready.remove(&rank);
        }
        self.refresh_dependents(id);
    }

    /// A change of `id`'s status or holder.
    pub fn set_state(&mut self, id: &TaskId, status: TaskStatus, holder: Option<SessionId>) {
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        let completion = (task.status == TaskStatus::Complete) != (status == TaskStatus::Complete);
        task.status = status;
        task.claimed_by = holder;
        if completion {
            self.shape += 1;
        }
        self.refresh_around(id);
    }

    /// An edit of `id`'s blockers.
    pub fn set_blockers(&mut self, id: &TaskId, blockers: Vec<TaskId>) {
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        if task.blocked_by == blockers {
            return;
        }
        let old = std::mem::replace(&mut task.blocked_by, blockers.clone());
        self.shape += 1;
        for b in old {
            if let Some(d) = self.dependents.get_mut(&b) {
                d.remove(id);
                if d.is_empty() {
                    self.dependents.remove(&b);
                }
            }
        }
        for b in blockers {
            self.dependents.entry(b).or_default().insert(id.clone());
        }
        self.refresh(id);
    }

    /// The list's tasks, in the session's order.
    pub fn mine(&self) -> impl Iterator<Item = &TaskId> {
        self.order.iter().map(|(_, _, id)| id)
    }

    /// The list's tasks that are not complete, in the session's order.
    pub fn open(&self) -> impl Iterator<Item = &TaskId> {
        self.open.iter().map(|(_, _, id)| id)
    }

    /// The list's tasks the session may claim as far as statuses go, in its order.
    pub fn ready(&self) -> impl Iterator<Item = &TaskId> {
        self.ready.iter().map(|(_, _, id)| id)
    }

    pub fn is_ready(&self, id: &TaskId) -> bool {
        self.rank.get(id).is_some_and(|r| self.ready.contains(r))
    }

    /// Whether the list matches some task.
    pub fn has_mine(&self) -> bool {
        !self.order.is_empty()
    }

    /// Whether every task of the list is complete.
    pub fn all_complete(&self) -> bool {
        self.open.is_empty()
    }

    /// The list's patterns, in order.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(TaskPattern::as_str)
    }

    /// The list's patterns that match no task.
    pub fn unmatched(&self) -> impl Iterator<Item = &str> {
        self.patterns
            .iter()
            .zip(&self.matched)
            .filter(|(_, n)| **n == 0)
            .map(|(p, _)| p.as_str())
    }

    /// See [`View::shape`].
    pub fn shape(&self) -> u64 {
        self.shape
    }

    /// Gives `id` its rank if the list matches it.
    fn place(&mut self, id: &TaskId) {
        let Some(p) = self.patterns.iter().position(|p| p.matches(id)) else {
            return;
        };
        let spread = if self.patterns[p].as_str().contains(['*', '?']) {
            spread(&self.session, id)
        } else {
            0
        };
        let rank = (p, spread, id.clone());
        self.matched[p] += 1;
        self.order.insert(rank.clone());
        self.rank.insert(id.clone(), rank);
    }

    fn refresh_around(&mut self, id: &TaskId) {
        self.refresh(id);
        self.refresh_dependents(id);
    }

    fn refresh_dependents(&mut self, id: &TaskId) {
        let dependents: Vec<TaskId> = self.dependents(id).cloned().collect();
        for d in dependents {
            self.refresh(&d);
        }
    }

    /// Puts `id` in or out of `open` and `ready` by its status and its blockers'.
    fn refresh(&mut self, id: &TaskId) {
        let Some(rank) = self.rank.get(id).cloned() else {
            return;
        };
        let Some(task) = self.tasks.get(id) else {
            return;
        };
        let open = task.status != TaskStatus::Complete;
        let ready = task.claimability(&self.session, |b| self.status_of(b)) == Claimability::Yes;
        if open {
            self.open.insert(rank.clone());
        } else {
            self.open.remove(&rank);
        }
        if ready {
            self.ready.insert(rank);
        } else {
            self.ready.remove(&rank);
        }
    }
}

/// The session's own place for `task` among a glob's tasks: FNV-1a of both ids, then
/// MurmurHash3's 64-bit finalizer, the same on every machine and at every start. FNV-1a alone
/// left sessions' orders correlated (|r| ≈ 0.5–0.65 between two sessions over 2,000 tasks, 65
/// distinct first choices of 100 sessions), and a shared list cost 2.17 claim calls per win.
pub fn spread(session: &SessionId, task: &TaskId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in session
        .as_str()
        .bytes()
        .chain([0])
        .chain(task.as_str().bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).expect("valid")
    }

    fn view(session: &str, patterns: &[&str]) -> View {
        View::new(
            SessionId::parse(session).expect("valid"),
            patterns
                .iter()
                .map(|p| TaskPattern::parse(p).expect("valid"))
                .collect(),
        )
    }

    /// What the view keeps up to date, worked out from scratch.
    fn from_scratch(v: &View) -> (Vec<TaskId>, Vec<TaskId>, Vec<TaskId>, Vec<String>) {
        let mut mine: Vec<(usize, u64, TaskId)> = v
            .tasks
            .keys()
            .filter_map(|t| {
                let p = v.patterns.iter().position(|p| p.matches(t))?;
                let glob = v.patterns[p].as_str().contains(['*', '?']);
                Some((p, if glob { spread(&v.session, t) } else { 0 }, t.clone()))
            })
            .collect();
        mine.sort();
        let mine: Vec<TaskId> = mine.into_iter().map(|(_, _, t)| t).collect();
        let open: Vec<TaskId> = mine
            .iter()
            .filter(|t| v.tasks[*t].status != TaskStatus::Complete)
            .cloned()
            .collect();
        let ready: Vec<TaskId> = mine
            .iter()
            .filter(|t| {
                v.tasks[*t].claimability(&v.session, |b| v.tasks.get(b).map(|x| x.status))
                    == Claimability::Yes
            })
            .cloned()
            .collect();
        let unmatched = v
            .patterns
            .iter()
            .filter(|p| !v.tasks.keys().any(|t| p.matches(t)))
            .map(|p| p.as_str().to_owned())
            .collect();
        (mine, open, ready, unmatched)
    }

    fn kept(v: &View) -> (Vec<TaskId>, Vec<TaskId>, Vec<TaskId>, Vec<String>) {
        (
            v.mine().cloned().collect(),
            v.open().cloned().collect(),
            v.ready().cloned().collect(),
            v.unmatched().map(str::to_owned).collect(),
        )
    }

    #[test]
    fn what_the_view_keeps_up_to_date_is_what_it_would_work_out_from_scratch() {
        let statuses = [
            TaskStatus::Available,
            TaskStatus::Blocked,
            TaskStatus::Claimed,
            TaskStatus::Complete,
        ];
        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut v = view("me", &["A.*", "B.3", "C?", "NONE.*"]);
            let name = |rng: &mut StdRng| {
                let group = ["A", "B", "C", "D"][rng.random_range(0..4)];
                id(&format!("{group}.{}", rng.random_range(0..6)))
            };
            for _ in 0..60 {
                let t = name(&mut rng);
                let status = statuses[rng.random_range(0..4)];
                let holder = ["me", "other"][rng.random_range(0..2)];
                let holder = (status == TaskStatus::Claimed || status == TaskStatus::Complete)
                    .then(|| SessionId::parse(holder).expect("valid"));
                let blockers: Vec<TaskId> = (0..rng.random_range(0..3))
                    .map(|_| name(&mut rng))
                    .collect();
                match rng.random_range(0..6) {
                    0 => v.remove(&t),
                    1 => v.set_blockers(&t, blockers),
                    2 => v.set_state(&t, status, holder),
                    3 if rng.random_bool(0.1) => {
                        let all: Vec<Task> = v.tasks.values().cloned().collect();
                        v.replace(all);
                    }
                    _ => {
                        let mut task = Task::new(t, status);
                        task.claimed_by = holder;
                        task.blocked_by = blockers;
                        v.insert(task);
                    }
                }
                assert_eq!(kept(&v), from_scratch(&v), "seed {seed}");
                for (blocker, dependents) in &v.dependents {
                    for d in dependents {
                        assert!(v.tasks[d].blocked_by.contains(blocker), "seed {seed}");
                    }
                }
            }
        }
    }

    #[test]
    fn sessions_sharing_a_glob_start_at_different_tasks_each_in_an_order_of_its_own() {
        let tasks: Vec<Task> = (0..2000)
            .map(|i| Task::new(id(&format!("S-{i:07}")), TaskStatus::Available))
            .collect();
        let order = |session: &str| {
            let mut v = view(session, &["S-0000007", "S-*"]);
            v.replace(tasks.clone());
            v.ready().cloned().collect::<Vec<_>>()
        };
        let orders: Vec<Vec<TaskId>> = (0..100).map(|i| order(&format!("bench-{i}"))).collect();
        for o in &orders {
            assert_eq!(
                o[0],
                id("S-0000007"),
                "an id the list names first comes first"
            );
        }
        let firsts: BTreeSet<&TaskId> = orders.iter().map(|o| &o[1]).collect();
        assert!(
            firsts.len() >= 90,
            "100 sessions sharing S-* start at {} different tasks",
            firsts.len()
        );
        // No two sessions' orders alike: the tasks session 0 tries in its first 100 are spread
        // over the whole of another's order (its mean place near the middle, 1,000).
        let place = |o: &[TaskId]| -> HashMap<TaskId, usize> {
            o.iter().enumerate().map(|(i, t)| (t.clone(), i)).collect()
        };
        let first_of_0: Vec<&TaskId> = orders[0][1..101].iter().collect();
        for other in &orders[1..] {
            let at = place(other);
            let mean = first_of_0.iter().map(|t| at[*t]).sum::<usize>() / first_of_0.len();
            assert!((700..1300).contains(&mean), "mean place {mean}");
        }
        assert_eq!(
            order("bench-3"),
            orders[3],
            "one session's order is the same every time"
        );
    }
}
