//! The command line: every flag, its environment twin and its help text. Parsing only; the
//! commands live in `cmd`.

use std::path::PathBuf;
use std::time::Duration;

use agent_core::duration::parse_duration;
use agent_core::{SessionId, TaskId, TaskStatus};
use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  a normal \"no\": claim lost, task not claimable or not found, not the holder
  2  bad input: usage, an invalid task or session id, an unreadable file
  3  infrastructure: the store (etcd, NATS, git) unreachable, timed out or refusing (names the endpoint)
  4  corrupt data: a stored record is not a valid task (names its key)
  5  the session id is live in another process (ifc agent; names its pid and host)

Environment: every global flag has its twin, shown in its help ([env: IFC_…]): IFC_STORE,
IFC_ENDPOINTS, IFC_PREFIX, IFC_BUCKET, IFC_REPLICAS, IFC_CREDS, IFC_OUTPUT, IFC_MODE, IFC_FLEET, IFC_HISTORY, IFC_DIAL_TIMEOUT, IFC_REQUEST_TIMEOUT,
IFC_CACERT, IFC_CERT, IFC_KEY, IFC_USER, IFC_PASSWORD, IFC_LOG_FORMAT, IFC_GIT_REMOTE,
IFC_GIT_BRANCH, IFC_BOARD, IFC_POLL_INTERVAL, IFC_STALE_AFTER, IFC_GIT_WORKDIR; a flag beats its
variable. RUST_LOG sets the log level (default warn; info for `ifc agent`).";

/// ifc (IF.coordinator): claim, run and complete tasks from a shared task board over etcd.
#[derive(Debug, Parser)]
#[command(name = "ifc", version, about, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    // Declared before the flattened flags: the git ones end with their own heading, which
    // would take it in.
    /// Log format on stderr
    #[arg(long, env = "IFC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes. Settings a fleet file can also give are optional here: a flag (or
/// its `IFC_*` variable) overrides the file, and the file overrides the built-in default.
#[derive(Debug, Args)]
pub struct Global {
    /// Where tasks live: etcd (coordinator), the git task board (git), or etcd with git as the
    /// fallback (hybrid). Overrides the session and fleet files (but not the fleet file's
    /// `rollback: true`) [default: the fleet file's rollout, else coordinator]
    #[arg(long, env = "IFC_MODE", value_enum, global = true)]
    pub mode: Option<Mode>,

    /// Append every claim won, task run, release and fencing to this JSON-lines file (agents;
    /// claim, release and put record theirs too; any number of processes may share one); `ifc
    /// check-history` verifies it
    #[arg(long, env = "IFC_HISTORY", value_name = "FILE", global = true)]
    pub history: Option<PathBuf>,

    /// The fleet file (config/coordinator.yaml): mode, rollout, rollback, etcd, git, hybrid and
    /// bridge settings; flags and IFC_* variables override it
    #[arg(long, env = "IFC_FLEET", global = true)]
    pub fleet: Option<PathBuf>,

    /// The coordinator store: etcd (3.5+), or NATS JetStream (2.11+, a key-value bucket)
    /// [default: nats when every endpoint is a nats:// or tls:// URL, else etcd]
    #[arg(long, env = "IFC_STORE", value_enum, global = true)]
    pub store: Option<Store>,

    /// The coordinator's URLs, comma-separated: etcd client URLs (a cluster: every member), or
    /// NATS server URLs (nats://HOST:4222) [default: http://127.0.0.1:2379, or
    /// nats://127.0.0.1:4222 with --store nats]
    #[arg(long, env = "IFC_ENDPOINTS", value_delimiter = ',', global = true)]
    pub endpoints: Option<Vec<String>>,

    /// NATS: the key-value bucket holding tasks, leases and sessions (created if missing)
    /// [default: ifc]
    #[arg(long, env = "IFC_BUCKET", global = true)]
    pub bucket: Option<String>,

