//! Where each setting comes from: a flag (or its `IFC_*` variable) over the session file over the
//! fleet file over the built-in default. Builds the coordinator's (etcd or NATS) and git's
//! backend configs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent_core::config::{
    mode_for, ConfigError, FleetFile, Mode, ModeSource, SessionFile, StoreKind,
};
use agent_core::router::{Router, RouterConfig};
use agent_core::{Backend, BackendError, SessionId};
use anyhow::{Context, Result};
use backend_etcd::{EtcdBackend, EtcdConfig, TlsFiles};
use backend_git::{GitBackend, GitConfig};
use backend_nats::{NatsBackend, NatsConfig, NatsTls};

use crate::cli::{Global, Store};

/// What a config problem becomes: a usage error (exit 2) naming file, line and key.
pub fn config_error(e: ConfigError) -> anyhow::Error {
    BackendError::InvalidInput(e.to_string()).into()
}

/// The fleet file named by `--fleet`/`IFC_FLEET`, if any.
pub fn fleet(g: &Global) -> Result<Option<FleetFile>> {
    g.fleet
        .as_deref()
        .map(|p: &Path| FleetFile::load(p).map_err(config_error))
        .transpose()
}

/// The mode: the fleet file's `rollback: true` > `--mode`/`IFC_MODE` > session file > fleet
/// rollout > fleet `mode:` > coordinator.
pub fn mode(
    g: &Global,
    id: Option<&SessionId>,
    session: Option<&SessionFile>,
    fleet: Option<&FleetFile>,
) -> (Mode, ModeSource) {
    mode_for(id, g.mode.map(Mode::from), session, fleet)
}

/// The router's settings for `mode` from the fleet file's `hybrid:` and `bridge:` sections.
pub fn router_config(
    name: &str,
    mode: Mode,
    fleet: Option<&FleetFile>,
    agent: bool,
) -> RouterConfig {
    let mut c = RouterConfig::new(name, mode);
    if let Some(h) = fleet.map(|f| &f.hybrid) {
        c.deadline = h.deadline.map_or(c.deadline, |d| d.0);
        c.failures_to_open = h.failures_to_open.unwrap_or(c.failures_to_open);
        c.probe_initial = h.probe_initial.map_or(c.probe_initial, |d| d.0);
        c.probe_max = h.probe_max.map_or(c.probe_max, |d| d.0);
    }
    // One-shot commands leave mirroring to the agents and the bridge.
    c.mirror = agent && !fleet.is_some_and(|f| f.bridge.enabled);
    c.claims_in_git = !fleet.is_some_and(|f| f.git.retired);
    // Checked when the file was read.
    c.objective = fleet
        .and_then(|f| f.slo.as_ref())
        .and_then(|s| s.objective().ok());
    c
}

/// Whether git settings were given at all (flag, variable or fleet file).
pub fn git_configured(g: &Global, fleet: Option<&FleetFile>) -> bool {
    g.git.git_remote.is_some() || fleet.is_some_and(|f| f.git.remote.is_some())
}

/// Connects to etcd; an error says what to do next.
pub async fn connect_etcd(config: EtcdConfig) -> Result<EtcdBackend> {
    let prefix = config.prefix.clone();
    EtcdBackend::connect(config)
        .await
        .map_err(|e| etcd_error(e, &prefix))
}

/// The error of a failed connection to etcd, with the next step (issue 16: "cannot connect"
/// said nothing of what to try, and a user etcd's RBAC refuses was told it could not connect).
pub fn etcd_error(e: BackendError, prefix: &str) -> anyhow::Error {
    let next = match &e {
        BackendError::Rejected { reason, .. } if reason.contains("permission denied") => format!(
            "etcd answered but refuses this user the prefix {prefix:?}: grant the user a role with readwrite on it (`etcdctl role grant-permission ROLE --prefix readwrite '{prefix}'`), or use --prefix with one it may use"
        ),
        BackendError::Rejected { reason, .. } if reason.starts_with("TLS:") => {
            "cannot set up TLS with etcd".to_owned()
        }
        BackendError::Rejected { .. } => {
            "etcd answered but refused to let ifc in (check --user / IFC_PASSWORD and the TLS files)".to_owned()
        }
        e if e.is_transient() => "cannot connect to etcd (to try ifc, `ifc dev` runs one on 127.0.0.1:2379; --endpoints or IFC_ENDPOINTS names yours)".to_owned(),
        _ => "cannot connect to etcd".to_owned(),
    };
    anyhow::Error::new(e).context(next)
}

