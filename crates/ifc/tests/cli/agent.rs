//! `ifc agent` end to end: real agent processes against a real etcd (and a real git remote),
//! with task commands that record what they did in files.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backend_etcd::testing::EtcdServer;
use backend_git::testing::BareRemote;
use serde_json::Value;

use crate::{code, run, text};

/// A test's working directory: session files, logs, the shared file tasks append to.
pub(crate) struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    pub(crate) fn new() -> Workdir {
        Workdir {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn shared(&self) -> PathBuf {
        self.path().join("shared.txt")
    }

    /// Writes a session file whose command runs `script` with `sh -c` (a fixed script: the task
    /// reaches it only through `IFC_TASK_ID`).
    pub(crate) fn session(
        &self,
        session: &str,
        tasks: &[&str],
        script: &str,
        extra: &str,
    ) -> PathBuf {
        let path = self.path().join(format!("{session}.yaml"));
        let tasks: Vec<String> = tasks.iter().map(|t| format!("\"{t}\"")).collect();
        let text = format!(
            "session_id: {session}\ntasks: [{}]\ncommand: [/bin/sh, -c, {script:?}]\nenv:\n  SHARED: {:?}\n  MARKS: {:?}\nlease_ttl: 2s\n{extra}",
            tasks.join(", "),
            self.shared().display().to_string(),
            self.path().display().to_string(),
        );
        std::fs::write(&path, text).expect("session file");
        path
    }

    /// Ids appended to the shared file, sorted.
    pub(crate) fn done(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.shared()).unwrap_or_default();
        let mut ids: Vec<String> = text.lines().map(str::to_owned).collect();
        ids.sort();
        ids
    }
}

pub(crate) const APPEND: &str = r#"echo "$IFC_TASK_ID" >> "$SHARED""#;

pub(crate) fn ifc(endpoint: &str, cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ifc"));
    cmd.current_dir(cwd)
        .env("IFC_ENDPOINTS", endpoint)
        .env_remove("IFC_MODE")
        .env_remove("RUST_LOG");
    cmd
}

/// A running agent process, killed and reaped when the test ends (also when it fails).
pub(crate) struct Agent(pub(crate) Child);

impl std::ops::Deref for Agent {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub(crate) fn spawn_agent(mut cmd: Command, config: &Path, log: &Path, extra: &[&str]) -> Agent {
    let log = std::fs::File::create(log).expect("agent log");
    cmd.arg("agent")
        .arg("--config")
        .arg(config)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(Agent)
        .expect("spawn agent")
}

/// Waits for `child` to exit, killing it after `limit` (a hung agent fails the test, not CI):
/// its exit code, or -2 if it still ran after `limit`.
pub(crate) fn finish(child: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            // Said by the caller's assertion, which shows the agent's log (a panic here hid it).
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("agent still running after {limit:?}: killed");
            return -2;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped by init) is not alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
}

pub(crate) fn statuses(endpoint: &str, cwd: &Path) -> Vec<Value> {
    let out = run(ifc(endpoint, cwd).args(["status", "-o", "json"]));
    serde_json::from_slice(&out.stdout).expect("status json")
}