    /// NATS: replicas of the bucket when ifc creates it (3 on a 3-node JetStream cluster)
    /// [default: 1]
    #[arg(long, env = "IFC_REPLICAS", global = true, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: Option<u8>,

    /// NATS: a credentials file (JWT and NKey seed), as `nats --creds` takes it
    #[arg(long, env = "IFC_CREDS", global = true)]
    pub creds: Option<PathBuf>,

    /// Key namespace: tasks live at <PREFIX>tasks/<id> [default: "", the migration guide's keys]
    #[arg(long, env = "IFC_PREFIX", global = true)]
    pub prefix: Option<String>,

    /// Output format
    #[arg(long, short = 'o', env = "IFC_OUTPUT", value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,

    /// How long to wait for etcd to answer when connecting (e.g. 2s, 500ms) [default: 2s]
    #[arg(long, env = "IFC_DIAL_TIMEOUT", value_parser = parse_duration, global = true)]
    pub dial_timeout: Option<Duration>,

    /// Deadline of each request to etcd [default: 1s]
    #[arg(long, env = "IFC_REQUEST_TIMEOUT", value_parser = parse_duration, global = true)]
    pub request_timeout: Option<Duration>,

    /// CA bundle to verify etcd's TLS certificate (PEM)
    #[arg(long, env = "IFC_CACERT", global = true)]
    pub cacert: Option<PathBuf>,

    /// Client certificate for TLS (PEM; with --key)
    #[arg(long, env = "IFC_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,

    /// Client key for TLS (PEM; with --cert)
    #[arg(long, env = "IFC_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,

    /// etcd user, as USER or USER:PASSWORD (the password may instead come from IFC_PASSWORD)
    #[arg(long, env = "IFC_USER", global = true, hide_env_values = true)]
    pub user: Option<String>,

    #[command(flatten)]
    pub git: GitArgs,
}

/// Settings of git mode.
#[derive(Debug, Args)]
#[command(next_help_heading = "Git mode")]
pub struct GitArgs {
    /// The coordination repo: a path, file://, ssh or https URL
    #[arg(long, env = "IFC_GIT_REMOTE", global = true)]
    pub git_remote: Option<String>,

    /// The branch sessions coordinate on [default: main]
    #[arg(long, env = "IFC_GIT_BRANCH", global = true)]
    pub git_branch: Option<String>,

    /// The task board: its path in the coordination repo (git mode), or the file `migrate`,
    /// `verify` and `export` read and write [default: docs/PHASE-0-TASK-BOARD.md]
    #[arg(long, env = "IFC_BOARD", global = true)]
    pub board: Option<String>,

    /// How often a session fetches the remote (at once on change for a local remote) [default: 30s]
    #[arg(long, env = "IFC_POLL_INTERVAL", value_parser = parse_duration, global = true)]
    pub poll_interval: Option<Duration>,

    /// A claim whose owner's STATUS heartbeat is older than this is free [default: 10 × poll interval]
    #[arg(long, env = "IFC_STALE_AFTER", value_parser = parse_duration, global = true)]
    pub stale_after: Option<Duration>,

    /// The dedicated clone [default: .ifc/git/<session> for an agent or a command with
    /// --session, .ifc/git/ifc-bridge, ifc-audit or ifc-migrate for those commands, else
    /// .ifc/git/ifc-cli]
    #[arg(long, env = "IFC_GIT_WORKDIR", global = true)]
    pub git_workdir: Option<PathBuf>,
}

/// The coordinator store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Store {
    Etcd,
    Nats,
}

/// Which store the command talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// etcd (IF.coordinator)
    Coordinator,
    /// The markdown task board in a git repo
    Git,
    /// etcd first; git for an operation etcd fails, and for as long as etcd is down
    Hybrid,
}

