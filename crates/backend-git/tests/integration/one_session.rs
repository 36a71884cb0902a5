//! One session id used from several clones (CLI commands in different working directories, an
//! agent and a CLI command, a second agent): a claim stays held until its holder releases it,
//! whoever else writes the session's STATUS file; a claim an agent process holds is re-claimed
//! only by that process; a second agent with a live session's id is refused.

use std::collections::BTreeMap;

use agent_core::testing::{sid, tid};
use agent_core::{Backend, ClaimOutcome, Presence, ReleaseTo, TaskStatus};
use backend_git::testing::BareRemote;
use backend_git::GitBackend;

fn board(n: usize) -> String {
    let mut board = crate::EMPTY_BOARD.to_owned();
    for i in 0..n {
        board.push_str(&format!("| T{i} | task {i} | 🔵 AVAILABLE |  |  |\n"));
    }
    board
}

/// A clone for an agent process with id `process` (a one-shot command's has none).
async fn agent_clone(remote: &BareRemote, name: &str, process: &str) -> GitBackend {
    let mut config = remote.config(name);
    config.process = Some(process.to_owned());
    GitBackend::open(config).await.expect("open the clone")
}

fn presence(session: &str, pid: u32) -> Presence {
    Presence {
        session_id: sid(session),
        state: "idle".into(),
        current_task: None,
        backend: "git".into(),
        started_at: chrono::Utc::now(),
        pid,
        host: "another-host.example".into(),
        version: "test".into(),
        heartbeat: None,
        claim_p95_us: None,
    }
}

