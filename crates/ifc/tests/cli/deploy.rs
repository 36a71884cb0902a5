//! `deploy/`: the Grafana dashboard and the Prometheus alert rules query only metric names that
//! a running agent and `ifc ui` actually serve, the dashboard shows every one of them, and
//! promtool accepts the rules and passes their unit tests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use backend_etcd::testing::EtcdServer;
use serde_json::Value;

use crate::agent::{ifc, spawn_agent, Workdir, APPEND};
use crate::metrics::get;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Every sample name a `/metrics` body can carry, from its `# TYPE` lines: a histogram's
/// `_bucket`, `_sum` and `_count`, a counter's `_total`, a gauge's own name.
fn served_names(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// The `if_coordinator_*` names a text uses.
fn used_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("if_coordinator_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every `expr` of the dashboard's panels (rows and nested panels included).
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_and_the_alerts_use_only_metrics_ifc_serves_and_show_them_all() {
    let (etcd, w) = (EtcdServer::start(), Workdir::new());
    let e = etcd.endpoint();
    let config = w.session("deploy-1", &["NOTHING*"], APPEND, "");
    let log = w.path().join("agent.log");
    let _agent = spawn_agent(
        ifc(&e, w.path()),
        &config,
        &log,
        &["--metrics-addr", "127.0.0.1:0"],
    );
    let agent_addr =
        crate::metrics::metrics_addr(|| std::fs::read_to_string(&log).unwrap_or_default());
    let (_ui, url) = crate::ui::start_ui(ifc(&e, w.path()));
    let ui_addr = crate::ui::addr_of(&url);
    let mut served = BTreeSet::new();
    for addr in [&agent_addr, &ui_addr] {
        let (code, body) = get(addr, "/metrics");
        assert_eq!(code, 200, "{body}");
        served.extend(served_names(&body));
    }
    assert!(served.contains("if_coordinator_claims_total"), "{served:?}");
    assert!(served.contains("if_coordinator_board_tasks"), "{served:?}");

    let text = std::fs::read_to_string(deploy().join("grafana/ifc.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() > 10, "{queries:?}");
    let on_dashboard = used_names(&queries.join("\n"));
    let rules =
        std::fs::read_to_string(deploy().join("prometheus/ifc-alerts.yaml")).expect("alert rules");
    let in_rules = used_names(&rules);
    for (what, names) in [("dashboard", &on_dashboard), ("alert rules", &in_rules)] {
        let unknown: Vec<&String> = names.difference(&served).collect();
        assert!(
            unknown.is_empty(),
            "the {what} query metrics ifc does not serve: {unknown:?}\nserved: {served:?}"
        );
    }
    // Every metric family on the dashboard (a histogram by any of its series).
    let family = |n: &str| {
        ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(n)
            .to_owned()
    };
    let shown: BTreeSet<String> = on_dashboard.iter().map(|n| family(n)).collect();
    let missing: Vec<String> = served
        .iter()
        .map(|n| family(n))
        .filter(|f| !shown.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "served but not on the dashboard: {missing:?}"
    );
}

#[test]
fn promtool_accepts_the_alert_rules_and_their_unit_tests_pass() {
    let promtool = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(deploy().join("prometheus"))
            .output()
            .unwrap_or_else(|e| {
                panic!("promtool cannot run ({e}): run scripts/install-deps (Debian package prometheus)")
            });
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    promtool(&["check", "rules", "ifc-alerts.yaml"]);
    promtool(&["test", "rules", "ifc-alerts.test.yaml"]);
    promtool(&["check", "config", "scrape.yaml"]);
}
