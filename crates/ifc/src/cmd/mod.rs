//! The operator commands over the backend the mode names (etcd or the git board): put, get, claim,
//! release, status, watch. Each returns the exit code of a normal outcome; failures are errors
//! mapped in `exit`.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use agent_core::{
    Backend, BackendError, BackendEvent, ClaimOutcome, FencingToken, PutOutcome, ReleaseOutcome,
    ReleaseTo, TaskId, TaskPatch,
};
use anyhow::Result;
use backend_etcd::EtcdBackend;

use crate::coordinator::Coordinator;
use serde_json::json;

use crate::cli::{ClaimArgs, Command, Global, Mode, Output, PutArgs, ReleaseArgs, ReleaseStatus};
use crate::exit;
use crate::history::History;
use crate::output::{event_json, event_line, printable, task_json, task_table};
use crate::settings;

mod archive;
mod bench;
mod bridge;
mod dev;
mod migrate;

/// The board `migrate`, `verify` and `export` work on: `--board FILE`, or (`in_repo`) the board
/// of the coordination repo the git settings name.
async fn board_source(g: &Global, in_repo: bool) -> Result<migrate::BoardSource> {
    if !in_repo {
        let file = g
            .git
            .board
            .clone()
            .unwrap_or_else(|| "docs/PHASE-0-TASK-BOARD.md".into());
        return Ok(migrate::BoardSource::File(file.into()));
    }
    let fleet = settings::fleet(g)?;
    let name = agent_core::SessionId::parse("ifc-migrate")?;
    let git = settings::open_git(g, fleet.as_ref(), Some(&name)).await?;
    Ok(migrate::BoardSource::Repo(git))
}

/// The etcd backend, for commands that move tasks between a board file and etcd.
/// Refuses a command that changes etcd alone while the fleet has a git side (git configured and
/// not retired): `instead` says what to do meanwhile.
fn no_git_side(g: &Global, instead: &str) -> Result<()> {
    let fleet = settings::fleet(g)?;
    if settings::git_configured(g, fleet.as_ref()) && !fleet.as_ref().is_some_and(|f| f.git.retired)
    {
        return Err(BackendError::InvalidInput(format!(
            "the fleet has a git side (git is configured and not retired): {instead}"
        ))
        .into());
    }
    Ok(())
}

/// The coordinator a command works on directly (`migrate`, `verify`, `export`, `delete`): etcd
/// or NATS.
async fn board_store(g: &Global, what: &str) -> Result<Coordinator> {
    let fleet = settings::fleet(g)?;
    if g.mode == Some(Mode::Git) {
        return Err(BackendError::InvalidInput(format!(
            "`ifc {what}` moves tasks between a board file and the coordinator: it has no git mode"
        ))
        .into());
    }
    let writes = matches!(what, "migrate" | "delete");
    settings::coordinator(g, fleet.as_ref(), writes).await
}

/// etcd, for a command that only etcd has (`archive`, which refuses git mode itself).
async fn etcd_only(g: &Global, what: &str) -> Result<EtcdBackend> {
    let fleet = settings::fleet(g)?;
    if settings::store(g, fleet.as_ref()) == crate::cli::Store::Nats {
        return Err(BackendError::InvalidInput(format!(
            "`ifc {what}` works with etcd only for now, not with --store nats"
        ))
        .into());
    }
    settings::connect_etcd(settings::etcd_config(g, fleet.as_ref(), None)?).await
}

