//! No task twice across processes of one session id: two agents started with one session file,
//! a CLI claim for a session whose agent runs the task, and git-mode CLI claims of one session
//! from several commands. Real processes, real etcd, real git remotes.

use std::time::Duration;

use backend_etcd::testing::EtcdServer;
use backend_git::testing::BareRemote;

use crate::agent::{finish, ifc, put, spawn_agent, status_of, wait_for, Workdir};
use crate::{code, run, text};

/// Each run appends its task id to the shared file when it starts and again when it ends: two
/// runs of a task show as four lines.
const SLOW_APPEND: &str = r#"echo "$IFC_TASK_ID" >> "$SHARED"; sleep 1"#;

#[test]
fn two_agents_with_one_session_file_run_each_task_once_and_the_second_names_the_first() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    one_session_file_twice(&etcd.endpoint(), &w);
}

/// Two agents started with one session file on the store at `e`: the second refuses, naming
/// the first, which runs each task once.
pub(crate) fn one_session_file_twice(e: &str, w: &Workdir) {
    for t in ["A", "B", "C"] {
        put(e, w.path(), &[t]);
    }
    let config = w.session("session-1-x", &["A", "B", "C"], SLOW_APPEND, "");
    let history = w.path().join("history.jsonl");
    let h = history.to_string_lossy().into_owned();
    let mut first = spawn_agent(
        ifc(e, w.path()),
        &config,
        &w.path().join("first.log"),
        &["--until-done", "--history", &h],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut second = spawn_agent(
        ifc(e, w.path()),
        &config,
        &w.path().join("second.log"),
        &["--until-done", "--history", &h],
    );
    let second_code = finish(&mut second, Duration::from_secs(60));
    let second_log = std::fs::read_to_string(w.path().join("second.log")).unwrap_or_default();
    assert_eq!(
        second_code, 5,
        "the second copy refuses to start:\n{second_log}"
    );
    let pid = first.id().to_string();
    assert!(
        second_log.contains("session-1-x") && second_log.contains(&format!("pid {pid}")),
        "the refusal names the first process (pid {pid}):\n{second_log}"
    );
    let first_code = finish(&mut first, Duration::from_secs(60));
    let first_log = std::fs::read_to_string(w.path().join("first.log")).unwrap_or_default();
    assert_eq!(first_code, 0, "{first_log}");
    assert_eq!(w.done(), ["A", "B", "C"], "each task ran exactly once");
    let out = run(ifc(e, w.path()).args(["check-history", &h]));
    assert_eq!(code(&out), 0, "{}", text(&out.stdout));
}

#[test]
fn a_cli_claim_for_a_session_whose_agent_runs_the_task_does_not_take_it() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    a_cli_claim_leaves_the_agents_run(&etcd.endpoint(), &w);
}

/// A CLI claim (with and without `--ttl`) for a session whose agent runs the task, on the
/// store at `e`: refused, naming another process; the agent's run goes on and counts once.
pub(crate) fn a_cli_claim_leaves_the_agents_run(e: &str, w: &Workdir) {
    put(e, w.path(), &["A"]);
    let marker = w.path().join("A.started");
    let script = format!(
        r#"echo "$IFC_TASK_ID" >> "$SHARED"; touch {:?}; sleep 3"#,
        marker.display().to_string()
    );
    let config = w.session("session-1-x", &["A"], &script, "");
    let mut agent = spawn_agent(
        ifc(e, w.path()),
        &config,
        &w.path().join("agent.log"),
        &["--until-done"],
    );
    wait_for("the task to start", Duration::from_secs(30), || {
        marker.exists()
    });
    for extra in [&[][..], &["--ttl", "10"][..]] {
        let out = run(ifc(e, w.path())
            .args(["claim", "A", "--session", "session-1-x"])
            .args(extra));
        assert_eq!(code(&out), 1, "{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            text(&out.stdout).contains("another process"),
            "{}",
            text(&out.stdout)
        );
    }
    let code_agent = finish(&mut agent, Duration::from_secs(60));
    let log = std::fs::read_to_string(w.path().join("agent.log")).unwrap_or_default();
    assert_eq!(code_agent, 0, "{log}");
    assert_eq!(
        w.done(),
        ["A"],
        "the agent's run was neither killed nor repeated"
    );
    assert_eq!(status_of(e, w.path(), "A"), "complete");
}

