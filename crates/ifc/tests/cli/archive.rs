//! `ifc archive`: complete tasks move out of `tasks/` (into `archive/`, kept whole), never one
//! that a task not complete waits for nor one completed within --older-than; `--restore` puts
//! one back.

use backend_etcd::testing::EtcdServer;
use serde_json::Value;

use crate::{all_keys, code, ifc, run, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_moves_old_complete_tasks_out_of_the_live_prefix_and_restore_brings_one_back() {
    let server = EtcdServer::start();
    let ok = |args: &[&str]| {
        let out = run(ifc(&server).args(args));
        assert_eq!(code(&out), 0, "{args:?}: {out:?}");
        text(&out.stdout)
    };
    ok(&["put", "A", "--status", "complete"]);
    ok(&["put", "B", "--blocked-by", "A"]);
    for t in ["C", "D"] {
        ok(&["put", t]);
        ok(&["claim", t, "--session", "s"]);
        ok(&["release", t, "--session", "s", "--status", "complete"]);
    }
    // A has no completion time (old), but B waits for it; C and D were completed just now.
    let said = ok(&["archive"]);
    assert!(said.starts_with("archived 0 complete task(s)"), "{said}");
    assert!(
        said.contains("kept 1 that tasks not complete wait for: A"),
        "{said}"
    );
    assert!(said.contains("kept 2 completed since then"), "{said}");
    let dry = ok(&["archive", "--older-than", "0s", "--dry-run"]);
    assert!(dry.starts_with("would archive 2 complete task(s)"), "{dry}");
    assert!(dry.contains("(C, D)"), "{dry}");
    let out = run(ifc(&server).args(["archive", "--older-than", "0s", "-o", "json"]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["archived"], serde_json::json!(["C", "D"]), "{v}");
    assert_eq!(v["kept_waited_for"], serde_json::json!(["A"]), "{v}");
    let out = run(ifc(&server).args(["status", "-o", "json"]));
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    let ids: Vec<&str> = listed
        .iter()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    assert_eq!(ids, ["A", "B"]);
    let keys = all_keys(&server).await;
    for k in ["archive/C", "archive/D", "tasks/A", "tasks/B"] {
        assert!(keys.iter().any(|x| x == k), "{k} in {keys:?}");
    }
    assert!(!keys
        .iter()
        .any(|x| x == "tasks/C" || x.starts_with("claims/")));

    assert_eq!(ok(&["archive", "--restore", "C"]), "restored C\n");
    let got = ok(&["get", "C", "-o", "json"]);
    let c: Value = serde_json::from_str(&got).expect("json");
    assert_eq!(
        (c["status"].as_str(), c["claimed_by"].as_str()),
        (Some("complete"), Some("s")),
        "the record is whole: {c}"
    );
    let out = run(ifc(&server).args(["archive", "--restore", "C", "NOPE"]));
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (
            1,
            "C is not in the archive\nNOPE is not in the archive\n".to_owned()
        )
    );
    // While the fleet has a git side, the board keeps finished rows: nothing is archived.
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("fleet.yaml"), "git:\n  remote: coord.git\n").expect("fleet");
    let out = run(ifc(&server).current_dir(dir.path()).args([
        "--fleet",
        "fleet.yaml",
        "archive",
        "--older-than",
        "0s",
    ]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(
        text(&out.stderr).contains("git.retired"),
        "{}",
        text(&out.stderr)
    );
    assert!(!all_keys(&server).await.iter().any(|k| k == "tasks/D"));
}

#[test]
fn a_task_may_wait_for_an_archived_one_and_an_agent_runs_it() {
    // An archived task is a complete one kept out of lists: a new task may name it as a
    // blocker, and is claimable (tester helper-8: it was "missing", and an agent waiting for
    // such a task exited 1 under --until-done).
    use crate::agent::{finish, spawn_agent, Workdir, APPEND};
    let (server, w) = (EtcdServer::start(), Workdir::new());
    let e = server.endpoint();
    let ok = |args: &[&str]| {
        let out = run(crate::agent::ifc(&e, w.path()).args(args));
        assert_eq!(code(&out), 0, "{args:?}: {out:?}");
        text(&out.stdout)
    };
    ok(&["put", "A"]);
    ok(&["claim", "A", "--session", "s"]);
    ok(&["release", "A", "--session", "s", "--status", "complete"]);
    assert!(ok(&["archive", "--older-than", "0s"]).starts_with("archived 1"));
    let a: Value = serde_json::from_str(&ok(&["get", "A", "-o", "json"])).expect("json");
    assert_eq!(a["status"], "complete", "{a}");
    ok(&["put", "N", "--blocked-by", "A"]);
    let table = ok(&["status"]);
    assert!(
        !table.contains("(missing)") && !table.contains("waiting"),
        "{table}"
    );
    ok(&["claim", "N", "--session", "cli"]);
    ok(&["put", "M", "--blocked-by", "A"]);
    // An --until-done agent of `list` exits 0.
    let until_done = |name: &str, list: &[&str]| {
        let config = w.session(name, list, APPEND, "");
        let log = w.path().join(format!("{name}.log"));
        let mut agent = spawn_agent(
            crate::agent::ifc(&e, w.path()),
            &config,
            &log,
            &["--until-done"],
        );
        let status = finish(&mut agent, std::time::Duration::from_secs(30));
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(status, 0, "{said}");
    };
    // Its list names the archived task too: done, not "no task of the store".
    until_done("runner", &["M", "A"]);
    assert_eq!(w.done(), ["M"]);
    // A list of the archived task alone is done too (it exited 1).
    until_done("only-a", &["A"]);
    assert_eq!(w.done(), ["M"], "A is not run again");
}

#[test]
fn an_archived_task_is_not_created_again_by_migrate_or_put_and_verify_finds_it() {
    // Re-created as available, finished work would be done again (tester helper-9).
    let server = EtcdServer::start();
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("board.md"),
        "# B\n\n| ID | Task | Status | Owner | Blocked by |\n|----|------|--------|-------|------------|\n\
         | M.1 | one | ✅ DONE | s |  |\n| M.2 | two | ✅ DONE | s |  |\n",
    )
    .expect("board");
    let run_in = |args: &[&str]| run(ifc(&server).current_dir(dir.path()).args(args));
    assert_eq!(code(&run_in(&["migrate", "--board", "board.md"])), 0);
    let out = run_in(&["archive"]);
    assert!(text(&out.stdout).starts_with("archived 2"), "{out:?}");
    let again = run_in(&["migrate", "--board", "board.md"]);
    assert_eq!(code(&again), 0, "{again:?}");
    let said = text(&again.stdout);
    assert!(said.contains("0 created"), "{said}");
    assert!(said.contains("archive --restore M.1"), "{said}");
    assert!(!all_keys_blocking(&server).contains(&"tasks/M.1".to_owned()));
    let verify = run_in(&["verify", "--board", "board.md"]);
    assert_eq!(code(&verify), 0, "{verify:?}");
    let put = run_in(&["put", "M.2"]);
    assert_eq!(code(&put), 2, "{put:?}");
    assert!(
        text(&put.stderr).contains("ifc archive --restore M.2"),
        "{}",
        text(&put.stderr)
    );
    let get = run_in(&["get", "M.2", "-o", "json"]);
    let m2: Value = serde_json::from_slice(&get.stdout).expect("json");
    assert_eq!(m2["status"], "complete", "{m2}");
}

fn all_keys_blocking(server: &EtcdServer) -> Vec<String> {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(all_keys(server))
}
