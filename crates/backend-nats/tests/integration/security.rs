//! Authentication against a real nats-server: a user and password it knows gets in; a wrong
//! password is refused (`Rejected`, not "unavailable"), and nothing is retried for ever.

use agent_core::{Backend, BackendError, TaskPatch, TaskStatus};
use backend_nats::testing::NatsServer;
use backend_nats::{NatsBackend, NatsConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_and_password_get_in_and_a_wrong_password_is_refused() {
    let server = NatsServer::start_with(&["--user", "ifc", "--pass", "s3cret"]);
    let with = |password: &str| NatsConfig {
        user: Some(("ifc".into(), password.into())),
        ..server.config(None)
    };
    let b = NatsBackend::connect(with("s3cret"))
        .await
        .expect("the right password");
    let patch = TaskPatch {
        status: Some(TaskStatus::Available),
        ..TaskPatch::default()
    };
    b.put(&agent_core::testing::tid("A"), &patch)
        .await
        .expect("put");
    let refused = NatsBackend::connect(with("wrong"))
        .await
        .expect_err("a wrong password");
    assert!(
        matches!(refused, BackendError::Rejected { .. }),
        "refused, not unavailable: {refused:?}"
    );
    let anonymous = NatsBackend::connect(server.config(None))
        .await
        .expect_err("no credentials");
    assert!(
        matches!(anonymous, BackendError::Rejected { .. }),
        "refused, not unavailable: {anonymous:?}"
    );
}
