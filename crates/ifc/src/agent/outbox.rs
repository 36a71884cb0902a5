//! Finished runs not reported yet: one file per task whose command exited 0, written before the
//! completion is sent and removed once the store answered it. An agent killed in between (the
//! report is a transaction or a push away) leaves the file, and the session's next agent reports
//! the completion under the old run's fencing token instead of running the task again.

use std::path::{Path, PathBuf};

use agent_core::{FencingToken, TaskId};
use serde_json::{json, Value};

/// The directory of one session's unreported finished runs (under its log directory).
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    pub fn new(log_dir: &Path) -> Outbox {
        Outbox {
            dir: log_dir.join("finished"),
        }
    }

    fn path(&self, task: &TaskId) -> PathBuf {
        self.dir.join(format!("{task}.json"))
    }

    /// Notes that the run of `task` under `token` finished (written whole or not at all).
    pub fn finished(&self, task: &TaskId, token: FencingToken) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let body = json!({"task_id": task.as_str(), "token": token.0, "finished_at": chrono::Utc::now().to_rfc3339()});
        let tmp = self.dir.join(format!(".{task}.json.tmp"));
        std::fs::write(&tmp, body.to_string())?;
        std::fs::rename(&tmp, self.path(task))
    }

    /// Forgets `task`'s finished run: the store answered its completion.
    pub fn reported(&self, task: &TaskId) {
        match std::fs::remove_file(self.path(task)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(task = %task, path = %self.path(task).display(), error = %e, "cannot remove the note of a reported run")
            }
        }
    }

    /// The finished runs a previous agent of the session did not report. A file that does not
    /// read is named in a warning and left alone.
    pub fn pending(&self) -> Vec<(TaskId, FencingToken)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()))
                .and_then(|v| {
                    let task = v["task_id"].as_str().ok_or("no task_id")?;
                    let task = TaskId::parse(task).map_err(|e| e.to_string())?;
                    let token = v["token"].as_u64().ok_or("no token")?;
                    Ok((task, FencingToken(token)))
                });
            match parsed {
                Ok(run) => out.push(run),
                Err(why) => {
                    tracing::warn!(path = %path.display(), reason = %why, "an unreported finished run cannot be read: ignored")
                }
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_run_is_pending_until_reported() {
        let dir = tempfile::tempdir().expect("tmp");
        let outbox = Outbox::new(dir.path());
        assert!(outbox.pending().is_empty());
        let t = TaskId::parse("P0.1.1").expect("id");
        outbox.finished(&t, FencingToken(7)).expect("write");
        std::fs::write(dir.path().join("finished/junk.json"), "{").expect("junk");
        assert_eq!(
            Outbox::new(dir.path()).pending(),
            [(t.clone(), FencingToken(7))]
        );
        outbox.reported(&t);
        outbox.reported(&t);
        assert!(outbox.pending().is_empty());
    }
}
