//! Settings of the git backend, with the proof of concept's defaults.

use std::path::PathBuf;
use std::time::Duration;

use agent_core::SessionId;

/// Where the coordination repo is and how this session uses it.
#[derive(Debug, Clone)]
pub struct GitConfig {
    /// The coordination repo: a path, `file://`, ssh or https URL.
    pub remote: String,
    /// The branch sessions coordinate on.
    pub branch: String,
    /// The board's path inside the repo.
    pub board: String,
    /// The directory (inside the repo) that holds STATUS files; empty: the repo root.
    pub status_dir: String,
    /// STATUS file name; `{n}` is the session's number (`session-1-ndi` → `1`; the whole id for
    /// ids not of the guide's form, see `session_number`), `{session}` the whole id.
    pub status_pattern: String,
    /// The dedicated clone (never the user's working tree).
    pub workdir: PathBuf,
    /// How often to fetch when nothing else says the remote moved.
    pub poll_interval: Duration,
    /// A claim whose owner's STATUS `updated_at` is older than this is claimable by others.
    pub stale_after: Duration,
    /// Commit author name and email.
    pub author: (String, String),
    /// The session this clone serves (for INSTRUCTIONS files), if any.
    pub session: Option<SessionId>,
    /// For a remote on this machine: watch its refs and poll as soon as they change.
    pub watch_remote: bool,
    /// The agent process this clone serves (`agent_core::process::this_process`): its claims are
    /// re-claimed only by it while it may be alive. `None` for one-shot commands, whose claims
    /// their session adopts from any process.
    pub process: Option<String>,
    /// A one-shot command (`ifc claim`): nothing heartbeats its claims after it exits, so they
    /// hold until released, as an etcd claim without a lease does.
    pub one_shot: bool,
}

impl GitConfig {
    /// Defaults for `remote`, with the clone under `.ifc/git/<name>` in the current directory.
    pub fn new(remote: impl Into<String>, clone_name: &str) -> Self {
        let poll_interval = Duration::from_secs(30);
        GitConfig {
            remote: remote.into(),
            branch: "main".into(),
            board: "docs/PHASE-0-TASK-BOARD.md".into(),
            status_dir: String::new(),
            status_pattern: "STATUS-SESSION-{n}.yaml".into(),
            workdir: PathBuf::from(".ifc/git").join(clone_name),
            poll_interval,
            stale_after: poll_interval * 10,
            author: ("ifc".into(), "ifc@localhost".into()),
            session: None,
            watch_remote: true,
            process: None,
            one_shot: false,
        }
    }

    /// Where the default clone of this remote is: `.ifc/git/<name>`, unless that directory is
    /// a clone of another remote, then `.ifc/git/<name>-<hash of the remote>` (issue 16: a
    /// second coordination repo used from the same directory was refused, "… is a clone of X,
    /// not of Y"). One remote spelled two ways (relative, absolute, file://) is one remote.
    pub fn follow_remote(&mut self) {
        let Some(name) = self
            .workdir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
        else {
            return;
        };
        let Ok(repo) = git2::Repository::open(&self.workdir) else {
            return; // no clone there yet: it is this remote's
        };
        // A clone that never fetched (a mistyped remote) follows the one asked for now.
        let fetched = repo
            .references_glob("refs/remotes/origin/*")
            .is_ok_and(|mut r| r.next().is_some());
        let origin = repo
            .find_remote("origin")
            .ok()
            .and_then(|o| o.url().map(str::to_owned));
        let Some(origin) = origin.filter(|_| fetched) else {
            return;
        };
        if same_remote(&origin, &self.remote) {
            return;
        }
        let canonical = canonical_remote(&self.remote);
        let hashed = format!(
            "{name}-{:08x}",
            agent_core::config::stable_hash(&canonical) as u32
        );
        self.workdir.set_file_name(hashed);
    }

    /// The STATUS file of `session`, relative to the repo root.
    pub fn status_path(&self, session: &SessionId) -> String {
        let n = session_number(session);
        let name = self
            .status_pattern
            .replace("{n}", &n)
            .replace("{session}", session.as_str());
        join(&self.status_dir, &name)
    }