#[tokio::test]
async fn two_cli_claims_of_one_session_both_stay_held() {
    let remote = BareRemote::new(&board(2));
    let s = sid("session-1-x");
    // Two commands, each with a clone of its own (as `--git-workdir` or a second directory).
    let first = crate::open(&remote, "cli-a").await;
    let second = crate::open(&remote, "cli-b").await;
    assert!(matches!(
        first.claim(&tid("T0"), &s).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    assert!(matches!(
        second.claim(&tid("T1"), &s).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    let other = crate::open(&remote, "other").await;
    for t in ["T0", "T1"] {
        let task = other.get(&tid(t)).await.expect("get").expect("exists");
        assert_eq!(
            (task.status, task.claimed_by.as_ref()),
            (TaskStatus::Claimed, Some(&s)),
            "{t} stays held by its session"
        );
        assert_eq!(
            other
                .claim(&tid(t), &sid("session-2-y"))
                .await
                .expect("claim"),
            ClaimOutcome::Lost {
                holder: Some(s.clone())
            },
            "{t} cannot be taken by another session"
        );
    }
    // Releasing one keeps the other.
    first
        .release(&tid("T0"), &s, ReleaseTo::Complete, None)
        .await
        .expect("release");
    let t1 = other.get(&tid("T1")).await.expect("get").expect("exists");
    assert_eq!(t1.status, TaskStatus::Claimed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_of_one_session_from_many_clones_never_free_each_other() {
    let remote = BareRemote::new(&board(6));
    let mut handles = Vec::new();
    // Four sessions, each claiming from two clones at once (eight writers of four STATUS files).
    for k in 0..8 {
        let backend = crate::open(&remote, &format!("racer-{k}")).await;
        let session = sid(&format!("session-{}-race", k / 2));
        handles.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for i in 0..6 {
                let id = tid(&format!("T{}", (i + k) % 6));
                if let ClaimOutcome::Won(_) = backend.claim(&id, &session).await.expect("claim") {
                    won.push(id);
                }
            }
            (session, won, backend)
        }));
    }
    let mut alive = Vec::new();
    let mut won_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in handles {
        let (session, won, backend) = h.await.expect("racer");
        alive.push(backend);
        for id in won {
            won_by
                .entry(id.to_string())
                .or_default()
                .push(session.to_string());
        }
    }
    // A session may win its own task again (a re-claim), another session never: every task's
    // winners are one session.
    for (task, sessions) in &won_by {
        let first = &sessions[0];
        assert!(
            sessions.iter().all(|s| s == first),
            "{task} won by several sessions: {sessions:?}"
        );
    }
    // And the board agrees: every won task is held by its winner.
    let reader = crate::open(&remote, "reader").await;
    for (task, sessions) in &won_by {
        let t = reader.get(&tid(task)).await.expect("get").expect("exists");
        assert_eq!(
            (t.status, t.claimed_by.map(|s| s.to_string())),
            (TaskStatus::Claimed, Some(sessions[0].clone())),
            "{task}"
        );
    }
}

#[tokio::test]
async fn an_agents_claim_is_not_taken_by_a_cli_command_of_its_session() {
    let remote = BareRemote::new(&board(2));
    let s = sid("session-1-x");
    // The agent's process id names another host: it may be alive.
    let agent = agent_clone(&remote, "agent", "4242@another-host.example/1").await;
    agent
        .register(&presence("session-1-x", 4242), false)
        .await
        .expect("register");
    let ClaimOutcome::Won(c) = agent.claim(&tid("T0"), &s).await.expect("claim") else {
        panic!("the agent wins T0");
    };
    let cli = crate::open(&remote, "cli").await;
    assert_eq!(
        cli.claim(&tid("T0"), &s).await.expect("claim"),
        ClaimOutcome::Lost {
            holder: Some(s.clone())
        },
        "the agent process runs T0: a CLI claim for its session does not take it over"
    );
    // The CLI's claim of another task keeps the agent's claim in the STATUS file.
    assert!(matches!(
        cli.claim(&tid("T1"), &s).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    let t0 = cli.get(&tid("T0")).await.expect("get").expect("exists");
    assert_eq!(t0.status, TaskStatus::Claimed);
    // The agent still holds it under its token and completes it.
    assert!(matches!(
        agent
            .release(&tid("T0"), &s, ReleaseTo::Complete, Some(c.token))
            .await
            .expect("release"),
        agent_core::ReleaseOutcome::Released { .. }
    ));
    // A CLI claim (no process) is the session's to adopt from anywhere.
    assert!(matches!(
        agent.claim(&tid("T1"), &s).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
}

#[tokio::test]
async fn a_second_agent_with_a_live_sessions_id_is_refused_and_names_the_first() {
    let remote = BareRemote::new(&board(1));
    let first = agent_clone(&remote, "first", "4242@another-host.example/1").await;
    assert_eq!(
        first
            .register(&presence("session-1-x", 4242), false)
            .await
            .expect("register"),
        None
    );
    let second = agent_clone(&remote, "second", "4343@another-host.example/2").await;
    let refused = second
        .register(&presence("session-1-x", 4343), false)
        .await
        .expect("register")
        .expect("refused: the first runs the session");
    assert_eq!(refused.pid, 4242);
    // Taking over tells the first to stop: it learns it at its next write, claims nothing
    // more, and keeps what it holds until it releases it.
    let s = sid("session-1-x");
    let ClaimOutcome::Won(c) = first.claim(&tid("T0"), &s).await.expect("claim") else {
        panic!("the first wins T0");
    };
    assert_eq!(
        second
            .register(&presence("session-1-x", 4343), true)
            .await
            .expect("take over"),
        None
    );
    let err = first
        .announce(&presence("session-1-x", 4242))
        .await
        .expect_err("the first was taken over");
    assert!(
        matches!(err, agent_core::BackendError::SessionElsewhere { .. }),
        "{err:?}"
    );
    let err = first
        .claim(&tid("T0"), &s)
        .await
        .expect_err("a process taken over claims nothing more");
    assert!(
        matches!(err, agent_core::BackendError::SessionElsewhere { .. }),
        "{err:?}"
    );
    // T0 stays the first's (it may be running it) until it gives it back.
    assert_eq!(
        second.claim(&tid("T0"), &s).await.expect("claim"),
        ClaimOutcome::Lost {
            holder: Some(s.clone())
        }
    );
    assert!(matches!(
        first
            .release(&tid("T0"), &s, ReleaseTo::Available, Some(c.token))
            .await
            .expect("release"),
        agent_core::ReleaseOutcome::Released { .. }
    ));
    assert!(matches!(
        second.claim(&tid("T0"), &s).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
}

#[tokio::test]
async fn a_remote_moved_away_is_not_recreated_by_a_push_and_comes_back_whole() {
    // Found by `scripts/chaos --random --seed 1008`: a push through the kept handle of a local
    // remote that had been moved away created `refs/heads` (and objects) at its path, and the
    // real repository could not be moved back.
    let remote = BareRemote::new(&board(2));
    let s = sid("session-1-x");
    let clone = crate::open(&remote, "clone").await;
    assert!(matches!(
        clone.claim(&tid("T0"), &s).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    let path = remote.path().to_path_buf();
    let away = path.with_extension("away");
    std::fs::rename(&path, &away).expect("move the remote away");
    let err = clone
        .claim(&tid("T1"), &s)
        .await
        .expect_err("no remote, no claim");
    assert!(err.is_transient(), "{err:?}");
    assert!(!path.exists(), "nothing was created where the remote was");
    std::fs::rename(&away, &path).expect("move it back");
    assert!(matches!(
        clone.claim(&tid("T1"), &s).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
}

#[tokio::test]
async fn a_one_shot_commands_coordinator_claim_recorded_here_holds_until_released() {
    // Found by a tester: `ifc --fleet F claim T --session cli` (coordinator mode, git side)
    // is held in etcd until released, but went stale in git after `stale_after`.
    let remote = BareRemote::new(&board(2));
    let s = sid("cli-x");
    let mut config = remote.config("cli");
    config.session = Some(s.clone());
    let cli = GitBackend::open(config.clone()).await.expect("open");
    let item = agent_core::Mirrored {
        task: tid("T0"),
        status: TaskStatus::Claimed,
        holder: Some(s.clone()),
        token: Some(agent_core::FencingToken(42)),
        read_as: None,
    };
    assert_eq!(
        cli.record(std::slice::from_ref(&item))
            .await
            .expect("record"),
        vec![agent_core::RecordOutcome::Written]
    );
    drop(cli);
    remote.make_stale(&config.status_path(&s));
    let other = crate::open(&remote, "other").await;
    assert_eq!(
        other
            .claim(&tid("T0"), &sid("session-2-y"))
            .await
            .expect("claim"),
        ClaimOutcome::Lost {
            holder: Some(s.clone())
        },
        "held until released, whatever the heartbeat"
    );
    // An agent's claim (it heartbeats) still goes stale when its heartbeat does.
    let agent = agent_clone(&remote, "agent", "4242@another-host.example/1").await;
    let a = sid("session-3-z");
    assert!(matches!(
        agent.claim(&tid("T1"), &a).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    drop(agent);
    remote.make_stale(&remote.config("x").status_path(&a));
    assert!(matches!(
        other
            .claim(&tid("T1"), &sid("session-2-y"))
            .await
            .expect("claim"),
        ClaimOutcome::Won(_)
    ));
}

#[tokio::test]
async fn two_guide_ids_with_one_number_are_refused_and_other_ids_never_share_a_file() {
    // Issue 14 #2: `session-1-frontend` and `session-1-backend` both wrote
    // STATUS-SESSION-1.yaml; each claim was won and "lost" 30 ms later, for ever.
    let remote = BareRemote::new(&board(4));
    let (front, back) = (
        crate::open(&remote, "front").await,
        crate::open(&remote, "back").await,
    );
    let won = front
        .claim(&tid("T0"), &sid("session-1-frontend"))
        .await
        .expect("claim");
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    let err = back
        .claim(&tid("T1"), &sid("session-1-backend"))
        .await
        .expect_err("the file is session-1-frontend's");
    let text = err.to_string();
    assert!(
        matches!(err, agent_core::BackendError::InvalidInput(_))
            && text.contains("STATUS-SESSION-1.yaml")
            && text.contains("session-1-frontend"),
        "{text}"
    );
    let err = back
        .register(&presence("session-1-backend", 4242), false)
        .await
        .expect_err("an agent of session-1-backend does not start");
    assert!(err.to_string().contains("session-1-frontend"), "{err}");
    let t0 = front.get(&tid("T0")).await.expect("get").expect("T0");
    assert_eq!(
        (t0.status, t0.claimed_by.as_ref().map(|s| s.as_str())),
        (TaskStatus::Claimed, Some("session-1-frontend")),
        "the first session's claim stands"
    );

    // Ids not of the guide's form have a file of their own, whatever digits they hold.
    for (k, s) in ["chaos-1", "cli-1"].into_iter().enumerate() {
        let task = tid(&format!("T{}", k + 2));
        let won = back.claim(&task, &sid(s)).await.expect("claim");
        assert!(matches!(won, ClaimOutcome::Won(_)), "{s}: {won:?}");
    }
    for (k, s) in ["chaos-1", "cli-1"].into_iter().enumerate() {
        let t = front
            .get(&tid(&format!("T{}", k + 2)))
            .await
            .expect("get")
            .expect("task");
        assert_eq!(
            (t.status, t.claimed_by.as_ref().map(|s| s.as_str())),
            (TaskStatus::Claimed, Some(s))
        );
        assert!(remote.read(&format!("STATUS-SESSION-{s}.yaml")).is_some());
    }
}

#[tokio::test]
async fn a_claim_mirrored_into_git_for_another_session_reads_back_as_held() {
    // Seeds 30029, 70014: a bridge recorded an etcd claim of s into git without s's STATUS
    // file, whose claims list did not carry it: git read the row as free, and the next bridge
    // round mirrored that "release" into etcd, ending a live claim (the task then ran twice).
    let remote = BareRemote::new(&board(2));
    let agent = agent_clone(&remote, "agent", "4242@another-host.example/1").await;
    assert!(agent
        .register(&presence("session-1-a", 4242), false)
        .await
        .expect("register")
        .is_none());
    // The agent's own heartbeats stop, so its file changes only by the bridge's write.
    drop(agent);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let updated = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("updated_at:"))
            .map(str::to_owned)
    };
    // Its last heartbeat: the branch's file's, or its heartbeat ref's when that is later.
    let before = [
        remote.read("STATUS-SESSION-1.yaml"),
        remote.heartbeat("STATUS-SESSION-1.yaml"),
    ]
    .into_iter()
    .flatten()
    .max_by_key(|text| updated(text))
    .expect("the agent's STATUS");
    let mut config = remote.config("bridge");
    config.session = Some(sid("ifc-bridge"));
    let bridge = GitBackend::open(config).await.expect("open");
    let item = agent_core::mirror::Mirrored {
        task: tid("T0"),
        status: TaskStatus::Claimed,
        holder: Some(sid("session-1-a")),
        token: Some(agent_core::FencingToken(77)),
        read_as: None,
    };
    let out = bridge.record(&[item]).await.expect("record");
    assert_eq!(out, vec![agent_core::mirror::RecordOutcome::Written]);
    let t0 = bridge.get(&tid("T0")).await.expect("get").expect("T0");
    assert_eq!(
        (t0.status, t0.claimed_by.as_ref().map(|s| s.as_str())),
        (TaskStatus::Claimed, Some("session-1-a")),
        "the mirrored claim reads back as held"
    );
    let after = remote.read("STATUS-SESSION-1.yaml").expect("STATUS");
    assert!(
        after.contains("T0:") && after.contains("token: 77"),
        "{after}"
    );
    assert_eq!(
        updated(&after),
        updated(&before),
        "writing for the session does not refresh its heartbeat"
    );
    assert!(
        after.contains("pid: 4242"),
        "its presence is kept:\n{after}"
    );
}

#[tokio::test]
async fn another_stores_available_does_not_end_a_claim_a_live_process_holds_in_git() {
    // Seed 100061: a hybrid session ran a task on git after its etcd lease ran out; a bridge
    // carried etcd's reset ("available") into git, and another session ran the task too.
    let remote = BareRemote::new(&board(1));
    let me = agent_core::process::this_process().to_owned();
    let agent = agent_clone(&remote, "agent", &me).await;
    let won = agent
        .claim(&tid("T0"), &sid("session-1-a"))
        .await
        .expect("claim");
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    let mut config = remote.config("bridge");
    config.session = Some(sid("ifc-bridge"));
    let bridge = GitBackend::open(config).await.expect("open");
    let item = agent_core::mirror::Mirrored {
        task: tid("T0"),
        status: TaskStatus::Available,
        holder: Some(sid("session-1-a")),
        token: None,
        read_as: None,
    };
    let out = bridge.record(&[item]).await.expect("record");
    assert!(
        matches!(
            out.as_slice(),
            [agent_core::mirror::RecordOutcome::Kept { .. }]
        ),
        "{out:?}"
    );
    let t0 = bridge.get(&tid("T0")).await.expect("get").expect("T0");
    assert_eq!(
        (t0.status, t0.claimed_by.as_ref().map(|s| s.as_str())),
        (TaskStatus::Claimed, Some("session-1-a"))
    );
}

#[tokio::test]
async fn a_claim_recorded_from_another_process_of_the_session_does_not_replace_a_live_ones() {
    // Seed 80011: the process being taken over claimed on etcd before it learnt it; its
    // confirmation in git replaced the new process's claim of the task, and both ran it.
    let remote = BareRemote::new(&board(1));
    let me = agent_core::process::this_process().to_owned();
    let live = agent_clone(&remote, "new", &me).await;
    let won = live
        .claim(&tid("T0"), &sid("session-1-a"))
        .await
        .expect("claim");
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    let mut config = remote.config("old");
    config.session = Some(sid("session-1-a"));
    config.process = Some(format!(
        "{}@{}/1",
        std::process::id(),
        agent_core::process::hostname()
    ));
    let old = GitBackend::open(config).await.expect("open");
    let item = agent_core::mirror::Mirrored {
        task: tid("T0"),
        status: TaskStatus::Claimed,
        holder: Some(sid("session-1-a")),
        token: Some(agent_core::FencingToken(99)),
        read_as: None,
    };
    let out = old.record(&[item]).await.expect("record");
    assert!(
        matches!(
            out.as_slice(),
            [agent_core::mirror::RecordOutcome::Conflict { .. }]
        ),
        "{out:?}"
    );
    let status = remote.read("STATUS-SESSION-1.yaml").expect("STATUS");
    assert!(!status.contains("token: 99"), "{status}");
}

#[tokio::test]
async fn processes_sharing_one_clone_never_write_each_others_files_back() {
    // Tester helper-10: a second agent (a --take-over, or one refused) started in the directory
    // of a running one shares its clone `.ifc/git/<session>`. A write made by one process left
    // the other's cached index behind the branch, and that process's next commit wrote other
    // sessions' STATUS files (and rows) back to what they were: a DONE row went back to IN
    // PROGRESS and ran again, running claims were dropped and their tasks run twice.
    let remote = BareRemote::new(&board(3));
    let first = crate::open(&remote, "shared").await;
    let second = crate::open(&remote, "shared").await;
    let (a, b) = (sid("session-1-a"), sid("session-2-b"));
    let won = |out: ClaimOutcome| matches!(out, ClaimOutcome::Won(_));
    assert!(won(first.claim(&tid("T0"), &a).await.expect("claim")));
    assert!(won(second.claim(&tid("T1"), &b).await.expect("claim")));
    assert!(won(first.claim(&tid("T2"), &a).await.expect("claim")));
    let other = crate::open(&remote, "elsewhere").await;
    let t1 = other.get(&tid("T1")).await.expect("get").expect("T1");
    assert_eq!(
        (t1.status, t1.claimed_by.as_ref()),
        (TaskStatus::Claimed, Some(&b)),
        "b's claim stands after a's next write through the same clone"
    );
    assert!(
        remote.read("STATUS-SESSION-2.yaml").is_some(),
        "b's STATUS file is still on the branch"
    );
    assert!(matches!(
        other
            .claim(&tid("T1"), &sid("session-3-c"))
            .await
            .expect("claim"),
        ClaimOutcome::Lost { .. }
    ));
}
