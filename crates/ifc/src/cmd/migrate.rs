//! Moving the board into etcd and back: `ifc migrate` (board → etcd, idempotent, never
//! backwards unless `--force`), `ifc verify` (do they agree?), `ifc export` (etcd → board,
//! changing only the cells that differ).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use agent_core::{BackendError, Task, TaskStatus};
use anyhow::{Context, Result};
use task_record::Imported;

use crate::coordinator::Coordinator;
use backend_git::board::{Board, BoardTask};
use backend_git::GitBackend;
use serde_json::json;

use crate::cli::Output;
use crate::exit;

/// Where the board is: a file (`--board FILE`) or the coordination repo (`--from-git`,
/// `--push`: the fleet file's git settings).
pub enum BoardSource {
    File(PathBuf),
    Repo(Arc<GitBackend>),
}

impl BoardSource {
    /// The board's name in messages, and its text (`None`: no such file yet).
    async fn read(&self) -> Result<(String, Option<String>)> {
        match self {
            BoardSource::File(path) => {
                let name = path.display().to_string();
                if !path.exists() {
                    return Ok((name, None));
                }
                let text = std::fs::read_to_string(path)
                    .map_err(|e| BackendError::InvalidInput(format!("cannot read {name}: {e}")))?;
                Ok((name, Some(text)))
            }
            BoardSource::Repo(git) => {
                let board = git.board_path().await;
                let text = git
                    .read_file(&board, true)
                    .await?
                    .map(|b| String::from_utf8_lossy(&b).into_owned());
                Ok((format!("{board} in the coordination repo"), text))
            }
        }
    }
}

fn parse(name: &str, text: &str) -> Result<Board> {
    Ok(Board::parse(name, text).map_err(|e| BackendError::InvalidInput(e.to_string()))?)
}

/// The board's name in messages and its text; a board that is not there is an error.
async fn read_text(source: &BoardSource) -> Result<(String, String)> {
    let (name, text) = source.read().await?;
    let text = text.ok_or_else(|| BackendError::InvalidInput(format!("{name}: no such board")))?;
    Ok((name, text))
}

async fn read_board(source: &BoardSource) -> Result<(String, String, Board)> {
    let (name, text) = read_text(source).await?;
    let board = parse(&name, &text)?;
    Ok((name, text, board))
}

/// Warns (on stderr, naming file and line) of what leaves tasks never claimable without being
/// wrong to store: a cycle of blockers (once per cycle) and a blocker on neither the board nor
/// etcd (it may be put later). `put` refuses both; agents report them (the tester's report:
/// migrate took them without a word).
async fn warn_unclaimable(
    b: &Coordinator,
    name: &str,
    board: &Board,
    tasks: &[Task],
) -> Result<()> {
    use agent_core::blockers::{path, stuck, Known, Stuck};
    use std::collections::{BTreeMap, BTreeSet};
    let by_id: BTreeMap<_, _> = tasks.iter().map(|t| (&t.id, t)).collect();
    let mut said = BTreeSet::new();
    for t in tasks {
        let lookup = |id: &agent_core::TaskId| match by_id.get(id) {
            Some(b) => Known::Task(b.status, &b.blocked_by),
            None => Known::Unknown,
        };
        if let Some(Stuck::Cycle(cycle)) = stuck(&t.id, &t.blocked_by, lookup) {
            if said.insert(cycle.iter().cloned().collect::<BTreeSet<_>>()) {
                let line = board.line_of(&cycle[0]).unwrap_or_default();
                eprintln!(
                    "warning: {name}:{line}: a cycle of blockers, {}: none of these tasks can ever be claimed until it is broken",
                    path(&cycle)
                );
            }
        }
    }
    for t in tasks {
        for blocker in t.blocked_by.iter().filter(|x| !by_id.contains_key(x)) {
            if b.backend().get(blocker).await?.is_none() {
                let line = board.line_of(&t.id).unwrap_or_default();
                eprintln!(
                    "warning: {name}:{line}: {} is blocked by {blocker}, which is neither on the board nor in {}: nobody can claim {} until it is",
                    t.id, b.name(), t.id
                );
            }
        }
    }
    Ok(())
}

