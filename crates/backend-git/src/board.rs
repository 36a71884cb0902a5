//! The markdown task board: parsing (pure, errors name file and line) and rendering that changes
//! only the cells that change, so edits of different rows by different sessions merge cleanly and
//! an unchanged board is byte-identical.
//!
//! Format: tables whose header has an ID column (`ID`, `Task ID`) and a status column (`Status`,
//! `State`); optional title (`Task`, `Title`, `Description`), owner (`Owner`, `Assignee`,
//! `Assigned to`, `Claimed by`, `Session`, …) and blockers (`Blocked by`, `Depends on`,
//! `Blockers`) columns. Statuses by emoji or word, any case: 🔵 AVAILABLE, 🔴 BLOCKED, 🟡 IN
//! PROGRESS, ✅ DONE. A table with a status column and no ID column whose rows all name statuses
//! is a legend, not an error; other tables without both columns are not task tables.

use std::collections::BTreeMap;
use std::ops::Range;

use agent_core::{SessionId, TaskId, TaskStatus};

/// A task as the board states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardTask {
    pub id: TaskId,
    pub title: Option<String>,
    pub status: TaskStatus,
    pub owner: Option<SessionId>,
    pub blocked_by: Vec<TaskId>,
}

/// A board that could not be read: names the file and line of its first problem, and every
/// other problem found in the same pass (`more`: line, message), so a person fixes them all at
/// once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardError {
    pub file: String,
    pub line: usize,
    pub message: String,
    pub more: Vec<(usize, String)>,
}

impl std::fmt::Display for BoardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)?;
        for (line, message) in &self.more {
            write!(f, "\n{}:{line}: {message}", self.file)?;
        }
        Ok(())
    }
}

impl std::error::Error for BoardError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Id,
    Title,
    Status,
    Owner,
    Blockers,
}

/// Where one task's row and cells are in the text.
#[derive(Debug, Clone)]
struct Row {
    line: usize,
    /// The line of its table's header.
    header_line: usize,
    /// Byte range of each cell's content (between its pipes) in the text.
    cells: Vec<Range<usize>>,
    columns: BTreeMap<ColumnKey, usize>,
}

type ColumnKey = u8;

fn key(c: Column) -> ColumnKey {
    c as u8
}

/// A parsed board: its tasks (in file order) and where each lives in the original text.
#[derive(Debug, Clone)]
pub struct Board {
    text: String,
    tasks: Vec<BoardTask>,
    rows: Vec<Row>,
    /// Where a new row goes (after the last row of the last task table) and that table's layout.
    append: Option<(usize, Vec<Option<Column>>)>,
}

const HEADER: &str =
    "| ID | Task | Status | Owner | Blocked by |\n|----|------|--------|-------|------------|\n";

impl Board {
    /// Parses `text`, read from `file` (named in errors): every problem at once.
    pub fn parse(file: &str, text: &str) -> Result<Board, BoardError> {
        let (board, problems) = Board::parse_all(file, text);
        let mut problems = problems.into_iter();
        match problems.next() {
            None => Ok(board),
            Some(mut first) => {
                first.more = problems.map(|p| (p.line, p.message)).collect();
                Err(first)
            }
        }
    }

