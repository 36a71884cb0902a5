//! The claim loop's decisions, step by step, with no IO and no real time.

use std::time::Duration;

use super::*;
use crate::FencingToken;

fn id(s: &str) -> TaskId {
    TaskId::parse(s).expect("valid")
}
fn sid(s: &str) -> SessionId {
    SessionId::parse(s).expect("valid")
}

fn task(name: &str, status: TaskStatus, blocked_by: &[&str]) -> Task {
    let mut t = Task::new(id(name), status);
    t.blocked_by = blocked_by.iter().map(|b| id(b)).collect();
    t
}

fn plan(patterns: &[&str]) -> Plan {
    Plan {
        session: sid("me"),
        patterns: patterns
            .iter()
            .map(|p| TaskPattern::parse(p).expect("valid"))
            .collect(),
        max_attempts: 2,
        retry_backoff: Duration::from_secs(1),
        until_done: true,
    }
}

fn won(name: &str, token: u64) -> Input {
    let claim = Claim {
        task: id(name),
        session: sid("me"),
        token: FencingToken(token),
        leased: true,
    };
    Input::Claimed {
        task: id(name),
        outcome: ClaimOutcome::Won(claim),
    }
}

/// A loop (not `until_done`) over tasks T and U, both available, that has won T with `token`.
fn running_t_of_t_and_u(now: Instant, token: u64) -> ClaimLoop {
    let mut p = plan(&["T", "U"]);
    p.until_done = false;
    let mut l = ClaimLoop::new(p);
    l.step(
        Input::Snapshot(vec![
            task("T", TaskStatus::Available, &[]),
            task("U", TaskStatus::Available, &[]),
        ]),
        now,
    );
    l.step(won("T", token), now);
    l
}

/// The store's word that `name` is now `status`, held by `holder`.
fn changed(name: &str, status: TaskStatus, holder: Option<&str>) -> Input {
    Input::Changed {
        task: id(name),
        status: Some(status),
        holder: holder.map(sid),
        blocked_by: None,
    }
}

fn claims(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| {
            if let Output::Claim(t) = o {
                Some(t.to_string())
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn claims_the_first_claimable_task_in_priority_order() {
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["B.*", "A.1"]));
    let out = l.step(
        Input::Snapshot(vec![
            task("A.1", TaskStatus::Available, &[]),
            task("B.1", TaskStatus::Blocked, &["Z"]),
            task("B.2", TaskStatus::Available, &[]),
            task("C.1", TaskStatus::Available, &[]),
            task("Z", TaskStatus::Available, &[]),
        ]),
        now,
    );
    assert_eq!(
        claims(&out),
        ["B.2"],
        "B.1 is blocked, B.* comes before A.1, C.1 is not ours"
    );
    let out = l.step(won("B.2", 7), now);
    assert!(out.contains(&Output::Start(Claim {
        task: id("B.2"),
        session: sid("me"),
        token: FencingToken(7),
        leased: true
    })));
    // While it runs nothing else is claimed.
    let out = l.step(
        Input::Changed {
            task: id("A.1"),
            status: Some(TaskStatus::Available),
            holder: None,
            blocked_by: None,
        },
        now,
    );
    assert!(claims(&out).is_empty());
    let out = l.step(
        Input::Exited {
            task: id("B.2"),
            success: true,
        },
        now,
    );
    assert_eq!(
        out,
        vec![Output::Release {
            task: id("B.2"),
            to: ReleaseTo::Complete,
            token: Some(FencingToken(7))
        }]
    );
    let out = l.step(Input::Released { task: id("B.2") }, now);
    assert_eq!(claims(&out), ["A.1"]);
}

#[test]
fn a_lost_race_moves_on_and_a_cleared_blocker_wakes_the_waiting_task() {
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["T"]));
    let out = l.step(
        Input::Snapshot(vec![
            task("T", TaskStatus::Blocked, &["B"]),
            task("B", TaskStatus::Available, &[]),
        ]),
        now,
    );
    assert!(
        claims(&out).is_empty() && !out.iter().any(|o| matches!(o, Output::Exit(_))),
        "waits, no polling: {out:?}"
    );
    // Another session completes the blocker: T is claimed at once, and the log says why.
    let out = l.step(changed("B", TaskStatus::Complete, Some("other")), now);
    assert!(
        out.contains(&Output::Note("blocker B cleared: T claimable".into())),
        "{out:?}"
    );
    assert_eq!(claims(&out), ["T"]);
    let out = l.step(
        Input::Claimed {
            task: id("T"),
            outcome: ClaimOutcome::Lost {
                holder: Some(sid("other")),
            },
        },
        now,
    );
    assert!(claims(&out).is_empty());
    // The winner gives it back: claimable again.
    let out = l.step(changed("T", TaskStatus::Available, None), now);
    assert_eq!(claims(&out), ["T"]);
}

