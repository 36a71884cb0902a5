//! `ifc migrate`, `verify` and `export`: the board into etcd and back, idempotent, never
//! backwards, byte-identical round trip.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use backend_etcd::testing::EtcdServer;

use crate::{code, run, text};

const FIXTURE: &str = include_str!("../../../backend-git/tests/fixtures/PHASE-0-TASK-BOARD.md");

fn ifc(server: &EtcdServer, cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ifc"));
    cmd.current_dir(cwd)
        .env("IFC_ENDPOINTS", server.endpoint())
        .env_remove("IFC_PREFIX")
        .env_remove("IFC_MODE")
        .env_remove("IFC_BOARD");
    cmd
}

fn setup() -> (EtcdServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("board.md"), FIXTURE).expect("board");
    (EtcdServer::start(), dir)
}

#[test]
fn migrate_is_idempotent_verify_agrees_and_export_gives_back_the_same_bytes() {
    let (etcd, dir) = setup();
    let d = dir.path();
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "board.md", "--dry-run"]));
    let said = text(&out.stdout);
    // Issue 16: a dry run only counted; it names each task it would write now.
    assert_eq!(
        said.lines().last(),
        Some("54 would be created, 0 would be updated, 0 unchanged, 0 kept"),
        "{said}"
    );
    assert_eq!(
        said.lines()
            .filter(|l| l.starts_with("would create "))
            .count(),
        54,
        "{said}"
    );
    assert!(
        said.lines().any(|l| l == "would create P0.1.1 (complete)"),
        "{said}"
    );
    assert_eq!(
        text(&run(ifc(&etcd, d).args(["status", "-o", "json"])).stdout).trim(),
        "[]",
        "a dry run writes nothing"
    );
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "board.md"]));
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (0, "54 created, 0 updated, 0 unchanged, 0 kept\n".to_owned())
    );
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "board.md"]));
    assert_eq!(
        text(&out.stdout),
        "0 created, 0 updated, 54 unchanged, 0 kept\n"
    );
    let out = run(ifc(&etcd, d).args(["verify", "--board", "board.md"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stdout));
    std::fs::copy(d.join("board.md"), d.join("copy.md")).expect("copy");
    let out = run(ifc(&etcd, d).args(["export", "--board", "copy.md"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(d.join("copy.md")).expect("read"),
        FIXTURE,
        "byte for byte"
    );
}

#[test]
fn migrate_never_moves_a_task_backwards_unless_forced_and_verify_says_where_they_differ() {
    let (etcd, dir) = setup();
    let d = dir.path();
    assert_eq!(
        code(&run(ifc(&etcd, d).args(["migrate", "--board", "board.md"]))),
        0
    );
    assert_eq!(
        code(&run(ifc(&etcd, d).args([
            "claim",
            "P0.2.6",
            "--session",
            "s9"
        ]))),
        0
    );
    assert_eq!(
        code(&run(ifc(&etcd, d).args([
            "release",
            "P0.2.6",
            "--session",
            "s9",
            "--status",
            "complete"
        ]))),
        0
    );
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "board.md"]));
    assert!(
        text(&out.stdout).contains("kept P0.2.6: etcd says complete, the board available"),
        "{}",
        text(&out.stdout)
    );
    let out = run(ifc(&etcd, d).args(["verify", "--board", "board.md", "-o", "json"]));
    assert_eq!(code(&out), 1);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["mismatched"][0]["task_id"], "P0.2.6");
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "board.md", "--force"]));
    assert!(
        text(&out.stdout).starts_with("0 created, 1 updated"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        code(&run(ifc(&etcd, d).args(["verify", "--board", "board.md"]))),
        0
    );
}

#[test]
fn an_in_progress_row_becomes_a_claim_its_owner_adopts() {
    let (etcd, dir) = setup();
    let d = dir.path();
    assert_eq!(
        code(&run(ifc(&etcd, d).args(["migrate", "--board", "board.md"]))),
        0
    );
    let out = run(ifc(&etcd, d).args(["claim", "P0.1.6", "--session", "session-2-webrtc"]));
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (1, "lost P0.1.6: held by session-1-ndi\n".to_owned())
    );
    let out = run(ifc(&etcd, d).args(["claim", "P0.1.6", "--session", "session-1-ndi"]));
    assert_eq!(code(&out), 0, "the owner adopts it: {}", text(&out.stdout));
}

#[test]
fn a_bad_board_writes_nothing_and_exits_2_with_file_and_line() {
    let (etcd, dir) = setup();
    let d = dir.path();
    let bad = FIXTURE.replace(
        "| P0.3.1 | Session config loader | 🔵 AVAILABLE |",
        "| P0.3.1 | Session config loader | 🟣 SOMEDAY |",
    );
    std::fs::write(d.join("bad.md"), bad).expect("write");
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "bad.md"]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(
        text(&out.stderr).contains("bad.md:24: unknown status"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        text(&run(ifc(&etcd, d).args(["status", "-o", "json"])).stdout).trim(),
        "[]"
    );
    let out = run(ifc(&etcd, d).args(["--mode", "git", "migrate", "--board", "board.md"]));
    assert_eq!(code(&out), 2, "no git mode: {out:?}");
}

