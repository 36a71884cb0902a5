//! Running a task's command: its own process group, output to a per-task log file, the task
//! passed only through the environment, and nothing left behind when the agent dies.
//!
//! The command runs under `ifc __task-shim`, a small supervisor that leads the task's process
//! group. The agent holds the write end of the shim's stdin; when the agent dies — even by
//! `kill -9` — the kernel closes it, the shim reads end-of-file and kills the whole group
//! (the command and everything it started). No signal handlers, no unsafe code.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agent_core::config::SessionFile;
use agent_core::Claim;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

/// The hidden first argument that makes `ifc` the task shim.
pub const SHIM: &str = "__task-shim";

/// The shim's environment variable naming the session's log directory: a command that exits 0
/// is noted there as finished (`Outbox::finished`) by the shim itself, the moment it exits.
/// The agent may be busy in a call to a store that does not answer just then, and be killed
/// before it sees the exit (the tester's report: a hung etcd delayed the note by a second, an
/// agent killed then ran the finished task again on restart).
const NOTE_DIR: &str = "IFC_SHIM_NOTE_DIR";

/// The task's environment variable naming its session's log directory: with the session id,
/// what marks a run as this session's here (`kill_left_behind`), not another fleet's that uses
/// the same session id on this host.
const LOG_DIR: &str = "IFC_LOG_DIR";

/// Runs in the shim process: start the command in this process group, and kill the group when
/// stdin (held by the agent) closes. Exits with the command's status.
pub fn shim(argv: &[String]) -> std::process::ExitCode {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let Some((program, rest)) = argv.split_first() else {
        return std::process::ExitCode::from(2);
    };
    let note = std::env::var_os(NOTE_DIR).map(PathBuf::from);
    let mut child = match std::process::Command::new(program)
        .args(rest)
        .env_remove(NOTE_DIR)
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("{CANNOT_RUN}{program:?}: {e}");
            return std::process::ExitCode::from(CANNOT_RUN_CODE);
        }
    };
    std::thread::spawn(|| {
        // Blocks until the agent closes its end (it exited, or died).
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        let _ = killpg(nix::unistd::getpgrp(), Signal::SIGKILL);
    });
    let status = child.wait();
    if status.as_ref().is_ok_and(|s| s.success()) {
        note_finished(note.as_deref());
    }
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
            (None, Some(sig)) => {
                // Said in the task's log, so the agent tells it from an exit code of 128 + N
                // (the tester's: a SIGSEGV read "exit code 139").
                eprintln!("{KILLED_BY_SIGNAL}{sig}");
                std::process::ExitCode::from(u8::try_from(128 + sig).unwrap_or(1))
            }
            _ => std::process::ExitCode::from(1),
        },
        Err(_) => std::process::ExitCode::from(1),
    }
}

/// Notes the run (`IFC_TASK_ID` under `IFC_FENCING_TOKEN`, as the agent set them) as
/// finished in the session's outbox under `dir`.
fn note_finished(dir: Option<&Path>) {
    let (Some(dir), Ok(task), Ok(token)) = (
        dir,
        std::env::var("IFC_TASK_ID"),
        std::env::var("IFC_FENCING_TOKEN"),
    ) else {
        return;
    };
    let (Ok(task), Ok(token)) = (agent_core::TaskId::parse(&task), token.parse::<u64>()) else {
        return;
    };
    if let Err(e) = super::outbox::Outbox::new(dir).finished(&task, agent_core::FencingToken(token))
    {
        eprintln!(
            "ifc: cannot note the finished run of {task} in {}: {e}",
            dir.display()
        );
    }
}

