//! The backend conformance suite: the `Backend` contract as executable cases. Every backend's
//! tests run all of it with `agent_core::conformance_suite!(make_harness())`; each case gets a
//! fresh store from the harness. Cases use real time only for bounded waits, never to assert speed.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Backend, BackendEvent, ClaimOutcome, FencingToken, Mirrored, Presence, PutOutcome,
    RecordOutcome, ReleaseOutcome, ReleaseTo, SessionId, Task, TaskEvent, TaskId, TaskPatch,
    TaskStatus,
};

/// What a backend's tests provide to run the suite against a fresh store.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A new, independent client of the store (its own connection), which leases its claims
    /// with [`Harness::lease_ttl`]. Dropping every clone of it is a session crash: no release, no
    /// lease revocation, the keep-alive stops.
    async fn client(&self) -> Arc<dyn Backend>;
    /// The lease TTL clients use.
    fn lease_ttl(&self) -> Duration;
    /// Ends the lease behind the current claim on `task` now, as the store does when the holder
    /// has not kept it alive for a whole TTL.
    async fn end_lease(&self, task: &TaskId);
    /// How many tasks the many-claimers race uses.
    fn race_tasks(&self) -> usize {
        200
    }
}

/// Generates one `#[tokio::test]` per conformance case. `$harness` is an expression of type
/// `impl Future<Output = impl Harness>`, evaluated once per case.
#[macro_export]
macro_rules! conformance_suite {
    ($harness:expr) => {
        $crate::conformance_suite!(@cases $harness;
            claim_success, claim_race_two, claim_race_many, claim_of_missing_task,
            realtime_event, events_in_revision_order, lease_expiry_recovery,
            fencing_after_lease_end, release_fencing, release_available_then_reclaim,
            holder_reclaim_supersedes, blockers_gate_claims, blocker_edit_is_an_event, put_rules, presence_lives_with_the_session,
            record_rules, record_only_over_what_was_read, interest_covers_tasks_and_their_blockers);
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let harness = $harness.await;
                $crate::testing::$case(&harness).await;
            }
        )*
    };
}

/// A task id known to be valid (tests only).
pub fn tid(s: &str) -> TaskId {
    TaskId::parse(s).expect("test ids are valid")
}

/// A session id known to be valid (tests only).
pub fn sid(s: &str) -> SessionId {
    SessionId::parse(s).expect("test ids are valid")
}

async fn put_status(b: &dyn Backend, id: &TaskId, status: TaskStatus) {
    let patch = TaskPatch {
        status: Some(status),
        ..TaskPatch::default()
    };
    let out = b.put(id, &patch).await.expect("put");
    assert!(
        matches!(
            out,
            PutOutcome::Created | PutOutcome::Updated | PutOutcome::Unchanged
        ),
        "{out:?}"
    );
}

async fn get(b: &dyn Backend, id: &TaskId) -> Task {
    b.get(id)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("task {id} missing"))
}

async fn won(b: &dyn Backend, id: &TaskId, s: &SessionId) -> FencingToken {
    match b.claim(id, s).await.expect("claim") {
        ClaimOutcome::Won(c) => {
            assert_eq!(&c.task, id);
            assert_eq!(&c.session, s);
            c.token
        }
        other => panic!("{s} expected to win {id}, got {other:?}"),
    }
}

/// One transition of a task: (task, old status, new status).
pub type Transition = (TaskId, Option<TaskStatus>, Option<TaskStatus>);

/// Creates each task, claims it for `session` and completes it; returns the transitions a
/// subscriber must see, in order.
pub async fn create_claim_complete(
    b: &dyn Backend,
    ids: &[TaskId],
    session: &SessionId,
) -> Vec<Transition> {
    let mut expected = Vec::new();
    for id in ids {
        put_status(b, id, TaskStatus::Available).await;
        expected.push((id.clone(), None, Some(TaskStatus::Available)));
        won(b, id, session).await;
        expected.push((
            id.clone(),
            Some(TaskStatus::Available),
            Some(TaskStatus::Claimed),
        ));
        b.release(id, session, ReleaseTo::Complete, None)
            .await
            .expect("release");
        expected.push((
            id.clone(),
            Some(TaskStatus::Claimed),
            Some(TaskStatus::Complete),
        ));
    }
    expected
}

