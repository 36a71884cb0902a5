//! A run that finished while its claim lapsed (etcd paused past the lease TTL, the git remote
//! away past `--stale-after`) is reported done and not run again, though another session waits
//! for the task: real agents, a real etcd and a real git remote.

use std::time::Duration;

use backend_git::testing::BareRemote;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::agent::{finish, ifc, put, spawn_agent, wait_for, Agent, Workdir};
use crate::Coordinator;

/// Marks that it started, works 2 s, then records that it ran.
const SLOW: &str =
    r#"touch "$MARKS/started-$IFC_TASK_ID"; sleep 2; echo "$IFC_TASK_ID" >> "$SHARED""#;

fn started(w: &Workdir) -> bool {
    w.path().join("started-T1").exists()
}

fn both_finish(w: &Workdir, mut agents: Vec<(Agent, std::path::PathBuf)>) {
    let codes: Vec<i32> = agents
        .iter_mut()
        .map(|(agent, _)| finish(agent, Duration::from_secs(120)))
        .collect();
    let logs: Vec<String> = agents
        .iter()
        .map(|(_, log)| {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            format!("{}:\n{text}", log.display())
        })
        .collect();
    assert!(
        codes.iter().all(|&c| c == 0),
        "exit codes {codes:?}:\n{}",
        logs.join("\n----\n")
    );
    assert_eq!(w.done(), ["T1"], "T1 ran once:\n{}", logs.join("\n----\n"));
}

#[test]
fn a_run_that_finished_while_etcd_was_paused_past_the_ttl_is_not_run_again() {
    paused_past_the_ttl(Coordinator::etcd());
}

#[test]
fn a_run_that_finished_while_nats_was_paused_past_the_ttl_is_not_run_again() {
    paused_past_the_ttl(Coordinator::nats());
}

