//! `ifc archive`: complete tasks leave etcd's live prefix (`tasks/` → `archive/`), so watches,
//! lists, caches and the agents' views stop carrying finished work; `--restore` puts tasks back.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use agent_core::{Backend, TaskId, TaskStatus};
use anyhow::Result;
use backend_etcd::{Archived, EtcdBackend, Restored};
use serde_json::json;

use crate::cli::Output;
use crate::exit;

/// Archives every complete task completed more than `older_than` ago (or with no completion
/// time), except those that tasks not complete wait for.
pub async fn archive(
    b: &EtcdBackend,
    output: Output,
    older_than: Duration,
    dry_run: bool,
    out: &mut impl Write,
) -> Result<u8> {
    let listing = b.list().await?;
    let waited_for: HashSet<&TaskId> = listing
        .tasks
        .iter()
        .filter(|t| t.status != TaskStatus::Complete)
        .flat_map(|t| &t.blocked_by)
        .collect();
    let now = chrono::Utc::now();
    let cutoff = chrono::Duration::from_std(older_than)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let (mut chosen, mut kept, mut recent) = (Vec::new(), Vec::new(), 0usize);
    for t in listing
        .tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Complete)
    {
        if waited_for.contains(&t.id) {
            kept.push(t.id.as_str());
        } else if t.claimed_at.is_some_and(|at| at > cutoff) {
            recent += 1;
        } else {
            chosen.push(&t.id);
        }
    }
    if !listing.corrupt.is_empty() {
        let keys: Vec<&str> = listing.corrupt.iter().map(|c| c.key.as_str()).collect();
        tracing::warn!(
            records = %keys.join(", "),
            "unreadable records are left where they are (`ifc status` says what is wrong with them); what they wait for is not known, so the tasks they name may have been archived"
        );
    }
    let mut archived: Vec<&TaskId> = Vec::new();
    let mut restored: Vec<(&TaskId, TaskId)> = Vec::new();
    if !dry_run {
        for id in &chosen {
            // A task that changed since the list (reopened, deleted) is left where it is.
            if b.archive(id).await? == Archived::Archived {
                archived.push(id);
            }
        }
        // A task created meanwhile that waits for one just archived (its `put` checked the
        // blocker before the move): that one comes back, or the new task would wait for ever.
        let after = b.list().await?;
        let moved: HashSet<&TaskId> = archived.iter().copied().collect();
        for t in after
            .tasks
            .iter()
            .filter(|t| t.status != TaskStatus::Complete)
        {
            for blocker in t.blocked_by.iter() {
                let Some(&moved) = moved.get(blocker) else {
                    continue;
                };
                if restored.iter().all(|(r, _)| *r != moved)
                    && b.restore(moved).await? == Restored::Restored
                {
                    restored.push((moved, t.id.clone()));
                }
            }
        }
        archived.retain(|id| restored.iter().all(|(r, _)| r != id));
    }
    let archived: Vec<&str> = archived.iter().map(|i| i.as_str()).collect();
    match output {
        Output::Json => writeln!(
            out,
            "{}",
            json!({
                "dry_run": dry_run,
                "archived": if dry_run { chosen.iter().map(|i| i.as_str()).collect() } else { archived.clone() },
                "kept_waited_for": kept,
                "restored_waited_for": restored.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
                "completed_since_cutoff": recent,
            })
        )?,
        Output::Table => {
            let n = if dry_run {
                chosen.len()
            } else {
                archived.len()
            };
            let verb = if dry_run { "would archive" } else { "archived" };
            let shown: Vec<&str> = chosen.iter().take(5).map(|i| i.as_str()).collect();
            let more = chosen.len().saturating_sub(shown.len());
            let examples = match (shown.is_empty(), more) {
                (true, _) => String::new(),
                (false, 0) => format!(" ({})", shown.join(", ")),
                (false, m) => format!(" ({}, and {m} more)", shown.join(", ")),
            };
            writeln!(
                out,
                "{verb} {n} complete task(s) completed before {}{examples}",
                cutoff.format("%Y-%m-%d %H:%M:%S UTC")
            )?;
            if !kept.is_empty() {
                writeln!(
                    out,
                    "kept {} that tasks not complete wait for: {}",
                    kept.len(),
                    kept.join(", ")
                )?;
            }
            for (task, waiting) in &restored {
                writeln!(
                    out,
                    "put {task} back: {waiting}, created meanwhile, waits for it"
                )?;
            }
            if recent > 0 {
                writeln!(out, "kept {recent} completed since then")?;
            }
        }
    }
    Ok(0)
}

/// Puts archived tasks back in `tasks/`.
pub async fn restore(
    b: &EtcdBackend,
    output: Output,
    tasks: &[TaskId],
    out: &mut impl Write,
) -> Result<u8> {
    let mut code = 0;
    for task in tasks {
        let outcome = b.restore(task).await?;
        let word = match outcome {
            Restored::Restored => "restored",
            Restored::NotArchived => "not_archived",
            Restored::Exists => "exists",
        };
        if outcome != Restored::Restored {
            code = exit::NO;
        }
        match output {
            Output::Json => writeln!(out, "{}", json!({"task_id": task.as_str(), "outcome": word}))?,
            Output::Table => match outcome {
                Restored::Restored => writeln!(out, "restored {task}")?,
                Restored::NotArchived => writeln!(out, "{task} is not in the archive")?,
                Restored::Exists => writeln!(
                    out,
                    "{task} exists again: the archived record is kept (ifc delete {task} first to restore it)"
                )?,
            },
        }
    }
    Ok(code)
}