/// The task a board row states, or what is wrong with it (without its file and line).
fn from_board(t: &BoardTask) -> std::result::Result<Task, String> {
    if t.status == TaskStatus::Claimed && t.owner.is_none() {
        return Err(format!(
            "{} is IN PROGRESS but names no owner: set the owner or the status",
            t.id
        ));
    }
    let mut task = Task::new(t.id.clone(), t.status);
    task.title = t.title.clone();
    task.blocked_by = t.blocked_by.clone();
    task.claimed_by = t
        .owner
        .clone()
        .filter(|_| matches!(t.status, TaskStatus::Claimed | TaskStatus::Complete));
    Ok(task)
}

/// The board row etcd's task becomes.
fn to_board(t: &Task) -> BoardTask {
    BoardTask {
        id: t.id.clone(),
        title: t.title.clone(),
        status: t.status,
        owner: t.claimed_by.clone(),
        blocked_by: t.blocked_by.clone(),
    }
}

/// The fields the board states in which `a` and `b` differ: (field, a's value, b's value).
fn differing_fields(a: &Task, b: &Task) -> Vec<(&'static str, String, String)> {
    [
        ("status", a.status.to_string(), b.status.to_string()),
        ("claimed_by", fmt_opt(&a.claimed_by), fmt_opt(&b.claimed_by)),
        (
            "title",
            a.title.clone().unwrap_or_default(),
            b.title.clone().unwrap_or_default(),
        ),
        ("blocked_by", join(&a.blocked_by), join(&b.blocked_by)),
    ]
    .into_iter()
    .filter(|(_, x, y)| x != y)
    .collect()
}

/// A board must have a task table to be migrated or verified (issue 16: a file without one
/// "migrated" 0 tasks with exit 0).
fn require_task_table(name: &str, board: &Board) -> Result<()> {
    if board.has_task_table() {
        return Ok(());
    }
    Err(BackendError::InvalidInput(format!(
        "{name}: no task table (a markdown table with an ID and a Status column, e.g. `| ID | Task | Status | Owner | Blocked by |`)"
    ))
    .into())
}

/// One task `migrate --dry-run` would write: what it is in etcd now (`None`: not there).
struct Planned {
    task: Task,
    before: Option<Task>,
}