/// T1's run finishes while the coordinator is paused for three lease TTLs; another session
/// waits for T1 all along: T1 is reported done and not run again.
fn paused_past_the_ttl(etcd: Coordinator) {
    let w = Workdir::new();
    let e = etcd.endpoint();
    put(&e, w.path(), &["T1"]);
    let mut agents = Vec::new();
    for session in ["holder", "taker"] {
        let config = w.session(session, &["T1"], SLOW, "");
        let log = w.path().join(format!("{session}.log"));
        let agent = spawn_agent(ifc(&e, w.path()), &config, &log, &["--until-done"]);
        agents.push((agent, log));
        if session == "holder" {
            wait_for("the holder to start T1", Duration::from_secs(30), || {
                started(&w)
            });
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = Pid::from_raw(i32::try_from(etcd.pid()).expect("pid"));
    kill(pid, Signal::SIGSTOP).expect("pause etcd");
    // Three lease TTLs: the run ends (2 s) while etcd is away, and the claim's lease ends.
    std::thread::sleep(Duration::from_secs(6));
    kill(pid, Signal::SIGCONT).expect("resume etcd");
    both_finish(&w, agents);
}

#[test]
fn a_run_that_finished_while_the_git_remote_was_away_past_stale_after_is_not_run_again() {
    let board =
        "| ID | Task | Status | Owner |\n|---|---|---|---|\n| T1 | one | 🔵 AVAILABLE | |\n";
    let (remote, w) = (BareRemote::new(board), Workdir::new());
    let mut agents = Vec::new();
    for (k, session) in ["session-1-holder", "session-2-taker"]
        .into_iter()
        .enumerate()
    {
        let config = w.session(session, &["T1"], SLOW, "");
        let log = w.path().join(format!("{session}.log"));
        let mut cmd = ifc("http://127.0.0.1:1", w.path());
        cmd.env("IFC_MODE", "git")
            .env("IFC_GIT_REMOTE", remote.path())
            .env("IFC_GIT_WORKDIR", w.path().join(format!("clone-{k}")))
            .env("IFC_POLL_INTERVAL", "200ms")
            .args(["--stale-after", "8s"]);
        agents.push((spawn_agent(cmd, &config, &log, &["--until-done"]), log));
        if k == 0 {
            wait_for("the holder to start T1", Duration::from_secs(30), || {
                started(&w)
            });
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let away = remote.path().with_extension("away");
    std::fs::rename(remote.path(), &away).expect("move the remote away");
    // Longer than --stale-after: the holder fences itself, the claim reads stale to the taker.
    std::thread::sleep(Duration::from_secs(10));
    std::fs::rename(&away, remote.path()).expect("move the remote back");
    both_finish(&w, agents);
    let text = remote.read("docs/PHASE-0-TASK-BOARD.md").expect("board");
    assert!(text.contains("✅ DONE"), "{text}");
}

/// What stops answering while a gated run finishes: etcd (the agent cannot report it) or the
/// agent itself (it cannot even see the run end).
#[derive(Clone, Copy)]
enum Stopped {
    /// The coordinator (etcd or nats-server).
    Store,
    Agent,
}

/// T1's run finishes while `stopped` is stopped, its agent is killed -9, and the session's next
/// agent reports the run instead of running T1 again; with `taker`, another session waits for
/// T1 all along.
fn a_run_finished_then_its_agent_killed_is_reported_by_the_next_agent(
    etcd: Coordinator,
    stopped: Stopped,
    taker: bool,
) {
    let w = Workdir::new();
    let e = etcd.endpoint();
    put(&e, w.path(), &["T1"]);
    let gated = r#"touch "$MARKS/started-$IFC_TASK_ID"; while [ ! -e "$MARKS/go" ]; do sleep 0.05; done; echo "$IFC_TASK_ID" >> "$SHARED""#;
    let config = w.session("killed", &["T1"], gated, "");
    let log = w.path().join("first.log");
    let mut first = spawn_agent(ifc(&e, w.path()), &config, &log, &["--until-done"]);
    wait_for("T1 to start", Duration::from_secs(30), || started(&w));
    let pid = match stopped {
        Stopped::Store => etcd.pid(),
        Stopped::Agent => first.id(),
    };
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid"));
    kill(pid, Signal::SIGSTOP).expect("stop it");
    let mut agents = Vec::new();
    if taker {
        let config = w.session("taker", &["T1"], r#"echo "$IFC_TASK_ID" >> "$SHARED""#, "");
        let log = w.path().join("taker.log");
        agents.push((
            spawn_agent(ifc(&e, w.path()), &config, &log, &["--until-done"]),
            log,
        ));
    }
    std::fs::write(w.path().join("go"), "").expect("go");
    wait_for("T1 to finish", Duration::from_secs(30), || {
        w.done() == ["T1"]
    });
    std::thread::sleep(Duration::from_millis(500));
    first.kill().expect("kill -9 the agent");
    first.wait().expect("reap");
    if let Stopped::Store = stopped {
        kill(pid, Signal::SIGCONT).expect("resume etcd");
    }

    let log = w.path().join("second.log");
    let second = spawn_agent(ifc(&e, w.path()), &config, &log, &["--until-done"]);
    agents.push((second, log.clone()));
    both_finish(&w, agents);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("reported the completion of a run the session's previous agent finished"),
        "{text}"
    );
}

#[test]
fn a_run_whose_agent_was_killed_before_reporting_it_is_reported_by_the_next_agent() {
    // Seeds 220000005 and others: an agent killed -9 between its task's exit and the
    // completion's landing; the restarted agent (or another session) ran the task again.
    a_run_finished_then_its_agent_killed_is_reported_by_the_next_agent(
        Coordinator::etcd(),
        Stopped::Store,
        false,
    );
}

#[test]
fn a_run_whose_agent_was_killed_before_reporting_it_on_nats_is_reported_by_the_next_agent() {
    // The tester's report (helper-11): on NATS the next agent ran it again ("not the holder").
    a_run_finished_then_its_agent_killed_is_reported_by_the_next_agent(
        Coordinator::nats(),
        Stopped::Store,
        false,
    );
}

#[test]
fn a_run_that_finished_while_its_agent_was_busy_is_noted_and_not_run_again() {
    // The tester's report: a hung etcd call kept the agent from seeing its task's exit for a
    // second; killed then, the agent left no note, and its restart ran the finished task
    // again. Here the agent is stopped outright while its run finishes, then killed -9.
    a_run_finished_then_its_agent_killed_is_reported_by_the_next_agent(
        Coordinator::etcd(),
        Stopped::Agent,
        false,
    );
}

#[test]
fn a_run_its_killed_agent_finished_is_not_taken_by_a_waiting_session_before_it_is_reported() {
    // Seeds 380000028, 381000042 and others: the restarted agent's registration ended the dead
    // process's claims at once; a session waiting for the task claimed it within milliseconds,
    // before the restart reported the finished run, and ran it again. The claims of a gone
    // process now end only after its finished runs are reported (`Backend::end_inherited`).
    a_run_finished_then_its_agent_killed_is_reported_by_the_next_agent(
        Coordinator::etcd(),
        Stopped::Agent,
        true,
    );
}

#[test]
fn a_run_its_killed_agent_finished_on_nats_is_not_taken_by_a_waiting_session_first() {
    a_run_finished_then_its_agent_killed_is_reported_by_the_next_agent(
        Coordinator::nats(),
        Stopped::Agent,
        true,
    );
}

#[test]
fn a_git_agent_started_just_after_a_writer_was_killed_waits_for_its_ref_lock_and_runs() {
    // The tester's report: a writer killed mid-push left `refs/heads/main.lock` in the remote;
    // agents started just then exited 3 after ~8 s of refused pushes, though the lock is removed
    // once it is 30 s old. They wait for it now.
    let board =
        "| ID | Task | Status | Owner |\n|---|---|---|---|\n| T1 | one | 🔵 AVAILABLE | |\n";
    let (remote, w) = (BareRemote::new(board), Workdir::new());
    let lock = remote.path().join("refs/heads/main.lock");
    std::fs::File::create(&lock)
        .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(20)))
        .expect("a ref lock left 20 s ago");
    let config = w.session(
        "session-1-late",
        &["T1"],
        r#"echo "$IFC_TASK_ID" >> "$SHARED""#,
        "",
    );
    let log = w.path().join("agent.log");
    let mut cmd = ifc("http://127.0.0.1:1", w.path());
    cmd.env("IFC_MODE", "git")
        .env("IFC_GIT_REMOTE", remote.path())
        .env("IFC_GIT_WORKDIR", w.path().join("clone"))
        .env("IFC_POLL_INTERVAL", "200ms");
    both_finish(
        &w,
        vec![(spawn_agent(cmd, &config, &log, &["--until-done"]), log)],
    );
    assert!(!lock.exists(), "the lock was removed once stale");
}

#[test]
fn an_agent_held_up_by_a_ref_lock_says_which_step_waits_and_when_it_is_over() {
    // Issue 15 ("makes progress or says why"): an agent whose release waited on the stores
    // logged nothing until it was over, indistinguishable from one that hung.
    let board =
        "| ID | Task | Status | Owner |\n|---|---|---|---|\n| T1 | one | 🔵 AVAILABLE | |\n";
    let (remote, w) = (BareRemote::new(board), Workdir::new());
    let go = w.path().join("go");
    let config = w.session(
        "session-1-held",
        &["T1"],
        r#"while [ ! -e "$MARKS/go" ]; do sleep 0.1; done; echo "$IFC_TASK_ID" >> "$SHARED""#,
        "",
    );
    let log = w.path().join("agent.log");
    let mut cmd = ifc("http://127.0.0.1:1", w.path());
    cmd.env("IFC_MODE", "git")
        .env("IFC_GIT_REMOTE", remote.path())
        .env("IFC_GIT_WORKDIR", w.path().join("clone"))
        .env("IFC_POLL_INTERVAL", "200ms");
    let agent = spawn_agent(cmd, &config, &log, &["--until-done"]);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("T1 to start", Duration::from_secs(30), || {
        read().contains("task started")
    });
    // A writer killed mid-push 12 s ago: its lock is removed once 30 s old, 18 s from now.
    let lock = remote.path().join("refs/heads/main.lock");
    std::fs::File::create(&lock)
        .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(12)))
        .expect("a ref lock");
    std::fs::write(&go, "").expect("let T1 finish");
    both_finish(&w, vec![(agent, log.clone())]);
    let text = read();
    let waiting = text
        .lines()
        .find(|l| l.contains("still waiting for this step on the stores"))
        .unwrap_or_else(|| panic!("the wait was said:\n{text}"));
    assert!(waiting.contains("release T1 as complete"), "{waiting}");
    assert!(text.contains("the slow step is over"), "{text}");
}