#[test]
fn a_failed_task_is_given_back_and_retried_after_a_backoff_at_most_max_attempts_times() {
    let t0 = Instant::now();
    let mut l = ClaimLoop::new(plan(&["T"]));
    assert_eq!(
        claims(&l.step(
            Input::Snapshot(vec![task("T", TaskStatus::Available, &[])]),
            t0
        )),
        ["T"]
    );
    l.step(won("T", 1), t0);
    let out = l.step(
        Input::Exited {
            task: id("T"),
            success: false,
        },
        t0,
    );
    assert!(out.contains(&Output::Release {
        task: id("T"),
        to: ReleaseTo::Available,
        token: Some(FencingToken(1))
    }));
    let out = l.step(Input::Released { task: id("T") }, t0);
    assert!(claims(&out).is_empty(), "not before the backoff");
    assert!(
        out.contains(&Output::WakeAt(t0 + Duration::from_secs(1))),
        "{out:?}"
    );
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(claims(&l.step(Input::Tick, t1)), ["T"]);
    l.step(won("T", 2), t1);
    l.step(
        Input::Exited {
            task: id("T"),
            success: false,
        },
        t1,
    );
    let out = l.step(Input::Released { task: id("T") }, t1);
    assert!(claims(&out).is_empty());
    // Two attempts used: never again by this session, however long it waits.
    let out = l.step(Input::Tick, t1 + Duration::from_secs(3600));
    assert!(claims(&out).is_empty(), "{out:?}");
}

/// A session whose claim was lost, running `T` under token 3 and told to kill it.
fn fenced_t(now: Instant) -> ClaimLoop {
    let mut l = ClaimLoop::new(plan(&["T"]));
    l.step(
        Input::Snapshot(vec![task("T", TaskStatus::Available, &[])]),
        now,
    );
    l.step(won("T", 3), now);
    let out = l.step(Input::Lost { task: id("T") }, now);
    assert_eq!(
        out,
        vec![Output::Kill {
            task: id("T"),
            reason: "the session's claim was lost".into()
        }]
    );
    l
}

#[test]
fn a_lost_claim_kills_the_task_and_a_killed_run_is_not_reported_done() {
    let now = Instant::now();
    let mut l = fenced_t(now);
    let out = l.step(
        Input::Exited {
            task: id("T"),
            success: false,
        },
        now,
    );
    assert!(
        !out.iter().any(|o| matches!(o, Output::Release { .. })),
        "no release after fencing: {out:?}"
    );
}

#[test]
fn a_run_that_finished_before_the_kill_is_reported_done_under_its_token() {
    let now = Instant::now();
    let mut l = fenced_t(now);
    let out = l.step(
        Input::Exited {
            task: id("T"),
            success: true,
        },
        now,
    );
    assert!(
        out.contains(&Output::Release {
            task: id("T"),
            to: ReleaseTo::Complete,
            token: Some(FencingToken(3)),
        }),
        "{out:?}"
    );
}