/// Polls `check` until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next task event on `sub` for `task`, skipping others; waits at most `limit`.
pub async fn next_event_for(
    sub: &mut crate::Subscription,
    task: &TaskId,
    limit: Duration,
) -> TaskEvent {
    let wait = async {
        loop {
            match sub.next().await {
                Some(BackendEvent::Task(e)) if &e.task == task => return e,
                Some(_) => continue,
                None => panic!("subscription ended while waiting for an event of {task}"),
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .unwrap_or_else(|_| panic!("no event for {task} within {limit:?}"))
}

const WAIT: Duration = Duration::from_secs(10);

/// Guide test 1: a claim of an available task wins and is visible.
pub async fn claim_success(h: &impl Harness) {
    let b = h.client().await;
    let (t, s) = (tid("TEST-CLAIM"), sid("test-session"));
    put_status(&*b, &t, TaskStatus::Available).await;
    won(&*b, &t, &s).await;
    let task = get(&*b, &t).await;
    assert_eq!(task.status, TaskStatus::Claimed);
    assert_eq!(task.claimed_by.as_ref(), Some(&s));
    assert!(task.claimed_at.is_some());
    // Another client sees the same.
    let other = h.client().await;
    assert_eq!(get(&*other, &t).await.claimed_by.as_ref(), Some(&s));
}

/// Guide test 2: two sessions claim at once; exactly one wins and the other learns who.
pub async fn claim_race_two(h: &impl Harness) {
    for round in 0..20 {
        let t = tid(&format!("TEST-RACE-{round}"));
        let (a, b) = (h.client().await, h.client().await);
        put_status(&*a, &t, TaskStatus::Available).await;
        let (s1, s2) = (sid("session-1"), sid("session-2"));
        let (r1, r2) = tokio::join!(a.claim(&t, &s1), b.claim(&t, &s2));
        let (r1, r2) = (r1.expect("claim 1"), r2.expect("claim 2"));
        match (&r1, &r2) {
            (ClaimOutcome::Won(_), ClaimOutcome::Lost { holder }) => {
                assert_eq!(holder.as_ref(), Some(&s1))
            }
            (ClaimOutcome::Lost { holder }, ClaimOutcome::Won(_)) => {
                assert_eq!(holder.as_ref(), Some(&s2))
            }
            other => panic!("round {round}: expected exactly one winner, got {other:?}"),
        }
    }
}

/// Ten sessions race over many tasks, each in its own order: exactly one winner per task, and the
/// store names that winner.
pub async fn claim_race_many(h: &impl Harness) {
    let n = h.race_tasks();
    let admin = h.client().await;
    let ids: Vec<TaskId> = (0..n).map(|i| tid(&format!("RACE-{i:05}"))).collect();
    for id in &ids {
        put_status(&*admin, id, TaskStatus::Available).await;
    }
    let mut handles = Vec::new();
    for k in 0..10u64 {
        let client = h.client().await;
        let session = sid(&format!("racer-{k}"));
        let mut order = ids.clone();
        // A different deterministic order per racer so they collide everywhere.
        order.rotate_left((k as usize * n / 10) % n.max(1));
        if k % 2 == 1 {
            order.reverse();
        }
        handles.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            for id in order {
                match client.claim(&id, &session).await.expect("claim") {
                    ClaimOutcome::Won(_) => wins.push(id),
                    ClaimOutcome::Lost { holder } => assert!(holder.is_some_and(|h| h != session)),
                    other => panic!("unexpected {other:?}"),
                }
            }
            // The client lives until every racer is done: a dropped client is a crashed session,
            // whose claims others may rightly take once its lease ends.
            (session, wins, client)
        }));
    }
    let mut winner: BTreeMap<TaskId, SessionId> = BTreeMap::new();
    let mut clients = Vec::new();
    for handle in handles {
        let (session, wins, client) = handle.await.expect("racer panicked");
        clients.push(client);
        for id in wins {
            if let Some(first) = winner.insert(id.clone(), session.clone()) {
                panic!("double claim of {id}: {first} and {session}");
            }
        }
    }
    assert_eq!(winner.len(), n, "every task has exactly one winner");
    let listing = admin.list().await.expect("list");
    for task in listing
        .tasks
        .iter()
        .filter(|t| t.id.as_str().starts_with("RACE-"))
    {
        assert_eq!(task.status, TaskStatus::Claimed);
        assert_eq!(
            task.claimed_by.as_ref(),
            winner.get(&task.id),
            "{}",
            task.id
        );
    }
}

/// Claiming or releasing a task that does not exist says so.
pub async fn claim_of_missing_task(h: &impl Harness) {
    let b = h.client().await;
    let (t, s) = (tid("NO-SUCH-TASK"), sid("s"));
    assert_eq!(
        b.claim(&t, &s).await.expect("claim"),
        ClaimOutcome::NotFound
    );
    assert_eq!(
        b.release(&t, &s, ReleaseTo::Complete, None)
            .await
            .expect("release"),
        ReleaseOutcome::NotFound
    );
    assert!(b.get(&t).await.expect("get").is_none());
}

