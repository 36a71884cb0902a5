//! Security end to end: etcd over TLS with client certificates (a throwaway CA made with
//! `openssl`, a real etcd that requires client certificates, `ifc --cacert/--cert/--key`; without
//! a client certificate or a trusted CA the command fails naming the endpoint, exit 3), and a
//! password (flag or `IFC_PASSWORD`) that never shows in output or logs, even at trace level;
//! and NATS over TLS with client certificates.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{code, run, text};

/// The flags of a client with the certificates `make_certs` made.
const CLIENT_TLS: [&str; 6] = [
    "--cacert",
    "ca.crt",
    "--cert",
    "client.crt",
    "--key",
    "client.key",
];

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (Debian package openssl; scripts/install-deps installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        text(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn make_certs(dir: &Path) {
    let day = ["-days", "2"];
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=ifc-test-ca",
            day[0],
            day[1],
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for who in ["server", "client"] {
        let (key, csr, crt, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.crt"),
            format!("{who}.ext"),
        );
        let cn = format!("/CN=ifc-test-{who}");
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &cn,
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-extfile",
                &ext,
                day[0],
                day[1],
            ],
        );
    }
}

fn ifc(dir: &Path, endpoint: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ifc"));
    cmd.current_dir(dir)
        .env("IFC_ENDPOINTS", endpoint)
        .env_remove("IFC_MODE")
        .env_remove("IFC_PREFIX");
    cmd
}