#[test]
fn shutdown_drains_the_running_task_then_exits() {
    let now = Instant::now();
    let mut l = running_t_of_t_and_u(now, 5);
    assert_eq!(
        l.step(Input::Shutdown, now),
        vec![Output::Drain { task: id("T") }]
    );
    let out = l.step(
        Input::Exited {
            task: id("T"),
            success: true,
        },
        now,
    );
    assert_eq!(
        out,
        vec![Output::Release {
            task: id("T"),
            to: ReleaseTo::Complete,
            token: Some(FencingToken(5))
        }]
    );
    assert_eq!(
        l.step(Input::Released { task: id("T") }, now),
        vec![Output::Exit(0)],
        "U is not claimed"
    );
    // Killed at the end of the grace period instead: given back.
    let mut l = ClaimLoop::new(plan(&["T"]));
    l.step(
        Input::Snapshot(vec![task("T", TaskStatus::Available, &[])]),
        now,
    );
    l.step(won("T", 5), now);
    l.step(Input::Shutdown, now);
    let out = l.step(
        Input::Exited {
            task: id("T"),
            success: false,
        },
        now,
    );
    assert!(out.contains(&Output::Release {
        task: id("T"),
        to: ReleaseTo::Available,
        token: Some(FencingToken(5))
    }));
}

#[test]
fn until_done_exits_0_when_all_complete_and_1_when_a_blocker_does_not_exist() {
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["A", "B"]));
    let out = l.step(
        Input::Snapshot(vec![
            task("A", TaskStatus::Complete, &[]),
            task("B", TaskStatus::Claimed, &[]),
        ]),
        now,
    );
    assert!(!out.contains(&Output::Exit(0)));
    let out = l.step(changed("B", TaskStatus::Complete, Some("x")), now);
    assert!(out.contains(&Output::Exit(0)), "{out:?}");

    let mut l = ClaimLoop::new(plan(&["A"]));
    let out = l.step(
        Input::Snapshot(vec![
            task("A", TaskStatus::Blocked, &["B"]),
            task("B", TaskStatus::Blocked, &["GHOST"]),
        ]),
        now,
    );
    assert!(out.contains(&Output::Exit(1)), "{out:?}");
    assert!(out.contains(&Output::Fatal(
        "A can never be claimed: its blocker GHOST does not exist (A → B → GHOST)".into()
    )));

    let mut l = ClaimLoop::new(plan(&["A"]));
    let out = l.step(
        Input::Snapshot(vec![
            task("A", TaskStatus::Blocked, &["B"]),
            task("B", TaskStatus::Blocked, &["A"]),
        ]),
        now,
    );
    assert!(out.contains(&Output::Exit(1)), "a cycle: {out:?}");
}

#[test]
fn unknown_tasks_of_interest_are_fetched_and_claim_errors_back_off() {
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["N.*"]));
    l.step(
        Input::Snapshot(vec![task("X", TaskStatus::Available, &[])]),
        now,
    );
    let out = l.step(
        Input::Changed {
            task: id("N.1"),
            status: Some(TaskStatus::Available),
            holder: None,
            blocked_by: None,
        },
        now,
    );
    // (The timer for N.* matching nothing yet aside.)
    let actions = |out: Vec<Output>| -> Vec<Output> {
        out.into_iter()
            .filter(|o| !matches!(o, Output::WakeAt(_)))
            .collect()
    };
    assert_eq!(actions(out), vec![Output::Fetch(id("N.1"))]);
    let out = l.step(changed("Y", TaskStatus::Available, None), now);
    assert!(actions(out).is_empty(), "not ours, blocks nothing of ours");
    assert_eq!(
        claims(&l.step(Input::Fetched(task("N.1", TaskStatus::Available, &[])), now)),
        ["N.1"]
    );
    let out = l.step(Input::ClaimFailed { task: id("N.1") }, now);
    assert_eq!(out, vec![Output::WakeAt(now + Duration::from_secs(1))]);
    assert_eq!(
        claims(&l.step(Input::Tick, now + Duration::from_secs(1))),
        ["N.1"]
    );
}

#[test]
fn a_store_that_says_blocked_gets_its_blockers_read_again_not_a_claim_storm() {
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["W"]));
    // The view believes W's blocker is done (another store said so); the store does not.
    let out = l.step(
        Input::Snapshot(vec![
            task("W", TaskStatus::Blocked, &["B"]),
            task("B", TaskStatus::Complete, &[]),
        ]),
        now,
    );
    assert_eq!(claims(&out), ["W"]);
    let out = l.step(
        Input::Claimed {
            task: id("W"),
            outcome: ClaimOutcome::NotClaimable {
                status: TaskStatus::Blocked,
            },
        },
        now,
    );
    assert!(out.contains(&Output::Fetch(id("B"))), "{out:?}");
    assert!(claims(&out).is_empty(), "no immediate retry: {out:?}");
    // The fetched blocker is not done after all: still no claim, even after the backoff.
    let out = l.step(Input::Fetched(task("B", TaskStatus::Available, &[])), now);
    assert!(claims(&out).is_empty(), "{out:?}");
    let out = l.step(Input::Tick, now + Duration::from_secs(2));
    assert!(claims(&out).is_empty(), "{out:?}");
    // It completes: W is claimed.
    let out = l.step(
        changed("B", TaskStatus::Complete, None),
        now + Duration::from_secs(2),
    );
    assert_eq!(claims(&out), ["W"]);
}

