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

/// Runs in the shim process: start the command in this process group, and kill the group when
/// stdin (held by the agent) closes. Exits with the command's status.
pub fn shim(argv: &[String]) -> std::process::ExitCode {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let Some((program, rest)) = argv.split_first() else {
        return std::process::ExitCode::from(2);
    };
    let mut child = match std::process::Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("ifc: cannot run {program:?}: {e}");
            return std::process::ExitCode::from(127);
        }
    };
    std::thread::spawn(|| {
        // Blocks until the agent closes its end (it exited, or died).
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        let _ = killpg(nix::unistd::getpgrp(), Signal::SIGKILL);
    });
    match child.wait() {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
            (None, Some(sig)) => std::process::ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
            _ => std::process::ExitCode::from(1),
        },
        Err(_) => std::process::ExitCode::from(1),
    }
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
}

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
        self.killed.is_none() && status.is_ok_and(|s| s.success())
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
