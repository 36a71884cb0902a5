//! `ifc agent`: one session process. Reads the session and fleet files, connects to the backend
//! the mode names, and drives the pure claim loop (`agent_core::claim_loop`): one `select!` over
//! backend events, the task process, timers and shutdown signals; each output of the loop is run
//! here and its result fed back as an input.

mod task;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agent_core::claim_loop::{ClaimLoop, Input, Output, Plan};
use agent_core::config::{FleetFile, SessionFile};
use agent_core::{Backend, BackendError, BackendEvent, Presence, ReleaseOutcome, Subscription};
use anyhow::{Context, Result};
use backend_etcd::EtcdBackend;
use backend_git::GitBackend;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::cli::{AgentArgs, Global, Mode};
use crate::settings;

use task::TaskProcess;
pub use task::{shim, SHIM};

/// What a config problem becomes: a usage error (exit 2) naming file, line and key.
fn config_error(e: agent_core::config::ConfigError) -> anyhow::Error {
    BackendError::InvalidInput(e.to_string()).into()
}

/// Runs the agent until shutdown (or, with `--until-done`, until the list is done).
pub async fn run(g: &Global, args: &AgentArgs) -> Result<u8> {
    let session = SessionFile::load(&args.config).map_err(config_error)?;
    let fleet = match &args.fleet {
        Some(path) => Some(FleetFile::load(path).map_err(config_error)?),
        None => None,
    };
    let mode = settings::mode(g, Some(&session), fleet.as_ref())?;
    let lease_ttl = session.lease_ttl.map_or(Duration::from_secs(10), |d| d.0);
    let backend: Arc<dyn Backend> = match mode {
        Mode::Coordinator => {
            let config = settings::etcd_config(g, fleet.as_ref(), Some(lease_ttl))?;
            Arc::new(
                EtcdBackend::connect(config)
                    .await
                    .context("cannot connect to etcd")?,
            )
        }
        Mode::Git => {
            let config = settings::git_config(g, fleet.as_ref(), Some(&session.session_id))?;
            Arc::new(
                GitBackend::open(config)
                    .await
                    .context("cannot open the git task board")?,
            )
        }
    };
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".ifc/logs").join(session.session_id.as_str()));
    let plan = Plan {
        session: session.session_id.clone(),
        patterns: session.tasks.clone(),
        max_attempts: session.max_attempts.unwrap_or(3),
        retry_backoff: Duration::from_secs(1),
        until_done: args.until_done,
    };
    tracing::info!(session = %session.session_id, backend = backend.name(), "agent started");
    let sub = backend
        .subscribe()
        .await
        .context("cannot subscribe to task changes")?;
    let presence = Presence {
        session_id: session.session_id.clone(),
        state: "idle".into(),
        current_task: None,
        backend: backend.name().into(),
        started_at: chrono::Utc::now(),
        pid: std::process::id(),
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let lp = ClaimLoop::new(plan);
    let mut driver = Driver {
        session,
        backend,
        log_dir,
        lp,
        running: None,
        wake: None,
        drain_until: None,
        presence,
    };
    driver.announce(None).await;
    driver.run(sub).await
}

struct Driver {
    session: SessionFile,
    backend: Arc<dyn Backend>,
    log_dir: PathBuf,
    lp: ClaimLoop,
    running: Option<TaskProcess>,
    wake: Option<Instant>,
    drain_until: Option<Instant>,
    presence: Presence,
}

impl Driver {
    /// Publishes what the session is doing (working on `task`, or idle).
    async fn announce(&mut self, task: Option<&agent_core::TaskId>) {
        self.presence.state = if task.is_some() { "working" } else { "idle" }.into();
        self.presence.current_task = task.cloned();
        if let Err(e) = self.backend.announce(&self.presence).await {
            tracing::warn!(session = %self.presence.session_id, error = %e, "cannot publish the session's presence");
        }
    }