#[test]
fn the_event_of_its_own_claim_arriving_after_the_completion_does_not_bring_the_task_back() {
    let now = Instant::now();
    let mut l = running_t_of_t_and_u(now, 1);
    l.step(
        Input::Exited {
            task: id("T"),
            success: true,
        },
        now,
    );
    let out = l.step(Input::Released { task: id("T") }, now);
    assert_eq!(claims(&out), ["U"]);
    l.step(won("U", 3), now);
    // The store's events lag (a loaded machine): the one of T's claim, older than the completion
    // the loop already knows, arrives while U runs; T's completion only after U is done.
    let out = l.step(changed("T", TaskStatus::Claimed, Some("me")), now);
    assert!(claims(&out).is_empty(), "{out:?}");
    l.step(
        Input::Exited {
            task: id("U"),
            success: true,
        },
        now,
    );
    let out = l.step(Input::Released { task: id("U") }, now);
    assert!(
        claims(&out).is_empty(),
        "T was completed by this loop: not claimed again: {out:?}"
    );
    l.step(changed("T", TaskStatus::Complete, Some("me")), now);
    // Reset to available by an operator, T is this session's to claim again.
    let out = l.step(changed("T", TaskStatus::Available, None), now);
    assert_eq!(claims(&out), ["T"]);
}

#[test]
fn a_task_held_by_this_session_in_another_process_is_asked_again_only_after_the_backoff() {
    let now = Instant::now();
    let mut p = plan(&["T"]);
    p.until_done = false;
    let mut l = ClaimLoop::new(p);
    let mut held = task("T", TaskStatus::Claimed, &[]);
    held.claimed_by = Some(sid("me"));
    // A task the store shows held by this session reads as "adopt it": one claim.
    let out = l.step(Input::Snapshot(vec![held]), now);
    assert_eq!(claims(&out), ["T"]);
    let out = l.step(
        Input::Claimed {
            task: id("T"),
            outcome: ClaimOutcome::Lost {
                holder: Some(sid("me")),
            },
        },
        now,
    );
    // Another process of this session holds it: no claim storm, one retry after the backoff.
    assert!(claims(&out).is_empty(), "{out:?}");
    assert!(
        out.contains(&Output::WakeAt(now + Duration::from_secs(1))),
        "{out:?}"
    );
    let out = l.step(Input::Tick, now + Duration::from_millis(500));
    assert!(claims(&out).is_empty(), "{out:?}");
    let out = l.step(Input::Tick, now + Duration::from_secs(1));
    assert_eq!(claims(&out), ["T"]);
}

#[test]
fn an_until_done_list_with_a_task_not_on_the_board_warns_at_once_and_gives_up_after_the_grace() {
    // Issue 14 #4: a row an --until-done agent needed was deleted; the agent idled forever.
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["A", "GONE", "Z.*"]));
    let out = l.step(
        Input::Snapshot(vec![task("A", TaskStatus::Complete, &[])]),
        now,
    );
    let warnings: Vec<&String> = out
        .iter()
        .filter_map(|o| match o {
            Output::Warn(w) => Some(w),
            _ => None,
        })
        .collect();
    assert_eq!(warnings.len(), 2, "{out:?}");
    assert!(
        warnings[0].contains("GONE") && warnings[1].contains("Z.*"),
        "{warnings:?}"
    );
    assert!(
        !out.contains(&Output::Exit(0)),
        "not done while GONE is missing: {out:?}"
    );
    assert!(
        out.contains(&Output::WakeAt(now + UNMATCHED_GRACE)),
        "{out:?}"
    );
    // Z.1 appears (created after the agent started): only GONE is left, warned about once.
    let out = l.step(
        Input::Fetched(task("Z.1", TaskStatus::Complete, &[])),
        now + Duration::from_secs(1),
    );
    assert!(!out.iter().any(|o| matches!(o, Output::Warn(_))), "{out:?}");
    let out = l.step(Input::Tick, now + UNMATCHED_GRACE);
    assert!(out.contains(&Output::Exit(1)), "{out:?}");
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Fatal(w) if w.contains("GONE"))),
        "the reason is named: {out:?}"
    );
}