/// Guide test 3: a subscriber on another client sees the claim of TEST-EVENT.
pub async fn realtime_event(h: &impl Harness) {
    let (writer, watcher) = (h.client().await, h.client().await);
    let (t, s) = (tid("TEST-EVENT"), sid("test-session"));
    put_status(&*writer, &t, TaskStatus::Available).await;
    let mut sub = watcher.subscribe().await.expect("subscribe");
    assert!(sub
        .snapshot
        .tasks
        .iter()
        .any(|x| x.id == t && x.status == TaskStatus::Available));
    won(&*writer, &t, &s).await;
    let e = next_event_for(&mut sub, &t, WAIT).await;
    assert_eq!(e.old_status, Some(TaskStatus::Available));
    assert_eq!(e.new_status, Some(TaskStatus::Claimed));
    assert_eq!(e.holder.as_ref(), Some(&s));
    assert!(e.revision > sub.snapshot.revision);
}

/// A run of transitions reaches a subscriber once each, in order, with rising revisions.
pub async fn events_in_revision_order(h: &impl Harness) {
    let (writer, watcher) = (h.client().await, h.client().await);
    let s = sid("s1");
    let mut sub = watcher.subscribe().await.expect("subscribe");
    let ids: Vec<TaskId> = (0..5).map(|i| tid(&format!("ORDER-{i}"))).collect();
    let expected = create_claim_complete(&*writer, &ids, &s).await;
    let mut seen = Vec::new();
    let mut last = sub.snapshot.revision;
    while seen.len() < expected.len() {
        let next = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("events arrive");
        match next {
            Some(BackendEvent::Task(e)) if ids.contains(&e.task) => {
                assert!(e.revision > last, "revision {} after {last}", e.revision);
                last = e.revision;
                seen.push((e.task, e.old_status, e.new_status));
            }
            Some(_) => {}
            None => panic!("subscription ended"),
        }
    }
    assert_eq!(seen, expected);
    // Nothing more (no duplicates) once the writer is quiet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Some(e) = sub.try_next() {
        if let BackendEvent::Task(e) = e {
            assert!(!ids.contains(&e.task), "duplicate or stray event {e:?}");
        }
    }
}

/// Guide test 5: a holder dies without releasing; within the TTL its task reads available again,
/// the record is still there, and another session claims it with a larger token.
pub async fn lease_expiry_recovery(h: &impl Harness) {
    let t = tid("TEST-TTL");
    let observer = h.client().await;
    put_status(&*observer, &t, TaskStatus::Available).await;
    let crashed = h.client().await;
    let old = won(&*crashed, &t, &sid("crashed-session")).await;
    drop(crashed); // the session dies: no release, no keep-alive
    let limit = h.lease_ttl() * 3 + WAIT;
    let task = eventually(
        limit,
        "the dead holder's task to read available",
        || async {
            let task = observer
                .get(&t)
                .await
                .expect("get")
                .expect("the record is never deleted");
            (task.status == TaskStatus::Available).then_some(task)
        },
    )
    .await;
    assert_eq!(task.claimed_by, None);
    let next = won(&*observer, &t, &sid("rescuer")).await;
    assert!(
        next > old,
        "token {next} must exceed the dead holder's {old}"
    );
}