impl From<Mode> for agent_core::config::Mode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Coordinator => agent_core::config::Mode::Coordinator,
            Mode::Git => agent_core::config::Mode::Git,
            Mode::Hybrid => agent_core::config::Mode::Hybrid,
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event
    Human,
    /// One JSON object per line
    Json,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people
    Table,
    /// JSON for programs (one object, an array, or one object per line for streams)
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a task or update its title, status or blockers (other stored fields are kept)
    Put(PutArgs),
    /// Delete tasks from etcd (a trial's, a mistake): never one that is claimed or that tasks not
    /// complete wait for, unless --force. Coordinator mode while git is retired or not
    /// configured; on a board, delete the row in a commit
    Delete {
        /// Task ids
        #[arg(required = true)]
        tasks: Vec<TaskId>,
        /// Delete a claimed task (its holder's run is fenced: it cannot complete it), one that
        /// others wait for (they then wait for a missing blocker until their blockers change),
        /// or an unreadable record
        #[arg(long)]
        force: bool,
    },
    /// Move complete tasks out of etcd's live prefix (`tasks/` into `archive/`): watches,
    /// lists and the agents stop carrying finished work. Keeps the complete tasks that tasks
    /// not complete wait for, and those claimed within --older-than. An archived task leaves
    /// lists and watches but stays complete: `get` and `verify` find it, a new task may wait
    /// for it, a session's list naming it counts it done, and `put` and `migrate` do not create
    /// it again (`--restore ID...` puts tasks back). Coordinator mode while git is retired or
    /// not configured
    Archive(ArchiveArgs),
    /// Show one task
    Get {
        /// Task id
        task: TaskId,
    },
    /// Claim tasks for a session: one compare-and-swap per task; exactly one claimer wins
    Claim(ClaimArgs),
    /// End a session's claim, marking the task complete or giving it back
    Release(ReleaseArgs),
    /// List every task
    Status,
    /// Stream task changes as they happen (until interrupted)
    Watch,
    /// Run a session agent: claim the session's tasks, run its command for each, report them done
    Agent(AgentArgs),
    /// Load the task board (--board FILE) into the coordinator, etcd or NATS (idempotent; never
    /// moves a task backwards)
    Migrate {
        /// Print what would change; write nothing
        #[arg(long)]
        dry_run: bool,
        /// Overwrite tasks etcd has further along (complete, claimed) with what the board says
        #[arg(long)]
        force: bool,
        /// Read the board from the coordination repo (--git-remote or the fleet file's git:)
        /// instead of a file
        #[arg(long)]
        from_git: bool,
    },
    /// Compare the task board (--board FILE) with the coordinator (etcd or NATS): exit 0 when
    /// they agree, 1 otherwise
    Verify {
        /// Read the board from the coordination repo instead of a file
        #[arg(long)]
        from_git: bool,
    },
    /// Write the coordinator's state (etcd or NATS) into the task board (--board FILE), changing
    /// only the cells that differ
    Export {
        /// Write it into the coordination repo's board instead: one commit, pushed (retried on a
        /// concurrent push)
        #[arg(long)]
        push: bool,
    },
    /// Keep etcd and the git board in step while sessions run on both: mirror etcd's transitions
    /// onto the board (at most one push per interval), import git sessions' claims and
    /// completions into etcd; count and log conflicts, resolving none
    Bridge(BridgeArgs),
    /// Compare etcd with the git board: print every difference and conflict; exit 0 when they
    /// agree, 1 when they differ
    Audit,
    /// Measure ifc against etcd's own floor, every figure from one run: one session's claims
    /// against bare transactions and events against a bare watch (interleaved), claims/s at each
    /// --concurrency against bare transactions at the same concurrency, optionally the guide's
    /// Python stack (--peer); with --sessions sessions set up first, simulated in this process
    /// (each its own lease and subscription). Checks that no task was won twice and every session
    /// heard every event (exit 1 otherwise). Works under a scratch prefix, removed when done
    Bench(BenchArgs),
    /// Serve the live board in a browser: every task as the board lays it out (status, owner,
    /// how long held, blockers), the live sessions, recent transitions and a claims chart,
    /// updated as they change. Read-only; works in every mode. `/metrics` has fleet-wide gauges
    /// (tasks by status, sessions by store)
    Ui(UiArgs),
    /// Run a local single-node etcd (with --store nats, a nats-server with JetStream) for trying
    /// ifc out (data under .ifc/dev/) until Ctrl-C
    Dev(DevArgs),
    /// Print a shell completion script: `ifc completion bash > /etc/bash_completion.d/ifc`,
    /// `source <(ifc completion zsh)`, `ifc completion fish > ~/.config/fish/completions/ifc.fish`
    Completion {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `ifc man > ifc.1 && man ./ifc.1`; `ifc man claim` for
    /// one command's page (ifc-claim(1))
    Man {
        /// The command whose page to print [default: ifc's own]
        command: Option<String>,
    },
    /// Check agents' history files (--history): no task run by two sessions at once, no
    /// completion without its claim or after its fencing, every won task completed exactly once;
    /// exit 0 when none is found, 1 otherwise
    CheckHistory {
        /// History files (JSON lines), read together
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// The global flags a command has no use for, hidden from its `--help` (issue 16: `ifc dev
/// --help` listed ~100 lines of them for its 3 options). They are still accepted.
const UNUSED_GLOBALS: &[(&str, &[&str])] = &[
    ("dev", &[STORES, GIT]),
    ("check-history", &[STORES, GIT]),
    ("completion", &[STORES, GIT]),
    ("man", &[STORES, GIT]),
    ("bench", &[GIT, RUNS]),
];
/// Marks for `UNUSED_GLOBALS`: every etcd and mode flag, every git flag, and the flags of
/// commands that claim and run tasks (bench measures etcd alone: the tester's `bench --mode
/// git` ran on etcd without a word).
const STORES: &str = "stores";
const GIT: &str = "git";
const RUNS: &str = "runs";
/// The flags `RUNS` names.
const RUN_FLAGS: &[&str] = &["mode", "history"];

/// The command line, each command's help showing the global flags it uses: a command that
/// has no use for some is given hidden copies of them before clap hands the global ones down
/// (which it does only to commands that lack them), so they are still accepted.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let ids = |c: clap::Command| -> Vec<String> {
        c.get_arguments().map(|a| a.get_id().to_string()).collect()
    };
    let git = ids(GitArgs::augment_args(clap::Command::new("git")));
    let globals: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .cloned()
        .collect();
    for (name, kinds) in UNUSED_GLOBALS {
        let hidden: Vec<clap::Arg> = globals
            .iter()
            .filter(|a| {
                let id = a.get_id().as_str();
                let is_git = git.iter().any(|g| g == id);
                // `ifc dev --store nats` runs a nats-server.
                let shown = id == "log_format" || (*name == "dev" && id == "store");
                let runs = kinds.contains(&RUNS) && RUN_FLAGS.contains(&id);
                !shown && (runs || kinds.contains(&if is_git { GIT } else { STORES }))
            })
            .map(|a| a.clone().hide(true))
            .collect();
        cmd = cmd.mut_subcommand(*name, |sub| sub.args(hidden));
    }
    cmd
}

