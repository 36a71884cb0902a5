//! Board parsing and rendering: the real fixture, every malformed case, and parse/render round
//! trips as properties.

use super::*;
use proptest::prelude::*;

const FIXTURE: &str = include_str!("../../tests/fixtures/PHASE-0-TASK-BOARD.md");

fn id(s: &str) -> TaskId {
    TaskId::parse(s).expect("valid")
}

fn parse(text: &str) -> Board {
    Board::parse("board.md", text).expect("parses")
}

fn parse_err(text: &str) -> BoardError {
    Board::parse("board.md", text).expect_err("must not parse")
}

#[test]
fn the_fixture_has_54_tasks_with_statuses_owners_and_blockers() {
    let board = parse(FIXTURE);
    assert_eq!(board.tasks().len(), 54);
    let get = |s: &str| {
        board
            .tasks()
            .iter()
            .find(|t| t.id.as_str() == s)
            .expect("task")
            .clone()
    };
    let t = get("P0.1.6");
    assert_eq!(
        (t.status, t.owner.map(|o| o.to_string())),
        (TaskStatus::Claimed, Some("session-1-ndi".into()))
    );
    assert_eq!(get("P0.1.1").status, TaskStatus::Complete);
    assert_eq!(get("P0.1.7").status, TaskStatus::Blocked);
    assert_eq!(get("P0.2.6").status, TaskStatus::Available);
    assert_eq!(get("P0.2.2").blocked_by, vec![id("P0.2.1"), id("P0.1.1")]);
    assert_eq!(
        get("P0.5.4").title.as_deref(),
        Some("Stream claim integration")
    );
    let count = |s: TaskStatus| board.tasks().iter().filter(|t| t.status == s).count();
    assert_eq!(
        [
            count(TaskStatus::Complete),
            count(TaskStatus::Claimed),
            count(TaskStatus::Blocked),
            count(TaskStatus::Available)
        ],
        [13, 2, 16, 23]
    );
    assert_eq!(board.line_of(&id("P0.1.1")), Some(7));
}

#[test]
fn an_unchanged_board_renders_byte_identical() {
    let board = parse(FIXTURE);
    assert_eq!(board.render(board.tasks()), FIXTURE);
    assert_eq!(board.render(&[]), FIXTURE);
}

#[test]
fn a_claim_changes_only_its_two_cells() {
    let board = parse(FIXTURE);
    let mut tasks = board.tasks().to_vec();
    let t = tasks
        .iter_mut()
        .find(|t| t.id.as_str() == "P0.2.6")
        .expect("task");
    t.status = TaskStatus::Claimed;
    t.owner = Some(SessionId::parse("session-4-sip").expect("valid"));
    let out = board.render(&tasks);
    let changed = crate::testing::changed_lines(FIXTURE, &out);
    assert_eq!(
        changed,
        vec![(
            "| P0.2.6 | Claim latency metrics | 🔵 AVAILABLE |  |  |",
            "| P0.2.6 | Claim latency metrics | 🟡 IN PROGRESS | session-4-sip |  |"
        )]
    );
    assert_eq!(FIXTURE.lines().count(), out.lines().count());
    assert_eq!(parse(&out).tasks(), tasks.as_slice());
}

#[test]
fn aligned_cells_keep_their_width_when_the_new_value_is_shorter() {
    let text = "| ID | Status         | Owner |\n|----|----------------|-------|\n| A  | 🔵 AVAILABLE   | s1    |\n";
    let board = parse(text);
    let mut tasks = board.tasks().to_vec();
    tasks[0].status = TaskStatus::Complete;
    let out = board.render(&tasks);
    assert_eq!(out, "| ID | Status         | Owner |\n|----|----------------|-------|\n| A  | ✅ DONE        | s1    |\n");
    // A plain (unpadded) cell stays plain.
    let board = parse("| ID | Status | Owner |\n|---|---|---|\n| A | 🟡 IN PROGRESS | s1 |\n");
    let mut tasks = board.tasks().to_vec();
    tasks[0].status = TaskStatus::Complete;
    assert_eq!(
        board.render(&tasks),
        "| ID | Status | Owner |\n|---|---|---|\n| A | ✅ DONE | s1 |\n"
    );
}