pub async fn migrate(
    b: &Coordinator,
    output: Output,
    source: &BoardSource,
    dry_run: bool,
    force: bool,
    out: &mut impl Write,
) -> Result<u8> {
    let (name, text) = read_text(source).await?;
    // Every row is checked before anything is written, and every problem said at once: the
    // board's and migrate's own (the tester's: an owner-less IN PROGRESS row was said only
    // once the rest of the board parsed), in file order.
    let (board, mut problems) = Board::parse_all(&name, &text);
    let mut tasks = Vec::new();
    for t in board.tasks() {
        // Refused here, not half-way through the writes (tester helper-10).
        let checked = from_board(t).and_then(|task| {
            b.claimable_with(&task.id, &task.blocked_by)
                .map(|()| task)
                .map_err(|e| e.to_string())
        });
        match checked {
            Ok(task) => tasks.push(task),
            Err(message) => problems.push(backend_git::board::BoardError {
                file: name.clone(),
                line: board.line_of(&t.id).unwrap_or_default(),
                message,
                more: Vec::new(),
            }),
        }
    }
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line);
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Err(BackendError::InvalidInput(lines.join("\n")).into());
    }
    require_task_table(&name, &board)?;
    warn_unclaimable(b, &name, &board, &tasks).await?;
    let (mut created, mut updated, mut unchanged, mut kept) = (0, 0, 0, Vec::new());
    // What a dry run would write, task by task (issue 16: it only counted).
    let mut planned: Vec<Planned> = Vec::new();
    let bar = crate::output::progress(tasks.len(), "migrating");
    for task in &tasks {
        if let Some(b) = &bar {
            b.inc(1);
        }
        let before = if dry_run {
            b.backend().get(&task.id).await?
        } else {
            None
        };
        let imported = import_retrying(b, task, force, dry_run)
            .await
            .with_context(|| format!("importing {}", task.id))?;
        let writes = matches!(imported, Imported::Created | Imported::Updated);
        match imported {
            Imported::Created => created += 1,
            Imported::Updated => updated += 1,
            Imported::Unchanged => unchanged += 1,
            Imported::Kept { reason } => kept.push((task.id.to_string(), reason)),
        }
        if dry_run && writes {
            planned.push(Planned {
                task: task.clone(),
                before,
            });
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let verb = if dry_run { "would be " } else { "" };
    match output {
        Output::Json => writeln!(
            out,
            "{}",
            json!({"dry_run": dry_run, "created": created, "updated": updated, "unchanged": unchanged,
                   "kept": kept.iter().map(|(t, r)| json!({"task_id": t, "reason": r})).collect::<Vec<_>>(),
                   "changes": planned.iter().map(|p| json!({
                       "task_id": p.task.id.as_str(),
                       "action": if p.before.is_some() { "update" } else { "create" },
                       "fields": p.before.as_ref().map(|was| differing_fields(was, &p.task)).unwrap_or_default()
                           .iter().map(|(f, old, new)| json!({"field": f, "old": old, "new": new})).collect::<Vec<_>>(),
                   })).collect::<Vec<_>>()})
        )?,
        Output::Table => {
            for p in &planned {
                match &p.before {
                    None => match &p.task.claimed_by {
                        Some(owner) if p.task.status == TaskStatus::Claimed => {
                            writeln!(out, "would create {} (claimed by {owner})", p.task.id)?
                        }
                        _ => writeln!(out, "would create {} ({})", p.task.id, p.task.status)?,
                    },
                    Some(was) => {
                        let fields: Vec<String> = differing_fields(was, &p.task)
                            .into_iter()
                            .map(|(f, old, new)| format!("{f} {old:?} → {new:?}"))
                            .collect();
                        writeln!(out, "would update {}: {}", p.task.id, fields.join(", "))?
                    }
                }
            }
            for (task, reason) in &kept {
                writeln!(out, "kept {task}: {reason} (use --force to overwrite)")?;
            }
            writeln!(
                out,
                "{created} {verb}created, {updated} {verb}updated, {unchanged} unchanged, {} kept",
                kept.len()
            )?;
        }
    }
    Ok(0)
}

pub async fn verify(
    b: &Coordinator,
    output: Output,
    source: &BoardSource,
    out: &mut impl Write,
) -> Result<u8> {
    let (name, _, board) = read_board(source).await?;
    require_task_table(&name, &board)?;
    let listing = b.backend().list().await?;
    let in_etcd: std::collections::BTreeMap<_, _> =
        listing.tasks.iter().map(|t| (t.id.clone(), t)).collect();
    let (mut missing, mut mismatched) = (Vec::new(), Vec::new());
    for row in board.tasks() {
        let want = from_board(row).map_err(|why| {
            let line = board.line_of(&row.id).unwrap_or_default();
            BackendError::InvalidInput(format!("{name}:{line}: {why}"))
        })?;
        // Not listed: it may be archived (complete, out of the live prefix), which `get` reads.
        let archived;
        let have = match in_etcd.get(&row.id) {
            Some(have) => *have,
            None => match b.backend().get(&row.id).await? {
                Some(t) => {
                    archived = t;
                    &archived
                }
                None => {
                    missing.push(row.id.to_string());
                    continue;
                }
            },
        };
        for (field, board_value, etcd_value) in differing_fields(&want, have) {
            mismatched.push((row.id.to_string(), field, board_value, etcd_value));
        }
    }
    let on_board: std::collections::BTreeSet<_> =
        board.tasks().iter().map(|t| t.id.clone()).collect();
    let extra: Vec<String> = listing
        .tasks
        .iter()
        .filter(|t| !on_board.contains(&t.id))
        .map(|t| t.id.to_string())
        .collect();
    let agree = missing.is_empty()
        && mismatched.is_empty()
        && extra.is_empty()
        && listing.corrupt.is_empty();
    let (store, key) = (b.name(), b.key());
    match output {
        Output::Json => {
            let mut v = json!({"agree": agree, "board": board.tasks().len(), "missing": missing, "extra": extra,
                   "corrupt": listing.corrupt.iter().map(|c| &c.key).collect::<Vec<_>>(),
                   "mismatched": mismatched.iter().map(|(t, f, b, e)| json!({"task_id": t, "field": f, "board": b, key: e})).collect::<Vec<_>>()});
            v[key] = json!(listing.tasks.len());
            writeln!(out, "{v}")?
        }
        Output::Table => {
            writeln!(
                out,
                "board: {} tasks, {store}: {} tasks",
                board.tasks().len(),
                listing.tasks.len()
            )?;
            for t in &missing {
                writeln!(out, "missing in {store}: {t}")?;
            }
            for t in &extra {
                writeln!(out, "in {store}, not on the board: {t}")?;
            }
            for c in &listing.corrupt {
                writeln!(out, "corrupt in {store}: {}: {}", c.key, c.reason)?;
            }
            for (t, f, b, e) in &mismatched {
                writeln!(out, "mismatch {t} {f}: board {b:?}, {store} {e:?}")?;
            }
            writeln!(
                out,
                "board and {store} {}",
                if agree { "agree" } else { "differ" }
            )?;
        }
    }
    Ok(if agree { 0 } else { exit::NO })
}

pub async fn export(
    b: &Coordinator,
    output: Output,
    target: &BoardSource,
    out: &mut impl Write,
) -> Result<u8> {
    let listing = b.backend().list().await?;
    let rows: Vec<BoardTask> = listing.tasks.iter().map(to_board).collect();
    // etcd's state spliced into `text`: only the cells that differ change.
    let render = {
        let rows = rows.clone();
        move |name: &str, text: Option<&str>| -> Result<String> {
            let board = parse(name, text.unwrap_or_default())?;
            Ok(board.render(&rows))
        }
    };
    let (name, before) = target.read().await?;
    let before = before.unwrap_or_default();
    let rendered = render(&name, Some(&before))?;
    match target {
        BoardSource::File(path) if rendered != before => {
            // Write beside the board, then rename: a reader never sees half a board.
            let tmp = path.with_extension("md.ifc-tmp");
            std::fs::write(&tmp, &rendered).map_err(|e| {
                BackendError::InvalidInput(format!("cannot write {}: {e}", tmp.display()))
            })?;
            std::fs::rename(&tmp, path).map_err(|e| {
                BackendError::InvalidInput(format!("cannot replace {}: {e}", path.display()))
            })?;
        }
        BoardSource::File(_) => {}
        BoardSource::Repo(git) => {
            let board = git.board_path().await;
            let (name, render) = (name.clone(), render.clone());
            git.update_file(
                &board,
                "export the coordinator's state to the board",
                move |text| {
                    render(&name, text).map_err(|e| BackendError::InvalidInput(format!("{e:#}")))
                },
            )
            .await?;
        }
    }
    let lines: std::collections::HashSet<&str> = before.lines().collect();
    let changed = rendered.lines().filter(|l| !lines.contains(l)).count();
    let pushed = matches!(target, BoardSource::Repo(_));
    match output {
        Output::Json => writeln!(
            out,
            "{}",
            json!({"board": name, "tasks": rows.len(), "lines_changed": changed, "pushed": pushed})
        )?,
        Output::Table => writeln!(
            out,
            "exported {} tasks to {name}: {changed} lines changed{}",
            rows.len(),
            if pushed { ", pushed" } else { "" }
        )?,
    }
    Ok(0)
}

fn fmt_opt(s: &Option<agent_core::SessionId>) -> String {
    s.as_ref().map(|s| s.to_string()).unwrap_or_default()
}

fn join(ids: &[agent_core::TaskId]) -> String {
    ids.iter().map(|i| i.as_str()).collect::<Vec<_>>().join(",")
}

/// Imports one task; a timed-out or unreachable try is made again, five times at most, with
/// backoff (an import decides from a fresh read, so one that landed unseen reads as unchanged).
/// One slow answer on a loaded machine does not end a migration of thousands of tasks.
async fn import_retrying(
    b: &Coordinator,
    task: &Task,
    force: bool,
    dry_run: bool,
) -> Result<Imported, BackendError> {
    let mut backoff = agent_core::retry::Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(2),
    );
    let mut tries = 1;
    loop {
        match b.import(task, force, dry_run).await {
            Err(e) if e.is_transient() && tries < 6 => {
                tracing::warn!(task = %task.id, error = %e, "import not answered; trying again");
                tries += 1;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            other => return other,
        }
    }
}
