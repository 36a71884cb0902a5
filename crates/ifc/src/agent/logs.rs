//! The session's task logs (`<task>-<token>.log` in its log directory), pruned to the newest
//! `--keep-logs`: one file per run otherwise piles up without end (issue 18's soak left 30,000).
//! The directory is the session's own: an agent sharing it with another may remove that one's
//! logs (tester helper-8 D5), so `--help` says so.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct TaskLogs {
    /// Most logs kept (0: every one).
    keep: usize,
    /// The logs there are, oldest first.
    kept: VecDeque<PathBuf>,
}

impl TaskLogs {
    /// The logs already in `dir` (an earlier run's), oldest first.
    pub fn open(dir: &Path, keep: usize) -> TaskLogs {
        let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| is_task_log(&e.file_name().to_string_lossy()))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        found.sort();
        let mut logs = TaskLogs {
            keep,
            kept: found.into_iter().map(|(_, p)| p).collect(),
        };
        logs.prune();
        logs
    }

    /// A run started writing `log`: the oldest logs beyond the limit go.
    pub fn started(&mut self, log: PathBuf) {
        self.kept.push_back(log);
        self.prune();
    }

    fn prune(&mut self) {
        if self.keep == 0 {
            return;
        }
        while self.kept.len() > self.keep {
            let Some(old) = self.kept.pop_front() else {
                return;
            };
            match std::fs::remove_file(&old) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(log = %old.display(), error = %e, "cannot remove an old task log")
                }
            }
        }
    }
}

/// Whether `name` is a task log's: `<task>-<token>.log`, the token digits.
fn is_task_log(name: &str) -> bool {
    name.strip_suffix(".log")
        .and_then(|stem| stem.rsplit_once('-'))
        .is_some_and(|(task, token)| {
            !task.is_empty() && !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_logs_are_kept_and_other_files_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, "x").expect("write");
            // Distinct modification times, oldest first.
            std::thread::sleep(std::time::Duration::from_millis(15));
            p
        };
        write("A-1.log");
        write("B-2.log");
        write("outbox.json");
        write("notes.log");
        write("build-x.log");
        let mut logs = TaskLogs::open(dir.path(), 3);
        logs.started(write("C-3.log"));
        logs.started(write("D-4.log"));
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "B-2.log",
                "C-3.log",
                "D-4.log",
                "build-x.log",
                "notes.log",
                "outbox.json"
            ]
        );
        let mut all = TaskLogs::open(dir.path(), 0);
        all.started(write("E-5.log"));
        assert_eq!(std::fs::read_dir(dir.path()).expect("read").count(), 7);
    }
}
