//! The claim loop's decisions on a large view: a snapshot of 10,000 tasks, then one change event
//! (a blocker completing) and the claim answer: `cargo bench -p agent-core --bench claim_step`.

use std::time::Duration;

use agent_core::claim_loop::{ClaimLoop, Input, Plan};
use agent_core::config::TaskPattern;
use agent_core::{SessionId, Task, TaskId, TaskStatus};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use tokio::time::Instant;

fn id(s: &str) -> TaskId {
    TaskId::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

fn snapshot(n: usize) -> Vec<Task> {
    (0..n)
        .map(|i| {
            let mut t = Task::new(id(&format!("T{i:05}")), TaskStatus::Blocked);
            t.blocked_by = vec![id(&format!("T{:05}", i.saturating_sub(1)))];
            if i == 0 {
                t.status = TaskStatus::Available;
                t.blocked_by.clear();
            }
            t
        })
        .collect()
}

fn plan() -> Plan {
    Plan {
        session: SessionId::parse("bench").unwrap_or_else(|e| panic!("{e}")),
        patterns: vec![TaskPattern::parse("T*").unwrap_or_else(|e| panic!("{e}"))],
        max_attempts: 3,
        retry_backoff: Duration::from_secs(1),
        until_done: false,
    }
}

fn bench(c: &mut Criterion) {
    let tasks = snapshot(10_000);
    c.bench_function("snapshot of 10000 tasks", |b| {
        b.iter_batched(
            || (ClaimLoop::new(plan()), tasks.clone()),
            |(mut lp, tasks)| lp.step(Input::Snapshot(black_box(tasks)), Instant::now()),
            BatchSize::LargeInput,
        )
    });
    let mut warm = ClaimLoop::new(plan());
    warm.step(Input::Snapshot(tasks.clone()), Instant::now());
    c.bench_function("change event on a 10000-task view", |b| {
        b.iter_batched(
            || warm.clone(),
            |mut lp| {
                lp.step(
                    Input::Changed {
                        task: id("T04999"),
                        status: Some(TaskStatus::Complete),
                        holder: None,
                        blocked_by: None,
                    },
                    black_box(Instant::now()),
                )
            },
            BatchSize::LargeInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
