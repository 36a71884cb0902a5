//! `ifc agent`: one session process. Reads the session and fleet files, connects to the backend
//! the mode names, and drives the pure claim loop (`agent_core::claim_loop`): one `select!` over
//! backend events, the task process, timers and shutdown signals; each output of the loop is run
//! here and its result fed back as an input.

mod config_watch;
mod logs;
mod outbox;
mod task;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agent_core::claim_loop::{ClaimLoop, Input, Output, Plan};
use agent_core::config::{FleetFile, Mode, SessionFile};
use agent_core::router::Router;
use agent_core::{
    Backend, BackendError, BackendEvent, ClaimOutcome, Presence, ReleaseOutcome, Subscription,
    TaskId, TaskStatus,
};
use anyhow::{Context, Result};
use backend_git::GitBackend;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::cli::{AgentArgs, Global};
use crate::history::History;
use crate::metrics::{self, Metrics};
use crate::settings::{self, config_error};

use config_watch::ConfigWatch;
use task::TaskProcess;
pub use task::{shim, SHIM};

/// Where the fleet file lives in the coordination repo: a `rollback: true` committed there
/// reaches every session through its git poll, even one whose etcd is down.
const REPO_FLEET_FILE: &str = "config/coordinator.yaml";

/// How often an agent on etcd rewrites its presence (git: the STATUS heartbeat does it).
const PRESENCE_REFRESH: Duration = Duration::from_secs(3);