/// Parses the process's arguments (exits with clap's usage error, code 2, when they are bad).
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// The etcd binary [default: etcd on PATH]
    #[arg(long)]
    pub etcd_bin: Option<PathBuf>,
    /// The nats-server binary, with --store nats [default: nats-server on PATH]
    #[arg(long)]
    pub nats_bin: Option<PathBuf>,
    /// Client port (etcd's peer port is the next one) [default: 2379, or 4222 with --store nats]
    #[arg(long)]
    pub port: Option<u16>,
    /// Where the server keeps its data and log
    #[arg(long, default_value = ".ifc/dev")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Tasks claimed at each concurrency level
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub tasks: u32,
    /// Sequential samples for the latency figures (claims, bare transactions, events)
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub samples: u32,
    /// Sessions set up before measuring: each announces itself with its own lease (kept alive)
    /// and holds its own subscription (see --lists); etcd only [default: 100]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub sessions: Option<u32>,
    /// etcd connections shared by the simulated sessions, each with one watch (the measured
    /// claimer and observer have one each besides) [default: one per 1,000 sessions]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: Option<u32>,
    /// Concurrent claiming sessions for the claims/s figures, comma-separated; each needs as
    /// many --sessions [default: those of 1,10,100 that --sessions allows]
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub concurrency: Option<Vec<u32>>,
    /// The sessions' lease TTL (etcd renews each lease every TTL/3)
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// What the simulated sessions subscribe to: `shared`, every task (one list shared by the
    /// whole fleet); `disjoint`, a list of their own that none of the bench's tasks is on (the
    /// realistic fleet: each hears nothing of the others' work). The measured claimer and
    /// observer always hear every task
    /// (etcd only) [default: shared]
    #[arg(long, value_enum)]
    pub lists: Option<Lists>,
    /// Also run the migration guide's Python stack against the same etcd and compare
    #[arg(long)]
    pub peer: bool,
    /// The peer benchmark to run for --peer
    #[arg(long, default_value = "benches/peer/run")]
    pub peer_cmd: PathBuf,
}

