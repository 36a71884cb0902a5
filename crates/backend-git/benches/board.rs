//! Board parse and render, on the Phase 0 fixture (54 rows) and a generated 10,000-row board:
//! `cargo bench -p backend-git --bench board`.

use agent_core::{SessionId, TaskStatus};
use backend_git::board::Board;
use criterion::{black_box, criterion_group, criterion_main, Criterion};

const FIXTURE: &str = include_str!("../tests/fixtures/PHASE-0-TASK-BOARD.md");

fn big_board(rows: usize) -> String {
    let mut text =
        String::from("| ID | Task | Status | Owner | Blocked by |\n|---|---|---|---|---|\n");
    for i in 0..rows {
        let blocker = if i > 0 {
            format!("B.{}", i - 1)
        } else {
            String::new()
        };
        text.push_str(&format!(
            "| B.{i} | task number {i} | 🔵 AVAILABLE |  | {blocker} |\n"
        ));
    }
    text
}

fn bench(c: &mut Criterion) {
    let big = big_board(10_000);
    for (name, text) in [("54 rows", FIXTURE.to_owned()), ("10000 rows", big)] {
        c.bench_function(&format!("parse {name}"), |b| {
            b.iter(|| Board::parse("board.md", black_box(&text)))
        });
        let Ok(board) = Board::parse("board.md", &text) else {
            panic!("the {name} board parses");
        };
        let unchanged = board.tasks().to_vec();
        c.bench_function(&format!("render unchanged {name}"), |b| {
            b.iter(|| board.render(black_box(&unchanged)))
        });
        let mut claimed = unchanged.clone();
        if let Some(t) = claimed.get_mut(unchanged.len() / 2) {
            t.status = TaskStatus::Claimed;
            t.owner = SessionId::parse("session-1-bench").ok();
        }
        c.bench_function(&format!("render one claim {name}"), |b| {
            b.iter(|| board.render(black_box(&claimed)))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