/// After a holder's lease ends it is told; the task reads available. Its completion still
/// lands while nobody claimed or changed the task since (the run finished once, nobody else
/// started it: running it again would do the work twice); once another session claimed it,
/// neither its completion nor its giving back changes anything.
pub async fn fencing_after_lease_end(h: &impl Harness) {
    /// `a` claims `t` for `sa`, its lease ends; the token of that claim.
    async fn lapse(
        h: &impl Harness,
        (a, b): (&dyn Backend, &dyn Backend),
        sa: &SessionId,
        events: &mut crate::Subscription,
        t: &TaskId,
    ) -> FencingToken {
        put_status(b, t, TaskStatus::Available).await;
        let old = won(a, t, sa).await;
        h.end_lease(t).await;
        let lost = tokio::time::timeout(WAIT, async {
            loop {
                match events.next().await {
                    Some(BackendEvent::ClaimLost {
                        task,
                        session,
                        token,
                    }) if &task == t => return (task, session, token),
                    Some(_) => continue,
                    None => panic!("subscription ended"),
                }
            }
        })
        .await
        .expect("the holder is told its claim is lost");
        assert_eq!(lost, (t.clone(), sa.clone(), old));
        let read = eventually(WAIT, "the task to read available", || async {
            let task = b.get(t).await.expect("get")?;
            (task.status == TaskStatus::Available).then_some(task)
        })
        .await;
        assert_eq!(read.claimed_by, None);
        old
    }

    let (a, b) = (h.client().await, h.client().await);
    let (sa, sb) = (sid("stale-holder"), sid("new-holder"));
    let mut a_events = a.subscribe().await.expect("subscribe");
    // Stale holder, nobody else since: giving back changes nothing (it is free already); a
    // completion under another token changes nothing; its own completion lands.
    let t = tid("TEST-FENCE");
    let old = lapse(h, (&*a, &*b), &sa, &mut a_events, &t).await;
    let r = a
        .release(&t, &sa, ReleaseTo::Available, Some(old))
        .await
        .expect("release");
    assert_eq!(r, ReleaseOutcome::NotHolder { holder: None });
    let r = a
        .release(
            &t,
            &sa,
            ReleaseTo::Complete,
            Some(FencingToken(old.0 + 1_000_000)),
        )
        .await
        .expect("release");
    assert_eq!(r, ReleaseOutcome::NotHolder { holder: None });
    assert_eq!(get(&*b, &t).await.status, TaskStatus::Available);
    let r = a
        .release(&t, &sa, ReleaseTo::Complete, Some(old))
        .await
        .expect("release");
    assert_eq!(r, ReleaseOutcome::Released { token: old });
    let done = get(&*b, &t).await;
    assert_eq!(
        (done.status, done.claimed_by.as_ref()),
        (TaskStatus::Complete, Some(&sa))
    );

    // Stale holder after someone else took it: nothing it says changes anything.
    let t = tid("TEST-FENCE-TAKEN");
    let old = lapse(h, (&*a, &*b), &sa, &mut a_events, &t).await;
    won(&*b, &t, &sb).await;
    let before = get(&*b, &t).await;
    for to in [ReleaseTo::Complete, ReleaseTo::Available] {
        let r = a.release(&t, &sa, to, Some(old)).await.expect("release");
        assert_eq!(
            r,
            ReleaseOutcome::NotHolder {
                holder: Some(sb.clone())
            }
        );
    }
    assert_eq!(
        get(&*b, &t).await,
        before,
        "a stale release changed nothing"
    );

    // Stale holder after the new holder gave it back: the task changed hands in between.
    let r = b
        .release(&t, &sb, ReleaseTo::Available, None)
        .await
        .expect("release");
    assert!(matches!(r, ReleaseOutcome::Released { .. }), "{r:?}");
    let r = a
        .release(&t, &sa, ReleaseTo::Complete, Some(old))
        .await
        .expect("release");
    assert_eq!(r, ReleaseOutcome::NotHolder { holder: None });
    assert_eq!(get(&*b, &t).await.status, TaskStatus::Available);
}

/// Only the holder releases; completion keeps the completer and is final.
pub async fn release_fencing(h: &impl Harness) {
    let t = tid("TEST-RELEASE");
    let (a, b) = (h.client().await, h.client().await);
    let (sa, sb) = (sid("holder"), sid("intruder"));
    put_status(&*a, &t, TaskStatus::Available).await;
    let token = won(&*a, &t, &sa).await;
    let r = b
        .release(&t, &sb, ReleaseTo::Available, None)
        .await
        .expect("release");
    assert_eq!(
        r,
        ReleaseOutcome::NotHolder {
            holder: Some(sa.clone())
        }
    );
    let wrong = FencingToken(token.0 + 1_000_000);
    let r = a
        .release(&t, &sa, ReleaseTo::Complete, Some(wrong))
        .await
        .expect("release");
    assert_eq!(
        r,
        ReleaseOutcome::NotHolder {
            holder: Some(sa.clone())
        }
    );
    assert_eq!(get(&*a, &t).await.status, TaskStatus::Claimed);

    let r = a
        .release(&t, &sa, ReleaseTo::Complete, Some(token))
        .await
        .expect("release");
    assert_eq!(r, ReleaseOutcome::Released { token });
    let done = get(&*b, &t).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(
        done.claimed_by.as_ref(),
        Some(&sa),
        "complete keeps who did it"
    );
    assert_eq!(
        b.claim(&t, &sb).await.expect("claim"),
        ClaimOutcome::NotClaimable {
            status: TaskStatus::Complete
        }
    );
    assert_eq!(
        a.claim(&t, &sa).await.expect("claim"),
        ClaimOutcome::NotClaimable {
            status: TaskStatus::Complete
        }
    );
    let r = a
        .release(&t, &sa, ReleaseTo::Available, None)
        .await
        .expect("release");
    assert_eq!(r, ReleaseOutcome::NotHolder { holder: None });
    assert_eq!(get(&*b, &t).await.status, TaskStatus::Complete);
    // Completing again (a retry whose first answer was lost) is idempotent for the completer
    // only, and changes nothing.
    let r = a
        .release(&t, &sa, ReleaseTo::Complete, Some(token))
        .await
        .expect("release");
    assert_eq!(r, ReleaseOutcome::Released { token });
    let r = b
        .release(&t, &sb, ReleaseTo::Complete, None)
        .await
        .expect("release");
    assert_eq!(r, ReleaseOutcome::NotHolder { holder: None });
    assert_eq!(get(&*b, &t).await.claimed_by.as_ref(), Some(&sa));
}

