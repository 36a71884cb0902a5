//! Why a task can never become claimable: a blocker (at any depth) that does not exist, or a
//! cycle anywhere in its chain of blockers not yet complete. One rule for the claim loop (which
//! reports it and ends `--until-done`) and for `ifc put` (which refuses it unless forced).

use std::collections::BTreeSet;

use crate::{TaskId, TaskStatus};

/// What is known of a task met in a chain of blockers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known<'a> {
    /// It exists: its status and blockers.
    Task(TaskStatus, &'a [TaskId]),
    /// No such task.
    Missing,
    /// Not known yet (being read): assumed fine for now.
    Unknown,
}

/// Why a task's chain of blockers can never be all complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stuck {
    /// The chain from the task to a blocker that does not exist (the task first, it last).
    Missing(Vec<TaskId>),
    /// A chain of blockers that comes back to where it started (the first id again last); the
    /// task itself may be on it or wait for it.
    Cycle(Vec<TaskId>),
}

impl Stuck {
    /// `A → B → A`, for messages.
    pub fn chain(&self) -> String {
        match self {
            Stuck::Missing(ids) | Stuck::Cycle(ids) => path(ids),
        }
    }
}

/// A chain of ids as `A → B → C`.
pub fn path(ids: &[TaskId]) -> String {
    ids.iter()
        .map(TaskId::as_str)
        .collect::<Vec<_>>()
        .join(" → ")
}

/// Whether `task`, blocked by `blocked_by`, can never become claimable: depth first through the
/// blockers not complete yet (a complete blocker ends its branch, whatever it waits for).
pub fn stuck<'a>(
    task: &TaskId,
    blocked_by: &[TaskId],
    lookup: impl Fn(&TaskId) -> Known<'a>,
) -> Option<Stuck> {
    stuck_among(task, blocked_by, lookup, &mut BTreeSet::new())
}

/// [`stuck`] for many tasks of one board: `done` holds the tasks already found sound (every
/// chain from them ends well), which are not walked again, and gains those this walk finds.
pub fn stuck_among<'a>(
    task: &TaskId,
    blocked_by: &[TaskId],
    lookup: impl Fn(&TaskId) -> Known<'a>,
    done: &mut BTreeSet<TaskId>,
) -> Option<Stuck> {
    if done.contains(task) {
        return None;
    }
    let mut path: Vec<TaskId> = vec![task.clone()];
    // Each frame: the blockers of `path`'s last task still to visit.
    let mut frames: Vec<Vec<TaskId>> = vec![blocked_by.iter().rev().cloned().collect()];
    while let Some(frame) = frames.last_mut() {
        let Some(next) = frame.pop() else {
            frames.pop();
            if let Some(left) = path.pop() {
                done.insert(left);
            }
            continue;
        };
        if let Some(at) = path.iter().position(|p| *p == next) {
            let mut cycle = path[at..].to_vec();
            cycle.push(next);
            return Some(Stuck::Cycle(cycle));
        }
        if done.contains(&next) {
            continue;
        }
        match lookup(&next) {
            Known::Missing => {
                let mut chain = path.clone();
                chain.push(next);
                return Some(Stuck::Missing(chain));
            }
            Known::Unknown | Known::Task(TaskStatus::Complete, _) => {
                done.insert(next);
            }
            Known::Task(_, blockers) => {
                frames.push(blockers.iter().rev().cloned().collect());
                path.push(next);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).expect("valid")
    }

    fn board(rows: &[(&str, TaskStatus, &[&str])]) -> BTreeMap<TaskId, (TaskStatus, Vec<TaskId>)> {
        rows.iter()
            .map(|(t, s, b)| (id(t), (*s, b.iter().map(|x| id(x)).collect())))
            .collect()
    }

    fn check(rows: &[(&str, TaskStatus, &[&str])], task: &str) -> Option<String> {
        let b = board(rows);
        let (_, blockers) = b.get(&id(task)).expect("listed");
        stuck(&id(task), blockers, |x| match b.get(x) {
            Some((s, bl)) => Known::Task(*s, bl),
            None => Known::Missing,
        })
        .map(|s| match &s {
            Stuck::Missing(_) => format!("missing {}", s.chain()),
            Stuck::Cycle(_) => format!("cycle {}", s.chain()),
        })
    }

    use TaskStatus::{Available as Av, Blocked as Bl, Complete as Done};

    #[test]
    fn a_cycle_up_the_chain_is_found_not_only_one_through_the_task() {
        // The tester's case: A waits for B, B and C wait for each other; A never became
        // claimable and nothing said so.
        let rows: &[(&str, TaskStatus, &[&str])] =
            &[("A", Bl, &["B"]), ("B", Bl, &["C"]), ("C", Bl, &["B"])];
        assert_eq!(check(rows, "A").as_deref(), Some("cycle B → C → B"));
        let rows: &[(&str, TaskStatus, &[&str])] = &[("A", Bl, &["B"]), ("B", Bl, &["A"])];
        assert_eq!(check(rows, "A").as_deref(), Some("cycle A → B → A"));
        let rows: &[(&str, TaskStatus, &[&str])] = &[("A", Bl, &["A"])];
        assert_eq!(check(rows, "A").as_deref(), Some("cycle A → A"));
    }

    #[test]
    fn a_missing_blocker_at_any_depth_is_found_with_its_chain() {
        let rows: &[(&str, TaskStatus, &[&str])] = &[("A", Bl, &["B"]), ("B", Bl, &["NOPE"])];
        assert_eq!(check(rows, "A").as_deref(), Some("missing A → B → NOPE"));
    }

    #[test]
    fn complete_blockers_end_a_branch_and_shared_blockers_are_no_cycle() {
        // A diamond (A → B, C → D) is fine; a complete task waiting on a cycle is done anyway.
        let rows: &[(&str, TaskStatus, &[&str])] = &[
            ("A", Bl, &["B", "C"]),
            ("B", Bl, &["D"]),
            ("C", Bl, &["D"]),
            ("D", Av, &[]),
            ("E", Bl, &["F"]),
            ("F", Done, &["G"]),
            ("G", Bl, &["G"]),
        ];
        assert_eq!(check(rows, "A"), None);
        assert_eq!(check(rows, "E"), None);
    }
}