    /// Parses what can be: the board of the rows that parse, and each problem (one per row or
    /// table), in file order. For a caller with rules of its own over the good rows, so it can
    /// say its problems together with these.
    pub fn parse_all(file: &str, text: &str) -> (Board, Vec<BoardError>) {
        let err = |line: usize, message: String| BoardError {
            file: file.to_owned(),
            line,
            message,
            more: Vec::new(),
        };
        // Every problem of the board, in file order: all are reported at once.
        let mut problems: Vec<BoardError> = Vec::new();
        let lines = line_spans(text);
        let mut board = Board {
            text: text.to_owned(),
            tasks: Vec::new(),
            rows: Vec::new(),
            append: None,
        };
        let mut seen: BTreeMap<TaskId, usize> = BTreeMap::new();
        let mut i = 0;
        while i < lines.len() {
            let (start, end) = lines[i];
            let header_text = &text[start..end];
            let is_table = is_row(header_text)
                && lines
                    .get(i + 1)
                    .is_some_and(|&(s, e)| is_separator(&text[s..e]));
            if !is_table {
                i += 1;
                continue;
            }
            let header_line = i + 1;
            let headers: Vec<Option<Column>> = split_cells(header_text)
                .iter()
                .map(|r| column(&unescape(header_text[r.clone()].trim())))
                .collect();
            let has = |c: Column| headers.contains(&Some(c));
            let width = headers.len();
            i += 2;
            let mut table_rows = Vec::new();
            while i < lines.len() && is_row(&text[lines[i].0..lines[i].1]) {
                table_rows.push(i);
                i += 1;
            }
            match (has(Column::Id), has(Column::Status)) {
                (false, false) => continue, // not a task table (a legend, say)
                (true, false) => {
                    problems.push(err(
                        header_line,
                        "task table has an ID column but no Status column".into(),
                    ));
                    continue;
                }
                (false, true) => {
                    // A legend (`| Status | Meaning |`): no other task column, and every row
                    // names a status.
                    let status_at = headers.iter().position(|h| *h == Some(Column::Status));
                    let others = headers.iter().flatten().any(|c| *c != Column::Status);
                    let legend = !others
                        && table_rows.iter().all(|&r| {
                            let (s, e) = lines[r];
                            let cells = split_cells(&text[s..e]);
                            status_at.and_then(|idx| cells.get(idx)).is_some_and(|c| {
                                parse_status(&unescape(text[s..e][c.clone()].trim())).is_ok()
                            })
                        });
                    if legend {
                        continue;
                    }
                    problems.push(err(
                        header_line,
                        "task table has a Status column but no ID column".into(),
                    ));
                    continue;
                }
                (true, true) => {}
            }
            let mut columns = BTreeMap::new();
            let mut twice = None;
            for (idx, h) in headers.iter().enumerate() {
                if let Some(c) = h {
                    if columns.insert(key(*c), idx).is_some() {
                        twice = Some(*c);
                    }
                }
            }
            if let Some(c) = twice {
                problems.push(err(header_line, format!("two {c:?} columns in one table")));
                continue;
            }
            for &r in &table_rows {
                let (s, e) = lines[r];
                let line_no = r + 1;
                let cells: Vec<Range<usize>> = split_cells(&text[s..e])
                    .into_iter()
                    .map(|c| c.start + s..c.end + s)
                    .collect();
                if cells.len() != width {
                    problems.push(err(
                        line_no,
                        format!(
                            "row has {} cells, its table's header has {width}",
                            cells.len()
                        ),
                    ));
                    continue;
                }
                let cell = |c: Column| {
                    columns
                        .get(&key(c))
                        .map(|&idx| unescape(text[cells[idx].clone()].trim()))
                };
                let read = || -> Result<BoardTask, String> {
                    let id_text = cell(Column::Id).unwrap_or_default();
                    let id = TaskId::parse(&id_text).map_err(|e| e.to_string())?;
                    let status = parse_status(&cell(Column::Status).unwrap_or_default())?;
                    let owner = match cell(Column::Owner).filter(|o| !o.is_empty()) {
                        None => None,
                        Some(o) => Some(SessionId::parse(&o).map_err(|e| format!("owner: {e}"))?),
                    };
                    let blocked_by = match cell(Column::Blockers) {
                        None => Vec::new(),
                        Some(list) => list
                            .split(',')
                            .map(str::trim)
                            .filter(|b| !b.is_empty())
                            .map(|b| TaskId::parse(b).map_err(|e| format!("blocked by: {e}")))
                            .collect::<Result<_, _>>()?,
                    };
                    let title = cell(Column::Title).filter(|t| !t.is_empty());
                    Ok(BoardTask {
                        id,
                        title,
                        status,
                        owner,
                        blocked_by,
                    })
                };
                let task = match read() {
                    Ok(task) => task,
                    Err(message) => {
                        problems.push(err(line_no, message));
                        continue;
                    }
                };
                if let Some(first) = seen.insert(task.id.clone(), line_no) {
                    problems.push(err(
                        line_no,
                        format!(
                            "task {} is listed twice: lines {first} and {line_no}",
                            task.id
                        ),
                    ));
                    continue;
                }
                board.tasks.push(task);
                board.rows.push(Row {
                    line: line_no,
                    header_line,
                    cells,
                    columns: columns.clone(),
                });
            }
            // New rows go after this table's last row (or its separator, if it has none).
            let last_line = table_rows.last().map_or(header_line, |&r| r);
            board.append = Some((lines[last_line].1, headers));
        }
        (board, problems)
    }

    /// Whether the text has a task table (one with ID and Status columns), rows or not.
    pub fn has_task_table(&self) -> bool {
        self.append.is_some()
    }

    /// The tasks, in file order.
    pub fn tasks(&self) -> &[BoardTask] {
        &self.tasks
    }