/// A task given back is claimable by anyone, with a larger token.
pub async fn release_available_then_reclaim(h: &impl Harness) {
    let t = tid("TEST-GIVE-BACK");
    let (a, b) = (h.client().await, h.client().await);
    put_status(&*a, &t, TaskStatus::Available).await;
    let first = won(&*a, &t, &sid("a")).await;
    let r = a
        .release(&t, &sid("a"), ReleaseTo::Available, None)
        .await
        .expect("release");
    assert_eq!(r, ReleaseOutcome::Released { token: first });
    let task = get(&*b, &t).await;
    assert_eq!(
        (task.status, task.claimed_by),
        (TaskStatus::Available, None)
    );
    let second = won(&*b, &t, &sid("b")).await;
    assert!(second > first);
}

/// The holder claiming again wins with a new token; the old token no longer releases.
pub async fn holder_reclaim_supersedes(h: &impl Harness) {
    let t = tid("TEST-RECLAIM");
    let a = h.client().await;
    let s = sid("a");
    put_status(&*a, &t, TaskStatus::Available).await;
    let first = won(&*a, &t, &s).await;
    let second = won(&*a, &t, &s).await;
    assert!(second > first);
    let r = a
        .release(&t, &s, ReleaseTo::Complete, Some(first))
        .await
        .expect("release");
    assert_eq!(
        r,
        ReleaseOutcome::NotHolder {
            holder: Some(s.clone())
        }
    );
    let r = a
        .release(&t, &s, ReleaseTo::Complete, Some(second))
        .await
        .expect("release");
    assert_eq!(r, ReleaseOutcome::Released { token: second });
}

/// An edit of a task's blockers alone (its status unchanged) reaches subscribers, with the new
/// blockers: a session waiting for the task must hear of it.
pub async fn blocker_edit_is_an_event(h: &impl Harness) {
    let b = h.client().await;
    let (t, b1, b2) = (tid("P0.3.1"), tid("P0.1.1"), tid("P0.1.2"));
    put_status(&*b, &b1, TaskStatus::Available).await;
    put_status(&*b, &b2, TaskStatus::Complete).await;
    let patch = |blocker: &TaskId| TaskPatch {
        status: Some(TaskStatus::Blocked),
        blocked_by: Some(vec![blocker.clone()]),
        title: None,
    };
    b.put(&t, &patch(&b1)).await.expect("put");
    let mut sub = b.subscribe().await.expect("subscribe");
    assert_eq!(
        b.put(&t, &patch(&b2)).await.expect("put"),
        PutOutcome::Updated
    );
    let mut e = next_event_for(&mut sub, &t, WAIT).await;
    if e.old_status.is_none() && e.blocked_by == [b1.clone()] {
        // The subscription's snapshot was taken before the first put landed in it (a watch
        // cache a moment behind, under load): that put comes first, in order, then the edit.
        e = next_event_for(&mut sub, &t, WAIT).await;
    }
    assert_eq!(
        (e.old_status, e.new_status, e.blocked_by),
        (
            Some(TaskStatus::Blocked),
            Some(TaskStatus::Blocked),
            vec![b2.clone()]
        )
    );
}

