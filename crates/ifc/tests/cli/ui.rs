//! `ifc ui` in a real browser: headless Chromium driven over WebDriver (chromedriver), against a
//! real etcd holding the Phase 0 board. The page shows the board, and a change made with the CLI
//! reaches the open page without a reload; a hundred open pages cost etcd nothing more.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backend_etcd::testing::EtcdServer;
use serde_json::{json, Value};

use crate::agent::{ifc, put, Workdir};
use crate::{code, run, text};

const BOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../docs/PHASE-0-TASK-BOARD.md"
);

/// A program the browser test needs, found on PATH, or a failure saying how to get it.
fn required(program: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is not on PATH: the browser test needs Chromium and its WebDriver; run scripts/install-deps (Debian packages chromium and chromium-driver)")
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A headless Chromium session behind its own chromedriver, ended (and reaped) on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let chromium = required("chromium");
        let port = free_port();
        let driver = Command::new(required("chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not start on {base}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            http,
            _profile: profile,
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1000",
                         format!("--user-data-dir={}", b._profile.path().display())],
            },
        }}});
        let created = b.call(reqwest::Method::POST, "/session", Some(caps)).await;
        b.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_owned();
        b
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await.expect("WebDriver answers");
        let status = resp.status();
        let body: Value =
            serde_json::from_str(&resp.text().await.expect("a body")).expect("WebDriver JSON");
        assert!(status.is_success(), "WebDriver {path}: {status} {body}");
        body["value"].clone()
    }

    async fn open(&self, url: &str) {
        let path = format!("/session/{}/url", self.session);
        self.call(reqwest::Method::POST, &path, Some(json!({"url": url})))
            .await;
    }

    /// Runs `script` (a function body) in the page; what it returns.
    async fn eval(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.session);
        self.call(
            reqwest::Method::POST,
            &path,
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Waits until `script` returns `want`; how long it took.
    async fn until(&self, what: &str, script: &str, want: Value) -> Duration {
        let start = Instant::now();
        loop {
            let got = self.eval(script).await;
            // A page too busy to answer holds `eval` up: the limit counts that time too.
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the page did not show {what} within 30 s: {script} returned {got} (want {want}) after {:?}",
                start.elapsed()
            );
            if got == want {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `HOST:PORT` of the board's URL.
pub(crate) fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// `ifc ui --addr 127.0.0.1:0` in `dir`, serving its store (`/health` 200); (the process, the
/// page's URL).
pub(crate) fn start_ui(cmd: Command) -> (crate::agent::Agent, String) {
    let (ui, url) = spawn_ui(cmd);
    let addr = addr_of(&url);
    crate::agent::wait_for("the board to serve", Duration::from_secs(60), || {
        crate::metrics::get(&addr, "/health").0 == 200
    });
    (ui, url)
}

/// `ifc ui --addr 127.0.0.1:0` as soon as it has printed its URL.
fn spawn_ui(mut cmd: Command) -> (crate::agent::Agent, String) {
    let mut child = cmd
        .args(["ui", "--addr", "127.0.0.1:0", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ifc ui starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ifc ui prints its address");
    let url: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("ifc ui's first line is its URL as JSON: {e}: {line:?}"));
    let url = url["url"].as_str().expect("url").to_owned();
    (crate::agent::Agent(child), url)
}

fn migrate(endpoint: &str, dir: &Path) {
    let out = run(ifc(endpoint, dir).args(["migrate", "--board", BOARD]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
}

const ROWS: &str = "return document.querySelectorAll('tr[data-task]').length";

fn row(task: &str) -> String {
    format!("const r = document.querySelector('tr[data-task=\"{task}\"]'); return r ? [r.dataset.status, r.dataset.holder] : null")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_shows_every_task_and_a_cli_claim_reaches_the_open_page_without_a_reload() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    migrate(&e, w.path());
    let (_ui, url) = start_ui(ifc(&e, w.path()));
    let browser = Browser::start().await;
    browser.open(&url).await;
    browser.until("the 54 tasks", ROWS, json!(54)).await;
    browser
        .until(
            "a live connection",
            "return document.getElementById('link').textContent",
            json!("live"),
        )
        .await;
    assert_eq!(browser.eval(&row("P0.2.6")).await, json!(["available", ""]));
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('section.group').length")
            .await,
        json!(7),
        "one section per workstream, P0.1 to P0.7"
    );
    // Marks this page load: a reload would lose it.
    browser.eval("window.ifcLoad = 'first'; return null").await;

    let out = run(ifc(&e, w.path()).args(["claim", "P0.2.6", "--session", "ui-tester"]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let took = browser
        .until("the claim", &row("P0.2.6"), json!(["claimed", "ui-tester"]))
        .await;
    eprintln!(
        "the claim reached the page {} ms after the CLI exited",
        took.as_millis()
    );
    assert_eq!(
        browser
            .eval("return [window.ifcLoad, window.ifcSnapshots]")
            .await,
        json!(["first", 1]),
        "the change came over the open stream: no reload, no second snapshot"
    );

    // A task added and one released: the rows follow, still without a reload.
    put(&e, w.path(), &["NEW.1", "--title", "added while watching"]);
    browser.until("the new task", ROWS, json!(55)).await;
    let out = run(ifc(&e, w.path()).args([
        "release",
        "P0.2.6",
        "--session",
        "ui-tester",
        "--status",
        "complete",
    ]));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    browser
        .until(
            "the completion",
            &row("P0.2.6"),
            json!(["complete", "ui-tester"]),
        )
        .await;
    // P0.2.7 waited for P0.2.6 alone: its row now says it is claimable.
    browser
        .until(
            "the dependent's hint",
            "return document.querySelector('tr[data-task=\"P0.2.7\"] .hint').textContent",
            json!("claimable"),
        )
        .await;
    let strip = browser
        .eval("return document.getElementById('transitions').textContent")
        .await;
    assert!(
        strip
            .as_str()
            .is_some_and(|s| s.contains("P0.2.6") && s.contains("NEW.1")),
        "{strip}"
    );
    assert_eq!(browser.eval("return window.ifcLoad").await, json!("first"));
    // A record someone overwrote with something unreadable: its row goes and the page names it.
    crate::raw(&etcd)
        .await
        .put("tasks/P0.7.7", "not json", None)
        .await
        .expect("put");
    browser
        .until(
            "the unreadable record",
            "const c = document.getElementById('corrupt'); return !c.hidden && c.textContent.includes('tasks/P0.7.7')",
            json!(true),
        )
        .await;
    assert_eq!(browser.eval(&row("P0.7.7")).await, Value::Null);
    let addr = addr_of(&url);
    let (_, metrics) = tokio::task::spawn_blocking(move || crate::metrics::get(&addr, "/metrics"))
        .await
        .expect("get");
    assert_eq!(
        sample_sum(&metrics, "if_coordinator_board_unreadable"),
        1.0,
        "{metrics}"
    );
}

/// A number from a Prometheus text body: the sum of every sample of `name`.
fn sample_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_hundred_open_pages_cost_etcd_nothing_more_than_one() {
    use std::io::{Read, Write};
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    migrate(&e, w.path());
    let (_ui, url) = start_ui(ifc(&e, w.path()));
    let addr = addr_of(&url);
    let etcd_metrics = || crate::metrics::get(&etcd.addr().to_string(), "/metrics").1;
    let watchers = |body: &str| sample_sum(body, "etcd_debugging_mvcc_watcher_total");
    let open_page = || {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(s, "GET /events HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("request");
        // The snapshot: the page has joined.
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("the snapshot");
        assert!(n > 0);
        s
    };
    let first = open_page();
    let with_one = watchers(&etcd_metrics());
    assert!(with_one >= 1.0, "ifc ui watches etcd");
    let pages: Vec<std::net::TcpStream> = (0..99).map(|_| open_page()).collect();
    let (_, ui_metrics) = crate::metrics::get(&addr, "/metrics");
    assert_eq!(
        sample_sum(&ui_metrics, "if_coordinator_ui_viewers"),
        100.0,
        "{ui_metrics}"
    );
    assert_eq!(
        watchers(&etcd_metrics()),
        with_one,
        "a hundred pages opened no watch on etcd"
    );
    // Every page hears a change, through the one watch.
    put(&e, w.path(), &["SEEN.1", "--title", "heard by every page"]);
    for (k, mut page) in pages.into_iter().chain([first]).enumerate() {
        let mut got = String::new();
        let mut buf = [0u8; 65536];
        while !got.contains("SEEN.1") {
            let n = page
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("page {k} heard nothing: {e}"));
            assert!(n > 0, "page {k}'s stream ended");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
}

/// A board of tasks `numbers`, in workstreams of 50 (`B.<w>.<k>`), as markdown.
fn generated_board(numbers: impl Iterator<Item = usize>) -> String {
    let mut board = String::from(
        "# Big board\n\n| ID | Task | Status | Owner | Blocked by |\n|----|------|--------|-------|------------|\n",
    );
    for i in numbers {
        board.push_str(&format!(
            "| B.{}.{} | generated task {i} | 🔵 AVAILABLE |  |  |\n",
            i / 50,
            i % 50
        ));
    }
    board
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_thousands_of_new_tasks_reaches_an_open_page_of_a_big_board() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    let migrate_board = |name: &str, numbers: Vec<usize>| {
        let file = w.path().join(format!("board-{name}.md"));
        std::fs::write(&file, generated_board(numbers.into_iter())).expect("board");
        let out = run(ifc(&e, w.path()).arg("migrate").arg("--board").arg(&file));
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    };
    // Every other task of 80 workstreams.
    migrate_board("even", (0..4000).step_by(2).collect());
    let (_ui, url) = start_ui(ifc(&e, w.path()));
    let browser = Browser::start().await;
    browser.open(&url).await;
    browser.until("the 2000 tasks", ROWS, json!(2000)).await;
    // 3000 more while the page is open, one message each: the 2000 others of those workstreams
    // (each row goes between two of the page's) and 1000 in 20 new workstreams.
    migrate_board(
        "odd-and-new",
        (1..4000).step_by(2).chain(4000..5000).collect(),
    );
    let took = browser.until("all 5000 tasks", ROWS, json!(5000)).await;
    eprintln!(
        "the page showed all 5000 tasks {} ms after the migration ended",
        took.as_millis()
    );
    assert_eq!(
        browser.eval("return window.ifcSnapshots").await,
        json!(1),
        "every change came over the open stream"
    );
    // In board order, each in its workstream's table (the page's own order function).
    let in_order = "const ids = [...document.querySelectorAll('tr[data-task]')].map(r => r.dataset.task); \
        const sections = [...document.querySelectorAll('section.group')].every(g => [...g.querySelectorAll('tr[data-task]')].every(r => r.dataset.task.startsWith(g.dataset.group + '.'))); \
        return sections && ids.every((id, i) => i === 0 || boardOrder(ids[i - 1], id) < 0)";
    assert_eq!(browser.eval(in_order).await, json!(true));
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('section.group').length")
            .await,
        json!(100)
    );
    assert_eq!(
        browser
            .eval("return document.getElementById('link').textContent")
            .await,
        json!("live")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_started_before_its_store_says_it_is_waiting_then_serves() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let proxy = backend_etcd::testing::TcpProxy::start(etcd.addr()).await;
    proxy.cut();
    let (_ui, url) = spawn_ui(ifc(&proxy.endpoint(), w.path()));
    let addr = addr_of(&url);
    let health = addr.clone();
    let (code, body) = tokio::task::spawn_blocking(move || crate::metrics::get(&health, "/health"))
        .await
        .expect("get");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting for the task store"), "{body}");
    proxy.restore();
    let health = addr.clone();
    tokio::task::spawn_blocking(move || {
        crate::agent::wait_for("the board to serve", Duration::from_secs(60), || {
            crate::metrics::get(&health, "/health").0 == 200
        })
    })
    .await
    .expect("wait");
    let (code, body) =
        tokio::task::spawn_blocking(move || crate::metrics::get(&addr, "/api/board"))
            .await
            .expect("get");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"kind\":\"snapshot\""), "{body}");
}
