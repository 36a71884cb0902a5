//! The claim loop's cost per input on large views (10,000 and 100,000 tasks): the snapshot, a
//! blocker completing, another session's claim heard by an idle session (nothing of its list is
//! claimable), a new task appearing, and an unrelated event heard while a task runs:
//! `cargo bench -p agent-core --bench claim_step`.

use std::time::Duration;

use agent_core::claim_loop::{ClaimLoop, Input, Plan};
use agent_core::config::TaskPattern;
use agent_core::{Claim, ClaimOutcome, FencingToken, SessionId, Task, TaskId, TaskStatus};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use tokio::time::Instant;

fn id(s: &str) -> TaskId {
    TaskId::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

fn sid(s: &str) -> SessionId {
    SessionId::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

/// A chain: each task blocked by the one before it; the first available.
fn chain(n: usize) -> Vec<Task> {
    (0..n)
        .map(|i| {
            let mut t = Task::new(id(&format!("T{i:06}")), TaskStatus::Blocked);
            t.blocked_by = vec![id(&format!("T{:06}", i.saturating_sub(1)))];
            if i == 0 {
                t.status = TaskStatus::Available;
                t.blocked_by.clear();
            }
            t
        })
        .collect()
}

/// A busy shared board: the first half complete, the rest claimed by other sessions, each task
/// blocked by the one half a board before it (complete or not).
fn busy(n: usize) -> Vec<Task> {
    (0..n)
        .map(|i| {
            let complete = i < n / 2;
            let mut t = Task::new(
                id(&format!("T{i:06}")),
                if complete {
                    TaskStatus::Complete
                } else {
                    TaskStatus::Claimed
                },
            );
            t.claimed_by = Some(sid(&format!("other-{}", i % 100)));
            if i >= n / 2 {
                t.blocked_by = vec![id(&format!("T{:06}", i - n / 2))];
            }
            t
        })
        .collect()
}

fn plan() -> Plan {
    Plan {
        session: sid("bench"),
        patterns: vec![TaskPattern::parse("T*").unwrap_or_else(|e| panic!("{e}"))],
        max_attempts: 3,
        retry_backoff: Duration::from_secs(1),
        until_done: false,
    }
}

fn warm(tasks: &[Task]) -> ClaimLoop {
    let mut lp = ClaimLoop::new(plan());
    lp.step(Input::Snapshot(tasks.to_vec()), Instant::now());
    lp
}

fn changed(task: &str, status: TaskStatus, holder: Option<&str>, blocked_by: &[&str]) -> Input {
    Input::Changed {
        task: id(task),
        status: Some(status),
        holder: holder.map(sid),
        blocked_by: Some(blocked_by.iter().map(|b| id(b)).collect()),
    }
}

fn step_bench(c: &mut Criterion, name: &str, lp: &ClaimLoop, input: &Input) {
    c.bench_function(name, |b| {
        b.iter_batched(
            || (lp.clone(), input.clone()),
            // The loop is handed back, so its drop (a 100,000-task view) is not timed.
            |(mut lp, input)| {
                let out = lp.step(black_box(input), Instant::now());
                (lp, out)
            },
            BatchSize::LargeInput,
        )
    });
}

fn bench(c: &mut Criterion) {
    for n in [10_000, 100_000] {
        let tasks = chain(n);
        c.bench_function(&format!("{n}: snapshot"), |b| {
            b.iter_batched(
                || (ClaimLoop::new(plan()), tasks.clone()),
                |(mut lp, tasks)| {
                    let out = lp.step(Input::Snapshot(black_box(tasks)), Instant::now());
                    (lp, out)
                },
                BatchSize::LargeInput,
            )
        });
        let mid = format!("T{:06}", n / 2 - 1);
        let next = format!("T{:06}", n / 2 - 2);
        step_bench(
            c,
            &format!("{n}: a blocker completes"),
            &warm(&tasks),
            &changed(&mid, TaskStatus::Complete, Some("other"), &[&next]),
        );

        let board = busy(n);
        let idle = warm(&board);
        let last = format!("T{:06}", n - 1);
        let its_blocker = format!("T{:06}", n / 2 - 1);
        step_bench(
            c,
            &format!("{n}: idle, another session's claim is heard"),
            &idle,
            &changed(&last, TaskStatus::Claimed, Some("other-7"), &[&its_blocker]),
        );
        step_bench(
            c,
            &format!("{n}: idle, a new task appears"),
            &idle,
            &changed("U000001", TaskStatus::Claimed, Some("other-3"), &[]),
        );

        let mut running = warm(&chain(n));
        running.step(
            Input::Claimed {
                task: id("T000000"),
                outcome: ClaimOutcome::Won(Claim {
                    task: id("T000000"),
                    session: sid("bench"),
                    token: FencingToken(1),
                    leased: true,
                }),
            },
            Instant::now(),
        );
        step_bench(
            c,
            &format!("{n}: running, an unrelated event is heard"),
            &running,
            &changed(&last, TaskStatus::Blocked, None, &[&its_blocker]),
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
