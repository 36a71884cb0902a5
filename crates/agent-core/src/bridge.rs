//! The bridge's and the audit's decisions, pure: how etcd and the git board differ, which side
//! is ahead for each task, and what to record where. A three-way comparison against the state
//! both last agreed on tells a release from a claim nobody mirrored yet; without that (the
//! bridge just started) the live sessions decide.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::ids::{SessionId, TaskId};
pub use crate::mirror::Face;
use crate::mirror::{rank, Mirrored};
use crate::model::{Task, TaskStatus};

/// One task on which the stores disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub task: TaskId,
    /// What etcd says (`None`: no such task there).
    pub etcd: Option<Face>,
    /// What git says.
    pub git: Option<Face>,
    /// Both name a session and they differ, with at least one still claimed, or both complete:
    /// the same task held or done by different sessions. Nothing resolves it automatically.
    pub conflict: bool,
}

/// Whether two faces are the same task held or done by different sessions.
pub fn is_conflict(a: &Face, b: &Face) -> bool {
    let holds = |f: &Face| matches!(f.status, TaskStatus::Claimed | TaskStatus::Complete);
    holds(a) && holds(b) && a.holder.is_some() && b.holder.is_some() && a.holder != b.holder
}

/// Every task the two stores see differently, sorted by id.
pub fn compare(etcd: &[Task], git: &[Task]) -> Vec<Difference> {
    let e: BTreeMap<&TaskId, Face> = etcd.iter().map(|t| (&t.id, Face::of(t))).collect();
    let g: BTreeMap<&TaskId, Face> = git.iter().map(|t| (&t.id, Face::of(t))).collect();
    let ids: BTreeSet<&TaskId> = e.keys().chain(g.keys()).copied().collect();
    ids.into_iter()
        .filter_map(|id| {
            let (ef, gf) = (e.get(id), g.get(id));
            let same = match (ef, gf) {
                (Some(a), Some(b)) => {
                    a.status == b.status
                        && (a.holder == b.holder || a.holder.is_none() || b.holder.is_none())
                        && !is_conflict(a, b)
                }
                _ => false,
            };
            (!same).then(|| Difference {
                task: id.clone(),
                etcd: ef.cloned(),
                git: gf.cloned(),
                conflict: matches!((ef, gf), (Some(a), Some(b)) if is_conflict(a, b)),
            })
        })
        .collect()
}

/// Who is live where, for decisions without a common past.
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// Sessions with a live presence in etcd.
    pub etcd: BTreeSet<SessionId>,
    /// Sessions with a fresh STATUS heartbeat in git.
    pub git: BTreeSet<SessionId>,
}

/// One round's work.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Transitions to record on the git board.
    pub to_git: Vec<Mirrored>,
    /// Transitions to record in etcd.
    pub to_etcd: Vec<Mirrored>,
    /// Tasks in both held or done by different sessions: left alone.
    pub conflicts: Vec<Difference>,
}

/// Which side is ahead for one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ahead {
    Etcd,
    Git,
    Neither,
}

fn ahead(ef: &Face, gf: &Face, base: Option<&Face>, live: &Live) -> Ahead {
    let etcd_moved = base != Some(ef);
    let git_moved = base != Some(gf);
    match (etcd_moved, git_moved) {
        (true, false) => return Ahead::Etcd,
        (false, true) => return Ahead::Git,
        _ => {}
    }
    // No common past (or both moved): further along wins, except that a claim faces a free task
    // only as long as its holder lives where it was made.
    match (rank(ef.status), rank(gf.status)) {
        (1, 0) => match &ef.holder {
            Some(h) if live.etcd.contains(h) || !live.git.contains(h) => Ahead::Etcd,
            _ => Ahead::Git,
        },
        (0, 1) => match &gf.holder {
            Some(h) if live.git.contains(h) || !live.etcd.contains(h) => Ahead::Git,
            _ => Ahead::Etcd,
        },
        (a, b) if a > b => Ahead::Etcd,
        (a, b) if b > a => Ahead::Git,
        _ => Ahead::Neither,
    }
}

