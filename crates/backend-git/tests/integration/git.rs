//! Git-specific behaviour: races between clones, STATUS files agreeing with the board, stale
//! claims, polling and notify, malformed boards, and the fixture board.

use std::collections::BTreeMap;
use std::time::Duration;

use agent_core::testing::{sid, tid};
use agent_core::{
    Backend, BackendError, BackendEvent, ClaimOutcome, SessionId, TaskId, TaskPatch, TaskStatus,
};
use backend_git::board::Board;
use backend_git::testing::BareRemote;
use backend_git::GitBackend;

const FIXTURE: &str = include_str!("../fixtures/PHASE-0-TASK-BOARD.md");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_clones_race_for_twenty_tasks_and_the_board_and_status_files_agree() {
    let mut board = crate::EMPTY_BOARD.to_owned();
    for i in 0..20 {
        board.push_str(&format!("| R.{i} | race {i} | 🔵 AVAILABLE |  |  |\n"));
    }
    let remote = BareRemote::new(&board);
    let mut handles = Vec::new();
    for k in 0..5 {
        let backend = crate::open(&remote, &format!("racer-{k}")).await;
        let session = sid(&format!("session-{k}-race"));
        handles.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for i in 0..20 {
                let id = tid(&format!("R.{}", (i + k * 4) % 20));
                match backend.claim(&id, &session).await.expect("claim") {
                    ClaimOutcome::Won(c) => won.push((id, c.token)),
                    ClaimOutcome::Lost { holder } => assert!(holder.is_some_and(|h| h != session)),
                    other => panic!("{other:?}"),
                }
            }
            // Kept alive until every racer is done: a dropped clone is a crashed session.
            (session, won, backend)
        }));
    }
    let mut winners: BTreeMap<TaskId, SessionId> = BTreeMap::new();
    let mut tokens: BTreeMap<SessionId, Vec<(TaskId, u64)>> = BTreeMap::new();
    let mut alive = Vec::new();
    for h in handles {
        let (session, won, backend) = h.await.expect("racer");
        alive.push(backend);
        for (id, token) in &won {
            assert!(
                winners.insert(id.clone(), session.clone()).is_none(),
                "double claim of {id}"
            );
            tokens
                .entry(session.clone())
                .or_default()
                .push((id.clone(), token.0));
        }
    }
    assert_eq!(winners.len(), 20, "every task claimed exactly once");
    let config = remote.config("x");
    let text = remote.read(&config.board).expect("board");
    let board = Board::parse(&config.board, &text).expect("parses");
    for t in board.tasks() {
        assert_eq!(
            (t.status, t.owner.as_ref()),
            (TaskStatus::Claimed, winners.get(&t.id)),
            "{}",
            t.id
        );
    }
    for (session, won) in tokens {
        let status = remote
            .read(&config.status_path(&session))
            .expect("STATUS file");
        let status = backend_git::status::StatusIn::parse("s", status.as_bytes());
        assert_eq!(status.session_id.as_deref(), Some(session.as_str()));
        for (id, token) in won {
            assert_eq!(
                status.token(&id),
                Some(token),
                "{session}'s STATUS records {id}"
            );
        }
    }
}

