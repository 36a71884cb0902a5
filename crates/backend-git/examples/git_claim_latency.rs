//! Git claim latency (fetch, edit, commit, compare-and-swap push) against a plain libgit2
//! commit + push of the same one-row change, on a bare remote in a temp dir; and how long after
//! the push another session (its own clone, woken by notify) hears of the claim:
//! `cargo run --release -p backend-git --features testing --example git_claim_latency [N]`.

use std::path::Path;
use std::time::{Duration, Instant};

use agent_core::{Backend, BackendEvent, ClaimOutcome, SessionId, TaskId, TaskStatus};
use backend_git::testing::BareRemote;
use backend_git::GitBackend;
use git2::{Repository, Signature};

fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e3
    };
    format!(
        "p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms",
        at(0.50),
        at(0.95),
        at(0.99)
    )
}

fn board(n: usize) -> String {
    let mut b =
        String::from("| ID | Task | Status | Owner | Blocked by |\n|---|---|---|---|---|\n");
    for i in 0..n {
        b.push_str(&format!("| T.{i} | task {i} | 🔵 AVAILABLE |  |  |\n"));
    }
    b
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);

    // Plain libgit2: edit the row, commit, push (libgit2's own local transport).
    let plain_remote = BareRemote::new(&board(n));
    let dir = tempfile::tempdir().expect("temp dir");
    let repo =
        Repository::clone(&plain_remote.path().display().to_string(), dir.path()).expect("clone");
    let sig = Signature::now("bench", "bench@localhost").expect("sig");
    let path = Path::new("docs/PHASE-0-TASK-BOARD.md");
    let plain_claim = |i: usize| {
        let file = dir.path().join(path);
        let text = std::fs::read_to_string(&file).expect("board");
        let row = format!("| T.{i} | task {i} | 🔵 AVAILABLE |  |  |");
        let text = text.replace(
            &row,
            &format!("| T.{i} | task {i} | 🟡 IN PROGRESS | bench |  |"),
        );
        let start = Instant::now();
        std::fs::write(&file, text).expect("write");
        let mut index = repo.index().expect("index");
        index.add_path(path).expect("add");
        index.write().expect("index write");
        let tree = repo
            .find_tree(index.write_tree().expect("tree"))
            .expect("tree");
        let parent = repo.head().and_then(|h| h.peel_to_commit()).expect("head");
        repo.commit(Some("HEAD"), &sig, &sig, "claim", &tree, &[&parent])
            .expect("commit");
        repo.find_remote("origin")
            .and_then(|mut r| r.push(&["refs/heads/main:refs/heads/main"], None))
            .expect("push");
        start.elapsed()
    };

    let remote = BareRemote::new(&board(n));
    let mut config = remote.config("bench");
    config.stale_after = Duration::from_secs(3600);
    let backend = GitBackend::open(config).await.expect("open");
    // Another session on the same remote (its own clone), told of pushes by notify.
    let mut observer_config = remote.config("observer");
    observer_config.stale_after = Duration::from_secs(3600);
    let observer = GitBackend::open(observer_config).await.expect("open");
    let mut sub = observer.subscribe().await.expect("subscribe");
    let session = SessionId::parse("bench").expect("id");
    let (mut plain, mut claims, mut visible) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved, alternating which goes first, so both see the same machine.
    for i in 0..n {
        if i % 2 == 0 {
            plain.push(plain_claim(i));
        }
        let id = TaskId::parse(&format!("T.{i}")).expect("id");
        let start = Instant::now();
        let out = backend.claim(&id, &session).await.expect("claim");
        let pushed = Instant::now();
        claims.push(pushed - start);
        assert!(matches!(out, ClaimOutcome::Won(_)));
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .expect("the other session hears the claim within 10 s")
                .expect("event stream open");
            if matches!(event, BackendEvent::Task(e) if e.task == id && e.new_status == Some(TaskStatus::Claimed))
            {
                visible.push(pushed.elapsed());
                break;
            }
        }
        if i % 2 == 1 {
            plain.push(plain_claim(i));
        }
    }
    println!(
        "{:<44} {}",
        "ifc git claim (fetch + commit + CAS push)",
        percentiles(claims)
    );
    println!(
        "{:<44} {}",
        "pushed -> another session's event (notify)",
        percentiles(visible)
    );
    println!(
        "{:<44} {}",
        "plain libgit2 commit + push",
        percentiles(plain)
    );
}
