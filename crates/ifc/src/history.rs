//! The history log (`ifc agent --history FILE`) and its checker (`ifc check-history FILE…`).
//! Agents append one JSON object per line for every claim won, task run, release and fencing;
//! the checker reads only that format — none of the runtime's code paths — and verifies that no
//! task ran in two sessions at once, that every completion had a claim and came before any
//! fencing of that claim, and that every task that was won was completed exactly once.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Nanoseconds since the Unix epoch, when the agent observed it.
    pub t: i64,
    pub session: String,
    pub task: String,
    /// `won`, `lost`/`not_claimable`/`not_found`/`error` (claim attempts), `start`, `exit`,
    /// `complete`, `release`, `refused`, `fenced`; with an empty task: `switch` (the serving store
    /// changed), `mode:<mode>`, and `killed` (written by whoever killed the session's process),
    /// which ends its runs.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// `exit`: whether the command succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success: Option<bool>,
}

/// An append-only history file shared by any number of agents (each line one `write`).
#[derive(Debug)]
pub struct History {
    path: PathBuf,
    file: Mutex<File>,
}

impl History {
    pub fn open(path: &Path) -> Result<History> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the history file {}", path.display()))?;
        Ok(History {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// Appends one record, stamped now.
    pub fn log(
        &self,
        session: &str,
        task: &str,
        event: &str,
        token: Option<u64>,
        backend: Option<&str>,
        success: Option<bool>,
    ) {
        let record = Record {
            t: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
            session: session.to_owned(),
            task: task.to_owned(),
            event: event.to_owned(),
            token,
            backend: backend.map(str::to_owned),
            success,
        };
        let Ok(mut line) = serde_json::to_string(&record) else {
            return;
        };
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot append to the history");
        }
    }
}

/// What the checker found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub records: usize,
    pub tasks: usize,
    /// Runs of one task in two sessions that overlapped in time.
    pub concurrent_runs: Vec<String>,
    /// Completions without a claim of that session with that token.
    pub unclaimed_completions: Vec<String>,
    /// Completions reported after the claim was fenced.
    pub stale_completions: Vec<String>,
    /// Tasks completed more than once.
    pub double_completions: Vec<String>,
    /// Tasks whose command ran to success more than once (in one life of the task: an
    /// operator's reopening starts a new one), whether or not each run's completion was taken.
    pub repeated_runs: Vec<String>,
    /// Tasks that were won but never completed.
    pub lost_tasks: Vec<String>,
    /// Lines that are not records.
    pub unreadable: Vec<String>,
}

impl Report {
    pub fn violations(&self) -> usize {
        self.concurrent_runs.len()
            + self.unclaimed_completions.len()
            + self.stale_completions.len()
            + self.double_completions.len()
            + self.repeated_runs.len()
            + self.lost_tasks.len()
            + self.unreadable.len()
    }
}

/// Reads every record of `files`; unreadable lines are reported, not fatal.
pub fn read(files: &[PathBuf]) -> Result<(Vec<Record>, Vec<String>)> {
    let mut records = Vec::new();
    let mut bad = Vec::new();
    for path in files {
        let file = File::open(path)
            .with_context(|| format!("cannot read the history file {}", path.display()))?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("{}:{}", path.display(), n + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Record>(&line) {
                Ok(r) => records.push(r),
                Err(e) => bad.push(format!("{}:{}: {e}", path.display(), n + 1)),
            }
        }
    }
    records.sort_by_key(|r| r.t);
    Ok((records, bad))
}