#[test]
fn a_list_whose_missing_task_appears_in_time_finishes_normally() {
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["A", "LATE"]));
    l.step(
        Input::Snapshot(vec![task("A", TaskStatus::Complete, &[])]),
        now,
    );
    let out = l.step(
        Input::Fetched(task("LATE", TaskStatus::Complete, &[])),
        now + Duration::from_secs(2),
    );
    assert!(out.contains(&Output::Exit(0)), "{out:?}");
}

#[test]
fn an_until_done_session_that_gave_up_on_what_is_left_exits_1() {
    // Issue 15 #5: after max_attempts ("leaving it to other sessions") --until-done waited forever.
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["A", "F"]));
    l.step(
        Input::Snapshot(vec![
            task("A", TaskStatus::Complete, &[]),
            task("F", TaskStatus::Available, &[]),
        ]),
        now,
    );
    let mut at = now;
    for attempt in 1..=2 {
        l.step(won("F", attempt), at);
        let out = l.step(
            Input::Exited {
                task: id("F"),
                success: false,
            },
            at,
        );
        assert!(
            out.iter().any(|o| matches!(o, Output::Release { .. })),
            "{out:?}"
        );
        let out = l.step(Input::Released { task: id("F") }, at);
        if attempt == 1 {
            assert!(
                !out.contains(&Output::Exit(1)),
                "one attempt is left: {out:?}"
            );
            at += Duration::from_secs(5);
            assert_eq!(claims(&l.step(Input::Tick, at)), ["F"]);
        } else {
            assert!(out.contains(&Output::Exit(1)), "{out:?}");
            assert!(
                out.iter()
                    .any(|o| matches!(o, Output::Fatal(w) if w.contains("gave up on F"))),
                "{out:?}"
            );
        }
    }
}

/// The store's word that `name`'s blockers are now `blocked_by` (status and holder unchanged).
fn reblocked(name: &str, status: TaskStatus, blocked_by: &[&str]) -> Input {
    Input::Changed {
        task: id(name),
        status: Some(status),
        holder: None,
        blocked_by: Some(blocked_by.iter().map(|b| id(b)).collect()),
    }
}

#[test]
fn a_waiting_session_claims_a_task_whose_blockers_were_edited_to_complete_ones() {
    // Issue 15 #4: `ifc put A1 --blocked-by DONE0` while an agent waited for A1: never claimed.
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["A1"]));
    let out = l.step(
        Input::Snapshot(vec![
            task("A1", TaskStatus::Blocked, &["X"]),
            task("X", TaskStatus::Available, &[]),
            task("DONE0", TaskStatus::Complete, &[]),
        ]),
        now,
    );
    assert!(claims(&out).is_empty(), "{out:?}");
    let out = l.step(reblocked("A1", TaskStatus::Blocked, &["DONE0"]), now);
    assert_eq!(claims(&out), ["A1"], "{out:?}");
}