pub(crate) fn status_of(endpoint: &str, cwd: &Path, task: &str) -> String {
    statuses(endpoint, cwd)
        .iter()
        .find(|t| t["task_id"] == task)
        .map(|t| t["status"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

pub(crate) fn put(endpoint: &str, cwd: &Path, args: &[&str]) {
    let out = run(ifc(endpoint, cwd).arg("put").args(args));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
}

/// 30 tasks in three chains of blockers (T03 waits on T00, T06 on T03, …).
pub(crate) fn chains() -> Vec<(String, Option<String>)> {
    (0..30)
        .map(|i| {
            (
                format!("T{i:02}"),
                (i >= 3).then(|| format!("T{:02}", i - 3)),
            )
        })
        .collect()
}

/// `chains()` as a markdown board.
pub(crate) fn chain_board() -> String {
    let mut board =
        String::from("| ID | Task | Status | Owner | Blocked by |\n|---|---|---|---|---|\n");
    for (id, blocker) in chains() {
        let status = if blocker.is_some() {
            "🔴 BLOCKED"
        } else {
            "🔵 AVAILABLE"
        };
        board.push_str(&format!(
            "| {id} | task | {status} |  | {} |\n",
            blocker.unwrap_or_default()
        ));
    }
    board
}

pub(crate) const LISTS: [&[&str]; 3] = [&["T0*", "T*"], &["T1*", "T*"], &["T2*", "T*"]];

#[test]
fn three_agents_complete_thirty_chained_tasks_exactly_once() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    three_agents_run_the_chains(&etcd.endpoint(), &w);
}

/// Three `--until-done` agents run `chains()` on the store at `e`: each task once, all complete,
/// and the history checks clean.
pub(crate) fn three_agents_run_the_chains(e: &str, w: &Workdir) {
    for (id, blocker) in chains() {
        match blocker {
            Some(b) => put(
                e,
                w.path(),
                &[&id, "--status", "blocked", "--blocked-by", &b],
            ),
            None => put(e, w.path(), &[&id]),
        }
    }
    let h = w
        .path()
        .join("history.jsonl")
        .to_string_lossy()
        .into_owned();
    let mut agents: Vec<Agent> = (0..3)
        .map(|k| {
            let config = w.session(&format!("session-{k}"), LISTS[k], APPEND, "");
            spawn_agent(
                ifc(e, w.path()),
                &config,
                &w.path().join(format!("agent-{k}.log")),
                &["--until-done", "--history", &h],
            )
        })
        .collect();
    for (k, a) in agents.iter_mut().enumerate() {
        let code = finish(a, Duration::from_secs(120));
        let log =
            std::fs::read_to_string(w.path().join(format!("agent-{k}.log"))).unwrap_or_default();
        assert_eq!(code, 0, "agent {k}:\n{log}");
    }
    let expected: Vec<String> = chains().into_iter().map(|(id, _)| id).collect();
    assert_eq!(w.done(), expected, "every task ran exactly once");
    assert!(statuses(e, w.path())
        .iter()
        .all(|t| t["status"] == "complete"));
    let out = run(ifc(e, w.path()).args(["check-history", &h]));
    assert_eq!(code(&out), 0, "{}", text(&out.stdout));
}

#[test]
fn three_agents_complete_thirty_chained_tasks_exactly_once_in_git_mode() {
    let (remote, w) = (BareRemote::new(&chain_board()), Workdir::new());
    let mut agents: Vec<Agent> = (0..3)
        .map(|k| {
            let config = w.session(&format!("session-{k}"), LISTS[k], APPEND, "");
            let mut cmd = ifc("http://127.0.0.1:1", w.path());
            cmd.env("IFC_MODE", "git")
                .env("IFC_GIT_REMOTE", remote.path())
                .env("IFC_POLL_INTERVAL", "200ms");
            // Staleness is not what this test is about: keep heartbeats safe on a loaded machine.
            cmd.args(["--stale-after", "20s"]);
            spawn_agent(
                cmd,
                &config,
                &w.path().join(format!("agent-{k}.log")),
                &["--until-done"],
            )
        })
        .collect();
    for (k, a) in agents.iter_mut().enumerate() {
        let code = finish(a, Duration::from_secs(180));
        let log =
            std::fs::read_to_string(w.path().join(format!("agent-{k}.log"))).unwrap_or_default();
        assert_eq!(code, 0, "agent {k}:\n{log}");
    }
    let expected: Vec<String> = chains().into_iter().map(|(id, _)| id).collect();
    assert_eq!(w.done(), expected, "every task ran exactly once");
    let text = remote.read("docs/PHASE-0-TASK-BOARD.md").expect("board");
    assert_eq!(text.matches("✅ DONE").count(), 30, "{text}");
}

#[test]
fn a_git_agent_started_while_the_remote_is_away_waits_for_it() {
    // Found by `scripts/chaos --random --seed 20008`: the coordination repo moved away while a
    // fleet (re)started: every agent exited 3 and the tasks stayed undone.
    let (remote, w) = (BareRemote::new(&chain_board()), Workdir::new());
    let away = remote.path().with_extension("away");
    std::fs::rename(remote.path(), &away).expect("move the remote away");
    let config = w.session("session-0", &["T*"], APPEND, "");
    let log = w.path().join("agent.log");
    let mut cmd = ifc("http://127.0.0.1:1", w.path());
    cmd.env("IFC_MODE", "git")
        .env("IFC_GIT_REMOTE", remote.path())
        .env("IFC_POLL_INTERVAL", "200ms")
        .args(["--stale-after", "20s"]);
    let mut agent = spawn_agent(cmd, &config, &log, &["--until-done"]);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the agent to say it waits", Duration::from_secs(30), || {
        read().contains("waiting for the git remote")
    });
    assert!(
        matches!(agent.try_wait(), Ok(None)),
        "it waits:\n{}",
        read()
    );
    std::fs::rename(&away, remote.path()).expect("move the remote back");
    assert_eq!(
        finish(&mut agent, Duration::from_secs(180)),
        0,
        "{}",
        read()
    );
    let expected: Vec<String> = chains().into_iter().map(|(id, _)| id).collect();
    assert_eq!(w.done(), expected, "every task ran exactly once");
    assert!(
        !read().contains("etcd is unreachable"),
        "a git agent says nothing of etcd:\n{}",
        read()
    );
}