/// Connects to etcd, waiting for it as long as it does not answer (see `wait_for`).
pub async fn wait_for_etcd(
    config: EtcdConfig,
    quiet: bool,
    waiting: &(dyn Fn(&str) + Sync),
) -> Result<Arc<EtcdBackend>> {
    let endpoints = config.endpoints.join(",");
    let connect = || EtcdBackend::connect(config.clone());
    let prefix = config.prefix.clone();
    let etcd = wait_for("etcd", &endpoints, quiet, waiting, connect)
        .await
        .map_err(|e| etcd_error(e, &prefix))?;
    Ok(Arc::new(etcd))
}

/// Opens a store, waiting for it as long as it does not answer (an agent started during an
/// outage begins when its store does): one log line per attempt with where and the error,
/// `waiting` told the reason (for `/health`). An error waiting cannot cure (bad address, TLS,
/// refused login, not a task board) ends the wait at the first attempt; later ones (the store
/// came back misconfigured) are logged and tried again.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    at: &str,
    quiet: bool,
    waiting: &(dyn Fn(&str) + Sync),
    mut connect: F,
) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BackendError>>,
{
    let mut backoff =
        agent_core::retry::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut attempt = 1u64;
    loop {
        match connect().await {
            Ok(store) => {
                if attempt > 1 {
                    tracing::info!(at, attempt, "{what} answers");
                }
                return Ok(store);
            }
            Err(e) if attempt == 1 && !e.is_transient() => return Err(e),
            Err(e) => {
                // Jitter may take a delay past its cap: the README promises at most 10 s.
                let delay = backoff.next_delay().min(Duration::from_secs(10));
                waiting(&format!("waiting for {what} at {at}: {e}"));
                if quiet {
                    tracing::debug!(at, attempt, error = %e, retry_in = ?delay, "waiting for {what}");
                } else {
                    tracing::warn!(at, attempt, error = %e, retry_in = ?delay, "waiting for {what}");
                }
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

/// The coordinator store: `--store`/`IFC_STORE`, else the fleet file's `store:`, else NATS when
/// every endpoint given (flag, variable, or the fleet file's `nats:` or `etcd:` section) is a
/// `nats://` or `tls://` URL, else etcd.
pub fn store(g: &Global, fleet: Option<&FleetFile>) -> Store {
    if let Some(store) = g.store {
        return store;
    }
    match fleet.and_then(|f| f.store) {
        Some(StoreKind::Etcd) => return Store::Etcd,
        Some(StoreKind::Nats) => return Store::Nats,
        None => {}
    }
    let endpoints = g
        .endpoints
        .clone()
        .or_else(|| fleet.and_then(|f| f.nats.endpoints.clone()))
        .or_else(|| fleet.and_then(|f| f.etcd.endpoints.clone()))
        .unwrap_or_default();
    let nats = |e: &String| {
        let e = e.trim();
        e.starts_with("nats://") || e.starts_with("tls://")
    };
    if !endpoints.is_empty() && endpoints.iter().all(nats) {
        Store::Nats
    } else {
        Store::Etcd
    }
}

/// How to reach the coordinator store.
#[derive(Debug, Clone)]
pub enum CoordinatorConfig {
    Etcd(EtcdConfig),
    Nats(NatsConfig),
}

/// The coordinator's settings; claims are leased with `lease_ttl`. A command that does not
/// `write` does not create a missing NATS bucket (a mistyped `--bucket` would show an empty
/// board).
pub fn coordinator_config(
    g: &Global,
    fleet: Option<&FleetFile>,
    lease_ttl: Option<Duration>,
    writes: bool,
) -> Result<CoordinatorConfig> {
    Ok(match store(g, fleet) {
        Store::Etcd => CoordinatorConfig::Etcd(etcd_config(g, fleet, lease_ttl)?),
        Store::Nats => CoordinatorConfig::Nats(NatsConfig {
            create_bucket: writes,
            ..nats_config(g, fleet, lease_ttl)?
        }),
    })
}

/// Connects to the coordinator; an error says what to do next.
pub async fn connect_coordinator(config: CoordinatorConfig) -> Result<Arc<dyn Backend>> {
    Ok(match config {
        CoordinatorConfig::Etcd(c) => Arc::new(connect_etcd(c).await?),
        CoordinatorConfig::Nats(c) => Arc::new(NatsBackend::connect(c).await.map_err(nats_error)?),
    })
}

/// Opens the coordinator named by the flags and the fleet file for a command that works on it
/// directly (no lease: it claims nothing).
pub async fn coordinator(
    g: &Global,
    fleet: Option<&FleetFile>,
    writes: bool,
) -> Result<crate::coordinator::Coordinator> {
    use crate::coordinator::Coordinator;
    Ok(match coordinator_config(g, fleet, None, writes)? {
        CoordinatorConfig::Etcd(c) => Coordinator::Etcd(connect_etcd(c).await?),
        CoordinatorConfig::Nats(c) => {
            Coordinator::Nats(NatsBackend::connect(c).await.map_err(nats_error)?)
        }
    })
}

/// Connects to the coordinator named by the flags and the fleet file.
pub async fn open_coordinator(
    g: &Global,
    fleet: Option<&FleetFile>,
    lease_ttl: Option<Duration>,
    writes: bool,
) -> Result<Arc<dyn Backend>> {
    connect_coordinator(coordinator_config(g, fleet, lease_ttl, writes)?).await
}

/// Connects to the coordinator, waiting for it as long as it does not answer (see `wait_for`).
pub async fn wait_for_coordinator(
    config: CoordinatorConfig,
    quiet: bool,
    waiting: &(dyn Fn(&str) + Sync),
) -> Result<Arc<dyn Backend>> {
    match config {
        CoordinatorConfig::Etcd(c) => Ok(wait_for_etcd(c, quiet, waiting).await?),
        CoordinatorConfig::Nats(c) => {
            let at = c.endpoint();
            let connect = || NatsBackend::connect(c.clone());
            let nats = wait_for("NATS", &at, quiet, waiting, connect)
                .await
                .map_err(nats_error)?;
            Ok(Arc::new(nats))
        }
    }
}

/// The error of a failed connection to NATS, with the next step.
pub fn nats_error(e: BackendError) -> anyhow::Error {
    let next = match &e {
        BackendError::Rejected { .. } => {
            "NATS answered but refused to let ifc in (check --creds, --user / IFC_PASSWORD and the TLS files)"
        }
        e if e.is_transient() => {
            "cannot connect to NATS (to try ifc, `ifc dev --store nats` runs one on 127.0.0.1:4222; --endpoints or IFC_ENDPOINTS names yours)"
        }
        _ => "cannot use NATS",
    };
    anyhow::Error::new(e).context(next)
}

/// USER or USER:PASSWORD of `--user` (the password may come from `IFC_PASSWORD`).
fn user_and_password(g: &Global, store: &str) -> Result<Option<(String, String)>> {
    let Some(spec) = &g.user else {
        return Ok(None);
    };
    Ok(Some(match spec.split_once(':') {
        Some((user, password)) => (user.to_owned(), password.to_owned()),
        None => {
            let password = std::env::var("IFC_PASSWORD").map_err(|_| {
                BackendError::InvalidInput(format!(
                    "no password for {store} user {spec:?}: use --user {spec}:PASSWORD or set IFC_PASSWORD"
                ))
            })?;
            (spec.clone(), password)
        }
    }))
}

/// A deadline of 0 can only time out (the testers': `--request-timeout 0s`, and the same in
/// the fleet file, were exit 3 "timed out after 0ns").
fn check_deadlines(deadlines: [(&str, Duration); 2]) -> Result<()> {
    for (key, value) in deadlines {
        if value.is_zero() {
            return Err(BackendError::InvalidInput(format!(
                "the {key} is 0: a deadline must be longer than nothing (e.g. 500ms, 2s)"
            ))
            .into());
        }
    }
    Ok(())
}

/// The NATS backend settings; claims are leased with `lease_ttl` (rounded up to whole seconds,
/// as NATS message TTLs are).
pub fn nats_config(
    g: &Global,
    fleet: Option<&FleetFile>,
    lease_ttl: Option<Duration>,
) -> Result<NatsConfig> {
    if g.prefix.as_deref().is_some_and(|p| !p.is_empty()) {
        return Err(BackendError::InvalidInput(
            "--prefix (IFC_PREFIX) is an etcd key namespace; on NATS a board is a bucket: use \
             --bucket NAME (IFC_BUCKET) instead"
                .into(),
        )
        .into());
    }
    let file = fleet.map(|f| &f.nats);
    let defaults = NatsConfig::default();
    let servers: Vec<String> = g
        .endpoints
        .clone()
        .or_else(|| file.and_then(|f| f.endpoints.clone()))
        // Before the fleet file had a `nats:` section, `etcd.endpoints` named NATS servers.
        .or_else(|| fleet.and_then(|f| f.etcd.endpoints.clone()))
        .unwrap_or(defaults.servers.clone())
        .iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    let tls = (g.cacert.is_some() || g.cert.is_some()).then(|| NatsTls {
        ca: g.cacert.clone(),
        cert: g.cert.clone(),
        key: g.key.clone(),
    });
    let config = NatsConfig {
        servers,
        bucket: g
            .bucket
            .clone()
            .or_else(|| file.and_then(|f| f.bucket.clone()))
            .unwrap_or(defaults.bucket),
        replicas: g
            .replicas
            .or_else(|| file.and_then(|f| f.replicas))
            .map_or(defaults.replicas, usize::from),
        connect_timeout: g
            .dial_timeout
            .or_else(|| file.and_then(|f| f.dial_timeout.map(|d| d.0)))
            .unwrap_or(defaults.connect_timeout),
        request_timeout: g
            .request_timeout
            .or_else(|| file.and_then(|f| f.request_timeout.map(|d| d.0)))
            .unwrap_or(defaults.request_timeout),
        lease_ttl: lease_ttl.map(|t| Duration::from_secs(t.as_secs_f64().ceil().max(1.0) as u64)),
        creds: g
            .creds
            .clone()
            .or_else(|| file.and_then(|f| f.creds.clone())),
        user: user_and_password(g, "NATS")?,
        tls,
        event_queue_bound: defaults.event_queue_bound,
        create_bucket: defaults.create_bucket,
    };
    check_deadlines([
        (
            "dial timeout (--dial-timeout, nats.dial_timeout)",
            config.connect_timeout,
        ),
        (
            "request timeout (--request-timeout, nats.request_timeout)",
            config.request_timeout,
        ),
    ])?;
    Ok(config)
}

/// Opens the git board (a clone named after `session`) for a one-shot command.
pub async fn open_git(
    g: &Global,
    fleet: Option<&FleetFile>,
    session: Option<&SessionId>,
) -> Result<Arc<GitBackend>> {
    open_git_for(g, fleet, session, None).await
}

/// Opens the git board; with `agent` (this agent process, whose claims only it may re-claim)
/// a remote that does not answer is waited for.
async fn open_git_for(
    g: &Global,
    fleet: Option<&FleetFile>,
    session: Option<&SessionId>,
    agent: Option<&(dyn Fn(&str) + Sync)>,
) -> Result<Arc<GitBackend>> {
    let mut config = git_config(g, fleet, session)?;
    let git = match agent {
        Some(waiting) => {
            config.process = Some(agent_core::process::this_process().to_owned());
            let remote = config.remote.clone();
            let connect = || GitBackend::open(config.clone());
            wait_for("the git remote", &remote, false, waiting, connect).await
        }
        None => {
            config.one_shot = true;
            GitBackend::open(config).await
        }
    };
    Ok(Arc::new(git.context("cannot open the git task board")?))
}

/// Who opens the stores.
#[derive(Clone, Copy)]
pub enum Purpose<'a> {
    /// A long-running process (the agent, which may switch stores live; `ifc ui`): both stores
    /// are opened when configured, and etcd is waited for (`waiting` is told why, for `/health`).
    Agent { waiting: &'a (dyn Fn(&str) + Sync) },
    /// A one-shot command; `writes`: a claim, release or put.
    Command { writes: bool },
}

/// The stores `mode` needs, behind a router. etcd is required in coordinator mode (an agent
/// waits for it), git in git mode; in hybrid git is required and an unreachable etcd is
/// tolerated: the session starts on git and moves to etcd once it answers. With `both` (the
/// agent, which may switch live) the other store is opened too when configured; with `writes`
/// (a one-shot claim, release or put) git is opened in coordinator mode too while the fleet has
/// a git side, so the command's claims are recorded there as an agent's are.
pub async fn open_router(
    g: &Global,
    fleet: Option<&FleetFile>,
    session: Option<&SessionId>,
    lease_ttl: Option<Duration>,
    mode: Mode,
    purpose: Purpose<'_>,
) -> Result<(Router, Option<Arc<GitBackend>>)> {
    let (both, writes, waiting) = match purpose {
        Purpose::Agent { waiting } => (true, false, Some(waiting)),
        Purpose::Command { writes } => (false, writes, None),
    };
    // An agent opens git whenever it is configured: to switch to it live (rollback), and, while
    // the fleet has a git side, to record its etcd claims there before they count.
    let git_side = !fleet.is_some_and(|f| f.git.retired);
    let want_git =
        mode != Mode::Coordinator || (git_configured(g, fleet) && (both || (writes && git_side)));
    let git = match want_git {
        true => Some(open_git_for(g, fleet, session, waiting).await?),
        false => None,
    };
    let mut later = None;
    let etcd: Option<Arc<dyn Backend>> = match mode {
        Mode::Coordinator if both => {
            let config = coordinator_config(g, fleet, lease_ttl, true)?;
            Some(wait_for_coordinator(config, false, waiting.unwrap_or(&|_| {})).await?)
        }
        Mode::Coordinator => Some(open_coordinator(g, fleet, lease_ttl, writes || both).await?),
        Mode::Git if !both => None,
        Mode::Git | Mode::Hybrid => {
            match open_coordinator(g, fleet, lease_ttl, writes || both).await {
                Ok(e) => Some(e),
                Err(e) => {
                    let transient = e
                        .downcast_ref::<BackendError>()
                        .is_some_and(BackendError::is_transient);
                    if !transient {
                        return Err(e);
                    }
                    // A git session only needs the coordinator if its mode changes: no warning.
                    let coordinator = match store(g, fleet) {
                        Store::Etcd => "etcd",
                        Store::Nats => "NATS",
                    };
                    match (mode, both) {
                        (Mode::Hybrid, true) => {
                            tracing::warn!(error = %format!("{e:#}"), "{coordinator} is unreachable: starting on git, moving to {coordinator} once it answers")
                        }
                        (Mode::Hybrid, false) => {
                            tracing::warn!(error = %format!("{e:#}"), "{coordinator} is unreachable: this command goes to git")
                        }
                        _ => {
                            tracing::debug!(error = %format!("{e:#}"), "{coordinator} is unreachable (needed only if this session's mode changes)")
                        }
                    }
                    if both {
                        later = Some(coordinator_config(g, fleet, lease_ttl, true)?);
                    }
                    None
                }
            }
        }
    };
    let name = session.map_or_else(|| "ifc".to_owned(), |s| s.to_string());
    let config = router_config(&name, mode, fleet, both);
    let fallback = git.clone().map(|g| g as Arc<dyn Backend>);
    let router = Router::new(etcd, fallback, config)?;
    if let Some(config) = later {
        let quiet = mode == Mode::Git;
        router.attach_coordinator(async move {
            loop {
                match wait_for_coordinator(config.clone(), quiet, &|_| {}).await {
                    Ok(coordinator) => return coordinator,
                    // Only the first attempt's errors end the wait, and that one was transient.
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "cannot connect to the coordinator");
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                }
            }
        });
    }
    Ok((router, git))
}

/// The etcd backend settings; claims are leased with `lease_ttl`.
pub fn etcd_config(
    g: &Global,
    fleet: Option<&FleetFile>,
    lease_ttl: Option<Duration>,
) -> Result<EtcdConfig> {
    let file = fleet.map(|f| &f.etcd);
    let user = user_and_password(g, "etcd")?;
    let tls = (g.cacert.is_some() || g.cert.is_some()).then(|| TlsFiles {
        ca: g.cacert.clone(),
        cert: g.cert.clone(),
        key: g.key.clone(),
    });
    let defaults = EtcdConfig::default();
    let endpoints = g
        .endpoints
        .clone()
        .or_else(|| file.and_then(|f| f.endpoints.clone()))
        .unwrap_or(defaults.endpoints.clone());
    let config = EtcdConfig {
        endpoints: endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect(),
        prefix: g
            .prefix
            .clone()
            .or_else(|| file.and_then(|f| f.prefix.clone()))
            .unwrap_or_default(),
        dial_timeout: g
            .dial_timeout
            .or_else(|| file.and_then(|f| f.dial_timeout.map(|d| d.0)))
            .unwrap_or(defaults.dial_timeout),
        request_timeout: g
            .request_timeout
            .or_else(|| file.and_then(|f| f.request_timeout.map(|d| d.0)))
            .unwrap_or(defaults.request_timeout),
        lease_ttl,
        tls,
        user,
        ..defaults
    };
    check_deadlines([
        (
            "dial timeout (--dial-timeout, etcd.dial_timeout)",
            config.dial_timeout,
        ),
        (
            "request timeout (--request-timeout, etcd.request_timeout)",
            config.request_timeout,
        ),
    ])?;
    Ok(config)
}

/// The git backend settings; the clone is named after `session`.
pub fn git_config(
    g: &Global,
    fleet: Option<&FleetFile>,
    session: Option<&SessionId>,
) -> Result<GitConfig> {
    let file = fleet.map(|f| &f.git);
    let remote = g.git.git_remote.clone().or_else(|| file.and_then(|f| f.remote.clone())).ok_or_else(|| {
        BackendError::InvalidInput("git mode needs the coordination repo: --git-remote URL (or IFC_GIT_REMOTE, or git.remote in the fleet file)".into())
    })?;
    let name = session.map_or_else(|| "ifc-cli".to_owned(), |s| s.to_string());
    let mut config = GitConfig::new(remote, &name);
    if let Some(branch) = g
        .git
        .git_branch
        .clone()
        .or_else(|| file.and_then(|f| f.branch.clone()))
    {
        config.branch = branch;
    }
    if let Some(board) = g
        .git
        .board
        .clone()
        .or_else(|| file.and_then(|f| f.board.clone()))
    {
        config.board = board;
    }
    if let Some(dir) = file.and_then(|f| f.status_dir.clone()) {
        config.status_dir = dir;
    }
    config.poll_interval = g
        .git
        .poll_interval
        .or_else(|| file.and_then(|f| f.poll_interval.map(|d| d.0)))
        .unwrap_or(config.poll_interval);
    config.stale_after = g
        .git
        .stale_after
        .or_else(|| file.and_then(|f| f.stale_after.map(|d| d.0)))
        .unwrap_or(config.poll_interval * 10);
    // A zero poll interval panicked a timer; a stale-after shorter than a heartbeat can land
    // made every claim stale at once, so a session ran a task it had already lost (tester
    // helper-3).
    if config.poll_interval.is_zero() {
        return Err(BackendError::InvalidInput(
            "the git poll interval (--poll-interval, git.poll_interval) is 0: give one of 10ms or more".into(),
        )
        .into());
    }
    if config.stale_after < Duration::from_secs(1) {
        return Err(BackendError::InvalidInput(format!(
            "the git stale-after (--stale-after, git.stale_after) is {:?}: a claim's heartbeat must have a second at least to land",
            config.stale_after
        ))
        .into());
    }
    match &g.git.git_workdir {
        Some(dir) => config.workdir = dir.clone(),
        None => config.follow_remote(),
    }
    config.session = session.cloned();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn global(args: &[&str]) -> Global {
        let mut argv = vec!["ifc"];
        argv.extend(args);
        argv.push("status");
        crate::cli::Cli::try_parse_from(argv).expect("args").global
    }

    fn fleet(yaml: &str) -> FleetFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("coordinator.yaml");
        std::fs::write(&path, yaml).expect("write");
        FleetFile::load(&path).expect("a valid fleet file")
    }

    #[test]
    fn the_store_comes_from_the_flag_then_the_fleet_file_then_the_endpoints() {
        let nats_file = fleet(
            "store: nats\nnats:\n  endpoints: [nats://n1:4222]\n  bucket: team\n  replicas: 3\n",
        );
        assert_eq!(store(&global(&[]), None), Store::Etcd);
        assert_eq!(store(&global(&[]), Some(&nats_file)), Store::Nats);
        assert_eq!(
            store(&global(&["--store", "etcd"]), Some(&nats_file)),
            Store::Etcd
        );
        assert_eq!(
            store(
                &global(&["--endpoints", "nats://a:4222,tls://b:4222"]),
                None
            ),
            Store::Nats
        );
        assert_eq!(
            store(
                &global(&["--endpoints", "nats://a:4222,http://b:2379"]),
                None
            ),
            Store::Etcd,
            "a mix is etcd's, which then says what is wrong with the nats:// one"
        );
        let inferred = fleet("nats:\n  endpoints: [nats://n1:4222]\n");
        assert_eq!(store(&global(&[]), Some(&inferred)), Store::Nats);
        let c = nats_config(
            &global(&[]),
            Some(&nats_file),
            Some(Duration::from_millis(2500)),
        )
        .expect("config");
        assert_eq!(
            (c.servers, c.bucket.as_str(), c.replicas, c.lease_ttl),
            (
                vec!["nats://n1:4222".to_owned()],
                "team",
                3,
                Some(Duration::from_secs(3))
            )
        );
        let c =
            nats_config(&global(&["--bucket", "mine"]), Some(&nats_file), None).expect("config");
        assert_eq!(c.bucket, "mine", "a flag beats the fleet file");
    }
}