#[test]
fn a_blocker_edit_to_a_missing_task_or_a_cycle_ends_until_done_with_1() {
    let now = Instant::now();
    let waiting = || {
        let mut l = ClaimLoop::new(plan(&["A1"]));
        l.step(
            Input::Snapshot(vec![
                task("A1", TaskStatus::Blocked, &["X"]),
                task("X", TaskStatus::Available, &["Y"]),
                task("Y", TaskStatus::Available, &[]),
            ]),
            now,
        );
        l
    };
    // A blocker the view does not know is read first: not called missing before the answer.
    let mut l = waiting();
    let out = l.step(reblocked("A1", TaskStatus::Blocked, &["GHOST"]), now);
    assert!(out.contains(&Output::Fetch(id("GHOST"))), "{out:?}");
    assert!(!out.contains(&Output::Exit(1)), "{out:?}");
    let out = l.step(Input::Missing(id("GHOST")), now);
    assert!(out.contains(&Output::Exit(1)), "{out:?}");
    assert!(
        out.contains(&Output::Fatal(
            "A1 can never be claimed: its blocker GHOST does not exist (A1 → GHOST)".into()
        )),
        "{out:?}"
    );
    // One that exists is waited for.
    let mut l = waiting();
    l.step(reblocked("A1", TaskStatus::Blocked, &["NEW"]), now);
    let out = l.step(Input::Fetched(task("NEW", TaskStatus::Available, &[])), now);
    assert!(!out.contains(&Output::Exit(1)), "{out:?}");
    let out = l.step(changed("NEW", TaskStatus::Complete, Some("x")), now);
    assert_eq!(claims(&out), ["A1"], "{out:?}");
    // A cycle made by editing a blocker's blockers.
    let mut l = waiting();
    let out = l.step(reblocked("Y", TaskStatus::Available, &["A1"]), now);
    assert!(out.contains(&Output::Exit(1)), "{out:?}");
    assert!(
        out.contains(&Output::Fatal(
            "A1 can never be claimed: its blockers form a cycle (A1 → X → Y → A1)".into()
        )),
        "{out:?}"
    );
    // A cycle further up the chain, not through A1 (the tester's: the agent waited silently
    // for ever): X and Y wait for each other.
    let mut l = waiting();
    let out = l.step(reblocked("Y", TaskStatus::Available, &["X"]), now);
    assert!(out.contains(&Output::Exit(1)), "{out:?}");
    assert!(
        out.contains(&Output::Fatal(
            "A1 can never be claimed: its blockers form a cycle (X → Y → X)".into()
        )),
        "{out:?}"
    );
}

#[test]
fn without_until_done_a_task_that_can_never_be_claimed_is_said_once_and_waited_for() {
    let now = Instant::now();
    let mut l = ClaimLoop::new(Plan {
        until_done: false,
        ..plan(&["A1"])
    });
    let said = |out: &[Output]| {
        out.iter()
            .filter(|o| matches!(o, Output::Warn(w) if w.contains("A1 can never be claimed")))
            .count()
    };
    let out = l.step(
        Input::Snapshot(vec![task("A1", TaskStatus::Blocked, &["A1"])]),
        now,
    );
    assert_eq!(said(&out), 1, "{out:?}");
    assert!(!out.contains(&Output::Exit(1)), "{out:?}");
    let out = l.step(Input::Tick, now);
    assert_eq!(said(&out), 0, "said once: {out:?}");
    // Fixed by an edit: claimed.
    let out = l.step(reblocked("A1", TaskStatus::Available, &[]), now);
    assert_eq!(claims(&out), ["A1"], "{out:?}");
}

#[test]
fn until_done_on_an_empty_board_warns_at_once_and_gives_up_after_the_grace() {
    // The tester's report: no warning, no exit, when no task at all was on the board.
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["W"]));
    let out = l.step(Input::Snapshot(Vec::new()), now);
    assert!(
        out.iter().any(|o| matches!(o, Output::Warn(w) if w.contains("W of the session's list is no task of the store"))),
        "{out:?}"
    );
    assert!(!out.contains(&Output::Exit(1)), "{out:?}");
    let out = l.step(
        Input::Tick,
        now + UNMATCHED_GRACE + Duration::from_millis(1),
    );
    assert!(out.contains(&Output::Exit(1)), "{out:?}");
}

fn held(name: &str, by: &str, blocked_by: &[&str]) -> Task {
    let mut t = task(name, TaskStatus::Claimed, blocked_by);
    t.claimed_by = Some(sid(by));
    t
}