#[test]
fn new_tasks_are_appended_to_the_last_task_table() {
    let board = parse(FIXTURE);
    let mut tasks = board.tasks().to_vec();
    tasks.push(BoardTask {
        id: id("P0.8.1"),
        title: Some("a | b".into()),
        status: TaskStatus::Blocked,
        owner: None,
        blocked_by: vec![id("P0.7.7")],
    });
    let out = board.render(&tasks);
    assert!(out.contains("| P0.7.7 | Phase 0 sign-off | 🔵 AVAILABLE |  |  |\n| P0.8.1 | a \\| b | 🔴 BLOCKED |  | P0.7.7 |\n\n_Total"), "{out}");
    assert_eq!(parse(&out).tasks(), tasks.as_slice());
    // No table at all: one is made.
    let fresh = new_board(&tasks[..2]);
    assert!(
        fresh.starts_with("| ID | Task | Status | Owner | Blocked by |\n|----|"),
        "{fresh}"
    );
    assert_eq!(parse(&fresh).tasks(), &tasks[..2]);
    let after_prose = parse("# Board\n\nSome words.").render(&tasks[..1]);
    assert_eq!(parse(&after_prose).tasks(), &tasks[..1]);
    assert!(
        after_prose.starts_with("# Board\n\nSome words.\n\n| ID |"),
        "{after_prose}"
    );
}

#[test]
fn several_tables_legends_escaped_pipes_and_aliases() {
    // A legend without rows is no task table either (issue 14: legends are never errors).
    let text = "\
| Status | Meaning |\n|---|---|\n
Legend above has no ID column.\n";
    assert!(parse(text).tasks().is_empty());
    let text = "\
| Emoji | Meaning |\n|:--|--:|\n| 🔵 | free |\n\n\
## Stream A\n\n| Task ID | Title | State | Claimed by | Depends on |\n|--|--|--|--|--|\n| A.1 | pipes \\| inside | available | | |\n\n\
## Stream B\n\n| Session | ID | Description | Status | Blockers |\n| --- | --- | --- | --- | --- |\n| s-2 | B.1 | x | 🟡 in progress | A.1,  |\r\n| | B.2 | y | Done | |";
    let board = parse(text);
    let ids: Vec<&str> = board.tasks().iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["A.1", "B.1", "B.2"]);
    assert_eq!(board.tasks()[0].title.as_deref(), Some("pipes | inside"));
    assert_eq!(
        board.tasks()[1].owner.as_ref().map(|s| s.as_str()),
        Some("s-2")
    );
    assert_eq!(board.tasks()[1].blocked_by, vec![id("A.1")]);
    assert_eq!(board.tasks()[2].status, TaskStatus::Complete);
    assert_eq!(
        board.render(board.tasks()),
        text,
        "CRLF and missing trailing pipes survive"
    );
}