/// The transition that makes the side behind (`current`) say `want`.
pub fn transition(task: &TaskId, want: &Face, current: &Face) -> Mirrored {
    Mirrored {
        task: task.clone(),
        status: want.status,
        // A release names the claim it ends: the one the side behind still shows.
        holder: match want.status {
            TaskStatus::Available | TaskStatus::Blocked => current.holder.clone(),
            _ => want.holder.clone(),
        },
        token: None,
        read_as: Some(current.clone()),
    }
}

/// What replaces a stale copy (`copy`, a claim) with what its source says (`source`): the copy's
/// end, then the source's state unless that is free or the same session's.
fn replace_copy(task: &TaskId, copy: &Face, source: &Face, free: &Face) -> Vec<Mirrored> {
    if source.status == TaskStatus::Available || source.holder == copy.holder {
        return vec![transition(task, source, copy)];
    }
    vec![transition(task, free, copy), transition(task, source, free)]
}

/// One bridge round: for every task in both stores that differs, what to record where. `base`
/// is what the two last agreed on (updated by the caller for what landed).
pub fn plan(etcd: &[Task], git: &[Task], base: &BTreeMap<TaskId, Face>, live: &Live) -> Plan {
    let g: BTreeMap<&TaskId, &Task> = git.iter().map(|t| (&t.id, t)).collect();
    let mut out = Plan::default();
    for et in etcd {
        let Some(gt) = g.get(&et.id) else { continue };
        let (ef, gf) = (Face::of(et), Face::of(gt));
        if ef == gf {
            continue;
        }
        // etcd still shows the claim both last agreed on while git has moved on to another
        // session's claim or completion: that claim ended in git without a release (its holder
        // died or was fenced there), and etcd's copy of it (often one this bridge recorded,
        // without a lease) would hold the task for nobody. It is ended, then git's state
        // written.
        let free = Face {
            status: TaskStatus::Available,
            holder: None,
        };
        // A claim one store holds as a copy of the other's, which says otherwise now, is stale:
        // the store it came from has the word on it, whatever the common past says (seed
        // 361000041: a one-shot git claim copied into etcd was released in git, and a round
        // that read etcd just before the copy ended wrote it back into git, for nobody).
        let copy_in = |t: &Task, f: &Face| t.copied && f.status == TaskStatus::Claimed;
        match (copy_in(et, &ef), copy_in(gt, &gf)) {
            (true, false) => {
                out.to_etcd.extend(replace_copy(&et.id, &ef, &gf, &free));
                continue;
            }
            (false, true) => {
                out.to_git.extend(replace_copy(&et.id, &gf, &ef, &free));
                continue;
            }
            _ => {}
        }
        // Without a common past (the bridge restarted) the same holds when git has the task
        // complete and etcd's holder is not a live etcd session: nothing of a claim nobody runs
        // is lost by recording the completion (seed 150000009: a git session's claim, copied
        // into etcd, outlived the task's completion in git for good). Another session's claim
        // in git stays a conflict: both may be real (two one-shot claims).
        let agreed_on_it = match base.get(&et.id) {
            Some(b) => b == &ef,
            None => {
                gf.status == TaskStatus::Complete
                    && ef.holder.as_ref().is_some_and(|h| !live.etcd.contains(h))
            }
        };
        let moved_on = agreed_on_it
            && ef.status == TaskStatus::Claimed
            && gf.holder.is_some()
            && gf.holder != ef.holder
            && matches!(gf.status, TaskStatus::Claimed | TaskStatus::Complete);
        if moved_on {
            out.to_etcd.push(transition(&et.id, &free, &ef));
            out.to_etcd.push(transition(&et.id, &gf, &free));
            continue;
        }
        if is_conflict(&ef, &gf) {
            out.conflicts.push(Difference {
                task: et.id.clone(),
                etcd: Some(ef),
                git: Some(gf),
                conflict: true,
            });
            continue;
        }
        match ahead(&ef, &gf, base.get(&et.id), live) {
            Ahead::Etcd => out.to_git.push(transition(&et.id, &ef, &gf)),
            Ahead::Git => out.to_etcd.push(transition(&et.id, &gf, &ef)),
            Ahead::Neither => {}
        }
    }
    out
}