/// An agent of session `waiter` (`--until-done`) waiting for task W, blocked by task B.
fn waiting_for_w_blocked_by_b() -> (EtcdServer, Workdir, Agent, PathBuf) {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    put(&e, w.path(), &["B"]);
    put(
        &e,
        w.path(),
        &["W", "--status", "blocked", "--blocked-by", "B"],
    );
    let config = w.session("waiter", &["W"], APPEND, "");
    let log = w.path().join("waiter.log");
    let agent = spawn_agent(ifc(&e, w.path()), &config, &log, &["--until-done"]);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the agent to start", Duration::from_secs(20), || {
        read_log().contains("agent started")
    });
    std::thread::sleep(Duration::from_millis(500));
    (etcd, w, agent, log)
}

#[test]
fn a_waiting_agent_claims_its_task_when_its_blockers_are_edited_to_complete_ones() {
    // Issue 15 #4: `ifc put W --blocked-by DONE0` while an agent waited for W: it never claimed
    // W (a fresh agent did at once): the edit changed no status, so nothing told the agent.
    let (etcd, w, mut agent, log) = waiting_for_w_blocked_by_b();
    let e = etcd.endpoint();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    put(&e, w.path(), &["DONE0", "--status", "complete"]);
    put(&e, w.path(), &["W", "--blocked-by", "DONE0"]);
    assert_eq!(
        finish(&mut agent, Duration::from_secs(30)),
        0,
        "{}",
        read_log()
    );
    assert_eq!(w.done(), ["W"]);
}

#[test]
fn a_waiting_agent_claims_its_task_when_the_blocker_clears_without_polling() {
    let (etcd, w, mut agent, log) = waiting_for_w_blocked_by_b();
    let e = etcd.endpoint();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // Another process does the blocker.
    assert_eq!(
        code(&run(ifc(&e, w.path()).args([
            "claim",
            "B",
            "--session",
            "other"
        ]))),
        0
    );
    assert_eq!(
        code(&run(ifc(&e, w.path()).args([
            "release",
            "B",
            "--session",
            "other",
            "--status",
            "complete"
        ]))),
        0
    );
    assert_eq!(
        finish(&mut agent, Duration::from_secs(30)),
        0,
        "{}",
        read_log()
    );
    let log = read_log();
    assert!(log.contains("blocker B cleared: W claimable"), "{log}");
    let attempts = log
        .lines()
        .filter(|l| l.contains(" claim ") && l.contains("task=W"))
        .count();
    assert_eq!(
        attempts, 1,
        "one claim attempt, made on the event, no polling:\n{log}"
    );
    assert_eq!(w.done(), ["W"]);
}

/// A task that writes its pid, waits long, then appends (so a killed run leaves no trace).
pub(crate) const SLOW: &str = r#"echo $$ > "$MARKS/$IFC_TASK_ID.$IFC_SESSION_ID.pid"; sleep "${SLOW:-30}"; echo "$IFC_TASK_ID" >> "$SHARED""#;

pub(crate) fn pid_of(w: &Workdir, task: &str, session: &str) -> i32 {
    let path = w.path().join(format!("{task}.{session}.pid"));
    wait_for("the task to start", Duration::from_secs(20), || {
        std::fs::read_to_string(&path).is_ok_and(|s| s.trim().parse::<i32>().is_ok())
    });
    std::fs::read_to_string(&path)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid")
}

#[test]
fn kill_9_of_an_agent_kills_its_task_and_another_agent_takes_over() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    kill_9_then_another_agent_takes_over(&etcd.endpoint(), &w);
}

