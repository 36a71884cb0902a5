//! etcd authentication: the user and password are used, a wrong password is refused with a clear
//! error that does not contain it.

use agent_core::{Backend, BackendError, TaskId, TaskPatch};
use backend_etcd::testing::EtcdServer;
use backend_etcd::{EtcdBackend, EtcdConfig};

#[tokio::test]
async fn user_and_password_are_used_and_a_wrong_one_is_refused() {
    let server = EtcdServer::start();
    let mut raw = crate::raw_client(&server).await;
    raw.user_add("root", "s3cret-pw", None)
        .await
        .expect("add user");
    raw.user_grant_role("root", "root")
        .await
        .expect("grant root");
    raw.auth_enable().await.expect("enable auth");

    let with = |user: Option<(&str, &str)>| EtcdConfig {
        user: user.map(|(u, p)| (u.to_owned(), p.to_owned())),
        ..server.config()
    };
    let ok = crate::backend_with(with(Some(("root", "s3cret-pw"))), true).await;
    let id = TaskId::parse("AUTH-1").expect("valid");
    ok.put(&id, &TaskPatch::default())
        .await
        .expect("an authenticated put");
    assert!(ok.get(&id).await.expect("get").is_some());

    let err = EtcdBackend::connect(with(Some(("root", "wrong-pw"))))
        .await
        .expect_err("wrong password");
    assert!(matches!(err, BackendError::Rejected { .. }), "{err:?}");
    assert!(err.to_string().contains(&server.endpoint()), "{err}");
    assert!(
        !err.to_string().contains("wrong-pw"),
        "the password is never echoed: {err}"
    );
    assert!(
        !format!("{:?}", with(Some(("root", "wrong-pw")))).contains("wrong-pw"),
        "nor debug-printed"
    );

    let err = EtcdBackend::connect(with(None)).await.expect_err("no user");
    assert!(matches!(err, BackendError::Rejected { .. }), "{err:?}");
}