/// What `ifc bench`'s simulated sessions subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lists {
    Shared,
    Disjoint,
}

#[derive(Debug, Args)]
pub struct BridgeArgs {
    /// At most one git push per interval [default: the fleet file's bridge.interval, else 1s]
    #[arg(long, value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Do one round and exit (0: in step, 1: differences or conflicts remain)
    #[arg(long)]
    pub once: bool,
    /// Where the bridge keeps what the two stores last agreed on, so that after a restart (or in
    /// a `--once` run) it still tells which store made a change, a blocker edit included; kept
    /// per pair of stores [default: .ifc/bridge/state-<hash of the two stores>.json; a file
    /// given here holds one pair's]
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics and health at http://ADDR/health: a port
    /// (bound on 127.0.0.1) or HOST:PORT
    #[arg(long, value_name = "[HOST:]PORT", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct UiArgs {
    /// Where to serve the board: a port (bound on 127.0.0.1) or HOST:PORT (0.0.0.0:PORT lets
    /// other machines read it; port 0 picks a free one, printed at start)
    #[arg(long, value_name = "[HOST:]PORT", default_value = "127.0.0.1:8080", value_parser = parse_metrics_addr)]
    pub addr: std::net::SocketAddr,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The session file (agents/<session>.yaml). It and the fleet file are watched: a changed
    /// mode (or `rollback:`) takes effect at once, without a restart
    #[arg(long)]
    pub config: PathBuf,
    /// Exit 0 once every task of the session's list is complete (by anyone); exit 1 if one can
    /// never become claimable (a missing blocker, a cycle, or an id or glob of the list that
    /// matches no task for 10 s) or the session gave up (max_attempts) on all that is left
    #[arg(long)]
    pub until_done: bool,
    /// Where per-task logs go [default: .ifc/logs/<session>]
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// How many task logs (`<task>-<token>.log`) to keep in --log-dir: the oldest go as new
    /// runs start (0: keep every one). The directory is the session's own: agents sharing one
    /// prune each other's logs
    #[arg(long, env = "IFC_KEEP_LOGS", default_value_t = 1000, value_name = "N")]
    pub keep_logs: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics and health at http://ADDR/health: a port
    /// (bound on 127.0.0.1) or HOST:PORT (port 0 picks a free one, logged at start)
    #[arg(long, value_name = "[HOST:]PORT", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Run the session even if another live process runs it: that one is told to stop (within
    /// seconds it claims nothing more, finishes or gives back its running task as on SIGTERM,
    /// and exits 5); its claims stay its own until then. Without it, an agent whose session id
    /// is live elsewhere exits 5 and names that process; one whose earlier process died on this
    /// host takes over by itself (that process's claims end at once)
    #[arg(long)]
    pub take_over: bool,
}