/// Runs the agent until shutdown (or, with `--until-done`, until the list is done).
pub async fn run(g: &Global, args: &AgentArgs) -> Result<u8> {
    let session = SessionFile::load(&args.config).map_err(config_error)?;
    task::check_command(&session)
        .map_err(|why| BackendError::InvalidInput(format!("{}: {why}", args.config.display())))?;
    let fleet = settings::fleet(g)?;
    let id = session.session_id.clone();
    let (mode, source) = settings::mode(g, Some(&id), Some(&session), fleet.as_ref());
    if mode != Mode::Coordinator && fleet.as_ref().is_some_and(|f| f.git.retired) {
        tracing::warn!(session = %id, mode = mode.as_str(), "the fleet file declares git retired (git.retired: true), yet this session runs on git: coordinator sessions no longer record their claims there, so a task on both lists can run twice");
    }
    let lease_ttl = session.lease_ttl.map_or(Duration::from_secs(10), |d| d.0);
    if lease_ttl < Duration::from_secs(2) {
        // etcd counts leases in whole seconds and renews at a third of the TTL: below 2 s a
        // renewal has no time to land (the tester's: `lease_ttl: 1ms` was taken silently).
        return Err(BackendError::InvalidInput(format!(
            "{}: lease_ttl is under 2s ({} ms): at least 2s",
            args.config.display(),
            lease_ttl.as_millis()
        ))
        .into());
    }
    // `/health` answers from the start: 503 with the reason while the store is waited for.
    let metrics = Arc::new(Metrics::new());
    let health = metrics::Source::waiting("connecting to the task store");
    if let Some(addr) = args.metrics_addr {
        metrics::serve(addr, Arc::clone(&metrics), Arc::clone(&health)).await?;
    }
    let waiting = |why: &str| health.set_waiting(why);
    let purpose = settings::Purpose::Agent { waiting: &waiting };
    let (router, git) =
        settings::open_router(g, fleet.as_ref(), Some(&id), Some(lease_ttl), mode, purpose).await?;
    let backend = Arc::new(router);
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".ifc/logs").join(id.as_str()));
    let plan = Plan {
        session: id.clone(),
        patterns: session.tasks.clone(),
        max_attempts: session.max_attempts.unwrap_or(3),
        retry_backoff: Duration::from_secs(1),
        until_done: args.until_done,
    };
    let presence = Presence {
        session_id: id.clone(),
        state: "idle".into(),
        current_task: None,
        backend: backend.serving_name().into(),
        started_at: chrono::Utc::now(),
        pid: std::process::id(),
        host: agent_core::process::hostname(),
        version: env!("CARGO_PKG_VERSION").into(),
        heartbeat: None,
        claim_p95_us: None,
    };
    // One process per session id: a second agent with the same session file stops here. A store
    // that does not answer is waited for, as at the start (a git remote away at that moment
    // ended the agent with exit 3).
    if let Some(other) = settings::wait_for(
        "the session's registration",
        backend.serving_name(),
        false,
        &waiting,
        || backend.register(&presence, args.take_over),
    )
    .await
    .context("cannot register the session")?
    {
        // Whatever one store took of the registration goes with this process's leases.
        backend.close().await;
        return Err(BackendError::SessionElsewhere {
            session: id.to_string(),
            elsewhere: format!(
                "{} (stop it first, or pass --take-over to fence it and run here)",
                agent_core::process::describe(&other)
            ),
        }
        .into());
    }
    tracing::info!(session = %id, mode = mode.as_str(), from = %source, backend = backend.serving_name(), "agent started");
    for run in task::kill_left_behind(&id, &log_dir) {
        tracing::warn!(session = %id, run = %run, "killed a run that a previous process of the session left running (its agent and supervisor were killed together): it would have run beside this one");
    }
    if fleet.as_ref().is_some_and(|f| f.slo.is_some()) && mode != Mode::Hybrid {
        tracing::info!(session = %id, mode = mode.as_str(), "the fleet file's slo: applies to hybrid sessions only: not to this one");
    }
    // A store that went away between the registration and here is waited for too (seed
    // 2000002: etcd killed in that instant, and a hybrid agent exited for good); a hybrid
    // router meanwhile moves to git and subscribes there.
    // The session hears of its own tasks and what they wait for, not the whole board.
    let interest = agent_core::Interest::tasks(session.tasks.clone());
    let sub = settings::wait_for(
        "the task store's changes",
        backend.serving_name(),
        false,
        &waiting,
        || backend.subscribe_to(&interest),
    )
    .await
    .context("cannot subscribe to task changes")?;
    let mut watched: Vec<&std::path::Path> = vec![&args.config];
    if let Some(f) = &g.fleet {
        watched.push(f);
    }
    let watch = match ConfigWatch::start(&watched) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "config files are not watched: mode changes need a restart");
            None
        }
    };
    let router = Arc::clone(&backend);
    let totals: metrics::Totals = Arc::new(move || (router.reconnects(), router.stats()));
    health.set(backend.clone(), totals);
    let history = g.history.as_deref().map(History::open).transpose()?;
    let lp = ClaimLoop::new(plan);
    let driver = Driver {
        session,
        config_path: args.config.clone(),
        global_mode: g.mode.map(Mode::from),
        fleet_path: g.fleet.clone(),
        git,
        repo_rollback: false,
        mode,
        backend,
        outbox: outbox::Outbox::new(&log_dir),
        logs: logs::TaskLogs::open(&log_dir, args.keep_logs),
        inheriting: true,
        log_dir,
        lp,
        running: None,
        wake: None,
        drain_until: None,
        presence,
        metrics,
        awaited: HashMap::new(),
        history,
        evicted: false,
        idle_unsaid: false,
        said_restart: Vec::new(),
        warned: HashMap::new(),
    };
    driver.run(sub, watch).await
}