/// Connects to the store(s) the mode names, behind the router.
async fn connect(g: &Global, command: &Command) -> Result<Arc<dyn Backend>> {
    let (session, ttl) = match command {
        Command::Claim(args) => (
            Some(&args.session),
            args.ttl.map(std::time::Duration::from_secs),
        ),
        Command::Release(args) => (Some(&args.session), None),
        _ => (None, None),
    };
    let fleet = settings::fleet(g)?;
    let (mode, _) = settings::mode(g, None, None, fleet.as_ref());
    if mode == agent_core::config::Mode::Git && ttl.is_some() {
        return Err(BackendError::InvalidInput(
            "--ttl is for coordinator mode: in git mode a claim lasts while its owner's STATUS heartbeat is fresh (--stale-after)".into(),
        )
        .into());
    }
    let writes = matches!(
        command,
        Command::Claim(_) | Command::Release(_) | Command::Put(_)
    );
    // The board server runs for long: like an agent, it waits for a store that does not answer
    // yet (started next to etcd, it may come up first).
    let purpose = match command {
        Command::Ui(_) => settings::Purpose::Agent { waiting: &|_| {} },
        _ => settings::Purpose::Command { writes },
    };
    let (router, _) = settings::open_router(g, fleet.as_ref(), session, ttl, mode, purpose).await?;
    Ok(Arc::new(router))
}

/// `ifc check-history`.
fn check_history(files: &[std::path::PathBuf], output: Output, out: &mut impl Write) -> Result<u8> {
    let (records, unreadable) = crate::history::read(files)?;
    let mut report = crate::history::check(&records);
    report.unreadable = unreadable;
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string(&report)?)?,
        Output::Table => {
            for (kind, list) in [
                ("concurrent run", &report.concurrent_runs),
                ("unclaimed completion", &report.unclaimed_completions),
                ("stale completion", &report.stale_completions),
                ("double completion", &report.double_completions),
                ("repeated run", &report.repeated_runs),
                ("lost task", &report.lost_tasks),
                ("unreadable line", &report.unreadable),
            ] {
                for v in list {
                    writeln!(out, "{kind}: {}", printable(v))?;
                }
            }
            writeln!(
                out,
                "{} records, {} tasks: {} violation(s)",
                report.records,
                report.tasks,
                report.violations()
            )?;
        }
    }
    Ok(if report.violations() == 0 {
        0
    } else {
        exit::NO
    })
}