/// A task whose blockers the two stores list differently (order aside).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockerDifference {
    pub task: TaskId,
    pub etcd: Vec<TaskId>,
    pub git: Vec<TaskId>,
}

/// A task's blockers as a set: the board lists them in the order a person wrote them.
pub fn blocker_set(t: &Task) -> BTreeSet<TaskId> {
    t.blocked_by.iter().cloned().collect()
}

/// Every task in both stores whose blockers differ, sorted by id.
pub fn blocker_differences(etcd: &[Task], git: &[Task]) -> Vec<BlockerDifference> {
    let g: BTreeMap<&TaskId, &Task> = git.iter().map(|t| (&t.id, t)).collect();
    let mut out: Vec<BlockerDifference> = etcd
        .iter()
        .filter_map(|et| {
            let gt = g.get(&et.id)?;
            (blocker_set(et) != blocker_set(gt)).then(|| BlockerDifference {
                task: et.id.clone(),
                etcd: blocker_set(et).into_iter().collect(),
                git: blocker_set(gt).into_iter().collect(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.task.cmp(&b.task));
    out
}

/// Blocker edits to carry: the side whose blockers moved from what both last agreed on
/// (`base`) wins. Without a common past, or when both moved, nothing is carried (the
/// difference is the audit's to show, a person's to settle).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockerPlan {
    /// (task, blockers) to write in etcd.
    pub to_etcd: Vec<(TaskId, Vec<TaskId>)>,
    /// (task, blockers) to write on the board.
    pub to_git: Vec<(TaskId, Vec<TaskId>)>,
    /// Differences nothing decides.
    pub undecided: Vec<BlockerDifference>,
}

/// See [`BlockerPlan`].
pub fn plan_blockers(
    etcd: &[Task],
    git: &[Task],
    base: &BTreeMap<TaskId, BTreeSet<TaskId>>,
) -> BlockerPlan {
    let e: BTreeMap<&TaskId, &Task> = etcd.iter().map(|t| (&t.id, t)).collect();
    let g: BTreeMap<&TaskId, &Task> = git.iter().map(|t| (&t.id, t)).collect();
    let mut out = BlockerPlan::default();
    for d in blocker_differences(etcd, git) {
        let (et, gt) = (e[&d.task], g[&d.task]);
        match base.get(&d.task) {
            Some(b) if *b == blocker_set(et) => out.to_etcd.push((d.task, gt.blocked_by.clone())),
            Some(b) if *b == blocker_set(gt) => out.to_git.push((d.task, et.blocked_by.clone())),
            _ => out.undecided.push(d),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocker_edit_goes_from_the_side_that_made_it() {
        let with = |id: &str, blockers: &[&str]| {
            let mut task = t(id, A, None);
            task.blocked_by = blockers
                .iter()
                .map(|b| TaskId::parse(b).expect("id"))
                .collect();
            task
        };
        let ids = |v: &[&str]| -> BTreeSet<TaskId> {
            v.iter().map(|b| TaskId::parse(b).expect("id")).collect()
        };
        let etcd = vec![
            with("edited-in-git", &["P0"]),
            with("edited-in-etcd", &["P1", "P2"]),
            with("no-past", &["P0"]),
            with("both-moved", &["P1"]),
            with("reordered", &["P1", "P2"]),
        ];
        let git = vec![
            with("edited-in-git", &[]),
            with("edited-in-etcd", &["P1"]),
            with("no-past", &[]),
            with("both-moved", &["P2"]),
            with("reordered", &["P2", "P1"]),
        ];
        let base = BTreeMap::from([
            (TaskId::parse("edited-in-git").expect("id"), ids(&["P0"])),
            (TaskId::parse("edited-in-etcd").expect("id"), ids(&["P1"])),
            (TaskId::parse("both-moved").expect("id"), ids(&["P0"])),
        ]);
        let plan = plan_blockers(&etcd, &git, &base);
        let task = |s: &str| TaskId::parse(s).expect("id");
        assert_eq!(plan.to_etcd, [(task("edited-in-git"), vec![])]);
        assert_eq!(
            plan.to_git,
            [(task("edited-in-etcd"), vec![task("P1"), task("P2")])]
        );
        let undecided: Vec<&str> = plan.undecided.iter().map(|d| d.task.as_str()).collect();
        assert_eq!(undecided, ["both-moved", "no-past"]);
    }

    fn t(id: &str, status: TaskStatus, holder: Option<&str>) -> Task {
        let mut task = Task::new(TaskId::parse(id).expect("id"), status);
        task.claimed_by = holder.map(|h| SessionId::parse(h).expect("id"));
        task
    }
    fn face(status: TaskStatus, holder: Option<&str>) -> Face {
        Face::of(&t("X", status, holder))
    }
    fn sid(s: &str) -> SessionId {
        SessionId::parse(s).expect("id")
    }
    use TaskStatus::{Available as A, Blocked as B, Claimed as C, Complete as D};

    #[test]
    fn audit_finds_differences_and_conflicts() {
        let etcd = vec![
            t("same", D, Some("s1")),
            t("ahead", D, Some("s1")),
            t("clash", C, Some("s1")),
            t("only-etcd", A, None),
            t("blocked", B, None),
        ];
        let git = vec![
            t("same", D, Some("s1")),
            t("ahead", C, Some("s1")),
            t("clash", C, Some("s2")),
            t("only-git", A, None),
            t("blocked", A, None),
        ];
        let diffs = compare(&etcd, &git);
        let got: Vec<(&str, bool)> = diffs
            .iter()
            .map(|d| (d.task.as_str(), d.conflict))
            .collect();
        assert_eq!(
            got,
            vec![
                ("ahead", false),
                ("clash", true),
                ("only-etcd", false),
                ("only-git", false)
            ]
        );
    }

    #[test]
    fn with_a_common_past_the_side_that_moved_wins() {
        let base: BTreeMap<TaskId, Face> =
            [(TaskId::parse("T").expect("id"), face(C, Some("s1")))].into();
        let live = Live::default();
        // etcd released (lease expired): git is told, naming the claim it ends.
        let p = plan(&[t("T", A, None)], &[t("T", C, Some("s1"))], &base, &live);
        assert_eq!(p.to_git.len(), 1);
        assert_eq!(
            (p.to_git[0].status, p.to_git[0].holder.clone()),
            (A, Some(sid("s1")))
        );
        assert!(p.to_etcd.is_empty());
        // git completed: etcd is told.
        let p = plan(
            &[t("T", C, Some("s1"))],
            &[t("T", D, Some("s1"))],
            &base,
            &live,
        );
        assert_eq!(p.to_etcd.len(), 1);
        assert_eq!(p.to_etcd[0].status, D);
    }

    #[test]
    fn without_a_past_live_sessions_decide_claims_against_free_tasks() {
        let base = BTreeMap::new();
        let mut live = Live::default();
        live.git.insert(sid("g1"));
        live.etcd.insert(sid("e1"));
        // A git session's live claim goes to etcd.
        let p = plan(&[t("T", A, None)], &[t("T", C, Some("g1"))], &base, &live);
        assert_eq!(p.to_etcd.len(), 1);
        // A claim in git of a session that lives only in etcd was released there: git is told.
        let p = plan(&[t("T", A, None)], &[t("T", C, Some("e1"))], &base, &live);
        assert_eq!(p.to_git.len(), 1);
        assert_eq!(p.to_git[0].status, A);
        // A dead session's claim in git: free it (its etcd lease is gone too).
        let p = plan(&[t("T", A, None)], &[t("T", C, Some("dead"))], &base, &live);
        assert_eq!(
            p.to_etcd.len(),
            1,
            "unknown everywhere: git's claim could be a git session's"
        );
        // Completions win over claims and free tasks.
        let p = plan(
            &[t("T", D, Some("e1"))],
            &[t("T", C, Some("e1"))],
            &base,
            &live,
        );
        assert_eq!(p.to_git.len(), 1);
        // Different holders: a conflict, nothing recorded.
        let p = plan(
            &[t("T", C, Some("e1"))],
            &[t("T", C, Some("g1"))],
            &base,
            &live,
        );
        assert_eq!(
            (p.to_git.len(), p.to_etcd.len(), p.conflicts.len()),
            (0, 0, 1)
        );
    }

    /// What `plan` records in etcd for T, claimed by s1 there and `git` (status, by s2) in git.
    fn to_etcd_for(git: TaskStatus, base: &BTreeMap<TaskId, Face>, live: &Live) -> Plan {
        plan(
            &[t("T", C, Some("s1"))],
            &[t("T", git, Some("s2"))],
            base,
            live,
        )
    }

    fn steps(p: &Plan) -> Vec<(TaskStatus, Option<SessionId>)> {
        p.to_etcd
            .iter()
            .map(|m| (m.status, m.holder.clone()))
            .collect()
    }

    #[test]
    fn a_claim_that_ended_in_git_without_a_release_is_ended_in_etcd_too() {
        // Found by `scripts/chaos --random --seed 3018`: git's claim of s1 ended (s1 was killed,
        // its restart let it go) and s2 did the task; etcd kept the copy of s1's claim forever.
        let base: BTreeMap<TaskId, Face> =
            [(TaskId::parse("T").expect("id"), face(C, Some("s1")))].into();
        let ended = vec![(A, Some(sid("s1"))), (D, Some(sid("s2")))];
        let p = to_etcd_for(D, &base, &Live::default());
        assert_eq!(steps(&p), ended);
        assert!(p.conflicts.is_empty() && p.to_git.is_empty());
        // Without that common past it stays a conflict while s1 is a live etcd session (nobody
        // can tell which is right), or when git has another claim; a completion in git ends the
        // claim of a session not live in etcd as above (seed 150000009).
        let live = Live {
            etcd: [sid("s1")].into(),
            git: BTreeSet::new(),
        };
        let none = BTreeMap::new();
        assert_eq!(to_etcd_for(D, &none, &live).conflicts.len(), 1);
        assert_eq!(steps(&to_etcd_for(D, &none, &Live::default())), ended);
        assert_eq!(
            to_etcd_for(C, &none, &Live::default()).conflicts.len(),
            1,
            "two claims, both maybe real"
        );
    }

    #[test]
    fn a_copy_gives_way_to_what_the_store_it_came_from_says_now() {
        // Seed 361000041: etcd holds a copy of cli's git claim; git released it since. Whatever
        // the common past, the copy is ended, not written back into git.
        let copy = |id: &str, holder: &str| {
            let mut task = t(id, C, Some(holder));
            task.copied = true;
            task
        };
        let agreed_free: BTreeMap<TaskId, Face> =
            [(TaskId::parse("T").expect("id"), face(A, None))].into();
        let live = Live {
            etcd: [sid("cli")].into(),
            git: BTreeSet::new(),
        };
        for base in [BTreeMap::new(), agreed_free] {
            let p = plan(&[copy("T", "cli")], &[t("T", A, None)], &base, &live);
            assert!(p.to_git.is_empty(), "{p:?}");
            assert_eq!(steps(&p), [(A, Some(sid("cli")))]);
            // Git since gave the task to s2: the copy ends and s2's claim is written, no conflict.
            let p = plan(&[copy("T", "cli")], &[t("T", C, Some("s2"))], &base, &live);
            assert_eq!(steps(&p), [(A, Some(sid("cli"))), (C, Some(sid("s2")))]);
            assert!(p.conflicts.is_empty() && p.to_git.is_empty());
            // The other way round: git's copy of an etcd claim that etcd ended.
            let p = plan(&[t("T", A, None)], &[copy("T", "cli")], &base, &live);
            assert!(p.to_etcd.is_empty(), "{p:?}");
            let to_git: Vec<_> = p
                .to_git
                .iter()
                .map(|m| (m.status, m.holder.clone()))
                .collect();
            assert_eq!(to_git, [(A, Some(sid("cli")))]);
        }
        // A copy that agrees with its source is left alone.
        let p = plan(
            &[copy("T", "cli")],
            &[t("T", C, Some("cli"))],
            &BTreeMap::new(),
            &live,
        );
        assert_eq!(p, Plan::default());
    }
}