fn ifc_git(remote: &BareRemote, cwd: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ifc"));
    cmd.current_dir(cwd)
        .env("IFC_MODE", "git")
        .env("IFC_GIT_REMOTE", remote.path())
        .env_remove("RUST_LOG");
    cmd
}

const BOARD: &str = "| ID | Task | Status | Owner |\n|---|---|---|---|\n| A | a | 🔵 AVAILABLE |  |\n| B | b | 🔵 AVAILABLE |  |\n";

#[test]
fn git_cli_claims_of_one_session_keep_each_other_from_one_directory_or_two() {
    for dirs in [1, 2] {
        let remote = BareRemote::new(BOARD);
        let (one, two) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let second_dir = if dirs == 1 { one.path() } else { two.path() };
        let out =
            run(ifc_git(&remote, one.path()).args(["claim", "A", "--session", "session-1-x"]));
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
        let out =
            run(ifc_git(&remote, second_dir).args(["claim", "B", "--session", "session-1-x"]));
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
        // A is still held by session-1-x: another session cannot take it.
        let out =
            run(ifc_git(&remote, two.path()).args(["claim", "A", "--session", "session-2-y"]));
        assert_eq!(
            code(&out),
            1,
            "{dirs} dir(s): {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains("session-1-x"),
            "{}",
            text(&out.stdout)
        );
    }
}

#[test]
fn a_take_over_stops_the_running_agent_which_finishes_its_task_and_claims_nothing_more() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    a_take_over_lets_the_running_task_finish_once(&etcd.endpoint(), &w);
}

/// An agent taken over (`--take-over`) on the store at `e` while it runs A: it finishes A and
/// reports it, starts nothing more and exits 5; the new agent does B and C; each ran once.
pub(crate) fn a_take_over_lets_the_running_task_finish_once(e: &str, w: &Workdir) {
    for t in ["A", "B", "C"] {
        put(e, w.path(), &[t]);
    }
    let marker = w.path().join("A.started");
    // A runs long enough for the take-over to happen during it; B and C are quick.
    let script = format!(
        r#"echo "$IFC_TASK_ID" >> "$SHARED"; if [ "$IFC_TASK_ID" = A ]; then touch {:?}; sleep 3; fi"#,
        marker.display().to_string()
    );
    let config = w.session("session-1-x", &["A", "B", "C"], &script, "");
    let history = w.path().join("history.jsonl");
    let h = history.to_string_lossy().into_owned();
    let mut first = spawn_agent(
        ifc(e, w.path()),
        &config,
        &w.path().join("first.log"),
        &["--until-done", "--history", &h],
    );
    wait_for("A to start", Duration::from_secs(30), || marker.exists());
    let mut second = spawn_agent(
        ifc(e, w.path()),
        &config,
        &w.path().join("second.log"),
        &["--until-done", "--take-over", "--history", &h],
    );
    let first_code = finish(&mut first, Duration::from_secs(60));
    let first_log = std::fs::read_to_string(w.path().join("first.log")).unwrap_or_default();
    assert_eq!(
        first_code, 5,
        "the agent taken over stops with exit 5:\n{first_log}"
    );
    assert_eq!(
        first_log.matches("task started").count(),
        1,
        "after the take-over the first agent starts nothing:\n{first_log}"
    );
    assert!(
        first_log.contains("release task=A"),
        "it finished A and reported it:\n{first_log}"
    );
    let second_code = finish(&mut second, Duration::from_secs(60));
    let second_log = std::fs::read_to_string(w.path().join("second.log")).unwrap_or_default();
    assert_eq!(second_code, 0, "{second_log}");
    for t in ["A", "B", "C"] {
        assert_eq!(status_of(e, w.path(), t), "complete", "{t}");
    }
    assert_eq!(w.done(), ["A", "B", "C"], "each task ran once");
    let out = run(ifc(e, w.path()).args(["check-history", &h]));
    assert_eq!(code(&out), 0, "{}", text(&out.stdout));
}