/// Runs one command; returns its exit code.
pub async fn run(g: &Global, command: &Command) -> Result<u8> {
    let mut out = std::io::stdout().lock();
    let output = g.output;
    match command {
        Command::Agent(args) => crate::agent::run(g, args).await,
        Command::Migrate {
            dry_run,
            force,
            from_git,
        } => {
            let b = board_store(g, "migrate").await?;
            let source = board_source(g, *from_git).await?;
            migrate::migrate(&b, output, &source, *dry_run, *force, &mut out).await
        }
        Command::Delete { tasks, force } => {
            no_git_side(
                g,
                "delete the task's row from the board in a commit, and here once git.retired is true",
            )?;
            let b = board_store(g, "delete").await?;
            delete(&b, output, tasks, *force, &mut out).await
        }
        Command::Archive(args) => {
            // The board would still show the rows, and a bridge would bring them back.
            no_git_side(
                g,
                "the board keeps finished rows; `ifc archive` works once git.retired is true",
            )?;
            if g.mode == Some(Mode::Git) {
                return Err(BackendError::InvalidInput(
                    "`ifc archive` moves complete tasks out of etcd's live prefix: it has no git mode (a board keeps its rows)".into(),
                )
                .into());
            }
            let b = etcd_only(g, "archive").await?;
            if args.restore.is_empty() {
                archive::archive(&b, output, args.older_than, args.dry_run, &mut out).await
            } else {
                archive::restore(&b, output, &args.restore, &mut out).await
            }
        }
        Command::Verify { from_git } => {
            let b = board_store(g, "verify").await?;
            let source = board_source(g, *from_git).await?;
            migrate::verify(&b, output, &source, &mut out).await
        }
        Command::Export { push } => {
            let b = board_store(g, "export").await?;
            let target = board_source(g, *push).await?;
            migrate::export(&b, output, &target, &mut out).await
        }
        Command::Put(args) => {
            let h = history(g)?;
            put(
                &*connect(g, command).await?,
                output,
                args,
                h.as_ref(),
                &mut out,
            )
            .await
        }
        Command::Get { task } => get(&*connect(g, command).await?, output, task, &mut out).await,
        Command::Claim(args) => {
            let h = history(g)?;
            claim(
                &*connect(g, command).await?,
                output,
                args,
                h.as_ref(),
                &mut out,
            )
            .await
        }
        Command::Release(args) => {
            let h = history(g)?;
            release(
                &*connect(g, command).await?,
                output,
                args,
                h.as_ref(),
                &mut out,
            )
            .await
        }
        Command::Status => status(&*connect(g, command).await?, output, &mut out).await,
        Command::Watch => {
            drop(out);
            watch(&*connect(g, command).await?, output).await
        }
        Command::Ui(args) => {
            drop(out);
            crate::ui::serve(args.addr, output, connect(g, command)).await
        }
        Command::Bridge(args) => bridge::run(g, args, output, &mut out).await,
        Command::Audit => bridge::audit(g, output, &mut out).await,
        Command::Bench(args) => bench::run(g, args, output, &mut out).await,
        Command::CheckHistory { files } => check_history(files, output, &mut out),
        Command::Completion { shell } => {
            // Into a buffer first: the generator panics on a closed pipe (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut crate::cli::command(), "ifc", &mut script);
            out.write_all(&script)?;
            Ok(0)
        }
        Command::Man { command } => {
            let mut cli = crate::cli::command();
            cli.build(); // hands the global flags down to each command's page
            let page = match command {
                None => cli,
                Some(name) => {
                    let Some(sub) = cli.find_subcommand(name) else {
                        let known: Vec<&str> =
                            cli.get_subcommands().map(|c| c.get_name()).collect();
                        return Err(BackendError::InvalidInput(format!(
                            "no command {name:?}: one of {}",
                            known.join(", ")
                        ))
                        .into());
                    };
                    let page_name = format!("ifc-{name}");
                    sub.clone().name(page_name.clone()).bin_name(page_name)
                }
            };
            clap_mangen::Man::new(page).render(&mut out)?;
            Ok(0)
        }
        Command::Dev(args) => {
            drop(out);
            dev::run(args, settings::store(g, None)).await
        }
    }
}

/// The `--history` file, when one is named.
fn history(g: &Global) -> Result<Option<History>> {
    g.history.as_deref().map(History::open).transpose()
}