#[derive(Debug, Args)]
pub struct ArchiveArgs {
    /// Archive the complete tasks whose completing claim was made at least this long ago
    /// (records keep the claim's time, not the completion's; a task with no claim time is
    /// old); `0s`: every complete task nothing waits for
    #[arg(long, default_value = "24h", value_parser = parse_duration, conflicts_with = "restore")]
    pub older_than: Duration,
    /// Say what would be archived; change nothing
    #[arg(long, conflicts_with = "restore")]
    pub dry_run: bool,
    /// Put these archived tasks back instead (exit 1 if one is not archived, or exists again)
    #[arg(long, num_args = 1.., value_name = "TASK")]
    pub restore: Vec<TaskId>,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// Task id
    pub task: TaskId,
    /// Title
    #[arg(long)]
    pub title: Option<String>,
    /// Status to set: available, blocked or complete (claims are made with `ifc claim`)
    #[arg(long, value_parser = parse_put_status)]
    pub status: Option<TaskStatus>,
    /// Tasks that must be complete first, comma-separated (an empty value clears them)
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub blocked_by: Option<Vec<String>>,
    /// Store --blocked-by even when a blocker does not exist (yet) or the chain leads back to the
    /// task: an agent waiting for it reports it and `--until-done` ends with exit 1 until it is
    /// fixed
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ClaimArgs {
    /// Task ids, tried in order
    #[arg(required = true)]
    pub tasks: Vec<TaskId>,
    /// The claiming session
    #[arg(long)]
    pub session: SessionId,
    /// Bind the claim to a lease of this many seconds: it ends by itself that long after this
    /// command exits, unless the session keeps the lease alive (as `ifc agent` does). Without it
    /// the claim holds until released. (Coordinator mode; in git mode a claim lasts while its
    /// STATUS heartbeat is fresh, see --stale-after.)
    #[arg(long, value_name = "SECONDS", value_parser = parse_ttl)]
    pub ttl: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// Task id
    pub task: TaskId,
    /// The holding session
    #[arg(long)]
    pub session: SessionId,
    /// What the task becomes
    #[arg(long, value_enum)]
    pub status: ReleaseStatus,
    /// Release only the claim with this fencing token (as handed to the task's command)
    #[arg(long)]
    pub fencing_token: Option<u64>,
}

/// The status a release leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReleaseStatus {
    /// Done for good
    Complete,
    /// Given back: claimable again
    Available,
}

/// `--metrics-addr`: a bare port is bound on loopback only; anything wider must be said.
fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(port) = s.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    // A host name (`localhost:9464`): its first address.
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            format!("{s:?} is not a port or HOST:PORT (e.g. 9464, localhost:9464 or 0.0.0.0:9464)")
        })
}

fn parse_put_status(s: &str) -> Result<TaskStatus, String> {
    match s.parse::<TaskStatus>() {
        Ok(TaskStatus::Claimed) => Err("claimed is not set with put: use `ifc claim`".into()),
        Ok(other) => Ok(other),
        Err(_) => Err(format!(
            "{s:?} is not a status put sets: available, blocked or complete"
        )),
    }
}