struct Driver {
    session: SessionFile,
    /// Finished runs whose completion the store has not answered yet.
    outbox: outbox::Outbox,
    /// The claims of the session's previous process are not ended yet (its finished runs are
    /// not all reported, or ending them failed): tried again every few seconds.
    inheriting: bool,
    config_path: PathBuf,
    /// `--mode`/`IFC_MODE`, fixed for the process.
    global_mode: Option<Mode>,
    fleet_path: Option<PathBuf>,
    /// The git board, when configured: its poll also brings the repo's fleet file.
    git: Option<Arc<GitBackend>>,
    /// `rollback: true` in the fleet file committed to the coordination repo.
    repo_rollback: bool,
    mode: Mode,
    backend: Arc<Router>,
    log_dir: PathBuf,
    /// The task logs in `log_dir`, pruned to `--keep-logs`.
    logs: logs::TaskLogs,
    lp: ClaimLoop,
    running: Option<TaskProcess>,
    wake: Option<Instant>,
    drain_until: Option<Instant>,
    presence: Presence,
    metrics: Arc<Metrics>,
    /// This session's own transitions whose events have not arrived yet: the event latency.
    awaited: HashMap<TaskId, (TaskStatus, Instant)>,
    history: Option<History>,
    /// Another process took the session over: this one stops (exit 5).
    evicted: bool,
    /// A task was released and "idle" not published yet: said once the inputs are worked
    /// through and no task runs (a busy session that goes straight on to its next task writes
    /// its presence once per task, not twice).
    idle_unsaid: bool,
    /// The keys of the session file last said to need a restart (said again when they change).
    said_restart: Vec<&'static str>,
    /// The last failure warned about for each (task, operation): the same failure again (a
    /// board that stays broken for minutes) is logged at debug, not once a second.
    warned: HashMap<(TaskId, &'static str), String>,
}

impl Driver {
    /// Whether a failure of `operation` on `task` is new (warn about it) or the one warned
    /// about last time; a success forgets it.
    fn first_warning(
        &mut self,
        task: &TaskId,
        operation: &'static str,
        error: Option<&str>,
    ) -> bool {
        let key = (task.clone(), operation);
        match error {
            None => {
                self.warned.remove(&key);
                false
            }
            Some(e) => self.warned.insert(key, e.to_owned()).as_deref() != Some(e),
        }
    }

    /// Reports the runs a previous agent of this session finished but was killed before
    /// reporting: under the old run's fencing token, so the store accepts the completion only if
    /// nobody claimed or changed the task since (the run was done once: it is not done again).
    /// `true` once no note is left (each reported or refused), `false` while a store did not
    /// answer.
    async fn report_finished_runs(&mut self) -> bool {
        let session = self.session.session_id.clone();
        let mut settled = true;
        for (task, token) in self.outbox.pending() {
            match self
                .backend
                .release(
                    &task,
                    &session,
                    agent_core::ReleaseTo::Complete,
                    Some(token),
                )
                .await
            {
                Ok(ReleaseOutcome::Released { .. }) => {
                    tracing::info!(%task, %session, %token, "reported the completion of a run the session's previous agent finished");
                    self.record(task.as_str(), "complete", Some(token.0), None);
                    self.outbox.reported(&task);
                }
                Ok(other) => {
                    tracing::warn!(%task, %session, %token, outcome = %other, "a run the session's previous agent finished cannot be reported: the task changed since");
                    self.record(task.as_str(), "refused", Some(token.0), None);
                    self.outbox.reported(&task);
                }
                Err(e) => {
                    settled = false;
                    tracing::warn!(%task, %session, %token, error = %e, "cannot report a run the session's previous agent finished yet: tried again in a few seconds");
                }
            }
        }
        settled
    }

    /// Reports what the session's previous process finished, then ends the claims it left
    /// (`Backend::end_inherited`): only once every report is settled, or a session waiting for
    /// a finished task could claim it in between and run it again (seed 411000003: etcd paused
    /// at the restart, the report failed, and the git claim was freed all the same).
    async fn settle_inheritance(&mut self) {
        if !self.inheriting || !self.report_finished_runs().await {
            return;
        }
        match self.backend.end_inherited().await {
            Ok(()) => self.inheriting = false,
            Err(e) => {
                tracing::warn!(session = %self.session.session_id, error = %e, "cannot end the claims left by the session's previous process yet: tried again in a few seconds");
            }
        }
    }