async fn put(
    b: &dyn Backend,
    output: Output,
    args: &PutArgs,
    history: Option<&History>,
    out: &mut impl Write,
) -> Result<u8> {
    let blocked_by = match &args.blocked_by {
        None => None,
        Some(ids) => Some(
            ids.iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| TaskId::parse(s.trim()))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    if let Some(blockers) = blocked_by.as_ref().filter(|_| !args.force) {
        check_blockers(b, &args.task, blockers).await?;
    }
    let patch = TaskPatch {
        title: args.title.clone(),
        status: args.status,
        blocked_by,
    };
    let outcome = settled("put", &args.task, || b.put(&args.task, &patch)).await?;
    let reopens = matches!(
        args.status,
        Some(agent_core::TaskStatus::Available | agent_core::TaskStatus::Blocked)
    );
    if let (Some(h), PutOutcome::Updated, true) = (history, &outcome, reopens) {
        // An operator's reopening: the task may run (and complete) once more.
        h.log(
            "ifc",
            args.task.as_str(),
            "reopened",
            None,
            Some(b.name()),
            None,
        );
    }
    let (word, code, holder) = match &outcome {
        PutOutcome::Created => ("created", 0, None),
        PutOutcome::Updated => ("updated", 0, None),
        PutOutcome::Unchanged => ("unchanged", 0, None),
        PutOutcome::Held { holder } => ("held", exit::NO, holder.clone()),
    };
    match output {
        Output::Json => writeln!(
            out,
            "{}",
            json!({"task_id": args.task.as_str(), "outcome": word, "holder": holder.as_ref().map(|h| h.as_str())})
        )?,
        Output::Table if code == 0 => writeln!(out, "{word} {}", args.task)?,
        Output::Table => {
            let who = holder.map_or("a session".into(), |h| h.to_string());
            writeln!(
                out,
                "{} is claimed by {who}: its status is changed by releasing it, not by put",
                args.task
            )?
        }
    }
    Ok(code)
}

/// Runs one write of a command; if its answer timed out (etcd may have applied it all the same),
/// runs it once more, and that answer says what is true: each write is safe to repeat (the
/// session's re-claim of a task it holds wins again, a repeated completion is `Released`, a put
/// already applied is `Unchanged`; issue 15 #3: `claim` said "timed out" and the task was claimed
/// for nobody's process). If the second times out too, the error says the outcome is unknown
/// and how to find it out.
async fn settled<T, F, Fut>(what: &str, task: &TaskId, mut write: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = agent_core::BackendResult<T>>,
{
    match write().await {
        Err(agent_core::BackendError::Timeout { .. }) => {}
        other => return Ok(other?),
    }
    tracing::warn!(%task, "{what} timed out and may have been applied: asking again");
    match write().await {
        Err(e @ agent_core::BackendError::Timeout { .. }) => Err(anyhow::Error::new(e).context(
            format!(
                "the {what} of {task} timed out twice: it may or may not have been applied; `ifc get {task}` shows what is stored"
            ),
        )),
        other => Ok(other?),
    }
}

/// Refuses blockers that would keep `task` from ever being claimable: one that does not exist
/// (at any depth), or a cycle anywhere in the chain (issue 15 #4: both were accepted silently,
/// and an agent waiting for the task retried it every second for ever; the tester's: a cycle
/// further up the chain, not through `task`, was accepted too).
async fn check_blockers(b: &dyn Backend, task: &TaskId, blockers: &[TaskId]) -> Result<()> {
    use agent_core::blockers::{path, stuck, Known, Stuck};
    // Every task the chain reaches, read once (`None`: missing).
    let mut met: BTreeMap<TaskId, Option<agent_core::Task>> = BTreeMap::new();
    let mut todo: Vec<TaskId> = blockers.to_vec();
    while let Some(at) = todo.pop() {
        if &at == task || met.contains_key(&at) {
            continue;
        }
        let t = b.get(&at).await?;
        if let Some(t) = t
            .as_ref()
            .filter(|t| t.status != agent_core::TaskStatus::Complete)
        {
            todo.extend(t.blocked_by.iter().cloned());
        }
        met.insert(at, t);
    }
    let lookup = |id: &TaskId| match met.get(id) {
        Some(Some(t)) => Known::Task(t.status, &t.blocked_by),
        Some(None) => Known::Missing,
        // `task` itself, with the blockers asked for: reached only through a cycle.
        None => Known::Task(agent_core::TaskStatus::Blocked, blockers),
    };
    let message = match stuck(task, blockers, lookup) {
        None => return Ok(()),
        Some(Stuck::Cycle(c)) if c.first() == Some(task) => format!(
            "{task} would wait for itself: {} (--force stores it anyway)",
            path(&c)
        ),
        Some(Stuck::Cycle(c)) => format!(
            "{task} would wait for a cycle of blockers that can never complete: {} (--force stores it anyway)",
            path(&c)
        ),
        Some(Stuck::Missing(chain)) => format!(
            "blocker {} of {task} does not exist ({}): put it first (or --force to store it anyway)",
            chain.last().unwrap_or(task),
            path(&chain)
        ),
    };
    Err(agent_core::BackendError::InvalidInput(message).into())
}

async fn get(b: &dyn Backend, output: Output, task: &TaskId, out: &mut impl Write) -> Result<u8> {
    let Some(t) = b.get(task).await? else {
        match output {
            Output::Json => writeln!(out, "null")?,
            Output::Table => eprintln!("task {task} not found"),
        }
        return Ok(exit::NO);
    };
    let blockers = blocker_statuses(b, &t).await?;
    let status_of = |id: &TaskId| blockers.get(id).copied().flatten();
    match output {
        Output::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&task_json(&t, &status_of))?
        )?,
        Output::Table => write!(out, "{}", task_table(std::slice::from_ref(&t), &status_of))?,
    }
    Ok(0)
}

