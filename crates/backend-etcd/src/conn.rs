//! The connection to etcd: building the client (endpoints, TLS, auth, HTTP/2 keep-alive) and
//! running every call under a deadline with errors mapped to the Backend's typed errors, each
//! naming the endpoints.

use std::future::Future;
use std::time::Duration;

use agent_core::{BackendError, BackendResult};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions, Txn, TxnResponse};

use crate::config::EtcdConfig;

/// A connected client plus what error messages need to name.
#[derive(Clone)]
pub(crate) struct Conn {
    client: Client,
    endpoints: String,
    request_timeout: Duration,
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
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(BackendError::InvalidInput(format!(
                    "endpoint {e:?} must start with http:// or https://"
                )));
            }
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
        let unavailable = |reason: String| BackendError::Unavailable {
            endpoint: endpoints.clone(),
            reason,
        };
        let client = tokio::time::timeout(
            cfg.dial_timeout,
            Client::connect(&cfg.endpoints, Some(options)),
        )
        .await
        .map_err(|_| BackendError::Timeout {
            endpoint: endpoints.clone(),
            operation: "connect".into(),
            after: cfg.dial_timeout,
        })?
        .map_err(|e| classify(&endpoints, e))
        .map_err(|e| match e {
            BackendError::InvalidInput(r) => unavailable(r),
            other => other,
        })?;
        let conn = Conn {
            client,
            endpoints,
            request_timeout: cfg.request_timeout,
        };
        // One cheap read proves the cluster answers (and that auth works) before anything else.
        let mut kv = conn.client.kv_client();
        let probe = etcd_client::GetOptions::new().with_count_only();
        conn.within("connect", cfg.dial_timeout, kv.get("\0", Some(probe)))
            .await?;
        Ok(conn)
    }

    /// The comma-separated endpoints, for messages.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// A clone of the raw client, for streams (watch, lease keep-alive).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Runs one transaction under the request deadline.
    pub async fn txn(&self, operation: &str, txn: Txn) -> BackendResult<TxnResponse> {
        let mut kv = self.client.kv_client();
        self.call(operation, kv.txn(txn)).await
    }

    /// Runs `call` under the request deadline.
    pub async fn call<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> BackendResult<T> {
        self.within(operation, self.request_timeout, call).await
    }

    async fn within<T>(
        &self,
        operation: &str,
        deadline: Duration,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> BackendResult<T> {
        match tokio::time::timeout(deadline, call).await {
            Ok(result) => result.map_err(|e| classify(&self.endpoints, e)),
            Err(_) => Err(BackendError::Timeout {
                endpoint: self.endpoints.clone(),
                operation: operation.to_owned(),
                after: deadline,
            }),
        }
    }

    /// Maps a client error to the Backend's error kinds.
    pub fn error(&self, e: etcd_client::Error) -> BackendError {
        classify(&self.endpoints, e)
    }
}

fn read(path: &std::path::Path) -> BackendResult<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| BackendError::InvalidInput(format!("cannot read {}: {e}", path.display())))
}

fn classify(endpoint: &str, e: etcd_client::Error) -> BackendError {
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
            _ => BackendError::Unavailable {
                endpoint,
                reason: describe_status(&status),
            },
        },
        E::InvalidArgs(reason) => BackendError::InvalidInput(format!("{endpoint}: {reason}")),
        E::InvalidUri(err) => {
            BackendError::InvalidInput(format!("{endpoint}: invalid endpoint URL: {err}"))
        }
        other => BackendError::Unavailable {
            endpoint,
            reason: other.to_string(),
        },
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
