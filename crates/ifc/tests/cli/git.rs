//! `ifc --mode git`: the same commands, output and exit codes against a git task board.

use std::process::{Command, Stdio};

use backend_git::testing::BareRemote;
use serde_json::Value;

use crate::{code, run, text};

const FIXTURE: &str = include_str!("../../../backend-git/tests/fixtures/PHASE-0-TASK-BOARD.md");

/// `ifc --mode git` on `remote`, run in `cwd` (clones go under its `.ifc/git/`).
fn ifc_git(remote: &BareRemote, cwd: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ifc"));
    cmd.current_dir(cwd)
        .env("IFC_MODE", "git")
        .env("IFC_GIT_REMOTE", remote.path())
        .env("IFC_POLL_INTERVAL", "200ms")
        .env_remove("RUST_LOG");
    cmd
}

fn workspace() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn status_lists_the_board_as_json() {
    let (remote, cwd) = (BareRemote::new(FIXTURE), workspace());
    let out = run(ifc_git(&remote, cwd.path()).args(["status", "--output", "json"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let tasks: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json array");
    assert_eq!(tasks.len(), 54);
    let t = tasks
        .iter()
        .find(|t| t["task_id"] == "P0.1.6")
        .expect("task");
    assert_eq!(
        (t["status"].as_str(), t["claimed_by"].as_str()),
        (Some("claimed"), Some("session-1-ndi"))
    );
    let t = tasks
        .iter()
        .find(|t| t["task_id"] == "P0.2.2")
        .expect("task");
    assert_eq!(t["blocked_by"], serde_json::json!(["P0.2.1", "P0.1.1"]));
    assert_eq!(t["title"], "Release with ownership check");
    assert!(
        cwd.path().join(".ifc/git/ifc-cli/.git").exists(),
        "a dedicated clone under .ifc/git/"
    );
}

#[test]
fn claim_and_complete_edit_only_the_row_and_write_the_status_file() {
    let (remote, cwd) = (BareRemote::new(FIXTURE), workspace());
    let out =
        run(ifc_git(&remote, cwd.path()).args(["claim", "P0.2.6", "--session", "session-4-sip"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("claimed P0.2.6 for session-4-sip (fencing token "),
        "{}",
        text(&out.stdout)
    );
    let out =
        run(ifc_git(&remote, cwd.path()).args(["claim", "P0.2.6", "--session", "session-5-x"]));
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (1, "lost P0.2.6: held by session-4-sip\n".to_owned())
    );
    let out = run(ifc_git(&remote, cwd.path()).args([
        "release",
        "P0.2.6",
        "--session",
        "session-4-sip",
        "--status",
        "complete",
    ]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let board = remote.read("docs/PHASE-0-TASK-BOARD.md").expect("board");
    let changed = backend_git::testing::changed_lines(FIXTURE, &board);
    assert_eq!(
        changed,
        vec![(
            "| P0.2.6 | Claim latency metrics | 🔵 AVAILABLE |  |  |",
            "| P0.2.6 | Claim latency metrics | ✅ DONE | session-4-sip |  |"
        )]
    );
    let status = remote.read("STATUS-SESSION-4.yaml").expect("STATUS file");
    assert!(
        status.contains("session_id: session-4-sip") && status.contains("backend: git"),
        "{status}"
    );
    let out =
        run(ifc_git(&remote, cwd.path()).args(["claim", "P0.2.7", "--session", "session-4-sip"]));
    assert_eq!(
        code(&out),
        0,
        "its blocker is done now: {}",
        text(&out.stdout)
    );
}

#[test]
fn two_processes_claiming_one_task_have_one_winner() {
    let mut board =
        String::from("| ID | Task | Status | Owner | Blocked by |\n|---|---|---|---|---|\n");
    for i in 0..5 {
        board.push_str(&format!("| T.{i} | t | 🔵 AVAILABLE |  |  |\n"));
    }
    let (remote, cwd) = (BareRemote::new(&board), workspace());
    for i in 0..5 {
        let task = format!("T.{i}");
        let spawn = |s: &str| {
            ifc_git(&remote, cwd.path())
                .args(["claim", &task, "--session", s])
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        let (a, b) = (spawn("session-1"), spawn("session-2"));
        let mut codes = [
            code(&a.wait_with_output().expect("a")),
            code(&b.wait_with_output().expect("b")),
        ];
        codes.sort();
        assert_eq!(codes, [0, 1], "round {i}");
    }
}

#[test]
fn bad_boards_and_settings_are_usage_errors_and_a_missing_remote_is_infrastructure() {
    let cwd = workspace();
    let bad = BareRemote::new("| ID | Task | Status | Owner |\n|---|---|---|---|\n| A | t | 🔵 AVAILABLE |  |\n| B | t | ⚫ GONE |  |\n");
    let out = run(ifc_git(&bad, cwd.path()).args(["status"]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(
        text(&out.stderr).contains("docs/PHASE-0-TASK-BOARD.md:4: unknown status"),
        "{}",
        text(&out.stderr)
    );

    let ok = BareRemote::new(FIXTURE);
    let out =
        run(ifc_git(&ok, cwd.path()).args(["claim", "P0.2.6", "--session", "s1", "--ttl", "5"]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(text(&out.stderr).contains("--ttl is for coordinator mode"));

    let out = run(ifc_git(&ok, cwd.path())
        .env_remove("IFC_GIT_REMOTE")
        .args(["status"]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(text(&out.stderr).contains("--git-remote"));

    let missing = cwd.path().join("no-such-repo.git");
    let out = run(ifc_git(&ok, cwd.path())
        .env("IFC_GIT_REMOTE", &missing)
        .args(["--git-workdir", "w", "status"]));
    assert_eq!(code(&out), 3, "{out:?}");
    assert!(
        text(&out.stderr).contains(&missing.display().to_string()),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_cli_claim_in_git_mode_holds_until_released() {
    // Seed 1000000010: a CLI claim read as stale 2 s later (nothing heartbeats it once the
    // command exits); its release was refused and the task stayed held for nobody.
    let (remote, cwd) = (BareRemote::new(FIXTURE), workspace());
    let claim = |session: &str| {
        run(ifc_git(&remote, cwd.path()).args([
            "--stale-after",
            "1s",
            "claim",
            "P0.2.6",
            "--session",
            session,
        ]))
    };
    let out = claim("session-4-sip");
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let out = claim("session-5-other");
    assert_eq!(
        code(&out),
        1,
        "held past --stale-after: {}",
        text(&out.stdout)
    );
    let out = run(ifc_git(&remote, cwd.path()).args([
        "--stale-after",
        "1s",
        "release",
        "P0.2.6",
        "--session",
        "session-4-sip",
        "--status",
        "complete",
    ]));
    assert_eq!(code(&out), 0, "{}{}", text(&out.stdout), text(&out.stderr));
}

#[test]
fn a_mistyped_remote_does_not_spoil_the_directory_for_the_right_one() {
    // The tester's report: after `--git-remote nope.git status` (exit 3), every command with
    // the right remote in that directory failed: ".ifc/git/ifc-cli is a clone of nope.git".
    let (remote, cwd) = (BareRemote::new(FIXTURE), workspace());
    let wrong = remote.path().with_file_name("nope.git");
    let out = run(ifc_git(&remote, cwd.path())
        .env("IFC_GIT_REMOTE", &wrong)
        .arg("status"));
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    let out = run(ifc_git(&remote, cwd.path()).arg("status"));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("P0.2.6"),
        "{}",
        text(&out.stdout)
    );
    // Issue 16: a second coordination repo used from the same directory was refused (".ifc/
    // git/ifc-cli is a clone of X, not of Y"); the default clone follows the remote now, and
    // each repo keeps its own.
    let other = BareRemote::new(FIXTURE);
    let out = run(ifc_git(&other, cwd.path()).args(["claim", "P0.2.6", "--session", "s-other"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let holder = |r: &BareRemote| {
        let out = run(ifc_git(r, cwd.path()).args(["get", "P0.2.6", "-o", "json"]));
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["claimed_by"].as_str().map(str::to_owned)
    };
    assert_eq!(holder(&other).as_deref(), Some("s-other"));
    assert_eq!(holder(&remote), None, "the first repo is its own");
    // A clone named with --git-workdir is what was asked for: another remote's is refused,
    // saying what to do.
    let out = run(ifc_git(&other, cwd.path())
        .args(["--git-workdir", ".ifc/git/ifc-cli"])
        .arg("status"));
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("delete that directory"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_relative_remote_that_is_not_there_is_named_with_where_it_was_looked_for() {
    // Tester helper-2: `git.remote: ../coord.git` from the example fleet file; the error never
    // said the path is relative to where ifc runs.
    let (remote, cwd) = (BareRemote::new(FIXTURE), workspace());
    let out = run(ifc_git(&remote, cwd.path())
        .env("IFC_GIT_REMOTE", "../nope.git")
        .arg("status"));
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    let there = cwd.path().join("../nope.git");
    let there = std::path::absolute(&there).expect("absolute");
    assert!(
        text(&out.stderr).contains(&format!(
            "no git repository at ../nope.git ({})",
            there.display()
        )),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn one_local_remote_spelled_three_ways_is_one_remote() {
    // The tester's report: `--git-remote /x/coord.git` after `--git-remote ../coord.git` (or
    // with a trailing slash, or as file://) in one directory was refused as another remote.
    let (remote, cwd) = (BareRemote::new(FIXTURE), workspace());
    let path = remote.path().display().to_string();
    for spelling in [path.clone(), format!("{path}/"), format!("file://{path}")] {
        let out = run(ifc_git(&remote, cwd.path())
            .env("IFC_GIT_REMOTE", &spelling)
            .arg("status"));
        assert_eq!(code(&out), 0, "{spelling}: {}", text(&out.stderr));
    }
}