/// The status of each of `t`'s blockers (`None`: no such task).
async fn blocker_statuses(
    b: &dyn Backend,
    t: &agent_core::Task,
) -> Result<BTreeMap<TaskId, Option<agent_core::TaskStatus>>> {
    let mut blockers = BTreeMap::new();
    for b_id in &t.blocked_by {
        blockers.insert(b_id.clone(), b.get(b_id).await?.map(|x| x.status));
    }
    Ok(blockers)
}

/// What a task that could not be claimed still waits for (`B1 (claimed)`), if anything.
async fn still_waiting_for(b: &dyn Backend, task: &TaskId) -> Option<(String, Vec<String>)> {
    let t = b.get(task).await.ok().flatten()?;
    let blockers = blocker_statuses(b, &t).await.ok()?;
    let status_of = |id: &TaskId| blockers.get(id).copied().flatten();
    let ids: Vec<String> = crate::output::pending(&t, &status_of)
        .iter()
        .map(|(id, _)| id.to_string())
        .collect();
    (!ids.is_empty()).then(|| (crate::output::waiting_for(&t, &status_of), ids))
}

async fn claim(
    b: &dyn Backend,
    output: Output,
    args: &ClaimArgs,
    history: Option<&History>,
    out: &mut impl Write,
) -> Result<u8> {
    let mut code = 0;
    for (i, task) in args.tasks.iter().enumerate() {
        // An error ends the command: it says which tasks were not tried (the tester's report).
        let untried = || {
            let rest: Vec<&str> = args.tasks[i + 1..].iter().map(TaskId::as_str).collect();
            match rest.as_slice() {
                [] => String::new(),
                _ => format!(" ({} not tried)", rest.join(", ")),
            }
        };
        // A claim of a task the session holds already replaces that claim: said below.
        let held_already = b.get(task).await.ok().flatten().is_some_and(|t| {
            t.status == agent_core::TaskStatus::Claimed
                && t.claimed_by.as_ref() == Some(&args.session)
        });
        let outcome = settled("claim", task, || b.claim(task, &args.session))
            .await
            .map_err(|e| {
                let rest = untried();
                if rest.is_empty() {
                    e
                } else {
                    e.context(format!("claim of {task} failed{rest}"))
                }
            })?;
        if let (Some(h), ClaimOutcome::Won(c)) = (history, &outcome) {
            h.log(
                args.session.as_str(),
                task.as_str(),
                "won",
                Some(c.token.0),
                Some(b.name()),
                None,
            );
        }
        let (word, holder, status, token) = match &outcome {
            ClaimOutcome::Won(c) => ("won", None, None, Some(c.token.0)),
            ClaimOutcome::Lost { holder } => ("lost", holder.clone(), None, None),
            ClaimOutcome::NotClaimable { status } => ("not_claimable", None, Some(*status), None),
            ClaimOutcome::NotFound => ("not_found", None, None, None),
        };
        if word != "won" {
            code = exit::NO;
        }
        // Issue 16: "not claimable: blocked" did not say by what.
        let waiting = match &outcome {
            ClaimOutcome::NotClaimable { .. } => still_waiting_for(b, task).await,
            _ => None,
        };
        match output {
            Output::Json => writeln!(
                out,
                "{}",
                json!({
                    "task_id": task.as_str(), "session": args.session.as_str(), "outcome": word,
                    "holder": holder.as_ref().map(|h| h.as_str()), "status": status.map(|s| s.as_str()),
                    "fencing_token": token, "replaced_own_claim": word == "won" && held_already,
                    "waiting_for": waiting.as_ref().map(|(_, ids)| ids.clone()).unwrap_or_default(),
                })
            )?,
            Output::Table => match &outcome {
                ClaimOutcome::Won(c) if held_already => {
                    let ends = match args.ttl {
                        Some(ttl) => format!(
                            "it ends {ttl} s after this command exits unless released"
                        ),
                        None => "it holds until released".to_owned(),
                    };
                    writeln!(
                        out,
                        "claimed {task} for {} (fencing token {}); {} held it already: this claim replaces that one, and {ends}",
                        args.session, c.token, args.session
                    )?
                }
                ClaimOutcome::Won(c) => writeln!(
                    out,
                    "claimed {task} for {} (fencing token {})",
                    args.session, c.token
                )?,
                ClaimOutcome::Lost { holder } if holder.as_ref() == Some(&args.session) => {
                    writeln!(
                        out,
                        "lost {task}: {} holds it under another process's claim (an agent of this session); only that process may claim it again, or it ends with that process's lease",
                        args.session
                    )?
                }
                ClaimOutcome::Lost { holder } => {
                    let who = holder
                        .as_ref()
                        .map_or("another session".into(), |h| h.to_string());
                    writeln!(out, "lost {task}: held by {who}")?
                }
                ClaimOutcome::NotClaimable { .. } if waiting.is_some() => {
                    let what = waiting.as_ref().map(|(w, _)| w.as_str()).unwrap_or_default();
                    writeln!(out, "{task} is not claimable: waiting for {what}")?
                }
                ClaimOutcome::NotClaimable { status } => {
                    writeln!(out, "{task} is not claimable: {status}")?
                }
                ClaimOutcome::NotFound => writeln!(out, "task {task} not found")?,
            },
        }
    }
    Ok(code)
}