    /// The prefix of `session`'s INSTRUCTIONS files, relative to the repo root.
    pub fn instructions_prefix(&self, session: &SessionId) -> String {
        join(
            &self.status_dir,
            &format!("INSTRUCTIONS-SESSION-{}-", session_number(session)),
        )
    }

    /// Whether the remote is on this machine's file system (so its refs can be watched and a
    /// push can be a compare-and-swap on the ref itself).
    pub fn local_remote(&self) -> Option<PathBuf> {
        local_path(&self.remote)
    }
}

/// The path a remote names on this machine's file system, if it names one (a path or
/// `file://…`, not a URL of another transport).
/// A remote as one spelling: a local path canonicalized (when it exists), a URL as given.
pub fn canonical_remote(remote: &str) -> String {
    local_path(remote)
        .and_then(|p| std::fs::canonicalize(p).ok())
        .map_or_else(|| remote.to_owned(), |p| p.display().to_string())
}

/// Whether two spellings name one remote (relative and absolute, a trailing slash, file://).
pub fn same_remote(a: &str, b: &str) -> bool {
    a == b || canonical_remote(a) == canonical_remote(b)
}

pub fn local_path(remote: &str) -> Option<PathBuf> {
    if let Some(path) = remote.strip_prefix("file://") {
        return Some(PathBuf::from(path));
    }
    let is_url = remote.contains("://")
        || (remote.contains(':') && !remote.starts_with('/') && !remote.starts_with('.'));
    (!is_url).then(|| PathBuf::from(remote))
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{}/{name}", dir.trim_end_matches('/'))
    }
}

/// The part of a STATUS or INSTRUCTIONS file name that stands for `session`: the guide's
/// number for the guide's ids (`session-1-ndi` → `1`, `session-12` → `12`), the whole id for
/// any other (`worker-7` → `worker-7`), so only two guide ids with one number can share a
/// file, and that is refused (`Core::status_file_is_ours`).
pub fn session_number(session: &SessionId) -> String {
    let s = session.as_str();
    let guide = s.strip_prefix("session-").and_then(|rest| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let after = &rest[digits.len()..];
        (!digits.is_empty() && (after.is_empty() || after.starts_with('-'))).then_some(digits)
    });
    guide.unwrap_or_else(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_file_names_and_local_remotes() {
        let mut c = GitConfig::new("../coord.git", "s");
        let s = SessionId::parse("session-1-ndi").expect("valid");
        assert_eq!(c.status_path(&s), "STATUS-SESSION-1.yaml");
        c.status_dir = "status/".into();
        assert_eq!(
            c.status_path(&SessionId::parse("alpha").expect("valid")),
            "status/STATUS-SESSION-alpha.yaml"
        );
        assert_eq!(c.instructions_prefix(&s), "status/INSTRUCTIONS-SESSION-1-");
        c.status_dir.clear();
        for (id, file) in [
            ("session-12", "STATUS-SESSION-12.yaml"),
            ("session-3-web-rtc", "STATUS-SESSION-3.yaml"),
            // Not the guide's form: the whole id, which no other session has.
            ("chaos-1", "STATUS-SESSION-chaos-1.yaml"),
            ("cli-1", "STATUS-SESSION-cli-1.yaml"),
            ("session-1x", "STATUS-SESSION-session-1x.yaml"),
            ("worker7", "STATUS-SESSION-worker7.yaml"),
        ] {
            let id = SessionId::parse(id).expect("valid");
            assert_eq!(c.status_path(&id), file);
        }
        assert!(c.local_remote().is_some());
        for remote in [
            "git@github.com:org/coord.git",
            "https://example.com/coord.git",
            "ssh://h/coord.git",
        ] {
            assert!(
                GitConfig::new(remote, "s").local_remote().is_none(),
                "{remote}"
            );
        }
        assert_eq!(
            GitConfig::new("file:///srv/coord.git", "s").local_remote(),
            Some(PathBuf::from("/srv/coord.git"))
        );
    }
}