/// A task is claimable only once every blocker is complete.
pub async fn blockers_gate_claims(h: &impl Harness) {
    let b = h.client().await;
    let s = sid("s");
    let (t, b1, b2) = (tid("P0.2.1"), tid("P0.1.1"), tid("P0.1.2"));
    put_status(&*b, &b1, TaskStatus::Available).await;
    put_status(&*b, &b2, TaskStatus::Available).await;
    let patch = TaskPatch {
        status: Some(TaskStatus::Blocked),
        blocked_by: Some(vec![b1.clone(), b2.clone()]),
        title: Some("blocked on two".into()),
    };
    assert_eq!(b.put(&t, &patch).await.expect("put"), PutOutcome::Created);
    let blocked = ClaimOutcome::NotClaimable {
        status: TaskStatus::Blocked,
    };
    assert_eq!(b.claim(&t, &s).await.expect("claim"), blocked);
    put_status(&*b, &b1, TaskStatus::Complete).await;
    assert_eq!(b.claim(&t, &s).await.expect("claim"), blocked);
    let tok = won(&*b, &b2, &s).await;
    b.release(&b2, &s, ReleaseTo::Complete, Some(tok))
        .await
        .expect("release");
    won(&*b, &t, &s).await;
    // An available task that names a blocker that does not exist is not claimable either.
    let orphan = tid("ORPHAN");
    let patch = TaskPatch {
        blocked_by: Some(vec![tid("GHOST")]),
        ..TaskPatch::default()
    };
    b.put(&orphan, &patch).await.expect("put");
    assert_eq!(b.claim(&orphan, &s).await.expect("claim"), blocked);
}

/// `put` creates, updates, reports no-ops, keeps the claim on a title change, and refuses to change
/// the status of a held task.
pub async fn put_rules(h: &impl Harness) {
    let b = h.client().await;
    let t = tid("TEST-PUT");
    let s = sid("s");
    let titled = TaskPatch {
        title: Some("first".into()),
        ..TaskPatch::default()
    };
    assert_eq!(b.put(&t, &titled).await.expect("put"), PutOutcome::Created);
    assert_eq!(
        b.put(&t, &titled).await.expect("put"),
        PutOutcome::Unchanged
    );
    let task = get(&*b, &t).await;
    assert_eq!(
        (task.status, task.title.as_deref()),
        (TaskStatus::Available, Some("first"))
    );
    won(&*b, &t, &s).await;
    let retitle = TaskPatch {
        title: Some("second".into()),
        ..TaskPatch::default()
    };
    assert_eq!(b.put(&t, &retitle).await.expect("put"), PutOutcome::Updated);
    let task = get(&*b, &t).await;
    assert_eq!(
        (task.status, task.claimed_by.as_ref()),
        (TaskStatus::Claimed, Some(&s))
    );
    assert_eq!(task.title.as_deref(), Some("second"));
    let reset = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    assert_eq!(
        b.put(&t, &reset).await.expect("put"),
        PutOutcome::Held {
            holder: Some(s.clone())
        }
    );
    assert_eq!(get(&*b, &t).await, task, "a refused put changed nothing");
    let names: HashSet<String> = b
        .list()
        .await
        .expect("list")
        .tasks
        .into_iter()
        .map(|t| t.id.to_string())
        .collect();
    assert!(names.contains("TEST-PUT"));
}