async fn release(
    b: &dyn Backend,
    output: Output,
    args: &ReleaseArgs,
    history: Option<&History>,
    out: &mut impl Write,
) -> Result<u8> {
    let to = match args.status {
        ReleaseStatus::Complete => ReleaseTo::Complete,
        ReleaseStatus::Available => ReleaseTo::Available,
    };
    let token = args.fencing_token.map(FencingToken);
    let mut retried = false;
    let outcome = settled("release", &args.task, || {
        let first = !std::mem::replace(&mut retried, true);
        async move {
            let outcome = b.release(&args.task, &args.session, to, token).await?;
            // The first attempt landed (its answer timed out): giving back an available task
            // again reads "not the holder" and nobody holds it, which is what was asked.
            Ok(match outcome {
                ReleaseOutcome::NotHolder { holder: None }
                    if !first && to == ReleaseTo::Available =>
                {
                    ReleaseOutcome::Released {
                        token: token.unwrap_or(FencingToken(0)),
                    }
                }
                other => other,
            })
        }
    })
    .await?;
    if matches!(outcome, ReleaseOutcome::Released { .. }) {
        // An operator acting for a running agent: say what it does to the agent.
        let running = running_agent(b, &args.session)
            .await
            .filter(|p| p.current_task.as_ref() == Some(&args.task));
        if let Some(p) = running {
            eprintln!(
                "note: {} was running {} in its agent ({}): that run is stopped and will not be reported",
                args.session,
                args.task,
                agent_core::process::describe(&p)
            );
        }
    }
    if let (Some(h), ReleaseOutcome::Released { token }) = (history, &outcome) {
        let event = if to == ReleaseTo::Complete {
            "complete"
        } else {
            "release"
        };
        h.log(
            args.session.as_str(),
            args.task.as_str(),
            event,
            Some(token.0),
            Some(b.name()),
            None,
        );
    }
    let (word, code) = match &outcome {
        ReleaseOutcome::Released { .. } => ("released", 0),
        ReleaseOutcome::NotHolder { .. } => ("not_holder", exit::NO),
        ReleaseOutcome::NotFound => ("not_found", exit::NO),
    };
    match (output, &outcome) {
        (Output::Json, _) => {
            let holder = match &outcome {
                ReleaseOutcome::NotHolder { holder } => holder.as_ref().map(|h| h.as_str()),
                _ => None,
            };
            writeln!(
                out,
                "{}",
                json!({"task_id": args.task.as_str(), "outcome": word, "status": to.status().as_str(), "holder": holder})
            )?
        }
        (Output::Table, ReleaseOutcome::Released { .. }) => {
            writeln!(out, "released {} as {}", args.task, to.status())?
        }
        (Output::Table, ReleaseOutcome::NotHolder { holder }) => {
            let who = holder.as_ref().map_or("nobody".into(), |h| h.to_string());
            // The session is the holder: in a running agent (whose run only it ends), or under
            // another claim (the token is what does not match).
            let agent = match holder {
                Some(h) if *h == args.session => running_agent(b, &args.session).await,
                _ => None,
            };
            let why = match (holder, agent, args.fencing_token) {
                (_, Some(p), _) => format!(
                    "{} is held by {who}'s running agent ({}): only that agent ends its run (SIGTERM stops it and gives the task back)",
                    args.task,
                    agent_core::process::describe(&p)
                ),
                (Some(h), None, Some(t)) if *h == args.session => format!(
                    "{} is held by {who} under another fencing token than {t} (a newer claim, or another process's)",
                    args.task
                ),
                _ => format!("{} is held by {who}", args.task),
            };
            writeln!(out, "not the holder: {why}; nothing changed")?
        }
        (Output::Table, ReleaseOutcome::NotFound) => writeln!(out, "task {} not found", args.task)?,
    }
    Ok(code)
}