#[test]
fn a_claim_held_by_a_killed_agent_of_the_session_is_the_sessions_again_at_once() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    a_killed_agents_claim_is_its_sessions_at_once(&etcd.endpoint(), &w);
}

/// The claim of an agent killed with SIGKILL, on the store at `e`, is its session's again at
/// once from a CLI claim on the same host (the long lease is not waited for); not another's.
pub(crate) fn a_killed_agents_claim_is_its_sessions_at_once(e: &str, w: &Workdir) {
    put(e, w.path(), &["A"]);
    let marker = w.path().join("A.started");
    let script = format!(r#"touch {:?}; sleep 30"#, marker.display().to_string());
    // A long lease: without knowing the holder is gone, the claim would last 60 s.
    let config = w.path().join("long-lease.yaml");
    std::fs::write(
        &config,
        format!("session_id: session-1-x\ntasks: [A]\ncommand: [/bin/sh, -c, {script:?}]\nlease_ttl: 60s\n"),
    )
    .expect("session file");
    let mut agent = spawn_agent(ifc(e, w.path()), &config, &w.path().join("agent.log"), &[]);
    wait_for("A to start", Duration::from_secs(30), || marker.exists());
    agent.kill().expect("kill -9");
    agent.wait().expect("reap");
    // Its process is gone from this host: a claim for the session takes the task back now.
    let out = run(ifc(e, w.path()).args(["claim", "A", "--session", "session-1-x"]));
    assert_eq!(code(&out), 0, "{}{}", text(&out.stdout), text(&out.stderr));
    // Another session still cannot.
    let out = run(ifc(e, w.path()).args(["claim", "A", "--session", "session-2-y"]));
    assert_eq!(code(&out), 1, "{}", text(&out.stdout));
}

#[test]
fn a_take_over_in_git_mode_stops_the_running_agent_which_finishes_its_task() {
    // Found by `scripts/chaos --random --seed 5001`: an agent on git never learnt that it was
    // taken over (nothing told it; it only found out when it wrote), and its writes put its
    // presence back, so the new process thought itself taken over.
    let remote = BareRemote::new(
        "| ID | Task | Status | Owner |\n|---|---|---|---|\n| A | a | 🔵 AVAILABLE |  |\n",
    );
    let w = Workdir::new();
    let marker = w.path().join("A.started");
    let script = format!(
        r#"echo "$IFC_TASK_ID" >> "$SHARED"; if [ "$IFC_TASK_ID" = A ]; then touch {:?}; sleep 3; fi"#,
        marker.display().to_string()
    );
    let config = w.session("session-1-x", &["A"], &script, "");
    let agent = |log: &str, extra: &[&str]| {
        let mut cmd = ifc_git(&remote, w.path());
        cmd.env("IFC_POLL_INTERVAL", "200ms")
            .args(["--stale-after", "4s", "--git-workdir"])
            .arg(w.path().join(log));
        spawn_agent(cmd, &config, &w.path().join(format!("{log}.log")), extra)
    };
    // The first is not `--until-done`: once A is done it idles, and only being told can stop it.
    let mut first = agent("first", &[]);
    wait_for("A to start", Duration::from_secs(30), || marker.exists());
    let mut second = agent("second", &["--until-done", "--take-over"]);
    let first_code = finish(&mut first, Duration::from_secs(60));
    let first_log = std::fs::read_to_string(w.path().join("first.log")).unwrap_or_default();
    assert_eq!(
        first_code, 5,
        "the agent taken over stops with exit 5:\n{first_log}"
    );
    let second_code = finish(&mut second, Duration::from_secs(60));
    let second_log = std::fs::read_to_string(w.path().join("second.log")).unwrap_or_default();
    assert_eq!(second_code, 0, "{second_log}");
    assert!(first_log.contains("release task=A"), "{first_log}");
    assert_eq!(w.done(), ["A"], "A ran once");
}

#[test]
fn a_take_over_in_git_mode_is_heard_while_the_old_agent_runs_a_long_task() {
    // The tester's report: taken over during a 30 s task, the old agent heard of it only when
    // its task ended (its heartbeat comes every stale-after / 4), and both processes ran tasks of
    // the session at once; the shutdown grace never applied.
    let remote = BareRemote::new(
        "| ID | Task | Status | Owner |\n|---|---|---|---|\n| L1 | a | 🔵 AVAILABLE |  |\n| L2 | b | 🔵 AVAILABLE |  |\n",
    );
    let w = Workdir::new();
    let marker = w.path().join("L1.started");
    let script = format!(
        r#"if [ "$IFC_TASK_ID" = L1 ]; then touch {:?}; sleep 120; fi; echo "$IFC_TASK_ID" >> "$SHARED""#,
        marker.display().to_string()
    );
    let config = w.session(
        "session-1-x",
        &["L1", "L2"],
        &script,
        "shutdown_grace: 1s\n",
    );
    let agent = |log: &str, extra: &[&str]| {
        let mut cmd = ifc_git(&remote, w.path());
        // Heartbeats every 150 s: only a take-over heard at a poll stops the first in time.
        cmd.env("IFC_POLL_INTERVAL", "200ms")
            .args(["--stale-after", "600s", "--git-workdir"])
            .arg(w.path().join(log));
        spawn_agent(cmd, &config, &w.path().join(format!("{log}.log")), extra)
    };
    let mut first = agent("first", &[]);
    wait_for("L1 to start", Duration::from_secs(30), || marker.exists());
    let _second = agent("second", &["--take-over"]);
    let first_code = finish(&mut first, Duration::from_secs(60));
    let first_log = std::fs::read_to_string(w.path().join("first.log")).unwrap_or_default();
    assert_eq!(first_code, 5, "{first_log}");
    assert!(
        first_log.contains("still running at the end of the shutdown grace period"),
        "its running task was stopped after the grace: {first_log}"
    );
}

#[test]
fn a_cli_release_for_a_session_whose_agent_runs_the_task_leaves_the_run_alone() {
    // The tester's report: in git mode `ifc release A --session S --status complete` from
    // another directory killed S's agent's run and marked A done, its work unfinished (with
    // `--status available` the run was killed and started again); etcd refused it, saying
    // "held by S" to S.
    let (etcd, remote, w) = (EtcdServer::start(), BareRemote::new(BOARD), Workdir::new());
    let e = etcd.endpoint();
    put(&e, w.path(), &["A"]);
    let git_store = |cmd: &mut std::process::Command, dir: &str| {
        cmd.env("IFC_MODE", "git")
            .env("IFC_GIT_REMOTE", remote.path())
            .env("IFC_GIT_WORKDIR", w.path().join(dir))
            .env("IFC_POLL_INTERVAL", "200ms");
    };
    for store in ["etcd", "git"] {
        let marker = w.path().join(format!("A.{store}.started"));
        let script = format!(
            r#"echo "$IFC_TASK_ID" >> "$SHARED"; touch {:?}; sleep 3; echo "$IFC_TASK_ID" >> "$SHARED""#,
            marker.display().to_string()
        );
        let session = format!("runner-{store}");
        let config = w.session(&session, &["A"], &script, "");
        let mut cmd = ifc(&e, w.path());
        if store == "git" {
            git_store(&mut cmd, "agent-clone");
        }
        let log = w.path().join(format!("agent-{store}.log"));
        let mut agent = spawn_agent(cmd, &config, &log, &["--until-done"]);
        wait_for("the task to start", Duration::from_secs(30), || {
            marker.exists()
        });
        for status in ["complete", "available"] {
            let mut cmd = ifc(&e, w.path());
            if store == "git" {
                git_store(&mut cmd, "cli-clone");
            }
            let out = run(cmd.args(["release", "A", "--session", &session, "--status", status]));
            let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert_eq!(code(&out), 1, "{store}, --status {status}: {said}");
            assert!(said.contains("running agent"), "{store}: {said}");
        }
        let code_agent = finish(&mut agent, Duration::from_secs(60));
        let text_log = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(code_agent, 0, "{store}: {text_log}");
        assert_eq!(w.done(), ["A", "A"], "{store}: one run, start to end");
        std::fs::remove_file(w.shared()).ok();
    }
}