/// An agent on the store at `e` is killed with SIGKILL mid-task: its task (and the task's
/// grandchild) dies, its session leaves `ifc status`, and another agent does the task, once.
pub(crate) fn kill_9_then_another_agent_takes_over(e: &str, w: &Workdir) {
    put(e, w.path(), &["K"]);
    // The task also starts a grandchild: it must not outlive the agent either.
    let spawner = format!(r#"sleep 300 & echo $! > "$MARKS/grandchild.pid"; {SLOW}"#);
    let doomed_config = w.session("doomed", &["K"], &spawner, "");
    let mut doomed = spawn_agent(
        ifc(e, w.path()),
        &doomed_config,
        &w.path().join("doomed.log"),
        &[],
    );
    let pid = pid_of(w, "K", "doomed");
    assert!(alive(pid));
    // `ifc status` lists the live session and what it works on.
    let status_text = || text(&run(ifc(e, w.path()).arg("status")).stdout);
    wait_for(
        "the session to show as working",
        Duration::from_secs(10),
        || {
            status_text()
                .lines()
                .any(|l| l.starts_with("doomed") && l.contains("working") && l.contains(" K "))
        },
    );
    doomed.kill().expect("kill -9");
    doomed.wait().expect("reap");
    wait_for(
        "the task process to die with its agent",
        Duration::from_secs(5),
        || !alive(pid),
    );
    wait_for(
        "the dead session to leave `ifc status`",
        Duration::from_secs(20),
        || !status_text().contains("doomed"),
    );
    let rescuer_config = w.session("rescuer", &["K"], APPEND, "");
    let mut rescuer = spawn_agent(
        ifc(e, w.path()),
        &rescuer_config,
        &w.path().join("rescuer.log"),
        &["--until-done"],
    );
    assert_eq!(finish(&mut rescuer, Duration::from_secs(30)), 0);
    assert_eq!(w.done(), ["K"], "completed once, by the rescuer");
    assert_eq!(status_of(e, w.path(), "K"), "complete");
}

#[tokio::test]
async fn a_revoked_lease_kills_the_task_and_it_is_not_reported_done() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    let fenced = start_fenced(&e, &w);
    let mut raw = etcd_client::Client::connect([e.clone()], None)
        .await
        .expect("raw client");
    let lease = raw.get("claims/L", None).await.expect("get").kvs()[0].lease();
    raw.lease_revoke(lease).await.expect("revoke");
    fenced.check(&w);
}

/// An agent running task L (slowly) on some store, and another waiting for L.
pub(crate) struct Fenced {
    fenced: Agent,
    pid: i32,
    other: Agent,
}

/// Starts the agents of [`Fenced`] on the store at `e`; the test then ends the first one's
/// lease and calls [`Fenced::check`].
pub(crate) fn start_fenced(e: &str, w: &Workdir) -> Fenced {
    put(e, w.path(), &["L"]);
    let config = w.session("fenced", &["L"], SLOW, "");
    let fenced = spawn_agent(ifc(e, w.path()), &config, &w.path().join("fenced.log"), &[]);
    let pid = pid_of(w, "L", "fenced");
    // The other agent waits for L; when the lease goes, it takes L at once (the fenced session
    // backs off before trying L again).
    let other = w.session("other", &["L"], APPEND, "");
    let other = spawn_agent(
        ifc(e, w.path()),
        &other,
        &w.path().join("other.log"),
        &["--until-done"],
    );
    Fenced { fenced, pid, other }
}

impl Fenced {
    /// After the lease of the first agent ended: its task was killed and not reported done,
    /// and the other agent did it, once.
    pub(crate) fn check(mut self, w: &Workdir) {
        let pid = self.pid;
        wait_for(
            "the fenced task to be killed",
            Duration::from_secs(10),
            || !alive(pid),
        );
        let log = std::fs::read_to_string(w.path().join("fenced.log")).unwrap_or_default();
        assert!(log.contains("claim lost"), "{log}");
        let code = finish(&mut self.other, Duration::from_secs(30));
        let other_log = std::fs::read_to_string(w.path().join("other.log")).unwrap_or_default();
        assert_eq!(code, 0, "{other_log}");
        assert_eq!(
            w.done(),
            ["L"],
            "done once, by the other agent (the fenced one backed off)"
        );
        let _ = self.fenced.kill();
        let _ = self.fenced.wait();
        let log = std::fs::read_to_string(w.path().join("fenced.log")).unwrap_or_default();
        assert!(
            !log.lines()
                .any(|l| l.contains("release") && l.contains("status=complete")),
            "{log}"
        );
    }
}

