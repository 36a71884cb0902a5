//! End-to-end tests of the `ifc` binary against a real etcd (and, in `git`, real git repos): the
//! guide's checklist through the CLI, races between real processes, exit codes and output formats.

mod agent;
mod archive;
mod deploy;
mod exclusive;
mod git;
mod human;
mod hybrid;
mod lapsed;
mod metrics;
mod migrate;
mod nats;
mod readme;
mod security;
mod ui;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use backend_etcd::testing::EtcdServer;
use serde_json::Value;

/// The coordinator a test runs against: a real etcd or a real nats-server.
pub(crate) enum Coordinator {
    Etcd(EtcdServer),
    Nats(backend_nats::testing::NatsServer),
}

impl Coordinator {
    pub(crate) fn etcd() -> Coordinator {
        Coordinator::Etcd(EtcdServer::start())
    }

    pub(crate) fn nats() -> Coordinator {
        Coordinator::Nats(backend_nats::testing::NatsServer::start())
    }

    /// Its client URL (`nats://` selects NATS by itself).
    pub(crate) fn endpoint(&self) -> String {
        match self {
            Coordinator::Etcd(s) => s.endpoint(),
            Coordinator::Nats(s) => s.url(),
        }
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        match self {
            Coordinator::Etcd(s) => s.pid(),
            Coordinator::Nats(s) => s.pid(),
        }
        .expect("the server runs")
    }
}

fn ifc(server: &EtcdServer) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ifc"));
    cmd.env("IFC_ENDPOINTS", server.endpoint())
        .env_remove("IFC_PREFIX")
        .env_remove("RUST_LOG");
    cmd
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("ifc runs")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
pub fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {out:?}"))
}

/// Every key etcd holds.
pub(crate) async fn all_keys(server: &EtcdServer) -> Vec<String> {
    let options = etcd_client::GetOptions::new()
        .with_all_keys()
        .with_keys_only();
    raw(server)
        .await
        .get("", Some(options))
        .await
        .expect("get")
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

pub(crate) async fn raw(server: &EtcdServer) -> etcd_client::Client {
    etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("raw client")
}

#[tokio::test]
async fn claim_release_status_and_get_through_the_cli() {
    let server = EtcdServer::start();
    assert_eq!(
        code(&run(ifc(&server).args([
            "put",
            "P0.1.1",
            "--title",
            "Set up etcd"
        ]))),
        0
    );
    let out = run(ifc(&server).args([
        "put",
        "P0.1.2",
        "--status",
        "blocked",
        "--blocked-by",
        "P0.1.1",
    ]));
    assert_eq!(code(&out), 0, "{out:?}");
    let out = run(ifc(&server).args(["claim", "P0.1.2", "--session", "s1"]));
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (
            1,
            "P0.1.2 is not claimable: waiting for P0.1.1 (available)\n".to_owned()
        )
    );
    let out = run(ifc(&server).args(["claim", "P0.1.1", "--session", "s1", "-o", "json"]));
    assert_eq!(code(&out), 0, "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (v["outcome"].as_str(), v["task_id"].as_str()),
        (Some("won"), Some("P0.1.1"))
    );
    assert!(v["fencing_token"].as_u64().is_some_and(|t| t > 0));

    let out = run(ifc(&server).args([
        "release",
        "P0.1.1",
        "--session",
        "s2",
        "--status",
        "complete",
    ]));
    assert_eq!(code(&out), 1);
    assert!(text(&out.stdout).contains("not the holder"), "{out:?}");
    let out = run(ifc(&server).args([
        "release",
        "P0.1.1",
        "--session",
        "s1",
        "--status",
        "complete",
    ]));
    assert_eq!(code(&out), 0, "{out:?}");

    let out = run(ifc(&server).args(["status", "--output", "json"]));
    assert_eq!(code(&out), 0);
    let tasks: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json array");
    let by_id: BTreeMap<&str, &Value> = tasks
        .iter()
        .map(|t| (t["task_id"].as_str().expect("id"), t))
        .collect();
    assert_eq!(by_id["P0.1.1"]["status"], "complete");
    assert_eq!(by_id["P0.1.1"]["claimed_by"], "s1");
    assert_eq!(by_id["P0.1.1"]["title"], "Set up etcd");
    assert_eq!(by_id["P0.1.2"]["blocked_by"], serde_json::json!(["P0.1.1"]));
    for key in [
        "task_id",
        "status",
        "claimed_by",
        "claimed_at",
        "blocked_by",
        "title",
    ] {
        assert!(by_id["P0.1.2"].get(key).is_some(), "{key} present");
    }
    // Issue 16: stored `blocked`, its blocker complete: `status` said `blocked`, yet it can be
    // claimed; it says so now.
    assert_eq!(by_id["P0.1.2"]["status"], "blocked");
    assert_eq!(by_id["P0.1.2"]["claimable"], true);
    assert_eq!(by_id["P0.1.1"]["claimable"], false, "complete");
    let out = run(ifc(&server).args(["status"]));
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with("P0.1.2") && l.contains("blocked (claimable)")),
        "{}",
        text(&out.stdout)
    );
    // The blocker is complete: now it can be claimed.
    assert_eq!(
        code(&run(ifc(&server).args([
            "claim",
            "P0.1.2",
            "--session",
            "s1"
        ]))),
        0
    );
    let out = run(ifc(&server).args(["get", "P0.1.2", "-o", "json"]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (v["status"].as_str(), v["claimed_by"].as_str()),
        (Some("claimed"), Some("s1"))
    );
    let out = run(ifc(&server).args(["get", "NOPE"]));
    assert_eq!(code(&out), 1);
    assert!(text(&out.stderr).contains("NOPE not found"));
}

