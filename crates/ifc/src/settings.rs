//! Where each setting comes from: a flag (or its `IFC_*` variable) over the session file over the
//! fleet file over the built-in default. Builds the etcd and git backend configs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent_core::config::{mode_for, ConfigError, FleetFile, Mode, ModeSource, SessionFile};
use agent_core::router::{Router, RouterConfig};
use agent_core::{Backend, BackendError, SessionId};
use anyhow::{Context, Result};
use backend_etcd::{EtcdBackend, EtcdConfig, TlsFiles};
use backend_git::{GitBackend, GitConfig};

use crate::cli::Global;

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
    c
}

/// Whether git settings were given at all (flag, variable or fleet file).
pub fn git_configured(g: &Global, fleet: Option<&FleetFile>) -> bool {
    g.git.git_remote.is_some() || fleet.is_some_and(|f| f.git.remote.is_some())
}

/// Connects to etcd.
pub async fn open_etcd(
    g: &Global,
    fleet: Option<&FleetFile>,
    lease_ttl: Option<Duration>,
) -> Result<Arc<EtcdBackend>> {
    let config = etcd_config(g, fleet, lease_ttl)?;
    Ok(Arc::new(
        EtcdBackend::connect(config)
            .await
            .context("cannot connect to etcd")?,
    ))
}

/// Opens the git board (a clone named after `session`) for a one-shot command.
pub async fn open_git(
    g: &Global,
    fleet: Option<&FleetFile>,
    session: Option<&SessionId>,
) -> Result<Arc<GitBackend>> {
    open_git_for(g, fleet, session, false).await
}

/// Opens the git board; `agent`: for this agent process, whose claims only it may re-claim.
async fn open_git_for(
    g: &Global,
    fleet: Option<&FleetFile>,
    session: Option<&SessionId>,
    agent: bool,
) -> Result<Arc<GitBackend>> {
    let mut config = git_config(g, fleet, session)?;
    if agent {
        config.process = Some(agent_core::process::this_process().to_owned());
    }
    Ok(Arc::new(
        GitBackend::open(config)
            .await
            .context("cannot open the git task board")?,
    ))
}

/// The stores `mode` needs, behind a router. etcd is required in coordinator mode, git in git
/// mode; in hybrid git is required and an unreachable etcd is tolerated (the session starts on
/// git). With `both` (the agent, which may switch live) the other store is opened too when
/// configured; with `writes` (a one-shot claim, release or put) git is opened in coordinator
/// mode too while the fleet has a git side, so the command's claims are recorded there as an
/// agent's are.
/// configured.
pub async fn open_router(
    g: &Global,
    fleet: Option<&FleetFile>,
    session: Option<&SessionId>,
    lease_ttl: Option<Duration>,
    mode: Mode,
    both: bool,
    writes: bool,
) -> Result<(Router, Option<Arc<GitBackend>>)> {
    // An agent opens git whenever it is configured: to switch to it live (rollback), and, while
    // the fleet has a git side, to record its etcd claims there before they count.
    let git_side = !fleet.is_some_and(|f| f.git.retired);
    let want_git =
        mode != Mode::Coordinator || (git_configured(g, fleet) && (both || (writes && git_side)));
    let git = match want_git {
        true => Some(open_git_for(g, fleet, session, both).await?),
        false => None,
    };
    let etcd: Option<Arc<dyn Backend>> = match mode {
        Mode::Coordinator => Some(open_etcd(g, fleet, lease_ttl).await?),
        Mode::Git if !both => None,
        Mode::Git | Mode::Hybrid => match open_etcd(g, fleet, lease_ttl).await {
            Ok(e) => Some(e),
            Err(e) => {
                let transient = e
                    .downcast_ref::<BackendError>()
                    .is_some_and(BackendError::is_transient);
                if !transient {
                    return Err(e);
                }
                tracing::warn!(error = %format!("{e:#}"), "etcd is unreachable: starting on git only (restart to return to etcd)");
                None
            }
        },
    };
    let name = session.map_or_else(|| "ifc".to_owned(), |s| s.to_string());
    let config = router_config(&name, mode, fleet, both);
    let fallback = git.clone().map(|g| g as Arc<dyn Backend>);
    let router = Router::new(etcd, fallback, config)?;
    Ok((router, git))
}

/// The etcd backend settings; claims are leased with `lease_ttl`.
pub fn etcd_config(
    g: &Global,
    fleet: Option<&FleetFile>,
    lease_ttl: Option<Duration>,
) -> Result<EtcdConfig> {
    let file = fleet.map(|f| &f.etcd);
    let user = match &g.user {
        None => None,
        Some(spec) => Some(match spec.split_once(':') {
            Some((user, password)) => (user.to_owned(), password.to_owned()),
            None => {
                let password = std::env::var("IFC_PASSWORD").map_err(|_| {
                    BackendError::InvalidInput(format!(
                        "no password for etcd user {spec:?}: use --user {spec}:PASSWORD or set IFC_PASSWORD"
                    ))
                })?;
                (spec.clone(), password)
            }
        }),
    };
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
    Ok(EtcdConfig {
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
    })
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
    if let Some(dir) = &g.git.git_workdir {
        config.workdir = dir.clone();
    }
    config.session = session.cloned();
    Ok(config)
}