#[test]
fn migrate_from_git_and_export_push_work_on_the_coordination_repo() {
    let (etcd, dir) = setup();
    let d = dir.path();
    let remote = backend_git::testing::BareRemote::new(FIXTURE);
    let git = |cmd: &mut Command| {
        cmd.env("IFC_GIT_REMOTE", remote.path());
    };
    let mut cmd = ifc(&etcd, d);
    git(&mut cmd);
    let out = run(cmd.args(["migrate", "--from-git"]));
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (0, "54 created, 0 updated, 0 unchanged, 0 kept\n".to_owned()),
        "{}",
        text(&out.stderr)
    );
    let mut cmd = ifc(&etcd, d);
    git(&mut cmd);
    assert_eq!(code(&run(cmd.args(["verify", "--from-git"]))), 0);
    // Unchanged state: nothing to push, the board's bytes stay.
    let mut cmd = ifc(&etcd, d);
    git(&mut cmd);
    let out = run(cmd.args(["export", "--push", "-o", "json"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(
        remote.read("docs/PHASE-0-TASK-BOARD.md").as_deref(),
        Some(FIXTURE)
    );
    // A completion in etcd reaches the repo's board, and only its row changes.
    for args in [
        ["claim", "P0.2.6", "--session", "session-9"].as_slice(),
        [
            "release",
            "P0.2.6",
            "--session",
            "session-9",
            "--status",
            "complete",
        ]
        .as_slice(),
    ] {
        assert_eq!(code(&run(ifc(&etcd, d).args(args))), 0);
    }
    let mut cmd = ifc(&etcd, d);
    git(&mut cmd);
    let out = run(cmd.args(["export", "--push"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let after = remote.read("docs/PHASE-0-TASK-BOARD.md").expect("board");
    let changed = backend_git::testing::changed_lines(FIXTURE, &after);
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(
        changed[0].1.contains("P0.2.6") && changed[0].1.contains("DONE"),
        "{changed:?}"
    );
}

#[test]
fn a_dry_run_names_each_field_it_would_change_and_a_file_without_a_task_table_is_refused() {
    let (etcd, dir) = setup();
    let d = dir.path();
    assert_eq!(
        code(&run(ifc(&etcd, d).args(["migrate", "--board", "board.md"]))),
        0
    );
    // A person retitles a row.
    let edited = FIXTURE.replacen("Health probe endpoint", "Health probe endpoints", 1);
    assert_ne!(edited, FIXTURE, "the fixture has that title");
    std::fs::write(d.join("edited.md"), &edited).expect("write");
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "edited.md", "--dry-run"]));
    let said = text(&out.stdout);
    assert_eq!(code(&out), 0, "{said}");
    assert!(
        said.lines().any(|l| l.starts_with("would update ")
            && l.contains("title \"Health probe endpoint\" → \"Health probe endpoints\"")),
        "{said}"
    );
    let out =
        run(ifc(&etcd, d).args(["migrate", "--board", "edited.md", "--dry-run", "-o", "json"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let changes = v["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 1, "{v}");
    assert_eq!(changes[0]["action"], "update", "{v}");
    assert_eq!(changes[0]["fields"][0]["field"], "title", "{v}");

    // Issue 16: a file with no task table "migrated" 0 tasks with exit 0.
    std::fs::write(d.join("notes.md"), "# Notes\n\nNo table here.\n").expect("write");
    for command in ["migrate", "verify"] {
        let out = run(ifc(&etcd, d).args([command, "--board", "notes.md"]));
        assert_eq!(code(&out), 2, "{command}: {out:?}");
        assert!(
            text(&out.stderr).contains("notes.md: no task table"),
            "{command}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn migrate_says_which_blocker_is_nowhere_and_every_row_it_cannot_take() {
    // Tester helper-2: a missing blocker migrated without a word (put refuses one, agents
    // report it); the rows migrate cannot take were said one per run.
    let (etcd, dir) = setup();
    let d = dir.path();
    let head = "| ID | Task | Status | Owner | Blocked by |\n|---|---|---|---|---|\n";
    std::fs::write(
        d.join("w.md"),
        format!("{head}| W1 | a | 🔵 AVAILABLE |  |  |\n| W3 | c | 🔴 BLOCKED |  | W99 |\n"),
    )
    .expect("board");
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "w.md"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr)
            .contains("w.md:4: W3 is blocked by W99, which is neither on the board nor in etcd"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(
        d.join("c.md"),
        format!("{head}| C1 | a | 🔴 BLOCKED |  | C2 |\n| C2 | b | 🔴 BLOCKED |  | C1 |\n| C3 | c | 🔴 BLOCKED |  | C1 |\n"),
    )
    .expect("board");
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "c.md"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let warned = text(&out.stderr);
    assert_eq!(
        warned.matches("a cycle of blockers").count(),
        1,
        "once per cycle: {warned}"
    );
    assert!(
        warned.contains("C1 → C2 → C1") || warned.contains("C2 → C1 → C2"),
        "{warned}"
    );
    std::fs::write(
        d.join("x.md"),
        format!("{head}| X1 | a | 🟡 IN PROGRESS |  |  |\n| X2 | b | 🟡 IN PROGRESS |  |  |\n"),
    )
    .expect("board");
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "x.md"]));
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("x.md:3: X1 is IN PROGRESS but names no owner")
            && err.contains("x.md:4: X2 is IN PROGRESS but names no owner"),
        "{err}"
    );
    // Tester helper-3: with a syntax error on the board too, the owner-less row was said only
    // once the syntax was fixed. Both now, in file order.
    std::fs::write(
        d.join("y.md"),
        format!("{head}| Y1 | a | 🟣 MAYBE |  |  |\n| Y2 | b | 🟡 IN PROGRESS |  |  |\n"),
    )
    .expect("board");
    let out = run(ifc(&etcd, d).args(["migrate", "--board", "y.md"]));
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let at = |what: &str| {
        err.find(what)
            .unwrap_or_else(|| panic!("{what} missing: {err}"))
    };
    assert!(at("y.md:3: unknown status") < at("y.md:4: Y2 is IN PROGRESS but names no owner"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_rides_out_a_short_outage_of_its_store() {
    // A read timed out on a loaded machine ended a migration of thousands of tasks.
    let (etcd, dir) = setup();
    let proxy = backend_etcd::testing::TcpProxy::start(etcd.addr()).await;
    let mut board = String::from(
        "# Board\n\n| ID | Task | Status | Owner | Blocked by |\n|----|------|--------|-------|------------|\n",
    );
    for i in 0..400 {
        board.push_str(&format!("| M.{i:03} | task {i} | 🔵 AVAILABLE |  |  |\n"));
    }
    std::fs::write(dir.path().join("big.md"), board).expect("board");
    let mut migrate = ifc(&etcd, dir.path());
    migrate
        .env("IFC_ENDPOINTS", proxy.endpoint())
        .args(["migrate", "--board", "big.md"]);
    let child = migrate
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Cut the store off once the migration is under way, for a moment.
    let (path, e) = (dir.path().to_owned(), etcd.endpoint());
    tokio::task::spawn_blocking(move || {
        crate::agent::wait_for("the migration to start", Duration::from_secs(30), || {
            let get = run(Command::new(env!("CARGO_BIN_EXE_ifc"))
                .current_dir(&path)
                .env("IFC_ENDPOINTS", &e)
                .args(["get", "M.020"]));
            code(&get) == 0
        })
    })
    .await
    .expect("wait");
    let cut_at = std::time::Instant::now();
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    eprintln!(
        "the migration ended {:?} after the cut:\n{}",
        cut_at.elapsed(),
        text(&out.stderr)
    );
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let status = run(ifc(&etcd, dir.path()).args(["status", "--output", "json"]));
    let tasks: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(tasks.as_array().map(Vec::len), Some(400));
}

#[test]
fn a_row_with_more_blockers_than_a_claim_can_compare_is_refused_before_anything_is_written() {
    // Tester helper-10: the rows before it were written, then migrate stopped at it.
    let (etcd, dir) = setup();
    let blockers: Vec<String> = (0..101).map(|i| format!("M.B{i}")).collect();
    let mut board = String::from(
        "# Board\n\n| ID | Task | Status | Owner | Blocked by |\n|----|------|--------|-------|------------|\n",
    );
    for b in &blockers {
        board.push_str(&format!("| {b} | blocker | ✅ DONE | s |  |\n"));
    }
    board.push_str(&format!(
        "| M.big | too many | 🔵 AVAILABLE |  | {} |\n",
        blockers.join(", ")
    ));
    std::fs::write(dir.path().join("big.md"), board).expect("board");
    let out = run(ifc(&etcd, dir.path()).args(["migrate", "--board", "big.md"]));
    assert_eq!(code(&out), 2, "{out:?}");
    let said = text(&out.stderr);
    assert!(
        said.contains("big.md:106") && said.contains("101 blockers"),
        "{said}"
    );
    let status = run(ifc(&etcd, dir.path()).args(["status", "--output", "json"]));
    assert_eq!(text(&status.stdout).trim(), "[]", "nothing written");
}
