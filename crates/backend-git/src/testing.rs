//! Test support (feature `testing`): a bare coordination repo in a temp dir that tests seed and
//! change directly (as another tool or a person pushing would), and configs for clones of it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use git2::{build::TreeUpdateBuilder, FileMode, Oid, Repository, Signature};

use crate::config::GitConfig;

/// The (before, after) pairs of lines that differ between two versions of a file with the same
/// number of lines.
pub fn changed_lines<'a>(before: &'a str, after: &'a str) -> Vec<(&'a str, &'a str)> {
    before
        .lines()
        .zip(after.lines())
        .filter(|(a, b)| a != b)
        .collect()
}

/// A bare remote plus a place for clones, removed on drop (unless `KEEP_TEMP_DIR` is set).
#[derive(Debug)]
pub struct BareRemote {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl BareRemote {
    /// A bare repo whose `main` holds `board` at the default board path.
    pub fn new(board: &str) -> BareRemote {
        let dir = tempfile::Builder::new()
            .prefix("ifc-git-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("coord.git");
        let repo = Repository::init_bare(&path).expect("init bare");
        repo.set_head("refs/heads/main").expect("HEAD");
        let remote = BareRemote {
            dir: Some(dir),
            path,
        };
        remote.commit(
            &[("docs/PHASE-0-TASK-BOARD.md", board.as_bytes())],
            "seed board",
        );
        remote
    }

    /// The remote's path (what `GitConfig::remote` names).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A config for a clone named `name`, with short intervals for tests.
    pub fn config(&self, name: &str) -> GitConfig {
        let mut c = GitConfig::new(self.path.display().to_string(), name);
        c.workdir = self.path.with_file_name("clones").join(name);
        c.poll_interval = Duration::from_millis(200);
        // Long enough that heartbeats land on a loaded machine, short enough for expiry tests.
        c.stale_after = Duration::from_secs(5);
        c
    }

    /// Commits `files` on top of `main` directly in the bare repo (compare-and-swap, retried).
    pub fn commit(&self, files: &[(&str, &[u8])], message: &str) -> Oid {
        let repo = Repository::open_bare(&self.path).expect("open bare");
        let sig = Signature::now("test", "test@localhost").expect("signature");
        loop {
            let parent = repo.refname_to_id("refs/heads/main").ok();
            let base = match parent {
                Some(p) => repo.find_commit(p).and_then(|c| c.tree()).expect("tree"),
                None => repo
                    .find_tree(
                        repo.treebuilder(None)
                            .and_then(|b| b.write())
                            .expect("empty tree"),
                    )
                    .expect("tree"),
            };
            let mut update = TreeUpdateBuilder::new();
            for (path, content) in files {
                let blob = repo.blob(content).expect("blob");
                update.upsert(*path, blob, FileMode::Blob);
            }
            let tree_id = update.create_updated(&repo, &base).expect("tree update");
            let tree = repo.find_tree(tree_id).expect("tree");
            let parents: Vec<git2::Commit<'_>> = parent
                .map(|p| repo.find_commit(p).expect("parent"))
                .into_iter()
                .collect();
            let parent_refs: Vec<&git2::Commit<'_>> = parents.iter().collect();
            let commit = repo
                .commit(None, &sig, &sig, message, &tree, &parent_refs)
                .expect("commit");
            let moved = match parent {
                Some(p) => repo.reference_matching("refs/heads/main", commit, true, p, message),
                None => repo.reference("refs/heads/main", commit, false, message),
            };
            if moved.is_ok() {
                return commit;
            }
        }
    }

    /// A person's edit of `path`: `change` of the file as it is on `main`, committed on top of
    /// it as a compare-and-swap (read again and retried when an agent pushed in between).
    pub fn edit(&self, path: &str, message: &str, change: impl Fn(&str) -> String) -> Oid {
        self.person_commit(message, |repo, base, update| {
            let before = base
                .get_path(Path::new(path))
                .ok()
                .and_then(|e| repo.find_blob(e.id()).ok())
                .map(|b| String::from_utf8_lossy(b.content()).into_owned())
                .unwrap_or_default();
            let blob = repo.blob(change(&before).as_bytes()).expect("blob");
            update.upsert(path, blob, FileMode::Blob);
        })
    }

    /// A person's `git rm path` on `main`, pushed (compare-and-swap, retried).
    pub fn remove(&self, path: &str, message: &str) -> Oid {
        self.person_commit(message, |_, _, update| {
            update.remove(path);
        })
    }

    /// A person's commit on `main`: `change` says what changes in the head's tree; committed as
    /// a compare-and-swap, read again and retried when an agent pushed in between.
    fn person_commit(
        &self,
        message: &str,
        change: impl Fn(&Repository, &git2::Tree<'_>, &mut TreeUpdateBuilder),
    ) -> Oid {
        let repo = Repository::open_bare(&self.path).expect("open bare");
        let sig = Signature::now("person", "person@localhost").expect("signature");
        loop {
            let parent = repo.refname_to_id("refs/heads/main").expect("main");
            let commit = repo.find_commit(parent).expect("head commit");
            let base = commit.tree().expect("tree");
            let mut update = TreeUpdateBuilder::new();
            change(&repo, &base, &mut update);
            let tree_id = update.create_updated(&repo, &base).expect("tree update");
            let tree = repo.find_tree(tree_id).expect("tree");
            let new = repo
                .commit(None, &sig, &sig, message, &tree, &[&commit])
                .expect("commit");
            if repo
                .reference_matching("refs/heads/main", new, true, parent, message)
                .is_ok()
            {
                return new;
            }
        }
    }

    /// A file on `main`.
    pub fn read(&self, path: &str) -> Option<String> {
        let repo = Repository::open_bare(&self.path).expect("open bare");
        let tree = repo
            .find_reference("refs/heads/main")
            .and_then(|r| r.peel_to_tree())
            .expect("main");
        let entry = tree.get_path(Path::new(path)).ok()?;
        let blob = repo.find_blob(entry.id()).expect("blob");
        Some(String::from_utf8_lossy(blob.content()).into_owned())
    }

    /// The last beat `status_path`'s heartbeat ref carries, if it has one.
    pub fn heartbeat(&self, status_path: &str) -> Option<String> {
        let repo = Repository::open_bare(&self.path).expect("open bare");
        let tree = repo
            .find_reference(&format!("refs/ifc/heartbeat/{status_path}"))
            .and_then(|r| r.peel_to_tree())
            .ok()?;
        let entry = tree.get_path(Path::new("STATUS.yaml")).ok()?;
        let blob = repo.find_blob(entry.id()).expect("blob");
        Some(String::from_utf8_lossy(blob.content()).into_owned())
    }

    /// Makes `status_path`'s heartbeat old, as if its session had stopped long ago.
    pub fn make_stale(&self, status_path: &str) {
        let text = self
            .read(status_path)
            .unwrap_or_else(|| panic!("{status_path} exists"));
        // Written long ago by a process started long ago: a live holder's heartbeat refs
        // (which count only for the process the branch's file names) no longer keep it fresh.
        let old: String = text
            .lines()
            .filter(|l| !l.starts_with("started_at:"))
            .map(|l| {
                if l.starts_with("updated_at:") {
                    "updated_at: 2000-01-01T00:00:00Z\nstarted_at: 2000-01-01T00:00:00Z".to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        self.commit(&[(status_path, old.as_bytes())], "test: stale heartbeat");
        // And its heartbeat ref, if it has one, as old.
        let repo = Repository::open_bare(&self.path).expect("open bare");
        let name = format!("refs/ifc/heartbeat/{status_path}");
        if repo.find_reference(&name).is_ok() {
            let sig = Signature::now("test", "test@localhost").expect("signature");
            let blob = repo.blob(old.as_bytes()).expect("blob");
            let mut tree = repo.treebuilder(None).expect("tree");
            tree.insert("STATUS.yaml", blob, 0o100644).expect("entry");
            let tree = repo.find_tree(tree.write().expect("tree")).expect("tree");
            let commit = repo
                .commit(None, &sig, &sig, "test: stale heartbeat", &tree, &[])
                .expect("commit");
            repo.reference(&name, commit, true, "test: stale heartbeat")
                .expect("ref");
        }
    }

    /// The commits on `main`, newest first: (id, message).
    pub fn log(&self) -> Vec<(Oid, String)> {
        let repo = Repository::open_bare(&self.path).expect("open bare");
        let mut walk = repo.revwalk().expect("revwalk");
        walk.push_ref("refs/heads/main").expect("main");
        walk.flatten()
            .map(|oid| {
                let message = repo
                    .find_commit(oid)
                    .map(|c| c.message().unwrap_or_default().to_owned())
                    .unwrap_or_default();
                (oid, message)
            })
            .collect()
    }
}

/// `git daemon` serving a [`BareRemote`] over `git://` on a free loopback port (pushes
/// allowed): the network transport, as a hosted remote is reached. Killed on drop.
#[derive(Debug)]
pub struct GitDaemon {
    child: std::process::Child,
    /// The remote's URL (what `GitConfig::remote` names).
    pub url: String,
}

impl BareRemote {
    /// Serves this remote with `git daemon` (the `git` package's; fails loudly without it).
    pub fn serve(&self) -> GitDaemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let base = self.path.parent().expect("the remote's directory");
        // git-daemon itself, not `git daemon`: the `git` wrapper runs it as a child, which
        // killing the wrapper would leave behind.
        let exec_path = std::process::Command::new("git")
            .arg("--exec-path")
            .output()
            .expect("git runs (install git: apt-get install git)");
        let exec_path = String::from_utf8_lossy(&exec_path.stdout).trim().to_owned();
        let child = std::process::Command::new(Path::new(&exec_path).join("git-daemon"))
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--enable=receive-pack")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("git-daemon starts (install git: apt-get install git)");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "git daemon did not listen on 127.0.0.1:{port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let name = self.path.file_name().expect("name").to_string_lossy();
        GitDaemon {
            child,
            url: format!("git://127.0.0.1:{port}/{name}"),
        }
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BareRemote {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEMP_DIR").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping git dir {}", dir.keep().display());
            }
        }
    }
}
