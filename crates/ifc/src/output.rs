//! Rendering tasks, outcomes and events as tables for people or JSON for programs.

use agent_core::{Task, TaskEvent, TaskId, TaskStatus};
use serde_json::{json, Value};

/// The status of a task by id (`None`: no such task), to tell which blockers are still pending.
pub type StatusOf<'a> = &'a dyn Fn(&TaskId) -> Option<TaskStatus>;

/// The blockers of `t` that are not complete, each with its status (`None`: no such task).
pub fn pending<'t>(t: &'t Task, status_of: StatusOf) -> Vec<(&'t TaskId, Option<TaskStatus>)> {
    t.blocked_by
        .iter()
        .map(|b| (b, status_of(b)))
        .filter(|(_, s)| *s != Some(TaskStatus::Complete))
        .collect()
}

/// Whether a session may claim `t` now: it is available or blocked, and every blocker is
/// complete (a `blocked` task whose blockers are done is claimable: the status is the board's
/// word, the blockers decide).
pub fn claimable(t: &Task, status_of: StatusOf) -> bool {
    matches!(t.status, TaskStatus::Available | TaskStatus::Blocked)
        && pending(t, status_of).is_empty()
}

/// What `t`'s blockers still wait for, for a message: `B1 (claimed), B2 (missing)`.
pub fn waiting_for(t: &Task, status_of: StatusOf) -> String {
    pending(t, status_of)
        .iter()
        .map(|(b, s)| match s {
            Some(status) => format!("{b} ({status})"),
            None => format!("{b} (missing)"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The JSON object of one task: the guide's fields plus `blocked_by`, `waiting_for` (the
/// blockers not complete yet: while there are any, nobody can claim the task), `claimable`
/// and `title`.
pub fn task_json(t: &Task, status_of: StatusOf) -> Value {
    json!({
        "claimable": claimable(t, status_of),
        "task_id": t.id.as_str(),
        "status": t.status.as_str(),
        "claimed_by": t.claimed_by.as_ref().map(|s| s.as_str()),
        "claimed_at": t.claimed_at.map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        "blocked_by": t.blocked_by.iter().map(|b| b.as_str()).collect::<Vec<_>>(),
        "waiting_for": pending(t, status_of).iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(),
        "title": t.title,
    })
}

/// The JSON object of one event (one line of `ifc watch --output json`).
pub fn event_json(e: &TaskEvent) -> Value {
    let time: chrono::DateTime<chrono::Utc> = e.time.into();
    json!({
        "task_id": e.task.as_str(),
        "old_status": e.old_status.map(|s| s.as_str()),
        "new_status": e.new_status.map(|s| s.as_str()),
        "claimed_by": e.holder.as_ref().map(|s| s.as_str()),
        "revision": e.revision,
        "time": time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
}

/// One human line per event.
pub fn event_line(e: &TaskEvent) -> String {
    let status = |s: Option<agent_core::TaskStatus>| s.map_or("(none)", |s| s.as_str());
    let holder = e
        .holder
        .as_ref()
        .map(|h| format!(" by {h}"))
        .unwrap_or_default();
    format!(
        "{} {} -> {}{holder} (revision {})",
        e.task,
        status(e.old_status),
        status(e.new_status),
        e.revision
    )
}

/// Live sessions as aligned columns with a header.
pub fn session_table(sessions: &[agent_core::Presence]) -> String {
    let header = [
        "SESSION", "STATE", "TASK", "BACKEND", "HOST", "PID", "SINCE",
    ]
    .map(String::from);
    let rows: Vec<[String; 7]> = sessions
        .iter()
        .map(|p| {
            [
                p.session_id.to_string(),
                printable(&p.state),
                p.current_task
                    .as_ref()
                    .map_or("-".into(), |t| t.to_string()),
                printable(&p.backend),
                printable(&p.host),
                p.pid.to_string(),
                p.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]
        })
        .collect();
    columns(&header, &rows)
}

/// Tasks as aligned columns with a header; a blocker not complete yet shows its status
/// (`B1 (claimed)`, `B2 (missing)`).
pub fn task_table(tasks: &[Task], status_of: StatusOf) -> String {
    let header = [
        "TASK",
        "STATUS",
        "CLAIMED BY",
        "CLAIMED AT",
        "BLOCKED BY",
        "TITLE",
    ]
    .map(String::from);
    let rows: Vec<[String; 6]> = tasks
        .iter()
        .map(|t| {
            [
                t.id.to_string(),
                // The stored status, and what it means now where the two differ.
                match (t.status, claimable(t, status_of)) {
                    (TaskStatus::Blocked, true) => "blocked (claimable)".into(),
                    (TaskStatus::Available, false) => "available (waiting)".into(),
                    (status, _) => status.to_string(),
                },
                t.claimed_by.as_ref().map_or("-".into(), |s| s.to_string()),
                t.claimed_at
                    .map_or("-".into(), |at| at.format("%Y-%m-%d %H:%M:%S").to_string()),
                if t.blocked_by.is_empty() {
                    "-".into()
                } else {
                    let waiting = pending(t, status_of);
                    t.blocked_by
                        .iter()
                        .map(|b| match waiting.iter().find(|(w, _)| *w == b) {
                            Some((_, Some(status))) => format!("{b} ({status})"),
                            Some((_, None)) => format!("{b} (missing)"),
                            None => b.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                t.title.as_deref().map(printable).unwrap_or_default(),
            ]
        })
        .collect();
    columns(&header, &rows)
}

/// Rows under a header, each column as wide as its widest cell.
fn columns<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `s` with control characters escaped, so a stored title cannot move the terminal's cursor.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A progress bar on stderr for `len` steps, when that is worth it (more than a few hundred) and
/// stderr is a terminal; `None` otherwise (scripts and logs get no control characters).
pub fn progress(len: usize, what: &str) -> Option<indicatif::ProgressBar> {
    if len <= 300 || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta} left)")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
        assert_eq!(printable("plain ✅"), "plain ✅");
    }
}
