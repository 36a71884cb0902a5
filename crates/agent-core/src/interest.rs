//! What a subscriber wants to hear of (`Backend::subscribe_to`): the tasks its patterns match and,
//! at any depth, the tasks those are blocked by. A session's agent subscribes to its list, so
//! it hears of its own tasks and what they wait for, not of the whole board (issue 18: every
//! session received every event, and a fleet cost sessions × events).

use std::collections::{HashMap, HashSet};

use crate::config::TaskPattern;
use crate::ids::TaskId;
use crate::model::Listing;

/// The tasks a subscription covers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Interest {
    /// `None`: every task.
    patterns: Option<Vec<TaskPattern>>,
}

impl Interest {
    /// Every task of the store.
    pub fn all() -> Interest {
        Interest { patterns: None }
    }

    /// The tasks `patterns` match and their blockers at any depth.
    pub fn tasks(patterns: Vec<TaskPattern>) -> Interest {
        Interest {
            patterns: Some(patterns),
        }
    }

    /// The patterns (`None`: every task).
    pub fn patterns(&self) -> Option<&[TaskPattern]> {
        self.patterns.as_deref()
    }

    /// Whether this is every task.
    pub fn is_all(&self) -> bool {
        self.patterns.is_none()
    }

    /// Whether a pattern matches `id` (every id, for [`Interest::all`]); its blockers are
    /// covered too, see [`Covered`].
    pub fn matches(&self, id: &TaskId) -> bool {
        self.patterns
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p.matches(id)))
    }

    /// The tasks of `listing` it covers (all, for [`Interest::all`]).
    pub fn filter(&self, mut listing: Listing) -> Listing {
        if self.is_all() {
            return listing;
        }
        let blockers: HashMap<&TaskId, &[TaskId]> = listing
            .tasks
            .iter()
            .map(|t| (&t.id, t.blocked_by.as_slice()))
            .collect();
        let covered = Covered::new(
            self.clone(),
            listing.tasks.iter().map(|t| &t.id),
            |id: &TaskId| blockers.get(id).copied(),
        );
        listing.tasks.retain(|t| covered.covers(&t.id));
        listing
    }
}

/// An interest worked out over a board: the tasks it covers now (those its patterns match,
/// and every task they wait for, at any depth). A task stays covered once it was: an edit
/// that drops a blocker does not end its events. The default covers every task.
#[derive(Debug, Clone, Default)]
pub struct Covered {
    interest: Interest,
    /// The blockers covered (tasks the patterns match are covered by matching).
    blockers: HashSet<TaskId>,
}

impl Covered {
    /// Works `interest` out over the tasks `ids`, whose blockers `blockers_of` gives.
    pub fn new<'a, 'b>(
        interest: Interest,
        ids: impl Iterator<Item = &'a TaskId>,
        blockers_of: impl Fn(&TaskId) -> Option<&'b [TaskId]>,
    ) -> Covered {
        let mut covered = Covered {
            interest,
            blockers: HashSet::new(),
        };
        if !covered.interest.is_all() {
            let matched: Vec<&TaskId> = ids.filter(|id| covered.interest.matches(id)).collect();
            for id in matched {
                if let Some(bs) = blockers_of(id) {
                    covered.add_blockers(bs, &blockers_of);
                }
            }
        }
        covered
    }

    /// The interest it was worked out from.
    pub fn interest(&self) -> &Interest {
        &self.interest
    }

    /// The tasks covered as blockers of the matched ones.
    pub fn blockers(&self) -> impl Iterator<Item = &TaskId> {
        self.blockers.iter()
    }

    /// Whether events of `id` are delivered.
    pub fn covers(&self, id: &TaskId) -> bool {
        self.interest.matches(id) || self.blockers.contains(id)
    }

    /// A covered task now names `blockers`: they are covered from now on, and what they wait
    /// for (by `blockers_of`). Returns the tasks newly covered.
    pub fn add_blockers<'b>(
        &mut self,
        blockers: &[TaskId],
        blockers_of: &impl Fn(&TaskId) -> Option<&'b [TaskId]>,
    ) -> Vec<TaskId> {
        let mut added = Vec::new();
        if self.interest.is_all() {
            return added;
        }
        let mut stack: Vec<TaskId> = blockers
            .iter()
            .filter(|b| !self.covers(b))
            .cloned()
            .collect();
        while let Some(b) = stack.pop() {
            if self.covers(&b) {
                continue;
            }
            if let Some(next) = blockers_of(&b) {
                stack.extend(next.iter().filter(|n| !self.covers(n)).cloned());
            }
            self.blockers.insert(b.clone());
            added.push(b);
        }
        added
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Task, TaskStatus};

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).expect("valid")
    }

    fn task(name: &str, blocked_by: &[&str]) -> Task {
        let mut t = Task::new(id(name), TaskStatus::Available);
        t.blocked_by = blocked_by.iter().map(|b| id(b)).collect();
        t
    }

    fn names(l: &Listing) -> Vec<&str> {
        l.tasks.iter().map(|t| t.id.as_str()).collect()
    }

    #[test]
    fn an_interest_covers_its_tasks_and_what_they_wait_for_at_any_depth() {
        let listing = Listing {
            tasks: vec![
                task("A.1", &["B.1"]),
                task("A.2", &[]),
                task("B.1", &["C.1"]),
                task("C.1", &["A.1"]),
                task("C.2", &[]),
                task("D.1", &["A.2"]),
            ],
            ..Listing::default()
        };
        let interest = Interest::tasks(vec![TaskPattern::parse("A.*").expect("valid")]);
        assert_eq!(
            names(&interest.filter(listing.clone())),
            ["A.1", "A.2", "B.1", "C.1"],
            "a cycle back into the list ends the walk; D.1 waits for A.2, it is no blocker"
        );
        assert_eq!(names(&Interest::all().filter(listing.clone())).len(), 6);
        // A blocker added later is covered, with its own chain.
        let blockers: HashMap<TaskId, Vec<TaskId>> = listing
            .tasks
            .iter()
            .map(|t| (t.id.clone(), t.blocked_by.clone()))
            .collect();
        let of = |i: &TaskId| blockers.get(i).map(Vec::as_slice);
        let mut covered = Covered::new(interest, listing.tasks.iter().map(|t| &t.id), of);
        assert!(!covered.covers(&id("D.1")) && !covered.covers(&id("C.2")));
        covered.add_blockers(&[id("D.1")], &of);
        assert!(covered.covers(&id("D.1")));
        assert!(!covered.covers(&id("C.2")));
    }
}