#[test]
fn tls_with_client_certificates_works_and_a_missing_certificate_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    make_certs(d);
    let etcd = backend_etcd::testing::EtcdServer::start_tls(backend_etcd::testing::ServerTls {
        cert: d.join("server.crt"),
        key: d.join("server.key"),
        ca: d.join("ca.crt"),
    });
    let endpoint = etcd.endpoint();
    let tls = CLIENT_TLS;
    // etcd may take a moment after it listens.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = run(ifc(d, &endpoint)
            .args(tls)
            .args(["put", "TLS-1", "--title", "over tls"]));
        if code(&out) == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = run(ifc(d, &endpoint)
        .args(tls)
        .args(["claim", "TLS-1", "--session", "s-tls"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let out = run(ifc(d, &endpoint)
        .args(tls)
        .args(["get", "TLS-1", "-o", "json"]));
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(task["claimed_by"], "s-tls");

    // No client certificate: refused, naming the endpoint and what to pass (the tester's:
    // it suggested `ifc dev`), exit 3.
    let out = run(ifc(d, &endpoint).args(["--cacert", "ca.crt", "get", "TLS-1"]));
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&endpoint)
            && text(&out.stderr).contains("pass --cert and --key")
            && !text(&out.stderr).contains("ifc dev"),
        "{}",
        text(&out.stderr)
    );
    // No trusted CA: the server's certificate is not accepted, and the error says what to do.
    let out = run(ifc(d, &endpoint).args([
        "--cert",
        "client.crt",
        "--key",
        "client.key",
        "get",
        "TLS-1",
    ]));
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--cacert must name the CA that signed it"),
        "{}",
        text(&out.stderr)
    );
    // An agent does not wait for what waiting cannot cure (tester helper-1: it waited for ever).
    std::fs::write(
        d.join("s.yaml"),
        "session_id: s-tls\ntasks: [TLS-1]\ncommand: [/bin/true]\n",
    )
    .expect("session file");
    let out = run(ifc(d, &endpoint).args([
        "--cert",
        "client.crt",
        "--key",
        "client.key",
        "agent",
        "--config",
        "s.yaml",
    ]));
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    // Issue 16: a client certificate made without extensions is X.509 v1; etcdctl takes it,
    // ifc's TLS library does not, and said only "transport error: transport error".
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client-v1.crt",
            "-days",
            "2",
        ],
    );
    let out = run(ifc(d, &endpoint).args([
        "--cacert",
        "ca.crt",
        "--cert",
        "client-v1.crt",
        "--key",
        "client.key",
        "get",
        "TLS-1",
    ]));
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("X.509 v1") && text(&out.stderr).contains("reissue it"),
        "{}",
        text(&out.stderr)
    );
    // Plain HTTP to a TLS port: a clear failure too, not a hang.
    let plain = endpoint.replace("https://", "http://");
    let out = run(ifc(d, &plain).args(["--dial-timeout", "2s", "get", "TLS-1"]));
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&plain), "{}", text(&out.stderr));
    // Tester helper-3: nothing said to try https://.
    assert!(
        text(&out.stderr).contains("use https://"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn a_password_never_shows_in_logs_errors_or_json_even_at_trace_level() {
    let server = backend_etcd::testing::EtcdServer::start();
    let mut raw = crate::raw(&server).await;
    raw.user_add("root", "s3cret-pw", None).await.expect("user");
    raw.user_grant_role("root", "root").await.expect("role");
    raw.auth_enable().await.expect("auth");
    let dir = tempfile::tempdir().expect("temp dir");
    let e = server.endpoint();
    for (user, expect) in [("root:s3cret-pw", 0), ("root:wrong-s3cret-pw", 3)] {
        let out = run(ifc(dir.path(), &e)
            .env("RUST_LOG", "trace")
            .args(["--user", user, "put", "SEC-1", "-o", "json"]));
        assert_eq!(code(&out), expect, "{}", text(&out.stderr));
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!all.contains("s3cret-pw"), "the password leaked:\n{all}");
    }
    // From the environment too.
    let out = run(ifc(dir.path(), &e)
        .env("RUST_LOG", "trace")
        .env("IFC_PASSWORD", "s3cret-pw")
        .args(["--user", "root", "status", "-o", "json"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!all.contains("s3cret-pw"), "the password leaked:\n{all}");
}

#[tokio::test]
async fn a_user_rbac_keeps_off_a_prefix_is_told_so_not_that_etcd_is_unreachable() {
    // Issue 16: such a user was told "cannot connect to etcd": it had connected.
    let server = backend_etcd::testing::EtcdServer::start();
    let mut raw = crate::raw(&server).await;
    raw.user_add("root", "rootpw", None).await.expect("root");
    raw.user_grant_role("root", "root")
        .await
        .expect("root role");
    raw.role_add("team-a").await.expect("role");
    raw.role_grant_permission(
        "team-a",
        etcd_client::Permission::read_write("team-a/").with_prefix(),
    )
    .await
    .expect("permission");
    raw.user_add("alice", "alicepw", None).await.expect("alice");
    raw.user_grant_role("alice", "team-a")
        .await
        .expect("alice role");
    raw.auth_enable().await.expect("auth");
    let dir = tempfile::tempdir().expect("temp dir");
    let e = server.endpoint();
    let out = run(ifc(dir.path(), &e).args([
        "--user",
        "alice:alicepw",
        "--prefix",
        "team-a/",
        "put",
        "A",
    ]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let out =
        run(ifc(dir.path(), &e).args(["--user", "alice:alicepw", "--prefix", "team-b/", "status"]));
    let err = text(&out.stderr);
    assert_eq!(code(&out), 3, "{err}");
    assert!(
        err.contains("etcd answered but refuses this user the prefix \"team-b/\"")
            && !err.contains("cannot connect"),
        "{err}"
    );
}

#[test]
fn nats_over_tls_with_client_certificates_works_and_a_missing_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    make_certs(d);
    let path = |f: &str| d.join(f).to_string_lossy().into_owned();
    let (cert, key, ca) = (path("server.crt"), path("server.key"), path("ca.crt"));
    let server = backend_nats::testing::NatsServer::start_with(&[
        "--tlsverify",
        "--tlscert",
        &cert,
        "--tlskey",
        &key,
        "--tlscacert",
        &ca,
    ]);
    let endpoint = server.url().replacen("nats://", "tls://", 1);
    let tls = CLIENT_TLS;
    let out = run(ifc(d, &endpoint)
        .args(tls)
        .args(["put", "TLS-1", "--title", "over tls"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let out = run(ifc(d, &endpoint)
        .args(tls)
        .args(["claim", "TLS-1", "--session", "s-tls"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    // Without a client certificate the server refuses the connection: nothing read or written.
    let out = run(ifc(d, &endpoint).args(["--cacert", "ca.crt", "get", "TLS-1"]));
    assert_ne!(code(&out), 0, "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains(&endpoint),
        "{}",
        text(&out.stderr)
    );
    let out = run(ifc(d, &endpoint)
        .args(tls)
        .args(["get", "TLS-1", "-o", "json"]));
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(task["claimed_by"], "s-tls");
}
