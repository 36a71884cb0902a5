//! The binary on NATS JetStream, through the same end-to-end checks as on etcd: real processes
//! racing for tasks, real agents running a chained board, an agent killed with SIGKILL, a lease
//! revoked under a running task, and one session id run twice, against a real nats-server.

use agent_core::{Backend, TaskId, TaskPatch, TaskStatus};
use backend_nats::testing::NatsServer;
use backend_nats::NatsBackend;

use crate::agent::{
    kill_9_then_another_agent_takes_over, start_fenced, three_agents_run_the_chains, Workdir,
};
use crate::exclusive::{
    a_cli_claim_leaves_the_agents_run, a_killed_agents_claim_is_its_sessions_at_once,
    a_take_over_lets_the_running_task_finish_once, one_session_file_twice,
};

fn tid(id: &str) -> TaskId {
    TaskId::parse(id).expect("a valid id")
}

async fn client(server: &NatsServer) -> NatsBackend {
    NatsBackend::connect(server.config(None))
        .await
        .expect("connect")
}

/// Ten real processes race over 500 tasks, each in its own order: exactly one winner per task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_processes_race_over_five_hundred_tasks_with_exactly_one_winner_each() {
    let server = NatsServer::start();
    let ids: Vec<String> = (0..500).map(|i| format!("T{i:04}")).collect();
    let b = client(&server).await;
    let patch = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    for id in &ids {
        b.put(&tid(id), &patch).await.expect("seed");
    }
    crate::race(&server.url(), &ids);
}

#[test]
fn three_agents_complete_thirty_chained_tasks_exactly_once() {
    let (server, w) = (NatsServer::start(), Workdir::new());
    three_agents_run_the_chains(&server.url(), &w);
}

#[test]
fn kill_9_of_an_agent_kills_its_task_and_another_agent_takes_over() {
    let (server, w) = (NatsServer::start(), Workdir::new());
    kill_9_then_another_agent_takes_over(&server.url(), &w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_kills_the_task_and_it_is_not_reported_done() {
    let (server, w) = (NatsServer::start(), Workdir::new());
    let fenced = start_fenced(&server.url(), &w);
    let raw = client(&server).await;
    let lease = raw
        .lease_of(&tid("L"))
        .await
        .expect("read")
        .expect("the claim is leased");
    raw.revoke_lease(lease).await.expect("revoke");
    fenced.check(&w);
}

#[test]
fn two_agents_with_one_session_file_run_each_task_once_and_the_second_names_the_first() {
    let (server, w) = (NatsServer::start(), Workdir::new());
    one_session_file_twice(&server.url(), &w);
}

#[test]
fn a_cli_claim_for_a_session_whose_agent_runs_the_task_does_not_take_it() {
    let (server, w) = (NatsServer::start(), Workdir::new());
    a_cli_claim_leaves_the_agents_run(&server.url(), &w);
}

#[test]
fn a_claim_held_by_a_killed_agent_of_the_session_is_the_sessions_again_at_once() {
    let (server, w) = (NatsServer::start(), Workdir::new());
    a_killed_agents_claim_is_its_sessions_at_once(&server.url(), &w);
}

#[test]
fn a_take_over_stops_the_running_agent_which_finishes_its_task_and_claims_nothing_more() {
    // The tester's report (helper-11): on NATS the new agent took the old one's running task.
    let (server, w) = (NatsServer::start(), Workdir::new());
    a_take_over_lets_the_running_task_finish_once(&server.url(), &w);
}
