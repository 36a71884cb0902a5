//! Moving the board into etcd and back: `ifc migrate` (board → etcd, idempotent, never
//! backwards unless `--force`), `ifc verify` (do they agree?), `ifc export` (etcd → board,
//! changing only the cells that differ).

use std::io::Write;
use std::path::Path;

use agent_core::{Backend, BackendError, Task, TaskStatus};
use anyhow::{Context, Result};
use backend_etcd::{EtcdBackend, Imported};
use backend_git::board::{Board, BoardTask};
use serde_json::json;

use crate::cli::Output;
use crate::exit;

fn read_board(path: &Path) -> Result<(String, Board)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BackendError::InvalidInput(format!("cannot read {}: {e}", path.display())))?;
    let board = Board::parse(&path.display().to_string(), &text)
        .map_err(|e| BackendError::InvalidInput(e.to_string()))?;
    Ok((text, board))
}

/// The task a board row states.
fn from_board(path: &Path, board: &Board, t: &BoardTask) -> Result<Task> {
    if t.status == TaskStatus::Claimed && t.owner.is_none() {
        let line = board.line_of(&t.id).unwrap_or_default();
        return Err(BackendError::InvalidInput(format!(
            "{}:{line}: {} is IN PROGRESS but names no owner: set the owner or the status",
            path.display(),
            t.id
        ))
        .into());
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

pub async fn migrate(
    b: &EtcdBackend,
    output: Output,
    board_path: &Path,
    dry_run: bool,
    force: bool,
    out: &mut impl Write,
) -> Result<u8> {
    let (_, board) = read_board(board_path)?;
    // Every row is checked before anything is written.
    let tasks = board
        .tasks()
        .iter()
        .map(|t| from_board(board_path, &board, t))
        .collect::<Result<Vec<_>>>()?;
    let (mut created, mut updated, mut unchanged, mut kept) = (0, 0, 0, Vec::new());
    for task in &tasks {
        match b
            .import(task, force, dry_run)
            .await
            .with_context(|| format!("importing {}", task.id))?
        {
            Imported::Created => created += 1,
            Imported::Updated => updated += 1,
            Imported::Unchanged => unchanged += 1,
            Imported::Kept { reason } => kept.push((task.id.to_string(), reason)),
        }
    }
    let verb = if dry_run { "would be " } else { "" };
    match output {
        Output::Json => writeln!(
            out,
            "{}",
            json!({"dry_run": dry_run, "created": created, "updated": updated, "unchanged": unchanged,
                   "kept": kept.iter().map(|(t, r)| json!({"task_id": t, "reason": r})).collect::<Vec<_>>()})
        )?,
        Output::Table => {
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
    b: &EtcdBackend,
    output: Output,
    board_path: &Path,
    out: &mut impl Write,
) -> Result<u8> {
    let (_, board) = read_board(board_path)?;
    let listing = b.list().await?;
    let in_etcd: std::collections::BTreeMap<_, _> =
        listing.tasks.iter().map(|t| (t.id.clone(), t)).collect();
    let (mut missing, mut mismatched) = (Vec::new(), Vec::new());
    for row in board.tasks() {
        let want = from_board(board_path, &board, row)?;
        let Some(have) = in_etcd.get(&row.id) else {
            missing.push(row.id.to_string());
            continue;
        };
        let fields = [
            ("status", want.status.to_string(), have.status.to_string()),
            (
                "claimed_by",
                fmt_opt(&want.claimed_by),
                fmt_opt(&have.claimed_by),
            ),
            (
                "title",
                want.title.clone().unwrap_or_default(),
                have.title.clone().unwrap_or_default(),
            ),
            ("blocked_by", join(&want.blocked_by), join(&have.blocked_by)),
        ];
        for (field, board_value, etcd_value) in fields {
            if board_value != etcd_value {
                mismatched.push((row.id.to_string(), field, board_value, etcd_value));
            }
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
    match output {
        Output::Json => writeln!(
            out,
            "{}",
            json!({"agree": agree, "board": board.tasks().len(), "etcd": listing.tasks.len(), "missing": missing, "extra": extra,
                   "corrupt": listing.corrupt.iter().map(|c| &c.key).collect::<Vec<_>>(),
                   "mismatched": mismatched.iter().map(|(t, f, b, e)| json!({"task_id": t, "field": f, "board": b, "etcd": e})).collect::<Vec<_>>()})
        )?,
        Output::Table => {
            writeln!(
                out,
                "board: {} tasks, etcd: {} tasks",
                board.tasks().len(),
                listing.tasks.len()
            )?;
            for t in &missing {
                writeln!(out, "missing in etcd: {t}")?;
            }
            for t in &extra {
                writeln!(out, "in etcd, not on the board: {t}")?;
            }
            for c in &listing.corrupt {
                writeln!(out, "corrupt in etcd: {}: {}", c.key, c.reason)?;
            }
            for (t, f, b, e) in &mismatched {
                writeln!(out, "mismatch {t} {f}: board {b:?}, etcd {e:?}")?;
            }
            writeln!(
                out,
                "{}",
                if agree {
                    "board and etcd agree"
                } else {
                    "board and etcd differ"
                }
            )?;
        }
    }
    Ok(if agree { 0 } else { exit::NO })
}

pub async fn export(
    b: &EtcdBackend,
    output: Output,
    board_path: &Path,
    out: &mut impl Write,
) -> Result<u8> {
    let (text, board) = if board_path.exists() {
        read_board(board_path)?
    } else {
        (
            String::new(),
            Board::parse("", "").map_err(|e| BackendError::InvalidInput(e.to_string()))?,
        )
    };
    let listing = b.list().await?;
    let rows: Vec<BoardTask> = listing.tasks.iter().map(to_board).collect();
    let rendered = board.render(&rows);
    let before: std::collections::HashSet<&str> = text.lines().collect();
    let changed = rendered.lines().filter(|l| !before.contains(l)).count();
    if rendered != text {
        // Write beside the board, then rename: a reader never sees half a board.
        let tmp = board_path.with_extension("md.ifc-tmp");
        std::fs::write(&tmp, &rendered).map_err(|e| {
            BackendError::InvalidInput(format!("cannot write {}: {e}", tmp.display()))
        })?;
        std::fs::rename(&tmp, board_path).map_err(|e| {
            BackendError::InvalidInput(format!("cannot replace {}: {e}", board_path.display()))
        })?;
    }
    match output {
        Output::Json => writeln!(
            out,
            "{}",
            json!({"board": board_path.display().to_string(), "tasks": rows.len(), "lines_changed": changed})
        )?,
        Output::Table => writeln!(
            out,
            "exported {} tasks to {}: {changed} lines changed",
            rows.len(),
            board_path.display()
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