#[test]
fn an_idle_session_says_why_nothing_is_claimable_once_and_again_when_it_changes() {
    // Tester helper-1: tasks held by one-shot claims of sessions nobody runs; the agent idled
    // with nothing in its log.
    let notes = |out: &[Output]| -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Output::Note(n) if n.starts_with("nothing to claim") => Some(n.clone()),
                _ => None,
            })
            .collect()
    };
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["CL1", "CB2"]));
    let out = l.step(
        Input::Snapshot(vec![
            held("CL1", "ghost", &[]),
            task("CB2", TaskStatus::Blocked, &["CB1"]),
            held("CB1", "ghost2", &[]),
        ]),
        now,
    );
    assert_eq!(
        notes(&out),
        ["nothing to claim: CL1 is claimed by ghost; CB2 waits for CB1 (claimed by ghost2)"]
    );
    // Said once: the same state again says nothing.
    let out = l.step(Input::Tick, now + Duration::from_secs(1));
    assert!(notes(&out).is_empty(), "{out:?}");
    // A change within the quiet period is said when it ends.
    let out = l.step(
        changed("CB1", TaskStatus::Available, None),
        now + Duration::from_secs(2),
    );
    assert!(notes(&out).is_empty(), "{out:?}");
    assert!(
        out.contains(&Output::WakeAt(now + WAITING_SAID_EVERY)),
        "{out:?}"
    );
    let out = l.step(Input::Tick, now + WAITING_SAID_EVERY);
    assert_eq!(
        notes(&out),
        ["nothing to claim: CL1 is claimed by ghost; CB2 waits for CB1 (available)"]
    );
    // Something claimable: it is claimed, nothing is said.
    let out = l.step(
        changed("CL1", TaskStatus::Available, None),
        now + WAITING_SAID_EVERY,
    );
    assert_eq!(claims(&out), ["CL1"]);
    assert!(notes(&out).is_empty(), "{out:?}");
}

#[test]
fn an_unmatched_pattern_ends_until_done_only_after_the_claimable_work() {
    // Tester helper-2: `[P0.5.*, P0.1.6, P0.9.*]` exited 1 after 10 s for P0.9.*, with P0.5.8
    // and P0.1.6 claimable and never tried.
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["GONE.*", "A", "B"]));
    let out = l.step(
        Input::Snapshot(vec![
            held("A", "other", &[]),
            task("B", TaskStatus::Blocked, &["A"]),
        ]),
        now,
    );
    assert!(claims(&out).is_empty(), "{out:?}");
    // A is given back when the grace has passed: claimed, not abandoned.
    let later = now + UNMATCHED_GRACE + Duration::from_secs(1);
    let out = l.step(changed("A", TaskStatus::Available, None), later);
    assert_eq!(claims(&out), ["A"], "{out:?}");
    assert!(!out.contains(&Output::Exit(1)), "{out:?}");
    l.step(won("A", 1), later);
    let out = l.step(
        Input::Exited {
            task: id("A"),
            success: true,
        },
        later,
    );
    assert!(
        out.iter().any(|o| matches!(o, Output::Release { .. })),
        "{out:?}"
    );
    let out = l.step(Input::Released { task: id("A") }, later);
    // B became claimable with A complete: done too, then the list can never be finished.
    assert_eq!(claims(&out), ["B"], "{out:?}");
    l.step(won("B", 2), later);
    l.step(
        Input::Exited {
            task: id("B"),
            success: true,
        },
        later,
    );
    let out = l.step(Input::Released { task: id("B") }, later);
    assert!(out.contains(&Output::Exit(1)), "{out:?}");
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Fatal(w) if w.contains("GONE.*"))),
        "{out:?}"
    );
}

#[test]
fn a_new_task_heard_with_its_blockers_is_taken_from_the_event_without_a_read() {
    // Issue 18: every agent read every task anyone created (`get@etcd=21000` in a soak).
    let now = Instant::now();
    let mut p = plan(&["N.*"]);
    p.until_done = false;
    let mut l = ClaimLoop::new(p);
    l.step(
        Input::Snapshot(vec![task("N.0", TaskStatus::Complete, &[])]),
        now,
    );
    let heard = |task: &str, status, blocked_by: &[&str]| Input::Changed {
        task: id(task),
        status: Some(status),
        holder: None,
        blocked_by: Some(blocked_by.iter().map(|b| id(b)).collect()),
    };
    let out = l.step(heard("N.1", TaskStatus::Blocked, &["N.0"]), now);
    assert!(
        !out.iter().any(|o| matches!(o, Output::Fetch(_))),
        "{out:?}"
    );
    assert_eq!(claims(&out), ["N.1"], "its blocker N.0 is complete");
    // A blocker the view does not know is read; a task that is neither of the list nor a
    // blocker of one is not kept at all.
    let out = l.step(heard("N.2", TaskStatus::Blocked, &["X"]), now);
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, Output::Fetch(_)))
            .collect::<Vec<_>>(),
        [&Output::Fetch(id("X"))]
    );
    l.step(heard("Y", TaskStatus::Available, &[]), now);
    assert!(l.view.get(&id("Y")).is_none());
    assert!(l.view.get(&id("N.2")).is_some());
}

