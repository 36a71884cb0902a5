//! Where each setting comes from: a flag (or its `IFC_*` variable) over the session file over the
//! fleet file over the built-in default. Builds the etcd and git backend configs.

use std::time::Duration;

use agent_core::config::{FleetFile, Mode as FileMode, SessionFile};
use agent_core::{BackendError, SessionId};
use anyhow::Result;
use backend_etcd::{EtcdConfig, TlsFiles};
use backend_git::GitConfig;

use crate::cli::{Global, Mode};

/// The mode: `--mode`/`IFC_MODE` > session file > fleet file > coordinator.
pub fn mode(g: &Global, session: Option<&SessionFile>, fleet: Option<&FleetFile>) -> Result<Mode> {
    if let Some(m) = g.mode {
        return Ok(m);
    }
    let from_files = session
        .and_then(|s| s.mode)
        .or_else(|| fleet.and_then(|f| f.mode));
    match from_files {
        None | Some(FileMode::Coordinator) => Ok(Mode::Coordinator),
        Some(FileMode::Git) => Ok(Mode::Git),
        Some(FileMode::Hybrid) => Err(BackendError::InvalidInput(
            "mode hybrid is not available in this version: use coordinator or git".into(),
        )
        .into()),
    }
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