#[test]
fn malformed_boards_name_the_file_and_line() {
    let head = "# B\n\n| ID | Task | Status | Owner |\n|---|---|---|---|\n";
    let cases = [
        (
            format!("{head}| A | t | 🟣 MAYBE | |\n"),
            5,
            "unknown status",
        ),
        (format!("{head}| A | t |  | |\n"), 5, "unknown status"),
        (
            format!("{head}| A | t | 🔵 DONE | |\n"),
            5,
            "unknown status",
        ),
        (
            format!(
                "{head}| A | t | 🔵 AVAILABLE | |\n| B | t | ✅ DONE | |\n| A | u | ✅ DONE | |\n"
            ),
            7,
            "lines 5 and 7",
        ),
        (
            format!("{head}| A | t | 🔵 AVAILABLE |\n"),
            5,
            "row has 3 cells",
        ),
        (
            format!("{head}| A | t | 🔵 AVAILABLE | | x |\n"),
            5,
            "row has 5 cells",
        ),
        (
            format!("{head}| a b | t | 🔵 AVAILABLE | |\n"),
            5,
            "invalid task id",
        ),
        (
            format!("{head}| A | t | 🟡 IN PROGRESS | not ok |\n"),
            5,
            "owner: invalid session id",
        ),
        (
            "| Task | Status |\n|---|---|\n| x | ✅ DONE |\n".to_owned(),
            1,
            "no ID column",
        ),
        (
            "| ID | Task |\n|---|---|\n| x | y |\n".to_owned(),
            1,
            "no Status column",
        ),
    ];
    for (text, line, what) in cases {
        let e = parse_err(&text);
        assert_eq!(
            (e.file.as_str(), e.line),
            ("board.md", line),
            "{e} for {text:?}"
        );
        assert!(e.to_string().contains(what), "{e} should say {what:?}");
        assert!(
            e.to_string().starts_with(&format!("board.md:{line}: ")),
            "{e}"
        );
    }
}

#[test]
fn every_malformed_row_is_reported_at_once() {
    // Issue 16: board errors came one per run; a person fixed one, ran again, met the next.
    let text = "# B\n\n| ID | Task | Status | Owner |\n|---|---|---|---|\n\
                | A | t | 🟣 MAYBE | |\n| B | t | ✅ DONE | |\n| C | t | 🔵 AVAILABLE |\n\
                | B | u | ✅ DONE | |\n\n| Task | Status |\n|---|---|\n| x | ✅ DONE |\n";
    let e = parse_err(text);
    assert_eq!(e.line, 5, "{e}");
    let lines: Vec<usize> = e.more.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, [7, 8, 10], "{e}");
    let shown = e.to_string();
    let expect = [
        "board.md:5: unknown status",
        "board.md:7: row has 3 cells",
        "board.md:8: task B is listed twice: lines 6 and 8",
        "board.md:10: task table has a Status column but no ID column",
    ];
    for (line, want) in shown.lines().zip(expect) {
        assert!(
            line.starts_with(want),
            "{line:?} should start with {want:?}"
        );
    }
    assert_eq!(shown.lines().count(), 4, "{shown}");
}

#[test]
fn junk_is_an_error_or_no_tasks_never_a_panic() {
    for junk in [
        "",
        "\u{feff}",
        "|",
        "||\n||",
        "| ID | Status |\n|---|---|\n|",
        "\0\u{1}\u{2}|||\n|-|-|",
        "| ID | Status |\n| - | - |\n| \\| | \\ |",
    ] {
        let _ = Board::parse("junk.md", junk);
    }
}

fn task_strategy() -> impl Strategy<Value = BoardTask> {
    let ids = "[A-Za-z0-9._:-]{1,12}";
    let status = prop_oneof![
        Just(TaskStatus::Available),
        Just(TaskStatus::Blocked),
        Just(TaskStatus::Claimed),
        Just(TaskStatus::Complete)
    ];
    (
        ids,
        proptest::option::of("[a-z |\\\\]{0,20}"),
        status,
        proptest::option::of("[a-z0-9-]{1,10}"),
        proptest::collection::vec(ids, 0..3),
    )
        .prop_map(|(i, title, status, owner, blockers)| BoardTask {
            id: id(&i),
            title: title
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty() && !t.ends_with('\\')),
            status,
            owner: owner.map(|o| SessionId::parse(&o).expect("valid")),
            blocked_by: blockers.iter().map(|b| id(b)).collect(),
        })
}

fn unique(tasks: Vec<BoardTask>) -> Vec<BoardTask> {
    let mut seen = std::collections::BTreeSet::new();
    tasks
        .into_iter()
        .filter(|t| seen.insert(t.id.clone()))
        .collect()
}