    async fn run(mut self, mut sub: Subscription) -> Result<u8> {
        let mut sigterm = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut sigint = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let mut limits = tokio::time::interval(Duration::from_millis(500));
        let mut inputs = VecDeque::from([Input::Snapshot(sub.snapshot.tasks.clone())]);
        let grace = self
            .session
            .shutdown_grace
            .map_or(Duration::from_secs(30), |d| d.0);
        loop {
            while let Some(input) = inputs.pop_front() {
                for output in self.lp.step(input, Instant::now()) {
                    if let Some(code) = self.execute(output, grace, &mut inputs).await {
                        if let Some(t) = self.running.as_mut() {
                            t.kill("the agent is exiting");
                        }
                        self.backend.close().await;
                        tracing::info!(session = %self.session.session_id, code, "agent exiting");
                        return Ok(code);
                    }
                }
            }
            let wake = self.wake;
            let drain = self.drain_until;
            tokio::select! {
                event = sub.next() => match event {
                    Some(BackendEvent::Task(e)) => inputs.push_back(Input::Changed { task: e.task, status: e.new_status, holder: e.holder }),
                    Some(BackendEvent::ClaimLost { task, session, .. }) if session == self.session.session_id => {
                        tracing::warn!(%task, %session, "claim lost: stopping the task, it will not be reported done");
                        inputs.push_back(Input::Lost { task });
                    }
                    Some(BackendEvent::Instructions { path, .. }) => tracing::info!(%path, "new instructions file"),
                    Some(_) => {}
                    None => return Err(BackendError::Unavailable { endpoint: self.backend.name().into(), reason: "the event stream ended".into() }.into()),
                },
                success = wait(&mut self.running) => {
                    if let Some(t) = self.running.take() {
                        match &t.killed {
                            Some(why) => tracing::warn!(task = %t.claim.task, reason = %why, log = %t.log.display(), "task killed"),
                            None => tracing::info!(task = %t.claim.task, success, log = %t.log.display(), "task exited"),
                        }
                        self.drain_until = None;
                        inputs.push_back(Input::Exited { task: t.claim.task.clone(), success });
                    }
                }
                _ = sleep_until(wake) => {
                    self.wake = None;
                    inputs.push_back(Input::Tick);
                }
                _ = sleep_until(drain) => {
                    self.drain_until = None;
                    if let Some(t) = self.running.as_mut() {
                        t.kill("still running at the end of the shutdown grace period");
                    }
                }
                _ = limits.tick(), if self.running.is_some() => {
                    let (timeout, stall) = (self.session.task_timeout.map(|d| d.0), self.session.stall_timeout.map(|d| d.0));
                    if let Some(t) = self.running.as_mut() {
                        t.check_limits(timeout, stall);
                    }
                }
                _ = sigterm.recv() => inputs.push_back(Input::Shutdown),
                _ = sigint.recv() => inputs.push_back(Input::Shutdown),
            }
        }
    }

    /// Runs one output of the loop; returns an exit code when the agent is to stop.
    async fn execute(
        &mut self,
        output: Output,
        grace: Duration,
        inputs: &mut VecDeque<Input>,
    ) -> Option<u8> {
        let session = self.session.session_id.clone();
        match output {
            Output::Claim(task) => match self.backend.claim(&task, &session).await {
                Ok(outcome) => {
                    tracing::info!(%task, %session, ?outcome, "claim");
                    inputs.push_back(Input::Claimed { task, outcome });
                }
                Err(e) => {
                    tracing::warn!(%task, %session, error = %e, "claim failed; retrying later");
                    inputs.push_back(Input::ClaimFailed { task });
                }
            },
            Output::Start(claim) => {
                match TaskProcess::start(&self.session, &claim, self.backend.name(), &self.log_dir)
                {
                    Ok(t) => {
                        tracing::info!(task = %claim.task, %session, token = %claim.token, log = %t.log.display(), "task started");
                        self.running = Some(t);
                        self.announce(Some(&claim.task)).await;
                    }
                    Err(e) => {
                        tracing::error!(task = %claim.task, %session, error = %e, "cannot start the task's command");
                        inputs.push_back(Input::Exited {
                            task: claim.task,
                            success: false,
                        });
                    }
                }
            }
            Output::Kill { task, reason } => {
                if let Some(t) = self.running.as_mut().filter(|t| t.claim.task == task) {
                    t.kill(&reason);
                }
            }
            Output::Drain { task } => {
                tracing::info!(%task, %session, ?grace, "shutting down: letting the task finish");
                self.drain_until = Some(Instant::now() + grace);
            }
            Output::Release { task, to, token } => {
                match self.backend.release(&task, &session, to, token).await {
                    Ok(outcome) => {
                        match &outcome {
                            ReleaseOutcome::Released { .. } => {
                                tracing::info!(%task, %session, status = %to.status(), "release")
                            }
                            other => {
                                tracing::warn!(%task, %session, outcome = ?other, "release changed nothing")
                            }
                        }
                        let refused = !matches!(outcome, ReleaseOutcome::Released { .. });
                        inputs.push_back(Input::Released { task: task.clone() });
                        if refused {
                            // The store did not take our word: read what it says instead.
                            if let Ok(Some(t)) = self.backend.get(&task).await {
                                inputs.push_back(Input::Fetched(t));
                            }
                        }
                        self.announce(None).await;
                    }
                    Err(e) => {
                        tracing::warn!(%task, %session, error = %e, "release failed; retrying");
                        inputs.push_back(Input::ReleaseFailed { task });
                    }
                }
            }
            Output::Fetch(task) => match self.backend.get(&task).await {
                Ok(Some(t)) => inputs.push_back(Input::Fetched(t)),
                Ok(None) => {}
                Err(e) => tracing::warn!(%task, error = %e, "cannot read a changed task"),
            },
            Output::WakeAt(at) => self.wake = Some(self.wake.map_or(at, |w| w.min(at))),
            Output::Note(text) => tracing::info!(%session, "{text}"),
            Output::Exit(code) => return Some(code),
        }
        None
    }
}

/// Waits for the running task to exit (forever when there is none).
async fn wait(running: &mut Option<TaskProcess>) -> bool {
    match running {
        Some(t) => t.wait().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