/// `--ttl`: whole seconds, as a number (`10`) or a duration (`10s`, `2m`).
fn parse_ttl(s: &str) -> Result<u64, String> {
    let secs = match s.trim().parse::<u64>() {
        Ok(n) => n,
        // A fraction without a unit would be told to add one, then refused: said once.
        Err(_) if s.trim().parse::<f64>().is_ok() => {
            return Err(format!("{s:?}: a lease lasts whole seconds (e.g. 2 or 2s)"))
        }
        Err(_) => {
            let d = parse_duration(s)?;
            if d.subsec_nanos() != 0 {
                return Err(format!("{s:?}: a lease lasts whole seconds"));
            }
            d.as_secs()
        }
    };
    if !(1..=86_400).contains(&secs) {
        return Err(format!("{s:?}: from 1 second to a day"));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
        command().debug_assert();
    }

    #[test]
    fn a_commands_help_shows_the_flags_it_uses() {
        // Issue 16: `ifc dev --help` was ~100 lines for 3 options; `--log-format` sat under
        // "Git mode".
        let help = |name: &str| {
            let mut cmd = command();
            cmd.build(); // hands the global flags down, as parsing does
            let sub = cmd.find_subcommand_mut(name).expect("a command");
            sub.render_long_help().to_string()
        };
        let dev = help("dev");
        assert!(
            !dev.contains("--endpoints") && !dev.contains("--git-remote"),
            "{dev}"
        );
        assert!(
            dev.contains("--port") && dev.contains("--etcd-bin"),
            "{dev}"
        );
        // Its five options (two servers since issue 19) and --log-format, not ~100 lines.
        assert!(dev.lines().count() < 45, "{dev}");
        assert!(
            dev.contains("--store") && dev.contains("--nats-bin"),
            "{dev}"
        );
        let bench = help("bench");
        assert!(
            bench.contains("--endpoints") && !bench.contains("--git-remote"),
            "{bench}"
        );
        let claim = help("claim");
        assert!(
            claim.contains("--endpoints") && claim.contains("--git-remote"),
            "{claim}"
        );
        let top = command().render_long_help().to_string();
        let git_mode = top.split("Git mode:").nth(1).unwrap_or_default();
        assert!(!git_mode.contains("--log-format"), "{top}");
        // Hidden, still accepted.
        assert!(command()
            .try_get_matches_from(["ifc", "dev", "--endpoints", "http://x:1"])
            .is_ok());
    }

    #[test]
    fn every_global_flag_has_its_environment_twin() {
        // Issue 16: the README said so; IFC_OUTPUT, the timeouts and TLS had none.
        let cli = Cli::command();
        let missing: Vec<_> = cli
            .get_arguments()
            .filter(|a| a.is_global_set() && a.get_long().is_some())
            .filter(|a| a.get_env().is_none())
            .filter_map(|a| a.get_long())
            .collect();
        assert!(
            missing.is_empty(),
            "global flags without IFC_*: {missing:?}"
        );
        let help = EXIT_CODES;
        for a in cli.get_arguments().filter(|a| a.is_global_set()) {
            if let Some(env) = a.get_env().and_then(|e| e.to_str()) {
                assert!(help.contains(env), "--help's environment list lacks {env}");
            }
        }
    }

    #[test]
    fn a_bare_metrics_port_binds_on_loopback_only() {
        assert_eq!(
            parse_metrics_addr("9464").map(|a| a.to_string()),
            Ok("127.0.0.1:9464".to_owned())
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:9464").map(|a| a.to_string()),
            Ok("0.0.0.0:9464".to_owned())
        );
        assert!(parse_metrics_addr("localhost").is_err());
        // The tester's: a host name was refused as "not HOST:PORT".
        assert_eq!(
            parse_metrics_addr("localhost:9464").map(|a| a.port()),
            Ok(9464)
        );
    }

    #[test]
    fn a_ttl_is_whole_seconds_with_or_without_its_unit() {
        // The tester's: `--ttl 10s` was refused ("invalid digit") though durations take units.
        assert_eq!(parse_ttl("10"), Ok(10));
        assert_eq!(parse_ttl("10s"), Ok(10));
        assert_eq!(parse_ttl("2m"), Ok(120));
        for bad in ["0", "500ms", "1.5s", "2d", "100000"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
        // The tester's: `1.5` was told to add a unit, and `1.5s` then refused.
        assert_eq!(
            parse_ttl("1.5"),
            Err("\"1.5\": a lease lasts whole seconds (e.g. 2 or 2s)".to_owned())
        );
    }
}