/// Checks a history (records in time order).
pub fn check(records: &[Record]) -> Report {
    let mut report = Report {
        records: records.len(),
        ..Report::default()
    };
    let mut by_task: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    // Session-wide records (a switch of store or mode) have no task.
    for r in records
        .iter()
        .filter(|r| r.event != "killed" && !r.task.is_empty())
    {
        by_task.entry(&r.task).or_default().push(r);
    }
    // A session killed from outside (a harness writes `killed`, task ""): its runs end there.
    for k in records.iter().filter(|r| r.event == "killed") {
        for rs in by_task.values_mut() {
            if rs.iter().any(|r| r.session == k.session) {
                rs.push(k);
                rs.sort_by_key(|r| r.t);
            }
        }
    }
    report.tasks = by_task.len();
    for (task, rs) in &by_task {
        // Runs: from `start` to the first `exit` or `fenced` of that session and token.
        let mut runs: Vec<(&str, Option<u64>, i64, i64)> = Vec::new();
        for (i, r) in rs.iter().enumerate().filter(|(_, r)| r.event == "start") {
            let end = rs[i + 1..]
                .iter()
                .find(|e| {
                    e.session == r.session
                        && ((e.token == r.token && (e.event == "exit" || e.event == "fenced"))
                            || e.event == "killed")
                })
                .map_or(i64::MAX, |e| e.t);
            runs.push((&r.session, r.token, r.t, end));
        }
        // Two runs at once: by two sessions, or by one session id under two claims (two
        // processes with the same session id).
        for (i, a) in runs.iter().enumerate() {
            for b in &runs[i + 1..] {
                let overlap = a.2 < b.3 && b.2 < a.3;
                if overlap && a.0 != b.0 {
                    report
                        .concurrent_runs
                        .push(format!("{task}: {} and {} ran it at once", a.0, b.0));
                } else if overlap && a.1 != b.1 {
                    report.concurrent_runs.push(format!(
                        "{task}: {} ran it twice at once (tokens {:?} and {:?}: two processes with one session id)",
                        a.0, a.1, b.1
                    ));
                }
            }
        }
        let was_won = rs.iter().any(|r| r.event == "won");
        // Completions count per life of the task: an operator's reopening (`ifc put --status
        // available`, recorded as `reopened`) starts a new one.
        let (mut completions, mut most, mut ever) = (0, 0, 0);
        for (i, r) in rs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.event == "complete" || r.event == "reopened")
        {
            if r.event == "reopened" {
                completions = 0;
                continue;
            }
            // The same claim's completion reported again (an agent killed after recording it,
            // before forgetting its note: its successor reports it once more) is one completion.
            let again = rs[..i]
                .iter()
                .rev()
                .take_while(|e| e.event != "reopened")
                .any(|e| e.event == "complete" && e.session == r.session && e.token == r.token);
            if again {
                continue;
            }
            completions += 1;
            ever += 1;
            most = most.max(completions);
            // Or under a token no claim in the history had, while the session's claim is the
            // task's latest: the claim was carried into another store, which gave it its own
            // token (the tester's report: claimed in git, bridged into etcd, completed there
            // by a one-shot command with etcd's token).
            let won_before = || rs[..i].iter().filter(|w| w.event == "won");
            let claimed_before = won_before().any(|w| w.session == r.session && w.token == r.token)
                || (won_before().all(|w| w.token != r.token)
                    && won_before()
                        .next_back()
                        .is_some_and(|w| w.session == r.session));
            if !claimed_before {
                report.unclaimed_completions.push(format!(
                    "{task}: completed by {} with token {:?} without that claim",
                    r.session, r.token
                ));
            }
            // A completion after the claim was fenced is stale unless the run had already ended
            // successfully before the fencing (its release was only late, and the store took it
            // under the fencing token), or it ended successfully after it (the kill came too
            // late) and nobody claimed or reopened the task in between: the agent reports such
            // a run, and the store takes it only then (seed 370000036: a git claim fenced as
            // its heartbeat could not land, its run exiting 0 at that moment).
            let same = |e: &&&Record| e.session == r.session && e.token == r.token;
            let taken_between = |from: i64| {
                rs[..i].iter().any(|e| {
                    e.t > from
                        && (e.event == "reopened"
                            || (e.event == "won" && (e.session != r.session || e.token != r.token)))
                })
            };
            let fenced_at = rs[..i]
                .iter()
                .filter(same)
                .find(|e| e.event == "fenced")
                .map(|e| e.t);
            let finished_at = rs[..i]
                .iter()
                .filter(same)
                .find(|e| e.event == "exit" && e.success == Some(true))
                .map(|e| e.t);
            let stale = match (fenced_at, finished_at) {
                (Some(f), Some(done)) => done > f && taken_between(f),
                (Some(_), None) => true,
                _ => false,
            };
            if stale {
                report.stale_completions.push(format!(
                    "{task}: {} completed it after its claim (token {:?}) was fenced",
                    r.session, r.token
                ));
            }
        }
        if most > 1 {
            report
                .double_completions
                .push(format!("{task}: completed {most} times"));
        }
        // Finished runs per life: a run whose completion was refused (its claim lapsed while it
        // could not be recorded) and that then ran again is a task run twice too.
        let (mut finished, mut most_finished) = (0, 0);
        for r in rs
            .iter()
            .filter(|r| (r.event == "exit" && r.success == Some(true)) || r.event == "reopened")
        {
            if r.event == "reopened" {
                finished = 0;
            } else {
                finished += 1;
                most_finished = most_finished.max(finished);
            }
        }
        if most_finished > 1 && most <= 1 {
            report.repeated_runs.push(format!(
                "{task}: ran to success {most_finished} times (a finished run was not recorded complete, and the task ran again)"
            ));
        }
        // A task its last claimer gave back (max attempts, shutdown grace) is not lost.
        let given_back = rs.iter().rposition(|r| r.event == "won").is_some_and(|w| {
            rs[w + 1..]
                .iter()
                .any(|e| e.event == "release" && e.session == rs[w].session)
        });
        if ever == 0 && was_won && !given_back {
            report
                .lost_tasks
                .push(format!("{task}: won but never completed"));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(t: i64, session: &str, task: &str, event: &str, token: u64) -> Record {
        Record {
            t,
            session: session.into(),
            task: task.into(),
            event: event.into(),
            token: Some(token),
            backend: None,
            success: None,
        }
    }

    fn run(t: i64, session: &str, task: &str, token: u64) -> Vec<Record> {
        vec![
            r(t, session, task, "won", token),
            r(t + 1, session, task, "start", token),
            r(t + 5, session, task, "exit", token),
            r(t + 6, session, task, "complete", token),
        ]
    }

    #[test]
    fn a_clean_history_passes() {
        let mut h = run(0, "s1", "A", 1);
        h.extend(run(10, "s2", "B", 2));
        // A fenced claim, then another session's run of the same task.
        h.extend([
            r(20, "s1", "C", "won", 3),
            r(21, "s1", "C", "start", 3),
            r(25, "s1", "C", "fenced", 3),
        ]);
        h.extend(run(30, "s2", "C", 4));
        let report = check(&h);
        assert_eq!(report.violations(), 0, "{report:?}");
        assert_eq!(report.tasks, 3);
        // One claim's completion recorded twice (its agent killed between the history line and
        // forgetting its note; the next agent reported it again) is one completion.
        h.push(r(40, "s1", "A", "complete", 1));
        let report = check(&h);
        assert_eq!(report.violations(), 0, "{report:?}");
    }

    #[test]
    fn every_kind_of_violation_is_found() {
        let mut h = run(0, "s1", "A", 1);
        // s2 runs A while s1 still does.
        h.extend([
            r(2, "s2", "A", "won", 9),
            r(3, "s2", "A", "start", 9),
            r(8, "s2", "A", "exit", 9),
            r(9, "s2", "A", "complete", 9),
        ]);
        // B completed with a token nobody won; C completed after being fenced; D won, never done.
        h.push(r(20, "s1", "B", "complete", 5));
        h.extend([
            r(30, "s1", "C", "won", 6),
            r(31, "s1", "C", "fenced", 6),
            r(32, "s1", "C", "complete", 6),
        ]);
        h.push(r(40, "s3", "D", "won", 7));
        // E finished, then its claim was reported lost, then the late release landed: not stale.
        let mut exit = r(51, "s1", "E", "exit", 8);
        exit.success = Some(true);
        h.extend([
            r(50, "s1", "E", "won", 8),
            exit,
            r(52, "s1", "E", "fenced", 8),
            r(53, "s1", "E", "complete", 8),
        ]);
        // F's run exited 0 just after its claim was lost, nobody claimed F in between, and the
        // store took the completion: not stale. G's the same, but s2 claimed G in between: stale.
        for (task, token, t) in [("F", 10, 60), ("G", 11, 70)] {
            let mut exit = r(t + 3, "s1", task, "exit", token);
            exit.success = Some(true);
            h.extend([
                r(t, "s1", task, "won", token),
                r(t + 1, "s1", task, "start", token),
                r(t + 2, "s1", task, "fenced", token),
                exit,
                r(t + 5, "s1", task, "complete", token),
            ]);
        }
        h.push(r(74, "s2", "G", "won", 12));
        h.sort_by_key(|r| r.t);
        let report = check(&h);
        assert_eq!(report.concurrent_runs.len(), 1, "{report:?}");
        assert_eq!(report.double_completions.len(), 1, "{report:?}");
        assert_eq!(report.unclaimed_completions.len(), 1, "{report:?}");
        assert_eq!(
            report.stale_completions,
            vec![
                "C: s1 completed it after its claim (token Some(6)) was fenced".to_owned(),
                "G: s1 completed it after its claim (token Some(11)) was fenced".to_owned()
            ],
            "{report:?}"
        );
        assert_eq!(
            report.lost_tasks,
            vec!["D: won but never completed".to_owned()]
        );
    }

    #[test]
    fn a_completion_under_the_token_another_store_gave_the_claim_is_the_claims() {
        let carried = vec![
            r(0, "s1", "A", "won", 1_796_277_630_957),
            r(1, "s1", "A", "complete", 479),
        ];
        assert!(check(&carried).unclaimed_completions.is_empty());
        // Not when another session's claim came last, nor under a token of an older claim.
        for h in [
            vec![
                r(0, "s1", "A", "won", 1),
                r(1, "s2", "A", "won", 2),
                r(2, "s1", "A", "complete", 479),
            ],
            vec![
                r(0, "s2", "A", "won", 1),
                r(1, "s1", "A", "won", 2),
                r(2, "s1", "A", "complete", 1),
            ],
        ] {
            assert_eq!(check(&h).unclaimed_completions.len(), 1, "{h:?}");
        }
    }

    #[test]
    fn two_runs_of_one_task_at_once_by_one_session_id_are_found() {
        // Two processes with one session id: the second claims (another token) and starts the
        // task while the first still runs it.
        let mut h = vec![
            r(0, "s1", "A", "won", 1),
            r(1, "s1", "A", "start", 1),
            r(2, "s1", "A", "won", 2),
            r(3, "s1", "A", "start", 2),
            r(4, "s1", "A", "fenced", 1),
            r(6, "s1", "A", "exit", 2),
            r(7, "s1", "A", "complete", 2),
        ];
        let report = check(&h);
        assert_eq!(report.concurrent_runs.len(), 1, "{report:?}");
        assert!(
            report.concurrent_runs[0].contains("two processes with one session id"),
            "{report:?}"
        );
        // The same session running it again after the first run ended is a retry, not a
        // violation.
        h = vec![
            r(0, "s1", "A", "won", 1),
            r(1, "s1", "A", "start", 1),
            r(2, "s1", "A", "exit", 1),
            r(3, "s1", "A", "release", 1),
            r(4, "s1", "A", "won", 2),
            r(5, "s1", "A", "start", 2),
            r(6, "s1", "A", "exit", 2),
            r(7, "s1", "A", "complete", 2),
        ];
        let report = check(&h);
        assert_eq!(report.violations(), 0, "{report:?}");
    }

    #[test]
    fn a_reopened_task_and_a_given_back_task_are_not_violations() {
        let mut h = run(0, "s1", "A", 1);
        // An operator reopens A; it runs and completes once more.
        let mut reopened = r(10, "ifc", "A", "reopened", 0);
        reopened.token = None;
        h.push(reopened);
        h.extend(run(20, "s2", "A", 2));
        // B: s1 gives it back after its last attempt; nobody else lists it.
        h.extend([
            r(40, "s1", "B", "won", 3),
            r(41, "s1", "B", "start", 3),
            r(42, "s1", "B", "exit", 3),
            r(43, "s1", "B", "release", 3),
        ]);
        let report = check(&h);
        assert_eq!(report.violations(), 0, "{report:?}");
        // Without the reopening, two completions are a violation.
        let mut h = run(0, "s1", "A", 1);
        h.extend(run(20, "s2", "A", 2));
        assert_eq!(check(&h).double_completions.len(), 1);
    }

    #[test]
    fn a_finished_run_that_ran_again_because_its_completion_was_refused_is_found() {
        // Seeds 40000077 and 150000009: the git remote was away past the heartbeat's limit; the
        // run had finished, its completion was refused, and another session ran the task again.
        let done = |t: i64, session: &str, token: u64| {
            let mut e = r(t, session, "F", "exit", token);
            e.success = Some(true);
            e
        };
        let mut h = vec![
            r(0, "s1", "F", "won", 1),
            r(1, "s1", "F", "start", 1),
            done(2, "s1", 1),
            r(3, "s1", "F", "fenced", 1),
            r(4, "s1", "F", "refused", 1),
            r(5, "s2", "F", "won", 2),
            r(6, "s2", "F", "start", 2),
            done(7, "s2", 2),
            r(8, "s2", "F", "complete", 2),
        ];
        let report = check(&h);
        assert_eq!(report.repeated_runs.len(), 1, "{report:?}");
        assert_eq!(report.violations(), 1, "{report:?}");
        // After an operator's reopening, a second run is the task's new life.
        h.drain(3..5);
        h.insert(3, r(3, "s1", "F", "complete", 1));
        h.insert(4, r(4, "ifc", "F", "reopened", 0));
        assert_eq!(check(&h).violations(), 0, "{:?}", check(&h));
    }
}
