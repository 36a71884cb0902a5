//! Running a task's command: its own process group, output to a per-task log file, the task
//! passed only through the environment, and a parent-death signal so the process dies with its
//! agent even on `kill -9`. The command is started through `ifc __task-shim`, which sets that
//! signal on itself and then becomes the command (exec keeps it).

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

/// Runs in the shim process: die with the agent (`parent`), then become the command.
pub fn shim(args: &[String]) -> std::process::ExitCode {
    use std::os::unix::process::CommandExt;
    let Some((parent, argv)) = args.split_first() else {
        return std::process::ExitCode::from(2);
    };
    let Some((program, rest)) = argv.split_first() else {
        return std::process::ExitCode::from(2);
    };
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
        eprintln!("ifc: cannot set the parent-death signal");
        return std::process::ExitCode::from(126);
    }
    // The agent may have died before the signal was set: then nobody would kill us.
    if parent.parse::<i32>().ok() != Some(nix::unistd::getppid().as_raw()) {
        return std::process::ExitCode::from(126);
    }
    let err = std::process::Command::new(program).args(rest).exec();
    eprintln!("ifc: cannot run {program:?}: {err}");
    std::process::ExitCode::from(127)
}

/// A running task.
#[derive(Debug)]
pub struct TaskProcess {
    pub claim: Claim,
    child: tokio::process::Child,
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
            .arg(std::process::id().to_string())
            .args(&session.command)
            .envs(&session.env)
            .env("IFC_TASK_ID", claim.task.as_str())
            .env("IFC_SESSION_ID", claim.session.as_str())
            .env("IFC_FENCING_TOKEN", claim.token.to_string())
            .env("IFC_BACKEND", backend)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &session.workdir {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn()?;
        let now = Instant::now();
        Ok(TaskProcess {
            claim: claim.clone(),
            child,
            log,
            started: now,
            last_size: 0,
            last_progress: now,
            killed: None,
        })
    }

    /// Waits for the process to end; `true` if it exited 0 and was not killed by us.
    pub async fn wait(&mut self) -> bool {
        let status = self.child.wait().await;
        self.killed.is_none() && status.is_ok_and(|s| s.success())
    }

    /// Kills the whole process group now.
    pub fn kill(&mut self, reason: &str) {
        if self.killed.is_none() {
            self.killed = Some(reason.to_owned());
        }
        if let Some(pid) = self.child.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
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
