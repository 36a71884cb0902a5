//! People editing the git board while agents run (issue 14): a person's mistake, pushed from
//! another clone, costs no claim, no finished run and no progress.

use std::path::Path;
use std::time::Duration;

use backend_git::testing::BareRemote;

use crate::agent::{finish, ifc, spawn_agent, wait_for, Agent, Workdir};

const BOARD_PATH: &str = "docs/PHASE-0-TASK-BOARD.md";

/// Each run notes its start in `$MARKS/starts`, takes a while, then appends its id to `$SHARED`.
const SLOW: &str =
    r#"echo "$IFC_TASK_ID" >> "$MARKS/starts"; sleep 2; echo "$IFC_TASK_ID" >> "$SHARED""#;

fn board(ids: &[&str]) -> String {
    let rows: String = ids
        .iter()
        .map(|id| format!("| {id} | task {id} | 🔵 AVAILABLE |  |\n"))
        .collect();
    format!("# Board\n\n| ID | Task | Status | Owner |\n|---|---|---|---|\n{rows}")
}

/// A git-mode agent for `session` on `list`, logging to `log`.
fn git_agent(remote: &BareRemote, w: &Workdir, session: &str, list: &[&str], log: &Path) -> Agent {
    let config = w.session(session, list, SLOW, "");
    let mut cmd = ifc("http://127.0.0.1:1", w.path());
    cmd.env("IFC_MODE", "git")
        .env("IFC_GIT_REMOTE", remote.path())
        .env("IFC_POLL_INTERVAL", "200ms")
        .args(["--stale-after", "2s"]);
    spawn_agent(cmd, &config, log, &["--until-done"])
}

fn lines(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[test]
fn a_board_that_stops_parsing_while_a_task_runs_costs_neither_the_claim_nor_the_run() {
    // Issue 14 #1: a row with an unknown status made every push fail, heartbeats included; the
    // agent lost the claim of a task that had exited 0, and the task ran again.
    let (remote, w) = (BareRemote::new(&board(&["H1", "H2"])), Workdir::new());
    let log = w.path().join("agent.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let starts = w.path().join("starts");
    let mut agent = git_agent(&remote, &w, "session-1", &["H*"], &log);
    wait_for("the first task to start", Duration::from_secs(60), || {
        !lines(&starts).is_empty()
    });
    remote.edit(BOARD_PATH, "person: a row with a typo", |b| {
        format!("{b}| H9 | typo | 🟣 MAYBE |  |\n")
    });
    wait_for("the first run to end", Duration::from_secs(60), || {
        !w.done().is_empty()
    });
    // Well past --stale-after (2 s): a claim kept alive by heartbeats through the board would
    // have been lost and its task run again by now.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(lines(&starts).len(), 1, "one run so far:\n{}", read());
    assert!(!read().contains("claim lost"), "{}", read());
    let problem = format!("{BOARD_PATH}:7: unknown status");
    let told = read().matches(&problem).count();
    assert!(
        (1..=3).contains(&told),
        "the problem is named, once per change and not once a second ({told} times):\n{}",
        read()
    );
    remote.edit(BOARD_PATH, "person: fix the typo", |b| {
        b.replace("| H9 | typo | 🟣 MAYBE |  |\n", "")
    });
    assert_eq!(finish(&mut agent, Duration::from_secs(90)), 0, "{}", read());
    assert_eq!(w.done(), ["H1", "H2"], "{}", read());
    assert_eq!(
        lines(&starts),
        ["H1", "H2"],
        "each task ran once:\n{}",
        read()
    );
    let text = remote.read(BOARD_PATH).expect("board");
    assert_eq!(text.matches("✅ DONE").count(), 2, "{text}");
    assert_eq!(text.matches("session-1").count(), 2, "{text}");
}

#[test]
fn an_until_done_agent_whose_task_is_deleted_from_the_board_says_so_and_exits_1() {
    // Issue 14 #4: its task was stopped (right), then the agent idled forever with no message.
    let (remote, w) = (BareRemote::new(&board(&["D1", "D2"])), Workdir::new());
    let log = w.path().join("agent.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut agent = git_agent(&remote, &w, "session-1", &["D1", "D2"], &log);
    wait_for("D1 to be done", Duration::from_secs(60), || {
        w.done().contains(&"D1".to_owned())
    });
    remote.edit(BOARD_PATH, "person: D2 is not needed after all", |b| {
        b.lines()
            .filter(|l| !l.starts_with("| D2 "))
            .map(|l| format!("{l}\n"))
            .collect()
    });
    assert_eq!(finish(&mut agent, Duration::from_secs(60)), 1, "{}", read());
    assert!(
        read().contains("D2 of the session's list is no task of the store"),
        "{}",
        read()
    );
}