#[test]
fn sigterm_lets_the_task_finish_within_the_grace_period_else_gives_it_back() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    put(&e, w.path(), &["G"]);
    put(&e, w.path(), &["H"]);
    let sigterm = |child: &Child| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
    };
    let quick = w.session(
        "graceful",
        &["G"],
        &SLOW.replace("${SLOW:-30}", "1"),
        "shutdown_grace: 20s\n",
    );
    let mut agent = spawn_agent(
        ifc(&e, w.path()),
        &quick,
        &w.path().join("graceful.log"),
        &[],
    );
    pid_of(&w, "G", "graceful");
    sigterm(&agent);
    assert_eq!(finish(&mut agent, Duration::from_secs(30)), 0);
    assert_eq!(
        status_of(&e, w.path(), "G"),
        "complete",
        "finished within the grace period"
    );

    let slow = w.session("impatient", &["H"], SLOW, "shutdown_grace: 500ms\n");
    let mut agent = spawn_agent(
        ifc(&e, w.path()),
        &slow,
        &w.path().join("impatient.log"),
        &[],
    );
    let pid = pid_of(&w, "H", "impatient");
    sigterm(&agent);
    assert_eq!(finish(&mut agent, Duration::from_secs(30)), 0);
    assert!(!alive(pid), "killed after the grace period");
    assert_eq!(status_of(&e, w.path(), "H"), "available", "given back");
    assert_eq!(w.done(), ["G"]);
}

#[test]
fn hostile_titles_are_inert_and_bad_config_files_are_usage_errors() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    put(
        &e,
        w.path(),
        &[
            "X.1",
            "--title",
            "$(touch pwned) `touch pwned2`; touch pwned3",
        ],
    );
    let config = w.session("s1", &["X.*"], r#"echo "$IFC_TASK_ID" >> "$SHARED""#, "");
    let mut agent = spawn_agent(
        ifc(&e, w.path()),
        &config,
        &w.path().join("s1.log"),
        &["--until-done"],
    );
    assert_eq!(finish(&mut agent, Duration::from_secs(30)), 0);
    for f in ["pwned", "pwned2", "pwned3"] {
        assert!(!w.path().join(f).exists(), "{f} was created");
    }
    assert_eq!(w.done(), ["X.1"]);

    for (name, text, place, key) in [
        (
            "unknown.yaml",
            "session_id: s\ntasks: [A]\ncommand: [x]\nlease_tll: 2s\n",
            "unknown.yaml:4",
            "lease_tll",
        ),
        (
            "duration.yaml",
            "session_id: s\ntasks: [A]\ncommand: [x]\nlease_ttl: soon\n",
            "duration.yaml:4",
            "lease_ttl",
        ),
        (
            "nocommand.yaml",
            "session_id: s\ntasks: [A]\n",
            "nocommand.yaml",
            "command",
        ),
        (
            "hostile.yaml",
            "session_id: s\ntasks: ['P0;rm -rf /']\ncommand: [x]\n",
            "hostile.yaml:2",
            "invalid task id",
        ),
    ] {
        let path = w.path().join(name);
        std::fs::write(&path, text).expect("write");
        let out = run(ifc(&e, w.path()).arg("agent").arg("--config").arg(&path));
        assert_eq!(code(&out), 2, "{name}: {}", text);
        let err = crate::text(&out.stderr);
        assert!(err.contains(place) && err.contains(key), "{name}: {err}");
    }
}

#[test]
fn a_hung_or_overlong_task_is_killed_and_given_back() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    for (task, limit) in [
        ("STALL", "stall_timeout: 1s\n"),
        ("LONG", "task_timeout: 1s\n"),
    ] {
        put(&e, w.path(), &[task]);
        let session = format!("s-{}", task.to_lowercase());
        // Prints a line every 0.2 s (not stalled) for LONG; nothing at all for STALL.
        let script = if task == "LONG" {
            r#"echo $$ > "$MARKS/$IFC_TASK_ID.$IFC_SESSION_ID.pid"; while true; do echo tick; sleep 0.2; done"#
        } else {
            SLOW
        };
        let config = w.session(
            &session,
            &[task],
            script,
            &format!("{limit}max_attempts: 1\n"),
        );
        let log = w.path().join(format!("{session}.log"));
        let mut agent = spawn_agent(ifc(&e, w.path()), &config, &log, &[]);
        let pid = pid_of(&w, task, &session);
        wait_for("the task to be killed", Duration::from_secs(20), || {
            !alive(pid)
        });
        wait_for("the task to be given back", Duration::from_secs(20), || {
            status_of(&e, w.path(), task) == "available"
        });
        let _ = agent.kill();
        let _ = agent.wait();
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let why = if task == "LONG" {
            "task_timeout"
        } else {
            "stall_timeout"
        };
        assert!(log.contains("task killed") && log.contains(why), "{log}");
        // The task's own log says so too (the tester's: it had no line about the kill).
        let own: String = std::fs::read_dir(w.path().join(".ifc/logs").join(&session))
            .expect("task logs")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(task))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect();
        assert!(own.contains("ifc: killed: ") && own.contains(why), "{own}");
    }
    assert!(w.done().is_empty());
}