#[test]
fn an_idle_session_on_a_busy_board_works_out_why_it_waits_at_most_every_so_often() {
    // Issue 18: an idle agent spun at 100 % CPU on a board of 24,000 tasks, working out at
    // every event why it had nothing to claim. It says a change within the interval then.
    let now = Instant::now();
    let mut p = plan(&["T.*"]);
    p.until_done = false;
    let mut l = ClaimLoop::new(p);
    let held = |n: u32, by: &str| {
        let mut t = task(&format!("T.{n}"), TaskStatus::Claimed, &[]);
        t.claimed_by = Some(sid(by));
        t
    };
    let out = l.step(Input::Snapshot((0..5).map(|n| held(n, "a")).collect()), now);
    let said = |out: &[Output]| {
        out.iter()
            .filter(|o| matches!(o, Output::Note(n) if n.starts_with("nothing to claim")))
            .count()
    };
    assert_eq!(said(&out), 1);
    let later = now + Duration::from_secs(1);
    let out = l.step(changed("T.3", TaskStatus::Claimed, Some("b")), later);
    assert_eq!(said(&out), 0, "{out:?}");
    assert!(out.contains(&Output::WakeAt(now + WAITING_SAID_EVERY)));
    let out = l.step(Input::Tick, now + WAITING_SAID_EVERY);
    assert_eq!(
        said(&out),
        1,
        "the change is said when the interval is over"
    );
}

#[test]
fn an_exact_id_no_list_holds_is_read_and_an_archived_one_counts_done() {
    // Tester helper-10: a list naming an archived task by id exited 1 under --until-done.
    let now = Instant::now();
    let mut l = ClaimLoop::new(plan(&["Y1"]));
    let out = l.step(Input::Snapshot(Vec::new()), now);
    assert!(out.contains(&Output::Fetch(id("Y1"))), "{out:?}");
    let out = l.step(
        Input::Fetched(task("Y1", TaskStatus::Complete, &[])),
        now + UNMATCHED_GRACE + Duration::from_millis(1),
    );
    assert!(out.contains(&Output::Exit(0)), "{out:?}");
}

#[test]
fn a_glob_whose_tasks_all_left_the_store_is_done_and_one_that_never_matched_is_not() {
    // Tester helper-10: `ifc archive` emptied a running agent's glob, which then exited 1.
    let now = Instant::now();
    let later = now + UNMATCHED_GRACE + Duration::from_millis(1);
    let mut l = ClaimLoop::new(plan(&["W.0.*", "W.1.*"]));
    l.step(
        Input::Snapshot(vec![
            task("W.0.1", TaskStatus::Complete, &[]),
            task("W.1.1", TaskStatus::Blocked, &["X"]),
            task("X", TaskStatus::Available, &[]),
        ]),
        now,
    );
    let out = l.step(
        Input::Changed {
            task: id("W.0.1"),
            status: None,
            holder: None,
            blocked_by: None,
        },
        now,
    );
    assert!(!out.iter().any(|o| matches!(o, Output::Warn(_))), "{out:?}");
    let out = l.step(Input::Tick, later);
    assert!(!out.contains(&Output::Exit(1)), "{out:?}");
    let out = l.step(changed("X", TaskStatus::Complete, None), later);
    assert_eq!(claims(&out), ["W.1.1"], "{out:?}");
    // A glob that never matched anything is still a list that can never be done.
    let mut typo = ClaimLoop::new(plan(&["Q.*"]));
    typo.step(Input::Snapshot(Vec::new()), now);
    let out = typo.step(Input::Tick, later);
    assert!(out.contains(&Output::Exit(1)), "{out:?}");
}