#[tokio::test]
async fn a_guide_shaped_record_is_claimed_and_the_other_client_sees_it() {
    let server = EtcdServer::start();
    let mut raw = raw(&server).await;
    raw.put(
        "tasks/X",
        r#"{"task_id":"X","status":"available","claimed_by":null,"claimed_at":null}"#,
        None,
    )
    .await
    .expect("put");
    let out = run(ifc(&server).args(["claim", "X", "--session", "session-1-ndi"]));
    assert_eq!(code(&out), 0, "{out:?}");
    let resp = raw.get("tasks/X", None).await.expect("get");
    let v: Value = serde_json::from_slice(resp.kvs()[0].value()).expect("json");
    assert_eq!(
        (v["status"].as_str(), v["claimed_by"].as_str()),
        (Some("claimed"), Some("session-1-ndi"))
    );
}

/// Ten real processes race over 1,000 tasks, each in its own order: exactly one winner per task.
#[tokio::test]
async fn ten_processes_race_over_a_thousand_tasks_with_exactly_one_winner_each() {
    let server = EtcdServer::start();
    let mut raw = raw(&server).await;
    let ids: Vec<String> = (0..1000).map(|i| format!("T{i:04}")).collect();
    for chunk in ids.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|id| {
                etcd_client::TxnOp::put(format!("tasks/{id}"), r#"{"status":"available"}"#, None)
            })
            .collect();
        raw.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("seed");
    }
    race(&server.endpoint(), &ids);
}

/// Ten real processes race over `ids` (available on the store at `endpoint`), each in its own
/// order: exactly one winner per task, and the store names it.
pub(crate) fn race(endpoint: &str, ids: &[String]) {
    let cwd = tempfile::tempdir().expect("temp dir");
    let step = ids.len() / 10;
    let children: Vec<_> = (0..10)
        .map(|k| {
            let mut order = ids.to_vec();
            order.rotate_left(k * step);
            if k % 2 == 1 {
                order.reverse();
            }
            agent::ifc(endpoint, cwd.path())
                .args(["claim", "--session", &format!("racer-{k}"), "-o", "json"])
                .args(&order)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn racer")
        })
        .collect();
    let mut winners: BTreeMap<String, String> = BTreeMap::new();
    for child in children {
        let out = child.wait_with_output().expect("racer finishes");
        assert!(
            matches!(code(&out), 0 | 1),
            "racer failed: {}",
            text(&out.stderr)
        );
        for line in text(&out.stdout).lines() {
            let v: Value = serde_json::from_str(line).expect("one JSON object per line");
            let (task, session) = (
                v["task_id"].as_str().expect("id"),
                v["session"].as_str().expect("session"),
            );
            match v["outcome"].as_str() {
                Some("won") => {
                    if let Some(first) = winners.insert(task.to_owned(), session.to_owned()) {
                        panic!("double claim of {task}: {first} and {session}");
                    }
                }
                Some("lost") => assert_ne!(v["holder"].as_str(), Some(session)),
                other => panic!("unexpected outcome {other:?} in {line}"),
            }
        }
    }
    assert_eq!(winners.len(), ids.len(), "every task won exactly once");
    for t in agent::statuses(endpoint, cwd.path()) {
        assert_eq!(
            t["claimed_by"].as_str(),
            winners
                .get(t["task_id"].as_str().expect("id"))
                .map(String::as_str)
        );
    }
}