#[tokio::test]
async fn a_stale_claim_can_be_taken_over_and_a_fresh_one_cannot() {
    let remote = BareRemote::new(crate::EMPTY_BOARD);
    let mut config = remote.config("a");
    config.stale_after = Duration::from_secs(3600);
    let a = GitBackend::open(config).await.expect("open");
    let mut config = remote.config("b");
    config.stale_after = Duration::from_secs(3600);
    let b = GitBackend::open(config.clone()).await.expect("open");
    a.put(&tid("T"), &TaskPatch::default()).await.expect("put");
    assert!(matches!(
        a.claim(&tid("T"), &sid("session-1")).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    drop(a);
    let out = b.claim(&tid("T"), &sid("session-2")).await.expect("claim");
    assert_eq!(
        out,
        ClaimOutcome::Lost {
            holder: Some(sid("session-1"))
        },
        "a fresh claim holds"
    );
    remote.make_stale(&config.status_path(&sid("session-1")));
    let out = b.claim(&tid("T"), &sid("session-2")).await.expect("claim");
    assert!(
        matches!(out, ClaimOutcome::Won(_)),
        "a stale claim is taken over: {out:?}"
    );
}

#[tokio::test]
async fn a_garbled_status_file_costs_no_claim_and_its_session_writes_it_again() {
    // Issue 14 #6: `state: [unclosed` pushed by a person silently freed the session's claims:
    // its running task was killed and another session ran it.
    let remote = BareRemote::new(crate::EMPTY_BOARD);
    let mut config = remote.config("a");
    config.stale_after = Duration::from_secs(2);
    let a = GitBackend::open(config.clone()).await.expect("open");
    a.put(&tid("T"), &TaskPatch::default()).await.expect("put");
    let mut sub = a.subscribe().await.expect("subscribe");
    let token = match a.claim(&tid("T"), &sid("session-1")).await.expect("claim") {
        ClaimOutcome::Won(c) => c.token,
        other => panic!("{other:?}"),
    };
    let path = config.status_path(&sid("session-1"));
    remote.commit(&[(path.as_str(), b"state: [unclosed\n")], "person: garbled");
    let b = GitBackend::open(remote.config("b")).await.expect("open");
    assert_eq!(
        b.claim(&tid("T"), &sid("session-2")).await.expect("claim"),
        ClaimOutcome::Lost {
            holder: Some(sid("session-1"))
        },
        "an unreadable STATUS file frees nothing"
    );
    // Its session writes it again (its heartbeats come every 0.5 s), with the claim.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = remote.read(&path).unwrap_or_default();
        if text.contains("session_id: session-1") && text.contains(&format!("token: {}", token.0)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not rewritten: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
        assert!(
            !matches!(event, BackendEvent::ClaimLost { .. }),
            "the holder kept its claim: {event:?}"
        );
    }
    released(&a, "T", "session-1", agent_core::ReleaseTo::Complete, token).await;
}

/// Releases `task` for `session` with `token`, which must work.
async fn released(
    b: &GitBackend,
    task: &str,
    session: &str,
    to: agent_core::ReleaseTo,
    token: agent_core::FencingToken,
) {
    let out = b
        .release(&tid(task), &sid(session), to, Some(token))
        .await
        .expect("release");
    assert!(
        matches!(out, agent_core::ReleaseOutcome::Released { .. }),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_finished_task_is_released_though_a_person_garbled_or_deleted_its_status_file() {
    // The tester's report: released while its STATUS file was garbled, a finished task was
    // refused ("not the holder") and ran again.
    let remote = BareRemote::new(crate::EMPTY_BOARD);
    let mut config = remote.config("a");
    config.stale_after = Duration::from_secs(3600);
    let a = GitBackend::open(config.clone()).await.expect("open");
    for t in ["G", "D"] {
        a.put(&tid(t), &TaskPatch::default()).await.expect("put");
    }
    let path = config.status_path(&sid("session-1"));
    for (t, edit) in [("G", Some(&b"state: [unclosed\n"[..])), ("D", None)] {
        let token = match a.claim(&tid(t), &sid("session-1")).await.expect("claim") {
            ClaimOutcome::Won(c) => c.token,
            other => panic!("{other:?}"),
        };
        match edit {
            Some(bytes) => {
                remote.commit(&[(path.as_str(), bytes)], "person: garbled");
            }
            None => {
                remote.remove(&path, "person: deleted");
            }
        }
        released(&a, t, "session-1", agent_core::ReleaseTo::Complete, token).await;
        let task = a.get(&tid(t)).await.expect("get").expect("task");
        assert_eq!(task.status, TaskStatus::Complete, "{t}");
    }
}

#[tokio::test]
async fn fencing_tokens_only_grow_even_when_a_person_rewrites_the_history() {
    // Issue 14 #5: after a force-push, T1 was claimed under token 3 by one session, then under
    // 3 by another; T2 under 7, then 6.
    let remote = BareRemote::new(crate::EMPTY_BOARD);
    let a = GitBackend::open(remote.config("a")).await.expect("open");
    a.put(&tid("T"), &TaskPatch::default()).await.expect("put");
    let start = git2::Repository::open_bare(remote.path())
        .and_then(|r| r.refname_to_id("refs/heads/main"))
        .expect("head");
    let mut tokens = Vec::new();
    for session in ["session-1", "session-2"] {
        let token = match a.claim(&tid("T"), &sid(session)).await.expect("claim") {
            ClaimOutcome::Won(c) => c.token,
            other => panic!("{other:?}"),
        };
        tokens.push(token);
        released(&a, "T", session, agent_core::ReleaseTo::Available, token).await;
        // A person force-pushes the branch back to before the claim.
        git2::Repository::open_bare(remote.path())
            .and_then(|r| {
                r.reference("refs/heads/main", start, true, "force-push")
                    .map(drop)
            })
            .expect("force-push");
    }
    let b = GitBackend::open(remote.config("b")).await.expect("open");
    match b.claim(&tid("T"), &sid("session-3")).await.expect("claim") {
        ClaimOutcome::Won(c) => tokens.push(c.token),
        other => panic!("{other:?}"),
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens grow across force-pushes: {tokens:?}"
    );
}

#[tokio::test]
async fn only_agents_that_may_be_alive_are_listed_as_sessions() {
    // Issue 14 #8: agents that had exited were listed as idle until their heartbeat went stale,
    // and one-shot commands' sessions as idle with pid 0.
    let remote = BareRemote::new(crate::EMPTY_BOARD);
    let b = GitBackend::open(remote.config("a")).await.expect("open");
    let presence = |session: &str, pid: u32| agent_core::Presence {
        session_id: sid(session),
        state: "idle".into(),
        current_task: None,
        backend: "git".into(),
        started_at: chrono::Utc::now(),
        pid,
        host: agent_core::process::hostname(),
        version: "test".into(),
        heartbeat: None,
        claim_p95_us: None,
    };
    // A pid far above any the kernel hands out: that process is gone.
    for (session, pid) in [
        ("session-1", std::process::id()),
        ("session-2", 4_000_000),
        ("session-3", 0),
    ] {
        b.announce(&presence(session, pid)).await.expect("announce");
    }
    assert_eq!(listed(&b).await, [sid("session-1")]);
}

/// The sessions `backend` lists as live.
async fn listed(backend: &GitBackend) -> Vec<SessionId> {
    backend
        .sessions()
        .await
        .expect("sessions")
        .into_iter()
        .map(|p| p.session_id)
        .collect()
}

async fn first_event(
    backend: &GitBackend,
    change: impl std::future::Future<Output = ()>,
) -> agent_core::TaskEvent {
    let mut sub = backend.subscribe().await.expect("subscribe");
    change.await;
    let wait = async {
        loop {
            if let Some(BackendEvent::Task(e)) = sub.next().await {
                return e;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("the change arrives as an event")
}

#[tokio::test]
async fn another_clones_push_arrives_by_polling() {
    let remote = BareRemote::new(crate::EMPTY_BOARD);
    let mut config = remote.config("watcher");
    config.watch_remote = false; // polling only
    let watcher = GitBackend::open(config).await.expect("open");
    let writer = crate::open(&remote, "writer").await;
    let e = first_event(&watcher, async {
        writer
            .put(&tid("P.1"), &TaskPatch::default())
            .await
            .expect("put");
    })
    .await;
    assert_eq!(
        (e.task, e.old_status, e.new_status),
        (tid("P.1"), None, Some(TaskStatus::Available))
    );
}

#[tokio::test]
async fn another_clones_push_arrives_through_notify_without_polling() {
    let remote = BareRemote::new(crate::EMPTY_BOARD);
    let mut config = remote.config("watcher");
    config.poll_interval = Duration::from_secs(3600); // only the file watch can deliver it
    config.stale_after = Duration::from_secs(3600);
    let watcher = GitBackend::open(config).await.expect("open");
    let writer = crate::open(&remote, "writer").await;
    let e = first_event(&watcher, async {
        writer
            .put(&tid("N.1"), &TaskPatch::default())
            .await
            .expect("put");
    })
    .await;
    assert_eq!(
        (e.task, e.new_status),
        (tid("N.1"), Some(TaskStatus::Available))
    );
}

#[tokio::test]
async fn instructions_for_the_session_arrive_as_events() {
    let remote = BareRemote::new(crate::EMPTY_BOARD);
    let mut config = remote.config("s1");
    config.session = Some(sid("session-1-ndi"));
    let backend = GitBackend::open(config).await.expect("open");
    let mut sub = backend.subscribe().await.expect("subscribe");
    remote.commit(
        &[
            ("INSTRUCTIONS-SESSION-2-PHASE-3.md", b"not ours"),
            ("INSTRUCTIONS-SESSION-1-PHASE-3.md", b"go"),
        ],
        "instructions",
    );
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(BackendEvent::Instructions { session, path }) = sub.next().await {
                return (session, path);
            }
        }
    })
    .await
    .expect("an instructions event");
    assert_eq!(
        got,
        (
            sid("session-1-ndi"),
            "INSTRUCTIONS-SESSION-1-PHASE-3.md".to_owned()
        )
    );
}

#[tokio::test]
async fn a_malformed_board_is_an_input_error_naming_file_and_line() {
    let board = format!("{}| A | t | 🟣 MAYBE |  |  |\n", crate::EMPTY_BOARD);
    let remote = BareRemote::new(&board);
    let err = GitBackend::open(remote.config("c"))
        .await
        .expect_err("the board is malformed");
    assert!(matches!(err, BackendError::InvalidInput(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("docs/PHASE-0-TASK-BOARD.md:5: unknown status"),
        "{err}"
    );
}

#[tokio::test]
async fn the_fixture_board_is_served_and_a_claim_changes_only_its_row() {
    let remote = BareRemote::new(FIXTURE);
    let backend = crate::open(&remote, "c").await;
    let listing = backend.list().await.expect("list");
    assert_eq!(listing.tasks.len(), 54);
    let claimed = listing
        .tasks
        .iter()
        .find(|t| t.id.as_str() == "P0.1.6")
        .expect("task");
    assert_eq!(
        (claimed.status, claimed.claimed_by.clone()),
        (TaskStatus::Claimed, Some(sid("session-1-ndi")))
    );
    let out = backend
        .claim(&tid("P0.5.4"), &sid("session-1-ndi"))
        .await
        .expect("claim");
    assert!(
        matches!(out, ClaimOutcome::Won(_)),
        "P0.5.3 is done, so P0.5.4 is claimable: {out:?}"
    );
    let text = remote.read("docs/PHASE-0-TASK-BOARD.md").expect("board");
    let diff = backend_git::testing::changed_lines(FIXTURE, &text);
    assert_eq!(
        diff,
        vec![(
            "| P0.5.4 | Stream claim integration | 🔵 AVAILABLE |  | P0.5.3 |",
            "| P0.5.4 | Stream claim integration | 🟡 IN PROGRESS | session-1-ndi | P0.5.3 |"
        )]
    );
    // Tester helper-2: the session's first STATUS file listed only P0.5.4, which disowned its
    // board-declared claim on P0.1.6; another session then claimed P0.1.6.
    let p016 = backend
        .get(&tid("P0.1.6"))
        .await
        .expect("get")
        .expect("task");
    assert_eq!(
        (p016.status, p016.claimed_by),
        (TaskStatus::Claimed, Some(sid("session-1-ndi")))
    );
    let other = crate::open(&remote, "d").await;
    assert!(
        matches!(
            other
                .claim(&tid("P0.1.6"), &sid("session-4-z"))
                .await
                .expect("claim"),
            ClaimOutcome::Lost { .. }
        ),
        "P0.1.6 is session-1-ndi's"
    );
    // Its owner still adopts it.
    assert!(matches!(
        backend
            .claim(&tid("P0.1.6"), &sid("session-1-ndi"))
            .await
            .expect("claim"),
        ClaimOutcome::Won(_)
    ));
    let out = backend
        .claim(&tid("P0.1.7"), &sid("session-1-ndi"))
        .await
        .expect("claim");
    assert_eq!(
        out,
        ClaimOutcome::NotClaimable {
            status: TaskStatus::Blocked
        }
    );
}

#[tokio::test]
async fn a_claim_its_owner_no_longer_lists_is_free_even_with_a_fresh_heartbeat() {
    let remote = BareRemote::new(crate::EMPTY_BOARD);
    let mut config = remote.config("a");
    config.stale_after = Duration::from_secs(3600);
    let a = GitBackend::open(config.clone()).await.expect("open");
    a.put(&tid("F"), &TaskPatch::default()).await.expect("put");
    assert!(matches!(
        a.claim(&tid("F"), &sid("session-1")).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    drop(a);
    // The owner fenced itself and its next heartbeat lists no claim: fresh, but not holding F.
    let path = config.status_path(&sid("session-1"));
    let fresh = chrono::Utc::now().to_rfc3339();
    let status = format!("session_id: session-1\nstate: idle\ncurrent_task: null\nbackend: git\nupdated_at: {fresh}\nclaims: {{}}\n");
    remote.commit(&[(path.as_str(), status.as_bytes())], "fenced heartbeat");
    let mut config = remote.config("b");
    config.stale_after = Duration::from_secs(3600);
    let b = GitBackend::open(config).await.expect("open");
    let task = b.get(&tid("F")).await.expect("get").expect("exists");
    assert_eq!(
        (task.status, task.claimed_by),
        (TaskStatus::Available, None)
    );
    assert!(matches!(
        b.claim(&tid("F"), &sid("session-2")).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
}

#[tokio::test]
async fn every_commit_ifc_makes_carries_the_task_session_and_token_trailers() {
    use agent_core::{Mirrored, Presence, ReleaseTo};
    let mut board = crate::EMPTY_BOARD.to_owned();
    board.push_str("| TR.1 | one | 🔵 AVAILABLE |  |  |\n| TR.2 | two | 🔵 AVAILABLE |  |  |\n");
    let remote = BareRemote::new(&board);
    let b = crate::open(&remote, "trailers").await;
    let s = sid("session-7-trailers");
    let presence = Presence {
        session_id: s.clone(),
        state: "idle".into(),
        current_task: None,
        backend: "git".into(),
        started_at: chrono::Utc::now(),
        pid: 1,
        host: "h".into(),
        version: "0".into(),
        heartbeat: None,
        claim_p95_us: None,
    };
    b.announce(&presence).await.expect("announce");
    let ClaimOutcome::Won(c) = b.claim(&tid("TR.1"), &s).await.expect("claim") else {
        panic!("claim")
    };
    b.release(&tid("TR.1"), &s, ReleaseTo::Complete, Some(c.token))
        .await
        .expect("release");
    b.put(&tid("TR.3"), &TaskPatch::default())
        .await
        .expect("put");
    let mirrored = Mirrored {
        task: tid("TR.2"),
        status: TaskStatus::Claimed,
        holder: Some(s.clone()),
        token: Some(agent_core::FencingToken(4242)),
        read_as: None,
    };
    b.record(&[mirrored]).await.expect("record");
    let repo = git2::Repository::open_bare(remote.path()).expect("open remote");
    let mut walk = repo.revwalk().expect("walk");
    walk.push_ref("refs/heads/main").expect("main");
    let log: Vec<String> = walk
        .map(|o| {
            let commit = repo.find_commit(o.expect("oid")).expect("commit");
            commit.message().unwrap_or_default().to_owned()
        })
        .filter(|m| !m.starts_with("seed board"))
        .collect();
    for message in &log {
        for trailer in ["Ifc-Task: ", "Ifc-Session: ", "Ifc-Fencing-Token: "] {
            assert!(
                message.contains(trailer),
                "{trailer:?} missing in {message:?}"
            );
        }
    }
    assert!(
        log.len() >= 5,
        "announce, claim, complete, put and record: {log:?}"
    );
    assert!(
        log.iter().any(|m| m.contains("Ifc-Task: TR.2")
            && m.contains("Ifc-Session: session-7-trailers")
            && m.contains("Ifc-Fencing-Token: 4242")),
        "the mirrored claim carries the coordinator's token: {log:?}"
    );
}

#[tokio::test]
async fn an_asserted_claim_the_board_already_shows_is_taken_into_the_status_file() {
    use agent_core::{FencingToken, Mirrored, ReleaseOutcome, ReleaseTo};
    // A migrated board: the row says IN PROGRESS by session-1-ndi, who has no STATUS file yet.
    let mut board = crate::EMPTY_BOARD.to_owned();
    board.push_str("| AS.1 | adopt me | 🟡 IN PROGRESS | session-1-ndi |  |\n");
    let remote = BareRemote::new(&board);
    let s = sid("session-1-ndi");
    let mut config = remote.config("asserting");
    config.session = Some(s.clone());
    let b = GitBackend::open(config).await.expect("open");
    let item = Mirrored {
        task: tid("AS.1"),
        status: TaskStatus::Claimed,
        holder: Some(s.clone()),
        token: Some(FencingToken(77)),
        read_as: None,
    };
    let out = b.record(std::slice::from_ref(&item)).await.expect("record");
    assert_eq!(
        out,
        vec![agent_core::RecordOutcome::Written],
        "the STATUS file must carry it"
    );
    let status = remote
        .read("STATUS-SESSION-1.yaml")
        .expect("a STATUS file for the session");
    assert!(status.contains("AS.1") && status.contains("77"), "{status}");
    // Asserting it again changes nothing; the holder's release with that token lands.
    let out = b.record(std::slice::from_ref(&item)).await.expect("record");
    assert_eq!(out, vec![agent_core::RecordOutcome::Unchanged]);
    let released = b
        .release(
            &tid("AS.1"),
            &s,
            ReleaseTo::Complete,
            Some(FencingToken(77)),
        )
        .await
        .expect("release");
    assert!(
        matches!(released, ReleaseOutcome::Released { .. }),
        "{released:?}"
    );
}

#[tokio::test]
async fn a_stale_ref_lock_left_in_the_remote_is_cleared_and_pushes_go_on() {
    let mut board = crate::EMPTY_BOARD.to_owned();
    board.push_str("| LK.1 | locked out | 🔵 AVAILABLE |  |  |\n");
    let remote = BareRemote::new(&board);
    // A writer died between creating the lock and renaming it into place a while ago.
    let lock = remote.path().join("refs/heads/main.lock");
    let file = std::fs::File::create(&lock).expect("lock");
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(120))
        .expect("age the lock");
    let b = crate::open(&remote, "after-the-lock").await;
    let out = b
        .claim(&tid("LK.1"), &sid("session-1-lock"))
        .await
        .expect("claim");
    assert!(matches!(out, ClaimOutcome::Won(_)), "{out:?}");
    assert!(!lock.exists(), "the stale lock is gone");
    // A recent one (a writer killed a moment ago) is waited for until it is stale and cleared:
    // the operation lands, not an error after a few seconds (the tester's report: agents
    // started just after a writer was killed exited 3).
    let file = std::fs::File::create(&lock).expect("lock");
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(27))
        .expect("age the lock");
    let out = b
        .release(
            &tid("LK.1"),
            &sid("session-1-lock"),
            agent_core::ReleaseTo::Available,
            None,
        )
        .await
        .expect("the release waits for the lock to go stale");
    assert!(
        matches!(out, agent_core::ReleaseOutcome::Released { .. }),
        "{out:?}"
    );
    assert!(!lock.exists(), "the lock went stale and was removed");
    // One that cannot be removed refuses every push; the error says so, not "the branch kept
    // moving" (the tester's report: the branch had not moved).
    std::fs::create_dir(&lock).expect("a lock that is a directory");
    std::fs::File::open(&lock)
        .and_then(|d| d.set_modified(std::time::SystemTime::now() - Duration::from_secs(120)))
        .expect("age the lock");
    let err = b
        .claim(&tid("LK.1"), &sid("session-1-lock"))
        .await
        .expect_err("every push refused");
    let text = err.to_string();
    assert!(text.contains("main.lock exists"), "{text}");
}

#[tokio::test]
async fn a_clone_whose_making_was_interrupted_or_failed_is_made_again() {
    let board = format!("{}| A | t | 🔵 AVAILABLE |  |  |\n", crate::EMPTY_BOARD);
    let remote = BareRemote::new(&board);
    // What an older version left when killed while making its clone in place: a `.git` with a
    // config and hooks, no HEAD and no objects. Opening it used to fail for ever.
    let config = remote.config("half");
    let git = config.workdir.join(".git");
    std::fs::create_dir_all(git.join("hooks")).expect("hooks");
    std::fs::create_dir_all(git.join("objects/pack")).expect("objects");
    std::fs::write(git.join("config"), "[core]\n").expect("config");
    let b = GitBackend::open(config.clone())
        .await
        .expect("a half-made clone is made again");
    assert_eq!(b.list().await.expect("list").tasks.len(), 1);
    drop(b);

    // A process killed mid-write leaves git's lock files in its clone (seeds 40015, 50011: a
    // bridge killed, then every `bridge --once` and `audit` failed on "failed to lock file").
    for lock in [
        "refs/heads/main.lock",
        "refs/remotes/origin/main.lock",
        "index.lock",
    ] {
        std::fs::write(git.join(lock), "").expect("a left lock file");
    }
    let b = GitBackend::open(config.clone())
        .await
        .expect("the left locks are cleared");
    let won = b
        .claim(&tid("A"), &sid("session-1-x"))
        .await
        .expect("a write works");
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    drop(b);

    // The remote is away while a clone is made: the open fails, and the next one works once
    // the remote is back.
    let away = remote.path().with_extension("away");
    std::fs::rename(remote.path(), &away).expect("move the remote away");
    let config = remote.config("later");
    let err = GitBackend::open(config.clone())
        .await
        .expect_err("no remote");
    assert!(err.is_transient(), "{err:?}");
    std::fs::rename(&away, remote.path()).expect("move the remote back");
    let b = GitBackend::open(config).await.expect("the remote is back");
    assert_eq!(b.list().await.expect("list").tasks.len(), 1);
}

#[tokio::test]
async fn a_claim_in_a_table_without_an_owner_column_is_refused_before_anything_is_written_from_either_store(
) {
    let board = "# Board\n\n| ID | Task | Status | Who |\n|----|------|--------|-----|\n| A | t | 🔵 AVAILABLE |  |\n";
    let remote = BareRemote::new(board);
    let b = crate::open(&remote, "c").await;
    let err = b
        .claim(&tid("A"), &sid("session-1-x"))
        .await
        .expect_err("nowhere to record the owner");
    assert!(matches!(err, BackendError::InvalidInput(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("docs/PHASE-0-TASK-BOARD.md:3: the table of task A has no owner column"),
        "{err}"
    );
    assert_eq!(
        remote.read("docs/PHASE-0-TASK-BOARD.md").as_deref(),
        Some(board)
    );
    assert!(remote.read("STATUS-SESSION-1.yaml").is_none());
    // Nor is another store's claim recorded there (a hybrid session's etcd claim): it would
    // read back as held by nobody while its task ran, and other sessions could take the task.
    let err = b
        .record(&[agent_core::Mirrored {
            task: tid("A"),
            status: TaskStatus::Claimed,
            holder: Some(sid("session-1-x")),
            token: Some(agent_core::FencingToken(7)),
            read_as: None,
        }])
        .await
        .expect_err("nowhere to record the owner");
    assert!(matches!(err, BackendError::InvalidInput(_)), "{err:?}");
    assert!(err.to_string().contains("has no owner column"), "{err}");
    assert_eq!(
        remote.read("docs/PHASE-0-TASK-BOARD.md").as_deref(),
        Some(board)
    );
}

#[tokio::test]
async fn a_reader_with_a_shorter_stale_after_waits_for_the_holders_own() {
    // Seed 80010: a bridge at the default --stale-after (2 s) recorded an etcd claim over a git
    // session's claim whose heartbeat was 3 s old; that session (at 20 s) still ran the task.
    let board = format!("{}| A | t | 🔵 AVAILABLE |  |  |\n", crate::EMPTY_BOARD);
    let remote = BareRemote::new(&board);
    let mut long = remote.config("holder");
    long.stale_after = Duration::from_secs(20);
    let holder = GitBackend::open(long).await.expect("open");
    let won = holder
        .claim(&tid("A"), &sid("session-1-x"))
        .await
        .expect("claim");
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    let mut short = remote.config("reader");
    short.stale_after = Duration::from_millis(500);
    let reader = GitBackend::open(short).await.expect("open");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lost = reader
        .claim(&tid("A"), &sid("session-2-y"))
        .await
        .expect("claim");
    assert!(
        matches!(&lost, ClaimOutcome::Lost { holder: Some(h) } if h.as_str() == "session-1-x"),
        "{lost:?}"
    );
    let item = agent_core::mirror::Mirrored {
        task: tid("A"),
        status: TaskStatus::Claimed,
        holder: Some(sid("session-3-z")),
        token: None,
        read_as: None,
    };
    let out = reader.record(&[item]).await.expect("record");
    assert!(
        matches!(
            out.as_slice(),
            [agent_core::mirror::RecordOutcome::Conflict { .. }]
        ),
        "{out:?}"
    );
}

#[tokio::test]
async fn heartbeats_keep_claims_and_presence_alive_without_adding_commits_to_the_branch() {
    // Issue 14 #7: every heartbeat was a commit on the board's branch (72 a minute for three
    // idle agents), so a person's `git log` of the board drowned in them.
    let remote = BareRemote::new(&two_tasks());
    heartbeats_add_no_commits(&remote, |name| remote.config(name)).await;
}

#[tokio::test]
async fn heartbeats_add_no_commits_over_the_network_transport_either() {
    let remote = BareRemote::new(&two_tasks());
    let daemon = remote.serve();
    heartbeats_add_no_commits(&remote, |name| {
        let mut config = remote.config(name);
        config.remote = daemon.url.clone();
        config
    })
    .await;
}

#[tokio::test]
async fn a_task_costs_two_commits_its_claim_and_its_release() {
    // Issue 14 #7: an agent's task was four commits (claim, "working on it", release, "idle");
    // the claim and the release already write the session's state, so its announcements move
    // the heartbeat ref instead.
    let remote = BareRemote::new(&two_tasks());
    let agent = GitBackend::open(remote.config("agent"))
        .await
        .expect("open");
    let mut me = agent_core::Presence {
        session_id: sid("session-1-x"),
        state: "idle".into(),
        current_task: None,
        backend: "git".into(),
        started_at: chrono::Utc::now(),
        pid: std::process::id(),
        host: agent_core::process::hostname(),
        version: "test".into(),
        heartbeat: None,
        claim_p95_us: None,
    };
    agent.register(&me, false).await.expect("register");
    let before = remote.log().len();
    for task in ["A", "B"] {
        let ClaimOutcome::Won(c) = agent
            .claim(&tid(task), &me.session_id)
            .await
            .expect("claim")
        else {
            panic!("claim {task}")
        };
        me.current_task = Some(tid(task));
        agent.announce(&me).await.expect("announce working");
        agent
            .release(
                &tid(task),
                &me.session_id,
                agent_core::ReleaseTo::Complete,
                Some(c.token),
            )
            .await
            .expect("release");
        me.current_task = None;
        agent.announce(&me).await.expect("announce idle");
    }
    let log = remote.log();
    let added: Vec<&String> = log[..log.len() - before].iter().map(|(_, m)| m).collect();
    assert_eq!(added.len(), 4, "two commits per task: {added:?}");
    // The state they recorded is what the session is: idle, its tasks done.
    let reader = GitBackend::open(remote.config("reader"))
        .await
        .expect("open");
    let listed = reader.sessions().await.expect("sessions");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].state.as_str(), listed[0].current_task.as_ref()),
        ("idle", None)
    );
    for task in ["A", "B"] {
        assert_eq!(
            reader
                .get(&tid(task))
                .await
                .expect("get")
                .expect("task")
                .status,
            TaskStatus::Complete
        );
    }
}

fn two_tasks() -> String {
    format!(
        "{}| A | t | 🔵 AVAILABLE |  |  |\n| B | t | 🔵 AVAILABLE |  |  |\n",
        crate::EMPTY_BOARD
    )
}

async fn heartbeats_add_no_commits(
    remote: &BareRemote,
    config: impl Fn(&str) -> backend_git::GitConfig,
) {
    let mut holder_config = config("holder");
    holder_config.stale_after = Duration::from_secs(2);
    let holder = GitBackend::open(holder_config).await.expect("open");
    let me = agent_core::Presence {
        session_id: sid("session-1-x"),
        state: "idle".into(),
        current_task: None,
        backend: "git".into(),
        started_at: chrono::Utc::now(),
        pid: std::process::id(),
        host: agent_core::process::hostname(),
        version: "test".into(),
        heartbeat: None,
        claim_p95_us: None,
    };
    holder.register(&me, false).await.expect("register");
    let won = holder
        .claim(&tid("A"), &sid("session-1-x"))
        .await
        .expect("claim");
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    let before = remote.log();
    // Three times the staleness horizon: without heartbeats the claim would read free.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = remote.log();
    let added: Vec<&String> = after[..after.len() - before.len()]
        .iter()
        .map(|(_, m)| m)
        .collect();
    assert!(added.is_empty(), "commits added by heartbeats: {added:?}");
    let mut config = config("reader");
    config.stale_after = Duration::from_secs(2);
    let reader = GitBackend::open(config).await.expect("open");
    assert_eq!(
        reader
            .claim(&tid("A"), &sid("session-2-y"))
            .await
            .expect("claim"),
        ClaimOutcome::Lost {
            holder: Some(sid("session-1-x"))
        },
        "the holder's claim is still held"
    );
    assert_eq!(
        listed(&reader).await,
        [sid("session-1-x")],
        "the holder is still present"
    );
    // Once the holder is gone its heartbeats stop, and the claim comes back by itself.
    drop(holder);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(matches!(
        reader
            .claim(&tid("A"), &sid("session-2-y"))
            .await
            .expect("claim"),
        ClaimOutcome::Won(_)
    ));
}