#[test]
fn why_a_task_failed_is_on_the_agents_stderr() {
    // Issue 15 #5 and tester helper-1: a command that cannot start showed only as
    // `success=false` (the reason in the task's log file), an exit code nowhere. Tester
    // helper-2: an agent whose command cannot start at all claimed and gave back task after
    // task; it is refused at start now (exit 2), naming the command.
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    put(&e, w.path(), &["NX"]);
    put(&e, w.path(), &["B"]);
    put(&e, w.path(), &["SEVEN"]);
    put(&e, w.path(), &["SEGV"]);
    let file = |name: &str, command: &str, tasks: &str| {
        let path = w.path().join(name);
        std::fs::write(
            &path,
            format!("session_id: {}\ntasks: [{tasks}]\ncommand: [{command}]\nmax_attempts: 1\nlease_ttl: 2s\n", name.trim_end_matches(".yaml")),
        )
        .expect("session file");
        path
    };
    let missing = file("s-missing.yaml", "/nonexistent/tool, arg", "NX");
    let out = run(ifc(&e, w.path()).args(["agent", "--config"]).arg(&missing));
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("s-missing.yaml: the session file's command \"/nonexistent/tool\" cannot be run: no such file"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        status_of(&e, w.path(), "NX"),
        "available",
        "nothing was claimed"
    );

    // A program that goes away after the agent started: its task fails with the reason, at
    // ERROR. NX waits for B while the program is removed.
    put(&e, w.path(), &["NX", "--blocked-by", "B"]);
    let tool = w.path().join("tool.sh");
    std::fs::write(&tool, "#!/bin/sh\nexit 0\n").expect("tool");
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let going = file("s-going.yaml", &tool.display().to_string(), "NX");
    let seven = w.session("s-seven", &["SEVEN"], "exit 7", "max_attempts: 1\n");
    let segv = w.session("s-segv", &["SEGV"], "kill -SEGV $$", "max_attempts: 1\n");
    for (config, session, expect) in [
        (
            &going,
            "s-going",
            [
                "ERROR",
                "the session's command could not be started",
                "cannot run",
            ],
        ),
        (&seven, "s-seven", ["WARN", "task failed", "exit code 7"]),
        // The tester's: a command killed by a signal read "exit code 139".
        (
            &segv,
            "s-segv",
            ["WARN", "task failed", "killed by signal 11"],
        ),
    ] {
        let log = w.path().join(format!("{session}.log"));
        let mut agent = spawn_agent(ifc(&e, w.path()), config, &log, &["--until-done"]);
        if session == "s-going" {
            wait_for("the agent to wait for B", Duration::from_secs(30), || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("nothing to claim")
            });
            std::fs::remove_file(&tool).expect("remove the program");
            put(&e, w.path(), &["B", "--status", "complete"]);
        }
        assert_eq!(finish(&mut agent, Duration::from_secs(60)), 1, "gave up");
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let line = log
            .lines()
            .find(|l| l.contains(expect[1]))
            .unwrap_or_else(|| panic!("no {:?} line:\n{log}", expect[1]));
        for want in expect {
            assert!(line.contains(want), "{want:?} missing from {line:?}");
        }
    }
}