    /// Publishes what the session is doing (working on `task`, or idle).
    async fn announce(&mut self, task: Option<&agent_core::TaskId>) {
        self.idle_unsaid = false;
        self.presence.state = if task.is_some() { "working" } else { "idle" }.into();
        self.presence.current_task = task.cloned();
        self.presence.claim_p95_us = self
            .metrics
            .claim_p95()
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        match self.backend.announce(&self.presence).await {
            Ok(()) => {}
            Err(e @ BackendError::SessionElsewhere { .. }) => self.evict(&e.to_string()),
            Err(e) => {
                tracing::warn!(session = %self.presence.session_id, error = %e, "cannot publish the session's presence")
            }
        }
    }

    /// Another process took the session over: this one claims nothing more and shuts down
    /// (exit 5). Logged and recorded once.
    fn evict(&mut self, why: &str) {
        if !self.evicted {
            tracing::error!(session = %self.session.session_id, reason = why, "taken over: stopping");
            self.record("", "evicted", None, None);
        }
        self.evicted = true;
    }

    /// Re-reads the session and fleet files (and the repo's rollback flag) and switches mode
    /// live when the answer changed. A file that no longer parses changes nothing.
    async fn reconsider(&mut self) {
        // An editor that truncates and then writes shows a half-written file for a moment (the
        // tester's: a spurious ERROR on every save): it is read again before it counts.
        let mut loaded = SessionFile::load(&self.config_path);
        if loaded.is_err() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            loaded = SessionFile::load(&self.config_path);
        }
        let session = match loaded {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "the session file is not valid: keeping the current mode");
                return;
            }
        };
        let keys = self.session.changes_needing_restart(&session);
        if keys != self.said_restart {
            if !keys.is_empty() {
                tracing::warn!(session = %self.session.session_id, keys = %keys.join(", "), "the session file changed where a running agent keeps what it started with (only mode: switches live): restart the agent to use the new values");
            }
            self.said_restart = keys;
        }
        let mut fleet = match &self.fleet_path {
            Some(p) => match FleetFile::load(p) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::error!(error = %e, "the fleet file is not valid: keeping the current mode");
                    return;
                }
            },
            None => None,
        };
        if self.repo_rollback {
            fleet.get_or_insert_with(FleetFile::default).rollback = true;
        }
        // An edited `slo:` applies at once (checked when the file was read).
        let objective = fleet
            .as_ref()
            .and_then(|f| f.slo.as_ref())
            .and_then(|s| s.objective().ok());
        self.backend.set_objective(objective).await;
        let id = self.session.session_id.clone();
        let (mode, source) = agent_core::config::mode_for(
            Some(&id),
            self.global_mode,
            Some(&session),
            fleet.as_ref(),
        );
        if mode == self.mode {
            return;
        }
        tracing::warn!(session = %id, from = self.mode.as_str(), to = mode.as_str(), because = %source, "switching mode");
        match self.backend.set_mode(mode).await {
            Ok(()) => {
                self.mode = mode;
                self.record("", &format!("mode:{}", mode.as_str()), None, None);
                tracing::warn!(session = %id, mode = mode.as_str(), backend = self.backend.serving_name(), "mode switched");
            }
            Err(e) => tracing::error!(session = %id, error = %e, "cannot switch mode"),
        }
    }

    /// Appends to the history, when there is one; `task` is empty for what concerns the whole
    /// session (a switch of store or of mode).
    fn record(&self, task: &str, event: &str, token: Option<u64>, success: Option<bool>) {
        if let Some(h) = &self.history {
            let backend = self.backend.serving_name();
            h.log(
                self.session.session_id.as_str(),
                task,
                event,
                token,
                Some(backend),
                success,
            );
        }
    }

    /// A claim, timed and counted.
    async fn timed_claim(
        &mut self,
        task: &TaskId,
        session: &agent_core::SessionId,
    ) -> agent_core::BackendResult<ClaimOutcome> {
        let started = std::time::Instant::now();
        let result = self.backend.claim(task, session).await;
        let outcome = match &result {
            Ok(ClaimOutcome::Won(_)) => "won",
            Ok(ClaimOutcome::Lost { .. }) => "lost",
            Ok(ClaimOutcome::NotClaimable { .. }) => "not_claimable",
            Ok(ClaimOutcome::NotFound) => "not_found",
            Err(_) => "error",
        };
        self.metrics
            .claim(self.backend.serving_name(), outcome, started.elapsed());
        if outcome != "won" {
            self.record(task.as_str(), outcome, None, None);
        }
        if let Ok(ClaimOutcome::Won(c)) = &result {
            self.record(task.as_str(), "won", Some(c.token.0), None);
            self.awaited
                .insert(task.clone(), (TaskStatus::Claimed, Instant::now()));
        }
        result
    }

    /// An event of one of this session's own transitions: how long it took to arrive.
    fn heard(&mut self, e: &agent_core::TaskEvent) {
        let mine = self
            .awaited
            .get(&e.task)
            .is_some_and(|(status, _)| e.new_status == Some(*status));
        if mine {
            // One that took longer than this crossed a switch of store: not an event latency.
            if let Some((_, at)) = self
                .awaited
                .remove(&e.task)
                .filter(|(_, at)| at.elapsed() < Duration::from_secs(10))
            {
                self.metrics.event(at.elapsed());
            }
        }
    }

    /// Reads the fleet file committed to the coordination repo; `true` if its rollback flag
    /// changed.
    async fn poll_repo_rollback(&mut self) -> bool {
        let Some(git) = &self.git else { return false };
        let rollback = match git.read_file(REPO_FLEET_FILE, false).await {
            Ok(Some(bytes)) => {
                let text = String::from_utf8_lossy(&bytes);
                match FleetFile::parse(std::path::Path::new(REPO_FLEET_FILE), &text) {
                    Ok(f) => f.rollback,
                    Err(e) => {
                        tracing::warn!(error = %e, "the coordination repo's fleet file is not valid: ignored");
                        return false;
                    }
                }
            }
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the coordination repo's fleet file");
                return false;
            }
        };
        let changed = rollback != self.repo_rollback;
        self.repo_rollback = rollback;
        changed
    }

    async fn run(mut self, mut sub: Subscription, mut watch: Option<ConfigWatch>) -> Result<u8> {
        let mut repo_poll = tokio::time::interval(Duration::from_secs(1));
        let mut sigterm = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut sigint = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let mut limits = tokio::time::interval(Duration::from_millis(500));
        // Only then are the claims of the session's gone previous process freed: a run it
        // finished is reported first, not claimed by another session in between and run again.
        self.settle_inheritance().await;
        self.warn_unreadable(&sub.snapshot.corrupt);
        let mut inputs = VecDeque::from([Input::Snapshot(sub.snapshot.tasks.clone())]);
        let grace = self
            .session
            .shutdown_grace
            .map_or(Duration::from_secs(30), |d| d.0);
        // The presence is refreshed now and then: it comes back after a lease loss, and a
        // process whose session was taken over elsewhere learns it here.
        let mut presence_tick = tokio::time::interval(PRESENCE_REFRESH);
        presence_tick.tick().await;
        let mut inherit_tick = tokio::time::interval(PRESENCE_REFRESH);
        inherit_tick.tick().await;
        let mut stopping = false;
        loop {
            if self.evicted && !stopping {
                stopping = true;
                inputs.push_back(Input::Shutdown);
            }
            while let Some(input) = inputs.pop_front() {
                for output in self.lp.step(input, Instant::now()) {
                    let what = store_step(&output);
                    let step = self.execute(output, grace, &mut inputs);
                    if let Some(code) = said_if_slow(what, step).await {
                        let code = if self.evicted {
                            crate::exit::ELSEWHERE
                        } else {
                            code
                        };
                        if let Some(t) = self.running.as_mut() {
                            t.kill("the agent is exiting");
                        }
                        self.backend.close().await;
                        // Transitions git never took: the exit says the fleet is not in step.
                        let code = if self.backend.mirror_pending() {
                            crate::exit::INFRA
                        } else {
                            code
                        };
                        let served: Vec<String> = self
                            .backend
                            .served()
                            .iter()
                            .map(|((op, b), n)| format!("{op}@{b}={n}"))
                            .collect();
                        tracing::info!(session = %self.session.session_id, code, served = %served.join(" "), "agent exiting {}", self.metrics.summary());
                        exit_within(EXIT_LIMIT, code);
                        return Ok(code);
                    }
                }
            }
            if self.idle_unsaid && self.running.is_none() {
                self.announce(None).await;
            }
            let wake = self.wake;
            let drain = self.drain_until;
            tokio::select! {
                event = sub.next() => match event {
                    Some(BackendEvent::Task(e)) => {
                        self.heard(&e);
                        inputs.push_back(Input::Changed { task: e.task, status: e.new_status, holder: e.holder, blocked_by: Some(e.blocked_by) });
                    }
                    Some(BackendEvent::ClaimLost { task, session, token }) if session == self.session.session_id => {
                        // The token the task runs under (a claim carried across stores has one per store).
                        let running = self.running.as_ref().filter(|t| t.claim.task == task).map(|t| t.claim.token.0);
                        if running.is_some() {
                            tracing::warn!(%task, %session, "claim lost: stopping the task, it will not be reported done");
                        } else {
                            tracing::warn!(%task, %session, "claim lost; a run of it that finished is still reported, and counts if nobody claimed the task since");
                        }
                        self.record(task.as_str(), "fenced", Some(running.unwrap_or(token.0)), None);
                        inputs.push_back(Input::Lost { task });
                    }
                    Some(BackendEvent::Instructions { path, .. }) => tracing::info!(%path, "new instructions file"),
                    Some(BackendEvent::SessionTaken { session, by }) if session == self.session.session_id => {
                        self.evict(&format!("now run by {}", agent_core::process::describe(&by)));
                    }
                    Some(BackendEvent::Resync(listing)) => {
                        // Events awaited from the store left behind will not come.
                        self.awaited.clear();
                        self.record("", "switch", None, None);
                        tracing::info!(session = %self.session.session_id, backend = self.backend.serving_name(), tasks = listing.tasks.len(), "task view replaced by the serving store's");
                        inputs.push_back(Input::Snapshot(listing.tasks));
                    }
                    Some(_) => {}
                    None => return Err(BackendError::Unavailable { endpoint: self.backend.name().into(), reason: "the event stream ended".into() }.into()),
                },
                success = wait(&mut self.running) => {
                    if let Some(t) = self.running.take() {
                        let ended = t.ended.as_deref().unwrap_or("ended");
                        match &t.killed {
                            Some(why) => tracing::warn!(task = %t.claim.task, reason = %why, log = %t.log.display(), "task killed"),
                            None if success => tracing::info!(task = %t.claim.task, success, log = %t.log.display(), "task exited"),
                            None if t.never_started() => tracing::error!(task = %t.claim.task, command = %self.session.command.join(" "), reason = %ended, "the session's command could not be started"),
                            None => tracing::warn!(task = %t.claim.task, how = %ended, log = %t.log.display(), "task failed"),
                        }
                        self.drain_until = None;
                        self.metrics.set_active_tasks(0);
                        self.record(t.claim.task.as_str(), "exit", Some(t.claim.token.0), Some(success));
                        if success {
                            if let Err(e) = self.outbox.finished(&t.claim.task, t.claim.token) {
                                tracing::warn!(task = %t.claim.task, error = %e, "cannot note the finished run: if this agent dies before reporting it, the task runs again");
                            }
                        }
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
                _ = changed(&mut watch) => self.reconsider().await,
                _ = repo_poll.tick(), if self.git.is_some() => {
                    if self.poll_repo_rollback().await {
                        self.reconsider().await;
                    }
                }
                _ = inherit_tick.tick(), if self.inheriting => self.settle_inheritance().await,
                _ = presence_tick.tick(), if self.backend.serving_name() == "etcd" => {
                    let task = self.presence.current_task.clone();
                    self.announce(task.as_ref()).await;
                }
                _ = sigterm.recv() => inputs.push_back(Input::Shutdown),
                _ = sigint.recv() => inputs.push_back(Input::Shutdown),
            }
        }
    }

    /// Says which records the session's list matches that cannot be read (tester helper-7: an
    /// agent whose tasks were overwritten with junk said nothing; they read as not there).
    fn warn_unreadable(&self, corrupt: &[agent_core::CorruptRecord]) {
        let ours: Vec<&str> = corrupt
            .iter()
            .filter(|c| {
                c.key
                    .rsplit('/')
                    .next()
                    .and_then(|id| TaskId::parse(id).ok())
                    .is_some_and(|id| self.session.tasks.iter().any(|p| p.matches(&id)))
            })
            .map(|c| c.key.as_str())
            .collect();
        if !ours.is_empty() {
            tracing::warn!(session = %self.session.session_id, records = %ours.join(", "), "records the session's list names cannot be read: their tasks are not claimed until they are fixed (`ifc status` says what is wrong)");
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
            // Taken over: nothing more is claimed; the shutdown comes first.
            Output::Claim(task) if self.evicted => {
                inputs.push_front(Input::ClaimFailed { task });
                inputs.push_front(Input::Shutdown);
            }
            // A run of it the previous process finished is not reported yet (a store did not
            // answer): claimed now, it would run again (seed 431000006: the remote was away at
            // the restart, and the restart claimed and ran the finished task).
            Output::Claim(task)
                if self.inheriting && self.outbox.pending().iter().any(|(t, _)| *t == task) =>
            {
                tracing::debug!(%task, %session, "not claimed while the run the previous agent finished is not reported");
                inputs.push_back(Input::ClaimFailed { task });
            }
            Output::Claim(task) => match self.timed_claim(&task, &session).await {
                Ok(outcome) => {
                    self.first_warning(&task, "claim", None);
                    tracing::info!(%task, %session, %outcome, backend = self.backend.serving_name(), "claim");
                    inputs.push_back(Input::Claimed { task, outcome });
                }
                Err(e @ BackendError::SessionElsewhere { .. }) => {
                    self.evict(&e.to_string());
                    inputs.push_back(Input::ClaimFailed { task });
                }
                Err(e) => {
                    if self.first_warning(&task, "claim", Some(&e.to_string())) {
                        tracing::warn!(%task, %session, error = %e, "claim failed; retrying later");
                    } else {
                        tracing::debug!(%task, %session, error = %e, "claim failed again");
                    }
                    inputs.push_back(Input::ClaimFailed { task });
                }
            },
            Output::Start(claim) => {
                match TaskProcess::start(&self.session, &claim, self.backend.name(), &self.log_dir)
                {
                    Ok(t) => {
                        tracing::info!(task = %claim.task, %session, token = %claim.token, log = %t.log.display(), "task started");
                        self.logs.started(t.log.clone());
                        self.record(claim.task.as_str(), "start", Some(claim.token.0), None);
                        self.running = Some(t);
                        self.metrics.set_active_tasks(1);
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
                        self.first_warning(&task, "release", None);
                        match &outcome {
                            ReleaseOutcome::Released { .. } => {
                                tracing::info!(%task, %session, status = %to.status(), "release");
                                let event = if to == agent_core::ReleaseTo::Complete {
                                    "complete"
                                } else {
                                    "release"
                                };
                                self.record(task.as_str(), event, token.map(|t| t.0), None);
                                self.metrics
                                    .release(self.backend.serving_name(), to.status().as_str());
                                self.awaited
                                    .insert(task.clone(), (to.status(), Instant::now()));
                            }
                            other => {
                                tracing::warn!(%task, %session, outcome = %other, "release changed nothing");
                                self.record(task.as_str(), "refused", token.map(|t| t.0), None);
                            }
                        }
                        // After the history line: killed in between, the next agent reports the
                        // completion again (the store answers `Released` again; the checker
                        // counts one completion per claim), not the history without it.
                        self.outbox.reported(&task);
                        let refused = !matches!(outcome, ReleaseOutcome::Released { .. });
                        inputs.push_back(Input::Released { task: task.clone() });
                        if refused {
                            // The store did not take our word: read what it says instead.
                            if let Ok(Some(t)) = self.backend.get(&task).await {
                                inputs.push_back(Input::Fetched(t));
                            }
                        }
                        self.idle_unsaid = true;
                    }
                    Err(e) => {
                        if self.first_warning(&task, "release", Some(&e.to_string())) {
                            tracing::warn!(%task, %session, error = %e, "release failed; retrying until it lands (the claim is kept)");
                        } else {
                            tracing::debug!(%task, %session, error = %e, "release failed again");
                        }
                        inputs.push_back(Input::ReleaseFailed { task });
                    }
                }
            }
            Output::Fetch(task) => match self.backend.get(&task).await {
                Ok(Some(t)) => inputs.push_back(Input::Fetched(t)),
                Ok(None) => inputs.push_back(Input::Missing(task)),
                Err(e) => tracing::warn!(%task, error = %e, "cannot read a changed task"),
            },
            Output::WakeAt(at) => self.wake = Some(self.wake.map_or(at, |w| w.min(at))),
            Output::Note(text) => tracing::info!(%session, "{text}"),
            Output::Warn(text) => tracing::warn!(%session, "{text}"),
            Output::Fatal(text) => tracing::error!(%session, "{text}"),
            Output::Exit(code) => return Some(code),
        }
        None
    }
}

/// How long one step on the stores (a claim, a release, a read) may take before the agent says
/// it is still waiting for it: a store that holds a step up (a git ref lock, etcd not
/// answering) shows in the log instead of as an agent gone quiet.
const SLOW_STEP: Duration = Duration::from_secs(15);

/// The step an output costs on the stores, named for the log (`None`: it costs none).
fn store_step(output: &Output) -> Option<String> {
    match output {
        Output::Claim(task) => Some(format!("claim {task}")),
        Output::Release { task, to, .. } => {
            Some(format!("release {task} as {}", to.status().as_str()))
        }
        Output::Fetch(task) => Some(format!("read {task}")),
        _ => None,
    }
}

/// Awaits `step`; when it names a store step that takes longer than `SLOW_STEP`, says once
/// what the agent waits for, and when it is over.
async fn said_if_slow<T>(what: Option<String>, step: impl std::future::Future<Output = T>) -> T {
    let Some(what) = what else { return step.await };
    tokio::pin!(step);
    tokio::select! {
        out = &mut step => return out,
        () = tokio::time::sleep(SLOW_STEP) => {}
    }
    tracing::warn!(step = %what, after = ?SLOW_STEP, "still waiting for this step on the stores");
    let started = Instant::now() - SLOW_STEP;
    let out = step.await;
    tracing::info!(step = %what, took = ?started.elapsed(), "the slow step is over");
    out
}

/// How long an agent that has decided to exit (its claims released, its mirror flushed) may
/// take to tear down before the process ends anyway.
const EXIT_LIMIT: Duration = Duration::from_secs(10);

/// Ends the process with `code` after `limit` if it has not ended by then: an agent whose
/// teardown hangs (seen once under load: exit 5 decided, the process still there 60 s later)
/// still exits with the code it decided.
fn exit_within(limit: Duration, code: u8) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        tracing::warn!(
            code,
            "the agent's teardown did not finish in {limit:?}: exiting now"
        );
        std::process::exit(i32::from(code));
    });
}

/// Waits for a config file change (forever when nothing is watched).
async fn changed(watch: &mut Option<ConfigWatch>) {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
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