/// Kills what a previous process of `session` left running on this host: the process groups
/// of task processes (their environment names the session, its log directory `log_dir`, a
/// task and a fencing token) whose shim is gone, other than this process's. A run outlives its agent only when the agent and its shim are both
/// killed (`kill -9` of both, `killall -9 ifc`); the session's next agent would run the task
/// again beside it (tester helper-10). Called once the session is registered here, so no
/// live agent of the session owns them. Returns what it killed, for the log.
pub fn kill_left_behind(session: &agent_core::SessionId, log_dir: &Path) -> Vec<String> {
    let ours = nix::unistd::getpgrp();
    let wanted = format!("IFC_SESSION_ID={session}");
    let mut dir = format!("{LOG_DIR}=").into_bytes();
    let Ok(log_dir) = std::fs::canonicalize(log_dir) else {
        return Vec::new(); // no log directory yet: nothing ran here
    };
    dir.extend_from_slice(log_dir.as_os_str().as_encoded_bytes());
    let mut groups = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // Another user's processes do not read: not ours.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        let has = |prefix: &str| vars.iter().find(|v| v.starts_with(prefix.as_bytes()));
        let here = vars.contains(&dir.as_slice());
        let task = match (has(&wanted), has("IFC_FENCING_TOKEN="), has("IFC_TASK_ID=")) {
            (Some(v), Some(_), Some(task)) if here && v.len() == wanted.len() => {
                String::from_utf8_lossy(&task["IFC_TASK_ID=".len()..]).into_owned()
            }
            _ => continue,
        };
        match nix::unistd::getpgid(Some(Pid::from_raw(pid))) {
            // A group whose leader, the shim, still runs is its agent's (a process taken over
            // finishes its run) or ends with it: the shim kills it when the agent goes.
            Ok(group) if group != ours && !running(group) => {
                groups.insert(group, task);
            }
            _ => {}
        }
    }
    groups
        .into_iter()
        .filter(|(group, _)| killpg(*group, Signal::SIGKILL).is_ok())
        .map(|(group, task)| format!("{task} (process group {group})"))
        .collect()
}

/// Whether process `pid` runs (exists and is not a zombie waiting to be reaped).
fn running(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// Checks that the session's command can be started: its program exists and may be executed
/// (a path relative to the session's `workdir`, or found on `PATH`). An agent whose command
/// cannot start would claim task after task only to give each back (the tester's report: 18
/// claims and releases, a migrated claim of the session's released on the way).
pub fn check_command(session: &SessionFile) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let Some(program) = session.command.first() else {
        return Err("the session file's command is empty".into());
    };
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let program_path = Path::new(program);
    if program.contains('/') {
        let base = session
            .workdir
            .clone()
            .unwrap_or_else(|| PathBuf::from("."));
        let full = base.join(program_path);
        if runnable(&full) {
            return Ok(());
        }
        let why = if full.exists() {
            "it is not an executable file"
        } else {
            "no such file"
        };
        let shown = std::path::absolute(&full).unwrap_or(full);
        return Err(format!(
            "the session file's command {program:?} cannot be run: {why} ({})",
            shown.display()
        ));
    }
    let path = session
        .env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| runnable(&dir.join(program_path))) {
        return Ok(());
    }
    Err(format!(
        "the session file's command {program:?} cannot be run: not found on PATH"
    ))
}

/// A running task.
#[derive(Debug)]
pub struct TaskProcess {
    pub claim: Claim,
    child: tokio::process::Child,
    /// The shim's pid, which is the task's process group.
    group: Option<Pid>,
    /// The write end of the shim's stdin: dropping it (or the agent dying) ends the task.
    _lifeline: Option<tokio::process::ChildStdin>,
    pub log: PathBuf,
    started: Instant,
    last_size: u64,
    last_progress: Instant,
    /// Why we killed it, if we did.
    pub killed: Option<String>,
    /// How it ended, once it has: `exit code 7`, `killed by signal 9`, or why it could not start.
    pub ended: Option<String>,
}

/// What the shim prints (into the task's log) when the command cannot be started.
const CANNOT_RUN: &str = "ifc: cannot run ";
/// The shim's exit code then (as a shell's for a command not found).
const CANNOT_RUN_CODE: u8 = 127;
/// What the shim prints (into the task's log) when the command was killed by a signal.
const KILLED_BY_SIGNAL: &str = "ifc: the command was killed by signal ";

impl TaskProcess {
    /// Starts `session.command` for `claim`, logging to `log_dir/<task>-<token>.log`.
    pub fn start(
        session: &SessionFile,
        claim: &Claim,
        backend: &str,
        log_dir: &Path,
    ) -> std::io::Result<TaskProcess> {
        std::fs::create_dir_all(log_dir)?;
        // Task ids are validated ([A-Za-z0-9._:-]), so this is a plain file name.
        let log = log_dir.join(format!("{}-{}.log", claim.task, claim.token));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg(SHIM)
            .args(&session.command)
            .envs(&session.env)
            .env("IFC_TASK_ID", claim.task.as_str())
            .env("IFC_SESSION_ID", claim.session.as_str())
            .env("IFC_FENCING_TOKEN", claim.token.to_string())
            .env("IFC_BACKEND", backend)
            .env(LOG_DIR, std::fs::canonicalize(log_dir)?)
            .env(NOTE_DIR, log_dir)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &session.workdir {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn()?;
        let group = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);
        let lifeline = child.stdin.take();
        let now = Instant::now();
        Ok(TaskProcess {
            claim: claim.clone(),
            child,
            group,
            _lifeline: lifeline,
            log,
            started: now,
            last_size: 0,
            last_progress: now,
            killed: None,
            ended: None,
        })
    }