/// `record` writes transitions from another store by compare-and-swap: claims over free tasks,
/// completions over anything but another session's claim, releases only of the same claim; one
/// outcome per item, in order; a recorded claim is held (others lose) until recorded released.
pub async fn record_rules(h: &impl Harness) {
    let b = h.client().await;
    let other = h.client().await;
    let (free, held, done) = (
        tid("TEST-REC-FREE"),
        tid("TEST-REC-HELD"),
        tid("TEST-REC-DONE"),
    );
    let (s1, s2, s3) = (sid("rec-s1"), sid("rec-s2"), sid("rec-s3"));
    for t in [&free, &held, &done] {
        put_status(&*b, t, TaskStatus::Available).await;
    }
    let token = won(&*b, &held, &s1).await;
    put_status(&*b, &done, TaskStatus::Complete).await;
    let item = |task: &TaskId, status, holder: &SessionId| Mirrored {
        task: task.clone(),
        status,
        holder: Some(holder.clone()),
        token: Some(FencingToken(7)),
        read_as: None,
    };
    let out = b
        .record(&[
            item(&free, TaskStatus::Claimed, &s3),
            item(&held, TaskStatus::Claimed, &s2),
            item(&done, TaskStatus::Claimed, &s3),
            item(&tid("TEST-REC-NONE"), TaskStatus::Complete, &s3),
        ])
        .await
        .expect("record");
    assert_eq!(out[0], RecordOutcome::Written);
    assert_eq!(
        out[1],
        RecordOutcome::Conflict {
            holder: Some(s1.clone())
        }
    );
    assert!(matches!(out[2], RecordOutcome::Kept { .. }), "{:?}", out[2]);
    assert_eq!(out[3], RecordOutcome::NotFound);
    assert_eq!(out.len(), 4);
    let t = get(&*other, &free).await;
    assert_eq!(
        (t.status, t.claimed_by.as_ref()),
        (TaskStatus::Claimed, Some(&s3))
    );
    assert!(
        t.copied,
        "a recorded claim reads as a copy, to every client"
    );
    assert!(
        !get(&*other, &held).await.copied,
        "a claim won here is no copy"
    );
    assert_eq!(
        other.claim(&free, &s2).await.expect("claim"),
        ClaimOutcome::Lost {
            holder: Some(s3.clone())
        },
        "a recorded claim is held"
    );
    assert_eq!(
        get(&*other, &held).await.claimed_by.as_ref(),
        Some(&s1),
        "a conflict writes nothing"
    );
    // The holder's own completion recorded from elsewhere ends its claim here too.
    let out = b
        .record(&[
            item(&held, TaskStatus::Complete, &s1),
            item(&free, TaskStatus::Available, &s3),
        ])
        .await
        .expect("record");
    assert_eq!(out, vec![RecordOutcome::Written, RecordOutcome::Written]);
    let t = get(&*other, &held).await;
    assert_eq!(
        (t.status, t.claimed_by.as_ref()),
        (TaskStatus::Complete, Some(&s1))
    );
    // The claim is gone: giving it back is refused; completing it again is the idempotent
    // answer to a completion that already happened.
    assert!(matches!(
        b.release(&held, &s1, ReleaseTo::Available, Some(token))
            .await
            .expect("release"),
        ReleaseOutcome::NotHolder { .. }
    ));
    assert_eq!(
        b.release(&held, &s1, ReleaseTo::Complete, Some(token))
            .await
            .expect("release"),
        ReleaseOutcome::Released { token }
    );
    assert!(matches!(
        other.claim(&free, &s2).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    assert!(
        !get(&*b, &free).await.copied,
        "a claim won over a copy's end"
    );
    // The copy's own session claiming the task makes the claim its own.
    let own = tid("TEST-REC-OWN");
    put_status(&*b, &own, TaskStatus::Available).await;
    let out = b
        .record(&[item(&own, TaskStatus::Claimed, &s3)])
        .await
        .expect("record");
    assert_eq!(out, vec![RecordOutcome::Written]);
    assert!(matches!(
        other.claim(&own, &s3).await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
    let t = get(&*b, &own).await;
    assert_eq!(t.claimed_by.as_ref(), Some(&s3));
    assert!(
        !t.copied,
        "claimed by its own session, it is no copy any more"
    );
    assert_eq!(
        b.record(&[item(&free, TaskStatus::Available, &s3)])
            .await
            .expect("record"),
        vec![RecordOutcome::Kept {
            reason: "claimed again since".into()
        }],
        "a release never undoes a later claim"
    );
}

/// A transition planned from what this store said (`read_as`) is written only while it still
/// says so: a reopen made between the plan's read and its write is not written over.
pub async fn record_only_over_what_was_read(h: &impl Harness) {
    let b = h.client().await;
    let (reopened, untouched) = (tid("TEST-READ-AS-REOPENED"), tid("TEST-READ-AS-UNTOUCHED"));
    let s1 = sid("read-as-s1");
    let mut tokens = Vec::new();
    for t in [&reopened, &untouched] {
        put_status(&*b, t, TaskStatus::Available).await;
        tokens.push(won(&*b, t, &s1).await);
    }
    let read = crate::mirror::Face::of(&get(&*b, &reopened).await);
    // One of them is given back after the plan read it.
    assert!(matches!(
        b.release(&reopened, &s1, ReleaseTo::Available, Some(tokens[0]))
            .await
            .expect("release"),
        ReleaseOutcome::Released { .. }
    ));
    let completion = |task: &TaskId| Mirrored {
        task: task.clone(),
        status: TaskStatus::Complete,
        holder: Some(s1.clone()),
        token: None,
        read_as: Some(read.clone()),
    };
    let out = b
        .record(&[completion(&reopened), completion(&untouched)])
        .await
        .expect("record");
    assert!(matches!(out[0], RecordOutcome::Kept { .. }), "{:?}", out[0]);
    assert_eq!(out[1], RecordOutcome::Written);
    assert_eq!(get(&*b, &reopened).await.status, TaskStatus::Available);
    assert_eq!(get(&*b, &untouched).await.status, TaskStatus::Complete);
    // What it already says is no write, whatever the plan read.
    let again = Mirrored {
        read_as: Some(crate::mirror::Face {
            status: TaskStatus::Available,
            holder: None,
        }),
        ..completion(&untouched)
    };
    assert_eq!(
        b.record(&[again]).await.expect("record"),
        vec![RecordOutcome::Unchanged]
    );
}

/// A session's presence is listed while it lives and goes by itself when it dies.
pub async fn presence_lives_with_the_session(h: &impl Harness) {
    let (a, observer) = (h.client().await, h.client().await);
    let presence = Presence {
        session_id: sid("session-7-present"),
        state: "idle".into(),
        current_task: None,
        backend: a.name().into(),
        started_at: chrono::Utc::now(),
        pid: std::process::id(),
        host: "test-host".into(),
        version: "test".into(),
        heartbeat: None,
        claim_p95_us: None,
    };
    a.announce(&presence).await.expect("announce");
    let listed = observer.sessions().await.expect("sessions");
    assert_eq!(
        listed
            .iter()
            .map(|p| (&p.session_id, p.state.as_str(), p.pid))
            .collect::<Vec<_>>(),
        [(&presence.session_id, "idle", presence.pid)]
    );
    let working = Presence {
        state: "working".into(),
        current_task: Some(tid("T-1")),
        ..presence.clone()
    };
    a.announce(&working).await.expect("announce");
    let listed = observer.sessions().await.expect("sessions");
    assert_eq!(
        listed.first().and_then(|p| p.current_task.clone()),
        Some(tid("T-1"))
    );
    drop(a); // the session dies
    eventually(
        h.lease_ttl() * 3 + WAIT,
        "the dead session's presence to go",
        || async {
            observer
                .sessions()
                .await
                .expect("sessions")
                .is_empty()
                .then_some(())
        },
    )
    .await;
}

/// A subscription to an interest hears of the tasks its patterns match and of what they wait
/// for at any depth, a blocker named later included, each change once and in order; its
/// snapshot holds them. (A store may deliver more; etcd's is checked for exactly that in its
/// own tests.)
pub async fn interest_covers_tasks_and_their_blockers(h: &impl Harness) {
    let (writer, watcher) = (h.client().await, h.client().await);
    let blocked = |b: &[&str]| TaskPatch {
        status: Some(TaskStatus::Blocked),
        blocked_by: Some(b.iter().map(|x| tid(x)).collect()),
        ..TaskPatch::default()
    };
    writer
        .put(&tid("INT-B.1"), &blocked(&["INT-C.1"]))
        .await
        .expect("put");
    put_status(&*writer, &tid("INT-C.1"), TaskStatus::Available).await;
    put_status(&*writer, &tid("INT-D.1"), TaskStatus::Available).await;
    writer
        .put(&tid("INT-A.1"), &blocked(&["INT-B.1"]))
        .await
        .expect("put");
    let interest = crate::Interest::tasks(vec![
        crate::config::TaskPattern::parse("INT-A.*").expect("valid")
    ]);
    let mut sub = watcher.subscribe_to(&interest).await.expect("subscribe");
    let listed: HashSet<&str> = sub.snapshot.tasks.iter().map(|t| t.id.as_str()).collect();
    for t in ["INT-A.1", "INT-B.1", "INT-C.1"] {
        assert!(listed.contains(t), "{t} is in the snapshot: {listed:?}");
    }
    // A list of the interest is the whole list, filtered.
    let ids = |l: crate::Listing| l.tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
    let all = watcher.list().await.expect("list");
    assert_eq!(
        ids(watcher.list_of(&interest).await.expect("list")),
        ids(interest.filter(all))
    );
    let s = sid("s1");
    // A blocker at depth 2, then a new task of the list, then a blocker named by an edit.
    won(&*writer, &tid("INT-C.1"), &s).await;
    put_status(&*writer, &tid("INT-A.2"), TaskStatus::Available).await;
    writer
        .put(&tid("INT-A.1"), &blocked(&["INT-B.1", "INT-D.1"]))
        .await
        .expect("put");
    won(&*writer, &tid("INT-D.1"), &s).await;
    let mut seen = Vec::new();
    let mut last = sub.snapshot.revision;
    let wanted = ["INT-C.1", "INT-A.2", "INT-A.1", "INT-D.1"];
    while seen.len() < wanted.len() {
        match tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("events arrive")
        {
            Some(BackendEvent::Task(e)) if wanted.contains(&e.task.as_str()) => {
                assert!(e.revision > last, "revision {} after {last}", e.revision);
                last = e.revision;
                seen.push(e.task.to_string());
            }
            Some(_) => {}
            None => panic!("subscription ended"),
        }
    }
    assert_eq!(seen, wanted);
}