/// Two processes claim the same task at once, many times over: one wins each round.
#[tokio::test]
async fn two_processes_claiming_one_task_have_one_winner() {
    let server = EtcdServer::start();
    for round in 0..15 {
        let task = format!("TEST-RACE-{round}");
        assert_eq!(code(&run(ifc(&server).args(["put", &task]))), 0);
        let spawn = |s: &str| {
            ifc(&server)
                .args(["claim", &task, "--session", s])
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        let (a, b) = (spawn("session-1"), spawn("session-2"));
        let codes = [
            code(&a.wait_with_output().expect("a")),
            code(&b.wait_with_output().expect("b")),
        ];
        let mut sorted = codes;
        sorted.sort();
        assert_eq!(sorted, [0, 1], "round {round}: exit codes {codes:?}");
    }
}

#[tokio::test]
async fn watch_streams_the_claim_as_json_lines() {
    let server = EtcdServer::start();
    assert_eq!(code(&run(ifc(&server).args(["put", "TEST-EVENT"]))), 0);
    let mut watcher = ifc(&server)
        .args(["watch", "-o", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let stdout = watcher.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The watch is live once it has listed; claim until a claim event shows (the first claim may
    // race the watcher's start, so the task is given back and claimed again; the give-back events
    // are skipped).
    let mut line = None;
    'attempts: for _ in 0..50 {
        let out = run(ifc(&server).args(["claim", "TEST-EVENT", "--session", "test-session"]));
        assert_eq!(code(&out), 0, "{out:?}");
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&l).expect("a JSON object per line");
            if v["new_status"] == "claimed" {
                line = Some(l);
                break 'attempts;
            }
        }
        run(ifc(&server).args([
            "release",
            "TEST-EVENT",
            "--session",
            "test-session",
            "--status",
            "available",
        ]));
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    let line = line.expect("the watcher printed an event");
    let v: Value = serde_json::from_str(&line).expect("a JSON object per line");
    assert_eq!(v["task_id"], "TEST-EVENT");
    assert_eq!(
        (v["old_status"].as_str(), v["new_status"].as_str()),
        (Some("available"), Some("claimed"))
    );
    assert_eq!(v["claimed_by"], "test-session");
    assert!(v["revision"].as_u64().is_some_and(|r| r > 0));
}

#[tokio::test]
async fn a_claim_with_ttl_expires_after_its_process_exits() {
    let server = EtcdServer::start();
    assert_eq!(code(&run(ifc(&server).args(["put", "TEST-TTL"]))), 0);
    let out = run(ifc(&server).args([
        "claim",
        "TEST-TTL",
        "--session",
        "crashed-session",
        "--ttl",
        "2",
    ]));
    assert_eq!(code(&out), 0, "{out:?}");
    let mut status = String::new();
    for _ in 0..100 {
        let out = run(ifc(&server).args(["get", "TEST-TTL", "-o", "json"]));
        let v: Value = serde_json::from_slice(&out.stdout).expect("the record is still there");
        status = v["status"].as_str().unwrap_or_default().to_owned();
        if status == "available" {
            assert!(v["claimed_by"].is_null());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status, "available", "the claim expired");
    let out = run(ifc(&server).args([
        "release",
        "TEST-TTL",
        "--session",
        "crashed-session",
        "--status",
        "complete",
    ]));
    assert_eq!(code(&out), 1, "the stale holder is not the holder");
    assert_eq!(
        code(&run(ifc(&server).args([
            "claim",
            "TEST-TTL",
            "--session",
            "rescuer"
        ]))),
        0
    );
}

#[tokio::test]
async fn put_refuses_a_missing_blocker_and_a_cycle_by_name() {
    // Issue 15 #4: both were accepted silently; `status` showed the task available and an agent
    // waiting for it retried its claim every second for ever.
    let server = EtcdServer::start();
    for t in ["A", "B"] {
        assert_eq!(code(&run(ifc(&server).args(["put", t]))), 0);
    }
    let out = run(ifc(&server).args(["put", "A", "--blocked-by", "NOPE"]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(
        text(&out.stderr).contains("blocker NOPE of A does not exist"),
        "{}",
        text(&out.stderr)
    );
    let out = run(ifc(&server).args(["put", "B", "--blocked-by", "A"]));
    assert_eq!(code(&out), 0, "{out:?}");
    let out = run(ifc(&server).args(["put", "A", "--blocked-by", "B"]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(
        text(&out.stderr).contains("A would wait for itself: A → B → A"),
        "{}",
        text(&out.stderr)
    );
    // A cycle further up the chain (the tester's: accepted without a word): C and D wait for
    // each other, and A would wait for C.
    assert_eq!(code(&run(ifc(&server).args(["put", "C"]))), 0);
    assert_eq!(
        code(&run(ifc(&server).args(["put", "D", "--blocked-by", "C"]))),
        0
    );
    assert_eq!(
        code(&run(ifc(&server).args([
            "put",
            "C",
            "--blocked-by",
            "D",
            "--force"
        ]))),
        0
    );
    let out = run(ifc(&server).args(["put", "A", "--blocked-by", "C"]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(
        text(&out.stderr)
            .contains("A would wait for a cycle of blockers that can never complete: C → D → C"),
        "{}",
        text(&out.stderr)
    );
    let out = run(ifc(&server).args(["get", "A", "-o", "json"]));
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        a["blocked_by"],
        serde_json::json!([]),
        "nothing was written"
    );
    // --force insists (a blocker to be put later): stored as given.
    let out = run(ifc(&server).args(["put", "A", "--blocked-by", "LATER", "--force"]));
    assert_eq!(code(&out), 0, "{out:?}");
    let out = run(ifc(&server).args(["get", "A", "-o", "json"]));
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(a["blocked_by"], serde_json::json!(["LATER"]), "{a}");
    // What a task still waits for is shown (issue 15 #4: `status` said `available`).
    assert_eq!(a["waiting_for"], serde_json::json!(["LATER"]), "{a}");
    let out = run(ifc(&server).args(["get", "A"]));
    assert!(
        text(&out.stdout).contains("LATER (missing)"),
        "{}",
        text(&out.stdout)
    );
    let out = run(ifc(&server).args(["status"]));
    assert!(
        text(&out.stdout).contains("A (available)"),
        "B waits for A: {}",
        text(&out.stdout)
    );
    assert_eq!(
        code(&run(ifc(&server).args(["put", "A", "--status", "complete"]))),
        0
    );
    let out = run(ifc(&server).args(["get", "B", "-o", "json"]));
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        b["waiting_for"],
        serde_json::json!([]),
        "A is complete: {b}"
    );
}

#[tokio::test]
async fn a_claim_whose_answers_come_too_late_says_its_outcome_is_unknown_and_strands_nothing() {
    // Issue 15 #3: a claim whose answer timed out said "claim timed out" (exit 3) though etcd
    // had applied it: the task stayed claimed for a session nobody ran. Here etcd's answers
    // reach the CLI 1.5 s late (past its 300 ms deadline) from its claim's last request on:
    // the write (how many requests come before it is counted on a claim of another task).
    let server = EtcdServer::start();
    for t in ["A", "B", "C1", "C2", "C3", "D", "E"] {
        assert_eq!(code(&run(ifc(&server).args(["put", t]))), 0);
    }
    let proxy = backend_etcd::testing::TcpProxy::start(server.addr()).await;
    let unknown = |out: &Output, task: &str| {
        let stderr = text(&out.stderr);
        assert_eq!(code(out), 3, "{stderr}");
        assert!(
            stderr.contains("may or may not have been applied")
                && stderr.contains(&format!("ifc get {task}")),
            "{stderr}"
        );
    };
    let get = |task: &str| -> Value {
        let out = run(ifc(&server).args(["get", task, "-o", "json"]));
        serde_json::from_slice(&out.stdout).expect("json")
    };

    // A claim that holds until released: applied, and the CLI says it cannot know.
    let out = late_claim(&server, &proxy, &["A"], None, "C1").await;
    unknown(&out, "A");
    let a = get("A");
    assert_eq!(
        (a["status"].as_str(), a["claimed_by"].as_str()),
        (Some("claimed"), Some("s1")),
        "the claim was applied, as `ifc get` shows: {a}"
    );

    // A lease-bound claim: whatever was applied ends with its lease, nobody keeps it alive.
    let out = late_claim(&server, &proxy, &["B"], Some("2"), "C2").await;
    unknown(&out, "B");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let b = get("B");
        if b["status"] == "available" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the timed-out claim stranded B: {b}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Several tasks: the command ends at the first unknown outcome and says which were not
    // tried (the tester's report: nothing said so).
    let out = late_claim(&server, &proxy, &["D", "E"], None, "C3").await;
    unknown(&out, "D");
    assert!(
        text(&out.stderr).contains("(E not tried)"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(get("E")["status"], "available");
}

/// `ifc claim TASK --session s1` through `proxy` with a 300 ms request deadline, whose answers
/// from its last request on (the write, counted on a claim of `rehearsal` first) come 1.5 s late.
async fn late_claim(
    server: &EtcdServer,
    proxy: &backend_etcd::testing::TcpProxy,
    tasks: &[&str],
    ttl: Option<&str>,
    rehearsal: &str,
) -> Output {
    let claim = |tasks: &[&str]| {
        let mut claim = ifc(server);
        claim
            .env("IFC_ENDPOINTS", proxy.endpoint())
            .arg("claim")
            .args(tasks)
            .args([
                "--session",
                "s1",
                "--dial-timeout",
                "5s",
                "--request-timeout",
                "300ms",
            ]);
        if let Some(ttl) = ttl {
            claim.args(["--ttl", ttl]);
        }
        tokio::task::spawn_blocking(move || run(&mut claim))
    };
    proxy.delay_replies_from_request(0, Duration::ZERO);
    let before = proxy.requests();
    let out = claim(&[rehearsal]).await.expect("rehearsal ran");
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let after = proxy.requests();
    proxy.delay_replies_from_request(after + (after - before), Duration::from_millis(1500));
    claim(tasks).await.expect("claim ran")
}

#[tokio::test]
async fn a_re_claim_says_what_it_did_and_a_one_shot_lease_claim_is_the_sessions_to_release() {
    // Issue 16: the README's `claim … --ttl 10` after a plain claim silently turned the held
    // claim into a 10 s lease, and the next line's `release` failed ("not the holder").
    let server = EtcdServer::start();
    assert_eq!(code(&run(ifc(&server).args(["put", "T"]))), 0);
    let out = run(ifc(&server).args(["claim", "T", "--session", "s"]));
    assert_eq!(code(&out), 0, "{out:?}");
    let out = run(ifc(&server).args(["claim", "T", "--session", "s", "--ttl", "10"]));
    assert_eq!(code(&out), 0, "{out:?}");
    assert!(
        text(&out.stdout).contains(
            "s held it already: this claim replaces that one, and it ends 10 s after this command exits unless released"
        ),
        "{}",
        text(&out.stdout)
    );
    let out = run(ifc(&server).args(["release", "T", "--session", "s", "--status", "complete"]));
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (0, "released T as complete\n".to_owned()),
        "{}",
        text(&out.stderr)
    );
    // A lease-bound one-shot claim is adopted by another command of its session, as a claim
    // without a lease is: no process runs the task.
    assert_eq!(code(&run(ifc(&server).args(["put", "U"]))), 0);
    let out = run(ifc(&server).args(["claim", "U", "--session", "s", "--ttl", "30"]));
    assert_eq!(code(&out), 0, "{out:?}");
    let out = run(ifc(&server).args(["claim", "U", "--session", "s", "-o", "json"]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (v["outcome"].as_str(), v["replaced_own_claim"].as_bool()),
        (Some("won"), Some(true)),
        "{v}"
    );
    // ... and it holds until released now: the first command's lease no longer binds it.
    let out = run(ifc(&server).args(["get", "U", "-o", "json"]));
    let u: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(u["claimed_by"], "s", "{u}");
    // Another session gets nothing.
    let out = run(ifc(&server).args([
        "release",
        "U",
        "--session",
        "other",
        "--status",
        "available",
    ]));
    assert_eq!(code(&out), 1, "{out:?}");
}

#[test]
fn a_connection_error_says_what_to_try_and_every_global_flag_reads_its_variable() {
    // Issue 16: "cannot connect to etcd" gave no next step; IFC_OUTPUT and the timeouts had no
    // environment twin although the README said every global flag has one.
    let out = run(Command::new(env!("CARGO_BIN_EXE_ifc"))
        .env("IFC_ENDPOINTS", backend_etcd::testing::closed_endpoint())
        .env("IFC_DIAL_TIMEOUT", "300ms")
        .arg("status"));
    assert_eq!(code(&out), 3, "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot connect to etcd (to try ifc, `ifc dev` runs one"),
        "{err}"
    );
    let out = run(Command::new(env!("CARGO_BIN_EXE_ifc"))
        .env("IFC_REQUEST_TIMEOUT", "10")
        .arg("status"));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(
        text(&out.stderr).contains("invalid duration \"10\": give its unit"),
        "{}",
        text(&out.stderr)
    );
    // Tester helper-3: a zero poll interval panicked a thread, a 1 ms stale-after made every
    // claim stale at once, a zero deadline in the fleet file was exit 3.
    let dir0 = tempfile::tempdir().expect("dir");
    std::fs::write(dir0.path().join("f.yaml"), "etcd:\n  request_timeout: 0s\n").expect("fleet");
    for (args, says) in [
        (
            vec![
                "--mode",
                "git",
                "--git-remote",
                "x.git",
                "--poll-interval",
                "0s",
                "status",
            ],
            "poll interval",
        ),
        (
            vec![
                "--mode",
                "git",
                "--git-remote",
                "x.git",
                "--stale-after",
                "1ms",
                "status",
            ],
            "stale-after",
        ),
        (vec!["--fleet", "f.yaml", "status"], "request timeout"),
    ] {
        let out = run(Command::new(env!("CARGO_BIN_EXE_ifc"))
            .current_dir(dir0.path())
            .env_remove("IFC_MODE")
            .args(&args));
        assert_eq!(code(&out), 2, "{args:?}: {out:?}");
        assert!(
            text(&out.stderr).contains(says),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            !text(&out.stderr).contains("panicked"),
            "{}",
            text(&out.stderr)
        );
    }
    // The tester's: a zero deadline was exit 3 ("timed out after 0ns"), a 1 ms lease taken.
    let out = run(Command::new(env!("CARGO_BIN_EXE_ifc"))
        .env("IFC_REQUEST_TIMEOUT", "0s")
        .arg("status"));
    assert_eq!(code(&out), 2, "{out:?}");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("s.yaml"),
        "session_id: s\ntasks: [A]\ncommand: [/bin/true]\nlease_ttl: 1ms\n",
    )
    .expect("session file");
    let out = run(Command::new(env!("CARGO_BIN_EXE_ifc"))
        .current_dir(dir.path())
        .args(["agent", "--config", "s.yaml"]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(
        text(&out.stderr).contains("s.yaml: lease_ttl is under 2s (1 ms): at least 2s"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn ifc_output_json_is_read_from_the_environment() {
    let server = EtcdServer::start();
    assert_eq!(code(&run(ifc(&server).args(["put", "A"]))), 0);
    let out = run(ifc(&server).env("IFC_OUTPUT", "json").args(["get", "A"]));
    let a: Value = serde_json::from_slice(&out.stdout).expect("IFC_OUTPUT=json gives json");
    assert_eq!(a["task_id"], "A");
}

#[tokio::test]
async fn delete_removes_a_task_but_never_a_held_one_or_a_blocker_unless_forced() {
    // Issue 16: there was no way to delete a task (a trial's ids stayed, and `verify` failed).
    let server = EtcdServer::start();
    for t in ["A", "C"] {
        assert_eq!(code(&run(ifc(&server).args(["put", t]))), 0);
    }
    assert_eq!(
        code(&run(ifc(&server).args(["put", "B", "--blocked-by", "A"]))),
        0
    );
    assert_eq!(
        code(&run(ifc(&server).args(["claim", "C", "--session", "s"]))),
        0
    );
    let out = run(ifc(&server).args(["delete", "A"]));
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (
            1,
            "A is a blocker of B: edit their --blocked-by first (or --force)\n".to_owned()
        )
    );
    let out = run(ifc(&server).args(["delete", "C", "-o", "json"]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (code(&out), v["outcome"].as_str(), v["holder"].as_str()),
        (1, Some("held"), Some("s"))
    );
    let out = run(ifc(&server).args(["delete", "B", "A"]));
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (0, "deleted B\ndeleted A\n".to_owned())
    );
    let out = run(ifc(&server).args(["delete", "C", "--force"]));
    assert_eq!(code(&out), 0, "{out:?}");
    let out = run(ifc(&server).args(["status", "-o", "json"]));
    assert_eq!(text(&out.stdout).trim(), "[]");
    assert!(
        all_keys(&server)
            .await
            .iter()
            .all(|k| !k.starts_with("claims/")),
        "the claim key went with the task"
    );
    let out = run(ifc(&server).args(["delete", "NOPE"]));
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (1, "task NOPE not found\n".to_owned())
    );
    // While the fleet has a git side, the board is where a task is deleted.
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("fleet.yaml"), "git:\n  remote: coord.git\n").expect("fleet");
    let out =
        run(ifc(&server)
            .current_dir(dir.path())
            .args(["--fleet", "fleet.yaml", "delete", "X"]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(
        text(&out.stderr).contains("delete the task's row from the board"),
        "{}",
        text(&out.stderr)
    );
    // An unreadable record: said how to remove it, and removed with --force (tester helper-6:
    // only etcdctl could).
    raw(&server)
        .await
        .put("tasks/BAD", "not json{", None)
        .await
        .expect("put");
    let out = run(ifc(&server).args(["delete", "BAD"]));
    assert_eq!(code(&out), 4, "{out:?}");
    assert!(
        text(&out.stderr).contains("`ifc delete BAD --force` removes it"),
        "{}",
        text(&out.stderr)
    );
    let out = run(ifc(&server).args(["delete", "BAD", "--force"]));
    assert_eq!(code(&out), 0, "{out:?}");
    assert!(!all_keys(&server)
        .await
        .iter()
        .any(|k| k.ends_with("/BAD") || k == "tasks/BAD"));
}

#[test]
fn completion_scripts_and_a_man_page_are_printed() {
    // Issue 16: etcdctl and kubectl users expect both.
    let bin = env!("CARGO_BIN_EXE_ifc");
    for shell in ["bash", "zsh", "fish"] {
        let out = run(Command::new(bin).args(["completion", shell]));
        assert_eq!(code(&out), 0, "{shell}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("claim"), "{shell}");
    }
    let dir = tempfile::tempdir().expect("dir");
    let script = dir.path().join("ifc.bash");
    std::fs::write(
        &script,
        run(Command::new(bin).args(["completion", "bash"])).stdout,
    )
    .expect("write");
    let check = run(Command::new("bash").arg("-n").arg(&script));
    assert_eq!(code(&check), 0, "{}", text(&check.stderr));
    let out = run(Command::new(bin).arg("man"));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(".TH ifc 1"),
        "{}",
        text(&out.stdout)
    );
    // The pages the main one refers to (the tester's: `ifc-claim(1)` could not be had).
    let out = run(Command::new(bin).args(["man", "claim"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(
        page.contains(".TH ifc-claim 1") && page.contains("ttl"),
        "{page}"
    );
    let out = run(Command::new(bin).args(["man", "nope"]));
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
}

#[tokio::test]
async fn output_to_a_closed_pipe_ends_quietly() {
    // `ifc status | head -1` printed "error: Broken pipe" and exited 1: the reader had what it
    // wanted. The pipe's read end is closed before ifc starts, so its first write fails.
    let server = EtcdServer::start();
    assert_eq!(code(&run(ifc(&server).args(["put", "A"]))), 0);
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = ifc(&server)
        .arg("status")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("ifc runs");
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "nothing to report");
}

#[tokio::test]
async fn bad_input_exits_2_and_quotes_the_value() {
    let server = EtcdServer::start();
    for args in [
        vec!["claim", "bad id", "--session", "s"],
        vec!["claim", "T", "--session", "s;rm -rf /"],
        vec!["get", "../etc/passwd"],
        vec!["put", "T", "--blocked-by", "ok,not ok"],
    ] {
        let out = run(ifc(&server).args(&args));
        assert_eq!(code(&out), 2, "{args:?}: {out:?}");
        let bad = args
            .iter()
            .find(|a| a.contains(' ') || a.contains('/'))
            .expect("a bad value");
        let quoted = bad
            .split(',')
            .find(|p| p.contains(' ') || p.contains('/'))
            .expect("part");
        assert!(
            text(&out.stderr).contains(&format!("{quoted:?}")),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = run(ifc(&server).args([
        "--cacert",
        "/nonexistent/ca.pem",
        "--endpoints",
        "https://127.0.0.1:1",
        "status",
    ]));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(text(&out.stderr).contains("/nonexistent/ca.pem"));
    let out = run(ifc(&server).args(["put", "T", "--status", "claimed"]));
    assert_eq!(code(&out), 2);
    let out = run(ifc(&server).args(["--cacert", "Cargo.toml", "status"]));
    assert_eq!(
        code(&out),
        2,
        "TLS settings with an http:// endpoint: {out:?}"
    );
    assert!(text(&out.stderr).contains("HTTPS"), "{}", text(&out.stderr));
    let out = run(ifc(&server).args(["--endpoints", "localhost:2379", "status"]));
    assert_eq!(
        code(&out),
        2,
        "an endpoint without a scheme is a usage error: {out:?}"
    );
}

#[tokio::test]
async fn corrupt_records_are_reported_with_their_key_and_status_goes_on() {
    let server = EtcdServer::start();
    let mut raw = raw(&server).await;
    raw.put("tasks/GOOD", r#"{"status":"available"}"#, None)
        .await
        .expect("put");
    raw.put("tasks/BROKEN", "not json at all", None)
        .await
        .expect("put");
    let out = run(ifc(&server).args(["status"]));
    assert_eq!(code(&out), 4, "{out:?}");
    assert!(text(&out.stdout).contains("GOOD"));
    assert!(
        text(&out.stderr).contains("corrupt record at tasks/BROKEN"),
        "{}",
        text(&out.stderr)
    );
    let out = run(ifc(&server).args(["claim", "BROKEN", "--session", "s"]));
    assert_eq!(code(&out), 4, "{out:?}");
    assert!(text(&out.stderr).contains("tasks/BROKEN"));
    // The wrong shape (valid JSON) is corrupt too, and a claim of it writes nothing.
    raw.put("tasks/SHAPE", r#"{"status": 7, "blocked_by": "x"}"#, None)
        .await
        .expect("put");
    let out = run(ifc(&server).args(["claim", "SHAPE", "--session", "s"]));
    assert_eq!(code(&out), 4, "{out:?}");
    let kept = raw.get("tasks/SHAPE", None).await.expect("get");
    assert_eq!(
        kept.kvs()[0].value(),
        br#"{"status": 7, "blocked_by": "x"}"#,
        "nothing already stored is overwritten"
    );
    // A 1 MiB title is a task like any other.
    let big = "t".repeat(1 << 20);
    raw.put(
        "tasks/BIG",
        format!(r#"{{"status":"available","title":"{big}"}}"#),
        None,
    )
    .await
    .expect("put");
    let out = run(ifc(&server).args(["claim", "BIG", "--session", "s"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let out = run(ifc(&server).args(["get", "BIG", "-o", "json"]));
    let task: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(task["title"].as_str().map(str::len), Some(1 << 20));
}

#[test]
fn an_unreachable_endpoint_exits_3_naming_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = Command::new(env!("CARGO_BIN_EXE_ifc"))
        .args([
            "--endpoints",
            &endpoint,
            "--dial-timeout",
            "500ms",
            "status",
        ])
        .output()
        .expect("runs");
    assert_eq!(code(&out), 3, "{out:?}");
    assert!(
        text(&out.stderr).contains(&endpoint),
        "{}",
        text(&out.stderr)
    );
    // A port that accepts but never answers (a black hole) is bounded by the dial timeout too.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent = format!("http://{}", listener.local_addr().expect("addr"));
    let out = Command::new(env!("CARGO_BIN_EXE_ifc"))
        .args([
            "--endpoints",
            &silent,
            "--dial-timeout",
            "500ms",
            "get",
            "T",
        ])
        .output()
        .expect("runs");
    assert_eq!(code(&out), 3, "{out:?}");
    assert!(text(&out.stderr).contains(&silent), "{}", text(&out.stderr));
}

#[tokio::test]
async fn prefixes_keep_swarms_apart() {
    let server = EtcdServer::start();
    assert_eq!(
        code(&run(
            ifc(&server).args(["--prefix", "swarm-a/", "put", "P0.1"])
        )),
        0
    );
    let out = run(ifc(&server).args(["status", "-o", "json"]));
    assert_eq!(
        text(&out.stdout).trim(),
        "[]",
        "the default namespace does not see swarm-a's task"
    );
    let out = run(ifc(&server)
        .env("IFC_PREFIX", "swarm-a/")
        .args(["status", "-o", "json"]));
    let tasks: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(tasks.len(), 1);
    let mut raw = raw(&server).await;
    assert_eq!(
        raw.get("swarm-a/tasks/P0.1", None)
            .await
            .expect("get")
            .kvs()
            .len(),
        1
    );
}
