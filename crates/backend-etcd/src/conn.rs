//! The connection to etcd: building the clients (endpoints, TLS, auth, HTTP/2 keep-alive) and
//! running every call under a deadline, moving to the next member when one does not answer, with
//! errors mapped to the Backend's typed errors, each naming the endpoints.

use std::future::Future;
use std::time::Duration;

use agent_core::{BackendError, BackendResult};
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, GetResponse, Identity, TlsOptions, Txn,
    TxnResponse,
};

use crate::members::Members;

use crate::config::EtcdConfig;

/// The largest list or watch response read (gRPC's default is 4 MiB): one revision that deletes
/// a few thousand tasks, or the list of a board of tens of thousands, is larger than that, and a
/// watch that cannot read a revision would stop at it for good.
pub(crate) const MAX_RESPONSE: usize = 1 << 30;

/// When etcd stopped answering this process, and when it answered again.
#[derive(Debug, Default)]
struct Touch {
    cut_off: Option<std::time::Instant>,
    back: Option<std::time::Instant>,
}

/// A connected client plus what error messages need to name.
#[derive(Clone)]
pub(crate) struct Conn {
    members: std::sync::Arc<Members>,
    touch: std::sync::Arc<std::sync::Mutex<Touch>>,
    endpoints: String,
    /// With one endpoint a connect error is reported at once: there is nowhere else to go.
    several_endpoints: bool,
    request_timeout: Duration,
    /// The member last passed over (silent or unreachable), for a watch on it to move too.
    passed_over: std::sync::Arc<tokio::sync::watch::Sender<Option<usize>>>,
    /// etcd answered this client over the endpoints as given: a connection closed later is not
    /// a TLS port spoken to in plain HTTP, so errors no longer hint at it (a killed etcd did).
    answered_once: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Conn {
    /// Builds the client and checks that etcd answers within the dial timeout.
    pub async fn connect(cfg: &EtcdConfig) -> BackendResult<Conn> {
        let endpoints = cfg.endpoints.join(",");
        if cfg.endpoints.is_empty() {
            return Err(BackendError::InvalidInput("no etcd endpoints given".into()));
        }
        for e in &cfg.endpoints {
            check_endpoint(e)?;
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(cfg.dial_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &cfg.tls {
            let mut tls_options = TlsOptions::new();
            if let Some(ca) = &tls.ca {
                tls_options = tls_options.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => {
                    tls_options = tls_options.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                (None, None) => {}
                _ => {
                    return Err(BackendError::InvalidInput(
                        "--cert and --key go together".into(),
                    ))
                }
            }
            options = options.with_tls(tls_options);
        }
        if let Some((user, password)) = &cfg.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let conn = Conn {
            members: std::sync::Arc::new(Members::new(&cfg.endpoints, options)),
            touch: Default::default(),
            passed_over: std::sync::Arc::new(tokio::sync::watch::channel(None).0),
            endpoints,
            several_endpoints: cfg.endpoints.len() > 1,
            request_timeout: cfg.request_timeout,
            answered_once: Default::default(),
        };
        // One cheap read proves the cluster answers (and that auth works) before anything else.
        let tasks = format!("{}tasks/", cfg.prefix);
        conn.probe(&tasks, "connect", cfg.dial_timeout).await?;
        conn.answered_once
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(conn)
    }

    /// Counts the keys under `prefix` (the cheapest read a user allowed to read tasks may do).
    pub async fn probe(
        &self,
        prefix: &str,
        operation: &str,
        deadline: Duration,
    ) -> BackendResult<()> {
        let count_only = etcd_client::GetOptions::new()
            .with_count_only()
            .with_prefix();
        self.within(operation, deadline, |mut c| {
            let count_only = count_only.clone();
            async move { c.get(prefix, Some(count_only)).await }
        })
        .await
        .map(drop)
    }

    /// The comma-separated endpoints, for messages.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The deadline of one request.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Runs one transaction under the request deadline.
    pub async fn txn(&self, operation: &str, txn: Txn) -> BackendResult<TxnResponse> {
        self.call(operation, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// Reads `key` (with `options`: a prefix, a revision) under the request deadline, taking
    /// answers up to `MAX_RESPONSE`.
    pub async fn get(
        &self,
        operation: &str,
        key: &str,
        options: Option<GetOptions>,
    ) -> BackendResult<GetResponse> {
        self.call(operation, |c| {
            let (key, options) = (key.to_owned(), options.clone());
            async move {
                let mut kv = c.kv_client().max_decoding_message_size(MAX_RESPONSE);
                kv.get(key, options).await
            }
        })
        .await
    }

    /// Runs a read-only transaction under the request deadline. etcd before 3.5.5 panics when
    /// the client of a read-only transaction goes away while etcd applies it (etcd-io/etcd#14110:
    /// that apply runs under the request's context; seen here, a bench's cancelled read took
    /// down etcd 3.5.1), so such a request is never cancelled: past the deadline the caller
    /// gets `Timeout`, and the request runs to its end in the background, its answer dropped.
    pub async fn read_txn(&self, operation: &str, txn: Txn) -> BackendResult<TxnResponse> {
        self.call(operation, |c| {
            let txn = txn.clone();
            async move {
                let request = tokio::spawn(async move {
                    let mut kv = c.kv_client().max_decoding_message_size(MAX_RESPONSE);
                    kv.txn(txn).await
                });
                // Dropped at the deadline, the handle lets the request go on.
                request
                    .await
                    .unwrap_or_else(|e| Err(etcd_client::Error::IoError(std::io::Error::other(e))))
            }
        })
        .await
    }

    /// Runs `call` (given a client handle) under the request deadline.
    pub async fn call<T, F, Fut>(&self, operation: &str, call: F) -> BackendResult<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.within(operation, self.request_timeout, call).await
    }

    /// Runs `call` until it succeeds, fails in a way that may have reached etcd, or `deadline`
    /// passes. With several members, a member that does not answer within half the deadline, or
    /// cannot be reached, is passed over for a while and the call goes to the next one: a
    /// silent member (stopped, black-holed) is treated like a dead one. Every write ifc makes
    /// is a compare-and-swap or idempotent, so one that the silent member takes late changes
    /// nothing.
    pub async fn within<T, F, Fut>(
        &self,
        operation: &str,
        deadline: Duration,
        mut call: F,
    ) -> BackendResult<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(5);
        let result = loop {
            let remaining = deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                break Err(BackendError::Timeout {
                    endpoint: self.endpoints.clone(),
                    operation: operation.to_owned(),
                    after: deadline,
                });
            }
            let member = self.members.pick();
            let attempt = if self.several_endpoints {
                remaining.min(deadline / 2)
            } else {
                remaining
            };
            let members = &self.members;
            let answer = tokio::time::timeout(attempt, async {
                let client = members.client(member).await?;
                call(client).await
            })
            .await;
            let endpoint = self.members.endpoint(member);
            match answer {
                Ok(Ok(value)) => {
                    self.members.answered(member);
                    break Ok(value);
                }
                Ok(Err(e)) if self.several_endpoints && never_sent(&e) && !tls_problem(&e) => {
                    if self.members.avoid(member) {
                        self.passed_over.send_replace(Some(member));
                        tracing::info!(endpoint, operation, error = %e, "etcd member unreachable; using the next one");
                    }
                    tokio::time::sleep(pause.min(remaining)).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                // An election under way (a member hung or restarted): asked again within the
                // deadline (tester helper-1: `ifc status` failed "leader changed" while the
                // other members were electing). Every write is a compare-and-swap or
                // idempotent, so one that landed before the answer was lost changes nothing.
                Ok(Err(e)) if electing(&e) => {
                    tracing::debug!(endpoint, operation, error = %e, "etcd is electing a leader; asking again");
                    tokio::time::sleep(pause.min(remaining)).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Ok(Err(e)) => break Err(self.error(e)),
                Err(_) if self.several_endpoints => {
                    if self.members.avoid(member) {
                        self.passed_over.send_replace(Some(member));
                        tracing::warn!(endpoint, operation, after = ?attempt, "etcd member did not answer; using the next one");
                    }
                }
                Err(_) => {
                    break Err(BackendError::Timeout {
                        endpoint: self.endpoints.clone(),
                        operation: operation.to_owned(),
                        after: deadline,
                    })
                }
            }
        };
        self.heard(&result);
        result
    }

    /// The member calls go to now (a stream opened now is served by it).
    pub fn serving_member(&self) -> usize {
        self.members.pick()
    }

    /// Tells of each member passed over from now on (another call found it silent or
    /// unreachable): a stream it serves should be opened again elsewhere (the tester's report:
    /// a watch on a SIGSTOPped member delayed blocker wake-ups by 3-6 s while every other call
    /// had moved on).
    pub fn passed_over(&self) -> tokio::sync::watch::Receiver<Option<usize>> {
        self.passed_over.subscribe()
    }

    /// A call's stream (a watch) went silent: the member that serves calls is passed over for a
    /// while, so the stream is opened again elsewhere.
    pub fn serving_member_silent(&self) {
        if self.several_endpoints {
            let member = self.members.pick();
            if self.members.avoid(member) {
                tracing::warn!(
                    endpoint = self.members.endpoint(member),
                    "etcd member went silent; using the next one"
                );
            }
        }
    }

    /// Notes whether etcd answered (see `back_in_touch`).
    fn heard<T>(&self, result: &BackendResult<T>) {
        let mut touch = self.touch.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Err(e) if e.is_transient() => {
                touch.cut_off.get_or_insert_with(std::time::Instant::now);
            }
            Ok(_) if touch.cut_off.take().is_some() => {
                touch.back = Some(std::time::Instant::now());
            }
            _ => {}
        }
    }

    /// How long ago etcd answered this process again after not answering, if it did.
    pub fn back_in_touch(&self) -> Option<Duration> {
        let touch = self.touch.lock().unwrap_or_else(|p| p.into_inner());
        touch.back.map(|b| b.elapsed())
    }

    /// Maps a client error to the Backend's error kinds.
    pub fn error(&self, e: etcd_client::Error) -> BackendError {
        let tls_hint = !self
            .answered_once
            .load(std::sync::atomic::Ordering::Relaxed);
        classify(&self.endpoints, e, tls_hint)
    }
}

/// An endpoint URL that could never be reached is refused before anything is tried (the
/// tester's report: `http://127.0.0.1:99999` made an agent wait for ever).
fn check_endpoint(e: &str) -> BackendResult<()> {
    let bad = |why: &str| Err(BackendError::InvalidInput(format!("endpoint {e:?}: {why}")));
    let Some(rest) = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
    else {
        return bad("must start with http:// or https://");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    // The port follows the last ':' outside an IPv6 literal's brackets.
    let host_end = authority.rfind(']').map_or(0, |i| i + 1);
    let (host, port) = match authority[host_end..].rfind(':') {
        Some(i) => (
            &authority[..host_end + i],
            Some(&authority[host_end + i + 1..]),
        ),
        None => (authority, None),
    };
    if host.is_empty() {
        return bad("no host");
    }
    match port.map(|p| p.parse::<u16>()) {
        None | Some(Ok(1..)) => Ok(()),
        Some(_) => bad("the port must be a number from 1 to 65535"),
    }
}

fn read(path: &std::path::Path) -> BackendResult<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| BackendError::InvalidInput(format!("cannot read {}: {e}", path.display())))
}

/// `tls_hint`: a connection closed at once may be a TLS port spoken to in plain HTTP (only until
/// etcd has answered).
fn classify(endpoint: &str, e: etcd_client::Error, tls_hint: bool) -> BackendError {
    use etcd_client::Error as E;
    use tonic::Code;
    let endpoint = endpoint.to_owned();
    match e {
        E::GRpcStatus(status) => match status.code() {
            Code::PermissionDenied | Code::Unauthenticated => BackendError::Rejected {
                endpoint,
                reason: status.message().to_owned(),
            },
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                BackendError::Rejected {
                    endpoint,
                    reason: status.message().to_owned(),
                }
            }
            _ => {
                let reason = describe_status(&status);
                let reason = match tls_hint {
                    true => plain_to_tls_hint(&endpoint, reason),
                    false => reason,
                };
                match tls_refusal(&reason) {
                    Some(reason) => BackendError::Rejected { endpoint, reason },
                    None => BackendError::Unavailable { endpoint, reason },
                }
            }
        },
        E::InvalidArgs(reason) => BackendError::InvalidInput(format!("{endpoint}: {reason}")),
        E::InvalidUri(err) => {
            BackendError::InvalidInput(format!("{endpoint}: invalid endpoint URL: {err}"))
        }
        E::TransportError(t) => {
            // etcd-client's error has no source: tonic's does, and it says what failed.
            let reason = match tls_hint {
                true => plain_to_tls_hint(&endpoint, full_text(&t)),
                false => full_text(&t),
            };
            match tls_refusal(&reason) {
                Some(reason) => BackendError::Rejected { endpoint, reason },
                None => BackendError::Unavailable { endpoint, reason },
            }
        }
        other => {
            let reason = full_text(&other);
            match tls_refusal(&reason) {
                Some(reason) => BackendError::Rejected { endpoint, reason },
                None => BackendError::Unavailable { endpoint, reason },
            }
        }
    }
}

/// A plain endpoint whose connection ended before a word (a bare "transport error", a
/// cancelled or reset connection, an HTTP/2 protocol error), which is what a TLS port does to
/// plain HTTP/2 (the tester's: nothing said to try https://). Which of these words comes
/// depends on timing.
fn plain_to_tls_hint(endpoint: &str, reason: String) -> String {
    const EARLY_END: [&str; 5] = [
        "transport error",
        "operation was canceled",
        "connection reset",
        "h2 protocol error",
        "broken pipe",
    ];
    let ended_early =
        reason == "transport error" || EARLY_END[1..].iter().any(|w| reason.contains(w));
    if ended_early && endpoint.contains("http://") {
        format!("{reason} (closed at once: if etcd serves TLS there, use https:// and --cacert)")
    } else {
        reason
    }
}

/// Whether `e` says the cluster is between leaders (it answers again once one is elected).
fn electing(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::Unavailable
            && ["leader changed", "no leader"].iter().any(|m| status.message().contains(m)))
}

/// Whether `e` is a TLS failure (the same on every member: not worth trying the next).
fn tls_problem(e: &etcd_client::Error) -> bool {
    let text = match e {
        etcd_client::Error::TransportError(t) => full_text(t),
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    };
    tls_refusal(&text).is_some()
}

/// An error and its sources, `: `-joined, each said once (tonic's transport errors say
/// "transport error" and keep the reason in their sources).
fn full_text(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// A TLS failure that waiting will not cure, with what to do about it (`None`: not one).
fn tls_refusal(text: &str) -> Option<String> {
    let fix = if text.contains("UnsupportedCertVersion") {
        "a certificate is X.509 v1 (made without extensions, as `openssl x509 -req` does without -extfile), --cert's or etcd's; ifc's TLS library accepts only v3: reissue it with an -extfile (e.g. extendedKeyUsage=clientAuth for --cert, subjectAltName for etcd's)"
    } else if text.contains("UnknownIssuer") {
        "etcd's certificate is not signed by a CA ifc trusts: --cacert must name the CA that signed it"
    } else if text.contains("NotValidForName") {
        "etcd's certificate does not name the host of the endpoint: use a host its subjectAltName lists"
    } else if text.contains("BadCertificate") || text.contains("CertificateRequired") {
        "etcd refused the client certificate, or wants one: pass --cert and --key with one signed by a CA etcd trusts"
    } else if text.contains("KeyMismatch") {
        "--key is not the private key of --cert"
    } else if text.contains("invalid peer certificate")
        || text.contains("certificate") && text.contains("invalid")
    {
        "check --cacert, --cert and --key"
    } else if text.contains("tls handshake eof") {
        "is etcd serving TLS on that port? for a plain etcd use http://"
    } else {
        return None;
    };
    // rustls's reason reads as a Rust value: `Other(OtherError(UnsupportedCertVersion))`.
    let text = text.replace("Other(OtherError(", "").replace("))", "");
    Some(format!("TLS: {text} ({fix})"))
}

/// Whether the request failed before reaching any etcd member (so retrying it is always safe).
fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable && status.message().contains("connect")
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

fn describe_status(status: &tonic::Status) -> String {
    let message = status.message();
    if message.is_empty() {
        format!("{:?}", status.code())
    } else {
        message.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_that_could_never_be_reached_are_refused() {
        // The tester's report: `http://127.0.0.1:99999` made an agent wait for ever.
        for ok in [
            "http://127.0.0.1:2379",
            "https://etcd.example:2379/",
            "http://[::1]:2379",
            "http://localhost",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "127.0.0.1:2379",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:0",
            "http://127.0.0.1:x",
            "http://:2379",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_plain_endpoint_closed_before_a_word_hints_at_tls() {
        // Which words come depends on timing (CI saw "operation was canceled").
        for reason in [
            "transport error",
            "operation was canceled",
            "connection reset by peer",
        ] {
            let said = plain_to_tls_hint("http://127.0.0.1:1", reason.to_owned());
            assert!(said.contains("use https://"), "{said}");
        }
        let said = plain_to_tls_hint("https://127.0.0.1:1", "transport error".to_owned());
        assert!(!said.contains("use https://"), "{said}");
        let said = plain_to_tls_hint("http://127.0.0.1:1", "tcp connect error".to_owned());
        assert!(!said.contains("use https://"), "{said}");
    }

    #[test]
    fn an_election_is_waited_out() {
        let status =
            |code, msg: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        assert!(electing(&status(
            tonic::Code::Unavailable,
            "etcdserver: leader changed"
        )));
        assert!(electing(&status(
            tonic::Code::Unavailable,
            "etcdserver: no leader"
        )));
        assert!(!electing(&status(
            tonic::Code::Unavailable,
            "etcdserver: request timed out"
        )));
        assert!(!electing(&status(
            tonic::Code::PermissionDenied,
            "no leader"
        )));
    }

    #[test]
    fn tls_failures_say_what_to_do() {
        let r = tls_refusal("invalid peer certificate: UnknownIssuer").expect("a TLS refusal");
        assert!(r.contains("--cacert must name the CA"), "{r}");
        let r = tls_refusal("received fatal alert: BadCertificate").expect("a TLS refusal");
        assert!(r.contains("pass --cert and --key"), "{r}");
        let r = tls_refusal("invalid peer certificate: Other(OtherError(UnsupportedCertVersion))")
            .expect("a TLS refusal");
        assert!(r.contains("X.509 v1") && !r.contains("OtherError"), "{r}");
        assert_eq!(tls_refusal("tcp connect error"), None);
    }
}