    /// Waits for the process to end; `true` if it exited 0 and was not killed by us. What the
    /// command left running in its process group (`cmd &`) is killed then: a finished task
    /// leaves nothing behind (issue 15 #6). The group outlives its reaped leader while it has
    /// members, and its id is not reused meanwhile.
    pub async fn wait(&mut self) -> bool {
        let status = self.child.wait().await;
        if let Some(group) = self.group.take() {
            let _ = killpg(group, Signal::SIGKILL);
        }
        self.ended = Some(self.how_it_ended(&status));
        self.killed.is_none() && status.is_ok_and(|s| s.success())
    }

    /// `exit code 7`, `killed by signal 9`, or the shim's word that the command could not be
    /// started (the only line of the log then): the tester's report, a command that cannot
    /// start showed only as `success=false`, its reason in the task's log.
    fn how_it_ended(&self, status: &std::io::Result<std::process::ExitStatus>) -> String {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Err(e) => format!("cannot wait for it: {e}"),
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) if code == i32::from(CANNOT_RUN_CODE) => {
                    let said = std::fs::read_to_string(&self.log).unwrap_or_default();
                    match said.lines().next().filter(|l| l.starts_with(CANNOT_RUN)) {
                        Some(line) if said.lines().count() == 1 => {
                            line.trim_start_matches("ifc: ").to_owned()
                        }
                        _ => format!("exit code {code}"),
                    }
                }
                (Some(code), _) if code > 128 => {
                    let said = std::fs::read_to_string(&self.log).unwrap_or_default();
                    let signal = said
                        .lines()
                        .last()
                        .and_then(|l| l.strip_prefix(KILLED_BY_SIGNAL))
                        .filter(|n| n.parse::<i32>().is_ok_and(|n| n == code - 128));
                    match signal {
                        Some(n) => format!("killed by signal {n}"),
                        None => format!("exit code {code}"),
                    }
                }
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "ended".to_owned(),
            },
        }
    }

    /// Whether the command could not be started at all (a missing or unexecutable program).
    pub fn never_started(&self) -> bool {
        self.ended
            .as_deref()
            .is_some_and(|e| e.starts_with("cannot run "))
    }

    /// Kills the whole process group now. A command that has exited already (the agent, busy
    /// in a call to a store that does not answer, has not seen its end yet) finished on its own:
    /// it is not counted as killed (the tester's report: a run that had finished was recorded as
    /// killed when its claim was lost a moment later, and ran again).
    pub fn kill(&mut self, reason: &str) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if self.killed.is_none() {
            self.killed = Some(reason.to_owned());
            // The task's own log says it too (the tester's: a task_timeout kill left no line
            // there).
            if let Ok(mut log) = std::fs::OpenOptions::new().append(true).open(&self.log) {
                use std::io::Write;
                let _ = writeln!(log, "ifc: killed: {reason}");
            }
        }
        if let Some(group) = self.group {
            let _ = killpg(group, Signal::SIGKILL);
        }
    }

    /// Kills the task if it ran past `timeout` or printed nothing for `stall`.
    pub fn check_limits(&mut self, timeout: Option<Duration>, stall: Option<Duration>) {
        if self.killed.is_some() {
            return;
        }
        let now = Instant::now();
        if let Some(t) = timeout.filter(|t| now.duration_since(self.started) > *t) {
            self.kill(&format!("ran longer than task_timeout {t:?}"));
            return;
        }
        let size = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        if size != self.last_size {
            self.last_size = size;
            self.last_progress = now;
        } else if let Some(s) = stall.filter(|s| now.duration_since(self.last_progress) > *s) {
            self.kill(&format!("printed nothing for stall_timeout {s:?}"));
        }
    }
}