async fn delete(
    b: &Coordinator,
    output: Output,
    tasks: &[TaskId],
    force: bool,
    out: &mut impl Write,
) -> Result<u8> {
    use task_record::Deleted;
    let mut code = 0;
    for task in tasks {
        let mut retried = false;
        let outcome = settled("delete", task, || {
            let first = !std::mem::replace(&mut retried, true);
            async move {
                // The first attempt landed (its answer timed out): gone is what was asked.
                Ok(match b.delete(task, force).await? {
                    Deleted::NotFound if !first => Deleted::Deleted,
                    other => other,
                })
            }
        })
        .await?;
        let word = match &outcome {
            Deleted::Deleted => "deleted",
            Deleted::NotFound => "not_found",
            Deleted::Held { .. } => "held",
            Deleted::Blocks { .. } => "blocks",
        };
        if word != "deleted" {
            code = exit::NO;
        }
        match output {
            Output::Json => {
                let (holder, dependents) = match &outcome {
                    Deleted::Held { holder } => (holder.as_ref().map(|h| h.as_str()), vec![]),
                    Deleted::Blocks { dependents } => {
                        (None, dependents.iter().map(TaskId::as_str).collect())
                    }
                    _ => (None, vec![]),
                };
                writeln!(
                    out,
                    "{}",
                    json!({"task_id": task.as_str(), "outcome": word, "holder": holder, "dependents": dependents})
                )?
            }
            Output::Table => match &outcome {
                Deleted::Deleted => writeln!(out, "deleted {task}")?,
                Deleted::NotFound => writeln!(out, "task {task} not found")?,
                Deleted::Held { holder } => {
                    let who = holder
                        .as_ref()
                        .map_or("a session".into(), |h| h.to_string());
                    writeln!(
                        out,
                        "{task} is claimed by {who}: release it first (or --force, which fences that claim)"
                    )?
                }
                Deleted::Blocks { dependents } => {
                    let list: Vec<&str> = dependents.iter().map(TaskId::as_str).collect();
                    writeln!(
                        out,
                        "{task} is a blocker of {}: edit their --blocked-by first (or --force)",
                        list.join(", ")
                    )?
                }
            },
        }
    }
    Ok(code)
}