    /// Whether a claim of `id` can be recorded: its table has an owner column. `Err` names the
    /// table's header line (a claim written there could never be read back).
    pub fn can_record_owner(&self, file: &str, id: &TaskId) -> Result<(), BoardError> {
        let Some(i) = self.tasks.iter().position(|t| &t.id == id) else {
            return Ok(());
        };
        let row = &self.rows[i];
        if row.columns.contains_key(&key(Column::Owner)) {
            return Ok(());
        }
        Err(BoardError {
            more: Vec::new(),
            file: file.to_owned(),
            line: row.header_line,
            message: format!(
                "the table of task {id} has no owner column (Owner, Assignee, Assigned to, Claimed by, Session): a claim could not be recorded"
            ),
        })
    }

    /// The line a task's row is on.
    pub fn line_of(&self, id: &TaskId) -> Option<usize> {
        self.tasks
            .iter()
            .position(|t| &t.id == id)
            .map(|i| self.rows[i].line)
    }

    /// The board text with `tasks` applied: changed cells rewritten, new tasks appended as rows
    /// of the last task table (a new table if there is none); every other byte as it was. Tasks
    /// missing from `tasks` are left as they are.
    pub fn render(&self, tasks: &[BoardTask]) -> String {
        let wanted: BTreeMap<&TaskId, &BoardTask> = tasks.iter().map(|t| (&t.id, t)).collect();
        // (range, replacement) edits, applied back to front.
        let mut edits: Vec<(Range<usize>, String)> = Vec::new();
        for (old, row) in self.tasks.iter().zip(&self.rows) {
            let Some(new) = wanted.get(&old.id) else {
                continue;
            };
            let mut set = |c: Column, value: String| {
                if let Some(&idx) = row.columns.get(&key(c)) {
                    let range = row.cells[idx].clone();
                    edits.push((range.clone(), cell_text(&self.text[range], &value)));
                }
            };
            if new.status != old.status {
                set(Column::Status, status_label(new.status).into());
            }
            if new.owner != old.owner {
                set(
                    Column::Owner,
                    new.owner
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                );
            }
            if new.title != old.title {
                set(
                    Column::Title,
                    escape(new.title.as_deref().unwrap_or_default()),
                );
            }
            if new.blocked_by != old.blocked_by {
                set(Column::Blockers, join_ids(&new.blocked_by));
            }
        }
        let known: std::collections::BTreeSet<&TaskId> = self.tasks.iter().map(|t| &t.id).collect();
        let added: Vec<&BoardTask> = tasks.iter().filter(|t| !known.contains(&t.id)).collect();
        if !added.is_empty() {
            match &self.append {
                // After the last row of the last task table: each new row starts a new line.
                Some((at, headers)) => {
                    let block: String = added
                        .iter()
                        .map(|t| format!("\n{}", row_text(headers, t)))
                        .collect();
                    edits.push((*at..*at, block));
                }
                None => {
                    let t = &self.text;
                    let gap = if t.is_empty() || t.ends_with("\n\n") {
                        ""
                    } else if t.ends_with('\n') {
                        "\n"
                    } else {
                        "\n\n"
                    };
                    let headers = [
                        Column::Id,
                        Column::Title,
                        Column::Status,
                        Column::Owner,
                        Column::Blockers,
                    ]
                    .map(Some);
                    let mut block = format!("{gap}{HEADER}");
                    for task in added {
                        block.push_str(&row_text(&headers, task));
                        block.push('\n');
                    }
                    edits.push((t.len()..t.len(), block));
                }
            }
        }
        edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
        let mut out = self.text.clone();
        for (range, text) in edits {
            out.replace_range(range, &text);
        }
        out
    }
}

/// A fresh board holding `tasks` in one table.
pub fn new_board(tasks: &[BoardTask]) -> String {
    let empty = Board {
        text: String::new(),
        tasks: Vec::new(),
        rows: Vec::new(),
        append: None,
    };
    empty.render(tasks)
}

fn row_text(headers: &[Option<Column>], t: &BoardTask) -> String {
    let mut row = String::from("|");
    for h in headers {
        let value = match h {
            Some(Column::Id) => t.id.to_string(),
            Some(Column::Title) => escape(t.title.as_deref().unwrap_or_default()),
            Some(Column::Status) => status_label(t.status).into(),
            Some(Column::Owner) => t.owner.as_ref().map(|s| s.to_string()).unwrap_or_default(),
            Some(Column::Blockers) => join_ids(&t.blocked_by),
            None => String::new(),
        };
        row.push(' ');
        row.push_str(&value);
        row.push_str(" |");
    }
    row
}

/// The new content of a cell: ` value `, padded to the old width when the old cell was padded
/// (an aligned table), so aligned tables stay aligned and plain ones stay plain.
fn cell_text(old: &str, value: &str) -> String {
    let mut text = format!(" {value} ");
    let (old_width, new_width) = (old.chars().count(), text.chars().count());
    let padded = old.ends_with("  ") && !old.trim().is_empty();
    if padded && new_width < old_width {
        text.push_str(&" ".repeat(old_width - new_width));
    }
    text
}