#[test]
fn an_idle_agent_says_what_it_waits_for_and_that_a_new_task_list_needs_a_restart() {
    // Tester helper-1: an agent whose task was held by a one-shot claim of a session nobody
    // runs idled without a word; issue 16: an edited task list was ignored without a word.
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    put(&e, w.path(), &["HELD"]);
    put(&e, w.path(), &["NEW"]);
    let out = run(ifc(&e, w.path()).args(["claim", "HELD", "--session", "ghost"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let config = w.session("s-idle", &["HELD"], APPEND, "");
    let log = w.path().join("idle.log");
    let mut agent = spawn_agent(ifc(&e, w.path()), &config, &log, &[]);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(
        "the agent to say why it waits",
        Duration::from_secs(20),
        || read().contains("nothing to claim: HELD is claimed by ghost"),
    );
    w.session("s-idle", &["HELD", "NEW"], APPEND, "");
    wait_for(
        "the agent to say the new list needs a restart",
        Duration::from_secs(20),
        || {
            read()
                .lines()
                .any(|l| l.contains("restart the agent") && l.contains("keys=tasks"))
        },
    );
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(w.done().is_empty(), "NEW is not taken up without a restart");
}

#[test]
fn the_history_of_a_run_with_an_agent_killed_mid_task_checks_clean() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    let ids: Vec<String> = (0..12).map(|i| format!("H{i:02}")).collect();
    for id in &ids {
        put(&e, w.path(), &[id]);
    }
    let history = w.path().join("history.jsonl");
    let hist = history.display().to_string();
    let steady = r#"sleep 0.4; echo "$IFC_TASK_ID" >> "$SHARED""#;
    let agent = |name: &str| {
        let config = w.session(name, &["H*"], steady, "");
        spawn_agent(
            ifc(&e, w.path()),
            &config,
            &w.path().join(format!("{name}.log")),
            &["--history", &hist],
        )
    };
    let mut victim = agent("victim");
    let mut others = vec![agent("steady-1"), agent("steady-2")];
    wait_for("the victim mid-task", Duration::from_secs(30), || {
        std::fs::read_to_string(&history)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(r#""session":"victim""#) && l.contains(r#""event":"start""#))
            .count()
            >= 2
    });
    victim.kill().expect("kill -9");
    victim.wait().expect("reap");
    // The harness records what it did, as the checker's format says.
    let killed = format!(
        "{{\"t\":{},\"session\":\"victim\",\"task\":\"\",\"event\":\"killed\"}}\n",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(&history)
        .and_then(|mut f| std::io::Write::write_all(&mut f, killed.as_bytes()))
        .expect("append");
    wait_for("every task done", Duration::from_secs(60), || {
        let mut done = w.done();
        done.dedup();
        done.len() == ids.len()
    });
    for a in &mut others {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(a.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        assert_eq!(finish(a, Duration::from_secs(30)), 0);
    }
    assert_eq!(w.done(), ids, "every task ran to the end exactly once");
    let out = run(ifc(&e, w.path()).args(["check-history", &hist, "-o", "json"]));
    let report: Value = serde_json::from_slice(&out.stdout).expect("report json");
    assert_eq!(code(&out), 0, "{report}");
    assert_eq!(report["tasks"], ids.len(), "{report}");
    // And a planted second completion is caught.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&history)
        .and_then(|mut f| {
            std::io::Write::write_all(
                &mut f,
                b"{\"t\":9000000000000000000,\"session\":\"ghost\",\"task\":\"H00\",\"event\":\"complete\",\"token\":1}\n",
            )
        })
        .expect("append");
    let out = run(ifc(&e, w.path()).args(["check-history", &hist]));
    assert_eq!(code(&out), 1, "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("H00"), "{}", text(&out.stdout));
}

#[test]
fn what_a_finished_task_left_running_in_the_background_is_killed() {
    // Issue 15 #6: `(sleep 30; echo late) & echo done`: the task was complete, the agent
    // exited, and `sleep 30` kept running.
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    put(&e, w.path(), &["BG"]);
    let script = r#"(sleep 30; echo late >> "$MARKS/late") & echo $! > "$MARKS/bg.pid"; echo "$IFC_TASK_ID" >> "$SHARED""#;
    let config = w.session("s-bg", &["BG"], script, "");
    let log = w.path().join("agent.log");
    let mut agent = spawn_agent(ifc(&e, w.path()), &config, &log, &["--until-done"]);
    assert_eq!(
        finish(&mut agent, Duration::from_secs(60)),
        0,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let pid: i32 = std::fs::read_to_string(w.path().join("bg.pid"))
        .expect("the background pid")
        .trim()
        .parse()
        .expect("a pid");
    wait_for(
        "the background child to be gone",
        Duration::from_secs(10),
        || !alive(pid),
    );
    assert_eq!(w.done(), ["BG"]);
}

#[test]
fn an_agent_says_which_records_of_its_list_cannot_be_read() {
    // Tester helper-7: tasks of an agent's list overwritten with junk read as not there, and the
    // agent said nothing.
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut raw = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .expect("connect");
        for key in ["tasks/J.1", "tasks/OTHER.1"] {
            raw.put(key, "not json", None).await.expect("put");
        }
    });
    let config = w.session("s-junk", &["J.*"], APPEND, "");
    let log = w.path().join("junk.log");
    let mut agent = spawn_agent(ifc(&etcd.endpoint(), w.path()), &config, &log, &[]);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(
        "the agent to name the unreadable record of its list",
        Duration::from_secs(20),
        || {
            read()
                .lines()
                .any(|l| l.contains("cannot be read") && l.contains("tasks/J.1"))
        },
    );
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        !read().contains("tasks/OTHER.1"),
        "not of its list:\n{}",
        read()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_agent_writes_its_presence_once_per_task_and_says_idle_at_the_end() {
    // Half the etcd writes of a busy fleet were presences: "working on X", then "idle" right
    // before "working on Y".
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    let tasks: Vec<String> = (0..12).map(|i| format!("P.{i:02}")).collect();
    for t in &tasks {
        put(&e, w.path(), &[t]);
    }
    let config = w.session("busy", &["P.*"], APPEND, "");
    let log = w.path().join("busy.log");
    let mut agent = spawn_agent(ifc(&e, w.path()), &config, &log, &[]);
    let done = w.shared();
    tokio::task::spawn_blocking(move || {
        wait_for("all 12 tasks to run", Duration::from_secs(60), || {
            std::fs::read_to_string(&done).is_ok_and(|s| s.lines().count() == 12)
        })
    })
    .await
    .expect("wait");
    let presence = || async {
        let resp = crate::raw(&etcd)
            .await
            .get("sessions/busy", None)
            .await
            .expect("get");
        let kv = resp.kvs().first().cloned().expect("the agent's presence");
        let value: serde_json::Value = serde_json::from_slice(kv.value()).expect("json");
        (kv.version(), value)
    };
    // It says idle once nothing is left.
    let mut idle = false;
    for _ in 0..100 {
        if presence().await.1["state"] == "idle" {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(idle, "{:?}", presence().await.1);
    let (writes, _) = presence().await;
    agent.kill().expect("kill");
    // Registered, each task's "working on", the final "idle", and a refresh or two whose
    // figures changed; not an "idle" between every two tasks.
    assert!(
        (12..=17).contains(&writes),
        "{writes} presence writes for 12 tasks:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn a_run_left_behind_by_an_agent_killed_with_its_supervisor_is_killed_by_the_next_agent() {
    // Tester helper-10: `kill -9` of the agent and its shim together left the run going, and the
    // next agent ran the task again beside it.
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    put(&e, w.path(), &["K"]);
    let script = r#"echo $$ > "$MARKS/run-$IFC_FENCING_TOKEN.pid"; exec sleep 120"#;
    let config = w.session("keeper", &["K"], script, "");
    let pid_of_run = || -> Option<i32> {
        std::fs::read_dir(w.path())
            .ok()?
            .flatten()
            .find(|f| f.file_name().to_string_lossy().starts_with("run-"))
            .and_then(|f| std::fs::read_to_string(f.path()).ok())
            .and_then(|s| s.trim().parse().ok())
    };
    // Running: not gone, and not a zombie waiting to be reaped.
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    let mut first = spawn_agent(ifc(&e, w.path()), &config, &w.path().join("1.log"), &[]);
    wait_for("the run to start", Duration::from_secs(30), || {
        pid_of_run().is_some()
    });
    let run = pid_of_run().expect("pid");
    // The run's process group is led by its supervisor (`ifc __task-shim`): both go. The
    // supervisor is stopped first, so it cannot kill the run as the agent dies, nor the agent
    // when it sees the supervisor die (both as they should); then the agent, then it.
    let shim = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(run))).expect("group");
    nix::sys::signal::kill(shim, nix::sys::signal::Signal::SIGSTOP).expect("stop the shim");
    first.kill().expect("kill the agent");
    let _ = first.wait();
    nix::sys::signal::kill(shim, nix::sys::signal::Signal::SIGKILL).expect("kill the shim");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        alive(run),
        "the run outlives both (what this test is about)"
    );
    let _second = spawn_agent(ifc(&e, w.path()), &config, &w.path().join("2.log"), &[]);
    wait_for(
        "the run left behind to be killed",
        Duration::from_secs(30),
        || !alive(run),
    );
    let said = || std::fs::read_to_string(w.path().join("2.log")).unwrap_or_default();
    wait_for("the agent to say so", Duration::from_secs(10), || {
        said().contains("killed a run that a previous process")
    });
}