/// The agent process running `session` now, if one is listed.
async fn running_agent(
    b: &dyn Backend,
    session: &agent_core::SessionId,
) -> Option<agent_core::Presence> {
    b.sessions()
        .await
        .unwrap_or_default()
        .into_iter()
        .find(|p| &p.session_id == session && p.pid != 0)
}

async fn status(b: &dyn Backend, output: Output, out: &mut impl Write) -> Result<u8> {
    let listing = b.list().await?;
    let mut statuses: std::collections::HashMap<TaskId, agent_core::TaskStatus> = listing
        .tasks
        .iter()
        .map(|t| (t.id.clone(), t.status))
        .collect();
    // A blocker the list lacks may be archived (complete, out of the live prefix): read, it
    // does not show as missing (tester helper-10).
    let unlisted: std::collections::BTreeSet<TaskId> = listing
        .tasks
        .iter()
        .flat_map(|t| t.blocked_by.iter())
        .filter(|blocker| !statuses.contains_key(*blocker))
        .cloned()
        .collect();
    for id in unlisted {
        if let Some(t) = b.get(&id).await? {
            statuses.insert(id, t.status);
        }
    }
    let status_of = |id: &TaskId| statuses.get(id).copied();
    match output {
        Output::Json => {
            let tasks: Vec<_> = listing
                .tasks
                .iter()
                .map(|t| task_json(t, &status_of))
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&tasks)?)?
        }
        Output::Table => {
            write!(out, "{}", task_table(&listing.tasks, &status_of))?;
            let sessions = b.sessions().await?;
            if !sessions.is_empty() {
                write!(out, "\n{}", crate::output::session_table(&sessions))?;
            }
        }
    }
    for c in &listing.corrupt {
        eprintln!(
            "error: corrupt record at {}: {}",
            c.key,
            printable(&c.reason)
        );
    }
    Ok(if listing.corrupt.is_empty() {
        0
    } else {
        exit::CORRUPT
    })
}

async fn watch(b: &dyn Backend, output: Output) -> Result<u8> {
    let mut sub = b.subscribe().await?;
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            event = sub.next() => {
                let Some(BackendEvent::Task(e)) = event else {
                    if event.is_none() { return Ok(0) }
                    continue;
                };
                let line = match output {
                    Output::Json => event_json(&e).to_string(),
                    Output::Table => event_line(&e),
                };
                // A closed pipe (`ifc watch | head`) ends the watch quietly.
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                    return Ok(0);
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_core::BackendError;

    fn timeout() -> BackendError {
        BackendError::Timeout {
            endpoint: "http://127.0.0.1:1".into(),
            operation: "claim".into(),
            after: std::time::Duration::from_millis(1),
        }
    }

    #[tokio::test]
    async fn a_write_whose_answer_timed_out_is_asked_again_and_the_second_answer_stands() {
        let t = TaskId::parse("T").expect("id");
        let mut answers = vec![Ok(7), Err(timeout())];
        let got = settled("claim", &t, || {
            let next = answers.pop().expect("at most two attempts");
            async move { next }
        })
        .await
        .expect("the second answer");
        assert_eq!(got, 7);

        let mut answers = vec![Err(timeout()), Err(timeout())];
        let err = settled("claim", &t, || {
            let next: agent_core::BackendResult<u8> = answers.pop().expect("two attempts");
            async move { next }
        })
        .await
        .expect_err("unknown");
        let text = format!("{err:#}");
        assert!(text.contains("may or may not have been applied"), "{text}");
        assert!(text.contains("ifc get T"), "{text}");
        assert!(
            err.chain()
                .any(|c| matches!(c.downcast_ref(), Some(BackendError::Timeout { .. }))),
            "still an infrastructure error (exit 3): {text}"
        );

        // Any other answer, error or not, is not asked again.
        let mut calls = 0;
        let err = settled("put", &t, || {
            calls += 1;
            async { Err::<u8, _>(BackendError::InvalidInput("bad".into())) }
        })
        .await
        .expect_err("invalid");
        assert_eq!(calls, 1, "{err}");
    }
}