proptest! {
    #[test]
    fn parse_of_render_is_the_board(tasks in proptest::collection::vec(task_strategy(), 0..20).prop_map(unique)) {
        let text = new_board(&tasks);
        let board = Board::parse("p.md", &text).expect("a rendered board parses");
        prop_assert_eq!(board.tasks(), tasks.as_slice());
        prop_assert_eq!(board.render(board.tasks()), text);
    }

    #[test]
    fn edits_of_the_fixture_round_trip(edits in proptest::collection::vec((0usize..54, task_strategy()), 0..10)) {
        let board = parse(FIXTURE);
        let mut tasks = board.tasks().to_vec();
        for (i, t) in edits {
            let keep = tasks[i].id.clone();
            tasks[i] = BoardTask { id: keep, ..t };
        }
        let out = board.render(&tasks);
        let again = Board::parse("p.md", &out).expect("parses");
        prop_assert_eq!(again.tasks(), tasks.as_slice());
        prop_assert_eq!(out.lines().count(), FIXTURE.lines().count());
    }
}

#[test]
fn a_bom_and_mixed_line_endings_are_kept_byte_for_byte() {
    let text = "\u{feff}| ID | Status | Owner |\r\n|---|---|---|\r\n| A | 🔵 AVAILABLE |  |\n| B | ✅ DONE | s1 |\r\n";
    let b = parse(text);
    assert_eq!(b.tasks().len(), 2, "the BOM does not hide the table");
    assert_eq!(b.render(b.tasks()), text);
    let mut tasks = b.tasks().to_vec();
    tasks[0].status = TaskStatus::Claimed;
    tasks[0].owner = Some(SessionId::parse("s2").expect("id"));
    let out = b.render(&tasks);
    assert!(out.starts_with('\u{feff}'), "{out:?}");
    assert!(out.contains("| B | ✅ DONE | s1 |\r\n"), "{out:?}");
    assert_eq!(
        parse(&out).tasks()[0].owner.as_ref().map(|s| s.as_str()),
        Some("s2")
    );
}

proptest! {
    #[test]
    fn arbitrary_text_is_an_error_or_a_board_never_a_panic(s in "(?s).{0,400}") {
        let _ = Board::parse("fuzz.md", &s);
    }
}

#[test]
fn a_legend_table_is_not_a_task_table_and_a_status_table_without_ids_is_an_error() {
    // Issue 14 #1: a legend pushed by a person made every push of every agent fail.
    let legend =
        "| Status | Meaning |\n|---|---|\n| 🔵 AVAILABLE | free |\n| ✅ DONE | finished |\n\n";
    let text = format!("{legend}| ID | Status | Owner |\n|---|---|---|\n| A | 🔵 AVAILABLE |  |\n");
    let b = parse(&text);
    assert_eq!(b.tasks().len(), 1);
    assert_eq!(b.render(b.tasks()), text);
    let e = parse_err("| Status | Note |\n|---|---|\n| 🔵 AVAILABLE | x |\n| A1 | y |\n");
    assert_eq!(e.line, 1, "{e}");
    assert!(e.message.contains("no ID column"), "{e}");
}

#[test]
fn common_owner_column_names_are_read_and_a_table_without_one_cannot_take_a_claim() {
    // Issue 14 #3: renamed to `Assignee`, every claim "won" and was then lost.
    for header in ["Assignee", "Assigned to", "Claimed by", "Owner"] {
        let text =
            format!("| ID | Status | {header} |\n|---|---|---|\n| A | 🟡 IN PROGRESS | s1 |\n");
        let b = parse(&text);
        assert_eq!(
            b.tasks()[0].owner.as_ref().map(|s| s.as_str()),
            Some("s1"),
            "{header}"
        );
        assert!(b.can_record_owner("b.md", &id("A")).is_ok());
    }
    let b = parse("# Board\n\n| ID | Status | Who |\n|---|---|---|\n| A | 🔵 AVAILABLE |  |\n");
    let e = b
        .can_record_owner("b.md", &id("A"))
        .expect_err("no owner column");
    assert_eq!((e.file.as_str(), e.line), ("b.md", 3), "{e}");
    assert!(e.message.contains("no owner column"), "{e}");
}