fn join_ids(ids: &[TaskId]) -> String {
    ids.iter()
        .map(|i| i.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The board's label for a status.
pub fn status_label(s: TaskStatus) -> &'static str {
    match s {
        TaskStatus::Available => "🔵 AVAILABLE",
        TaskStatus::Blocked => "🔴 BLOCKED",
        TaskStatus::Claimed => "🟡 IN PROGRESS",
        TaskStatus::Complete => "✅ DONE",
    }
}

fn parse_status(cell: &str) -> Result<TaskStatus, String> {
    let emoji = [
        ("🔵", TaskStatus::Available),
        ("🔴", TaskStatus::Blocked),
        ("🟡", TaskStatus::Claimed),
        ("✅", TaskStatus::Complete),
    ];
    let by_emoji: Vec<TaskStatus> = emoji
        .iter()
        .filter(|(e, _)| cell.contains(e))
        .map(|(_, s)| *s)
        .collect();
    let words: String = cell
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace() || *c == '_')
        .collect();
    let words = words
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    let by_word = match words.as_str() {
        "" => None,
        "available" => Some(TaskStatus::Available),
        "blocked" => Some(TaskStatus::Blocked),
        "in progress" | "in_progress" | "claimed" => Some(TaskStatus::Claimed),
        "done" | "complete" | "completed" => Some(TaskStatus::Complete),
        _ => return Err(unknown_status(cell)),
    };
    match (by_emoji.as_slice(), by_word) {
        ([], Some(s)) => Ok(s),
        ([e], None) => Ok(*e),
        ([e], Some(w)) if *e == w => Ok(w),
        _ => Err(unknown_status(cell)),
    }
}

fn unknown_status(cell: &str) -> String {
    format!(
        "unknown status {cell:?} (expected 🔵 AVAILABLE, 🔴 BLOCKED, 🟡 IN PROGRESS or ✅ DONE)"
    )
}

fn column(header: &str) -> Option<Column> {
    match header.to_ascii_lowercase().as_str() {
        "id" | "task id" => Some(Column::Id),
        "task" | "title" | "description" => Some(Column::Title),
        "status" | "state" => Some(Column::Status),
        "owner" | "claimed by" | "claimed_by" | "session" | "assignee" | "assigned to"
        | "assigned" | "holder" | "agent" => Some(Column::Owner),
        "blocked by" | "depends on" | "blockers" => Some(Column::Blockers),
        _ => None,
    }
}

/// (start, end) byte offsets of each line, without its line ending (`\n` or `\r\n`).
fn line_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    // A byte-order mark (editors on Windows write one) is not part of the first line; the text
    // keeps it, so rendering does too.
    let mut start = if text.starts_with('\u{feff}') {
        '\u{feff}'.len_utf8()
    } else {
        0
    };
    for (i, b) in text.bytes().enumerate() {
        if b == b'\n' {
            let end = if i > start && text.as_bytes()[i - 1] == b'\r' {
                i - 1
            } else {
                i
            };
            spans.push((start, end));
            start = i + 1;
        }
    }
    if start < text.len() {
        spans.push((start, text.len()));
    }
    spans
}

fn is_row(line: &str) -> bool {
    line.trim_start().starts_with('|')
}

fn is_separator(line: &str) -> bool {
    let cells = split_cells(line);
    !cells.is_empty()
        && cells.iter().all(|c| {
            let t = line[c.clone()].trim();
            !t.is_empty() && t.contains('-') && t.chars().all(|ch| matches!(ch, '-' | ':'))
        })
}

/// Byte ranges (within `line`) of the cells between unescaped pipes (a pipe right after a
/// backslash is part of the cell).
fn split_cells(line: &str) -> Vec<Range<usize>> {
    let mut pipes = Vec::new();
    let mut prev = None;
    for (i, c) in line.char_indices() {
        if c == '|' && prev != Some('\\') {
            pipes.push(i);
        }
        prev = Some(c);
    }
    let Some(&first) = pipes.first() else {
        return Vec::new();
    };
    let mut cells: Vec<Range<usize>> = pipes.windows(2).map(|w| w[0] + 1..w[1]).collect();
    // A row may omit its closing pipe.
    let last = *pipes.last().unwrap_or(&first);
    if !line[last + 1..].trim().is_empty() {
        cells.push(last + 1..line.len());
    }
    cells
}

fn unescape(s: &str) -> String {
    s.replace("\\|", "|")
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests;
